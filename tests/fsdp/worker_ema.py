"""EMA on an FSDP2-sharded model against the same EMA on the unsharded model (2 processes; see
fsdp_common). argv[2]: a folder for the exported safetensors file."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from fsdp_common import batch, half, shard, tiny_mlp, worker_main  # noqa: E402

from gradkit import EMA  # noqa: E402
from gradkit.fsdp import local  # noqa: E402


def train_step(model, opt, ema, x, y) -> None:
    F.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()
    ema.update()


def run(rank: int, world: int, argv: list[str]) -> dict:
    folder = argv[0]
    ref, model = tiny_mlp(), shard(tiny_mlp())
    params = list(model.parameters())  # the sharded DTensors
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.2)
    opt = torch.optim.SGD(params, lr=0.2)
    ema_ref, ema = EMA(ref, decay=0.6), EMA(model, decay=0.6)
    for step in range(3):
        x, y = batch(step)
        train_step(ref, opt_ref, ema_ref, x, y)
        train_step(model, opt, ema, half(x, rank), half(y, rank))
    out: dict = {
        "shadow_numel": sum(s.numel() for s in ema.shadow),
        "local_numel": sum(local(p).numel() for p in params),
        "full_numel": sum(p.numel() for p in params),
    }
    x, _ = batch(50)
    training = [local(p.detach()).clone() for p in params]
    with torch.no_grad():
        train_out = model(x).clone()
        with ema_ref.swapped(), ema.swapped():
            out["swapped_diff"] = float((model(x) - ref(x)).abs().max())
            out["swapped_moved"] = float((model(x) - train_out).abs().max())
        out["restored_bits"] = all(torch.equal(local(p), t) for p, t in zip(params, training, strict=True))
        out["restored_output"] = bool(torch.equal(model(x), train_out))
    # resume: a new EMA loaded from this one's state takes the same next step
    saved = ema.state_dict()
    resumed = EMA(model, decay=0.9)
    resumed.load_state_dict(saved)
    x, y = batch(3)
    train_step(ref, opt_ref, ema_ref, x, y)
    train_step(model, opt, ema, half(x, rank), half(y, rank))
    resumed.update()
    out["resume_equal"] = all(torch.equal(a, b) for a, b in zip(resumed.shadow, ema.shadow, strict=True))
    path = f"{folder}/ema.safetensors"
    ema.save_safetensors(path)
    if rank == 0:
        from safetensors.torch import load_file

        got, want = load_file(path), ema_ref.averaged_state_dict()
        out["export_keys_equal"] = sorted(got) == sorted(want)
        out["export_diff"] = max(float((got[k] - want[k]).abs().max()) for k in want)
        out["export_moved"] = max(float((want[k] - tiny_mlp().state_dict()[k]).abs().max()) for k in want)
    return out


if __name__ == "__main__":
    worker_main(run)
