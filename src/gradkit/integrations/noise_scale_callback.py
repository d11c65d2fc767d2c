"""Gradient noise scale inside a Hugging Face ``Trainer``: ``trainer.add_callback(NoiseScaleCallback())``.

The source is exact per-example gradient norms of the model's trainable ``nn.Linear`` layers
(:meth:`gradkit.NoiseScale.per_example_hooks`, ``b = 1`` versus the step's batch), because it is the
one source that survives the Trainer's loop unchanged: the batch-gradient norm is read by a hook the
moment backward accumulates it, before the Trainer clips gradients, and gradient accumulation and DDP
need nothing more. Event by event:

- ``on_train_begin``: builds :class:`gradkit.NoiseScale` and its hooks on the Trainer's model; when
  resuming from ``checkpoint-<global_step>`` with a ``noise_scale_state.json``, the EMAs continue.
- ``on_pre_optimizer_step`` (once per optimiser step, after the last micro-batch): one update.
- ``on_step_end``: appends ``{"step", "b_simple", "grad_sq_norm", "trace_sigma"}`` to
  :attr:`NoiseScaleCallback.history`.
- ``on_log``: adds ``noise_scale/b_simple`` (and the two estimates) to the logged dict, so reporting
  callbacks that run after this one (add it before them, or read ``history``) see it.
- ``on_save``: writes ``noise_scale_state.json`` into the checkpoint. ``on_train_end``: removes the
  hooks and writes ``<output_dir>/noise_scale.jsonl`` (main process only).

``B_simple`` (McCandlish et al. 2018, arXiv 1812.06162) is ``None`` ("not yet measurable") while the
smoothed ``|G|²`` estimate is not positive; then nothing is added to the logs.
"""

from __future__ import annotations

import json
import os
from typing import Any

from gradkit.errors import GradkitError
from gradkit.files import atomic_path, write_json
from gradkit.scaling.noise_scale import NoiseScale

try:  # transformers is optional for the rest of gradkit
    from transformers import TrainerCallback as _Base
except ImportError:  # pragma: no cover - exercised only without transformers
    _Base = object

__all__ = ["NoiseScaleCallback"]

STATE_FILE = "noise_scale_state.json"
HISTORY_FILE = "noise_scale.jsonl"


class NoiseScaleCallback(_Base):
    """Measure ``B_simple = tr(Σ)/|G|²`` every optimiser step of ``Trainer.train`` (see the module docstring).

    Args:
        beta: EMA coefficient of :class:`gradkit.NoiseScale` (horizon ≈ 1/(1−β) steps).
        grad_scale: ``.grad`` after backward is ``grad_scale`` times the batch-mean gradient (1 for the
            Trainer's own loss scaling; ``B_simple`` does not depend on it, the two estimates do).
        write_history: write ``noise_scale.jsonl`` at the end of training.
    """

    def __init__(self, beta: float = 0.99, *, grad_scale: float = 1.0, write_history: bool = True) -> None:
        if _Base is object:
            raise GradkitError(
                "NoiseScaleCallback needs transformers; install it with `pip install transformers`"
            )
        NoiseScale(beta=beta)  # validate now, not at train time
        self.beta, self.grad_scale, self.write_history = float(beta), float(grad_scale), write_history
        self.gns: NoiseScale | None = None
        self.recorder = None
        self.history: list[dict[str, Any]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise GradkitError(
                "NoiseScaleCallback got no model from the Trainer; add it with trainer.add_callback"
            )
        self.gns = NoiseScale(model, beta=self.beta)
        if state.global_step > 0:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
            if os.path.exists(path):
                with open(path) as f:
                    self.gns.load_state_dict(json.load(f))
        self.recorder = self.gns.per_example_hooks(model, grad_scale=self.grad_scale)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.step()

    def on_step_end(self, args, state, control, **kwargs):
        if self.gns is not None and self.gns.step:
            self.history.append({"step": state.global_step, **self.gns.metrics()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.gns is not None and self.gns.b_simple is not None:
            logs["noise_scale/b_simple"] = self.gns.b_simple
            logs["noise_scale/grad_sq_norm"] = self.gns.grad_sq_norm
            logs["noise_scale/trace_sigma"] = self.gns.trace_sigma

    def on_save(self, args, state, control, **kwargs):
        if self.gns is not None and state.is_world_process_zero:
            write_json(
                os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE),
                self.gns.state_dict(),
            )

    def on_train_end(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.remove()
            self.recorder = None
        if self.write_history and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with atomic_path(os.path.join(args.output_dir, HISTORY_FILE)) as tmp:
                tmp.write_text("".join(json.dumps(row) + "\n" for row in self.history))
