"""gradkit's tools on an FSDP2-sharded model. Run: torchrun --nproc_per_node 2 docs/fsdp_example.py OUT_DIR

gloo on CPU (nccl on GPUs works the same); each rank trains on its own half of every batch."""

import gc
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.distributed.fsdp import fully_shard

import gradkit

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
os.makedirs(out_dir, exist_ok=True)  # a new folder, as in the docs' command


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64), nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


torch.manual_seed(0)  # the same initial weights on every rank
config = LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], modules_to_save=["head"])
model = get_peft_model(Net(), config)
for block in model.base_model.model.blocks:
    fully_shard(block)  # one FSDP unit per block, then the root
fully_shard(model)


def data(step):  # this rank's half of the step's batch of 16
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(16, 32, generator=g), torch.randint(0, 4, (16,), generator=g)
    return x[rank * 8 : (rank + 1) * 8], y[rank * 8 : (rank + 1) * 8]


def loss_fn(m, batch):
    x, y = batch
    return F.cross_entropy(m(x), y)


# LoRA-GA: each rank sums its rows of the gradients; the SVDs gather one layer at a time on one rank
report = gradkit.lora_ga_init(model, [data(i) for i in range(4)], loss_fn=loss_fn, progress=False)
opt = gradkit.LoRAPro(model, lr=1e-3, moments="projected")  # the factors are gathered, tiny
ema = gradkit.EMA(model, decay=0.9)  # each rank averages its own shard
for step in range(5):
    loss = loss_fn(model, data(100 + step))
    loss.backward()
    opt.step()
    opt.zero_grad()
    ema.update()
    if rank == 0:
        print(f"step {step} loss {loss.item():.4f}")
ema.save_safetensors(f"{out_dir}/ema.safetensors")  # gathered, written by rank 0

# zeroth order: every rank perturbs its shard with the same z; the closure returns the global loss
zo = gradkit.ZerothOrder([p for p in model.parameters() if p.requires_grad], lr=1e-3, eps=1e-3, seed=0)


def global_loss():
    loss = loss_fn(model, data(200)).detach().clone()
    dist.all_reduce(loss)
    return loss / world


# the same on every rank; one write per line, so the two ranks' lines never interleave in a shared pipe
sys.stdout.write(f"rank {rank} zeroth-order loss {float(zo.step(global_loss)):.6f}\n")
sys.stdout.flush()
gc.collect()  # FSDP2's state sits in reference cycles: free the sharded model while its group lives
dist.destroy_process_group()
# torch 2.13's gloo now and then aborts in the interpreter's teardown ("terminate called without an active
# exception", SIGABRT) after all of the above is done: leave with the status of the work instead
os._exit(0)
