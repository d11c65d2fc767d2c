"""The fine-tuning loop shared by every method: same seed, data order, step budget, schedule
(linear warmup then linear decay) and evaluation, so a comparison differs in the method alone.

:func:`finetune` is a recipe of four parts (:class:`FineTune`): set up (check the settings, read and
tokenise the data, start the processes, load the model: nothing is written before it ends), prepare
(step-0 evaluation, head warm-up and the method's preparation, or a checkpoint's restore; the
optimiser, the run folder, the periodic work), train (the steps; dev evaluation, checkpoints and
logging each decide when they are due: :mod:`gradkit.train.periodic`) and finish (test, save, summary).

Built on accelerate: ``accelerate launch -m gradkit finetune ...`` or ``torchrun --nproc_per_node 2
-m gradkit finetune ...`` runs data-parallel (gloo on CPU, NCCL on GPU). ``--batch-size`` is the
global batch: each process takes its contiguous slice of every step's batch (the step's position in
the seeded :class:`~gradkit.train.datasets.TrainingStream`), so the run sees the same examples in
the same order whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from gradkit.ema import EMA
from gradkit.errors import GradkitError
from gradkit.linalg import numerics
from gradkit.lora.export import save_encoder_adapter
from gradkit.train import head_warmup
from gradkit.train.batch_growth import GrowingBatch, with_budget
from gradkit.train.bi_encoder import (
    ENCODER_ADAPTER,
    SIMILARITY_FIT_ROWS,
    fit_similarity_head,
    load_bi_encoder,
)
from gradkit.train.causal import load_causal_lm
from gradkit.train.checkpoint import (
    CHECKPOINTS,
    find_checkpoint,
    load_checkpoint,
    load_method_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from gradkit.train.config import TrainConfig
from gradkit.train.datasets import StepBatches, TrainingStream, describe_data, load_datasets
from gradkit.train.evaluate import evaluate
from gradkit.train.faults import Terminated, disk_error, non_finite_warning, sigterm_as_interrupt
from gradkit.train.measures import optimizer_state_bytes, peak_memory_mb, ranks_agree
from gradkit.train.methods import get_method
from gradkit.train.metrics import check_metric, window_mean
from gradkit.train.model import default_model_path, label_text_head, load_classifier, load_tokenizer
from gradkit.train.optimizers import evaluating, evaluation_weights, optimizer_split, training_weights
from gradkit.train.periodic import Checkpointing, DevEvaluation, LossLog, TensorBoard, cpu_copy
from gradkit.train.precision import autocast, autocast_forward
from gradkit.train.run_folder import RunFolder, default_out
from gradkit.train.run_state import RunState
from gradkit.train.sharding import (
    full_tensors,
    full_weights,
    load_local_optimizer_state,
    local_optimizer_state,
    shard_model,
)
from gradkit.train.tokenize import tokenize_data
from gradkit.train.validate import check_config, check_data, check_model, check_pairs


def finetune(
    cfg: TrainConfig,
    *,
    progress: bool = True,
    method: Any = None,
    resume: bool = False,
    stop_after: int | None = None,
    after_train: Callable[[FineTune], None] | None = None,
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
    returned summary then holds only the status. ``after_train``: called with the run after its last
    step, before it finishes (``gradkit noise-scale --branch`` branches from there).
    """
    run = FineTune(cfg, method=method, resume=resume, progress=progress)
    return _run(run, stop_after, after_train)


def _run(
    run: FineTune, stop_after: int | None, after_train: Callable[[FineTune], None] | None = None
) -> dict[str, Any]:
    """The recipe's four parts, with SIGTERM taken as an interruption; the run folder's lock is
    released at the end, whatever the end."""
    try:
        with sigterm_as_interrupt(run.record_sigterm):
            run.set_up()
            run.prepare()
            step = run.train(stop_after)
            if not run.ends(step):  # stop_after: the session ends here, the run goes on from its checkpoint
                return run.stop(step)
            if after_train is not None:
                after_train(run)
            return run.finish()
    finally:
        run.release()


