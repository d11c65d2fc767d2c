"""The scalars a zeroth-order step turns its loss evaluations into: one coefficient ``d_k`` per direction
``z_k``, so that :class:`gradkit.ZerothOrder` updates every group by ``-lr_g / (ε_g n) · Σ_k d_k z_k``.

``spsa`` (two-sided simultaneous perturbation; Spall 1992, MeZO: Malladi et al. 2023, arXiv 2305.17333),
``2n`` evaluations per step::

    d_k = (f(θ + ε z_k) - f(θ - ε z_k)) / 2

so ``d_k / ε`` is the projected gradient ``∇f·z_k + O(ε²)`` and the step is SGD on its mean.

``fzoo`` (FZOO: Dang et al. 2025, arXiv 2506.09034), ``n + 1`` evaluations per step: one base
evaluation ``f_0 = f(θ)`` shared by ``n`` one-sided probes ``f_k = f(θ + ε z_k)`` (Rademacher ``z`` in
the paper), and the step divided by the standard deviation ``σ`` of the probe losses::

    d_k = (f_k - f_0) / σ,        σ = std(f_1, ..., f_n)   (n - 1 in the denominator)

The paper reads the division as normalised SGD in zeroth order: ``σ ≈ ε |∇f|`` for Rademacher
probes of a smooth loss, so the step's length barely depends on the gradient's scale, large where
the loss is flat and small where it is steep. When every probe returns the same loss (``σ = 0``, e.g.
a metric objective that ``ε`` does not change) the probes cannot tell the directions apart and the
step has no zeroth-order part.

``svrg`` (MeZO-SVRG: Gautam et al. 2024, arXiv 2404.08080) is ``spsa`` with a control variate. Every
``q`` steps an anchor step evaluates the closure (the caller's large batch: several batches) at
``θ̄ = θ`` along its own directions ``z̄_j``, keeps ``c̄_j = (f(θ̄ + ε z̄_j) - f(θ̄ - ε z̄_j)) / 2`` and
takes a plain ``spsa`` step at ``lr · anchor_lr_scale``; the ``q - 1`` steps in between evaluate their
minibatch at ``θ`` and at the stored ``θ̄`` along the same fresh ``z_k`` (``4n`` evaluations) and step
along both the fresh and the anchor directions::

    d_k = (f(θ + ε z_k) - f(θ - ε z_k)) / 2  -  (f(θ̄ + ε z_k) - f(θ̄ - ε z_k)) / 2
    θ  <- θ - lr · ( (1/n) Σ_k (d_k / ε) z_k  +  (1/m) Σ_j (c̄_j / ε) z̄_j )

so the minibatch's own noise along ``z_k`` cancels as far as ``θ`` is still near ``θ̄``, and the anchor's
large-batch estimate carries the step. The anchor's estimate is ``m`` scalars and seeds; ``θ̄`` is the
one model-sized buffer.
"""

from __future__ import annotations

import math
import statistics

__all__ = [
    "DEFAULT_DISTRIBUTION",
    "ESTIMATORS",
    "evaluations_per_step",
    "fzoo_differences",
    "spsa_differences",
    "svrg_differences",
]

ESTIMATORS = ("spsa", "fzoo", "svrg")
# each estimator's law of z as its paper draws it: MeZO and MeZO-SVRG Gaussian, FZOO Rademacher
DEFAULT_DISTRIBUTION = {"spsa": "gaussian", "fzoo": "rademacher", "svrg": "gaussian"}
MIN_SAMPLES = {"spsa": 1, "fzoo": 2, "svrg": 1}  # FZOO's σ needs two probes


def evaluations_per_step(estimator: str, n_samples: int) -> int:
    """Closure calls of one step: ``2n`` for ``spsa`` (and ``svrg``'s anchor steps), ``n + 1`` for
    ``fzoo``, ``4n`` for ``svrg``'s steps between anchors."""
    return {"spsa": 2 * n_samples, "fzoo": n_samples + 1, "svrg": 4 * n_samples}[estimator]


def spsa_differences(plus: list[float], minus: list[float]) -> list[float]:
    """``d_k = (f(θ + ε z_k) - f(θ - ε z_k)) / 2`` in the losses' own precision (fp64 floats)."""
    return [(p - m) / 2.0 for p, m in zip(plus, minus, strict=True)]


def fzoo_differences(base: float, probes: list[float]) -> tuple[list[float], float]:
    """``(d_k = (f_k - f_0) / σ, σ)`` with ``σ`` the sample standard deviation of the probes; all ``d_k``
    are 0 when ``σ`` is 0 (the probes carry no direction)."""
    if len(probes) < MIN_SAMPLES["fzoo"]:
        raise ValueError(f"fzoo needs at least 2 probes, got {len(probes)}")
    sigma = statistics.stdev(probes)
    if sigma == 0 or not math.isfinite(sigma):
        return [0.0] * len(probes), sigma
    return [(f - base) / sigma for f in probes], sigma


def svrg_differences(
    plus: list[float], minus: list[float], anchor_plus: list[float], anchor_minus: list[float]
) -> list[float]:
    """``d_k = (f(θ + ε z_k) - f(θ - ε z_k)) / 2 - (f(θ̄ + ε z_k) - f(θ̄ - ε z_k)) / 2`` (fp64 floats)."""
    here = spsa_differences(plus, minus)
    there = spsa_differences(anchor_plus, anchor_minus)
    return [a - b for a, b in zip(here, there, strict=True)]
