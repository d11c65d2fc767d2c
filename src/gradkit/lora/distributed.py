"""The few torch.distributed collectives LoRA-GA's estimators need; each is a no-op without a process
group, and NCCL gets CUDA copies of CPU tensors (the exact estimator may offload its sums to the CPU)."""

from __future__ import annotations

import torch


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if _group_ready() else 1


def rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if _group_ready() else 0


def _needs_cuda(t: torch.Tensor) -> bool:
    import torch.distributed as dist

    return dist.get_backend() == "nccl" and not t.is_cuda


def all_reduce_tensors_(tensors: list[torch.Tensor]) -> None:
    """Sum over processes in place."""
    import torch.distributed as dist

    if not _group_ready():
        return
    for t in tensors:
        if _needs_cuda(t):
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """Every process's ``t`` (same shape on all), in rank order, on ``t``'s device."""
    import torch.distributed as dist

    if not _group_ready():
        return [t]
    send = t.cuda() if _needs_cuda(t) else t.contiguous()
    got = [torch.empty_like(send) for _ in range(dist.get_world_size())]
    dist.all_gather(got, send)
    return [g.to(t.device) for g in got]


def global_count(count: int, device: torch.device) -> int:
    """The sum of ``count`` over processes."""
    t = torch.tensor([float(count)], dtype=torch.float64, device=device)
    all_reduce_tensors_([t])
    return int(t.item())
