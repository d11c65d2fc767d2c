"""Learning rate versus batch size, and the steps / examples trade-off.

SGD (McCandlish et al. 2018, arXiv 1812.06162, eq. 2.7): the optimal step size at batch ``B`` is
``η*(B) = η_max / (1 + B_noise/B)``, so moving a known-good ``lr`` from ``B`` to ``B'`` gives
``lr · (1 + B_noise/B) / (1 + B_noise/B')``: linear scaling well below ``B_noise``, flat above.

Adam (Li et al. 2024, "Surge phenomenon in optimal learning rate and batch size scaling",
arXiv 2405.14578), in the sign-descent view. A coordinate with mean gradient ``μ`` and per-example
noise ``σ``, averaged over ``B`` examples, has ``E[sign] ≈ (μ/σ)/sqrt(π/(2B) + (μ/σ)²)``; with the
noise-to-signal ratio ``κ = σ/|μ|`` this is ``β(B) = (1 + πκ²/(2B))^(−1/2)`` — the fraction of the
update that points the right way. The mean-field optimum is::

    η*(B) ∝ 1 / [½ (β_n/β(B) + β(B)/β_n)]

with ``β_n`` a constant of the loss landscape. For small ``B``, ``β ≈ sqrt(2B/π)/κ`` so ``η* ∝ √B``; the
optimum peaks where ``β(B) = β_n``, at ``B_peak = πκ²β_n² / (2(1 − β_n²))``, and past it falls (the
"surge"); since ``β < 1``, if ``β_n >= 1`` there is no peak and ``η*`` grows monotonically.

So the Adam rule needs two quantities, not one:

- ``kappa`` (κ): the per-coordinate gradient noise-to-signal ratio of a single example. Measured
  estimate: ``κ² ≈ B_simple = tr(Σ)/|G|²`` (exact when every coordinate has the same ratio), i.e.
  ``kappa = sqrt(NoiseScale.b_simple)``.
- where the optimum peaks: ``beta_n`` directly, or the peak batch size as ``b_noise`` (Li et al.
  find ``B_peak ≈ B_noise``), from which ``β_n = β(b_noise)``.

With ``kappa² = b_noise = B_simple`` the peak sits at ``B_simple`` and ``β_n = (1 + π/2)^(−1/2)``.

Steps and examples (McCandlish et al. 2018, eq. 2.11): to reach a given loss, runs at batch ``B``
need ``S`` steps and ``E = B·S`` examples with ``(S/S_min − 1)(E/E_min − 1) = 1``. Substituting
``E = B·S`` shows this hyperbola is exactly ``S = S_min + E_min/B`` (equivalently
``E = E_min + S_min·B``), i.e. ``S = S_min (1 + B_crit/B)`` with ``B_crit = E_min/S_min``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gradkit.errors import GradkitError

__all__ = [
    "TradeoffFit",
    "adam_lr_factor",
    "adam_peak_batch",
    "lr_for_batch",
    "sgd_lr_factor",
    "sign_expectation",
    "steps_examples_tradeoff",
]

OPTIMIZERS = ("sgd", "adam")


def _positive(name: str, value: float | None) -> float:
    if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise GradkitError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def sgd_lr_factor(batch: float, b_noise: float) -> float:
    """``η*(B)/η_max = 1/(1 + B_noise/B)`` (McCandlish et al. 2018)."""
    return 1.0 / (1.0 + _positive("b_noise", b_noise) / _positive("batch", batch))


def sign_expectation(batch: float, kappa: float) -> float:
    """``β(B) = (1 + πκ²/(2B))^(−1/2)``: expected sign agreement of a batch-``B`` gradient coordinate."""
    kappa = _positive("kappa", kappa)
    return (1.0 + math.pi * kappa**2 / (2.0 * _positive("batch", batch))) ** -0.5


def adam_lr_factor(batch: float, kappa: float, beta_n: float) -> float:
    """``1/[½(β_n/β(B) + β(B)/β_n)]``: Adam's optimal lr at ``B`` relative to its peak value (Li et al. 2024).

    Equals 1 at the peak ``β(B) = β_n`` and is below 1 everywhere else.
    """
    beta_n = _positive("beta_n", beta_n)
    beta = sign_expectation(batch, kappa)
    return 1.0 / (0.5 * (beta_n / beta + beta / beta_n))


def adam_peak_batch(kappa: float, beta_n: float) -> float:
    """Batch size of Adam's largest optimal lr: ``πκ²β_n²/(2(1 − β_n²))``; ``inf`` when ``β_n >= 1``."""
    kappa, beta_n = _positive("kappa", kappa), _positive("beta_n", beta_n)
    if beta_n >= 1.0:
        return math.inf
    return math.pi * kappa**2 * beta_n**2 / (2.0 * (1.0 - beta_n**2))


