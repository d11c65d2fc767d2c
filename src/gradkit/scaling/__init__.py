"""Gradient noise scale and learning-rate / batch-size laws: the estimator and its formulas
(noise_scale), the recorders that feed it (accumulation, per_example), the Hessian-aware estimate
(hessian) and the fitted laws (laws); imported on first use, so ``import gradkit.scaling`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "NoiseScale": "gradkit.scaling.noise_scale",
    "GradNormRecorder": "gradkit.scaling.accumulation",
    "PerExampleRecorder": "gradkit.scaling.per_example",
    "NoiseScaleSink": "gradkit.scaling.sink",
    "HessianNoiseScale": "gradkit.scaling.hessian",
    "b_noise_hessian": "gradkit.scaling.hessian",
    "lr_for_batch": "gradkit.scaling.laws",
    "steps_examples_tradeoff": "gradkit.scaling.laws",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'gradkit.scaling' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))
