"""What a run's summary measures about the run itself rather than the model's quality: the optimiser's
state in bytes, the peak memory, and whether every process ended with the same weights."""

from __future__ import annotations

import hashlib
import resource
from typing import Any

import torch

from gradkit.fsdp import full, local, reshard


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Exact bytes of every tensor held in the optimiser's per-parameter state (on this process: a
    tensor sharded by ``--fsdp`` counts its local shard)."""
    optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                total += local(value).numel() * value.element_size()
    return total


def peak_memory_mb(device: torch.device) -> float:
    """Peak device memory for CUDA, else this process's peak resident set size (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ranks_agree(model: torch.nn.Module, accelerator: Any) -> bool:
    """True when every process holds bit-identical parameters (a SHA-256 of their bytes, gathered).
    Under ``--fsdp`` each parameter is first gathered whole (one at a time, every rank takes part)."""
    from accelerate.utils import gather_object

    # after a forward alone FSDP2 leaves the root's unsharded parameters registered; .numpy() below
    # would pin their storage, which FSDP2 must free: reshard, so every sharded one is gathered afresh
    reshard(model)
    digest = hashlib.sha256()
    for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        whole = full(param.detach())
        digest.update(whole.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too
    digests = gather_object([digest.hexdigest()])
    return len(set(digests)) == 1
