"""One rank of the 2-process ZOTrainer test (torch.distributed.run, gloo): fzoo with the LM head exact
under DDP; writes the trained tensors and the logged losses to <out>/rank<r>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from trainer_recipes_common import TokenRows, tiny_lora, training_args

from gradkit.integrations.zo_trainer import ZOTrainer


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    args = training_args(out / "run", ddp_backend="gloo", per_device_train_batch_size=2, learning_rate=1e-4)
    model = tiny_lora()
    model.base_model.model.lm_head.weight.requires_grad_(True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = ZOTrainer(
        model=model,
        args=args,
        train_dataset=TokenRows(),
        zo_kwargs={"estimator": "fzoo", "n_samples": 2, "eps": 1e-2},
        exact=lambda name: "lm_head" in name,
        exact_lr=0.5,
    )
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    torch.save({"weights": weights, "before": before, "losses": losses}, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
