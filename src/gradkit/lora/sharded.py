"""LoRA-GA's exact estimate of a layer whose base weight is sharded by FSDP2 (``fully_shard``).

Each rank accumulates only its rows of the mean gradient ``G`` (FSDP2 reduce-scatters every batch's
weight gradient, so the rows a rank holds are already averaged over ranks): the whole ``G`` of a
layer is never formed while the batches run. The top-2r SVD then needs the whole matrix, so it is
gathered, one layer at a time, onto one rank only (layers are dealt round-robin over ranks, so the
SVDs run in parallel and no rank holds more than one whole gradient at a time), and that rank
broadcasts the top-2r triplets ``U[:, :2r]``, ``S[:2r]``, ``Vh[:2r]`` (``2r (out + in + 1)`` floats),
all every rank needs to write its shards of A0, B0 and of the offset base. Why gather rather than a
distributed SVD: the result is then the very LAPACK SVD a single process computes (a Gram-matrix
eigendecomposition squares the condition number and fixes signs differently).
"""

from __future__ import annotations

import torch

from gradkit.errors import GradkitError
from gradkit.fsdp import shard_offset
from gradkit.linalg import truncated_svd


class ShardedGradient:
    """This rank's rows of a layer's mean base-weight gradient, in the weight's own layout (in x out
    for ``fan_in_fan_out`` layers), fp32; ``weight`` is the sharded base weight (a DTensor)."""

    def __init__(self, part: torch.Tensor, weight: torch.Tensor, fan_in_fan_out: bool):
        from torch.distributed.tensor import Shard

        mesh, placements = weight.device_mesh, weight.placements  # type: ignore[attr-defined]
        if mesh.ndim != 1 or tuple(placements) != (Shard(0),):
            raise GradkitError(
                f"LoRA-GA under FSDP2 supports a 1-D device mesh with Shard(0) (fully_shard's default), "
                f"got mesh {tuple(mesh.shape)} with {tuple(placements)}"
            )
        self.part, self.weight, self.fan = part, weight, fan_in_fan_out
        self.group = mesh.get_group()

    # --- figures, agreed by every rank --------------------------------------------------------
    def _reduce(self, value: float, op) -> float:
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.part.device)
        dist.all_reduce(t, op=op, group=self.group)
        return float(t.item())

    def isfinite(self) -> bool:
        import torch.distributed as dist

        return self._reduce(float(bool(torch.isfinite(self.part).all())), dist.ReduceOp.MIN) > 0

    def is_zero(self) -> bool:
        import torch.distributed as dist

        return self._reduce(float(bool(self.part.any())), dist.ReduceOp.MAX) == 0

    def frobenius_sq(self) -> float:
        """``||G||_F^2``, summed over the ranks' rows (fp64)."""
        import torch.distributed as dist

        return self._reduce(
            float(torch.linalg.vector_norm(self.part, dtype=torch.float64)) ** 2, dist.ReduceOp.SUM
        )

    @property
    def peak_nbytes(self) -> int:
        """Bytes this rank holds while the batches run (its rows only)."""
        return self.part.numel() * self.part.element_size()

    # --- the SVD --------------------------------------------------------------------------------
    def svd(self, rank: int, *, owner: int, seed: int = 0):
        """Top-``rank`` triplets (U, S, Vh) of G (out x in), the same on every rank: G is gathered on
        group rank ``owner % world``, which runs :func:`gradkit.linalg.truncated_svd` and broadcasts them."""
        import torch.distributed as dist

        group, part = self.group, self.part
        world, me = dist.get_world_size(group), dist.get_rank(group)
        owner %= world
        rows = self.weight.shape[0]
        chunk = -(-rows // world)  # torch.chunk's rule: FSDP2's Shard(0) row blocks
        padded = part.new_zeros((chunk, *part.shape[1:]))
        padded[: part.shape[0]].copy_(part)
        dst = dist.get_global_rank(group, owner)
        pieces = [torch.empty_like(padded) for _ in range(world)] if me == owner else None
        dist.gather(padded, pieces, dst=dst, group=group)
        out_f, in_f = (self.weight.shape[1], rows) if self.fan else (rows, self.weight.shape[1])
        if me == owner:
            sizes = [max(0, min(chunk, rows - i * chunk)) for i in range(world)]
            whole = torch.cat([p[:n] for p, n in zip(pieces, sizes, strict=True)])
            del pieces
            U, S, Vh = truncated_svd(whole.T if self.fan else whole, rank, seed=seed)
            U, S, Vh = U.contiguous(), S.contiguous(), Vh.contiguous()
            del whole
        else:
            U = part.new_empty((out_f, rank))
            S = part.new_empty((rank,))
            Vh = part.new_empty((rank, in_f))
        for t in (U, S, Vh):
            dist.broadcast(t, src=dst, group=group)
        return U, S, Vh


def local_rows(weight: torch.Tensor) -> slice:
    """The rows of the (weight-layout) tensor this rank holds."""
    shape, offset = shard_offset(weight)
    return slice(offset[0], offset[0] + shape[0])
