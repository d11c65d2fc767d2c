"""LoRA-Pro (arXiv 2407.18242): a torch optimiser that makes every LoRA step the closest low-rank
match to full fine-tuning's step, for SGD and AdamW, with memory-light AdamW moments.

The closed form lives in :mod:`gradkit.optim.lora_pro_math` (pure functions); this module only walks
the PEFT model, holds state and applies updates. Forms (``optimizer`` / ``moments``):

- ``"sgd"``: ``A -= lr ĝ_A``, ``B -= lr ĝ_B``; W moves by ``-lr (P_B G + (I - P_B) G P_A)``.
- ``"adamw"``, ``moments="full"`` (the paper's): Adam on the full-size equivalent gradient
  ``g̃ = P_B G + (I - P_B) G P_A`` with out x in moments; its direction D is mapped back
  (``d_A = s B^T D``, ``d_B = s D A^T``) and adjusted by the same formulas, so W moves by
  ``-lr (P_B D + (I - P_B) D P_A)``. State: 2 x out x in fp32 per layer, full fine-tuning's bill.
- ``"adamw"``, ``moments="projected"`` (memory-light, the default): ``g̃`` is exactly
  ``U K + L V^T`` with ``U``, ``V`` orthonormal bases of B's columns and A's rows, ``K = U^T G``
  (r x in) and ``L = (I - U U^T) G V`` (out x r), both computable from ``g_A`` and ``g_B``. The bases
  depend on the subspaces only, never on how ``B A`` is factored, so ``(B, A) -> (BQ, Q^-1 A)`` leaves
  every step unchanged: they start as the singular vectors of ``B A`` (:func:`canonical_bases`, also
  whenever a factor or the previous basis is not of full rank, e.g. after ``B = 0``) and are then
  carried from step to step into the new subspaces (:func:`transported_bases`, orthogonal
  Procrustes), so they move continuously. Adam runs on (K, L), elementwise in those coordinates; the
  moments are carried over by the r x r maps ``U_new^T U_old``, ``V_new^T V_old`` (first moment
  mapped, second by the squared map: exact for sign flips and permutations, an approximation for a
  rotation, which transported bases keep close to the identity). W moves by ``-lr (U D_K + (I - U U^T) D_L V^T)``. It is its
  own optimiser, not an approximation of the full-moment form: Adam's normalisation in r-dimensional
  coordinates differs from the elementwise one on the out x in matrix. State: 3 r (in + out) floats
  per layer (moments plus the two bases), 1.5x LoRA+AdamW's.
- ``"adamw"``, ``moments="factor"`` (memory-light): Adam on the adjusted gradients ``(ĝ_A, ĝ_B)``
  themselves. State: 2 r (in + out) floats per layer, the same as LoRA+AdamW.

Weight decay is decoupled (AdamW's): every step multiplies A and B by ``1 - lr * weight_decay``
before the update, exactly what AdamW on a plain LoRA model does; it shrinks the adapter
``s B A`` (by about ``1 - 2 lr wd``), never the frozen base weight. Other trainable parameters (a
classification head, biases) get an ordinary AdamW update in their own param groups (no decay on
biases and normalisation weights).

FSDP2 (``fully_shard``; parameters and gradients are row-sharded DTensors). What is gathered: each
LoRA layer's factors A, B and their gradients (``r (in + out)`` values, an all-gather each), so every
rank runs the same small algebra (SVDs, Sylvester solve, bases) on the whole factors and writes its
own shard of the update; the ``"projected"`` and ``"factor"`` moments (``O(r (in + out))``) are kept
whole on every rank. What stays sharded: the ``"full"`` form's two out x in moments, of which a rank
keeps only its rows of B (``out / world`` rows; its rows of the equivalent gradient are formed from
the gathered factors, and ``d_A = s B^T D`` is one ``r x in`` all-reduce), and the other trainable
parameters' AdamW moments (elementwise on the local shard). The steps equal the unsharded ones
(tests/fsdp). Call ``step()`` after ``backward()`` on every rank.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import all_reduce_shard_sum, full, gather_rows, is_dtensor, local, local_part, shard_offset
from gradkit.linalg import compute_dtype
from gradkit.lora.pairs import lora_pairs
from gradkit.optim.lora_pro_math import (
    X_SOLUTIONS,
    adjusted_lora_grads,
    canonical_bases,
    equivalent_gradient,
    factor_svds,
    lora_equivalent_update,
    tangent_projection,
    transported_bases,
)

__all__ = [
    "LoRAPro",
    "adjusted_lora_grads",
    "equivalent_gradient",
    "lora_equivalent_update",
    "tangent_projection",
    "canonical_bases",
    "MOMENTS",
    "DEFAULT_MOMENTS",
]

MOMENTS = ("full", "projected", "factor")
DEFAULT_MOMENTS = "projected"
OPTIMIZERS = ("adamw", "sgd")


class LoRAPro(torch.optim.Optimizer):
    """LoRA-Pro optimiser for a PEFT LoRA model (arXiv 2407.18242).

    Finds every LoRA Linear layer's ``(A, B, s)`` of the active adapter (``s`` read from PEFT, so
    rsLoRA and rank/alpha patterns are exact) and replaces the factor gradients by LoRA-Pro's
    adjusted ones, whose equivalent update ``s (B ĝ_A + ĝ_B A)`` is the closest to the full-weight
    gradient ``G``: ``P_B G + (I - P_B) G P_A``. Each layer is one param group
    ``{"params": [A, B], "lora_roles": ["A", "B"], "lora_name": ..., "scaling": s}`` (roles are
    read from ``lora_roles``, never from the order); every other trainable parameter gets AdamW in
    its own groups. ``lr`` lives in ``param_groups`` (schedulers work); clip gradients before
    ``step()`` as usual. Under DDP call ``step()`` after ``backward()``: the adjustment then runs on
    the all-reduced gradients, identically on every rank.

    Args:
        peft_model: a model holding PEFT LoRA Linear layers (``peft.get_peft_model``).
        lr: step size; the update of W is ``-lr`` times an (Adam-normalised) full-size direction,
            so it is on full fine-tuning's learning-rate scale.
        betas, eps, weight_decay: AdamW's (weight decay decoupled, see the module docstring).
        optimizer: ``"adamw"`` or ``"sgd"``.
        moments: ``"projected"`` (memory-light, default), ``"factor"`` (memory-light) or ``"full"``
            (the paper's out x in moments).
        x_solution: ``"sylvester"`` (the paper's), ``"symmetric"`` or ``"zero"``.
        adapter: adapter name (default: the active one).
        rtol: relative rank tolerance of the factors' SVDs (default ``max(m, r) * eps`` of the compute
            dtype, see :mod:`gradkit.linalg`): factor directions below it count as absent.
    """

    def __init__(
        self,
        peft_model: nn.Module,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optimizer: str = "adamw",
        moments: str = DEFAULT_MOMENTS,
        x_solution: str = "sylvester",
        *,
        adapter: str | None = None,
        rtol: float | None = None,
    ):
        _check_choice("optimizer", optimizer, OPTIMIZERS)
        _check_choice("moments", moments, MOMENTS)
        _check_choice("x_solution", x_solution, X_SOLUTIONS)
        if lr < 0 or eps < 0 or weight_decay < 0 or (rtol is not None and rtol < 0):
            raise GradkitError("lr, eps, weight_decay and rtol must be >= 0; pass non-negative values")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise GradkitError(f"betas {tuple(betas)} must lie in [0, 1); pass e.g. betas=(0.9, 0.999)")
        groups: list[dict[str, Any]] = []
        taken: set[int] = set()
        for pair in lora_pairs(peft_model, adapter):
            use_dora = getattr(pair.layer, "use_dora", {}).get(pair.adapter, False)
            if use_dora:
                raise GradkitError(
                    f"{pair.name} uses DoRA, which LoRA-Pro's closed form does not cover; "
                    "build the model with LoraConfig(use_dora=False)"
                )
            if pair.A.requires_grad != pair.B.requires_grad:
                raise GradkitError(
                    f"{pair.name}: only one of lora_A / lora_B is trainable; LoRA-Pro adjusts "
                    "both factors together, so make both trainable (or both frozen)"
                )
            taken.update((id(pair.A), id(pair.B)))
            if pair.A.requires_grad:
                groups.append(
                    {
                        "params": [pair.A, pair.B],
                        "lora_roles": ["A", "B"],
                        "lora_name": pair.name,
                        "scaling": pair.scaling,
                    }
                )
        if not groups:
            raise GradkitError(
                f"the LoRA factors of adapter {adapter or 'active'!r} are all frozen; activate it "
                "with model.set_adapter(name) (PEFT freezes inactive adapters)"
            )
        decay, no_decay = [], []
        for name, param in peft_model.named_parameters():
            if param.requires_grad and id(param) not in taken:
                (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
        if decay:
            groups.append({"params": decay})
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            optimizer=optimizer,
            moments=moments,
            x_solution=x_solution,
            rtol=rtol,
        )
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every group; ``closure`` (optional) re-evaluates the loss with gradients."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        by_kind: dict[tuple, list] = defaultdict(list)
        for group in self.param_groups:
            if not group.get("lora_roles"):
                self._adamw_group(group)
                continue
            roles = dict(zip(group["lora_roles"], group["params"], strict=True))
            A, B = roles["A"], roles["B"]
            if A.grad is None and B.grad is None:
                continue
            key = (
                A.shape,
                B.shape,
                _layout(A),
                _layout(B),
                A.dtype,
                A.device,
                group["optimizer"],
                group["moments"],
                group["x_solution"],
                group.get("rtol"),
            )
            by_kind[key].append((group, A, B))
        buckets = [_Bucket(members) for members in by_kind.values()]
        for bucket in buckets:
            self._moment_inputs(bucket)
        _adam_directions(self, [b for b in buckets if b.optimizer == "adamw"])
        updates: dict[tuple[float, float, torch.dtype], list] = defaultdict(list)
        for bucket in buckets:
            d_A, d_B = self._factor_updates(bucket)
            for i, (group, A, B) in enumerate(bucket.members):
                key = (group["lr"], group["weight_decay"], A.dtype)
                updates[key] += [(A, d_A[i]), (B, d_B[i])]
        for (lr, wd, dtype), items in updates.items():
            # FSDP2: each rank writes its own shard of the (replicated) factor update
            params = [local(p) for p, _ in items]
            if wd:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_add_(params, [local_part(u, p).to(dtype) for p, u in items], alpha=-lr)
        return loss

    # --- LoRA pairs ---------------------------------------------------------------------------

    def _moment_inputs(self, bucket: _Bucket) -> None:
        """Compute what the form feeds to Adam (or, for SGD, the final update), for a whole bucket."""
        sA = [self.state[A] for _, A, _ in bucket.members]
        sB = [self.state[B] for _, _, B in bucket.members]
        for state in sA:
            state["step"] = state.get("step", 0) + 1
        a, b, gA, gB, s, svds = bucket.a, bucket.b, bucket.gA, bucket.gB, bucket.s, bucket.svds
        if bucket.optimizer == "sgd":
            bucket.out = list(adjusted_lora_grads(a, b, gA, gB, s, bucket.x, svds=svds))
        elif bucket.moments == "full":
            # out x in moments, row-sharded like B under FSDP2: only this rank's rows are formed
            bucket.inputs = [(sA, equivalent_gradient(a, b, gA, gB, s, svds=svds, rows=bucket.rows))]
        elif bucket.moments == "factor":
            hat_A, hat_B = adjusted_lora_grads(a, b, gA, gB, s, bucket.x, svds=svds)
            bucket.inputs = [(sA, hat_A), (sB, hat_B)]
        else:
            # orthonormal bases of col(B) and row(A), U = U_B P and V = Z R, independent of how B A is
            # factored: the previous step's carried into the new subspaces, else the singular vectors of B A
            bases = canonical_bases(a, b, svds=svds)
            svd_B, svd_A = svds
            if any("basis" in state for state in sA):  # members on their first step: zeros, not carried
                old = [
                    torch.stack(
                        [st.get("basis", torch.zeros_like(x)) for st, x in zip(states, new, strict=True)]
                    )
                    for states, new in ((sB, bases.U), (sA, bases.Vt))
                ]
                bases = transported_bases(svds, *old, bases)
            U, Vt, P, R = bases
            K = (P.mT @ (svd_B.inv.unsqueeze(-1) * (svd_B.V.mT @ gA))) / s  # U^T G = P^T U_B^T G
            GV = (((gB @ svd_A.V) * svd_A.inv.unsqueeze(-2)) @ R) / s  # G V = G Z R
            L = GV - U @ (U.mT @ GV)  # (I - U U^T) G V
            _carry_moments(sA, sB, U, Vt)
            bucket.inputs = [(sA, K), (sB, L)]
            bucket.U, bucket.Vt = U, Vt

    def _factor_updates(self, bucket: _Bucket) -> list[torch.Tensor]:
        """Map the Adam direction(s) to the factor updates (d_A, d_B), stacked over the bucket."""
        if bucket.optimizer == "sgd" or bucket.moments == "factor":
            return bucket.out
        a, b, s = bucket.a, bucket.b, bucket.s
        if bucket.moments == "full":
            (D,) = bucket.out  # this rank's rows of the Adam direction (all of them without FSDP)
            B0 = bucket.members[0][2]
            d_A = all_reduce_shard_sum(s * (b[:, bucket.rows].mT @ D), B0)  # a sum over rows: over ranks
            d_B = gather_rows(s * (D @ a.mT), B0, dims_offset=1)
        else:
            D_K, D_L = bucket.out
            U, Vt = bucket.U, bucket.Vt
            D_L = D_L - U @ (U.mT @ D_L)  # keep the L part orthogonal to col(B): D is a tangent vector
            d_A = s * ((b.mT @ U) @ D_K + (b.mT @ D_L) @ Vt)
            d_B = s * (U @ (D_K @ a.mT) + D_L @ (Vt @ a.mT))
        return list(adjusted_lora_grads(a, b, d_A, d_B, s, bucket.x, svds=bucket.svds))

    # --- other trainable parameters: plain AdamW --------------------------------------------

    def _adamw_group(self, group: dict[str, Any]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        entries = []
        for p in params:
            if p.grad.is_sparse:
                raise GradkitError("LoRAPro does not support sparse gradients; use dense embeddings")
            state = self.state[p]
            if not state:  # elementwise: under FSDP2 each rank keeps the moments of its own shard
                cd = compute_dtype(p.dtype)
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(local(p), dtype=cd, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(
                    local(p), dtype=cd, memory_format=torch.preserve_format
                )
            state["step"] += 1
            entries.append(
                _AdamEntry(
                    state["exp_avg"],
                    state["exp_avg_sq"],
                    local(p.grad).to(state["exp_avg"].dtype),
                    state["step"],
                    group,
                )
            )
        directions = _adam_update(entries)
        lr, wd = group["lr"], group["weight_decay"]
        shards = [local(p) for p in params]
        if wd:
            torch._foreach_mul_(shards, 1.0 - lr * wd)
        torch._foreach_add_(
            shards, [d.to(p.dtype) for p, d in zip(shards, directions, strict=True)], alpha=-lr
        )

    # --- resume -----------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps every state tensor's own dtype (fp32 moments of bf16 parameters
        stay fp32) and checks the saved form matches this optimiser's."""
        saved_groups = state_dict["param_groups"]
        for saved, group in zip(saved_groups, self.param_groups, strict=False):
            for key in ("optimizer", "moments", "lora_name"):
                if saved.get(key) != group.get(key):
                    raise GradkitError(
                        f"the saved optimiser state has {key}={saved.get(key)!r} but this one has "
                        f"{group.get(key)!r}; build LoRAPro with the same settings to resume"
                    )
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        index = [i for group in saved_groups for i in group["params"]]
        for i, param in zip(index, params, strict=True):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value):
                    self.state[param][key] = value.to(device=param.device, copy=True)


