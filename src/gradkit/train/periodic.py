"""The work a training run does every so often, each piece saying for itself when it is due
(``due(step)``): the train-loss rows of metrics.jsonl, the dev evaluation with the best-on-dev
weights, and the checkpoints; and the TensorBoard tracker they also report to."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradkit.ema import EMA
from gradkit.train.config import TrainConfig
from gradkit.train.evaluate import evaluate
from gradkit.train.metrics import is_better
from gradkit.train.run_folder import RunFolder
from gradkit.train.run_state import RunState
from gradkit.train.tokenize import Tokenized


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU copies of ``tensors`` (a snapshot later training steps leave alone)."""
    return {k: v.detach().cpu().clone() for k, v in tensors.items()}


class TensorBoard:
    """accelerate's TensorBoard tracker when ``on`` (``--report-to tensorboard``); otherwise every call
    does nothing."""

    def __init__(self, accelerator: Any, on: bool):
        self.accelerator, self.on = accelerator, on

    def start(self, cfg: TrainConfig, lr: float) -> None:
        """Open the tracker with the run's settings as hparams (numbers, strings and booleans only)."""
        if self.on:
            flat = {**{k: v for k, v in cfg.to_dict().items() if k != "options"}, **cfg.options, "lr": lr}
            hparams = {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers("tensorboard", config=hparams)

    def log(self, values: dict[str, float], step: int) -> None:
        if self.on:
            self.accelerator.log(values, step=step)

    def end(self) -> None:
        if self.on:
            self.accelerator.end_training()


class LossLog:
    """The train rows of metrics.jsonl (and TensorBoard's ``train/loss``, ``train/lr``): every
    ``every`` steps and at the last step (``ends(step)`` says whether ``step`` ends the run)."""

    def __init__(self, folder: RunFolder, tracker: TensorBoard, *, every: int, ends: Callable[[int], bool]):
        self.folder, self.tracker, self.every, self.ends = folder, tracker, every, ends

    def due(self, step: int) -> bool:
        return step % self.every == 0 or self.ends(step)

    def write(self, step: int, loss: float, lr: float, extra: dict[str, Any], seconds: float) -> None:
        """One row: the step's loss, the learning rate it ran with, the method's own values
        (``extra``) and the training seconds so far."""
        row = {"step": step, "loss": loss, "lr": lr, **extra}
        self.folder.write_row({**row, "seconds": round(seconds, 4)})
        self.tracker.log({"train/loss": loss, "train/lr": lr}, step)


class DevEvaluation:
    """The dev set's metrics every ``every`` steps (0: only at the end) and at the last step (``ends``
    as in :class:`LossLog`): a row of
    metrics.jsonl, a point of ``state.dev_curve``, TensorBoard's ``dev/*``; with ``keep_best``, the
    weights at the best dev score so far (``best_tensors``, with their metrics in ``state.best``).
    With a weight ``ema``, the row also holds the averaged weights' metrics as ``dev_ema_*``, so a
    learning rate or decay can be chosen by the average's own dev score."""

    phase = "evaluate"

    def __init__(
        self,
        tokens: Tokenized | None,
        *,
        model: torch.nn.Module,
        method: Any,
        cfg: TrainConfig,
        metric: str,
        device: torch.device,
        state: RunState,
        folder: RunFolder,
        tracker: TensorBoard,
        ends: Callable[[int], bool],
        best_tensors: dict[str, torch.Tensor] | None = None,
        ema: EMA | None = None,
    ):
        self.tokens, self.model, self.method, self.metric = tokens, model, method, metric
        self.ema = ema
        self.every, self.ends, self.keep_best = cfg.eval_every, ends, cfg.keep_best
        self.batch_size, self.device = cfg.eval_batch_size, device
        self.state, self.folder, self.tracker = state, folder, tracker
        self.best_tensors = best_tensors

    def due(self, step: int) -> bool:
        if self.tokens is None:
            return False
        return self.ends(step) or bool(self.every and step % self.every == 0)

    def __call__(self, step: int) -> None:
        dev = evaluate(self.model, self.tokens, self.batch_size, self.device, "dev")
        averaged = {}
        if self.ema is not None:
            with self.ema.swapped():
                averaged = evaluate(self.model, self.tokens, self.batch_size, self.device, "dev_ema")
        self.folder.write_row({"step": step, **dev, **averaged})
        self.state.dev_curve.append([step, dev["dev_loss"]])
        self.tracker.log({f"dev/{k[4:]}": v for k, v in {**dev, **averaged}.items()}, step)
        key = f"dev_{self.metric}"  # in the metric's own direction; NaN never wins
        if self.keep_best and is_better(self.metric, dev[key], self.state.best.get(key)):
            self.state.best = {"step": step, **dev}
            self.best_tensors = cpu_copy(self.method.checkpoint_tensors(self.model))


class Checkpointing:
    """A checkpoint every ``every`` steps (0: none) before the last (``ends(step)``: whether ``step``
    ends the run): ``save(step)`` writes it, and status.json then names it; ``last`` is the step of the
    latest one (None before the first)."""

    phase = "checkpoint"

    def __init__(
        self,
        save: Callable[[int], None],
        folder: RunFolder,
        *,
        every: int,
        ends: Callable[[int], bool],
        last: int | None,
    ):
        self.save, self.folder, self.every, self.ends, self.last = save, folder, every, ends, last

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and not self.ends(step)

    def __call__(self, step: int) -> None:
        self.save(step)
        self.last = step
        self.folder.status("running", step=step, checkpoint_step=step)