def lr_for_batch(
    lr: float,
    batch: float,
    new_batch: float,
    *,
    optimizer: str = "sgd",
    b_noise: float | None = None,
    kappa: float | None = None,
    beta_n: float | None = None,
) -> float:
    """The learning rate for ``new_batch`` given a known-good ``lr`` at ``batch``.

    - ``optimizer="sgd"``: ``lr · (1 + b_noise/batch) / (1 + b_noise/new_batch)`` (McCandlish et al.
      2018); needs ``b_noise`` (``B_noise``, or the measured ``B_simple`` in its place).
    - ``optimizer="adam"``: ``lr · f(new_batch)/f(batch)`` with ``f = 1/[½(β_n/β + β/β_n)]``,
      ``β(B) = (1 + πκ²/(2B))^(−1/2)`` (Li et al. 2024, mean-field form; module docstring). Needs
      ``kappa`` (estimate: ``sqrt(B_simple)``) and either ``beta_n`` or the peak batch size as
      ``b_noise`` (then ``β_n = β(b_noise)``). ``∝ √B`` for small batches, a peak, then a fall; no
      peak if ``beta_n >= 1``.
    """
    lr, batch, new_batch = _positive("lr", lr), _positive("batch", batch), _positive("new_batch", new_batch)
    if optimizer == "sgd":
        if b_noise is None:
            raise GradkitError(
                "lr_for_batch(optimizer='sgd') needs b_noise; pass the measured NoiseScale.b_simple"
            )
        return lr * sgd_lr_factor(new_batch, b_noise) / sgd_lr_factor(batch, b_noise)
    if optimizer == "adam":
        if kappa is None:
            raise GradkitError(
                "lr_for_batch(optimizer='adam') needs kappa, the gradient noise-to-signal ratio; "
                "pass kappa=sqrt(NoiseScale.b_simple)"
            )
        if (b_noise is None) == (beta_n is None):
            raise GradkitError(
                "lr_for_batch(optimizer='adam') needs exactly one of b_noise (the batch size where the "
                "optimal lr peaks, about B_noise) or beta_n"
            )
        if beta_n is None:
            beta_n = sign_expectation(b_noise, kappa)
        return lr * adam_lr_factor(new_batch, kappa, beta_n) / adam_lr_factor(batch, kappa, beta_n)
    raise GradkitError(f"unknown optimizer {optimizer!r}; use one of {', '.join(OPTIMIZERS)}")


@dataclass(frozen=True)
class TradeoffFit:
    """``(S/S_min − 1)(E/E_min − 1) = 1`` fitted to runs; ``S(B) = S_min(1 + B_crit/B)``."""

    s_min: float  # fewest steps (infinite batch)
    e_min: float  # fewest examples (tiny batch)
    b_crit: float  # E_min / S_min: the critical batch size
    rms_log_error: float  # root-mean-square of log(S_fit/S) over the runs
    runs: int

    def steps(self, batch: float) -> float:
        """Predicted steps at batch size ``batch``: ``S_min + E_min/B``."""
        return self.s_min + self.e_min / _positive("batch", batch)

    def examples(self, batch: float) -> float:
        """Predicted examples at batch size ``batch``: ``E_min + S_min·B``."""
        return self.e_min + self.s_min * _positive("batch", batch)


def _parse_run(run: Any, i: int) -> tuple[float, float]:
    if isinstance(run, Mapping):
        steps = run.get("steps")
        examples = run.get("examples")
        if examples is None and run.get("batch_size") is not None and steps is not None:
            examples = float(steps) * float(run["batch_size"])
    else:
        try:
            steps, examples = run
        except (TypeError, ValueError):
            raise GradkitError(
                f"run {i} is {run!r}; pass (steps, examples) pairs or dicts with steps and examples (or batch_size)"
            ) from None
    for name, v in (("steps", steps), ("examples", examples)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise GradkitError(f"run {i} has {name}={v!r}; steps and examples must be finite numbers > 0")
    if examples < steps:
        raise GradkitError(
            f"run {i} has fewer examples ({examples}) than steps ({steps}); pass E = steps x batch"
        )
    return float(steps), float(examples)


def steps_examples_tradeoff(runs: Sequence[Any]) -> TradeoffFit:
    """Fit ``(S/S_min − 1)(E/E_min − 1) = 1`` to ``(steps, examples)`` of runs that reached one target loss.

    Each run is ``(steps, examples)`` or a dict with ``steps`` and ``examples`` (or ``batch_size``). With
    ``B = E/S`` the curve is the line ``S = S_min + E_min·(1/B)`` (module docstring), fitted by least
    squares on relative errors (weights ``1/S²``, so runs with few steps count as much as long ones);
    returns ``S_min``, ``E_min`` and ``B_crit = E_min/S_min`` (McCandlish et al. 2018, eq. 2.11–2.12).
    Needs at least 3 runs at no fewer than 2 distinct batch sizes.
    """
    if isinstance(runs, Mapping) or not isinstance(runs, Sequence):
        raise GradkitError("runs must be a list of (steps, examples) pairs, one per batch size")
    if len(runs) < 3:
        raise GradkitError(
            f"steps_examples_tradeoff needs at least 3 runs (2 parameters and a check), got {len(runs)}; "
            "add runs at more batch sizes"
        )
    pairs = [_parse_run(r, i) for i, r in enumerate(runs)]
    xs = [s / e for s, e in pairs]  # 1/B
    ys = [s for s, _ in pairs]
    ws = [1.0 / y**2 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs, strict=True)) / sw
    my = sum(w * y for w, y in zip(ws, ys, strict=True)) / sw
    sxx = sum(w * (x - mx) ** 2 for w, x in zip(ws, xs, strict=True))
    if sxx <= 1e-12 * sw * mx**2:
        raise GradkitError(
            "all runs use the same batch size; the trade-off needs runs at several batch sizes"
        )
    e_min = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys, strict=True)) / sxx
    s_min = my - e_min * mx
    if e_min <= 0 or s_min <= 0:
        raise GradkitError(
            f"the runs do not follow (S/S_min-1)(E/E_min-1)=1 (fit gave S_min={s_min:.4g}, E_min={e_min:.4g}); "
            "check that every run reached the same target loss with a tuned learning rate"
        )
    err = math.sqrt(
        sum(math.log((s_min + e_min * x) / y) ** 2 for x, y in zip(xs, ys, strict=True)) / len(ys)
    )
    return TradeoffFit(s_min=s_min, e_min=e_min, b_crit=e_min / s_min, rms_log_error=err, runs=len(ys))
