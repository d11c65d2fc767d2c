"""Initialisers whose std is the std you get: a truncated normal corrected for its truncation, and BERT's init.

A normal N(0, σ²) cut at ±b·σ has the variance (the truncated-normal variance formula, e.g. Johnson,
Kotz & Balakrishnan, *Continuous Univariate Distributions* vol. 1, ch. 13)::

    Var = σ² · [1 − 2·b·φ(b) / (2·Φ(b) − 1)]

with φ, Φ the standard normal density and CDF. At b = 2 the factor sqrt(1 − 2bφ(b)/(2Φ(b) − 1)) is
0.87962566: BERT's ``truncated_normal(stddev=0.02)`` (Devlin et al. 2019, TensorFlow's definition: cut
at ±2σ) really has std 0.01759. :func:`truncated_normal_` takes the std the user wants and draws from
the normal with σ = std / factor, so the result's real std is ``std``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gradkit.errors import GradkitError

__all__ = ["bert_init_", "truncated_normal_", "truncation_std_factor"]

_SQRT2 = math.sqrt(2.0)
_MIN_BOUND = 1e-300


def _check_bound(bound: float) -> float:
    try:
        b = float(bound)
    except (TypeError, ValueError):
        raise GradkitError(f"bound must be a positive number of standard deviations, got {bound!r}") from None
    if not b > 0:  # also refuses NaN
        raise GradkitError(
            f"bound must be a positive number of standard deviations (the cut is at ±bound·σ), got {bound!r}"
        )
    return b


def truncation_std_factor(bound: float) -> float:
    """The std of a standard normal truncated to [−bound, bound]: sqrt(1 − 2bφ(b)/(2Φ(b) − 1)).

    This is the ratio real std / σ of N(0, σ²) cut at ±bound·σ (the truncated-normal variance
    formula; φ and Φ are the standard normal density and CDF). It is 0.8796 at bound 2 (so the
    "0.02" of BERT, Devlin et al. 2019, really is 0.0176), 0.9866 at 3, and 1 for ``math.inf``
    (no cut). For bound below 0.1 the formula cancels catastrophically in floating point, so the
    series b²/3·(1 − 2b²/15 + 2b⁴/315 + 2b⁶/4725 − 2b⁸/31185) (the variance of the nearly
    uniform law; its remainder is below 1e-13 there) is used instead.

    >>> round(truncation_std_factor(2.0), 6)
    0.879626
    """
    b = _check_bound(bound)
    if b > 40.0:  # 2bφ(b) < 1e-300: the factor is 1 in float64 (and b·b would overflow from 1.3e154)
        return 1.0
    if b < 0.1:
        b2 = b * b
        series = 1.0 - 2.0 * b2 / 15.0 + 2.0 * b2**2 / 315.0 + 2.0 * b2**3 / 4725.0 - 2.0 * b2**4 / 31185.0
        return b * math.sqrt(series / 3.0)  # b·sqrt(…), not sqrt(b²·…): b² underflows below 1e-154
    else:
        pdf = math.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)
        mass = math.erf(b / _SQRT2)  # 2Φ(b) − 1
        var = 1.0 - 2.0 * b * pdf / mass
    return math.sqrt(var)


def _inside(value: float, dtype: torch.dtype, toward: float) -> torch.Tensor:
    """The representable value of ``dtype`` closest to ``value`` on the side of ``toward`` (never past it)."""
    v = torch.tensor(value, dtype=torch.float64).to(dtype)
    past = v.double() > value if toward < value else v.double() < value
    if past or torch.isinf(v):
        v = torch.nextafter(v, torch.tensor(toward, dtype=dtype))
    return v


def _rejection_normal(shape, b: float, generator, dtype: torch.dtype, device) -> torch.Tensor:
    """Standard normal draws in [−b, b]: the ones outside are redrawn (only those) until none is left."""
    z = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    flat = z.view(-1)
    redo = (flat.abs() > b).nonzero().squeeze(1)
    while redo.numel():
        fresh = torch.randn(redo.numel(), generator=generator, dtype=dtype, device=device)
        keep = fresh.abs() <= b
        flat[redo[keep]] = fresh[keep]
        redo = redo[~keep]
    return z


def _inverse_cdf_normal(shape, b: float, generator, device) -> torch.Tensor:
    """Standard normal draws in [−b, b] (float64) by the inverse CDF of |z| and a random sign.

    |z| = Φ⁻¹(½ + ½·erf(b/√2)·v) = √2·erfinv(erf(b/√2)·v) for v uniform in (0, 1]: the erfinv form
    keeps full relative precision however small b is (Φ⁻¹ near ½ would resolve only the few
    probabilities of width ~b that a float near ½ can hold).
    """
    u = torch.rand(shape, generator=generator, dtype=torch.float64, device=device)
    negative = u < 0.5
    v = torch.where(negative, 1 - 2 * u, 2 - 2 * u)  # in (0, 1]
    z = torch.special.erfinv(v.mul_(math.erf(b / _SQRT2))).mul_(_SQRT2).clamp_(max=b)
    return torch.where(negative, -z, z)


def truncated_normal_(
    tensor: torch.Tensor,
    std: float,
    bound: float = 2.0,
    generator: torch.Generator | None = None,
    *,
    mean: float = 0.0,
) -> torch.Tensor:
    """Fill ``tensor`` in place from a normal truncated at ±``bound``·σ whose REAL std is ``std``.

    The underlying normal has σ = std / :func:`truncation_std_factor` (bound), from the
    truncated-normal variance formula Var = σ²·[1 − 2bφ(b)/(2Φ(b) − 1)], and the values lie in
    [mean − bound·σ, mean + bound·σ]. So ``truncated_normal_(w, 0.02)`` gives std 0.02 with the cut
    at ±0.0455 (±2.27 of the requested std), where TensorFlow's ``truncated_normal(stddev=0.02)`` (the
    one BERT, Devlin et al. 2019, used) gives std 0.0176 and ``torch.nn.init.trunc_normal_(w,
    std=0.02)`` cuts at the absolute ±2 (±100σ: nothing). ``bound=math.inf`` is the plain normal.

    Sampling draws from the truncated law itself, in one of two ways. For
    ``bound >= 1`` (the usual case), by rejection: standard normal draws outside ±bound are redrawn
    until none is left (each draw is kept with probability 2Φ(b) − 1: 68 % at 1, 95 % at 2, so a few
    short rounds; the whole fill costs a few ``torch.randn``; float32, float64 for a float64 tensor).
    For ``bound < 1``, where rejection would waste most draws, by the inverse CDF in float64 whatever
    the tensor's dtype: one uniform u gives the sign (u < ½) and v ∈ (0, 1]; then
    |z| = √2·erfinv(erf(b/√2)·v), which keeps full relative precision for any small b (so the std
    holds at bound 1e-7 as at 0.5; a quantile Φ⁻¹(p) near p = ½ in float32 resolves only ~b/6e-8
    probabilities there). The value
    mean + σ·z is then cast to the tensor's dtype and clamped to the cut: rounding to bf16 or fp16
    can carry a value just past mean ± bound·σ, and such a value becomes the representable number
    of that dtype nearest to the cut on its inside. So no value is ever outside the cut, in any
    dtype; the clamp moves only values within one ulp of the cut, by less than one ulp. (A dtype too
    coarse for the std asked, e.g. std 1e-3 around mean 0.25 in bf16, whose ulp there is 2e-3, still
    keeps the cut, but its std is then the rounding's, not ``std``.)

    ``generator`` (on the tensor's device) is the only RNG used when given; with ``None`` the
    global RNG of the tensor's device is used and advanced, as ``torch.nn.init`` does. Returns
    ``tensor``.

    Raises :class:`~gradkit.errors.GradkitError` for ``std <= 0``, ``bound <= 0``, a tensor that is
    not floating point, and what float64 cannot honour: a bound below 1e-300 (subnormal draws) or a
    finite cut mean ± bound·σ beyond float64's range (``bound=math.inf`` is the plain normal).
    """
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise GradkitError(
            f"truncated_normal_ fills a floating-point tensor, got {what}; pass a float tensor"
        )
    try:
        s = float(std)
    except (TypeError, ValueError):
        raise GradkitError(f"std must be a positive number, got {std!r}") from None
    if not (s > 0 and math.isfinite(s)):
        raise GradkitError(f"std must be a positive finite number (the real std of the result), got {std!r}")
    b = _check_bound(bound)
    mu = float(mean)
    if not math.isfinite(mu):
        raise GradkitError(f"mean must be a finite number, got {mean!r}")
    if tensor.numel() == 0:
        return tensor

    if b < _MIN_BOUND:
        raise GradkitError(
            f"bound {bound!r} is below {_MIN_BOUND:g}: the draws z (|z| <= bound) would be subnormal in "
            "float64; the law is uniform on ±√3·std to float64 precision long before that: pass a larger bound"
        )
    sigma = s / truncation_std_factor(b)
    if not (math.isinf(b) or math.isfinite(mu + sigma * b) and math.isfinite(mu - sigma * b)):
        raise GradkitError(
            f"std {std!r} with bound {bound!r} puts the cut (mean ± bound·σ, σ = std/truncation_std_factor"
            "(bound)) beyond float64's range; pass bound=math.inf for the plain normal, or a smaller std"
        )
    work = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        if math.isinf(b):
            z = torch.randn(tensor.shape, generator=generator, dtype=work, device=tensor.device)
            tensor.copy_(z.mul_(sigma).add_(mu))
            return tensor
        if b >= 1.0:
            z = _rejection_normal(tensor.shape, b, generator, work, tensor.device)
        else:
            z = _inverse_cdf_normal(tensor.shape, b, generator, tensor.device)
        values = z.mul_(sigma).add_(mu).to(tensor.dtype)
        lower = _inside(mu - b * sigma, tensor.dtype, toward=mu).to(tensor.device)
        upper = _inside(mu + b * sigma, tensor.dtype, toward=mu).to(tensor.device)
        tensor.copy_(torch.clamp(values, lower, upper))
    return tensor


def _normal_(tensor: torch.Tensor, std: float, truncated: bool, generator: torch.Generator | None) -> None:
    truncated_normal_(tensor, std, 2.0 if truncated else math.inf, generator)


def bert_init_(
    model: nn.Module,
    std: float = 0.02,
    truncated: bool = True,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise ``model`` in place as BERT does (Devlin et al. 2019), with ``std`` the real std.

    - every ``nn.Linear``: weight from the normal with real std ``std`` (truncated at ±2σ of the
      underlying normal by :func:`truncated_normal_` when ``truncated``, else plain
      N(0, std²) as Hugging Face's ``BertPreTrainedModel._init_weights`` does), bias 0;
    - every ``nn.Embedding``: weight likewise, and the ``padding_idx`` row 0;
    - every ``nn.LayerNorm`` (and ``nn.RMSNorm``): weight 1, bias 0.

    Linear layers go first, then embeddings, then norms, so a head tied to an embedding keeps its
    padding row at 0. Other parameters (e.g. a prediction head's separate bias) are left as they
    are. Original BERT drew from TensorFlow's ``truncated_normal(stddev=0.02)``, whose real std is
    0.02·0.8796 = 0.0176; for that exact law pass ``std=0.02 * truncation_std_factor(2.0)``.
    ``generator``: as in :func:`truncated_normal_`. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise GradkitError(f"bert_init_ takes an nn.Module, got {type(model).__name__}")
    norms: tuple[type[nn.Module], ...] = (nn.LayerNorm,)
    if hasattr(nn, "RMSNorm"):
        norms = (*norms, nn.RMSNorm)
    modules = list(model.modules())
    with torch.no_grad():
        for m in modules:
            if isinstance(m, nn.Linear):
                _normal_(m.weight, std, truncated, generator)
                if m.bias is not None:
                    m.bias.zero_()
        for m in modules:
            if isinstance(m, nn.Embedding):
                _normal_(m.weight, std, truncated, generator)
                if m.padding_idx is not None:
                    m.weight[m.padding_idx].zero_()
        for m in modules:
            if isinstance(m, norms):
                if getattr(m, "weight", None) is not None:
                    m.weight.fill_(1.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
    return model
