"""One rank of the 2-process Trainer FSDP2 test (torch.distributed.run, gloo on CPU): the same recipe
twice, once under DDP and once with the Trainer's own FSDP2 options (``fsdp=True``,
``fsdp_config={"version": 2, ...}``: accelerate's FSDP2 plugin shards the model): LoRA-GA init on this
rank's batches, LoRAPro built in ``create_optimizer`` (``optimizers=`` is refused under FSDP),
EMACallback and NoiseScaleCallback. Writes what the test compares to <out>/<mode>-rank<r>.pt."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import transformers
from trainer_recipes_common import TokenRows, cpu_fsdp_trainer, lora_state, tiny_lora, training_args

import gradkit
from gradkit.fsdp import full, is_dtensor, local
from gradkit.integrations.hf_trainer import EMACallback
from gradkit.integrations.noise_scale_callback import NoiseScaleCallback


class LoRAProTrainer(transformers.Trainer):
    """The Trainer with LoRAPro as its optimiser, built by the Trainer itself (before FSDP2 shards the
    model; accelerate then swaps the sharded parameters into its param_groups)."""

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = gradkit.LoRAPro(self.model, lr=self.args.learning_rate)
        return self.optimizer


class _NoiseInputs(transformers.TrainerCallback):
    """After NoiseScaleCallback's update (it runs first): this rank's per-example squared norms and
    |G_B|^2 of the reduced gradient of the measured parameters (sum of the ranks' shard norms under
    FSDP2; the all-reduced gradient under DDP), so the test can redo either estimate by hand."""

    def __init__(self, gns_cb):
        self.gns_cb, self.rows = gns_cb, []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        recorder = self.gns_cb.recorder
        sq = sum(float(local(p.grad).double().square().sum()) for p in recorder.params)
        if recorder.sharded:
            total = torch.tensor([sq], dtype=torch.float64)
            torch.distributed.all_reduce(total)
            sq = float(total)
        self.rows.append({"per_example": recorder.last_per_example.clone(), "grad_sq": sq})


def run(out: Path, mode: str, rank: int) -> None:
    fsdp = dict(fsdp=True, fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    args = training_args(
        out / f"run-{mode}",
        max_steps=3,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        ddp_backend="gloo",
        per_device_train_batch_size=2,
        **(fsdp if mode == "fsdp" else {}),
    )
    assert torch.distributed.get_world_size() == 2
    data = TokenRows(n=16)
    model = tiny_lora()
    own = torch.utils.data.Subset(data, range(rank * 4, rank * 4 + 4))
    loader = torch.utils.data.DataLoader(own, batch_size=2, collate_fn=transformers.default_data_collator)
    report = gradkit.lora_ga_init(model, loader, progress=False)
    init = lora_state(model)
    ema_cb, gns_cb = EMACallback(decay=0.5, evaluate_with_ema=False), NoiseScaleCallback(beta=0.5)
    inputs = _NoiseInputs(gns_cb)
    cls = cpu_fsdp_trainer(LoRAProTrainer) if mode == "fsdp" else LoRAProTrainer
    trainer = cls(model=model, args=args, train_dataset=data, callbacks=[ema_cb, gns_cb, inputs])
    assert trainer.is_fsdp_enabled == (mode == "fsdp")
    trainer.train()
    # a Trainer checkpoint of a PEFT model fails under FSDP2 in PEFT's save_pretrained on CPU (also with
    # the Trainer's AdamW), so the EMA's checkpoint files are written by calling the event directly
    ema_cb.on_save(trainer.args, trainer.state, trainer.control)
    torch.distributed.barrier()
    resumed = EMACallback(decay=0.5, evaluate_with_ema=False)  # resume: this rank's state file is found
    resumed.on_train_begin(trainer.args, trainer.state, trainer.control, model=trainer.model)
    want, got = (cb.ema.averaged_state_dict(full_precision=True) for cb in (ema_cb, resumed))
    resume_diff = max(float((got[k] - v).abs().max()) for k, v in want.items())
    params = dict(trainer.model.named_parameters())
    lora = {n: full(p.detach()).clone() for n, p in params.items() if ".lora_" in n}
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    in_opt = [p for group in opt.param_groups for p in group["params"]]
    plain_fsdp = None
    if mode == "fsdp":  # the plain Trainer on CPU: accelerate drops the FSDP plugin (DDP instead)
        probe = training_args(out / "probe", ddp_backend="gloo", **fsdp)
        plain_fsdp = transformers.Trainer(model=tiny_lora(), args=probe, train_dataset=data).is_fsdp_enabled
    torch.save(
        {
            "init": init,
            "lora": lora,
            "sharded": sum(is_dtensor(p) for p in params.values()),
            "opt_type": type(opt).__name__,
            "opt_sharded": sum(is_dtensor(p) for p in in_opt),
            "opt_params": len(in_opt),
            "model_params": sum(p.requires_grad for p in params.values()),
            "plain_fsdp": plain_fsdp,
            "ga_batches": report.num_batches,
            "history": list(gns_cb.history),
            "noise_inputs": inputs.rows,
            "resume_diff": resume_diff,
            "resume_step": resumed.ema.step,
            "losses": [row["loss"] for row in trainer.state.log_history if "loss" in row],
        },
        out / f"{mode}-rank{rank}.pt",
    )


def main() -> None:
    out = Path(sys.argv[1])
    rank = int(os.environ["RANK"])
    for mode in sys.argv[2:]:
        run(out, mode, rank)
    # skip the interpreter teardown, where torch 2.13's gloo backend now and then aborts after the work
    # is done (see tests/fsdp/fsdp_common.exit_without_teardown)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
