"""Gradient estimators that need no backward through the objective: Gaussian smoothing (zeroth
order) and the score function (policy gradient, REINFORCE).

They are two views of one idea. Gaussian smoothing differentiates ``f_σ(θ) = E_u f(θ + σu)``
through the noise instead of through ``f``; the policy gradient differentiates
``E_{y~p_θ} r(y)`` through the sampling distribution instead of through ``r``. Both therefore
reach objectives with no useful gradient, such as accuracy or F1 of argmax predictions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gradkit.errors import GradkitError

__all__ = ["zo_gradient", "policy_gradient_loss"]


def scalar_value(result: Any, source: str) -> float:
    """A scalar objective's value as a Python float (fp64), read in its own precision: an fp64
    loss keeps every bit, so the difference of two nearby losses is not rounded away. ``source``
    names the callable in the error for anything that is not a scalar."""
    if torch.is_tensor(result):
        if result.numel() != 1:
            raise GradkitError(
                f"{source} returned a tensor of shape {tuple(result.shape)}; return a scalar (e.g. loss.mean())"
            )
        return float(result.detach().item())
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return float(result)
    raise GradkitError(f"{source} returned {type(result).__name__}; return a scalar (tensor or float)")


@torch.no_grad()
def zo_gradient(
    f: Callable[[torch.Tensor], Any],
    theta: torch.Tensor,
    *,
    sigma: float,
    n: int,
    antithetic: bool = True,
    baseline: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Zeroth-order gradient estimate of ``f`` at ``theta``: the mean of ``n`` Gaussian-smoothing
    estimates (Nesterov & Spokoiny 2017, "Random gradient-free minimization of convex functions"),
    shaped like ``theta``. With ``u_i ~ N(0, I)``:

    - antithetic (two-sided, ``antithetic=True``): ``g = (1/n) Σ (f(θ+σu_i) - f(θ-σu_i)) / (2σ) · u_i``
      (2n evaluations; the even-order terms of f cancel, so on a quadratic each term is exactly
      ``(∇f·u) u``). This is SPSA with Gaussian directions (Spall 1992) and MeZO's estimator
      (Malladi et al. 2023, arXiv 2305.17333).
    - one-sided with baseline (``antithetic=False, baseline=True``):
      ``g = (1/n) Σ (f(θ+σu_i) - f(θ)) / σ · u_i`` (n + 1 evaluations). Subtracting ``f(θ)`` leaves the
      mean unchanged (``E[u] = 0``) and removes the large ``f(θ)² |u|²/σ²`` term from the variance.
    - one-sided without baseline: ``g = (1/n) Σ f(θ+σu_i) / σ · u_i`` (unbiased, very noisy).

    All three are unbiased for ``∇f_σ(θ)``, the gradient of the smoothed ``f_σ(θ) = E f(θ+σu)``,
    which equals ``∇f(θ) + O(σ²)`` for smooth ``f`` (exactly ``∇f`` on a quadratic) and exists even
    when ``f`` is piecewise constant (accuracy of argmax predictions).

    Args:
        f: maps a tensor shaped like ``theta`` to a scalar (0-dim tensor or float); called under
            ``torch.no_grad()``.
        theta: the point (not modified).
        sigma: smoothing scale (> 0).
        n: number of directions (>= 1).
        antithetic, baseline: the estimator, as above (``baseline`` is used only when one-sided).
        generator: a torch.Generator for ``u`` (the global RNG is never used).
    """
    if not sigma > 0:
        raise GradkitError(f"sigma must be > 0, got {sigma}; pass e.g. sigma=1e-3")
    if not isinstance(n, int) or n < 1:
        raise GradkitError(f"n must be a positive integer, got {n!r}")
    if not theta.is_floating_point():
        raise GradkitError(f"theta must be a floating-point tensor, got {theta.dtype}")
    if generator is None:
        # a fixed private stream: reproducible and leaves the global RNG alone
        generator = torch.Generator(device=theta.device).manual_seed(0)
    theta = theta.detach()
    grad = torch.zeros_like(theta)
    f0 = scalar_value(f(theta), "f") if (baseline and not antithetic) else 0.0
    for _ in range(n):
        u = torch.randn(theta.shape, generator=generator, device=theta.device, dtype=theta.dtype)
        if antithetic:
            coef = (scalar_value(f(theta + sigma * u), "f") - scalar_value(f(theta - sigma * u), "f")) / (
                2.0 * sigma
            )
        else:
            coef = (scalar_value(f(theta + sigma * u), "f") - f0) / sigma
        grad.add_(u, alpha=coef)
    return grad.div_(n)


def policy_gradient_loss(
    logits: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    *,
    baseline: str | float | None = "mean",
) -> torch.Tensor:
    """REINFORCE surrogate for categorical outputs (Williams 1992): a scalar whose gradient is the
    policy-gradient estimate of ``-E_{y~p_θ}[r(y)]``, with ``p_θ(y|x) = softmax(logits)``::

        L = -(1/B) Σ_i (r_i - b) · log softmax(logits_i)[a_i]
        ∇L = -(1/B) Σ_i (r_i - b) ∇ log p_θ(a_i|x_i)  ≈  -∇ E[r]   (score-function identity)

    ``actions`` must be sampled from ``softmax(logits)`` (or from ``softmax(logits / T)`` with the
    tempered logits passed in) for the estimate to be unbiased. Any baseline ``b`` independent of
    the sampled action keeps the mean and can cut the variance:

    - ``"mean"``: the batch's mean reward (the practical choice; it includes ``r_i`` itself, which
      scales the expected gradient by ``1 - 1/B`` and does not change its direction);
    - ``"loo"``: leave-one-out mean ``(Σ_j r_j - r_i)/(B - 1)``, exactly unbiased;
    - a float: a fixed baseline; ``None``: no baseline.

    Rewards and baseline are treated as constants (detached). Minimise the result with any optimiser.

    Args:
        logits: ``(B, C)`` scores.
        actions: ``(B,)`` sampled class ids.
        rewards: ``(B,)`` rewards of those actions.
        baseline: ``"mean"``, ``"loo"``, a float, or ``None``.
    """
    if logits.ndim != 2:
        raise GradkitError(f"logits must be (batch, classes), got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    if actions.shape != (batch,) or rewards.shape != (batch,):
        raise GradkitError(
            f"actions {tuple(actions.shape)} and rewards {tuple(rewards.shape)} must both be ({batch},) "
            "for logits of shape " + str(tuple(logits.shape))
        )
    if actions.dtype not in (torch.int64, torch.int32):
        raise GradkitError(f"actions must be integer class ids, got {actions.dtype}")
    if batch == 0:
        raise GradkitError("policy_gradient_loss got an empty batch")
    rewards = rewards.detach().float()
    if baseline is None:
        b: torch.Tensor | float = 0.0
    elif baseline == "mean":
        b = rewards.mean()
    elif baseline == "loo":
        if batch < 2:
            raise GradkitError("baseline='loo' needs a batch of at least 2; use baseline='mean'")
        b = (rewards.sum() - rewards) / (batch - 1)
    elif isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        b = float(baseline)
    else:
        raise GradkitError(f"unknown baseline {baseline!r}; use 'mean', 'loo', a float, or None")
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    chosen = log_probs.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return -((rewards - b) * chosen).mean()
