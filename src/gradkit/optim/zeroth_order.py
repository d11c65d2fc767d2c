"""MeZO-style zeroth-order optimiser: two forward passes per step, no backward, memory of inference.

Each step estimates the gradient by simultaneous perturbation (SPSA; Spall 1992) along a random
direction ``z`` and moves along it (MeZO: Malladi et al. 2023, arXiv 2305.17333)::

    d_k   = (f(θ + ε z_k) - f(θ - ε z_k)) / 2          k = 1..n   (n = n_samples)
    θ_g  <- θ_g - lr_g · ( (1/n) Σ_k (d_k / ε_g) z_k,g  +  λ_g θ_g )

With one ``ε`` for every group, ``d_k / ε`` is the usual projected gradient ``(f+ - f-) / 2ε`` and
``E[proj · z] = ∇f + O(ε²)`` for any ``z`` with ``E[z zᵀ] = I``: ``distribution="gaussian"``
(the default, MeZO's ``z ~ N(0, I)``) or ``"rademacher"`` (independent ±1 coordinates, Spall's
original choice; several times cheaper to draw on a CPU, see :mod:`gradkit.optim.zo_directions`). Per-group ``ε_g`` is allowed: dividing by the group's own ``ε_g``
keeps the estimate of each group's gradient unbiased, but another group h adds variance in
proportion to ``(ε_h / ε_g)²``, so keep the groups' ``ε`` within a small factor of each other. Weight decay ``λ`` is decoupled and skipped
for 1-D parameters (biases, normalisation weights) unless the group says ``decay_1d=True``.
The losses are read in their own precision (an fp64 loss stays fp64) and ``d_k`` is taken in fp64,
so a small ``ε`` on a large loss is not rounded to a zero difference.

What gradkit guarantees, beyond the reference MeZO code:

- **Seed trick without the global RNG.** ``z`` is never stored: :mod:`gradkit.optim.zo_directions`
  rebuilds any parameter's slice of it from ``(seed, parameter index)`` with private generators,
  in any order. The global torch RNG is never read or reset.
- **n_samples > 1 without stored gradients.** Only the n scalars ``d_k`` and their seeds are kept;
  the update regenerates each ``z_k`` per parameter. All n directions are evaluated at the same
  ``θ`` (true n-SPSA), unlike updating after each sample.
- **One z per parameter, whatever reads it.** Every evaluation is ``f`` at exactly ``θ + ε z`` and
  the update uses that same ``z``, for every use a parameter has in the closure: inside the forward
  of the module that holds it, in several modules (tied weights), or outside any module (a bare
  tensor in the closure, a penalty term, a parent reading a child's weight). ``ZerothOrder([p])``
  optimises a plain tensor objective like any torch optimiser.
- **Exact restore** (``restore="exact"``, the default): the stored parameters come back bit for bit
  in every dtype (adding then subtracting ``ε z`` in bf16/fp16 would round twice). Nothing is
  written into the original storage: while the closure runs, a module forward pre-hook swaps each
  optimised parameter's ``.data`` for a perturbed copy ``θ + s ε z`` (computed in at least fp32,
  cast to the parameter's dtype) for the forward of the module that holds it, and swaps the
  original storage back when that forward ends, so the extra memory is one module's parameters at
  a time. A read outside such a forward is caught by a torch function mode (reads of metadata such
  as ``.dtype`` or ``.shape`` do not count): from then on that tensor stays swapped for the rest of
  the evaluation, which costs one perturbed copy of it. The hooks and the mode are process-wide
  while the closure runs: do not run other models' forwards in other threads meanwhile.
- **Sparse embeddings** (``sparse_embeddings=True``, the default, exact restore only). An
  ``nn.Embedding`` row that nothing reads has gradient exactly 0, and its share of ``proj · z`` is
  pure noise. When every use of an embedding matrix in a step is an ``nn.Embedding`` lookup, only
  the rows looked up are perturbed (in place, their original bits saved and copied back) and
  updated, and neither a matrix-sized copy nor matrix-sized Gaussian draws are made. When anything
  also reads the whole matrix (a tied LM head, as in GPT-2, OPT and BERT's MLM head), the same
  ``z`` is used there and every row is updated. This is decided in each step from what ran (see
  :mod:`gradkit.optim.zo_directions`). Decoupled weight decay shrinks the whole matrix either way.
  Under data parallelism (an initialised process group of more than one process) the ranks look up
  different rows, so embeddings get MeZO's dense ``z`` there and every rank takes the same step.
- **restore="subtract"** is the classic in-place ``+ε z``, ``-2ε z``, ``+ε z`` (arithmetic in fp32,
  stored in the parameter's dtype): exact in fp32 only up to rounding, not exact in bf16/fp16.
- A parameter that no evaluation of a step reads has gradient exactly 0: it is not updated (no
  noise, no decay) and a one-time warning names it.
- **Bad losses.** A non-finite loss skips the step (weights restored, no update), counts it in
  ``skipped_steps``, warns once, and raises :class:`GradkitError` after ``max_bad_steps`` in a row.

Under data parallelism every rank builds the optimiser with the same ``seed``; the closure should
return the loss all-reduced over ranks (a scalar), so every rank computes the same ``d_k`` and takes
the same step without exchanging anything else.

**FSDP2** (``fully_shard``: parameters are row-sharded DTensors). Each rank perturbs and updates its
own shard in place, with its rows of the same ``z`` (:meth:`Directions.range_chunks` draws only the
chunks that overlap them), so the all-gathered weights every forward sees are exactly ``θ ± ε z`` and
the step equals the unsharded one; nothing is gathered by the optimiser. Memory per rank: its shard,
plus (``restore="exact"``) one saved copy of its shard of the optimised parameters, whose bits are
copied back after every evaluation (exact in bf16 too), plus at most one chunk of ``z``. Every FSDP
module is resharded before its first forward in an evaluation and after it (FSDP2 keeps the root's
gathered weights after a forward), so no forward reads stale gathered weights.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from gradkit.errors import GradkitError
from gradkit.estimators import scalar_value
from gradkit.fsdp import flat_range, is_dtensor, local
from gradkit.optim.zo_directions import DISTRIBUTIONS, Directions, work_dtype

__all__ = ["ZerothOrder", "RESTORE_MODES", "DISTRIBUTIONS"]

RESTORE_MODES = ("exact", "subtract")


class ZerothOrder(torch.optim.Optimizer):
    """Zeroth-order SGD (two-sided SPSA, MeZO's seed trick; arXiv 2305.17333). See the module docstring.

    ``step(closure)`` calls ``closure()`` ``2 * n_samples`` times under ``torch.no_grad()``; it must
    return the scalar loss of the current parameters (a 0-dim tensor or a number) and must not call
    ``backward``. It returns the mean of those evaluations (an estimate of the loss at ``θ``) as a
    0-dim fp32 tensor, also kept in ``last_loss``; ``last_projected_grads`` holds the step's
    ``(f+ - f-) / 2ε`` values.

    Args:
        params: tensors or param groups (any set: a whole model, LoRA factors, a head, plain tensors).
        lr: step size (SGD scale; MeZO uses 1e-6 to 1e-7 for full fine-tuning).
        eps: perturbation scale ε (> 0).
        n_samples: directions per step; their estimates are averaged.
        weight_decay: decoupled weight decay λ (not applied to 1-D parameters unless ``decay_1d``).
        restore: ``"exact"`` (bit-identical, hook-based) or ``"subtract"`` (classic add/subtract).
        seed: seed of the private generator; use the same on every rank under data parallelism.
        decay_1d: also decay 1-D parameters (biases, norms).
        max_bad_steps: consecutive non-finite steps tolerated before raising.
        sparse_embeddings: perturb and update only the embedding rows the step looks up when
            nothing else reads the matrix (exact restore only; see the module docstring).
        distribution: ``"gaussian"`` (z ~ N(0, I), MeZO) or ``"rademacher"`` (z ∈ {−1, +1}ⁿ uniformly,
            Spall 1992); both give an unbiased estimate of the same smoothed gradient.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        n_samples: int = 1,
        weight_decay: float = 0.0,
        restore: str = "exact",
        seed: int = 0,
        *,
        decay_1d: bool = False,
        max_bad_steps: int = 5,
        sparse_embeddings: bool = True,
        distribution: str = "gaussian",
    ):
        params = list(params)
        if not params or all(isinstance(g, dict) and not list(g.get("params", [])) for g in params):
            raise GradkitError(
                "ZerothOrder got an empty parameter list; pass the parameters to train "
                "(e.g. [p for p in model.parameters() if p.requires_grad])"
            )
        if restore not in RESTORE_MODES:
            raise GradkitError(f"unknown restore {restore!r}; choose one of: {', '.join(RESTORE_MODES)}")
        if distribution not in DISTRIBUTIONS:
            raise GradkitError(
                f"unknown distribution {distribution!r}; choose one of: {', '.join(DISTRIBUTIONS)}"
            )
        if not isinstance(n_samples, int) or n_samples < 1:
            raise GradkitError(f"n_samples must be a positive integer, got {n_samples!r}; pass e.g. 1")
        if max_bad_steps < 1:
            raise GradkitError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, decay_1d=decay_1d)
        super().__init__(params, defaults)
        self.n_samples = n_samples
        self.restore = restore
        self.sparse_embeddings = bool(sparse_embeddings) and restore == "exact"
        self._directions = Directions(distribution)
        self._sparse_now = False
        self.max_bad_steps = max_bad_steps
        self.steps = 0  # steps that updated the parameters
        self.skipped_steps = 0  # steps skipped for a non-finite loss, in total
        self.bad_steps_in_row = 0
        self.last_loss: torch.Tensor | None = None
        self.last_projected_grads: list[float] = []
        self._sharded: list[_Entry] = []
        self._saved: list[torch.Tensor] | None = None  # FSDP2: saved shards (exact) or [] (subtract)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._warned_bad = False
        self._warned_unused = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not (math.isfinite(group["eps"]) and group["eps"] > 0):
            raise GradkitError(f"eps must be > 0, got {group['eps']}; pass e.g. eps=1e-3")
        for name in ("lr", "weight_decay"):  # NaN fails every comparison: it must not pass for >= 0
            if not (math.isfinite(group[name]) and group[name] >= 0):
                raise GradkitError(
                    f"{name} must be finite and >= 0, got {group[name]}; pass e.g. {name}=1e-4"
                )
        for p in group["params"]:
            if not p.is_floating_point():
                raise GradkitError(
                    f"ZerothOrder got a {p.dtype} parameter; it optimises floating-point tensors only"
                )

    def _entries(self) -> list[tuple[dict[str, Any], torch.Tensor, int]]:
        entries, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                entries.append((group, p, index))
                index += 1
        return entries

    # -- one evaluation of the closure at θ + sign ε z ------------------------------------------
    def _evaluate(self, closure: Callable[[], Any], entries, seed: int, sign: float, seen: set[int]) -> float:
        fresh = _FreshGather() if self._saved is not None else contextlib.nullcontext()
        if self.restore == "subtract":
            with fresh:
                value = closure()
        else:
            plain = [e for e in entries if not is_dtensor(e[1])]
            self._perturb_shards(seed, sign)
            try:
                with _Perturbed(self._directions, plain, seed, sign, seen, self._sparse_now), fresh:
                    value = closure()
            finally:
                self._restore_shards()
        return scalar_value(value, "the closure")

    def _shard_pieces(self, group, p, index: int, seed: int, scale: float = 1.0):
        """``(view of this rank's shard, scale·z there)`` pieces of a sharded parameter."""
        flat = local(p.data).view(-1)
        lo, hi = flat_range(p)
        for start, z in self._directions.range_chunks(
            tuple(p.shape), p.dtype, p.device, seed, index, lo, hi, scale
        ):
            yield flat[start : start + z.numel()], z

    def _perturb_shards(self, seed: int, sign: float) -> None:
        """restore="exact", FSDP2: each local shard becomes (saved bits + sign ε z), in place."""
        for (group, p, index), saved in zip(self._sharded, self._saved or [], strict=True):
            flat = saved.view(-1)
            offset = 0
            for part, z in self._shard_pieces(group, p, index, seed, sign * group["eps"]):
                part.copy_(z.add_(flat[offset : offset + part.numel()]))
                offset += part.numel()

    def _restore_shards(self) -> None:
        for (_, p, _), saved in zip(self._sharded, self._saved or [], strict=True):
            local(p.data).copy_(saved)

    def _shift(self, entries, seed: int, sign: float) -> None:
        """restore="subtract": θ += sign ε z in place, one parameter at a time."""
        for group, p, index in entries:
            if is_dtensor(p):
                for part, z in self._shard_pieces(group, p, index, seed, sign * group["eps"]):
                    part.copy_(z.add_(part))
                continue
            for _, part, z in self._directions.chunks(p.data, seed, index, sign * group["eps"]):
                part.copy_(z.add_(part))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one zeroth-order step; ``closure()`` returns the scalar loss (see the class doc)."""
        if closure is None:
            raise GradkitError(
                "ZerothOrder.step needs a closure returning the loss: opt.step(lambda: loss_fn())"
            )
        entries = self._entries()
        self._directions.new_step()
        # under data parallelism each rank looks up other rows, and every rank must take the same step:
        # dense z there (as MeZO), so the ranks need to exchange nothing but the losses
        self._sparse_now = self.sparse_embeddings and not _data_parallel()
        seeds = [int(torch.randint(0, 2**62, (1,), generator=self._generator)) for _ in range(self.n_samples)]
        diffs: list[float] = []
        values: list[float] = []
        # FSDP2: sharded parameters are perturbed in place on every rank (FSDP gathers them whole for
        # every forward, so they count as read); exact restore copies their saved bits back
        self._sharded = [e for e in entries if is_dtensor(e[1])]
        seen: set[int] = {index for _, _, index in self._sharded}
        if self._sharded:
            self._saved = (
                [local(p.data).clone() for _, p, _ in self._sharded] if self.restore == "exact" else []
            )
        try:
            return self._step(closure, entries, seeds, diffs, values, seen)
        finally:
            self._saved = None

    def _step(self, closure, entries, seeds, diffs, values, seen) -> torch.Tensor:
        for k, seed in enumerate(seeds):
            plus_minus = []
            for sign in (1.0, -1.0):
                if self.restore == "subtract":
                    # +ε z from θ, then -2ε z, then +ε z back after the minus pass (or on an error)
                    self._shift(entries, seed, sign if sign > 0 else -2.0)
                    try:
                        plus_minus.append(self._evaluate(closure, entries, seed, sign, seen))
                    except BaseException:
                        self._shift(entries, seed, -sign)
                        raise
                    if sign < 0:
                        self._shift(entries, seed, 1.0)
                else:
                    plus_minus.append(self._evaluate(closure, entries, seed, sign, seen))
                if not math.isfinite(plus_minus[-1]):
                    if self.restore == "subtract" and sign > 0:
                        self._shift(entries, seed, -1.0)
                    values.extend(plus_minus)
                    return self._skip(values)
                if self.restore == "exact" and k == 0 and sign > 0:
                    self._check_seen(entries, seen)
            values.extend(plus_minus)
            diffs.append((plus_minus[0] - plus_minus[1]) / 2.0)  # fp64: the losses' own precision
        self.bad_steps_in_row = 0
        self._update(entries, seeds, diffs, seen)
        self.steps += 1
        eps0 = self.param_groups[0]["eps"]
        self.last_projected_grads = [d / eps0 for d in diffs]
        self.last_loss = torch.tensor(sum(values) / len(values), dtype=torch.float32)
        return self.last_loss

    def _check_seen(self, entries, seen: set[int]) -> None:
        missing = [(index, tuple(p.shape)) for _, p, index in entries if index not in seen]
        if missing and not self._warned_unused:
            self._warned_unused = True
            shown = ", ".join(f"#{i} {list(s)}" for i, s in missing[:5])
            warnings.warn(
                f"ZerothOrder: {len(missing)} tensor(s) ({shown}) were not read by the closure, so they "
                "were not perturbed and are not updated (their gradient is 0); drop them from the optimiser",
                stacklevel=5,
            )

    def _update(self, entries, seeds: list[int], diffs: list[float], seen: set[int]) -> None:
        n = len(seeds)
        directions = self._directions
        for group, p, index in entries:
            lr = group["lr"]
            if lr == 0 or (self.restore == "exact" and index not in seen):
                continue
            decay = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
            coefs = [-lr * d / (group["eps"] * n) for d in diffs]
            if decay == 0 and not any(coefs):
                continue
            if is_dtensor(p):  # FSDP2: this rank's rows of every z_k, chunk by chunk
                wd = work_dtype(p.dtype)
                chunked = [self._shard_pieces(group, p, index, seed) for seed in seeds]
                for pieces in zip(*chunked, strict=True):
                    part = pieces[0][0]
                    work = part if part.dtype == wd else part.to(wd)
                    if decay:
                        work.mul_(1.0 - lr * decay)
                    for (_, z), coef in zip(pieces, coefs, strict=True):
                        if coef:
                            work.add_(z, alpha=coef)
                    if work is not part:
                        part.copy_(work)
                continue
            rows = directions.sparse_rows(index)
            if rows is not None:  # only lookups read it: decay everywhere, noise on the rows read
                if decay:  # in place: no parameter-sized copy (bf16/fp16 round the product once)
                    p.data.mul_(1.0 - lr * decay)
                work = p.data[rows].to(work_dtype(p.dtype))
                for seed, coef in zip(seeds, coefs, strict=True):
                    if coef:
                        work.add_(directions.on_rows(p.data, seed, index, rows), alpha=coef)
                p.data[rows] = work.to(p.dtype)
                continue
            # chunk by chunk: the c-th chunk of every z_k, so nothing larger than a chunk is allocated
            # (bf16/fp16: plus one fp32 copy of the chunk)
            chunked = [directions.chunks(p.data, seed, index) for seed in seeds]
            for pieces in zip(*chunked, strict=True):
                part = pieces[0][1]
                work = part if part.dtype == work_dtype(part.dtype) else part.to(work_dtype(part.dtype))
                if decay:
                    work.mul_(1.0 - lr * decay)
                for (_, _, z), coef in zip(pieces, coefs, strict=True):
                    if coef:
                        work.add_(z, alpha=coef)
                if work is not part:
                    part.copy_(work)

    def _skip(self, values: list[float]) -> torch.Tensor:
        self.skipped_steps += 1
        self.bad_steps_in_row += 1
        self.last_projected_grads = []
        self.last_loss = torch.tensor(sum(values) / len(values), dtype=torch.float32)
        if self.bad_steps_in_row >= self.max_bad_steps:
            raise GradkitError(
                f"the loss was not finite in {self.bad_steps_in_row} steps in a row (last {values[-1]}); "
                "lower lr or eps, or check the closure's inputs"
            )
        if not self._warned_bad:
            self._warned_bad = True
            warnings.warn(
                f"ZerothOrder: non-finite loss {values[-1]}; step skipped (weights unchanged). Further skips "
                f"are counted in .skipped_steps; {self.max_bad_steps} in a row raise an error",
                stacklevel=4,
            )
        return self.last_loss

    # -- resume -----------------------------------------------------------------------------
    @property
    def distribution(self) -> str:
        """``"gaussian"`` or ``"rademacher"``: the law of each direction ``z``."""
        return self._directions.distribution

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zeroth_order"] = {
            "generator": self._generator.get_state(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "n_samples": self.n_samples,
            "restore": self.restore,
            "sparse_embeddings": self.sparse_embeddings,
            "distribution": self._directions.distribution,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zeroth_order", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._generator.set_state(extra["generator"])
            self.steps = int(extra["steps"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.bad_steps_in_row = int(extra["bad_steps_in_row"])
            self.n_samples = int(extra["n_samples"])
            self.restore = extra["restore"]
            self.sparse_embeddings = bool(extra.get("sparse_embeddings", False))
            if "distribution" in extra:  # states saved before the option existed drew Gaussians
                self._directions.distribution = extra["distribution"]


class _FreshGather:
    """While a closure runs: every FSDP2 module is resharded before its first forward (a forward
    pre-hook registered globally runs before FSDP's own, which then all-gathers the current, perturbed,
    local shards) and all of them again at the end (FSDP2 keeps the root's gathered weights after a
    forward: without this the next forward, the user's included, would read stale weights)."""

    def __enter__(self) -> _FreshGather:
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.modules import module as module_mod

        self.seen: dict[int, nn.Module] = {}

        def pre(module: nn.Module, args: Any) -> None:
            if isinstance(module, FSDPModule) and id(module) not in self.seen:
                self.seen[id(module)] = module
                module.reshard()

        self.handle = module_mod.register_module_forward_pre_hook(pre)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()
        for module in self.seen.values():
            module.reshard()  # type: ignore[operator]


def _data_parallel() -> bool:
    """True inside an initialised torch.distributed group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_Entry = tuple[dict[str, Any], torch.Tensor, int]

# reads of a tensor's metadata only: they do not see its values, so they need no perturbation
_METADATA_ATTRIBUTES = [
    "dtype",
    "device",
    "requires_grad",
    "ndim",
    "layout",
    "is_cuda",
    "is_leaf",
    "grad",
    "grad_fn",
    "is_sparse",
    "is_quantized",
    "is_meta",
    "itemsize",
    "nbytes",
]
_METADATA_METHODS = [
    "size",
    "dim",
    "numel",
    "nelement",
    "stride",
    "is_contiguous",
    "is_floating_point",
    "is_complex",
    "element_size",
    "data_ptr",
    "get_device",
    "storage_offset",
    "__len__",
    "__hash__",
    "requires_grad_",
    "register_hook",
]
_METADATA_READS = frozenset(
    [torch.Tensor.shape.__get__]
    + [getattr(torch.Tensor, n).__get__ for n in _METADATA_ATTRIBUTES if hasattr(torch.Tensor, n)]
    + [getattr(torch.Tensor, n) for n in _METADATA_METHODS if hasattr(torch.Tensor, n)]
)


class _Perturbed(TorchFunctionMode):
    """While active, every optimised tensor reads as ``θ + sign ε z`` and its stored bits are untouched.

    - In the forward of a module that holds it, a pre-hook swaps its ``.data`` for a perturbed copy
      (or, for an embedding on the sparse path, perturbs the looked-up rows in place after saving
      them) and a forward hook puts the original back when that forward ends.
    - Read anywhere else (any torch call that takes it, found by this torch function mode), it is
      swapped for a perturbed copy until the evaluation ends.
    """

    def __init__(
        self,
        directions: Directions,
        entries: list[_Entry],
        seed: int,
        sign: float,
        seen: set[int],
        sparse: bool,
    ):
        super().__init__()
        self.directions, self.seed, self.sign, self.seen, self.sparse = directions, seed, sign, seen, sparse
        self.targets = {id(p): (group, p, index) for group, p, index in entries}
        self.in_forward: dict[int, list[Any]] = {}  # id -> [original, depth]: swapped for a module's forward
        self.loose: dict[int, torch.Tensor] = {}  # id -> original data: swapped until the evaluation ends
        self.handles: list[Any] = []

    # -- reads outside a holding module's forward ------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        if kwargs is None:
            kwargs = {}
        if func not in _METADATA_READS:
            targets = self.targets
            for value in (*args, *kwargs.values()) if kwargs else args:
                if type(value) in (list, tuple):  # torch.cat, torch.stack, ...
                    for item in value:
                        if id(item) in targets:
                            self._read_outside(item)
                elif id(value) in targets:
                    self._read_outside(value)
        return func(*args, **kwargs)

    def _read_outside(self, p: torch.Tensor) -> None:
        """A read outside the forward of a module holding ``p``: perturbed until the evaluation ends."""
        key = id(p)
        if key not in self.in_forward and key not in self.loose:
            group, _, index = self.targets[key]
            self.loose[key] = p.data
            p.data = self._whole(p, group, index)

    def _whole(self, p: torch.Tensor, group: dict[str, Any], index: int) -> torch.Tensor:
        """``θ + sign ε z`` over the whole tensor, recorded as a use of the whole tensor."""
        self.directions.note_whole_use(index)
        self.seen.add(index)
        return self.directions.perturbed(p.data, self.seed, index, self.sign * group["eps"])

    # -- module forwards ---------------------------------------------------------------------------
    def _pre(self, module: nn.Module, args: Any) -> None:
        with torch._C.DisableTorchFunction():  # our own reads are not the closure's (and cost no dispatch)
            for p in module._parameters.values():
                key = id(p)
                if p is None or key not in self.targets or key in self.loose:
                    continue
                slot = self.in_forward.get(key)
                if slot is not None:  # nested call of a module holding the same parameter
                    slot[1] += 1
                    continue
                group, _, index = self.targets[key]
                if (
                    self.sparse
                    and type(module) is nn.Embedding
                    and p is module.weight
                    and index not in self.directions.plain
                    and args
                    and torch.is_tensor(args[0])
                ):
                    self._perturb_rows(p, args[0], group, index)
                    continue
                self.in_forward[key] = [p.data, 1]
                p.data = self._whole(p, group, index)

    def _perturb_rows(self, p: torch.Tensor, ids: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """Perturb in place only the rows this lookup reads, saving their original bits."""
        rows = torch.unique(ids.detach().reshape(-1).to(p.device))
        self.directions.note_lookup(index, rows)
        original = p.data[rows]  # a copy: the exact bits to put back
        z = self.directions.on_rows(p.data, self.seed, index, rows)
        p.data[rows] = z.mul_(self.sign * group["eps"]).add_(original).to(p.dtype)
        self.in_forward[id(p)] = [(rows, original), 1]
        self.seen.add(index)

    @staticmethod
    def _put_back(p: torch.Tensor, saved: Any) -> None:
        if isinstance(saved, tuple):  # sparse embedding rows
            rows, original = saved
            p.data[rows] = original
        else:
            p.data = saved

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        with torch._C.DisableTorchFunction():
            for p in module._parameters.values():
                slot = self.in_forward.get(id(p)) if p is not None else None
                if slot is None:
                    continue
                slot[1] -= 1
                if slot[1] == 0:
                    self._put_back(p, slot[0])
                    del self.in_forward[id(p)]

    def __enter__(self) -> _Perturbed:
        from torch.nn.modules import module as module_mod

        self.handles = [
            module_mod.register_module_forward_pre_hook(self._pre),
            module_mod.register_module_forward_hook(self._post, always_call=True),
        ]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        # a forward that raised, or a module that never finished: put every original back
        for key, (original, _) in list(self.in_forward.items()):
            self._put_back(self.targets[key][1], original)
        for key, original in self.loose.items():
            self.targets[key][1].data = original
        self.in_forward.clear()
        self.loose.clear()
