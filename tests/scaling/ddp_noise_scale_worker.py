"""Run under torchrun (2 processes, gloo): each rank takes half of every batch; DDP all-reduces.
Writes the NoiseScale trajectory of rank 0 to the JSON path given as argv[1]."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_noise_scale_ddp import STEPS, make_data, make_model  # noqa: E402

from gradkit import NoiseScale  # noqa: E402


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gns = NoiseScale(model, beta=0.5)
    x, y = make_data()
    values = []
    with gns.accumulation_hooks() as rec:
        for step in range(STEPS):
            local = slice(step * 8 + rank * 4, step * 8 + (rank + 1) * 4)
            loss = torch.nn.functional.mse_loss(ddp(x[local]).squeeze(-1), y[local])
            loss.backward()
            rec.micro_step(4)
            rec.step()
            opt.step()
            opt.zero_grad()
            values.append({"b_simple": gns.b_simple, **gns.last})
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world": world, "values": values}, f)
    dist.barrier()  # no rank tears gloo down while the other is still writing
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
