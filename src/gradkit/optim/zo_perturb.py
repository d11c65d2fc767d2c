"""How :class:`gradkit.ZerothOrder` makes every read of an optimised tensor see ``θ + sign ε z`` for one
evaluation of the closure, and puts the parameters back afterwards.

- **restore="exact"** (plain tensors): nothing is written into the original storage. While the closure
  runs, a module forward pre-hook swaps each optimised parameter's ``.data`` for a perturbed copy
  ``θ + s ε z`` (computed in at least fp32, cast to the parameter's dtype) for the forward of the module
  that holds it, and swaps the original storage back when that forward ends, so the extra memory is one
  module's parameters at a time. A read outside such a forward is caught by a torch function mode
  (:class:`Perturbed`; reads of metadata such as ``.dtype`` or ``.shape`` do not count): from then on
  that tensor stays swapped for the rest of the evaluation, which costs one perturbed copy of it. An
  ``nn.Embedding`` on the sparse path has only the rows it looks up perturbed, in place, their original
  bits saved and copied back. The hooks and the mode are process-wide while the closure runs: do not
  run other models' forwards in other threads meanwhile.
- **FSDP2** (``fully_shard``: row-sharded DTensors): each rank perturbs its own shard in place with its
  rows of the same ``z`` (:func:`shard_pieces`); with exact restore the saved bits of the shard are
  copied back after every evaluation (:func:`perturb_shards`, :func:`restore_shards`), and
  :class:`FreshGather` reshards every FSDP module around the evaluation so no forward reads stale
  gathered weights.
- **restore="subtract"**: :func:`shift_` moves the stored parameters in place by ``scale ε z``
  (arithmetic in at least fp32, stored in the parameter's dtype).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules import module as module_mod
from torch.overrides import TorchFunctionMode

from gradkit.fsdp import flat_range, is_dtensor, local
from gradkit.optim.zo_directions import Directions

__all__ = [
    "Entry",
    "FreshGather",
    "Perturbed",
    "data_parallel",
    "perturb_shards",
    "restore_shards",
    "shard_pieces",
    "shift_",
]

Entry = tuple[dict[str, Any], torch.Tensor, int]  # (param group, parameter, index in the optimiser)


def shard_pieces(
    directions: Directions, p: torch.Tensor, index: int, seed: int, scale: float = 1.0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(view of this rank's shard, scale·z there)`` pieces of a sharded parameter, chunk by chunk."""
    flat = local(p.data).view(-1)
    lo, hi = flat_range(p)
    for start, z in directions.range_chunks(tuple(p.shape), p.dtype, p.device, seed, index, lo, hi, scale):
        yield flat[start : start + z.numel()], z


def perturb_shards(
    directions: Directions, sharded: list[Entry], saved: list[torch.Tensor], seed: int, sign: float
) -> None:
    """restore="exact", FSDP2: each local shard becomes (its saved bits + sign ε z), in place."""
    for (group, p, index), bits in zip(sharded, saved, strict=True):
        flat = bits.view(-1)
        offset = 0
        for part, z in shard_pieces(directions, p, index, seed, sign * group["eps"]):
            part.copy_(z.add_(flat[offset : offset + part.numel()]))
            offset += part.numel()


def restore_shards(sharded: list[Entry], saved: list[torch.Tensor]) -> None:
    """restore="exact", FSDP2: copy each local shard's saved bits back."""
    for (_, p, _), bits in zip(sharded, saved, strict=True):
        local(p.data).copy_(bits)


def shift_(directions: Directions, entries: list[Entry], seed: int, scale: float) -> None:
    """restore="subtract": θ += scale ε z in place, one parameter (and one chunk of z) at a time."""
    for group, p, index in entries:
        if is_dtensor(p):
            for part, z in shard_pieces(directions, p, index, seed, scale * group["eps"]):
                part.copy_(z.add_(part))
            continue
        for _, part, z in directions.chunks(p.data, seed, index, scale * group["eps"]):
            part.copy_(z.add_(part))


class FreshGather:
    """While a closure runs: every FSDP2 module is resharded before its first forward (a forward
    pre-hook registered globally runs before FSDP's own, which then all-gathers the current, perturbed,
    local shards) and all of them again at the end (FSDP2 keeps the root's gathered weights after a
    forward: without this the next forward, the user's included, would read stale weights)."""

    def __enter__(self) -> FreshGather:
        from torch.distributed.fsdp import FSDPModule  # about a second to import; only FSDP2 runs need it

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


def data_parallel() -> bool:
    """True inside an initialised torch.distributed group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


class Perturbed(TorchFunctionMode):
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
        entries: list[Entry],
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

    def __enter__(self) -> Perturbed:
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
