"""ZerothOrder on an FSDP2-sharded model against the same optimiser on the unsharded model
(2 processes; see fsdp_common). argv: none."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, gathered, half, max_abs_diff, shard, tiny_mlp, worker_main  # noqa: E402

from gradkit import ZerothOrder  # noqa: E402
from gradkit.fsdp import local  # noqa: E402


def mean_over_ranks(loss: torch.Tensor) -> torch.Tensor:
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / dist.get_world_size()


def equal_steps(rank: int, restore: str, estimator: str = "spsa") -> dict:
    """fp64, 3 steps of 2 directions each (3 probes for fzoo) with weight decay: the sharded run equals
    the unsharded one."""
    ref, model = tiny_mlp(torch.float64), shard(tiny_mlp(torch.float64))
    sharded = all(type(p).__name__ == "DTensor" for p in model.parameters())
    # fzoo's σ-normalised step moves about lr / eps per unit direction: its lr is eps times spsa's
    n, lr = (3, 1e-4) if estimator == "fzoo" else (2, 0.05)
    kw = dict(lr=lr, eps=1e-3, n_samples=n, weight_decay=0.1, restore=restore, seed=7, estimator=estimator)
    if estimator == "svrg":  # an anchor, a step between (θ̄ read from the anchor's shards), an anchor
        kw["svrg_every"] = 2
    opt_ref, opt = ZerothOrder(ref.parameters(), **kw), ZerothOrder(model.parameters(), **kw)
    grads, grads_ref = [], []
    for step in range(3):
        x, y = batch(step, dtype=torch.float64)
        opt_ref.step(lambda x=x, y=y: F.mse_loss(ref(x), y))
        opt.step(lambda x=x, y=y: mean_over_ranks(F.mse_loss(model(half(x, rank)), half(y, rank))))
        grads += opt.last_projected_grads
        grads_ref += opt_ref.last_projected_grads
    x, _ = batch(99, dtype=torch.float64)
    with torch.no_grad():  # a forward after the steps reads the updated weights (no stale root gather)
        out_diff = float((model(x) - ref(x)).abs().max())
    return {
        "diff": max_abs_diff(gathered(model), gathered(ref)),
        "moved": max_abs_diff(gathered(ref), gathered(tiny_mlp(torch.float64))),
        "output_diff": out_diff,
        "grads": grads,
        "grads_ref": grads_ref,
        "sharded": sharded,
    }


def bf16_restore(rank: int, restore: str) -> dict:
    """bf16, lr = 0: after a step every local shard is bit-identical to before (exact restore), and
    the forward after it gives bit-identical outputs; the evaluations did see perturbed weights."""
    model = shard(tiny_mlp(torch.bfloat16))
    params = list(
        model.parameters()
    )  # the sharded DTensors (after a forward FSDP2 registers the root's gathered ones)
    opt = ZerothOrder(params, lr=0.0, eps=1e-2, n_samples=2, restore=restore, seed=3)
    x, y = batch(0, dtype=torch.bfloat16)
    with torch.no_grad():
        before_out = model(half(x, rank)).clone()
    before = [local(p.detach()).clone() for p in params]
    for _ in range(2):
        opt.step(lambda: mean_over_ranks(F.mse_loss(model(half(x, rank)).float(), half(y, rank).float())))
    after = [local(p.detach()) for p in params]
    with torch.no_grad():
        after_out = model(half(x, rank))
    changed = sum(
        int((a.view(torch.int16) != b.view(torch.int16)).sum()) for a, b in zip(after, before, strict=True)
    )
    return {
        "changed_elements": changed,
        "output_identical": bool(torch.equal(after_out, before_out)),
        "projected": opt.last_projected_grads,
    }


def run(rank: int, world: int, argv: list[str]) -> dict:
    out = {f"fp64-{r}": equal_steps(rank, r) for r in ("exact", "subtract")}
    out.update({f"fp64-fzoo-{r}": equal_steps(rank, r, "fzoo") for r in ("exact", "subtract")})
    out["fp64-svrg-exact"] = equal_steps(rank, "exact", "svrg")
    out.update({f"bf16-{r}": bf16_restore(rank, r) for r in ("exact", "subtract")})
    return out


if __name__ == "__main__":
    worker_main(run)
