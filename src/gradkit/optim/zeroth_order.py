"""MeZO-style zeroth-order optimiser: two forward passes per step, no backward, memory of inference.

Each step estimates the gradient by simultaneous perturbation (SPSA; Spall 1992) along a random
Gaussian direction ``z`` and moves along it (MeZO: Malladi et al. 2023, arXiv 2305.17333)::

    d_k   = (f(θ + ε z_k) - f(θ - ε z_k)) / 2          k = 1..n   (n = n_samples)
    θ_g  <- θ_g - lr_g · ( (1/n) Σ_k (d_k / ε_g) z_k,g  +  λ_g θ_g )

With one ``ε`` for every group, ``d_k / ε`` is the usual projected gradient ``(f+ - f-) / 2ε`` and
``E[proj · z] = ∇f + O(ε²)``. Per-group ``ε_g`` is allowed: dividing by the group's own ``ε_g``
keeps the estimate of each group's gradient unbiased, but another group h adds variance in
proportion to ``(ε_h / ε_g)²``, so keep the groups' ``ε`` within a small factor of each other. Weight decay ``λ`` is decoupled and skipped
for 1-D parameters (biases, normalisation weights) unless the group says ``decay_1d=True``.

What gradkit does differently from the reference MeZO code:

- **Seed trick without the global RNG.** ``z`` is never stored. Each sample draws a seed from a
  private ``torch.Generator``; each parameter's slice of ``z`` is regenerated from
  ``mix(seed, parameter index)`` with a generator of its own device, so any parameter's ``z`` can be
  rebuilt at any time, in any order. The global torch RNG is never read or reset.
- **n_samples > 1 without stored gradients.** Only the n scalars ``d_k`` and their seeds are kept;
  the update regenerates each ``z_k`` per parameter, one parameter at a time. All n directions are
  evaluated at the same ``θ`` (true n-SPSA), unlike updating after each sample.
- **Exact restore** (``restore="exact"``, the default). Adding and then subtracting ``ε z`` in
  bf16/fp16 rounds twice and does not give ``θ`` back. Here the stored parameters are never written
  during the evaluations: while the closure runs, a global module forward pre-hook swaps each
  optimised parameter's ``.data`` for a perturbed copy ``(θ + s ε z)`` (computed in fp32, cast to
  the parameter's dtype) just for the forward of the module that owns it, and a forward hook swaps
  the original storage back. The original bits are untouched, so they come back exactly in every
  dtype, and the extra memory is the perturbed copy of one module's own parameters at a time (for
  a Transformer: its largest Linear or embedding), never a model-sized copy. Caveats: a parameter is
  perturbed only inside the forward of a module that holds it (the normal PyTorch pattern); one read
  elsewhere (e.g. a penalty computed in the closure, or a parent reading a child's weight) is not
  perturbed. Parameters never perturbed in a step are not updated in that step, and a one-time
  warning names them; use ``restore="subtract"`` for such models.
  The hooks are process-wide while the closure runs: do not run other models' forwards in other
  threads meanwhile.
- **Sparse embeddings** (``sparse_embeddings=True``, the default, exact restore only). An
  ``nn.Embedding`` row that the batch never looks up has gradient exactly 0, and perturbing it
  cannot change the loss, so its share of ``proj · z`` is pure noise (mean 0). Only the rows the
  step's first lookup uses are perturbed (in place, the originals saved and copied back bit for
  bit) and updated, with ``z`` regenerated for exactly those rows: the estimate of every used row
  has the same law as MeZO's, the unused rows get their true gradient (0) instead of noise, and the
  word embedding (half of a small BERT's weights) costs neither a copy nor Gaussian draws per
  step. Decoupled weight decay still shrinks the whole matrix. A later lookup in the same step of a
  row outside that set raises an error (pass ``sparse_embeddings=False``). Under data parallelism
  (an initialised process group of more than one process) the ranks look up different rows, so
  embeddings get MeZO's dense ``z`` there and every rank still takes the same step.
- **restore="subtract"** is the classic in-place ``+ε z``, ``-2ε z``, ``+ε z`` (arithmetic in fp32,
  stored in the parameter's dtype): exact in fp32 only up to rounding, not exact in bf16/fp16.
- **Bad losses.** A non-finite loss skips the step (weights restored, no update), counts it in
  ``skipped_steps``, warns once, and raises :class:`GradkitError` after ``max_bad_steps`` in a row.

Under data parallelism every rank builds the optimiser with the same ``seed``; the closure should
return the loss all-reduced over ranks (a scalar), so every rank computes the same ``d_k`` and takes
the same step without exchanging anything else.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError

__all__ = ["ZerothOrder", "RESTORE_MODES"]

RESTORE_MODES = ("exact", "subtract")
_MASK64 = (1 << 64) - 1
_CHUNK = 1 << 20  # elements of z generated at once (4 MiB in fp32): bounds every temporary buffer


def _mix(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): well-separated per-parameter seeds from one per-sample seed."""
    x = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for a parameter: at least fp32 (bf16/fp16 are computed in fp32)."""
    return torch.promote_types(dtype, torch.float32)


class ZerothOrder(torch.optim.Optimizer):
    """Zeroth-order SGD (two-sided SPSA, MeZO's seed trick; arXiv 2305.17333). See the module docstring.

    ``step(closure)`` calls ``closure()`` ``2 * n_samples`` times under ``torch.no_grad()``; it must
    return the scalar loss of the current parameters (a 0-dim tensor or a number) and must not call
    ``backward``. It returns the mean of those evaluations (an estimate of the loss at ``θ``) as a
    0-dim fp32 tensor, also kept in ``last_loss``; ``last_projected_grads`` holds the step's
    ``(f+ - f-) / 2ε`` values.

    Args:
        params: parameters or param groups (any set: a whole model, LoRA factors, a head).
        lr: step size (SGD scale; MeZO uses 1e-6 to 1e-7 for full fine-tuning).
        eps: perturbation scale ε (> 0).
        n_samples: directions per step; their estimates are averaged.
        weight_decay: decoupled weight decay λ (not applied to 1-D parameters unless ``decay_1d``).
        restore: ``"exact"`` (bit-identical, hook-based) or ``"subtract"`` (classic add/subtract).
        seed: seed of the private generator; use the same on every rank under data parallelism.
        decay_1d: also decay 1-D parameters (biases, norms).
        max_bad_steps: consecutive non-finite steps tolerated before raising.
        sparse_embeddings: perturb and update only the embedding rows the step looks up (exact
            restore only; see the module docstring).
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
    ):
        params = list(params)
        if not params or all(isinstance(g, dict) and not list(g.get("params", [])) for g in params):
            raise GradkitError(
                "ZerothOrder got an empty parameter list; pass the parameters to train "
                "(e.g. [p for p in model.parameters() if p.requires_grad])"
            )
        if restore not in RESTORE_MODES:
            raise GradkitError(f"unknown restore {restore!r}; choose one of: {', '.join(RESTORE_MODES)}")
        if not isinstance(n_samples, int) or n_samples < 1:
            raise GradkitError(f"n_samples must be a positive integer, got {n_samples!r}; pass e.g. 1")
        if max_bad_steps < 1:
            raise GradkitError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, decay_1d=decay_1d)
        super().__init__(params, defaults)
        self.n_samples = n_samples
        self.restore = restore
        self.sparse_embeddings = bool(sparse_embeddings) and restore == "exact"
        self._rows: dict[int, torch.Tensor] = {}  # parameter index -> embedding rows used this step
        self._sparse_now = False
        self.max_bad_steps = max_bad_steps
        self.steps = 0  # steps that updated the parameters
        self.skipped_steps = 0  # steps skipped for a non-finite loss, in total
        self.bad_steps_in_row = 0
        self.last_loss: torch.Tensor | None = None
        self.last_projected_grads: list[float] = []
        self._generator = torch.Generator().manual_seed(int(seed))
        self._device_generators: dict[torch.device, torch.Generator] = {}
        self._warned_bad = False
        self._warned_unused = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not group["eps"] > 0:
            raise GradkitError(f"eps must be > 0, got {group['eps']}; pass e.g. eps=1e-3")
        if group["lr"] < 0 or group["weight_decay"] < 0:
            raise GradkitError("lr and weight_decay must be >= 0; pass non-negative values")
        for p in group["params"]:
            if not p.is_floating_point():
                raise GradkitError(
                    f"ZerothOrder got a {p.dtype} parameter; it optimises floating-point tensors only"
                )

    # -- z, regenerated from a seed ------------------------------------------------------------
    def _generator_on(self, device: torch.device) -> torch.Generator:
        """This optimiser's generator for ``device`` (reseeded before every use, never the global one)."""
        gen = self._device_generators.get(device)
        if gen is None:
            gen = self._device_generators[device] = torch.Generator(device=device)
        return gen

    def _chunks(
        self, data: torch.Tensor, seed: int, index: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(view, z)`` pairs covering ``data``: this parameter's slice of the direction for ``seed``,
        N(0, I) in the work dtype, regenerated chunk by chunk (``_CHUNK`` elements), so no z buffer
        is ever larger than a chunk. Chunk c of parameter i is seeded with ``mix(mix(seed, i), c)``."""
        gen = self._generator_on(data.device)
        dtype = _work_dtype(data.dtype)
        base = _mix(seed, index)
        if data.numel() <= _CHUNK or not data.is_contiguous():
            gen.manual_seed(base)
            yield data, torch.randn(data.shape, generator=gen, device=data.device, dtype=dtype)
            return
        flat = data.view(-1)
        for c, start in enumerate(range(0, flat.numel(), _CHUNK)):
            part = flat[start : start + _CHUNK]
            gen.manual_seed(_mix(base, c))
            yield part, torch.randn(part.shape, generator=gen, device=data.device, dtype=dtype)

    def _perturbed(self, p: torch.Tensor, seed: int, index: int, scale: float) -> torch.Tensor:
        """A new tensor ``θ + scale z`` (fp32 arithmetic, cast to the parameter's dtype)."""
        data = p.detach()
        if data.numel() <= _CHUNK or not data.is_contiguous():
            # z's buffer is reused for the result: one parameter-sized allocation (two for bf16/fp16)
            ((_, z),) = self._chunks(data, seed, index)
            return z.mul_(scale).add_(data).to(data.dtype)
        out = torch.empty_like(data)
        flat = out.view(-1)
        start = 0
        for part, z in self._chunks(data, seed, index):
            flat[start : start + part.numel()].copy_(z.mul_(scale).add_(part))
            start += part.numel()
        return out

    def _row_noise(self, p: torch.Tensor, seed: int, index: int, rows: torch.Tensor) -> torch.Tensor:
        """``z`` for the given (sorted, unique) embedding rows of parameter ``index``: N(0, I) of shape
        ``(len(rows), dim)`` in the work dtype, regenerated identically from ``(seed, index)``."""
        gen = self._generator_on(p.device)
        gen.manual_seed(_mix(seed, index))
        shape = (len(rows), *p.shape[1:])
        return torch.randn(shape, generator=gen, device=p.device, dtype=_work_dtype(p.dtype))

    def _entries(self) -> list[tuple[dict[str, Any], torch.Tensor, int]]:
        entries, index = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                entries.append((group, p, index))
                index += 1
        return entries

    # -- one evaluation of the closure at θ + sign ε z ------------------------------------------
    def _evaluate(self, closure: Callable[[], Any], entries, seed: int, sign: float, seen: set[int]) -> float:
        if self.restore == "subtract":
            value = closure()
        else:
            with _PerturbInForward(self, entries, seed, sign, seen):
                value = closure()
        return _scalar(value)

    def _shift(self, entries, seed: int, sign: float) -> None:
        """restore="subtract": θ += sign ε z in place, one parameter at a time."""
        for group, p, index in entries:
            for part, z in self._chunks(p.data, seed, index):
                part.copy_(z.mul_(sign * group["eps"]).add_(part))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one zeroth-order step; ``closure()`` returns the scalar loss (see the class doc)."""
        if closure is None:
            raise GradkitError(
                "ZerothOrder.step needs a closure returning the loss: opt.step(lambda: loss_fn())"
            )
        entries = self._entries()
        self._rows = {}
        # under data parallelism each rank looks up other rows, and every rank must take the same step:
        # dense z there (as MeZO), so the ranks need to exchange nothing but the losses
        self._sparse_now = self.sparse_embeddings and not _data_parallel()
        seeds = [int(torch.randint(0, 2**62, (1,), generator=self._generator)) for _ in range(self.n_samples)]
        diffs: list[float] = []
        values: list[float] = []
        seen: set[int] = set()
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
            diffs.append((plus_minus[0] - plus_minus[1]) / 2.0)
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
                f"ZerothOrder(restore='exact'): {len(missing)} parameter(s) ({shown}) were not used in the "
                "forward of a module holding them, so they were not perturbed and are not updated; "
                "drop unused parameters, or use restore='subtract' if they are read outside their module",
                stacklevel=4,
            )

    def _update(self, entries, seeds: list[int], diffs: list[float], seen: set[int]) -> None:
        n = len(seeds)
        for group, p, index in entries:
            lr = group["lr"]
            if lr == 0 or (self.restore == "exact" and index not in seen):
                continue
            decay = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
            coefs = [-lr * d / (group["eps"] * n) for d in diffs]
            if decay == 0 and not any(coefs):
                continue
            rows = self._rows.get(index)
            if rows is not None:  # a sparse embedding: decay everywhere, noise on the used rows only
                if decay:  # in place: no parameter-sized copy (bf16/fp16 round the product once)
                    p.data.mul_(1.0 - lr * decay)
                work = p.data[rows].to(_work_dtype(p.dtype))
                for seed, coef in zip(seeds, coefs, strict=True):
                    if coef:
                        work.add_(self._row_noise(p, seed, index, rows), alpha=coef)
                p.data[rows] = work.to(p.dtype)
                continue
            # chunk by chunk: the c-th chunk of every z_k, so nothing larger than a chunk is allocated
            # (bf16/fp16: plus one fp32 copy of the chunk)
            chunked = [self._chunks(p.data, seed, index) for seed in seeds]
            for pieces in zip(*chunked, strict=True):
                part = pieces[0][0]
                work = part if part.dtype == _work_dtype(part.dtype) else part.to(_work_dtype(part.dtype))
                if decay:
                    work.mul_(1.0 - lr * decay)
                for (_, z), coef in zip(pieces, coefs, strict=True):
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
                stacklevel=3,
            )
        return self.last_loss

    # -- resume -----------------------------------------------------------------------------
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


def _data_parallel() -> bool:
    """True inside an initialised torch.distributed group of more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _scalar(value: Any) -> float:
    """The closure's loss as a Python float; a non-scalar is a user error."""
    if torch.is_tensor(value):
        if value.numel() != 1:
            raise GradkitError(
                f"the closure returned a tensor of shape {tuple(value.shape)}; return a scalar loss "
                "(e.g. loss.mean())"
            )
        return float(value.detach().float().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise GradkitError(
        f"the closure returned {type(value).__name__}; return the scalar loss (tensor or float)"
    )


class _PerturbInForward:
    """While active, every module forward swaps the optimised parameters it holds for ``θ + sign ε z``
    and swaps the untouched originals back when its forward ends (see the module docstring)."""

    def __init__(self, opt: ZerothOrder, entries, seed: int, sign: float, seen: set[int]):
        self.opt, self.seed, self.sign, self.seen = opt, seed, sign, seen
        self.targets = {id(p): (group, p, index) for group, p, index in entries}
        self.saved: dict[int, list[Any]] = {}  # id -> [original data, depth]
        self.handles: list[Any] = []

    def _pre(self, module: nn.Module, args: Any) -> None:
        for p in module._parameters.values():
            if p is None or id(p) not in self.targets:
                continue
            slot = self.saved.get(id(p))
            if slot is not None:  # nested call of a module holding the same parameter
                slot[1] += 1
                continue
            group, _, index = self.targets[id(p)]
            if (
                self.opt._sparse_now
                and type(module) is nn.Embedding
                and p is module.weight
                and args
                and torch.is_tensor(args[0])
            ):
                self._perturb_rows(p, args[0], group, index)
                continue
            perturbed = self.opt._perturbed(p, self.seed, index, self.sign * group["eps"])
            self.saved[id(p)] = [p.data, 1]
            p.data = perturbed
            self.seen.add(index)

    def _perturb_rows(self, p: torch.Tensor, ids: torch.Tensor, group: dict[str, Any], index: int) -> None:
        """Perturb in place only the rows of the step's row set (the first lookup's unique ids)."""
        rows = self.opt._rows.get(index)
        used = torch.unique(ids.detach().reshape(-1).to(p.device))
        if rows is None:
            rows = self.opt._rows[index] = used
        elif not bool(torch.isin(used, rows).all()):
            raise GradkitError(
                "ZerothOrder(sparse_embeddings=True): an embedding was looked up with rows outside the "
                "step's first lookup (a different batch inside one step?); pass sparse_embeddings=False"
            )
        original = p.data[rows]  # a copy: the exact bits to put back
        z = self.opt._row_noise(p, self.seed, index, rows)
        p.data[rows] = z.mul_(self.sign * group["eps"]).add_(original).to(p.dtype)
        self.saved[id(p)] = [(rows, original), 1]
        self.seen.add(index)

    def _put_back(self, p: torch.Tensor, saved: Any) -> None:
        if isinstance(saved, tuple):  # sparse embedding rows
            rows, original = saved
            p.data[rows] = original
        else:
            p.data = saved

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        for p in module._parameters.values():
            if p is None:
                continue
            slot = self.saved.get(id(p))
            if slot is None:
                continue
            slot[1] -= 1
            if slot[1] == 0:
                self._put_back(p, slot[0])
                del self.saved[id(p)]

    def __enter__(self) -> _PerturbInForward:
        from torch.nn.modules import module as module_mod

        self.handles = [
            module_mod.register_module_forward_pre_hook(self._pre),
            module_mod.register_module_forward_hook(self._post, always_call=True),
        ]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        # a forward that raised, or a module that never finished: put every original back
        for key, (original, _) in list(self.saved.items()):
            self._put_back(self.targets[key][1], original)
        self.saved.clear()