def resume(
    run_dir: str | os.PathLike, *, progress: bool = True, stop_after: int | None = None
) -> dict[str, Any]:
    """Continue the run in ``run_dir`` from its latest checkpoint with the settings of its config.json;
    it ends with the weights an uninterrupted run would have, bit for bit (same machine, same number
    of processes). ``run_dir`` may also name one checkpoint folder, ``RUN/checkpoints/step-NNNNNNN``,
    to resume from (an intact one when ``latest.json`` is damaged). Every file the resume reads is
    checked first (:func:`~gradkit.train.checkpoint.find_checkpoint`): a missing or damaged one is
    refused in one line naming it, before anything is loaded or written."""
    run, checkpoint = Path(run_dir), None
    if run.parent.name == CHECKPOINTS and run.name.startswith("step-"):
        run, checkpoint = run.parent.parent, run
    folder = RunFolder(run, steps=0, main=int(os.environ.get("RANK", "0")) == 0)
    if not folder.has_config():
        if (run / CHECKPOINTS).is_dir():
            raise GradkitError(
                f"--resume {run}: its config.json is missing; restore it or start the run again"
            )
        raise GradkitError(
            f"--resume {run}: no config.json there; pass the run folder of a gradkit finetune run"
        )
    folder.lock("--resume")  # held to the run's end (released by _run)
    try:
        if folder.read_status() == "finished":
            raise GradkitError(f"--resume {run}: that run has finished (status.json); nothing to resume")
        saved = folder.read_config()
        checkpoint = _verified(run, checkpoint)
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in fields})
    except BaseException:
        folder.unlock()
        raise
    cfg = dataclasses.replace(cfg, out=str(run), overwrite=False)
    return _run(FineTune(cfg, resume=True, progress=progress, checkpoint=checkpoint), stop_after)


def _verified(run: Path, checkpoint: Path | None) -> Path:
    """The checkpoint a resume of ``run`` starts from (``checkpoint`` when given), every file verified."""
    if checkpoint is None:
        return find_checkpoint(run)
    try:
        verify_checkpoint(checkpoint)
    except GradkitError as err:
        raise GradkitError(
            f"--resume {checkpoint}: {err}; resume from another checkpoint or start the run again"
        ) from None
    return checkpoint


