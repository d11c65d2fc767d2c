"""The fine-tuning loop shared by every method: same seed, data order, step budget, schedule
(linear warmup then linear decay) and evaluation, so a comparison differs in the method alone.

Built on accelerate: ``accelerate launch -m gradkit finetune ...`` or ``torchrun --nproc_per_node 2
-m gradkit finetune ...`` runs data-parallel (gloo on CPU, NCCL on GPU). ``--batch-size`` is the
global batch: each process takes its contiguous slice of every step's batch (the step's position in
the seeded :class:`TrainingStream`), so the run sees the same examples in the same order whatever the
number of processes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.files import clear_folder, json_line, write_json
from gradkit.train.batching import Tokenized
from gradkit.train.config import TrainConfig
from gradkit.train.metrics import window_mean
from gradkit.train.validate import check_config, check_data, check_model


def load_datasets(cfg: TrainConfig):
    """``(train, dev, test)``: the dev and test labels are mapped through the train label ids. ``dev``
    is ``cfg.dev``, or ``cfg.dev_fraction`` of the training file carved out of it (seeded; those rows
    are not trained on), or None; ``test`` is None when the run does not evaluate. Pairs and
    regression targets follow ``cfg.text_pair_col`` and ``cfg.task``; ``--task causal-lm`` reads
    :func:`gradkit.data.causal.load_causal_lm_data` files (``cfg.text_field``)."""
    from gradkit.data import load_text_classification

    if cfg.task == "causal-lm":
        from gradkit.data.causal import load_causal_lm_data

        def read(path):
            return load_causal_lm_data(path, text_field=cfg.text_field)

        train, dev = read(cfg.train), read(cfg.dev) if cfg.dev is not None else None
        if dev is None and cfg.dev_fraction is not None:
            train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
        return train, dev, read(cfg.test) if cfg.evaluate else None

    cols = {
        "text_col": _column(cfg.text_col),
        "label_col": _column(cfg.label_col),
        "text_pair_col": _column(cfg.text_pair_col),
        "task": cfg.task,
    }
    train = load_text_classification(cfg.train, split="train", **cols)
    names = train.label_names if cfg.task == "classification" else None
    dev = None
    if cfg.dev is not None:
        dev = load_text_classification(cfg.dev, split="test", label_names=names, **cols)
    elif cfg.dev_fraction is not None:
        train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
    if not cfg.evaluate:
        return train, dev, None
    test = load_text_classification(cfg.test, split="test", label_names=names, **cols)
    for other in (dev, test):
        if other is not None and (other.pairs is None) != (train.pairs is None):
            what = "sentence pairs" if train.pairs is not None else "single texts"
            raise GradkitError(
                f"{other.path} does not read as {what} like the training file {train.path}; give both files "
                "the same columns (or pass --text-pair-col)"
            )
    return train, dev, test


def carve_dev(train, fraction: float, seed: int):
    """Split ``round(fraction * n)`` rows (at least 1, seeded by ``seed``, independent of the training
    order's stream) off the training set as a dev set; both keep the file's order."""
    from gradkit.data import shuffled_order

    n = len(train)
    n_dev = max(1, round(fraction * n))
    if n_dev >= n:
        raise GradkitError(
            f"--dev-fraction {fraction:g} of {n} training rows leaves none to train on; pass a smaller "
            "fraction (e.g. 0.1) or a --dev file"
        )
    chosen = set(shuffled_order(n, seed, epoch=-1)[:n_dev])  # epoch -1: a stream no training epoch uses

    def subset(dev: bool, path: str):
        rows = [i for i in range(n) if (i in chosen) == dev]
        if hasattr(train, "select"):  # causal-LM data
            return train.select(rows, path)
        pairs = None if train.pairs is None else [train.pairs[i] for i in rows]
        return dataclasses.replace(
            train,
            texts=[train.texts[i] for i in rows],
            labels=[train.labels[i] for i in rows],
            pairs=pairs,
            path=path,
        )

    return subset(False, train.path), subset(True, f"{train.path} [dev: {n_dev} rows carved, seed {seed}]")


def describe_data(train, test, shown: int = 10, dev=None) -> str:
    """One line saying what a run read: rows per split, single texts or pairs, and the label map (id =
    label as in the file) or the range of the regression targets."""
    if getattr(train, "task", None) == "causal-lm":
        dev_part = f"dev {dev.path} ({len(dev):,} rows), " if dev is not None else ""
        test_part = f"test {test.path} ({len(test):,} rows)" if test is not None else "no test set"
        kind = (
            "plain texts, loss on every token"
            if train.plain
            else "prompt/response pairs, loss on the response tokens"
        )
        return f"data: train {train.path} ({len(train):,} rows), {dev_part}{test_part}; causal LM: {kind}"
    test_part = f"test {test.path} ({len(test.texts):,} rows)" if test is not None else "no test set"
    dev_part = f"dev {dev.path} ({len(dev.texts):,} rows), " if dev is not None else ""
    kind = "sentence pairs; " if getattr(train, "pairs", None) is not None else ""
    if getattr(train, "task", "classification") == "regression":
        target = f"regression targets in [{min(train.labels):g}, {max(train.labels):g}]"
    else:
        labels = ", ".join(f"{i} = {name!r}" for i, name in enumerate(train.label_names[:shown]))
        more = f", ... ({train.num_classes - shown} more)" if train.num_classes > shown else ""
        target = f"{train.num_classes} classes: {labels}{more}"
    return f"data: train {train.path} ({len(train.texts):,} rows), {dev_part}{test_part}; {kind}{target}"


def _column(value: str | int | None) -> str | int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else value


class TrainingStream:
    """The training stream: example indices, one seeded shuffle of ``range(n)`` per epoch, read by slice
    (a step's batch is the next slice, so the data position of a run is its step). Only the epochs a
    slice touches are drawn, so a long run costs no memory up front."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        from gradkit.data import shuffled_order

        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, shuffled_order(self.n, self.seed, epoch))
        return self._epoch[1]

    def slice(self, start: int, stop: int) -> list[int]:
        out: list[int] = []
        while start < stop:
            epoch, offset = divmod(start, self.n)
            take = min(stop - start, self.n - offset)
            out.extend(self._order(epoch)[offset : offset + take])
            start += take
        return out


def training_order(n: int, total: int, seed: int) -> list[int]:
    """The first ``total`` indices of :class:`TrainingStream` ``(n, seed)``."""
    return TrainingStream(n, seed).slice(0, total)


@torch.no_grad()
def evaluate(
    model, data: Tokenized, batch_size: int = 128, device: Any = "cpu", prefix: str = "test"
) -> dict[str, float]:
    """``<prefix>_loss`` and every metric of the task (:func:`gradkit.train.metrics.task_metrics`:
    accuracy, macro-F1 and Matthews correlation of the argmax; Pearson and Spearman of the output for
    regression, whose data carry float labels) of ``model`` on ``data`` (eval mode, no dropout).
    Batches are formed in length order, so each is padded little; the metrics do not depend on the
    batching. Causal-LM data: :func:`gradkit.train.causal.evaluate_causal` (loss per token, perplexity)."""
    from gradkit.train.causal import CausalTokenized, evaluate_causal
    from gradkit.train.metrics import task_metrics

    if isinstance(data, CausalTokenized):
        return evaluate_causal(model, data, batch_size, device, prefix)

    was_training = model.training
    model.eval()
    lengths = data.lengths()
    order = sorted(range(len(data)), key=lambda i: -lengths[i])  # longest first: peak memory up front
    outputs: torch.Tensor | None = None
    loss_sum = 0.0
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in data.collate(rows).items()}
        out = model(**batch)
        loss_sum += out.loss.double().item() * len(rows)
        logits = out.logits.detach().float().cpu()
        if outputs is None:
            outputs = torch.empty(len(data), *logits.shape[1:])
        outputs[torch.tensor(rows)] = logits
    model.train(was_training)
    task = "regression" if data.label_dtype.is_floating_point else "classification"
    labels = torch.tensor(data.labels, dtype=data.label_dtype)
    assert outputs is not None
    return {**task_metrics(task, outputs, labels, prefix), f"{prefix}_loss": loss_sum / len(data)}


