"""Gradient clipping on an FSDP2-sharded model against the same gradients whole (2 processes; see
fsdp_common): gradkit.fsdp.clip_grad_norm_ on the sharded gradients, torch's clip_grad_norm_ on plain
copies of the whole gradients (what one process or DDP computes) and on the sharded ones."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, half, shard, tiny_mlp, worker_main  # noqa: E402

from gradkit.fsdp import clip_grad_norm_, full  # noqa: E402

STEPS = 20


def run(rank: int, world: int, argv: list[str]) -> dict:
    model = shard(tiny_mlp())
    params = list(model.parameters())
    out = {"ours_equal": [], "torch_sharded_equal": [], "clipped": []}
    for step in range(STEPS):
        x, y = batch(step)
        F.mse_loss(model(half(x, rank)), half(y, rank)).backward()
        whole = [torch.nn.Parameter(full(p.grad).clone()) for p in params]
        for w in whole:
            w.grad = w.detach().clone()
        sharded = [torch.nn.Parameter(p.detach().clone()) for p in params]  # torch's DTensor path
        for s, p in zip(sharded, params, strict=True):
            s.grad = p.grad.clone()
        max_norm = 0.5 * float(torch.nn.utils.get_total_norm([w.grad for w in whole]))
        want = torch.nn.utils.clip_grad_norm_(whole, max_norm)
        got = clip_grad_norm_(params, max_norm)
        theirs = torch.nn.utils.clip_grad_norm_(sharded, max_norm)
        out["clipped"].append(float(want) > max_norm)
        out["ours_equal"].append(
            bool(torch.equal(got, want))
            and all(torch.equal(full(p.grad), w.grad) for p, w in zip(params, whole, strict=True))
        )
        out["torch_sharded_equal"].append(bool(torch.equal(full(theirs), want)))
        for p in params:
            p.grad = None
    return out


if __name__ == "__main__":
    worker_main(run)
