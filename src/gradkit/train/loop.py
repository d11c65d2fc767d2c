"""The fine-tuning loop shared by every method: same seed, data order, step budget, schedule
(linear warmup then linear decay) and evaluation, so a comparison differs in the method alone.

Built on accelerate: ``accelerate launch -m gradkit finetune ...`` or ``torchrun --nproc_per_node 2
-m gradkit finetune ...`` runs data-parallel (gloo on CPU, NCCL on GPU). ``--batch-size`` is the
global batch: each process takes its slice of every batch (accelerate's ``split_batches``), so the
run sees the same examples in the same order whatever the number of processes.
"""

from __future__ import annotations

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
from gradkit.train.config import TrainConfig
from gradkit.train.metrics import accuracy, macro_f1, window_mean
from gradkit.train.validate import check_config, check_model


def load_datasets(cfg: TrainConfig):
    """Train and test sets; the test labels are mapped through the train label ids (no test set, None,
    when the run does not evaluate)."""
    from gradkit.data import load_text_classification

    cols = {"text_col": _column(cfg.text_col), "label_col": _column(cfg.label_col)}
    train = load_text_classification(cfg.train, split="train", **cols)
    if not cfg.evaluate:
        return train, None
    test = load_text_classification(cfg.test, split="test", label_names=train.label_names, **cols)
    return train, test


def describe_data(train, test, shown: int = 10) -> str:
    """One line saying what a run read: rows per split and the label map (id = label as in the file)."""
    labels = ", ".join(f"{i} = {name!r}" for i, name in enumerate(train.label_names[:shown]))
    more = f", ... ({train.num_classes - shown} more)" if train.num_classes > shown else ""
    test_part = f"test {test.path} ({len(test.texts):,} rows)" if test is not None else "no test set"
    return (
        f"data: train {train.path} ({len(train.texts):,} rows), {test_part}; "
        f"{train.num_classes} classes: {labels}{more}"
    )


def _column(value: str | int | None) -> str | int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else value