def evaluate_texts(
    model, data, tokenizer, max_length: int, batch_size: int = 128, device="cpu", prefix: str = "test"
) -> dict[str, float]:
    """:func:`evaluate` on a loaded data set (tokenised here, pairs included, as the harness does)."""
    from gradkit.train.batching import tokenize_data

    tokens = tokenize_data(tokenizer, data, max_length)
    return evaluate(model, tokens, batch_size, torch.device(device), prefix)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in the optimiser's per-parameter state (on this process: a
    tensor sharded by ``--fsdp`` counts its local shard)."""
    from gradkit.fsdp import local

    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += local(value).numel() * value.element_size()
    return total


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory for CUDA, else this process's peak resident set size (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ranks_agree(model: torch.nn.Module, accelerator) -> bool:
    """True when every process holds bit-identical parameters (a SHA-256 of their bytes, gathered).
    Under ``--fsdp`` each parameter is first gathered whole (one at a time, every rank takes part)."""
    import hashlib

    from accelerate.utils import gather_object

    from gradkit.fsdp import full, reshard

    # after a forward alone FSDP2 leaves the root's unsharded parameters registered; .numpy() below
    # would pin their storage, which FSDP2 must free: reshard, so every sharded one is gathered afresh
    reshard(model)
    digest = hashlib.sha256()
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        whole = full(param.detach())
        digest.update(whole.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    return len(set(digests)) == 1


def default_out(method: str) -> Path:
    """``runs/<method>-<time>``, with ``-2``, ``-3``, ... when a run of the same second has it."""
    base = Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _warn_if_launched_alone(num_processes: int) -> None:
    """``accelerate launch --num_processes N`` without ``--multi_gpu`` on a machine without GPUs sets the
    rendezvous address for N processes but starts one: say so instead of silently training alone."""
    if num_processes == 1 and "ACCELERATE_USE_CPU" in os.environ and "MASTER_ADDR" in os.environ:
        print(
            "gradkit: warning: the launcher asked for several processes but runs as one; on a machine "
            "without GPUs use `accelerate launch --multi_gpu --num_processes N` or `torchrun --nproc_per_node N`",
            file=sys.stderr,
        )


def _skipped_steps(optimizer: Any) -> int | None:
    """Steps the optimiser chose to skip (ZerothOrder's count; None for optimisers that never skip),
    looked up through accelerate's wrapper."""
    return getattr(getattr(optimizer, "optimizer", optimizer), "skipped_steps", None)


def _scheduler(optimizer, cfg: TrainConfig):
    from transformers import get_linear_schedule_with_warmup

    if cfg.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)