class _Bucket:
    """LoRA pairs with the same shapes, dtype, device and form, stacked so that their algebra runs as
    batched calls (a transformer's layers share a handful of shapes, so a step makes a few dozen
    kernel calls instead of a few dozen per layer)."""

    def __init__(self, members: list[tuple[dict[str, Any], nn.Parameter, nn.Parameter]]):
        self.members = members
        group, A0, _ = members[0]
        self.optimizer, self.moments = group["optimizer"], group["moments"]
        self.x = group["x_solution"]
        cd = compute_dtype(A0.dtype)
        # FSDP2: the factors and their gradients are all-gathered (r (in + out) values each, tiny); every
        # rank then runs the same small algebra on the whole factors and writes its own shard
        self.a = torch.stack([full(A.detach()) for _, A, _ in members]).to(cd)
        self.b = torch.stack([full(B.detach()) for _, _, B in members]).to(cd)
        B0 = members[0][2]
        shape, offset = shard_offset(B0)
        self.rows = slice(offset[0], offset[0] + shape[0])  # B's rows held here: the full moments' rows
        self.gA = torch.stack([_grad(A, cd) for _, A, _ in members])
        self.gB = torch.stack([_grad(B, cd) for _, _, B in members])
        self.s = torch.tensor([g["scaling"] for g, _, _ in members], dtype=cd, device=A0.device).view(
            -1, 1, 1
        )
        self.svds = factor_svds(self.a, self.b, group.get("rtol"))  # two batched thin SVDs
        self.inputs: list[tuple[list[dict], torch.Tensor]] = []  # (per-pair states, stacked values)
        self.out: list[torch.Tensor] = []
        self.U = self.Vt = None


