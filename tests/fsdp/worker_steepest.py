"""SteepestDescent on an FSDP2-sharded model against the same optimiser on the unsharded model
(2 processes; see fsdp_common). argv: none."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, gathered, half, max_abs_diff, shard, tiny_mlp, worker_main  # noqa: E402

from gradkit.fsdp import full  # noqa: E402
from gradkit.optim import SteepestDescent  # noqa: E402

# (norm, extra settings): spectral by exact SVD (these matrices are small) and by Newton-Schulz
CASES = {
    "l2": ("l2", {}),
    "rms": ("rms", {}),
    "linf": ("linf", {}),
    "spectral": ("spectral", {}),
    "spectral-newton-schulz": ("spectral", {"svd_max": 0}),
}


def equal_steps(rank: int, case: str, dtype: torch.dtype) -> dict:
    """3 steps with Nesterov momentum and weight decay, the unsharded optimiser given the sharded run's
    gradients gathered whole (the two optimisers then see the same numbers): the weights must agree."""
    norm, extra = CASES[case]
    ref, model = tiny_mlp(dtype), shard(tiny_mlp(dtype))
    kw = dict(lr=0.05, norm=norm, momentum=0.9, nesterov=True, weight_decay=0.1, **extra)
    opt_ref, opt = SteepestDescent(ref.parameters(), **kw), SteepestDescent(model.parameters(), **kw)
    for step in range(3):
        x, y = batch(step, dtype=dtype)
        F.mse_loss(model(half(x, rank)), half(y, rank)).backward()
        for r, p in zip(ref.parameters(), model.parameters(), strict=True):
            r.grad = full(p.grad).clone()
        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
    return {
        "diff": max_abs_diff(gathered(model), gathered(ref)),
        "moved": max_abs_diff(gathered(ref), gathered(tiny_mlp(dtype))),
        "sharded": all(type(p).__name__ == "DTensor" for p in model.parameters()),
    }


def run(rank: int, world: int, argv: list[str]) -> dict:
    out = {f"{case}-fp32": equal_steps(rank, case, torch.float32) for case in CASES}
    out.update({f"{case}-fp64": equal_steps(rank, case, torch.float64) for case in CASES})
    return out


if __name__ == "__main__":
    worker_main(run)
