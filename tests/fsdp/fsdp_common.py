"""Shared pieces of the 2-process FSDP2 tests: a launcher (torchrun, gloo on CPU), the worker entry
point, tiny models built in code and the helpers that compare a sharded model with an unsharded one.

Every worker builds the same seeded model twice in each process: an unsharded reference trained on the
whole batch, and a ``fully_shard`` copy trained on this rank's half of it. The worker gathers what it
needs, measures the differences and returns plain numbers; rank 0 writes every rank's numbers as JSON
and the test asserts on them."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WORLD = 2


def launch(worker: str, tmp_path: Path, *args: str, timeout: int = 300) -> list[dict]:
    """Run ``tests/fsdp/<worker>`` under ``torchrun --nproc_per_node 2``; return each rank's result."""
    out = tmp_path / f"{Path(worker).stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD)]
    cmd += [str(HERE / worker), str(out), *args]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    return json.loads(out.read_text())["ranks"]


def worker_main(run: Callable[[int, int, list[str]], dict]) -> None:
    """Entry point of a worker: gloo process group, ``run(rank, world, argv)``, all results to argv[1]."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = run(rank, world, sys.argv[2:])
    results: list = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"ranks": results}))
    dist.barrier()
    gc.collect()  # FSDP2's state sits in reference cycles: free the sharded models while their group lives
    dist.destroy_process_group()
    exit_without_teardown()


def exit_without_teardown() -> None:
    """Leave the process with status 0, skipping the interpreter's teardown. torch 2.13's gloo backend
    now and then aborts there ("terminate called without an active exception", SIGABRT, after the
    results were written and the group destroyed: 4 in 70 runs of worker_noise_scale.py, and once in
    CI); the exit status of a worker should report its work, not that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Block(nn.Module):
    """Linear, tanh, Linear: two LoRA targets, odd row counts so that shards are uneven (11 -> 6/5)."""

    def __init__(self, d_in: int, hidden: int, d_out: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


class TinyMLP(nn.Module):
    """Two blocks and a head: 12 -> 11 -> 13 -> 9 -> 13 -> 3."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(12, 11, 13), Block(13, 9, 13)])
        self.head = nn.Linear(13, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.head(x)


def tiny_mlp(dtype: torch.dtype = torch.float32, seed: int = 0) -> TinyMLP:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMLP().to(dtype)


def peft_mlp(dtype: torch.dtype = torch.float32, r: int = 3, seed: int = 0, **lora_kwargs) -> nn.Module:
    """The tiny MLP with PEFT LoRA (rank r, alpha 2r) on every fc1/fc2 and the head trained fully."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=["fc1", "fc2"], modules_to_save=["head"]
    )
    for key, value in lora_kwargs.items():
        setattr(cfg, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        return get_peft_model(tiny_mlp(dtype, seed), cfg).to(dtype)


def shard(model: nn.Module, blocks: nn.ModuleList | None = None) -> nn.Module:
    """``fully_shard`` every block, then the root (FSDP2's usual layout)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks if blocks is not None else _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError("no ModuleList of blocks")


def batch(step: int, n: int = 8, d_in: int = 12, d_out: int = 3, dtype=torch.float32):
    """The whole batch of a step (the same on every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, d_in, generator=g).to(dtype)
    y = torch.randn(n, d_out, generator=g).to(dtype)
    return x, y


def half(t: torch.Tensor, rank: int, world: int = WORLD) -> torch.Tensor:
    """This rank's equal share of a batch."""
    n = t.shape[0] // world
    return t[rank * n : (rank + 1) * n]


def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a (possibly sharded) model, whole, keyed by name (a collective)."""
    from gradkit.fsdp import full

    return {n: full(p.detach()).clone() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
