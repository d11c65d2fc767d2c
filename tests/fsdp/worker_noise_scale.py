"""NoiseScale on an FSDP2-sharded model against the same estimates computed by hand in one process
(2 processes; see fsdp_common). Each rank trains the sharded model on its half of every batch; the
reference, in every process, computes each rank's local gradient (and each micro-batch's) on an
unsharded copy with torch.autograd.grad, feeds their squared norms to a NoiseScale exactly as DDP's
recorder would (small: the mean over ranks of |g_local|², big: |mean gradient|²) and steps with the
mean gradient."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, gathered, half, shard, tiny_mlp, worker_main  # noqa: E402

from gradkit import NoiseScale  # noqa: E402

STEPS, LR, BETA = 3, 0.2, 0.5
KEYS = ("small_sq_norm", "big_sq_norm", "grad_sq_norm", "trace_sigma")


def split(t: torch.Tensor, parts: int) -> list[torch.Tensor]:
    return list(t.chunk(parts))


def snapshot(gns: NoiseScale) -> dict:
    """The smoothed estimates (what a user reads) and the raw ones of the latest update."""
    out = {"b_simple": gns.b_simple, "smoothed_grad_sq_norm": gns.grad_sq_norm}
    out["smoothed_trace_sigma"] = gns.trace_sigma
    return {**out, **{k: gns.last[k] for k in (*KEYS, "b_small", "b_big")}}


def reference_step(ref, gns: NoiseScale, x, y, world: int, micro: int) -> dict:
    """Every rank's ``micro`` micro-batch gradients by hand; the two-batch update; an SGD step."""
    params = list(ref.parameters())
    grads = []
    for r in range(world):
        for xm, ym in zip(split(half(x, r, world), micro), split(half(y, r, world), micro), strict=True):
            g = torch.autograd.grad(F.mse_loss(ref(xm), ym), params)
            grads.append(torch.cat([t.reshape(-1) for t in g]))
    stacked = torch.stack(grads).double()
    small = float(stacked.pow(2).sum(1).mean())
    mean = stacked.mean(0)
    b_small = x.shape[0] // (world * micro)
    gns.update(small, float(mean.pow(2).sum()), b_small, x.shape[0])
    with torch.no_grad():
        start = 0
        for p in params:
            p -= LR * mean[start : start + p.numel()].view_as(p).to(p.dtype)
            start += p.numel()
    return snapshot(gns)


def run_accumulation(rank: int, world: int, micro: int, sync_each: bool) -> dict:
    """``micro`` micro-batches per rank and step (their losses divided by ``micro``); without
    ``sync_each`` every backward but the last runs with gradient sync off (the local unsharded
    gradient accumulates, one reduce-scatter per step)."""
    ref, model = tiny_mlp(), shard(tiny_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gns_ref, gns = NoiseScale(beta=BETA), NoiseScale(model, beta=BETA)
    got, want = [], []
    with gns.accumulation_hooks() as rec:
        for step in range(STEPS):
            x, y = batch(step)
            want.append(reference_step(ref, gns_ref, x, y, world, micro))
            xs, ys = split(half(x, rank, world), micro), split(half(y, rank, world), micro)
            for j, (xm, ym) in enumerate(zip(xs, ys, strict=True)):
                if not sync_each:
                    model.set_requires_gradient_sync(j == micro - 1)
                (F.mse_loss(model(xm), ym) / micro).backward()
                rec.micro_step(xm.shape[0])
            rec.step()
            opt.step()
            opt.zero_grad()
            got.append(snapshot(gns))
        hooked = sum(h is not None for h in rec._fsdp._hooked)
    full = gathered(model)
    weights_diff = max(float((full[n] - p.detach()).abs().max()) for n, p in ref.named_parameters())
    return {"got": got, "want": want, "weights_diff": weights_diff, "hooked": hooked}


def run_per_example(rank: int, world: int) -> dict:
    """Per-example norms (b = 1) on the sharded model against the same recorder on the whole batch in
    one process: B is all ranks' examples, |G_B|² the reduced gradient's squared norm."""
    ref, model = tiny_mlp(), shard(tiny_mlp())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=LR)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gns_ref, gns = NoiseScale(ref, beta=BETA), NoiseScale(model, beta=BETA)
    got, want = [], []
    with gns_ref.per_example_hooks() as rec_ref, gns.per_example_hooks() as rec:
        for step in range(STEPS):
            x, y = batch(step)
            F.mse_loss(ref(x), y).backward()
            rec_ref.step()
            opt_ref.step()
            opt_ref.zero_grad()
            F.mse_loss(model(half(x, rank, world)), half(y, rank, world)).backward()
            rec.step()
            opt.step()
            opt.zero_grad()
            got.append(snapshot(gns))
            want.append(snapshot(gns_ref))
    return {"got": got, "want": want}


def refusals() -> dict:
    """What the recorder refuses on a sharded model, with its message."""
    from torch.distributed.fsdp import fully_shard

    from gradkit.errors import GradkitError

    partly = tiny_mlp()
    for block in partly.blocks:
        fully_shard(block)  # the head stays a plain parameter that FSDP2 never reduces
    cases = {
        "distributed_false": (shard(tiny_mlp()), {"distributed": False}),
        "fused": (shard(tiny_mlp()), {"fused": True}),
        "plain_parameter": (partly, {}),
    }
    out = {}
    for name, (model, kwargs) in cases.items():
        try:
            NoiseScale(model).accumulation_hooks(**kwargs).remove()
            out[name] = ""
        except GradkitError as err:
            out[name] = str(err)
    return out


def run(rank: int, world: int, argv: list[str]) -> dict:
    torch.manual_seed(0)
    return {
        "refusals": refusals(),
        "one_micro": run_accumulation(rank, world, micro=1, sync_each=True),
        "accumulate_no_sync": run_accumulation(rank, world, micro=2, sync_each=False),
        "accumulate_sync_each": run_accumulation(rank, world, micro=2, sync_each=True),
        "per_example": run_per_example(rank, world),
        "trainable": sum(1 for p in tiny_mlp().parameters() if p.requires_grad),
    }


if __name__ == "__main__":
    worker_main(run)
