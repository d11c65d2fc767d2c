"""Weight EMA inside a Hugging Face ``Trainer``: ``trainer.add_callback(EMACallback(decay=0.999))``.

What the callback does, event by event (transformers' Trainer calls them in this order):

- ``on_train_begin``: builds :class:`gradkit.EMA` on the Trainer's model (its tensors are shared with
  any DDP / compile wrapper the Trainer adds). When training resumes (``global_step > 0``) and
  ``<output_dir>/checkpoint-<global_step>/ema_state.pt`` exists, the EMA state is loaded from it, so a
  resumed run continues the exact same average.
- ``on_step_end`` (after every optimiser step, not every micro-batch): ``ema.update(step=global_step)``.
  If ``evaluate_with_ema`` and the Trainer is about to evaluate, the EMA weights are put into the model.
- ``on_epoch_end``: the same swap when an evaluation follows the epoch.
- ``on_evaluate``: the training weights are put back, bit for bit. So the ``eval_*`` metrics that the
  Trainer logs during training (and ``metric_for_best_model``) are those of the EMA weights; a manual
  ``trainer.evaluate()`` outside training uses whatever is in the model (the raw weights).
- ``on_step_begin`` / ``on_train_end``: the training weights are put back if a swap is still open
  (e.g. an evaluation that never ran), so the optimiser never sees EMA weights.
- ``on_save``: the checkpoint the Trainer wrote holds the raw training weights and optimiser state
  (resuming must continue the raw trajectory); the callback adds ``ema_model.safetensors`` (the averaged
  weights, keys as in ``model.state_dict()``) and ``ema_state.pt`` (the EMA's resumable state).
- ``on_train_end``: writes ``<output_dir>/ema_model.safetensors``; with ``apply_at_end=True`` it also
  copies the EMA weights into the model, so a following ``trainer.save_model()`` saves the EMA model.

Only the main process writes files. Under FSDP2 (the Trainer's ``fsdp=`` options with
``fsdp_config={"version": 2}``, or a model sharded by ``fully_shard``) each rank averages its own shard:
every rank then takes part in writing ``ema_model.safetensors`` (each tensor is gathered in turn and
the main process writes the whole weights), and each rank saves its shard of the EMA state as
``ema_state-rank<r>.pt``, which a resumed run with the same number of processes loads.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from gradkit.ema import EMA
from gradkit.errors import GradkitError
from gradkit.files import atomic_path

try:  # transformers is optional for the rest of gradkit
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base = object

__all__ = ["EMACallback"]

EMA_WEIGHTS = "ema_model.safetensors"
EMA_STATE = "ema_state.pt"
EMA_STATE_RANK = "ema_state-rank{rank}.pt"  # FSDP2: each rank's shard of the average


class EMACallback(_Base):
    """Keep an :class:`gradkit.EMA` of the model during ``Trainer.train`` (see the module docstring).

    ``Θ ← a·Θ + (1 − a)·θ`` after each optimiser step (Polyak & Juditsky, 1992); arguments are those of
    :class:`gradkit.EMA`. ``evaluate_with_ema``: evaluations during training use the EMA weights.
    ``save_ema``: checkpoints and the end of training get the EMA files. ``apply_at_end``: the model
    holds the EMA weights when training ends. ``callback.ema`` is the EMA once training has begun.
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: str | None = None,
        buffers: str = "average",
        every: int = 1,
        device: str | torch.device | None = None,
        *,
        evaluate_with_ema: bool = True,
        save_ema: bool = True,
        apply_at_end: bool = False,
        **ema_kwargs: Any,
    ) -> None:
        if _Base is object:
            raise GradkitError("EMACallback needs transformers; install it with `pip install transformers`")
        self.ema_args = dict(
            decay=decay, warmup=warmup, buffers=buffers, every=every, device=device, **ema_kwargs
        )
        EMA(torch.nn.Linear(1, 1), **self.ema_args)  # validate the settings now, not at train time
        self.evaluate_with_ema, self.save_ema, self.apply_at_end = evaluate_with_ema, save_ema, apply_at_end
        self.ema: EMA | None = None
        self._swap = None  # the open ema.swapped() context while an evaluation is pending

    # -- swap bookkeeping --------------------------------------------------------------------------
    def _open(self) -> None:
        if self._swap is None and self.ema is not None:
            self._swap = self.ema.swapped()
            self._swap.__enter__()

    def _close(self) -> None:
        if self._swap is not None:
            swap, self._swap = self._swap, None
            swap.__exit__(None, None, None)

    # -- Trainer events ----------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise GradkitError("EMACallback got no model from the Trainer; add it with trainer.add_callback")
        self.ema = EMA(model, **self.ema_args)
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", self._state_name(args))
            if os.path.exists(path):
                self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def on_step_begin(self, args, state, control, **kwargs):
        self._close()

    def on_step_end(self, args, state, control, **kwargs):
        self._close()
        self.ema.update(step=state.global_step)
        if self.evaluate_with_ema and control.should_evaluate:
            self._open()

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.evaluate_with_ema and control.should_evaluate:
            self._open()

    def on_evaluate(self, args, state, control, **kwargs):
        self._close()

    def on_save(self, args, state, control, **kwargs):
        if self.save_ema and (state.is_world_process_zero or self.ema.sharded):
            folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._write(args, folder, state.is_world_process_zero, with_state=True)

    def on_train_end(self, args, state, control, **kwargs):
        self._close()
        if self.save_ema and (state.is_world_process_zero or self.ema.sharded):
            self._write(args, args.output_dir, state.is_world_process_zero, with_state=False)
        if self.apply_at_end:
            self.ema.copy_to()

    def _state_name(self, args) -> str:
        return EMA_STATE_RANK.format(rank=args.process_index) if self.ema.sharded else EMA_STATE

    def _write(self, args, folder: str, main: bool, with_state: bool) -> None:
        """Write the EMA files into ``folder``. Under FSDP2 every rank calls this (the weights are
        gathered one tensor at a time; only ``main`` writes them) and each rank writes its state shard."""
        metadata = {"format": "pt", "ema_step": str(self.ema.step)}
        path = os.path.join(folder, EMA_WEIGHTS)
        if main:
            os.makedirs(folder, exist_ok=True)
            with atomic_path(path) as tmp:
                self.ema.save_safetensors(str(tmp), metadata=metadata)
        else:  # a sharded average: this rank's part of the gathers; it writes nothing
            self.ema.save_safetensors(path, metadata=metadata)
        if with_state:
            os.makedirs(folder, exist_ok=True)  # each rank's own shard: also where ranks share no disk
            with atomic_path(os.path.join(folder, self._state_name(args))) as tmp:
                torch.save(self.ema.state_dict(), tmp)
