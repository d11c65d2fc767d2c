"""Exact per-example gradient norms of ``nn.Linear`` layers from hooks, for the noise scale at ``b = 1``.

For a Linear layer ``y_t = W x_t + c`` applied to the tokens ``t`` of example ``n`` (a plain batch
is one token per example), the example's gradient is ``∂ℓ_n/∂W = Σ_t δ_t x_tᵀ`` with ``δ_t = ∂ℓ/∂y_t``
— a sum over tokens, never a per-token quantity (computing norms per token, or over the wrong axis, is
a common bug in published monitors). Its squared Frobenius norm without forming it (the Gram trick of
Goodfellow 2015, "Efficient per-example gradient computations", extended to sequences)::

    ||Σ_t δ_t x_tᵀ||²  =  Σ_{t,t'} (δ_t·δ_t')(x_t·x_t')  =  sum(Δ Δᵀ ∘ X Xᵀ)

costs ``O(T²·(in + out))`` per example; when ``T·(in + out) > in·out`` forming the ``out × in``
per-example gradient (``O(T·in·out)``) is cheaper and is used instead. The bias adds ``||Σ_t δ_t||²``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.scaling.noise_scale import NoiseScale, _all_reduce_sum, _sq_norm, _world

__all__ = ["PerExampleRecorder", "linear_per_example_sq_norms"]


def linear_per_example_sq_norms(x: torch.Tensor, dy: torch.Tensor, *, bias: bool = False) -> torch.Tensor:
    """Squared norms of per-example gradients of a Linear layer's weight (and bias): a vector of length N.

    ``x``: the layer input, ``(N, in)`` or ``(N, *, in)``; ``dy``: the gradient of the loss w.r.t. the
    layer output, ``(N, out)`` or ``(N, *, out)`` (batch first; every middle axis counts as tokens).
    Computed in float32 (float64 inputs stay float64).
    """
    if x.shape[:-1] != dy.shape[:-1] or x.dim() < 2:
        raise GradkitError(
            f"Linear input {tuple(x.shape)} and output gradient {tuple(dy.shape)} must share their leading "
            "(batch, tokens) axes; the per-example hooks need batch-first layers"
        )
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    n = x.shape[0]
    x = x.reshape(n, -1, x.shape[-1]).to(dtype)
    dy = dy.reshape(n, -1, dy.shape[-1]).to(dtype)
    t, d_in, d_out = x.shape[1], x.shape[2], dy.shape[2]
    if t == 1:
        out = x[:, 0].pow(2).sum(-1) * dy[:, 0].pow(2).sum(-1)
    elif t * (d_in + d_out) <= d_in * d_out:
        # token Gram matrices: sum_{t,t'} (dy_t . dy_t')(x_t . x_t')
        out = (torch.bmm(dy, dy.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
    else:
        out = torch.bmm(dy.transpose(1, 2), x).pow(2).sum((1, 2))  # the per-example gradients themselves
    if bias:
        out = out + dy.sum(1).pow(2).sum(-1)
    return out


class PerExampleRecorder:
    """Per-example gradient norms (``b = 1``) of every trainable ``nn.Linear`` versus the batch gradient.

    A forward hook on each Linear keeps a reference to its input (autograd keeps it anyway) and hooks
    the output's gradient; in backward the per-example squared norms of that layer are added to the
    current forward pass's vector. A post-accumulate-grad hook on the Linear parameters reads
    ``|.grad|²`` as soon as backward has accumulated it, so gradient clipping or an optimiser step
    afterwards does not matter (this is what a Hugging Face Trainer callback needs). Each forward
    pass of the model is one micro-batch; several before :meth:`step` are accumulation.

    Only the called Linear layers' parameters are measured (both norms on the same parameters, so the noise
    scale is that of the Linear weights, usually nearly all of a transformer). Conventions as for
    :class:`gradkit.scaling.noise_scale.GradNormRecorder`: after the step's backward passes ``.grad``
    is ``grad_scale`` times the mean gradient over the step's examples, so an example's gradient is
    ``B_local/grad_scale`` times what its output gradients hold. Under DDP each rank's estimates (at
    ``b = 1`` and ``B = local batch``) are averaged with one all-reduce of three numbers.
    """

    def __init__(
        self,
        gns: NoiseScale,
        model: nn.Module,
        *,
        modules: Iterable[nn.Module] | None = None,
        grad_scale: float = 1.0,
        distributed: bool | None = None,
    ) -> None:
        if not grad_scale > 0:
            raise GradkitError(f"grad_scale must be > 0, got {grad_scale}")
        self.gns, self.grad_scale, self.distributed = gns, float(grad_scale), distributed
        candidates = list(modules) if modules is not None else list(model.modules())
        self.linears = [m for m in candidates if isinstance(m, nn.Linear) and m.weight.requires_grad]
        if not self.linears:
            raise GradkitError(
                "no trainable nn.Linear layer to measure; use accumulation_hooks for other models"
            )
        self.params, self._owner = [], []  # parameter, index of its Linear
        for j, m in enumerate(self.linears):
            for p in (m.weight, m.bias):
                if p is not None and p.requires_grad:
                    self.params.append(p)
                    self._owner.append(j)
        # Linears whose per-example norms were measured this step: the batch norm covers exactly
        # these (a Linear whose weight is used without calling it, e.g. MultiheadAttention's
        # out_proj, is left out of both)
        self._seen: set[int] = set()
        self._sums: list[torch.Tensor | None] = []  # one per-example vector per forward pass
        self._grad_sq: dict[int, torch.Tensor] = {}  # latest |.grad|^2 per parameter
        self.last_per_example: torch.Tensor | None = None  # per-example |g_n|^2 of the last step
        self._handles = [model.register_forward_pre_hook(self._new_pass)]
        self._index = {id(m): j for j, m in enumerate(self.linears)}
        self._handles += [m.register_forward_hook(self._forward) for m in self.linears]
        self._handles += [
            p.register_post_accumulate_grad_hook(self._make_grad_hook(i)) for i, p in enumerate(self.params)
        ]

    def _new_pass(self, module: nn.Module, args: object) -> None:
        if torch.is_grad_enabled():
            self._sums.append(None)

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
            return
        if not self._sums:  # the Linear ran outside the model's forward: its own pass
            self._sums.append(None)
        slot, x, j = len(self._sums) - 1, inputs[0].detach(), self._index[id(module)]
        has_bias = module.bias is not None and module.bias.requires_grad

        def on_grad(dy: torch.Tensor) -> None:
            sq = linear_per_example_sq_norms(x, dy.detach(), bias=has_bias)
            prev = self._sums[slot]
            if prev is not None and prev.shape != sq.shape:
                raise GradkitError(
                    f"a Linear layer saw batch size {sq.shape[0]} and another {prev.shape[0]} in the same "
                    "forward pass; per-example hooks need batch-first inputs"
                )
            self._sums[slot] = sq if prev is None else prev + sq
            self._seen.add(j)

        output.register_hook(on_grad)

    def _make_grad_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            self._grad_sq[i] = _sq_norm(p.grad)

        return hook

    def step(self) -> float | None:
        """Update the :class:`NoiseScale` from this step's backward passes and reset. Returns B_simple."""
        sums, self._sums = [s for s in self._sums if s is not None], []
        grad_sq, self._grad_sq = self._grad_sq, {}
        seen, self._seen = self._seen, set()
        grad_sq = {i: v for i, v in grad_sq.items() if self._owner[i] in seen}
        if not sums or not grad_sq:
            raise GradkitError(
                "step() found no backward pass through the Linear layers; call it after backward()"
            )
        per_example = torch.cat(sums)
        b_local = per_example.numel()
        if b_local < 2:
            raise GradkitError("per-example noise scale needs >= 2 examples per step; use a larger batch")
        per_example = per_example * (b_local / self.grad_scale) ** 2
        self.last_per_example = per_example.detach()
        big = torch.stack(list(grad_sq.values())).sum() / self.grad_scale**2
        world = _world(self.distributed)
        small_sum, big_sum, count = _all_reduce_sum(
            [per_example.mean(), big.to(per_example.device), 1.0], world, per_example.device
        )
        return self.gns.update(small_sum / count, big_sum / count, 1, b_local)

    def remove(self) -> None:
        """Take every hook off."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> PerExampleRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
