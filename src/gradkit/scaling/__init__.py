"""Gradient noise scale and learning-rate / batch-size laws: the estimator and its formulas
(noise_scale), the recorders that feed it (accumulation, per_example), the Hessian-aware estimate
(hessian) and the fitted laws (laws); imported on first use, so ``import gradkit.scaling`` stays light."""

from __future__ import annotations

from gradkit.lazy import lazy_exports

_EXPORTS = {
    "NoiseScale": "gradkit.scaling.noise_scale",
    "BatchSchedule": "gradkit.scaling.batch_schedule",
    "branch_cbs": "gradkit.scaling.critical_batch",
    "critical_batch_size": "gradkit.scaling.critical_batch",
    "GradNormRecorder": "gradkit.scaling.accumulation",
    "PerExampleRecorder": "gradkit.scaling.per_example",
    "NoiseScaleSink": "gradkit.scaling.sink",
    "HessianNoiseScale": "gradkit.scaling.hessian",
    "b_noise_hessian": "gradkit.scaling.hessian",
    "lr_for_batch": "gradkit.scaling.laws",
    "steps_examples_tradeoff": "gradkit.scaling.laws",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS)
