"""One rank of the 2-process Trainer recipe test (run by torch.distributed.run with gloo): LoRA-GA init on
this rank's batches, then a Trainer with LoRAPro (optimizers=), EMACallback and NoiseScaleCallback under
DDP; writes what every rank must agree on to <out>/rank<r>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers
from trainer_recipes_common import TokenRows, lora_state, tiny_lora, training_args

import gradkit
from gradkit.integrations.hf_trainer import EMACallback
from gradkit.integrations.noise_scale_callback import NoiseScaleCallback


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    # TrainingArguments first: it starts the process group that lora_ga_init reduces over
    args = training_args(out / "run", max_steps=3, ddp_backend="gloo", per_device_train_batch_size=2)
    assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 2
    data = TokenRows(n=16)
    model = tiny_lora()
    own = torch.utils.data.Subset(data, range(rank * 4, rank * 4 + 4))  # each rank its own rows
    loader = torch.utils.data.DataLoader(own, batch_size=2, collate_fn=transformers.default_data_collator)
    report = gradkit.lora_ga_init(model, loader, progress=False)
    init = lora_state(model)
    opt = gradkit.LoRAPro(model, lr=1e-2)
    ema_cb, gns_cb = EMACallback(decay=0.5, evaluate_with_ema=False), NoiseScaleCallback(beta=0.5)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)),
        callbacks=[ema_cb, gns_cb],
    )
    trainer.train()
    ema = {k: v.clone() for k, v in ema_cb.ema.averaged_state_dict().items() if ".lora_" in k}
    history = [
        {k: row[k] for k in ("step", "b_simple", "grad_sq_norm", "trace_sigma")} for row in gns_cb.history
    ]
    torch.save(
        {
            "init": init,
            "lora": lora_state(model),
            "ema": ema,
            "ga_batches": report.num_batches,
            "history": history,
        },
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
