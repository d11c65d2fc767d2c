"""The gradient-norm recorder of the noise scale: squared norms of micro-batch (and, under DDP or FSDP2,
per-rank) gradients against the accumulated batch gradient, fed to a :class:`NoiseScaleSink`.

Where the two batch sizes come from (all cheap):

- micro-batches inside gradient accumulation (``b`` = a micro-batch, ``B`` = the accumulated batch)
  and, under DDP, each rank's local gradient versus the all-reduced one; the only extra communication
  is one 3-number all-reduce per optimiser step.
- the same under FSDP2 (``fully_shard``): a rank's local gradient exists only on FSDP2's unsharded
  parameters, between the backward that computes it and the reduce-scatter that leaves each rank a
  shard of the mean. Tensor hooks on those unsharded parameters read ``|g_local|²`` (summed over the
  parameters, one at a time, no copy), and ``|G_B|² = Σ_ranks Σ_p |shard_p|²`` (the mean gradient's
  squared norm from the ranks' shards) joins the same all-reduce, now of 4 numbers. ``b`` = a rank's
  micro-batch, ``B`` = all ranks' examples of the step, exactly as under DDP.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import (
    fsdp_modules,
    fsdp_param_records,
    is_dtensor,
    is_sharded,
    local,
    replicas,
    reshard,
    unsharded_param,
)
from gradkit.scaling.collectives import all_reduce_floats, sq_norm, world_size
from gradkit.scaling.sink import NoiseScaleSink

__all__ = ["GradNormRecorder"]


def _trainable(model: nn.Module, *, reshard_fsdp: bool = False) -> list[torch.Tensor]:
    if reshard_fsdp:
        # after a forward FSDP2 keeps the root's unsharded parameters registered until its backward:
        # reshard so that the sharded parameters (the ones FSDP2 writes .grad to) are the ones found
        reshard(model)
    seen, out = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _sq_norm_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i |t_i|² as one device scalar: one fused ``torch._foreach_norm`` per dtype (norms in float32 at
    least, as :func:`sq_norm`; float64 stays float64), their squares summed in float64."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    total: torch.Tensor | None = None
    for dtype, group in groups.items():
        wide = torch.float64 if dtype == torch.float64 else torch.float32
        norms = torch._foreach_norm(group, 2, dtype=None if dtype == wide else wide)
        part = torch.stack(norms).double().square().sum()
        total = part if total is None else total + part.to(total.device)
    if total is None:
        raise GradkitError("no gradient to measure")
    return total


def _any_dtensor(params: Iterable[torch.Tensor]) -> bool:
    return any(is_dtensor(p) for p in params)


class _UnshardedGradHooks:
    """FSDP2 source of each rank's local gradient: a tensor hook on every trainable parameter's
    *unsharded* copy (the tensor the forward uses; autograd computes this rank's local gradient on it,
    and FSDP2 reduce-scatters its ``.grad`` afterwards). The hook sees what each backward adds, before
    it is accumulated and before any reduction, as the per-parameter hooks do under DDP, and keeps only
    its squared norm. FSDP2 builds an unsharded parameter at its module's first all-gather and reuses
    the same object afterwards, so the hooks are added after each FSDP module's forward (a set lookup
    once they are all in) and survive resharding.
    """

    def __init__(self, model: nn.Module, params: list[torch.Tensor], hook: Callable[[torch.Tensor], None]):
        records = fsdp_param_records(model)
        outside = [i for i, p in enumerate(params) if id(p) not in records]
        if outside:
            names = {id(p): n for n, p in model.named_parameters()}
            listed = ", ".join(repr(names.get(id(params[i]), "?")) for i in outside[:5])
            raise GradkitError(
                f"trainable parameters {listed} are not managed by fully_shard (plain, or DTensors of another "
                "parallelism): under FSDP2 the noise-scale recorder needs every trainable parameter in a "
                "fully_shard module (call fully_shard on the root last), or measure on a DDP run"
            )
        self.params, self.hook = params, hook
        self.records = [records[id(p)] for p in params]
        for p, record in zip(params, self.records, strict=True):
            if getattr(record, "_unsharded_dtensor_spec", None) is not None or not is_sharded(p):
                raise GradkitError(
                    "the noise-scale recorder supports fully_shard over a data-parallel mesh (FSDP or HSDP); "
                    "a parameter that stays a DTensor when unsharded (tensor parallelism) holds only part of "
                    "the local gradient"
                )
        meshes = {p.device_mesh.size() for p in params}  # type: ignore[attr-defined]
        if meshes != {dist.get_world_size()}:
            raise GradkitError(
                f"the FSDP2 meshes span {sorted(meshes)} ranks of {dist.get_world_size()}: the noise-scale "
                "recorder reduces over the default process group and needs fully_shard over all ranks"
            )
        self.replicas = [replicas(p) for p in params]
        self._hooked: list[tuple[torch.Tensor, Any] | None] = [None] * len(params)
        self._pending = True
        self._forward_handles = [m.register_forward_hook(self._on_forward) for m in fsdp_modules(model)]
        self.add_hooks()

    def _on_forward(self, module: nn.Module, args: object, output: object) -> None:
        if self._pending:
            self.add_hooks()

    def add_hooks(self) -> None:
        """Hook every unsharded parameter that exists and is not hooked yet (or was replaced)."""
        pending = False
        for i, record in enumerate(self.records):
            unsharded = unsharded_param(record)
            if unsharded is None:
                pending = True
                continue
            current = self._hooked[i]
            if current is not None and current[0] is unsharded:
                continue
            if current is not None:
                current[1].remove()
            self._hooked[i] = (unsharded, unsharded.register_hook(self.hook))
        self._pending = pending

    def shard_sq_norm(self) -> torch.Tensor:
        """``Σ_p |local shard of p.grad|² / replicas(p)`` on this rank; summed over the ranks it is
        ``|G_B|²``, the squared norm of the reduced (mean) gradient."""
        by_replicas: dict[int, list[torch.Tensor]] = {}
        for p, r in zip(self.params, self.replicas, strict=True):
            if p.grad is not None:
                by_replicas.setdefault(r, []).append(local(p.grad))
        total = None
        for r, group in by_replicas.items():
            part = _sq_norm_sum(group) / r
            total = part if total is None else total + part
        if total is None:
            raise GradkitError("no gradient to measure: step() after backward() and before zero_grad()")
        return total

    def remove(self) -> None:
        for h in self._forward_handles:
            h.remove()
        self._forward_handles = []
        for hooked in self._hooked:
            if hooked is not None:
                hooked[1].remove()
        self._hooked = [None] * len(self.params)
        self._pending = False


class GradNormRecorder:
    """Measure micro-batch gradients inside gradient accumulation and, under DDP, local vs global.

    The squared norm of what each micro-batch's backward adds to the gradients, ``|Δ_i|²``, is read
    with no per-parameter Python work. The usual loop::

        rec = gns.accumulation_hooks(model)
        for micro in micro_batches:                 # k micro-batches of the step
            (loss_fn(model, micro) / k).backward()  # grads zeroed before the first one
            rec.micro_step(batch_size=len(micro))
        rec.step()                                  # before clipping: reads the accumulated .grad
        optimizer.step(); optimizer.zero_grad()

    Two ways to read ``|Δ_i|²``, with the same result (to float32 rounding):

    - **fused** (the default in a single process): ``micro_step`` reads the accumulated ``.grad`` of
      every parameter at once. With ``a_i`` the accumulated gradient after micro-batch ``i`` (``a_0 = 0``:
      grads zeroed or ``None`` before the first), ``Δ_i = a_i − a_{i−1}``; a copy of ``a_{i−1}`` is
      kept, and three multi-tensor kernels per micro-batch form ``a_{i−1} − a_i`` in that copy, take
      its norms (``torch._foreach_norm``) and copy ``a_i`` in. Costs the memory of one gradient.
    - **hooks** (``fused=False``, and always under DDP): a tensor hook on every trainable parameter
      sees the gradient each backward adds, before it is accumulated into ``.grad`` (and before DDP
      all-reduces it, which is why DDP needs it: after a synced backward ``.grad`` holds the mean over
      ranks), and adds its squared norm to a running device scalar. No extra memory; a hook call and a
      reduction per parameter and micro-batch.

    Conventions: after the last backward, ``.grad`` is ``grad_scale`` times the mean gradient of the
    whole batch (``grad_scale=1`` for ``loss / k`` with equal micro-batches, or ``loss·b_i/B``; pass
    ``k`` if you do not divide, or the AMP loss scale). A micro-batch of size ``b_i`` then contributed
    ``grad_scale·(b_i/B)·G_{b_i}``, which :meth:`step` rescales. Small sizes are combined with their
    harmonic mean, which keeps the estimators unbiased.

    Under DDP (``torch.distributed`` initialised, or ``distributed=True``) ``.grad`` after the synced
    backward is the mean over ranks, so ``B = world × local batch``; the small-batch norms of every
    rank are averaged with one all-reduce of three numbers. One micro-batch per step is then enough.

    Under FSDP2 (``fully_shard``; the trainable parameters are sharded DTensors) autograd computes a
    rank's local gradient on FSDP2's *unsharded* parameters and FSDP2 then reduce-scatters it, leaving
    ``.grad`` = this rank's shard of the mean. The hooks therefore sit on the unsharded parameters
    (added after each FSDP module's forward, as FSDP2 creates them at its first all-gather and keeps
    them), where they see ``Δ_i`` before any reduction, with FSDP2's gradient sync on or off
    (``set_requires_gradient_sync(False)`` for all but the last micro-batch is fine). :meth:`step`
    computes ``|G_B|² = Σ_ranks Σ_p |local shard of p.grad|²`` (divided by the replica count of a
    shard under HSDP) in the same all-reduce as the small norms. Every trainable parameter must be
    managed by ``fully_shard`` over all ranks; FSDP2's default gradient averaging is assumed (or pass
    ``grad_scale``). No gradient is gathered or copied: the extra cost is one norm per parameter and
    micro-batch and one 4-number all-reduce per step.
    Use it as a context manager (or call :meth:`remove`) to take the hooks off (and free the copy).
    """

    def __init__(
        self,
        gns: NoiseScaleSink,
        model: nn.Module,
        *,
        grad_scale: float = 1.0,
        distributed: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        if not grad_scale > 0:
            raise GradkitError(f"grad_scale must be > 0, got {grad_scale}")
        self.gns, self.grad_scale, self.distributed = gns, float(grad_scale), distributed
        self.params = _trainable(model, reshard_fsdp=True)
        if not self.params:
            raise GradkitError("the model has no trainable parameters to measure; set requires_grad first")
        # FSDP2: the local gradient lives on the unsharded parameters, .grad holds a shard of the mean
        self._fsdp = None
        if _any_dtensor(self.params):
            if distributed is False:
                raise GradkitError(
                    "distributed=False, but the model is sharded by fully_shard: FSDP2's gradients are "
                    "reduced over the ranks; leave distributed as None (or True)"
                )
            world_size(True)  # FSDP2 needs an initialised process group; say so if there is none
            self._fsdp = _UnshardedGradHooks(model, self.params, self._hook)
        parallel = world_size(distributed) > 1
        if fused and (parallel or self._fsdp is not None):
            raise GradkitError(
                "fused=True reads the accumulated .grad, which DDP's synced backward replaces with the mean "
                "over ranks (and FSDP2 with its shard of the mean); there use the hooks (fused=False or None)"
            )
        self.fused = not parallel and self._fsdp is None if fused is None else bool(fused)
        self._running: torch.Tensor | None = None  # squared norm added since the last micro_step
        self._micro: list[tuple[torch.Tensor, int]] = []  # (squared norm of the increment, batch size)
        # fused: a_{i-1} per parameter (kept between steps, valid from the step's first micro_step on)
        self._previous: list[torch.Tensor | None] = [None] * len(self.params)
        self._valid = [False] * len(self.params)
        self._seen: list[tuple[Any, int] | None] = []  # per parameter: (weakref(.grad), its version)
        self._snapshot()
        if self.fused or self._fsdp is not None:
            self._handles = []
        else:
            self._handles = [p.register_hook(self._hook) for p in self.params]

    def _hook(self, grad: torch.Tensor) -> None:
        sq = sq_norm(grad)
        self._running = sq if self._running is None else self._running + sq.to(self._running.device)

    def _changed(self) -> bool:
        """Whether any ``.grad`` was replaced or written since the last snapshot (a backward ran)."""
        for p, seen in zip(self.params, self._seen, strict=True):
            g = p.grad
            if g is None:
                if seen is not None:
                    return True
            elif seen is None or seen[0]() is not g or seen[1] != g._version:
                return True
        return False

    def _snapshot(self) -> None:
        self._seen = [None if p.grad is None else (weakref.ref(p.grad), p.grad._version) for p in self.params]

    def _read_increment(self) -> torch.Tensor | None:
        """fused: ``|a_i − a_{i−1}|²`` summed over parameters, and ``a_i`` kept for the next one."""
        fresh, fresh_i, subtract, into, copy_into, copy_from = [], [], [], [], [], []
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            prev = self._previous[i]
            if prev is None or prev.shape != g.shape or prev.dtype != g.dtype or prev.device != g.device:
                fresh.append(g)
                fresh_i.append(i)
                continue
            if self._valid[i]:
                into.append(prev)
                subtract.append(g)
            else:  # first micro-batch of the step for this parameter: Δ = a_i
                fresh.append(g)
            copy_into.append(prev)
            copy_from.append(g)
        if not subtract and not fresh:
            return None
        if subtract:
            torch._foreach_sub_(into, subtract)  # a_{i-1} - a_i = -Δ_i: the same norm
        total = _sq_norm_sum(into + fresh)
        if copy_into:
            torch._foreach_copy_(copy_into, copy_from)
        for i in fresh_i:
            self._previous[i] = self.params[i].grad.detach().clone()
        for i, p in enumerate(self.params):
            if p.grad is not None:
                self._valid[i] = True
        return total

    def micro_step(self, batch_size: int) -> None:
        """Mark the end of one micro-batch's backward pass (``batch_size`` examples on this rank)."""
        if not batch_size > 0:
            raise GradkitError(f"micro_step batch_size must be > 0, got {batch_size}")
        if self.fused and self._changed():
            with torch.no_grad():
                self._running = self._read_increment()
            self._snapshot()
        if self._running is None:
            raise GradkitError("micro_step() found no gradient since the last call; call it after backward()")
        self._micro.append((self._running, int(batch_size)))
        self._running = None

    def step(self) -> float | None:
        """Read the accumulated ``.grad``, update the noise scale (``gns.update``), forget the micro-batches.

        Call it after the last backward of the step and before clipping or ``zero_grad``. Returns
        ``B_simple`` (None while not yet measurable).
        """
        if self._running is not None or (self.fused and self._changed()):
            raise GradkitError(
                "a backward pass was not closed with micro_step(batch_size); call it before step()"
            )
        if not self._micro:
            raise GradkitError(
                "step() found no micro-batches; call micro_step(batch_size) after each backward"
            )
        micro, self._micro = self._micro, []
        self._valid = [False] * len(self.params)  # the next step starts from zeroed gradients
        world = world_size(self.distributed)
        if self.fused and world > 1:
            raise GradkitError(
                "the fused accumulation source reads .grad, which DDP all-reduces; this recorder was built "
                "before torch.distributed was initialised: build it after init_process_group, or pass fused=False"
            )
        if len(micro) < 2 and world < 2:
            raise GradkitError(
                "one micro-batch gives one batch size only; accumulate over >= 2 micro-batches "
                "(or run under DDP) to measure the noise scale"
            )
        b_local = sum(b for _, b in micro)
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            raise GradkitError("step() found no .grad on the trainable parameters; call it before zero_grad")
        device = local(grads[0]).device
        # increment of micro-batch i is grad_scale·(b_i/B_local)·G_{b_i}
        small_sum = sum(sq.to(device) * (b_local / (b * self.grad_scale)) ** 2 for sq, b in micro)
        inv_b = sum(1.0 / b for _, b in micro)
        if self._fsdp is None:
            big = _sq_norm_sum(grads) / self.grad_scale**2  # DDP: .grad is already the mean over ranks
            small_sum, inv_b, count = all_reduce_floats([small_sum, inv_b, float(len(micro))], world, device)
        else:
            # FSDP2: each rank holds a shard of the mean gradient; |G_B|^2 = sum over ranks of
            # |shard|^2 (divided by the replicas of a shard under HSDP), in the same all-reduce
            part = self._fsdp.shard_sq_norm() / self.grad_scale**2
            small_sum, inv_b, count, big = all_reduce_floats(
                [small_sum, inv_b, float(len(micro)), part], world, device
            )
        b_small = count / inv_b  # harmonic mean: E[mean |G_b_i|^2] = |G|^2 + tr(Sigma)·mean(1/b_i)
        return self.gns.update(small_sum / count, big, b_small, b_local * world)

    def remove(self) -> None:
        """Take the hooks off the parameters and free the fused path's copy of the gradients."""
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._fsdp is not None:
            self._fsdp.remove()
        self._previous = [None] * len(self.params)
        self._valid = [False] * len(self.params)

    def __enter__(self) -> GradNormRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