def _grad(param: nn.Parameter, dtype: torch.dtype) -> torch.Tensor:
    if param.grad is None:
        return torch.zeros(param.shape, dtype=dtype, device=param.device)
    if param.grad.is_sparse:
        raise GradkitError("LoRAPro does not support sparse gradients; use dense LoRA layers")
    return full(param.grad).to(dtype)


def _layout(param: nn.Parameter) -> tuple | None:
    """How a parameter is split over ranks (None when it is not a DTensor): pairs are only stacked
    together when every rank holds the same rows of each."""
    if not is_dtensor(param):
        return None
    return (id(param.device_mesh), tuple(param.placements), shard_offset(param))


def _carry_moments(sA: list[dict], sB: list[dict], U: torch.Tensor, Vt: torch.Tensor) -> None:
    """Projected moments live in the bases (U, V) of the previous step; rotate them into the new ones
    (first moment by ``R = U_new^T U_old``, second by ``R * R``, which keeps its total for a pure
    rotation) and store the new bases. Pairs on their first step have nothing to carry."""
    idx = [i for i, state in enumerate(sA) if "basis" in state]
    if idx:
        rot_U = U[idx].mT @ torch.stack([sB[i]["basis"] for i in idx])
        rot_V = Vt[idx] @ torch.stack([sA[i]["basis"] for i in idx]).mT
        for states, key, rotate in (
            (sA, "exp_avg", lambda m: rot_U @ m),
            (sA, "exp_avg_sq", lambda v: (rot_U * rot_U) @ v),
            (sB, "exp_avg", lambda m: m @ rot_V.mT),
            (sB, "exp_avg_sq", lambda v: v @ (rot_V * rot_V).mT),
        ):
            old = [states[i][key] for i in idx]
            torch._foreach_copy_(old, list(rotate(torch.stack(old)).unbind(0)))
    for i in range(len(sA)):
        for state, basis in ((sA[i], Vt[i]), (sB[i], U[i])):
            if "basis" in state:
                state["basis"].copy_(basis)
            else:
                state["basis"] = basis.clone()