def _cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


def _tracker_config(cfg: TrainConfig, lr: float) -> dict[str, Any]:
    """The run's settings as TensorBoard hparams take them (numbers, strings and booleans only)."""
    flat = {**{k: v for k, v in cfg.to_dict().items() if k != "options"}, **cfg.options, "lr": lr}
    return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


def _keep_rows(path: Path, last_step: int) -> None:
    """Rewrite metrics.jsonl (atomically) with only its complete rows of steps up to ``last_step``: a
    resumed run appends from there (a row cut short by a hard kill is dropped too)."""
    import json

    from gradkit.files import atomic_path

    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0 if "head_warmup_step" in row else last_step + 1) <= last_step:
                kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))


def finetune(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    method: Any = None,
    resume: bool = False,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.train`` with ``cfg.method``, evaluate on ``cfg.test`` and
    write the run folder (config.json, labels.json, status.json, metrics.jsonl, summary.json,
    loss.png, the trained weights or adapter; with ``cfg.ema`` also ``ema/``, the averaged weights in
    the same format, and ``summary["ema"]``, their test metrics; with ``cfg.keep_best`` also ``best/``
    and ``summary["best"]``; with ``cfg.save_every`` resumable ``checkpoints/``). Returns the summary.

    ``method`` runs a :class:`~gradkit.train.methods.Method` instance in place of the registered
    ``cfg.method`` (for tools built on this loop, such as ``gradkit noise-scale``). ``resume``: continue
    the run in ``cfg.out`` from its latest checkpoint (see :func:`resume`). ``stop_after``: end this
    session after that step as an interruption would (status ``stopped``), for time-sliced jobs; the
    returned summary then holds only the status.
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from gradkit.data import save_label_map
    from gradkit.train import checkpoint as ckpt
    from gradkit.train.batching import tokenize_data
    from gradkit.train.head_warmup import warm_up_head
    from gradkit.train.methods import get_method
    from gradkit.train.metrics import check_metric, is_better
    from gradkit.train.model import label_text_head, load_classifier, load_tokenizer
    from gradkit.train.plots import plot_losses
    from gradkit.train.precision import autocast, autocast_forward
    from gradkit.train.sharding import (
        full_tensors,
        full_weights,
        load_local_optimizer_state,
        local_optimizer_state,
        shard_model,
    )

    phases: dict[str, float] = {}  # seconds of each phase of this session, for the summary
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases[name] = phases.get(name, 0.0) + now - mark
        mark = now

    method = method if method is not None else get_method(cfg.method)
    check_config(cfg, resume=resume)  # every setting, before anything is loaded or written
    train_data, dev_data, test_data = load_datasets(
        cfg
    )  # every data error surfaces before anything is written
    head_texts = check_data(cfg, train_data)
    metric = check_metric(cfg.task, cfg.metric)
    step_examples = cfg.batch_size * cfg.grad_accum
    # the head warm-up reads the stream's first batches; the method's step 1 takes the next one
    warmup_examples = cfg.head_warmup * step_examples
    if progress and int(os.environ.get("RANK", "0")) == 0:
        print(describe_data(train_data, test_data, dev=dev_data))
    tokenizer = load_tokenizer(cfg.model)
    phase("read_data")
    out = Path(cfg.out) if cfg.out else default_out(cfg.method)
    checkpoint = None
    if resume:
        checkpoint = ckpt.latest_checkpoint(out)
        if checkpoint is None:
            raise GradkitError(
                f"{out} holds no checkpoint to resume from; it ran without --save-every or stopped before "
                "its first one: start it again"
            )

    # the global batch is split across processes; recent accelerate silently ignores the old
    # ``Accelerator(split_batches=...)`` keyword, so it goes through DataLoaderConfiguration
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        cpu=not torch.cuda.is_available(),
        log_with=["tensorboard"] if cfg.report_to == "tensorboard" else None,
        project_dir=str(out),
    )
    _warn_if_launched_alone(accelerator.num_processes)
    processes, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % processes:
        raise GradkitError(
            f"--batch-size {cfg.batch_size} does not split evenly over {processes} processes; "
            f"use a multiple of {processes}"
        )
    set_seed(cfg.seed)
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    main = accelerator.is_main_process
    device = accelerator.device

    # tokenised once; each step's batch is the next slice of the seeded stream, this process's share
    train_tokens = tokenize_data(tokenizer, train_data, cfg.max_length)
    dev_tokens = dev_data and tokenize_data(tokenizer, dev_data, cfg.max_length)
    test_tokens = test_data and tokenize_data(tokenizer, test_data, cfg.max_length)
    stream = TrainingStream(len(train_data), cfg.seed)
    share = step_examples // processes
    phase("tokenize")

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device) for k, v in batch.items()}

    def step_batch(step: int, offset: int = warmup_examples) -> dict[str, torch.Tensor]:
        first = offset + (step - 1) * step_examples + rank * share
        return to_device(train_tokens.collate(stream.slice(first, first + share)))

    if cfg.task == "causal-lm":
        from gradkit.train.causal import load_causal_lm

        model = load_causal_lm(cfg.model)
    else:
        model = load_classifier(
            cfg.model, train_data.num_outputs, pooling=cfg.pooling, seed=cfg.seed, task=cfg.task
        )
    check_model(cfg, model, tokenizer, cfg.model or "the bundled all-MiniLM-L6-v2")
    model.to(device)
    if head_texts is not None:
        model.head = label_text_head(model, tokenizer, head_texts, cfg.max_length)
    phase("load_model")
    start_metrics: dict[str, Any] = {}  # step 0 (zero-shot) and after the head warm-up, on the test set
    warmup_losses: list[float] = []
    if checkpoint is not None:
        model = method.prepare_for_resume(model, cfg)  # the warmed head is among the checkpoint's tensors
    else:
        if test_tokens is not None:
            with autocast(cfg.precision, device.type):  # in the precision the run trains and tests in
                start_metrics["step0"] = evaluate(model, test_tokens, cfg.eval_batch_size, device)
            phase("evaluate")
        if cfg.head_warmup:
            head_lr = cfg.head_lr if cfg.head_lr is not None else get_method("head").default_lr
            bar = tqdm(
                total=cfg.head_warmup,
                desc="head warm-up",
                disable=not (progress and rank == 0),
                dynamic_ncols=True,
            )

            def on_warmup_step(_: int, loss: float) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")

            warmed = warm_up_head(
                model,
                (step_batch(s, offset=0) for s in range(1, cfg.head_warmup + 1)),
                lr=head_lr,
                weight_decay=cfg.weight_decay,
                max_examples=cfg.batch_size // processes,
                on_step=on_warmup_step,
            )
            bar.close()
            warmup_losses = warmed["losses"]
            phase("head_warmup")
            start_metrics["head_warmup"] = {
                "steps": cfg.head_warmup,
                "lr": head_lr,
                "examples": warmup_examples,
                "final_train_loss": window_mean(warmup_losses, len(warmup_losses)),
                "seconds": round(warmed["seconds"], 2),
            }
            if test_tokens is not None:
                start_metrics["head_warmup"].update(evaluate(model, test_tokens, cfg.eval_batch_size, device))
            phase("evaluate")
        # methods that look at data first (LoRA-GA) see the next training batches, whole, on every rank
        prep_batches = (
            to_device(
                train_tokens.collate(
                    stream.slice(
                        warmup_examples + i * cfg.batch_size, warmup_examples + (i + 1) * cfg.batch_size
                    )
                )
            )
            for i in range(cfg.steps * cfg.grad_accum)
        )
        model = method.prepare(model, cfg, prep_batches)
    if cfg.fsdp:  # each transformer block, then the root (gradkit.train.sharding)
        model = shard_model(model)
    # --precision bf16: from here every forward runs in bf16 autocast (gradkit.train.precision); the
    # weights, gradients, optimiser states and the methods' own algebra stay fp32
    model = autocast_forward(model, cfg.precision, device.type)
    phase("prepare")  # LoRA-GA's gradient estimation and SVDs happen here
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = method.make_optimizer(model, cfg, lr)
    scheduler = _scheduler(optimizer, cfg)
    state: dict[str, Any] = {}
    best_tensors = local = None
    if checkpoint is not None:
        tensors, state, best_tensors, local = ckpt.load_checkpoint(checkpoint, rank)
        if state["num_processes"] != processes:
            raise GradkitError(
                f"{out} was run with {state['num_processes']} processes; resume it with the same number "
                f"(this launch has {processes})"
            )
        method.load_checkpoint_tensors(model, tensors)
        if cfg.fsdp:  # each rank's shards of the optimiser and EMA state (gradkit.train.sharding)
            load_local_optimizer_state(optimizer, local["sharded"]["optimizer"])
            state["ema"] = local["sharded"]["ema"]
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.load_state_dict(local["local"])
    # the run folder is made only now: a setting, data, model or method that fails leaves nothing behind
    if main and checkpoint is None:
        if cfg.overwrite and out.is_dir():
            clear_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {**cfg.to_dict(), "lr": lr, "num_processes": processes})
        if cfg.task != "causal-lm":  # a causal LM has no labels
            save_label_map(train_data, out / "labels.json")
    if cfg.fsdp:  # FSDP2 already reduces the gradients: no DDP around it
        optimizer = accelerator.prepare(optimizer)
    else:
        model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    ema = None
    if cfg.ema is not None:
        from gradkit.ema import EMA

        # every rank holds the same weights after each step, so every rank's average is the same
        ema = EMA(model, decay=cfg.ema, warmup=cfg.ema_warmup)
        if state.get("ema") is not None:
            ema.load_state_dict(state["ema"])

    start_step = state.get("step", 0)
    losses: list[float] = state.get("losses", [])
    loss_steps: list[int] = state.get("loss_steps", [])  # the step of each loss (a skipped step has none)
    dev_curve: list[list[float]] = state.get("dev_curve", [])  # [step, dev loss] pairs for the plot
    best: dict[str, Any] = state.get("best", {})
    start_metrics = state.get("start_metrics", start_metrics)
    warmup_losses = state.get("warmup_losses", warmup_losses)
    skipped = state.get("skipped", 0)
    seconds_before = state.get("train_seconds", 0.0)
    checkpoint_step = start_step if checkpoint is not None else None
    metrics_path = out / "metrics.jsonl"
    log = None
    if main:
        if checkpoint is not None:
            _keep_rows(metrics_path, start_step)
        log = open(metrics_path, "a" if checkpoint is not None else "w")  # noqa: SIM115 (open across the loop)
        ckpt.write_status(out, "running", step=start_step, steps=cfg.steps, checkpoint_step=checkpoint_step)
        if checkpoint is None:
            for i, warm_loss in enumerate(
                warmup_losses, 1
            ):  # the warm-up's own rows, apart from the method's
                log.write(json_line({"head_warmup_step": i, "loss": warm_loss}) + "\n")
    if cfg.report_to == "tensorboard":
        accelerator.init_trackers("tensorboard", config=_tracker_config(cfg, lr))

    def write_row(row: dict[str, Any]) -> None:
        if log:
            log.write(json_line(row) + "\n")
            log.flush()

    def save(step: int) -> None:
        loop_state = {
            "step": step,
            "losses": losses,
            "loss_steps": loss_steps,
            "dev_curve": dev_curve,
            "best": best,
            "start_metrics": start_metrics,
            "warmup_losses": warmup_losses,
            "skipped": skipped,
            "train_seconds": seconds_before + time.perf_counter() - start,
            "num_processes": processes,
            "optimizer": None if cfg.fsdp else getattr(optimizer, "optimizer", optimizer).state_dict(),
            "scheduler": scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None and not cfg.fsdp else None,
        }
        sharded = None
        if cfg.fsdp:
            sharded = {
                "optimizer": local_optimizer_state(optimizer),
                "ema": ema.state_dict() if ema is not None else None,
            }
        ckpt.save_checkpoint(
            out,
            step,
            tensors=full_tensors(method.checkpoint_tensors(unwrapped)),  # whole tensors under --fsdp too
            state=loop_state,
            best=full_tensors(best_tensors) if best_tensors is not None else None,
            local_state=method.state_dict(),
            sharded_state=sharded,
            accelerator=accelerator,
            process_index=rank,
            main=main,
        )

    if local is not None:
        ckpt.set_rng_state(local["rng"])  # the last thing before the first step: nothing draws in between
    bar = tqdm(
        total=cfg.steps,
        initial=start_step,
        desc=cfg.method,
        disable=not (progress and main),
        dynamic_ncols=True,
    )
    phase("setup")
    start = time.perf_counter()
    step = start_step
    model.train()
    try:
        for step in range(start_step + 1, cfg.steps + 1):
            current_lr = scheduler.get_last_lr()[0]
            skipped_before = _skipped_steps(optimizer)
            loss = method.train_step(model, step_batch(step), optimizer, accelerator, cfg)
            scheduler.step()
            if ema is not None:
                ema.update(step)
            loss = accelerator.reduce(loss.float(), reduction="mean").item()
            if (
                not math.isfinite(loss)
                and skipped_before is not None
                and _skipped_steps(optimizer) > skipped_before
            ):
                # the optimiser (ZerothOrder) skipped the step itself: it warns once, counts, and raises
                # after max_bad_steps in a row
                skipped += 1
            elif not math.isfinite(loss):
                raise GradkitError(
                    f"the train loss became {loss} at step {step} with lr {lr:g}; lower --lr "
                    f"(or raise --warmup-ratio) and run again"
                )
            else:
                losses.append(loss)
                loss_steps.append(step)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    row = {"step": step, "loss": loss, "lr": current_lr, **method.step_metrics()}
                    write_row({**row, "seconds": round(seconds_before + time.perf_counter() - start, 4)})
                    if cfg.report_to == "tensorboard":
                        accelerator.log({"train/loss": loss, "train/lr": current_lr}, step=step)
                bar.set_postfix(loss=f"{window_mean(losses, len(losses)):.4f}")
            bar.update(1)
            if dev_tokens is not None and (
                step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)
            ):
                phase("train")
                dev = evaluate(unwrapped, dev_tokens, cfg.eval_batch_size, device, "dev")
                write_row({"step": step, **dev})
                dev_curve.append([step, dev["dev_loss"]])
                if cfg.report_to == "tensorboard":
                    accelerator.log({f"dev/{k[4:]}": v for k, v in dev.items()}, step=step)
                score = dev[f"dev_{metric}"]  # in the metric's own direction; NaN never wins
                if cfg.keep_best and is_better(metric, score, best.get(f"dev_{metric}")):
                    best = {"step": step, **dev}
                    best_tensors = _cpu_copy(method.checkpoint_tensors(unwrapped))
                phase("evaluate")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                phase("train")
                save(step)
                checkpoint_step = step
                if main:
                    ckpt.write_status(out, "running", step=step, steps=cfg.steps, checkpoint_step=step)
                phase("checkpoint")
            if stop_after is not None and step >= stop_after and step < cfg.steps:
                break
        # a loss is computed before its step's update: the last update can still overflow the weights
        broken = [
            n for n, p in unwrapped.named_parameters() if p.requires_grad and not torch.isfinite(p).all()
        ]
        if broken:
            raise GradkitError(
                f"the weights became non-finite (inf or NaN: {broken[0]}, {len(broken)} tensors in all) by "
                f"step {step} with lr {lr:g}; lower --lr (or raise --warmup-ratio) and run again"
            )
    except BaseException as err:
        if main:
            interrupted = isinstance(err, KeyboardInterrupt)
            reason = "interrupted" if interrupted else " ".join(str(err).split())
            ckpt.write_status(
                out,
                "stopped" if interrupted else "failed",
                reason=reason,
                step=step,
                steps=cfg.steps,
                checkpoint_step=checkpoint_step,
            )
        raise
    finally:
        bar.close()
        if log:
            log.close()
    if step < cfg.steps:  # stop_after: the session ends here, the run goes on from its checkpoint
        if main:
            ckpt.write_status(
                out,
                "stopped",
                reason="stop_after",
                step=step,
                steps=cfg.steps,
                checkpoint_step=checkpoint_step,
            )
        accelerator.wait_for_everyone()
        return {"status": "stopped", "step": step, "checkpoint_step": checkpoint_step, "out": str(out)}
    train_seconds = seconds_before + time.perf_counter() - start
    phase("train")
    if not losses:  # every step was skipped for a non-finite loss: there is nothing to report or keep
        raise GradkitError(
            f"the train loss was not finite in any of the {cfg.steps} steps ({skipped} skipped by the "
            "optimiser); lower --lr (or --zo-eps) and run again"
        )

    agree = ranks_agree(unwrapped, accelerator) if processes > 1 else True
    results: dict[str, Any] = {}
    if test_tokens is not None:
        results = evaluate(unwrapped, test_tokens, cfg.eval_batch_size, device)
    if dev_curve:
        results["dev_loss_at"] = {str(int(s)): v for s, v in dev_curve}
    if ema is not None:
        with ema.swapped():
            ema_results = {}
            if test_tokens is not None:
                ema_results = evaluate(unwrapped, test_tokens, cfg.eval_batch_size, device)
            with full_weights(unwrapped, keep=main):  # --fsdp: gathered; every rank takes part
                if main:
                    method.save(unwrapped, out / "ema")  # the EMA weights, in the method's own format
        results["ema"] = {"decay": cfg.ema, "warmup": cfg.ema_warmup, **ema_results}
    phase("evaluate")
    with full_weights(unwrapped, keep=main):
        if main:
            method.save(unwrapped, out)  # the final weights
    if best_tensors is not None:
        # the best-on-dev weights: chosen on dev alone, then tested once, saved beside the final ones
        final = _cpu_copy(method.checkpoint_tensors(unwrapped))
        method.load_checkpoint_tensors(unwrapped, best_tensors)
        best_test = {}
        if test_tokens is not None:
            best_test = evaluate(unwrapped, test_tokens, cfg.eval_batch_size, device)
        with full_weights(unwrapped, keep=main):
            if main:
                method.save(unwrapped, out / "best")
        method.load_checkpoint_tensors(unwrapped, final)
        results["best"] = {**best, **best_test}
    phase("evaluate")
    summary = {
        "status": "finished",
        "method": cfg.method,
        "task": cfg.task,
        "metric": metric,
        "precision": cfg.precision,
        "lr": lr,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "seed": cfg.seed,
        "final_train_loss": window_mean(losses, len(losses)),
        "train_loss_at": {
            str(s): window_mean(losses, s) for s in (10, 50, 100, 200, 300, 500, 1000) if s <= len(losses)
        },
        **results,
        **start_metrics,
        "skipped_steps": skipped,
        "resumed_from_step": state.get("step") if checkpoint is not None else None,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / cfg.steps, 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "trainable_parameters": trainable,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "num_processes": processes,
        "fsdp": cfg.fsdp,
        "ranks_identical": agree,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),  # bits can differ with the thread count (reduction order)
        "test_examples": len(test_data) if test_data is not None else 0,
        "dev_examples": len(dev_data) if dev_data is not None else 0,
        "train_examples": len(train_data),
        "phase_seconds": {k: round(v, 2) for k, v in phases.items()},
    }
    if main:
        write_json(out / "summary.json", summary)
        dev_plot = {cfg.method: ([s for s, _ in dev_curve], [v for _, v in dev_curve])} if dev_curve else None
        plot_losses(
            {cfg.method: (loss_steps, losses)},
            out / "loss.png",
            title=f"{cfg.method}: train loss" + (" and dev loss" if dev_curve else ""),
            dev=dev_plot,
        )
        ckpt.write_status(out, "finished", step=cfg.steps, steps=cfg.steps, checkpoint_step=checkpoint_step)
    if cfg.report_to == "tensorboard":
        accelerator.end_training()
    accelerator.wait_for_everyone()
    summary["out"] = str(out)
    return summary


def resume(
    run_dir: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its latest checkpoint with the settings of its config.json;
    it ends with the weights an uninterrupted run would have, bit for bit (same machine, same number
    of processes)."""
    import json

    run = Path(run_dir)
    config_path = run / "config.json"
    if not config_path.is_file():
        raise GradkitError(
            f"--resume {run}: no config.json there; pass the run folder of a gradkit finetune run"
        )
    status_path = run / "status.json"
    if status_path.is_file() and json.loads(status_path.read_text()).get("status") == "finished":
        raise GradkitError(f"--resume {run}: that run has finished (status.json); nothing to resume")
    saved = json.loads(config_path.read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    cfg = dataclasses.replace(cfg, out=str(run), overwrite=False)
    return finetune(cfg, progress=progress, resume=True, stop_after=stop_after)
