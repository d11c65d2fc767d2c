"""The gradient noise scale, measured while training (McCandlish, Kaplan, Amodei et al., 2018,
"An Empirical Model of Large-Batch Training", arXiv 1812.06162).

Let ``G`` be the true gradient and ``Σ`` the per-example gradient covariance. A mean gradient over a
batch of ``b`` examples has ``E|G_b|² = |G|² + tr(Σ)/b``. Two batch sizes ``b < B`` give unbiased
estimators (Appendix A.1 of the paper)::

    |G|²   ≈ (B·|G_B|² − b·|G_b|²) / (B − b)
    tr(Σ)  ≈ (|G_b|² − |G_B|²) / (1/b − 1/B)

and the simple noise scale ``B_simple = tr(Σ)/|G|²``. Both estimators are noisy, and the ratio of two
noisy numbers is biased, so :class:`NoiseScale` smooths the numerator and the denominator as two
separate bias-corrected EMAs and reports their ratio (never an EMA of ratios).

Where the two batch sizes come from (all cheap):

- :meth:`NoiseScale.accumulation_hooks` — micro-batches inside gradient accumulation and, under DDP
  or FSDP2, each rank's local gradient against the reduced one; see
  :mod:`gradkit.scaling.accumulation`.
- :meth:`NoiseScale.per_example_hooks` — exact per-example gradient norms of ``nn.Linear`` layers
  (``b = 1``), see :mod:`gradkit.scaling.per_example` (also under FSDP2).

:func:`gradkit.scaling.hessian.b_noise_hessian` gives the Hessian-aware ``B_noise = tr(HΣ)/(GᵀHG)`` on
a held batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.scaling.accumulation import GradNormRecorder
from gradkit.scaling.per_example import PerExampleRecorder

__all__ = ["NoiseScale", "grad_sq_norm_estimate", "trace_sigma_estimate"]

NOT_MEASURABLE = (
    "not yet measurable: the smoothed |G|^2 (or tr(Sigma)) estimate is <= 0, i.e. gradient noise still "
    "hides the signal; keep training, or measure with a larger big batch"
)


def _check_sizes(b_small: float, b_big: float) -> None:
    if not (b_small > 0 and b_big > 0 and math.isfinite(b_small) and math.isfinite(b_big)):
        raise GradkitError(f"batch sizes must be positive, got b_small={b_small}, b_big={b_big}")
    if b_small >= b_big:
        raise GradkitError(
            f"b_small={b_small} must be smaller than b_big={b_big}; pass the micro-batch (or per-example) "
            "size as b_small and the whole batch as b_big"
        )


def grad_sq_norm_estimate(small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> float:
    """Unbiased ``|G|² ≈ (B·|G_B|² − b·|G_b|²)/(B − b)`` (McCandlish et al. 2018, eq. A.2). May be < 0."""
    _check_sizes(b_small, b_big)
    return (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)


def trace_sigma_estimate(small_sq_norm: float, big_sq_norm: float, b_small: float, b_big: float) -> float:
    """Unbiased ``tr(Σ) ≈ (|G_b|² − |G_B|²)/(1/b − 1/B)`` (McCandlish et al. 2018, eq. A.3). May be < 0."""
    _check_sizes(b_small, b_big)
    return (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)


def _scalar(value: Any, name: str) -> float:
    out = float(value.detach().item()) if torch.is_tensor(value) else float(value)
    if not math.isfinite(out) or out < 0:
        raise GradkitError(
            f"{name}={out} is not a finite squared norm >= 0; pass the squared L2 norm of the gradient "
            "(e.g. from the loss before AMP overflow skipped the step)"
        )
    return out


class NoiseScale:
    """Smoothed gradient noise scale ``B_simple = tr(Σ)/|G|²`` from two-batch-size measurements.

    ``B_simple`` (McCandlish et al. 2018, arXiv 1812.06162) is the batch size around which doubling the
    batch stops halving the number of steps: the critical batch size ``B_crit`` is of its order.

    Args:
        model: the model whose gradients the hook helpers measure (DDP / compile wrappers are fine:
            the same parameter tensors are hooked). Not needed when calling :meth:`update` yourself.
        beta: EMA coefficient for both the ``|G|²`` and the ``tr(Σ)`` estimates (horizon ≈ 1/(1−β)
            updates). Each EMA starts at zero and is bias-corrected (divided by ``1 − β^t``, as Adam does).

    Properties ``grad_sq_norm`` and ``trace_sigma`` are the smoothed estimates; ``b_simple`` is their
    ratio, or ``None`` while either is ``<= 0`` ("not yet measurable": early in training the noise
    can make the unbiased ``|G|²`` estimate negative; a negative noise scale is never reported).
    """

    def __init__(self, model: nn.Module | None = None, *, beta: float = 0.99) -> None:
        if not 0.0 <= beta < 1.0:
            raise GradkitError(f"NoiseScale beta must be in [0, 1), got {beta}; e.g. beta=0.99")
        self.model = model
        self.beta = float(beta)
        self.step = 0
        self._ema_g2 = 0.0  # zero-started EMA of the |G|^2 estimates
        self._ema_s = 0.0  # zero-started EMA of the tr(Sigma) estimates
        self.last: dict[str, float] = {}  # the raw estimates of the latest update

    # -- the estimator -----------------------------------------------------------------------------
    def update(self, small_sq_norm: Any, big_sq_norm: Any, b_small: float, b_big: float) -> float | None:
        """Add one measurement: ``|G_b|²`` at batch size ``b_small`` and ``|G_B|²`` at ``b_big``.

        ``small_sq_norm`` may be the mean of several small-batch squared norms (e.g. over the
        micro-batches of one step): the estimators are linear in it, so they stay unbiased, with
        ``b_small`` the harmonic mean of those sizes. Returns the new :attr:`b_simple`.
        """
        small, big = _scalar(small_sq_norm, "small_sq_norm"), _scalar(big_sq_norm, "big_sq_norm")
        g2 = grad_sq_norm_estimate(small, big, b_small, b_big)
        s = trace_sigma_estimate(small, big, b_small, b_big)
        self.step += 1
        # separate EMAs of numerator and denominator: the ratio of means, not the mean of ratios
        self._ema_g2 = self.beta * self._ema_g2 + (1.0 - self.beta) * g2
        self._ema_s = self.beta * self._ema_s + (1.0 - self.beta) * s
        self.last = {
            "grad_sq_norm": g2,
            "trace_sigma": s,
            "small_sq_norm": small,
            "big_sq_norm": big,
            "b_small": float(b_small),
            "b_big": float(b_big),
        }
        return self.b_simple

    def _correction(self) -> float:
        return 1.0 - self.beta**self.step

    @property
    def grad_sq_norm(self) -> float | None:
        """Smoothed, bias-corrected ``|G|²`` estimate (may be <= 0 early on); None before any update."""
        return self._ema_g2 / self._correction() if self.step else None

    @property
    def trace_sigma(self) -> float | None:
        """Smoothed, bias-corrected ``tr(Σ)`` estimate (per-example covariance); None before any update."""
        return self._ema_s / self._correction() if self.step else None

    @property
    def measurable(self) -> bool:
        """Whether both smoothed estimates are positive, so that :attr:`b_simple` is defined."""
        return self.step > 0 and self._ema_g2 > 0 and self._ema_s > 0

    @property
    def b_simple(self) -> float | None:
        """``B_simple = tr(Σ)/|G|²`` from the smoothed estimates, or None when not yet measurable."""
        # the bias corrections of the two EMAs are equal, so they cancel in the ratio
        return self._ema_s / self._ema_g2 if self.measurable else None

    @property
    def status(self) -> str:
        """A one-line description: the value, or why there is none yet."""
        if self.step == 0:
            return "no measurement yet: call update() (or a hook helper's step()) after a backward pass"
        if not self.measurable:
            return NOT_MEASURABLE
        return f"B_simple = {self.b_simple:.4g} after {self.step} updates"

    def metrics(self) -> dict[str, float | None]:
        """``{"b_simple", "grad_sq_norm", "trace_sigma"}`` for logging (b_simple None if not measurable)."""
        return {"b_simple": self.b_simple, "grad_sq_norm": self.grad_sq_norm, "trace_sigma": self.trace_sigma}

    # -- sources -----------------------------------------------------------------------------------
    def _model(self, model: nn.Module | None) -> nn.Module:
        model = model if model is not None else self.model
        if model is None:
            raise GradkitError("this helper needs the model; pass NoiseScale(model) or helper(model)")
        return model

    def accumulation_hooks(
        self,
        model: nn.Module | None = None,
        *,
        grad_scale: float = 1.0,
        distributed: bool | None = None,
        fused: bool | None = None,
    ) -> GradNormRecorder:
        """Measure each micro-batch's gradient inside gradient accumulation (and, under DDP, each rank's
        local gradient); see :class:`GradNormRecorder`. ``fused`` (default: in a single process) reads
        the accumulated gradients with a few multi-tensor kernels per micro-batch instead of a hook per
        parameter, at the memory of one gradient copy."""
        return GradNormRecorder(
            self, self._model(model), grad_scale=grad_scale, distributed=distributed, fused=fused
        )

    def per_example_hooks(
        self,
        model: nn.Module | None = None,
        *,
        modules: Iterable[nn.Module] | None = None,
        grad_scale: float = 1.0,
        distributed: bool | None = None,
    ) -> PerExampleRecorder:
        """Hooks that measure exact per-example gradient norms of the Linear layers (``b = 1``); see
        :class:`gradkit.scaling.per_example.PerExampleRecorder`."""
        return PerExampleRecorder(
            self, self._model(model), modules=modules, grad_scale=grad_scale, distributed=distributed
        )

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the smoothed estimates exactly."""
        return {
            "beta": self.beta,
            "step": self.step,
            "ema_grad_sq_norm": self._ema_g2,
            "ema_trace_sigma": self._ema_s,
            "last": dict(self.last),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        try:
            self.beta, self.step = float(state["beta"]), int(state["step"])
            self._ema_g2, self._ema_s = float(state["ema_grad_sq_norm"]), float(state["ema_trace_sigma"])
        except KeyError as err:
            raise GradkitError(
                f"NoiseScale state lacks {err}; pass a dict saved by NoiseScale.state_dict()"
            ) from None
        self.last = dict(state.get("last", {}))

    def __repr__(self) -> str:
        return f"NoiseScale(beta={self.beta}, step={self.step}, b_simple={self.b_simple})"
