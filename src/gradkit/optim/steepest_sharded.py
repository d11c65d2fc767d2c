""":class:`gradkit.SteepestDescent` on FSDP2-sharded parameters (``fully_shard``: row-sharded DTensors
on a 1-D mesh), equal to the step on the whole tensors.

Each norm's direction needs a different part of the whole tensor:

- ``linf``: ``sign(m)`` is elementwise; each rank steps its own rows, no communication.
- ``l2`` / ``rms``: ``m / ‖m‖₂`` needs the whole tensor's norm: each rank's sum of squares (in at least
  float32) is all-reduced, one scalar per tensor.
- ``spectral``: ``U Vᵀ`` needs the whole matrix. The matrices go in rounds of ``world``, in the step's
  order: in each round rank ``j`` owns the round's ``j``-th matrix, which is gathered whole on it alone
  (its shards padded to ``ceil(rows / world)`` rows, ``torch.chunk``'s layout); every owner computes
  its direction at the same time as the others, and the directions are scattered back by rows (the
  owner-based scheme of distributed Muon implementations). Memory per rank: one matrix whole, twice
  (the gathered momentum and its direction, in the momentum's dtype), plus one padded shard per matrix
  of the round. Compute: each matrix's SVD or Newton–Schulz runs once, on one rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist

from gradkit.errors import GradkitError

__all__ = ["check_layout", "global_norm", "spectral_directions"]


def check_layout(p: torch.Tensor) -> None:
    """Refuse a DTensor that is not FSDP2's row sharding on a 1-D mesh (HSDP, tensor parallelism)."""
    from torch.distributed.tensor import Shard

    if p.device_mesh.ndim != 1 or not (isinstance(p.placements[0], Shard) and p.placements[0].dim == 0):  # type: ignore[attr-defined]
        raise GradkitError(
            f"SteepestDescent on a DTensor with placements {p.placements} on a {p.device_mesh.ndim}-D mesh: "  # type: ignore[attr-defined]
            "only FSDP2's Shard(0) on a 1-D mesh is supported; shard with fully_shard over one mesh dimension"
        )


def global_norm(p: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """‖m‖₂ over the whole tensor, from this rank's rows ``m`` of the sharded parameter ``p``'s
    momentum or gradient, accumulated in at least float32."""
    sq = torch.linalg.vector_norm(m, dtype=torch.promote_types(m.dtype, torch.float32)).square()
    dist.all_reduce(sq, group=p.device_mesh.get_group())  # type: ignore[attr-defined]
    return sq.sqrt()


def _padded(part: torch.Tensor, rows: int) -> torch.Tensor:
    """``part`` with zero rows appended up to ``rows`` rows (a copy, contiguous)."""
    out = part.new_zeros((rows, *part.shape[1:]))
    out[: part.shape[0]] = part
    return out


def spectral_directions(
    tensors: list[tuple[torch.Tensor, torch.Tensor]], direction: Callable[[torch.Tensor], torch.Tensor]
) -> list[torch.Tensor]:
    """This rank's rows of ``direction(whole m)`` for every ``(p, m)``: ``p`` a sharded parameter (all
    on one mesh), ``m`` this rank's rows of its momentum or gradient. In rounds of ``world`` matrices,
    rank ``j`` of the round gathers matrix ``j`` whole, computes its direction (all ranks at once) and
    scatters it back by rows."""
    if not tensors:
        return []
    group = tensors[0][0].device_mesh.get_group()  # type: ignore[attr-defined]
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    out: list[torch.Tensor] = []
    for start in range(0, len(tensors), world):
        out += _round(tensors[start : start + world], direction, group, rank, world)
    return out


def _round(tensors, direction, group, rank: int, world: int) -> list[torch.Tensor]:
    """One round: matrix ``j`` is owned by rank ``j`` (``len(tensors) <= world``)."""
    chunks = [math.ceil(p.shape[0] / world) for p, _ in tensors]
    mine: torch.Tensor | None = None
    for j, (p, m) in enumerate(tensors):  # every matrix whole on its owner
        padded = _padded(m, chunks[j])
        pieces = [torch.empty_like(padded) for _ in range(world)] if rank == j else None
        dist.gather(padded, pieces, dst=dist.get_global_rank(group, j), group=group)
        if pieces is not None:
            mine = torch.cat(pieces)[: p.shape[0]]
    if mine is not None:  # this rank's matrix of the round, while the others compute theirs
        mine = _padded(direction(mine), chunks[rank] * world)
    out = []
    for j, (_, m) in enumerate(tensors):  # each direction back to the ranks' rows
        received = m.new_empty((chunks[j], *m.shape[1:]))
        pieces = list(mine.split(chunks[j])) if rank == j and mine is not None else None
        dist.scatter(received, pieces, src=dist.get_global_rank(group, j), group=group)
        out.append(received[: m.shape[0]])
    return out
