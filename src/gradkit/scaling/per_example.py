"""Exact per-example gradient norms of ``nn.Linear`` layers from hooks, for the noise scale at ``b = 1``.

For a Linear layer ``y_t = W x_t + c`` applied to the tokens ``t`` of example ``n`` (a plain batch
is one token per example), the example's gradient is ``∂ℓ_n/∂W = Σ_t δ_t x_tᵀ`` with ``δ_t = ∂ℓ/∂y_t``
— a sum over tokens, never a per-token quantity (computing norms per token, or over the wrong axis, is
a common bug in published monitors). Its squared Frobenius norm without forming it (the Gram trick of
Goodfellow 2015, "Efficient per-example gradient computations", extended to sequences)::

    ||Σ_t δ_t x_tᵀ||²  =  Σ_{t,t'} (δ_t·δ_t')(x_t·x_t')  =  sum(Δ Δᵀ ∘ X Xᵀ)

costs ``O(T²·(in + out))`` per example; when ``T·(in + out) > in·out`` forming the ``out × in``
per-example gradient (``O(T·in·out)``) is cheaper and is used instead. The bias adds ``||Σ_t δ_t||²``.

A Linear called ``k`` times in one forward pass (a reused block), or several Linear modules sharing one
weight, give example ``n`` the gradient ``Σ_c Σ_t δ^{(c)}_t x^{(c)ᵀ}_t``: the calls' tokens are one
longer sequence. The recorder keeps each call's input and output gradient until the output gradients of
all calls of that forward pass have arrived (backward reaches them in reverse call order), concatenates
them along the token axis (sequence lengths may differ) and applies the formula once, so the cross
terms between calls are included and the norms stay exact. Calls whose output never reaches the loss
add nothing (their gradient is zero); they are closed at :meth:`PerExampleRecorder.step`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import is_dtensor, local, replicas, reshard
from gradkit.scaling.collectives import all_reduce_floats, sq_norm, world_size
from gradkit.scaling.sink import NoiseScaleSink

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


def _measurable_linears(
    model: nn.Module, modules: Iterable[nn.Module] | None, names: dict[int, str]
) -> tuple[list[nn.Linear], dict[int, str]]:
    """The trainable Linears to measure (``modules``, or all of ``model``'s) and their names by id.

    A parameter also held by a module that is not a measured Linear (an Embedding tied to the output
    layer) has gradient parts the hooks never see, so its norm cannot be exact: such a Linear is refused
    when passed in ``modules`` and left out with a warning when found by the default search."""
    candidates = list(modules) if modules is not None else list(model.modules())
    linears: list[nn.Linear] = []
    for m in candidates:
        if isinstance(m, nn.Linear) and m.weight.requires_grad and m not in linears:
            linears.append(m)
    known = {id(m): names.get(id(m), type(m).__name__) for m in linears}
    measured = {id(m) for m in linears}
    foreign = {
        id(p)
        for m in model.modules()
        if id(m) not in measured
        for p in m._parameters.values()
        if p is not None
    }
    tied = [m for m in linears if any(id(p) in foreign for p in (m.weight, m.bias) if p is not None)]
    if tied:
        listed = ", ".join(repr(known[id(m)]) for m in tied)
        if modules is not None:
            raise GradkitError(
                f"Linear {listed} shares its weight with a module that is not a measured Linear (e.g. a "
                "tied embedding): its per-example gradient has parts these hooks never see; pass "
                "modules= without it"
            )
        warnings.warn(
            f"per-example noise scale: Linear {listed} shares its weight with a module that is not a "
            "measured Linear (e.g. a tied embedding); left out of both norms",
            stacklevel=4,
        )
        linears = [m for m in linears if m not in tied]
    if not linears:
        raise GradkitError("no trainable nn.Linear layer to measure; use accumulation_hooks for other models")
    return linears, known


def _weight_sharing_groups(linears: list[nn.Linear]) -> list[int]:
    """For each Linear, its group: Linears connected by a shared parameter are measured together (their
    calls' tokens are one sequence for the shared weight). Union-find over the Linear indices."""
    parent = list(range(len(linears)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    first_owner: dict[int, int] = {}  # id(parameter) -> the first Linear holding it
    for j, m in enumerate(linears):
        for p in (m.weight, m.bias):
            if p is None:
                continue
            if id(p) in first_owner:
                parent[find(j)] = find(first_owner[id(p)])
            else:
                first_owner[id(p)] = j
    return [find(j) for j in range(len(linears))]


class PerExampleRecorder:
    """Per-example gradient norms (``b = 1``) of every trainable ``nn.Linear`` versus the batch gradient.

    A forward hook on each Linear keeps a reference to its input (autograd keeps it anyway) and hooks
    the output's gradient; in backward, once the output gradients of every call of that Linear (and of
    every Linear sharing its weight) in the forward pass have arrived, the per-example squared norms of
    their parameters are added to the forward pass's vector. Exact (equal to ``torch.func`` per-sample
    gradients up to float rounding) for Linears called once or several times per forward pass, with
    any sequence lengths, and for Linears sharing parameters with each other. Memory: a Linear called
    ``k`` times keeps its ``k`` inputs and up to ``k − 1`` output gradients until backward reaches its
    first call. A post-accumulate-grad hook on the Linear parameters reads ``|.grad|²`` as soon as
    backward has accumulated it, so gradient clipping or an optimiser step afterwards does not matter
    (this is what a Hugging Face Trainer callback needs). Each forward pass of the model is one
    micro-batch; several before :meth:`step` are accumulation.

    Only the called Linear layers' parameters are measured (both norms on the same parameters, so the noise
    scale is that of the Linear weights, usually nearly all of a transformer). Not measurable exactly,
    hence refused: a Linear whose weight or bias is also held by another kind of module (an
    ``nn.Embedding`` tied to an output layer): passed in ``modules`` it raises :class:`GradkitError`;
    found by the default search it is left out with a warning. A Linear whose weight is used without
    calling the module (``F.linear(x, lin.weight)``, MultiheadAttention's ``out_proj``) is left out of
    both norms; if it is also called, the functional use is not seen, so keep such modules out of
    ``modules``. Every call must be batch-first with the same batch size. Conventions as for
    :class:`gradkit.scaling.accumulation.GradNormRecorder`: after the step's backward passes ``.grad``
    is ``grad_scale`` times the mean gradient over the step's examples, so an example's gradient is
    ``B_local/grad_scale`` times what its output gradients hold. Under DDP each rank's estimates (at
    ``b = 1`` and ``B = local batch``) are averaged with one all-reduce of three numbers.

    Under FSDP2 (``fully_shard``) the per-example norms are local as above (the layer inputs and output
    gradients are the rank's own), while ``.grad`` is the rank's shard of the gradient averaged over
    all ranks (FSDP2 runs the post-accumulate-grad hooks of the sharded parameters after its
    reduce-scatter). So ``B`` is all ranks' examples: ``|G_B|² = Σ_ranks Σ_p |local shard of p.grad|²``
    and ``|G_1|²`` the mean over ranks of their per-example means, in one all-reduce of four numbers.
    """

    def __init__(
        self,
        gns: NoiseScaleSink,
        model: nn.Module,
        *,
        modules: Iterable[nn.Module] | None = None,
        grad_scale: float = 1.0,
        distributed: bool | None = None,
    ) -> None:
        if not grad_scale > 0:
            raise GradkitError(f"grad_scale must be > 0, got {grad_scale}")
        self.gns, self.grad_scale, self.distributed = gns, float(grad_scale), distributed
        # FSDP2 keeps the root's unsharded parameters registered after a forward: find the sharded ones
        reshard(model)
        names = {id(m): n or "<model>" for n, m in model.named_modules(remove_duplicate=False)}
        self.linears, self._names = _measurable_linears(model, modules, names)
        self._group = _weight_sharing_groups(self.linears)  # Linear index -> group
        self.params, self._owner = [], []  # distinct trainable parameters, the group of each
        seen_params: set[int] = set()
        for j, m in enumerate(self.linears):
            for p in (m.weight, m.bias):
                if p is not None and p.requires_grad and id(p) not in seen_params:
                    seen_params.add(id(p))
                    self.params.append(p)
                    self._owner.append(self._group[j])
        # groups whose per-example norms were measured this step: the batch norm covers exactly
        # these (a Linear whose weight is used without calling it, e.g. MultiheadAttention's
        # out_proj, is left out of both)
        self._seen: set[int] = set()
        self._sums: list[torch.Tensor | None] = []  # one per-example vector per forward pass
        # (forward pass, group) -> the calls of this pass: inputs, modules, output gradients received
        self._open: dict[tuple[int, int], dict] = {}
        self._grad_sq: dict[int, torch.Tensor] = {}  # latest |.grad|^2 per parameter
        # FSDP2: .grad is this rank's shard of the mean over ranks (FSDP2 runs the post-accumulate-grad
        # hooks of the sharded parameters after each reduce-scatter)
        self.sharded = any(is_dtensor(p) for p in self.params)
        if self.sharded and distributed is False:
            raise GradkitError(
                "distributed=False, but the model is sharded by fully_shard: FSDP2's gradients are "
                "reduced over the ranks; leave distributed as None (or True)"
            )
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
        slot, j = len(self._sums) - 1, self._index[id(module)]
        key = (slot, self._group[j])
        entry = self._open.setdefault(key, {"x": [], "modules": [], "dy": {}})
        call = len(entry["x"])
        entry["x"].append(inputs[0].detach())
        entry["modules"].append(module)

        def on_grad(dy: torch.Tensor) -> None:
            current = self._open.get(key)
            if current is not entry:
                raise GradkitError(
                    f"Linear {self._names[id(module)]!r}: a second backward through the same forward "
                    "pass; per-example hooks need one backward per forward"
                )
            entry["dy"][call] = dy.detach()
            if len(entry["dy"]) == len(entry["x"]):  # all calls of this pass are in: exact from here
                self._close(key)

        output.register_hook(on_grad)

    def _close(self, key: tuple[int, int]) -> None:
        """Per-example squared norms of one group's parameters over all its calls in one forward pass."""
        entry = self._open.pop(key)
        slot, group = key
        calls = sorted(entry["dy"])  # calls whose output never reached the loss have zero gradient
        if not calls:
            return
        xs, dys, mods = [entry["x"][c] for c in calls], [entry["dy"][c] for c in calls], entry["modules"]
        batch = {x.shape[0] if x.dim() >= 2 else None for x in xs}
        if len(batch) != 1 or None in batch:
            listed = ", ".join(sorted({repr(self._names[id(mods[c])]) for c in calls}))
            raise GradkitError(
                f"Linear {listed} was called with inputs {[tuple(x.shape) for x in xs]} in one forward pass: "
                "per-example norms need every call batch-first with the same batch size; pass modules= "
                "without it (or use accumulation_hooks)"
            )
        n = batch.pop()

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, -1, t.shape[-1])

        sq = None
        by_weight: dict[int, list[int]] = {}
        by_bias: dict[int, list[int]] = {}
        for i, c in enumerate(calls):
            m = mods[c]
            by_weight.setdefault(id(m.weight), []).append(i)
            if m.bias is not None and m.bias.requires_grad:
                by_bias.setdefault(id(m.bias), []).append(i)
        for idx in by_weight.values():
            if len(idx) == 1:
                x, dy = xs[idx[0]], dys[idx[0]]
            else:  # the calls' tokens as one sequence per example: the cross terms are kept
                x = torch.cat([tokens(xs[i]) for i in idx], 1)
                dy = torch.cat([tokens(dys[i]) for i in idx], 1)
            part = linear_per_example_sq_norms(x, dy)
            sq = part if sq is None else sq + part
        for idx in by_bias.values():
            dtype = torch.float64 if dys[idx[0]].dtype == torch.float64 else torch.float32
            total = sum(tokens(dys[i]).to(dtype).sum(1) for i in idx)
            sq = sq + total.pow(2).sum(-1)
        prev = self._sums[slot]
        if prev is not None and prev.shape != sq.shape:
            raise GradkitError(
                f"a Linear layer saw batch size {sq.shape[0]} and another {prev.shape[0]} in the same "
                "forward pass; per-example hooks need batch-first inputs"
            )
        self._sums[slot] = sq if prev is None else prev + sq
        self._seen.add(group)

    def _make_grad_hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            # a shard's |.|^2 over the ranks holding it: summed over all ranks, each element counts once
            sq = sq_norm(local(p.grad))
            self._grad_sq[i] = sq / replicas(p) if self.sharded else sq

        return hook

    def step(self) -> float | None:
        """Update the noise scale (``gns.update``) from this step's backward passes and reset. Returns B_simple."""
        for key in list(self._open):  # calls whose output gradient never came contribute zero
            self._close(key)
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
        world = world_size(True if self.sharded else self.distributed)
        if self.sharded:
            # FSDP2: |G_B|^2 of the reduced gradient (B = all ranks' examples) is the sum of the ranks'
            # shard norms; the per-example norms are averaged over the ranks
            small_sum, big, count, b_all = all_reduce_floats(
                [per_example.mean(), big.to(per_example.device), 1.0, float(b_local)],
                world,
                per_example.device,
            )
            return self.gns.update(small_sum / count, big, 1, b_all)
        small_sum, big_sum, count = all_reduce_floats(
            [per_example.mean(), big.to(per_example.device), 1.0], world, per_example.device
        )
        return self.gns.update(small_sum / count, big_sum / count, 1, b_local)

    def remove(self) -> None:
        """Take every hook off."""
        self._open.clear()
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> PerExampleRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