class Phases:
    """Seconds spent in each phase of this session (the summary's ``phase_seconds``): ``mark(name)``
    adds the time since the previous mark to ``name``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self._last
        self._last = now


class Stopwatch:
    """Training seconds over every session of a run: ``before`` from earlier sessions, plus the time
    since this one started."""

    def __init__(self, before: float = 0.0):
        self.before, self._start = before, time.perf_counter()

    def seconds(self) -> float:
        return self.before + time.perf_counter() - self._start


class FineTune:
    """One fine-tuning run as a recipe: :meth:`set_up`, :meth:`prepare`, :meth:`train`, then
    :meth:`finish` (or :meth:`stop` when the session ends early). Every process runs the same calls;
    only the main one writes the run folder."""

    def __init__(
        self,
        cfg: TrainConfig,
        *,
        method: Any = None,
        resume: bool = False,
        progress: bool = True,
        checkpoint: Path | None = None,
    ):
        """``checkpoint``: the verified checkpoint folder a resume starts from (found and verified in
        :meth:`set_up` when not given)."""
        self.cfg, self.resuming, self.progress = cfg, resume, progress
        self.checkpoint = checkpoint
        self.folder: RunFolder | None = None
        self.growth: GrowingBatch | None = None  # a growing --batch-schedule (made with the step batches)
        self.phases = Phases()
        self.method = method if method is not None else get_method(cfg.method)

    # -- set up: every check and every load; nothing is written

    def set_up(self) -> None:
        """Check the settings, read the data, start the processes, tokenise, load the model."""
        cfg = self.cfg
        check_config(cfg, resume=self.resuming)  # every setting, before anything is loaded or written
        # every data error surfaces before anything is written
        self.train_data, self.dev_data, self.test_data = load_datasets(cfg)
        self.head_texts = check_data(cfg, self.train_data)
        # --examples as base batches, a growing schedule's defaults (config.json records what ran)
        cfg = self.cfg = with_budget(cfg, len(self.train_data))
        self.pairs = check_pairs(cfg, self.train_data)
        if self.pairs is not None:  # config.json and every method see the encoding and loss in use
            cfg = self.cfg = dataclasses.replace(
                cfg, pair_encoding=self.pairs.encoding, pair_loss=self.pairs.loss
            )
        self.metric = check_metric(cfg.task, cfg.metric)
        if self.progress and int(os.environ.get("RANK", "0")) == 0:
            print(describe_data(self.train_data, self.test_data, dev=self.dev_data))
        self.tokenizer = load_tokenizer(cfg.model)
        self.phases.mark("read_data")
        self._launch()
        self._tokenize()
        self._load_model()

    def _launch(self) -> None:
        """The run folder's path, the checkpoint to resume from, the processes and the seed."""
        cfg = self.cfg
        out = Path(cfg.out) if cfg.out else default_out(cfg.method)
        # the global batch is split across processes: accelerate takes that through
        # DataLoaderConfiguration (it ignores an ``Accelerator(split_batches=...)`` keyword)
        self.accelerator = Accelerator(
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            cpu=not torch.cuda.is_available(),
            log_with=["tensorboard"] if cfg.report_to == "tensorboard" else None,
            project_dir=str(out),
        )
        _warn_if_launched_alone(self.accelerator.num_processes)
        self.processes, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        if cfg.batch_size % self.processes:
            raise GradkitError(
                f"--batch-size {cfg.batch_size} does not split evenly over {self.processes} processes; "
                f"use a multiple of {self.processes}"
            )
        set_seed(cfg.seed)
        self.lr = cfg.lr if cfg.lr is not None else self.method.default_lr
        self.main = self.accelerator.is_main_process
        self.device = self.accelerator.device
        self.folder = RunFolder(out, steps=cfg.steps, main=self.main)
        self.folder.lock("--resume" if self.resuming else "--out")  # an existing folder: locked now
        if self.resuming and self.checkpoint is None:
            self.checkpoint = find_checkpoint(out)  # every checksum verified before anything loads

    def _tokenize(self) -> None:
        """Tokenise once; each step's batch is the next slice of the seeded stream, this process's share."""
        cfg, tokenizer = self.cfg, self.tokenizer
        encoding = cfg.pair_encoding or "cross"
        train_tokens = self.train_tokens = tokenize_data(tokenizer, self.train_data, cfg.max_length, encoding)
        self.dev_tokens = self.dev_data and tokenize_data(tokenizer, self.dev_data, cfg.max_length, encoding)
        self.test_tokens = self.test_data and tokenize_data(
            tokenizer, self.test_data, cfg.max_length, encoding
        )
        self.batches = StepBatches(
            train_tokens,
            TrainingStream(len(self.train_data), cfg.seed),
            step_examples=cfg.batch_size * cfg.grad_accum,
            warmup_steps=cfg.head_warmup,
            processes=self.processes,
            rank=self.rank,
            device=self.device,
        )
        grows = cfg.batch_schedule != "fixed"
        self.growth = GrowingBatch(cfg, self.batches, self.processes) if grows else None
        self.phases.mark("tokenize")

    def _load_model(self) -> None:
        cfg = self.cfg
        if cfg.task == "causal-lm":
            model = load_causal_lm(cfg.model)
        elif cfg.pair_encoding == "bi":
            model = load_bi_encoder(
                cfg.model or default_model_path(),
                self.train_data.num_outputs,
                self.pairs,
                task=cfg.task,
                features=cfg.pair_features,
                head=cfg.head_init,
                labels=self.train_data.labels,
                seed=cfg.seed,
            )
        else:
            model = load_classifier(
                cfg.model, self.train_data.num_outputs, pooling=cfg.pooling, seed=cfg.seed, task=cfg.task
            )
        check_model(cfg, model, self.tokenizer, cfg.model or "the bundled all-MiniLM-L6-v2")
        model.to(self.device)
        if self.head_texts is not None:
            model.head = label_text_head(model, self.tokenizer, self.head_texts, cfg.max_length)
        self.similarity_fit = None
        if cfg.head_init == "similarity":  # the zero-shot threshold classifier, fitted on the first rows
            rows = range(min(SIMILARITY_FIT_ROWS, len(self.train_tokens)))
            self.similarity_fit = fit_similarity_head(
                model, self.train_tokens.collate(rows), cfg.eval_batch_size, self.device
            )
        self.model = model
        self.phases.mark("load_model")

    # -- prepare: the model as the method trains it, the optimiser, the run folder, the periodic work

    def prepare(self) -> None:
        """Ready the model (the method's preparation, or a resumed run's), shard and autocast it, make
        the optimiser and schedule, restore the checkpoint, create the run folder, wrap for data
        parallelism, and set up the EMA and the periodic work."""
        cfg = self.cfg
        self.state = RunState(num_processes=self.processes)
        if self.checkpoint is not None:
            # the method's own state first (EVA's ranks shape its layers); the warmed head is among the
            # checkpoint's tensors
            self.method.load_state_dict(load_method_state(self.checkpoint, self.rank))
            self.model = self.method.prepare_for_resume(self.model, cfg)
        else:
            self._start_metrics()
            # methods that look at data first (LoRA-GA) see the next training batches, whole, on every rank
            batches = self.batches.whole(cfg.steps * cfg.grad_accum, cfg.batch_size)
            self.model = self.method.prepare(self.model, cfg, batches)
        if cfg.fsdp:  # each transformer block, then the root (gradkit.train.sharding)
            self.model = shard_model(self.model)
        # --precision bf16: from here every forward runs in bf16 autocast (gradkit.train.precision); the
        # weights, gradients, optimiser states and the methods' own algebra stay fp32
        self.model = autocast_forward(self.model, cfg.precision, self.device.type)
        self.phases.mark("prepare")  # LoRA-GA's gradient estimation and SVDs happen here
        self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer = self.method.make_optimizer(self.model, cfg, self.lr)
        self.scheduler = _scheduler(self.optimizer, cfg, self.growth)
        self.own: dict[str, Any] | None = None  # this process's part of the checkpoint
        ema_state = best_tensors = None
        if self.checkpoint is not None:
            ema_state, best_tensors = self._restore()
        # the run folder is made only now: a setting, data, model or method that fails leaves nothing behind
        if self.checkpoint is None:
            self.folder.create(cfg, self.lr, self.processes, self.train_data)
        if cfg.fsdp:  # FSDP2 already reduces the gradients: no DDP around it
            self.optimizer = self.accelerator.prepare(self.optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.unwrapped = self.accelerator.unwrap_model(self.model)
        # Schedule-Free trains at its interpolated weights (a checkpoint holds the averaged ones)
        training_weights(self.optimizer)
        if self.growth is not None and self.growth.noise is not None:
            self.growth.attach(self.model)  # the gradients as DDP or FSDP2 computes them
            self.method.gradient_monitor = self.growth
        self.ema = None
        if cfg.ema is not None:
            # every rank holds the same weights after each step, so every rank's average is the same
            self.ema = EMA(self.model, decay=cfg.ema, warmup=cfg.ema_warmup)
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
        self._periodic_work(best_tensors)

    def _start_metrics(self) -> None:
        """The test metrics at step 0 (zero-shot, in the precision the run trains and tests in), and
        the head warm-up with the test metrics after it."""
        cfg = self.cfg
        if self.test_tokens is not None:
            with autocast(cfg.precision, self.device.type):
                self.state.start_metrics["step0"] = self._test(self.model)
            self.phases.mark("evaluate")
        if not cfg.head_warmup:
            return
        head_lr = cfg.head_lr if cfg.head_lr is not None else get_method("head").default_lr
        bar = tqdm(
            total=cfg.head_warmup,
            desc="head warm-up",
            disable=not (self.progress and self.rank == 0),
            dynamic_ncols=True,
        )

        def on_warmup_step(_: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")

        warmed = head_warmup.warm_up_head(
            self.model,
            (self.batches.warmup(s) for s in range(1, cfg.head_warmup + 1)),
            lr=head_lr,
            weight_decay=cfg.weight_decay,
            max_examples=cfg.batch_size // self.processes,
            on_step=on_warmup_step,
        )
        bar.close()
        losses = self.state.warmup_losses = warmed["losses"]
        self.phases.mark("head_warmup")
        self.state.start_metrics["head_warmup"] = {
            "steps": cfg.head_warmup,
            "lr": head_lr,
            "examples": self.batches.warmup_examples,
            "final_train_loss": window_mean(losses, len(losses)),
            "seconds": round(warmed["seconds"], 2),
            **self._test(self.model),
        }
        self.phases.mark("evaluate")

    def _restore(self) -> tuple[Any, dict[str, torch.Tensor] | None]:
        """Load the checkpoint into the model, optimiser, schedule, method and :class:`RunState`;
        returns the EMA's state and the best-on-dev tensors, which are restored once they exist."""
        tensors, saved, best_tensors, self.own = load_checkpoint(self.checkpoint, self.rank)
        if saved["num_processes"] != self.processes:
            raise GradkitError(
                f"{self.folder.path} was run with {saved['num_processes']} processes; resume it with the "
                f"same number (this launch has {self.processes})"
            )
        self.method.load_checkpoint_tensors(self.model, tensors)
        if self.cfg.fsdp:  # each rank's shards of the optimiser and EMA state (gradkit.train.sharding)
            load_local_optimizer_state(self.optimizer, self.own["sharded"]["optimizer"])
            ema_state = self.own["sharded"]["ema"]
        else:
            self.optimizer.load_state_dict(saved["optimizer"])
            ema_state = saved["ema"]
        self.scheduler.load_state_dict(saved["scheduler"])
        self.method.load_state_dict(self.own["local"])
        self.state = RunState.from_checkpoint(saved)
        if self.growth is not None:  # the batch sizes so far, the lr factor, the noise scale's averages
            self.growth.load_state_dict(self.state.batch_growth)
        return ema_state, best_tensors

    def _periodic_work(self, best_tensors: dict[str, torch.Tensor] | None) -> None:
        cfg = self.cfg
        self.resumed_from = self.state.step if self.checkpoint is not None else None
        self.tracker = TensorBoard(self.accelerator, cfg.report_to == "tensorboard")
        self.loss_log = LossLog(self.folder, self.tracker, every=cfg.log_every, ends=self.ends)
        self.dev_evaluation = DevEvaluation(
            self.dev_tokens,
            model=self.unwrapped,
            method=self.method,
            cfg=cfg,
            metric=self.metric,
            device=self.device,
            state=self.state,
            folder=self.folder,
            tracker=self.tracker,
            ends=self.ends,
            best_tensors=best_tensors,
            ema=self.ema,
        )
        self.checkpoints = Checkpointing(
            self._save_checkpoint, self.folder, every=cfg.save_every, ends=self.ends, last=self.resumed_from
        )
        self.periodic = [self.dev_evaluation, self.checkpoints]

    # -- train

    def ends(self, step: int) -> bool:
        """Whether step ``step`` is the run's last: ``--steps`` reached, or a growing batch's budget spent."""
        return self.growth.done if self.growth is not None else step >= self.cfg.steps

    def _budget_used(self) -> int:
        """Base batches trained on (the progress bar's count): the steps, unless the batch grows."""
        return self.growth.used if self.growth is not None else self.state.step

    def train(self, stop_after: int | None = None) -> int:
        """Run the steps after the state's until the run :meth:`ends` (or ``stop_after``); returns the
        last step run. A failure or an interruption is recorded in status.json and raised."""
        cfg, state = self.cfg, self.state
        self.folder.open_metrics(self.resumed_from, state.warmup_losses)
        self.folder.status("running", step=state.step, checkpoint_step=self.checkpoints.last)
        self.tracker.start(cfg, self.lr)
        if self.own is not None:
            set_rng_state(self.own["rng"])  # the last thing before the first step: nothing draws in between
        bar = tqdm(
            total=cfg.steps,
            initial=self._budget_used(),
            desc=cfg.method,
            disable=not (self.progress and self.main),
            dynamic_ncols=True,
        )
        self.phases.mark("setup")
        self.stopwatch = Stopwatch(state.train_seconds)
        step = state.step
        self.model.train()
        try:
            while not self.ends(step):
                step += 1
                self._step(step, bar)
                for job in self.periodic:
                    if job.due(step):
                        self.phases.mark("train")
                        with evaluating(self.optimizer):  # Schedule-Free's averaged weights
                            job(step)
                        self.phases.mark(job.phase)
                if stop_after is not None and step >= stop_after:
                    break
            self._check_weights(step)
        except OSError as err:  # a full disk, a folder gone: one line, the latest checkpoint kept
            failure = disk_error(err, self.folder.path, self.checkpoints.last)
            self._record_end(failure, step)
            raise failure from err
        except BaseException as err:
            self._record_end(err, step)
            raise
        finally:
            bar.close()
            with contextlib.suppress(OSError):
                self.folder.close_metrics()  # its buffered tail may not fit a full disk
        return step

    def _record_end(self, err: BaseException, step: int) -> None:
        """Record in status.json how the run ended early: ``stopped`` for an interruption (Ctrl-C,
        SIGTERM), with how to go on, else ``failed`` with the error's line. A status that cannot be
        written (a full disk) is left as it was: the error itself is what the user sees."""
        last = self.checkpoints.last
        if isinstance(err, KeyboardInterrupt):
            how = "interrupted by SIGTERM" if isinstance(err, Terminated) else "interrupted"
            then = (
                f"continue from step {last} with gradkit finetune --resume {self.folder.path}"
                if last is not None
                else "it saved no checkpoint: start it again"
            )
            status, reason = "stopped", f"{how}; {then}"
        else:
            status, reason = "failed", " ".join(str(err).split()) or type(err).__name__
        with contextlib.suppress(OSError):
            self.folder.status(status, reason=reason, step=step, checkpoint_step=last)

    def record_sigterm(self) -> None:
        """Record a SIGTERM as a stop in status.json at once (from the signal watcher: the main thread
        may be blocked in a collective that never returns); the main thread records it again if it
        gets to."""
        if self.folder is not None and getattr(self, "checkpoints", None) is not None:  # training began
            self._record_end(Terminated("SIGTERM"), self.state.step)

    def release(self) -> None:
        """Release the run folder's lock and take the batch schedule's gradient hooks off (the end of
        the run, whatever the end)."""
        if self.growth is not None:
            self.growth.detach()
        if self.folder is not None:
            self.folder.unlock()

    def _step(self, step: int, bar: Any) -> None:
        """One step of the method, the schedule and the EMA; its loss joins the state (and its row when
        due), unless it is not finite: a step the optimiser skipped itself is counted, any other stops
        the run."""
        cfg, state, optimizer = self.cfg, self.state, self.optimizer
        current_lr = self.scheduler.get_last_lr()[0]
        skipped_before = _skipped_steps(optimizer)
        used_before = self._budget_used()
        if self.growth is not None:
            self.growth.before_step(step)
        batch = self.method.step_batch(self.batches, step, optimizer)
        loss = self.method.train_step(self.model, batch, optimizer, self.accelerator, cfg)
        if self.growth is not None:  # the next batch and lr factor, before the schedule reads them
            self.growth.after_step(step)
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(step)
        loss = self.accelerator.reduce(loss.float(), reduction="mean").item()
        state.step = step
        if (
            not math.isfinite(loss)
            and skipped_before is not None
            and _skipped_steps(optimizer) > skipped_before
        ):
            # the optimiser (ZerothOrder) skipped the step itself: it warns once, counts, and raises
            # after max_bad_steps in a row
            state.skipped += 1
        elif not math.isfinite(loss):
            raise GradkitError(
                f"the train loss became {loss} at step {step} with lr {self.lr:g}; lower --lr "
                f"(or raise --warmup-ratio) and run again"
            )
        else:
            state.losses.append(loss)
            state.loss_steps.append(step)
            if self.loss_log.due(step):
                extra = self.method.step_metrics()
                if self.growth is not None:
                    extra.update(self.growth.metrics(step))
                self.loss_log.write(step, loss, current_lr, extra, self.stopwatch.seconds())
            bar.set_postfix(loss=f"{window_mean(state.losses, len(state.losses)):.4f}")
        bar.update(self._budget_used() - used_before)

    def _check_weights(self, step: int) -> None:
        """A loss is computed before its step's update: the last update can still overflow the weights."""
        broken = [
            n for n, p in self.unwrapped.named_parameters() if p.requires_grad and not torch.isfinite(p).all()
        ]
        if broken:
            raise GradkitError(
                f"the weights became non-finite (inf or NaN: {broken[0]}, {len(broken)} tensors in all) by "
                f"step {step} with lr {self.lr:g}; lower --lr (or raise --warmup-ratio) and run again"
            )

    def _save_checkpoint(self, step: int) -> None:
        """Every process writes its part of the checkpoint of ``step`` (:mod:`gradkit.train.checkpoint`):
        the loop's :class:`RunState` with the optimiser's, scheduler's and EMA's state, whole tensors
        (gathered under ``--fsdp``, where each rank keeps its own optimiser and EMA shards)."""
        fsdp, ema, optimizer = self.cfg.fsdp, self.ema, self.optimizer
        self.state.train_seconds = self.stopwatch.seconds()
        if self.growth is not None:
            self.state.batch_growth = self.growth.state_dict()
        saved = {
            **self.state.to_checkpoint(),
            "optimizer": None if fsdp else getattr(optimizer, "optimizer", optimizer).state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ema": ema.state_dict() if ema is not None and not fsdp else None,
        }
        sharded = None
        if fsdp:
            sharded = {
                "optimizer": local_optimizer_state(optimizer),
                "ema": ema.state_dict() if ema is not None else None,
            }
        best = self.dev_evaluation.best_tensors
        save_checkpoint(
            self.folder.path,
            step,
            tensors=full_tensors(self.method.checkpoint_tensors(self.unwrapped)),  # whole under --fsdp too
            state=saved,
            best=full_tensors(best) if best is not None else None,
            local_state=self.method.state_dict(),
            sharded_state=sharded,
            accelerator=self.accelerator,
            process_index=self.rank,
            main=self.main,
        )

    # -- finish

    def stop(self, step: int) -> dict[str, Any]:
        """End this session at ``step`` (``stop_after``); the run goes on from its latest checkpoint."""
        last = self.checkpoints.last
        self.folder.status("stopped", reason="stop_after", step=step, checkpoint_step=last)
        self.accelerator.wait_for_everyone()
        return {"status": "stopped", "step": step, "checkpoint_step": last, "out": str(self.folder.path)}

    def finish(self) -> dict[str, Any]:
        """Test the final (and EMA, best-on-dev) weights, save them, write the summary and plot. A
        failure here (a full disk) is recorded in status.json as in :meth:`train`; an ``OSError``
        becomes one line naming the file, the latest checkpoint left to resume from."""
        try:
            return self._finish()
        except OSError as err:
            failure = disk_error(err, self.folder.path, self.checkpoints.last)
            self._record_end(failure, self.state.step)
            raise failure from err
        except BaseException as err:
            self._record_end(err, self.state.step)
            raise

    def _finish(self) -> dict[str, Any]:
        train_seconds = self.stopwatch.seconds()
        self.phases.mark("train")
        evaluation_weights(self.optimizer)  # tested and saved: Schedule-Free's averaged weights
        if not self.state.losses:  # every step was skipped for a non-finite loss: nothing to report or keep
            raise GradkitError(
                f"the train loss was not finite in any of the {self.state.step} steps ({self.state.skipped} "
                "skipped by the optimiser); lower --lr (or --zo-eps) and run again"
            )
        agree = ranks_agree(self.unwrapped, self.accelerator) if self.processes > 1 else True
        summary = self._summary(self._final_results(), agree, train_seconds)
        warning = non_finite_warning(summary)
        if warning is not None:
            summary["warning"] = warning
        sizes = None
        if self.growth is not None:  # loss.png's batch-size panel
            steps = range(1, self.state.step + 1)
            sizes = (list(steps), [self.batches.span(s)[1] for s in steps])
        self.folder.finish(summary, self.cfg.method, self.state, batch_sizes=sizes)
        self.folder.status(
            "finished", step=self.state.step, checkpoint_step=self.checkpoints.last, warning=warning
        )
        self.tracker.end()
        self.accelerator.wait_for_everyone()
        summary["out"] = str(self.folder.path)
        return summary

    def _pair_summary(self) -> dict[str, Any]:
        """How the pairs were encoded and why (and the similarity head's fit); nothing without pairs."""
        if self.pairs is None:
            return {}
        pairs = self.pairs.to_dict()
        if self.similarity_fit is not None:
            pairs["similarity_head"] = self.similarity_fit
        return {"pair_encoding": pairs}

    def _batch_summary(self) -> dict[str, Any]:
        """The examples trained on, and a growing batch's record (its growths)."""
        if self.growth is None:
            return {"examples": self.state.step * self.cfg.batch_size * self.cfg.grad_accum}
        return {"examples": self.growth.used * self.growth.base, "batch_schedule": self.growth.summary()}

    def _test(self, model: torch.nn.Module) -> dict[str, Any]:
        """The test set's metrics of ``model`` (none without a test set)."""
        if self.test_tokens is None:
            return {}
        return evaluate(model, self.test_tokens, self.cfg.eval_batch_size, self.device)

    def _save_weights(self, sub: str | None = None) -> None:
        """The method saves the weights in the run folder (or its ``sub`` folder), gathered whole under
        ``--fsdp`` (every rank takes part)."""
        folder = self.folder.path / sub if sub else self.folder.path
        with full_weights(self.unwrapped, keep=self.main):
            if self.main:
                self.method.save(self.unwrapped, folder)
        if self.main and self.cfg.pair_encoding == "bi" and (folder / "adapter").is_dir():
            # the encoder's LoRA alone, in the key names a plain SentenceTransformer's load_adapter reads
            save_encoder_adapter(folder / "adapter", folder / ENCODER_ADAPTER)

    def _final_results(self) -> dict[str, Any]:
        """Test metrics of the final weights, the dev curve, and the EMA's and best-on-dev weights'
        test metrics; every set of weights saved."""
        cfg, method, model = self.cfg, self.method, self.unwrapped
        results = self._test(model)
        if self.state.dev_curve:
            results["dev_loss_at"] = {str(int(s)): v for s, v in self.state.dev_curve}
        if self.ema is not None:
            with self.ema.swapped():
                ema_results = self._test(model)
                self._save_weights("ema")  # the EMA weights, in the method's own format
            results["ema"] = {"decay": cfg.ema, "warmup": cfg.ema_warmup, **ema_results}
        self.phases.mark("evaluate")
        self._save_weights()  # the final weights
        best_tensors = self.dev_evaluation.best_tensors
        if best_tensors is not None:
            # the best-on-dev weights: chosen on dev alone, then tested once, saved beside the final ones
            final = cpu_copy(method.checkpoint_tensors(model))
            method.load_checkpoint_tensors(model, best_tensors)
            best_test = self._test(model)
            self._save_weights("best")
            method.load_checkpoint_tensors(model, final)
            results["best"] = {**self.state.best, **best_test}
        self.phases.mark("evaluate")
        return results

    def _summary(self, results: dict[str, Any], agree: bool, train_seconds: float) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        losses = state.losses
        return {
            "status": "finished",
            "method": cfg.method,
            "task": cfg.task,
            "metric": self.metric,
            "precision": cfg.precision,
            "lr": self.lr,
            "steps": state.step,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "seed": cfg.seed,
            "final_train_loss": window_mean(losses, len(losses)),
            "train_loss_at": {
                str(s): window_mean(losses, s) for s in (10, 50, 100, 200, 300, 500, 1000) if s <= len(losses)
            },
            **results,
            **state.start_metrics,
            "skipped_steps": state.skipped,
            "resumed_from_step": self.resumed_from,
            "train_seconds": round(train_seconds, 2),
            "seconds_per_step": round(train_seconds / state.step, 4),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "trainable_parameters": self.trainable,
            "optimizer": cfg.optimizer,
            "optimizer_split": optimizer_split(self.optimizer),
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
            "num_processes": self.processes,
            "fsdp": cfg.fsdp,
            **self._pair_summary(),
            **self._batch_summary(),
            "ranks_identical": agree,
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),  # bits can differ with the thread count (reduction order)
            **numerics(),  # and with the CPU's instruction set and MKL's code path
            "test_examples": len(self.test_data) if self.test_data is not None else 0,
            "dev_examples": len(self.dev_data) if self.dev_data is not None else 0,
            "train_examples": len(self.train_data),
            "phase_seconds": {k: round(v, 2) for k, v in self.phases.seconds.items()},
        }


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


def _scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, growth: GrowingBatch | None) -> Any:
    """Constant, or linear warm-up over ``cfg.warmup_ratio`` of the steps then linear decay to 0; with a
    growing batch the same over the base batches used, times the batch schedule's lr factor
    (:mod:`gradkit.train.batch_growth`)."""
    from transformers import get_linear_schedule_with_warmup

    if growth is not None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: growth.lr_multiplier())
    if cfg.schedule == "constant" or cfg.optimizer == "schedule-free":  # Schedule-Free warms up itself
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return get_linear_schedule_with_warmup(optimizer, math.ceil(cfg.warmup_ratio * cfg.steps), cfg.steps)