def _adam_directions(opt: LoRAPro, buckets: list[_Bucket]) -> None:
    """Adam moments and directions for every bucket's inputs (lazy state), pooled across layers."""
    entries = []
    for bucket in buckets:
        steps = [opt.state[A]["step"] for _, A, _ in bucket.members]
        for states, values in bucket.inputs:
            for i, (state, value) in enumerate(zip(states, values.unbind(0), strict=True)):
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(value)
                    state["exp_avg_sq"] = torch.zeros_like(value)
                group = bucket.members[i][0]
                entries.append(_AdamEntry(state["exp_avg"], state["exp_avg_sq"], value, steps[i], group))
    directions = iter(_adam_update(entries))
    for bucket in buckets:
        bucket.out = [torch.stack([next(directions) for _ in states]) for states, _ in bucket.inputs]


class _AdamEntry(NamedTuple):
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    value: torch.Tensor
    step: int
    group: dict[str, Any]


def _adam_update(entries: list[_AdamEntry]) -> list[torch.Tensor]:
    """Update each entry's ``exp_avg``/``exp_avg_sq`` in place with its value and return Adam's
    direction ``m̂ / (sqrt(v̂) + eps)`` (bias-corrected with the entry's step). Entries sharing
    (step, betas, eps) go through one multi-tensor (``torch._foreach_*``) pass."""
    out: list[torch.Tensor | None] = [None] * len(entries)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, e in enumerate(entries):
        buckets[(e.step, *e.group["betas"], e.group["eps"])].append(i)
    for (step, beta1, beta2, eps), idx in buckets.items():
        ms = [entries[i].exp_avg for i in idx]
        vs = [entries[i].exp_avg_sq for i in idx]
        gs = [entries[i].value for i in idx]
        torch._foreach_lerp_(ms, gs, 1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, value=1.0 - beta2)
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, math.sqrt(1.0 - beta2**step))
        torch._foreach_add_(denom, eps)
        directions = torch._foreach_div(ms, denom)
        torch._foreach_div_(directions, 1.0 - beta1**step)
        for i, d in zip(idx, directions, strict=True):
            out[i] = d
    return out  # type: ignore[return-value]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise GradkitError(f"unknown {name} {value!r} for LoRAPro; use one of: {', '.join(choices)}")