def make_collate(tokenizer, max_length: int):
    def collate(examples: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        texts, labels = zip(*examples, strict=True)
        batch = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = dict(batch)
        batch["labels"] = torch.tensor(labels, dtype=torch.long)
        return batch

    return collate


class _Ordered(torch.utils.data.Dataset):
    """The training stream: examples in a fixed order (one seeded shuffle per epoch), as long as
    the step budget needs."""

    def __init__(self, data, total: int, seed: int):
        from gradkit.data import shuffled_order

        self.data = data
        order: list[int] = []
        epoch = 0
        while len(order) < total:
            order.extend(shuffled_order(len(data), seed, epoch))
            epoch += 1
        self.order = order[:total]

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[str, int]:
        j = self.order[i]
        return self.data.texts[j], self.data.labels[j]


@torch.no_grad()
def evaluate(model, data, collate, batch_size: int, device) -> dict[str, float]:
    """Test loss, accuracy and macro-F1 of ``model`` on ``data`` (eval mode, no dropout)."""
    was_training = model.training
    model.eval()
    preds, losses = [], []
    examples = list(zip(data.texts, data.labels, strict=True))
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size]).items()}
        out = model(**batch)
        losses.append(out.loss.item() * len(batch["labels"]))
        preds.append(out.logits.argmax(-1).cpu())
    model.train(was_training)
    labels = torch.tensor(data.labels)
    pred = torch.cat(preds)
    return {
        "test_accuracy": accuracy(pred, labels),
        "test_macro_f1": macro_f1(pred, labels, data.num_classes),
        "test_loss": sum(losses) / len(examples),
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in the optimiser's per-parameter state."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += value.numel() * value.element_size()
    return total


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory for CUDA, else this process's peak resident set size (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ranks_agree(model: torch.nn.Module, accelerator) -> bool:
    """True when every process holds bit-identical parameters (a SHA-256 of their bytes, gathered)."""
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
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


def finetune(cfg: TrainConfig, *, progress: bool = True, method: Any = None) -> dict[str, Any]:
    """Fine-tune ``cfg.model`` on ``cfg.train`` with ``cfg.method``, evaluate on ``cfg.test`` and
    write the run folder (config.json, labels.json, metrics.jsonl, summary.json, loss.png, the
    trained weights or adapter; with ``cfg.ema`` also ``ema/``, the averaged weights in the same
    format, and ``summary["ema"]``, their test metrics). Returns the summary. ``method`` runs a
    :class:`~gradkit.train.methods.Method` instance in place of the registered ``cfg.method`` (for
    tools built on this loop, such as ``gradkit noise-scale``)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from gradkit.data import save_label_map
    from gradkit.train.methods import get_method
    from gradkit.train.model import load_classifier, load_tokenizer
    from gradkit.train.plots import plot_losses

    method = method if method is not None else get_method(cfg.method)
    check_config(cfg)  # every setting, before anything is loaded or written
    train_data, test_data = load_datasets(cfg)  # every data error surfaces before anything is written
    if progress and int(os.environ.get("RANK", "0")) == 0:
        print(describe_data(train_data, test_data))
    tokenizer = load_tokenizer(cfg.model)

    # the global batch is split across processes; recent accelerate silently ignores the old
    # ``Accelerator(split_batches=...)`` keyword, so it goes through DataLoaderConfiguration
    accelerator = Accelerator(
        dataloader_config=DataLoaderConfiguration(split_batches=True), cpu=not torch.cuda.is_available()
    )
    _warn_if_launched_alone(accelerator.num_processes)
    if cfg.batch_size % accelerator.num_processes:
        raise GradkitError(
            f"--batch-size {cfg.batch_size} does not split evenly over {accelerator.num_processes} processes; "
            f"use a multiple of {accelerator.num_processes}"
        )
    set_seed(cfg.seed)
    lr = cfg.lr if cfg.lr is not None else method.default_lr
    out = Path(cfg.out) if cfg.out else default_out(cfg.method)
    main = accelerator.is_main_process

    collate = make_collate(tokenizer, cfg.max_length)
    stream = _Ordered(train_data, cfg.steps * cfg.batch_size, cfg.seed)
    loader = torch.utils.data.DataLoader(stream, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)

    model = load_classifier(cfg.model, train_data.num_classes, pooling=cfg.pooling, seed=cfg.seed)
    check_model(cfg, model, tokenizer, cfg.model or "the bundled all-MiniLM-L6-v2")
    model.to(accelerator.device)
    # methods that look at data first (LoRA-GA) see the first training batches, whole, on every rank
    prep_batches = ({k: v.to(accelerator.device) for k, v in b.items()} for b in loader)
    model = method.prepare(model, cfg, prep_batches)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = method.make_optimizer(model, cfg, lr)
    # the run folder is made only now: a setting, data, model or method that fails leaves nothing behind
    if main:
        if cfg.overwrite and out.is_dir():
            clear_folder(out)
        out.mkdir(parents=True, exist_ok=True)
        write_json(
            out / "config.json", {**cfg.to_dict(), "lr": lr, "num_processes": accelerator.num_processes}
        )
        save_label_map(train_data, out / "labels.json")
    if cfg.schedule == "constant":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    else:
        scheduler = get_linear_schedule_with_warmup(
            optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps
        )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    ema = None
    if cfg.ema is not None:
        from gradkit.ema import EMA

        # every rank holds the same weights after each step, so every rank's average is the same
        ema = EMA(model, decay=cfg.ema, warmup=cfg.ema_warmup)

    losses: list[float] = []
    loss_steps: list[int] = []  # the step of each loss (a step an optimiser skipped has none)
    skipped = 0
    metrics_path = out / "metrics.jsonl"
    log = open(metrics_path, "w") if main else None  # noqa: SIM115 (kept open across the loop)
    bar = tqdm(total=cfg.steps, desc=cfg.method, disable=not (progress and main), dynamic_ncols=True)
    start = time.perf_counter()
    model.train()
    try:
        for step, batch in enumerate(loader, 1):
            current_lr = scheduler.get_last_lr()[0]
            skipped_before = _skipped_steps(optimizer)
            loss = method.train_step(model, batch, optimizer, accelerator, cfg)
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
                bar.update(1)
                continue
            if not math.isfinite(loss):
                raise GradkitError(
                    f"the train loss became {loss} at step {step} with lr {lr:g}; lower --lr "
                    f"(or raise --warmup-ratio) and run again"
                )
            losses.append(loss)
            loss_steps.append(step)
            if log and (step % cfg.log_every == 0 or step == cfg.steps):
                seconds = time.perf_counter() - start
                log.write(
                    json_line(
                        {
                            "step": step,
                            "loss": loss,
                            "lr": current_lr,
                            **method.step_metrics(),
                            "seconds": round(seconds, 4),
                        }
                    )
                    + "\n"
                )
                log.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{window_mean(losses, step):.4f}")
    finally:
        bar.close()
        if log:
            log.close()
    train_seconds = time.perf_counter() - start
    if not losses:  # every step was skipped for a non-finite loss: there is nothing to report or keep
        raise GradkitError(
            f"the train loss was not finite in any of the {cfg.steps} steps ({skipped} skipped by the "
            "optimiser); lower --lr (or --zo-eps) and run again"
        )

    unwrapped = accelerator.unwrap_model(model)
    agree = ranks_agree(unwrapped, accelerator) if accelerator.num_processes > 1 else True
    results = {}
    if test_data is not None:
        results = evaluate(unwrapped, test_data, collate, cfg.eval_batch_size, accelerator.device)
    if ema is not None:
        with ema.swapped():
            ema_results = {}
            if test_data is not None:
                ema_results = evaluate(unwrapped, test_data, collate, cfg.eval_batch_size, accelerator.device)
            if main:
                method.save(unwrapped, out / "ema")  # the EMA weights, in the method's own format
        results["ema"] = {"decay": cfg.ema, "warmup": cfg.ema_warmup, **ema_results}
    summary = {
        "method": cfg.method,
        "lr": lr,
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "final_train_loss": window_mean(losses, len(losses)),
        "train_loss_at": {
            str(s): window_mean(losses, s) for s in (10, 50, 100, 200, 300, 500, 1000) if s <= len(losses)
        },
        **results,
        "skipped_steps": skipped,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / cfg.steps, 4),
        "peak_memory_mb": round(peak_memory_mb(accelerator.device), 1),
        "trainable_parameters": trainable,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "num_processes": accelerator.num_processes,
        "ranks_identical": agree,
        "device": str(accelerator.device),
        "test_examples": len(test_data) if test_data is not None else 0,
        "train_examples": len(train_data),
    }
    if main:
        method.save(unwrapped, out)
        write_json(out / "summary.json", summary)
        plot_losses(
            {cfg.method: (loss_steps, losses)},
            out / "loss.png",
            title=f"{cfg.method}: train loss",
        )
    accelerator.wait_for_everyone()
    summary["out"] = str(out)
    return summary
