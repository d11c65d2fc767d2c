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

- :meth:`NoiseScale.accumulation_hooks` — micro-batches inside gradient accumulation (``b`` = a
  micro-batch, ``B`` = the accumulated batch) and, under DDP, each rank's local gradient versus the
  all-reduced one; the only extra communication is one 3-number all-reduce per optimiser step.
- the same under FSDP2 (``fully_shard``): a rank's local gradient exists only on FSDP2's unsharded
  parameters, between the backward that computes it and the reduce-scatter that leaves each rank a
  shard of the mean. Tensor hooks on those unsharded parameters read ``|g_local|²`` (summed over the
  parameters, one at a time, no copy), and ``|G_B|² = Σ_ranks Σ_p |shard_p|²`` (the mean gradient's
  squared norm from the ranks' shards) joins the same all-reduce, now of 4 numbers. ``b`` = a rank's
  micro-batch, ``B`` = all ranks' examples of the step, exactly as under DDP.
- :meth:`NoiseScale.per_example_hooks` — exact per-example gradient norms of ``nn.Linear`` layers
  (``b = 1``), see :mod:`gradkit.scaling.per_example` (also under FSDP2).

:func:`b_noise_hessian` gives the Hessian-aware ``B_noise = tr(HΣ)/(GᵀHG)`` on a held batch, with H and the
gradients from independent halves of it (unbiased).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
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

__all__ = [
    "NoiseScale",
    "GradNormRecorder",
    "HessianNoiseScale",
    "b_noise_hessian",
    "grad_sq_norm_estimate",
    "trace_sigma_estimate",
]

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
    ):
        """Hooks that measure exact per-example gradient norms of the Linear layers (``b = 1``); see
        :class:`gradkit.scaling.per_example.PerExampleRecorder`."""
        from gradkit.scaling.per_example import PerExampleRecorder

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
        import torch.distributed as dist

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
        gns: NoiseScale,
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
        """Read the accumulated ``.grad``, update the :class:`NoiseScale`, forget the micro-batches.

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


# -- Hessian-aware noise scale ---------------------------------------------------------------------
@dataclass
class HessianNoiseScale:
    """Result of :func:`b_noise_hessian` (all quantities for the per-example loss)."""

    b_noise: float | None  # tr(HΣ)/(GᵀHG), None when GᵀHG <= 0 (not at a locally convex point)
    b_simple: float | None  # tr(Σ)/|G|² on the same data
    trace_h_sigma: float
    g_h_g: float
    grad_sq_norm: float
    trace_sigma: float
    eta_max: float | None  # |G|²/(GᵀHG): the optimal SGD step size for a very large batch


def b_noise_hessian(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Sequence[Any],
    batch_size: int,
) -> HessianNoiseScale:
    """Hessian-aware ``B_noise = tr(HΣ)/(GᵀHG)`` on a held batch (McCandlish et al. 2018, eq. 2.6).

    ``batches`` are ``k >= 4`` disjoint chunks of the held data, each of ``batch_size`` examples, and
    ``loss_fn(model, chunk)`` their mean loss. The chunks are split into two halves A and B. With the
    chunk gradients ``g_i`` of one half (``k_Y`` chunks, mean ``ḡ``) and ``Ĥ`` the Hessian of the mean
    loss over the *other* half (Hessian-vector products by double backward; never formed):

    - ``tr(HΣ) ≈ b/(k_Y−1) · Σ_i (g_i − ḡ)ᵀ Ĥ (g_i − ḡ)``     (``Cov(g_i) = Σ/b``)
    - ``GᵀHG ≈ ḡᵀĤḡ − tr(HΣ)/(k_Y·b)``                        (removes the noise in ``ḡ``)

    each averaged over the two assignments (H from A and gradients from B, then the reverse). ``Ĥ`` is
    independent of the gradients it weighs, so ``E[dᵀĤd] = tr(H·E[ddᵀ])`` and both are unbiased. With
    ``Ĥ`` from the same examples (the former estimator) they are not: the curvature of an example
    correlates with its gradient (for cross-entropy, confident mistakes have both large), which biased
    tr(HΣ) upwards by 4% with 8 chunks in issue 12 (127.5 ± 2.2 against an exact 122.6); in the test
    suite's closed-form problem (8 chunks of 1 example, 1,000 draws) it gave 9.58 ± 0.23 for an exact
    tr(HΣ) of 8.00 and 2.68 ± 0.15 for a GᵀHG of 1.86, the halves 8.03 ± 0.25 and 1.78 ± 0.12.
    ``tr(Σ)`` and ``|G|²`` use all ``k`` chunks the same way without ``H``. Cost: ``k`` backward
    passes, two double-backward graphs of ``k/2`` chunks each and ``k + 2`` Hessian-vector products;
    for occasional use.
    """
    k, b = len(batches), int(batch_size)
    if k < 4 or b < 1:
        raise GradkitError(
            f"b_noise_hessian needs >= 4 chunks of >= 1 example (two independent halves of >= 2 chunks), "
            f"got {k} chunks of {b}"
        )
    params = _trainable(model)
    if not params:
        raise GradkitError("the model has no trainable parameters; set requires_grad first")

    def flat(ts: Sequence[torch.Tensor | None]) -> torch.Tensor:
        return torch.cat(
            [
                (t if t is not None else torch.zeros_like(p)).reshape(-1)
                for t, p in zip(ts, params, strict=True)
            ]
        )

    chunk_grads = []
    for chunk in batches:
        grads = torch.autograd.grad(loss_fn(model, chunk), params, allow_unused=True)
        chunk_grads.append(flat(grads).detach())
    g = torch.stack(chunk_grads)  # k x P
    half = k // 2
    halves = (list(range(half)), list(range(half, k)))

    def hessian_quad(chunks: list[int]) -> Callable[[torch.Tensor], float]:
        """v ↦ vᵀĤv with Ĥ the Hessian of the mean loss over ``chunks``, one HVP per call."""
        total = sum(loss_fn(model, batches[i]) for i in chunks) / len(chunks)
        first = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
        first = [t if t is not None else torch.zeros_like(p) for t, p in zip(first, params, strict=True)]

        def quad(v: torch.Tensor) -> float:
            pieces, start = [], 0
            for p in params:
                pieces.append(v[start : start + p.numel()].view_as(p))
                start += p.numel()
            dot = sum((f * piece).sum() for f, piece in zip(first, pieces, strict=True))
            hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
            return float((flat(hv) * v).sum())

        return quad

    tr_parts, ghg_parts = [], []
    for h_chunks, g_chunks in ((halves[0], halves[1]), (halves[1], halves[0])):
        quad = hessian_quad(h_chunks)  # the graph is freed when quad goes out of scope
        gy = g[g_chunks]
        ky, mean_y = len(g_chunks), gy.mean(0)
        tr_y = b / (ky - 1) * sum(quad(d) for d in gy - mean_y)
        tr_parts.append(tr_y)
        ghg_parts.append(quad(mean_y) - tr_y / (ky * b))
        del quad
    tr_h_sigma = sum(tr_parts) / 2
    g_h_g = sum(ghg_parts) / 2
    mean = g.mean(0)
    dev = g - mean
    tr_sigma = b / (k - 1) * float(dev.pow(2).sum())
    g2 = float(mean.pow(2).sum()) - tr_sigma / (k * b)
    return HessianNoiseScale(
        b_noise=tr_h_sigma / g_h_g if g_h_g > 0 and tr_h_sigma > 0 else None,
        b_simple=tr_sigma / g2 if g2 > 0 else None,
        trace_h_sigma=tr_h_sigma,
        g_h_g=g_h_g,
        grad_sq_norm=g2,
        trace_sigma=tr_sigma,
        eta_max=g2 / g_h_g if g_h_g > 0 and g2 > 0 else None,
    )
