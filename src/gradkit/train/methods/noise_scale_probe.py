"""The measuring run of ``gradkit noise-scale`` as a harness method (it is not registered: the
command builds it with its options and hands it to :func:`gradkit.train.loop.finetune`)."""

from __future__ import annotations

from typing import Any

import torch

from gradkit.scaling.noise_scale import NoiseScale
from gradkit.train.batching import split_batch
from gradkit.train.method_options import NoiseScaleOptions
from gradkit.train.methods.base import Method


class NoiseScaleProbe(Method):
    """Each step's batch is split into ``micro_batches`` micro-batches whose gradients accumulate
    (``.grad`` ends as the whole batch's mean gradient), and :meth:`NoiseScale.accumulation_hooks`
    reads the micro-batch and batch squared norms for the two-batch-size estimate. The optimiser is
    plain AdamW or SGD at the given lr (no weight decay, no clipping: the run measures, it does not
    tune), and nothing is saved but the run folder's files."""

    name = "noise-scale"

    def __init__(self, options: NoiseScaleOptions):
        self.options = options
        self.gns: Any = None
        self._hooks: Any = None
        self._recorder: Any = None

    def prepare(self, model, cfg, batches):
        for name, p in model.named_parameters():
            p.requires_grad_(self.options.trainable == "full" or name.startswith("head."))
        self.gns = NoiseScale(model, beta=self.options.beta)
        self._hooks = self.gns.accumulation_hooks()
        self._recorder = self._hooks.__enter__()
        return model

    def make_optimizer(self, model, cfg, lr):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW if self.options.probe_optimizer == "adam" else torch.optim.SGD
        return optimizer(params, lr=lr)

    def train_step(self, model, batch, optimizer, accelerator, cfg):
        k = self.options.micro_batches
        micro = len(batch["labels"]) // k
        total = torch.zeros(())
        # k equal micro-batches in the stream's order (the estimator needs the size b = B / k), each
        # padded only to its own longest text
        for part, _ in split_batch(batch, max_examples=micro, trim=False):
            loss = model(**part).loss
            accelerator.backward(loss / k)  # .grad ends as the mean gradient over the whole batch
            self._recorder.micro_step(micro)
            total += loss.detach().float() / k
        self._recorder.step()  # before the optimiser step: reads the accumulated gradient
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    def step_metrics(self) -> dict[str, Any]:
        return self.gns.metrics()

    def save(self, model, out_dir):
        """Nothing to keep but the measurement: take the hooks off."""
        self.close()

    def close(self) -> None:
        """Take the gradient-norm hooks off the model (idempotent)."""
        if self._hooks is not None:
            self._hooks.__exit__(None, None, None)
            self._hooks = self._recorder = None
