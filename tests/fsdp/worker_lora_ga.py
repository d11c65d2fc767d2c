"""lora_ga_init on an FSDP2-sharded PEFT model against the unsharded model on the whole batches
(2 processes; see fsdp_common). argv: none."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, gathered, half, max_abs_diff, peft_mlp, shard, worker_main  # noqa: E402

from gradkit import lora_ga_init  # noqa: E402
from gradkit.fsdp import full, local  # noqa: E402
from gradkit.lora.pairs import lora_pairs  # noqa: E402

N_BATCHES = 3
R = 2  # 2r = 4: the top-4 singular values of every layer are well separated (gaps >= 20 %)


def loss_fn(model, b):
    x, y = b
    return F.mse_loss(model(x), y)


def batches(rank: int | None, dtype=torch.float32):
    out = [batch(i, dtype=dtype) for i in range(N_BATCHES)]
    return out if rank is None else [(half(x, rank), half(y, rank)) for x, y in out]


def projectors(model) -> dict[str, torch.Tensor]:
    """Sign-free picture of an init: A^T A and B B^T per layer (singular vectors' signs are arbitrary)."""
    out = {}
    for pair in lora_pairs(model):
        A, B = full(pair.A.detach()).double(), full(pair.B.detach()).double()
        out[pair.name + ".AtA"], out[pair.name + ".BBt"] = A.T @ A, B @ B.T
    return out


def case(rank: int, estimator: str, passes: int = 1, dtype=torch.float32) -> dict:
    ref, model = peft_mlp(dtype, r=R), shard(peft_mlp(dtype, r=R))
    base = [p for n, p in model.named_parameters() if "base_layer.weight" in n]
    x, _ = batch(77, dtype=dtype)
    with torch.no_grad():
        before = model(x).clone()
    kw = dict(loss_fn=loss_fn, estimator=estimator, progress=False, sketch_passes=passes)
    lora_ga_init(ref, batches(None, dtype), **kw)
    report = lora_ga_init(model, batches(rank, dtype), **kw)
    with torch.no_grad():
        after = model(x)
    exact_ref = peft_mlp(dtype, r=R)
    lora_ga_init(exact_ref, batches(None, dtype), loss_fn=loss_fn, progress=False)
    got = gathered(model)
    return {
        "diff": max_abs_diff(got, gathered(ref)),
        "projector_diff_to_exact": max_abs_diff(projectors(model), projectors(exact_ref)),
        "moved": max_abs_diff(gathered(ref), gathered(peft_mlp(dtype, r=R))),
        "output_unchanged": float((after - before).abs().max()),
        "bytes_held": report.bytes_held,
        "local_base_bytes": sum(local(w).numel() * w.element_size() for w in base),
        "full_base_bytes": sum(w.numel() * w.element_size() for w in base),
        "energy": report.energy_captured,
    }


def bf16_case(rank: int) -> dict:
    """bf16 model: A0 and B0 equal the fp64 SVD of the fp32 mean gradient (sign-aligned), rounded once to
    bf16, and the offset base equals bf16(W0 - s B0 A0) computed in fp64 from the stored factors."""
    from gradkit.lora.estimate import estimate_gradients
    from gradkit.lora.ga import stable_scale

    model = shard(peft_mlp(torch.bfloat16, r=R))
    pairs = lora_pairs(model)
    grads, _ = estimate_gradients(
        model, batches(rank, torch.bfloat16), pairs, loss_fn=loss_fn, progress=False
    )
    from gradkit.fsdp import gather_rows

    G = {n: gather_rows(g.part, g.weight).double() for n, g in grads.items()}  # test only: whole G
    W0 = {p.name: full(p.layer.get_base_layer().weight.detach()).double() for p in pairs}
    lora_ga_init(model, batches(rank, torch.bfloat16), loss_fn=loss_fn, progress=False)
    worst = {"A": 0.0, "B": 0.0, "W": 0.0}
    eps = torch.finfo(torch.bfloat16).eps
    for pair in pairs:
        r, s = pair.rank, pair.scaling
        U, _, Vh = torch.linalg.svd(G[pair.name], full_matrices=False)
        c = stable_scale(U.shape[0])
        A, B = full(pair.A.detach()).double(), full(pair.B.detach()).double()
        want_A, want_B = c * Vh[:r], c * U[:, r : 2 * r]
        want_A = want_A * torch.sign((want_A * A).sum(1, keepdim=True))  # singular vectors' signs
        want_B = want_B * torch.sign((want_B * B).sum(0, keepdim=True))
        for key, got, want in (("A", A, want_A), ("B", B, want_B)):
            err = (got - want).abs() / (eps * want.abs().clamp_min(1e-3))
            worst[key] = max(worst[key], float(err.max()))
        W = full(pair.layer.get_base_layer().weight.detach()).double()
        want_W = (W0[pair.name] - s * B @ A).to(torch.bfloat16).double()
        worst["W"] = max(worst["W"], float(((W - want_W).abs() / (eps * want_W.abs().clamp_min(1e-3))).max()))
    return {"worst_ulps": worst, "dtype": str(pairs[0].A.dtype)}


def run(rank: int, world: int, argv: list[str]) -> dict:
    return {
        "exact": case(rank, "exact"),
        "sketch1": case(rank, "sketch", 1),
        "sketch2": case(rank, "sketch", 2),
        "bf16": bf16_case(rank),
    }


if __name__ == "__main__":
    worker_main(run)
