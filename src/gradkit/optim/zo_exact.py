"""The exact part of a hybrid zeroth-order step: the parameters of ``ZerothOrder``'s ``exact`` groups (a
classification head, say) are trained with the closure's own autograd gradient, everything else by the
zeroth-order estimate, in one step.

Why it pays: a head of ``C × d`` weights sits on features the forward computes anyway, so its exact
gradient costs one small backward through the head alone, while a zeroth-order estimate of those
``C·d`` coordinates would add their share of noise to every step. While the closure runs with the
gradient on, the zeroth-order parameters have ``requires_grad`` turned off, so autograd records only
the ops after them that lead to an exact parameter (the head) and nothing of the encoder: peak memory
stays the forward's plus the head's gradient.

Where the gradient is taken: ``spsa`` differentiates every evaluation and averages, ``(1/2n) Σ_k
(∇_e f(θ + ε z_k) + ∇_e f(θ - ε z_k)) = ∇_e f(θ) + O(ε²)`` (the first-order terms cancel in each
pair), at no extra forward; ``fzoo`` differentiates its base evaluation ``f(θ)``, exactly.

Under data parallelism the closure's value must be the loss all-reduced over ranks (as for the
zeroth-order part) while its graph is this rank's own loss, e.g. ``reduced.detach() + (local -
local.detach())`` (equal to ``reduced`` bit for bit, gradient of ``local``); the gradients are then
averaged over ranks, which is the gradient of the mean loss when the ranks hold equal slices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from gradkit.errors import GradkitError
from gradkit.optim.zo_directions import work_dtype
from gradkit.optim.zo_perturb import data_parallel

__all__ = ["ExactGradients", "exact_update_", "mean_keeping_graph", "split_exact"]


def split_exact(
    named: Iterable[tuple[str, torch.Tensor]], pick: Callable[[str], bool] | None
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The trainable (``requires_grad``) tensors of ``named`` as ``(zeroth-order, exact)``: exact where
    ``pick(name)`` holds (none when ``pick`` is None)."""
    zeroth, exact = [], []
    for name, p in named:
        if p.requires_grad:
            (exact if pick is not None and pick(name) else zeroth).append(p)
    return zeroth, exact


def mean_keeping_graph(local: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """``mean`` (a loss reduced over ranks, detached) with ``local``'s graph when it has one: the value is
    ``mean`` bit for bit (``local - local.detach()`` is exactly 0), the gradient that of this rank's
    ``local``, which :class:`ExactGradients` averages over ranks."""
    return mean + (local - local.detach()) if local.requires_grad else mean


class ExactGradients:
    """Accumulates the gradient of the closure's loss with respect to ``exact`` over a step's
    evaluations (in at least fp32) and yields their weighted sum."""

    def __init__(self, exact: list[torch.Tensor], zeroth: list[torch.Tensor]):
        self.exact, self.zeroth = exact, zeroth
        self.sums: list[torch.Tensor | None] = [None] * len(exact)

    @contextlib.contextmanager
    def zeroth_frozen(self) -> Iterator[None]:
        """``requires_grad`` off on the zeroth-order parameters (autograd then records nothing of
        them), put back afterwards whatever happens."""
        flags = [p.requires_grad for p in self.zeroth]
        try:
            for p in self.zeroth:
                p.requires_grad_(False)
            yield
        finally:
            for p, flag in zip(self.zeroth, flags, strict=True):
                p.requires_grad_(flag)

    def evaluate(self, closure: Callable[[], Any], weight: float) -> Any:
        """``closure()`` with the gradient on; adds ``weight · ∇_exact`` of its value to the sums."""
        with torch.enable_grad():
            value = closure()
            if not (torch.is_tensor(value) and value.requires_grad):
                raise GradkitError(
                    "ZerothOrder has exact parameters, and the closure's loss does not depend on them "
                    "through autograd; return the loss without detach() or torch.no_grad()"
                )
            grads = torch.autograd.grad(value, self.exact, allow_unused=True)
        for i, grad in enumerate(grads):
            if grad is None:
                continue
            grad = grad.to(work_dtype(grad.dtype)).mul_(weight)
            self.sums[i] = grad if self.sums[i] is None else self.sums[i].add_(grad)
        return value.detach()

    def gradients(self) -> list[torch.Tensor | None]:
        """The accumulated gradients (``None`` for a tensor the loss never reached), averaged over
        ranks under data parallelism."""
        if data_parallel():
            for i, grad in enumerate(self.sums):
                grad = (
                    torch.zeros_like(self.exact[i], dtype=work_dtype(self.exact[i].dtype))
                    if grad is None
                    else grad
                )
                dist.all_reduce(grad, op=dist.ReduceOp.AVG)
                self.sums[i] = grad
        return self.sums


def exact_update_(p: torch.Tensor, grad: torch.Tensor | None, lr: float, decay: float) -> None:
    """SGD with decoupled weight decay, ``p <- p (1 - lr λ) - lr g``, in at least fp32."""
    if lr == 0 or (grad is None and decay == 0):
        return
    work = p.data.to(work_dtype(p.dtype))
    if decay:
        work.mul_(1.0 - lr * decay)
    if grad is not None:
        work.add_(grad, alpha=-lr)
    p.data.copy_(work)
