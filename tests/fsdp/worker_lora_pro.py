"""LoRAPro on an FSDP2-sharded PEFT model against the same optimiser on the unsharded model
(2 processes; see fsdp_common). argv: none."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, gathered, half, max_abs_diff, peft_mlp, shard, worker_main  # noqa: E402

from gradkit import LoRAPro  # noqa: E402
from gradkit.fsdp import full, local  # noqa: E402
from gradkit.lora.pairs import lora_pairs  # noqa: E402
from gradkit.optim.lora_pro_math import adjusted_lora_grads  # noqa: E402

STEPS = 3
LR_BF16 = 1.0
FORMS = [("adamw", "full"), ("adamw", "projected"), ("adamw", "factor"), ("sgd", "projected")]


def fp32_case(rank: int, world: int, optimizer: str, moments: str) -> dict:
    """Three steps from PEFT's default init (B = 0 first, then the general branch)."""
    ref, model = peft_mlp(), shard(peft_mlp())
    kw = dict(
        lr=0.05 if optimizer == "adamw" else 0.01, optimizer=optimizer, moments=moments, weight_decay=0.01
    )
    opt_ref, opt = LoRAPro(ref, **kw), LoRAPro(model, **kw)
    for step in range(STEPS):
        x, y = batch(step)
        F.mse_loss(ref(x), y).backward()
        opt_ref.step()
        opt_ref.zero_grad()
        F.mse_loss(model(half(x, rank)), half(y, rank)).backward()
        opt.step()
        opt.zero_grad()
    got, want = gathered(model), gathered(ref)
    moved = max_abs_diff(want, gathered(peft_mlp()))
    out = {"diff": max_abs_diff(got, want), "moved": moved}
    if moments == "full":  # the out x in moments hold this rank's rows only
        shapes = {}
        for pair in lora_pairs(model):
            state = opt.state[pair.A]
            shapes[pair.name] = [list(state["exp_avg"].shape), list(local(pair.B).shape), list(pair.A.shape)]
        out["moment_shapes"] = shapes
    return out


def bf16_case(rank: int) -> dict:
    """bf16 factors with random B (the general branch): one SGD step equals the update computed in
    fp64 from the same (gathered) bf16 factors and gradients, rounded once to bf16."""
    model = shard(peft_mlp(torch.bfloat16, init_lora_weights=False))
    opt = LoRAPro(model, lr=LR_BF16, optimizer="sgd", x_solution="sylvester")
    x, y = batch(0, dtype=torch.bfloat16)
    F.mse_loss(model(half(x, rank)), half(y, rank)).backward()
    pairs = lora_pairs(model)
    before = []
    for pair in pairs:
        A, B = full(pair.A.detach()), full(pair.B.detach())
        gA, gB = full(pair.A.grad), full(pair.B.grad)
        hA, hB = adjusted_lora_grads(A.double(), B.double(), gA.double(), gB.double(), pair.scaling)
        before.append(
            (
                A,
                B,
                (A.double() - LR_BF16 * hA).to(torch.bfloat16),
                (B.double() - LR_BF16 * hB).to(torch.bfloat16),
            )
        )
    opt.step()
    worst_ulps = 0.0  # error in units of bf16's eps times the larger of old and new value
    for pair, (A, B, want_A, want_B) in zip(pairs, before, strict=True):
        for got, want, old in ((full(pair.A.detach()), want_A, A), (full(pair.B.detach()), want_B, B)):
            scale = torch.maximum(want.double().abs(), old.double().abs()).clamp_min(1e-30)
            ulp = torch.finfo(torch.bfloat16).eps * scale
            worst_ulps = max(worst_ulps, float(((got.double() - want.double()).abs() / ulp).max()))
    moved = max(
        float((full(p.A.detach()).double() - b[0].double()).abs().max())
        for p, b in zip(pairs, before, strict=True)
    )
    return {
        "bf16_worst_ulps": worst_ulps,
        "bf16_moved": moved,
        "dtypes": sorted({str(p.A.dtype) for p in pairs}),
    }


def run(rank: int, world: int, argv: list[str]) -> dict:
    out = {f"{o}-{m}": fp32_case(rank, world, o, m) for o, m in FORMS}
    out["bf16"] = bf16_case(rank)
    return out


if __name__ == "__main__":
    worker_main(run)
