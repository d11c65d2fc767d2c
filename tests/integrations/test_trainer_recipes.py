"""The docs/trainer.md recipes, tested on a tiny random Llama inside transformers' Trainer: LoRAPro via
``optimizers=``, lora_ga_init before the Trainer, EMACallback, NoiseScaleCallback; one process, and two
processes (DDP over gloo) whose ranks must agree."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import gradkit  # noqa: E402
from gradkit.integrations.hf_trainer import EMACallback  # noqa: E402
from gradkit.integrations.noise_scale_callback import NoiseScaleCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_recipes_common import TokenRows, lora_state, tiny_llama, tiny_lora, training_args  # noqa: E402


def _constant(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)


def test_lora_pro_trainer_step_equals_a_manual_step(tmp_path):
    data = TokenRows(n=4)  # one batch of the whole data set: the order the sampler picks cannot matter
    model = tiny_lora()
    with torch.no_grad():  # a non-zero B, so the step exercises the full closed form, not the B = 0 case
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    reference = tiny_lora()
    reference.load_state_dict(model.state_dict())
    start = lora_state(model)
    opt = gradkit.LoRAPro(model, lr=1e-2, weight_decay=0.1)
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=1),
        train_dataset=data,
        optimizers=(opt, _constant(opt)),
    )
    trainer.train()

    manual = gradkit.LoRAPro(reference, lr=1e-2, weight_decay=0.1)
    batch = {k: torch.stack([data[i][k] for i in range(len(data))]) for k in ("input_ids", "attention_mask")}
    batch["labels"] = batch["input_ids"]
    reference.train()
    reference(**batch).loss.backward()
    manual.step()
    got, want = lora_state(model), lora_state(reference)
    moved = 0.0
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, float((value - start[name]).abs().max()))
    assert moved > 1e-4  # the step did move the factors
    assert opt.state and all("exp_avg" in s for s in opt.state.values())


def test_lora_ga_init_before_the_trainer(tmp_path):
    data = TokenRows()
    model = tiny_lora()
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        before = model(**batch).logits
    loader = torch.utils.data.DataLoader(data, batch_size=4, collate_fn=transformers.default_data_collator)
    report = gradkit.lora_ga_init(model, loader, num_batches=2, progress=False)
    assert report.num_batches == 2 and len(report.layers) == 14
    for name, p in model.named_parameters():
        if ".lora_" in name:
            assert p.abs().max() > 0, name  # both factors are initialised, B included
    with torch.no_grad():
        after = model(**batch).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)  # output unchanged at init
    start = lora_state(model)
    trainer = transformers.Trainer(model=model, args=training_args(tmp_path), train_dataset=data)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    assert any(not torch.equal(v, start[k]) for k, v in lora_state(model).items())


class _Recorder(transformers.TrainerCallback):
    """The training weights at the start and after every optimiser step."""

    def __init__(self):
        self.weights = []

    def _take(self, model):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._take(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._take(model)


def test_ema_callback_equals_a_hand_rolled_ema(tmp_path):
    decay = 0.7
    recorder, ema_cb = _Recorder(), EMACallback(decay=decay, evaluate_with_ema=False)
    model = tiny_llama()
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, max_steps=4),
        train_dataset=TokenRows(),
        callbacks=[recorder, ema_cb],
    )
    trainer.train()
    assert len(recorder.weights) == 5  # the start and 4 steps
    averaged = ema_cb.ema.averaged_state_dict()
    hand = {k: v.double() for k, v in recorder.weights[0].items()}
    for weights in recorder.weights[1:]:
        hand = {k: decay * hand[k] + (1 - decay) * weights[k].double() for k in hand}
    for key, value in averaged.items():
        torch.testing.assert_close(value.double(), hand[key], rtol=1e-6, atol=1e-6, msg=key)
    # the trajectory is the raw one: the model ends on the last recorded weights, not on the average
    last = recorder.weights[-1]
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(averaged[k], last[k]) for k in averaged if k in last)
    assert (tmp_path / "ema_model.safetensors").exists()


class _Logs(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_noise_scale_callback_logs_finite_values(tmp_path):
    gns_cb, logs = NoiseScaleCallback(beta=0.5), _Logs()
    trainer = transformers.Trainer(
        model=tiny_llama(),
        args=training_args(tmp_path, max_steps=4, learning_rate=1e-2),
        train_dataset=TokenRows(n=32, shared=0.8),
        callbacks=[gns_cb, logs],
    )
    trainer.train()
    assert [row["step"] for row in gns_cb.history] == [1, 2, 3, 4]
    for row in gns_cb.history:
        assert math.isfinite(row["grad_sq_norm"]) and math.isfinite(row["trace_sigma"]), row
    logged = [entry["noise_scale/b_simple"] for entry in logs.logs if "noise_scale/b_simple" in entry]
    assert logged and all(math.isfinite(v) and v > 0 for v in logged)
    lines = (tmp_path / "noise_scale.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def _torchrun(worker: str, out: Path, *args: str) -> None:
    """``tests/integrations/<worker> out *args`` under torchrun, 2 processes (gloo on CPU)."""
    script = Path(__file__).with_name(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(script.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*cmd, str(script), str(out), *args], cwd=out, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.distributed
def test_trainer_recipes_two_processes_agree(tmp_path):
    _torchrun("trainer_recipes_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ("init", "lora", "ema"):
        assert ranks[0][key].keys() == ranks[1][key].keys() and ranks[0][key]
        for name, value in ranks[0][key].items():
            torch.testing.assert_close(ranks[1][key][name], value, rtol=0, atol=0, msg=f"{key} {name}")
    # lora_ga_init saw both ranks' batches (2 each): every rank's report counts 4
    assert ranks[0]["ga_batches"] == ranks[1]["ga_batches"] == 4
    assert ranks[0]["history"] == ranks[1]["history"] and len(ranks[0]["history"]) == 3
    assert all(math.isfinite(row["grad_sq_norm"]) for row in ranks[0]["history"])
    # training moved the factors away from the LoRA-GA init
    assert any(not torch.equal(v, ranks[0]["init"][k]) for k, v in ranks[0]["lora"].items())


@pytest.mark.distributed
def test_trainer_fsdp2_recipes_equal_ddp(tmp_path):
    """The recipes under the Trainer's own FSDP2 options (fsdp=True, fsdp_config version 2: accelerate
    shards the model with fully_shard) against the same recipes under DDP, 2 processes, gloo. On CPU
    accelerate drops the FSDP plugin (checked below), so the FSDP run uses cpu_fsdp_trainer."""
    from safetensors.torch import load_file

    from gradkit.scaling.noise_scale import NoiseScale

    _torchrun("trainer_fsdp_worker.py", tmp_path, "ddp", "fsdp")
    runs = {
        m: [torch.load(tmp_path / f"{m}-rank{r}.pt", weights_only=False) for r in range(2)]
        for m in ("ddp", "fsdp")
    }
    ddp, fsdp = runs["ddp"][0], runs["fsdp"][0]
    # the plain Trainer on CPU silently trains with DDP; the FSDP run really is sharded, and accelerate
    # swapped the sharded parameters into LoRAPro's param groups (all 28 LoRA factors)
    assert fsdp["plain_fsdp"] is False
    assert ddp["sharded"] == 0 and fsdp["sharded"] == 49
    assert (
        fsdp["opt_type"] == "LoRAPro"
        and fsdp["opt_sharded"] == fsdp["opt_params"] == fsdp["model_params"] == 28
    )
    for key in ("init", "lora"):
        for name, value in ddp[key].items():
            for other in (runs["ddp"][1], *runs["fsdp"]):
                # measured: 0 (bit-identical), both for the LoRA-GA init and after 3 LoRAPro steps
                torch.testing.assert_close(other[key][name], value, rtol=1e-6, atol=1e-7, msg=f"{key} {name}")
    assert any(not torch.equal(v, ddp["init"][k]) for k, v in fsdp["lora"].items())  # training moved them
    assert ddp["ga_batches"] == fsdp["ga_batches"] == 4
    torch.testing.assert_close(torch.tensor(fsdp["losses"]), torch.tensor(ddp["losses"]), rtol=1e-6, atol=0)
    # EMA: the gathered export (whole tensors, all 49) equals DDP's; measured difference 0
    ema_ddp, ema_fsdp = (load_file(tmp_path / f"run-{m}" / "ema_model.safetensors") for m in ("ddp", "fsdp"))
    assert ema_ddp.keys() == ema_fsdp.keys() and len(ema_ddp) == 49
    for name, value in ema_ddp.items():
        torch.testing.assert_close(ema_fsdp[name], value, rtol=1e-6, atol=1e-7, msg=name)
    # the checkpoint's EMA state: one shard per rank under FSDP2, rows that make DDP's whole state
    whole = torch.load(tmp_path / "run-ddp" / "checkpoint-3" / "ema_state.pt", weights_only=True)["shadow"]
    shards = [
        torch.load(tmp_path / "run-fsdp" / "checkpoint-3" / f"ema_state-rank{r}.pt", weights_only=True)[
            "shadow"
        ]
        for r in range(2)
    ]
    for name, value in whole.items():
        joined = torch.cat([s[name] for s in shards]) if value.ndim else shards[0][name]
        torch.testing.assert_close(joined, value, rtol=1e-6, atol=1e-7, msg=name)
    assert all(run["resume_diff"] == 0 and run["resume_step"] == 3 for run in runs["fsdp"])
    # noise scale: under FSDP2 B is all ranks' examples (|G_B|^2 of the reduce-scattered gradient), under
    # DDP each rank's own batch, so the two histories differ; redo the FSDP2 estimate by hand from the
    # DDP run's per-example norms (the same weights and data) and its all-reduced gradient (B = 4).
    # measured: relative difference <= 1.4e-6 (grad_sq_norm), 3.2e-7 (b_simple)
    assert runs["fsdp"][0]["history"] == runs["fsdp"][1]["history"] and len(fsdp["history"]) == 3
    hand = NoiseScale(beta=0.5)
    for step, row in enumerate(fsdp["history"]):
        small = sum(float(r["noise_inputs"][step]["per_example"].double().mean()) for r in runs["ddp"]) / 2
        hand.update(small, ddp["noise_inputs"][step]["grad_sq"], 1, 4)
        for key in ("grad_sq_norm", "trace_sigma", "b_simple"):
            want = hand.metrics()[key]
            if want is None:
                assert row[key] is None
            else:
                assert row[key] == pytest.approx(want, rel=1e-5), (step, key)
    assert fsdp["history"][-1]["b_simple"] is not None
