"""ZOTrainer: transformers' Trainer with gradkit's zeroth-order step, on a tiny random Llama with LoRA:
the same losses and weights as a hand-written loop bit for bit (spsa; fzoo with an exact lm_head),
resume from a checkpoint bit for bit, gradient accumulation refused, and two processes (DDP over gloo)
that take the same steps."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradkit import GradkitError, ZerothOrder  # noqa: E402
from gradkit.integrations.zo_trainer import ZOTrainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_trainer_recipes import _torchrun  # noqa: E402
from trainer_recipes_common import TokenRows, tiny_lora, training_args  # noqa: E402

CASES = {
    "spsa": ({"eps": 1e-2}, None),
    "fzoo-exact-head": ({"estimator": "fzoo", "n_samples": 3, "eps": 1e-2}, "lm_head"),
    # an anchor on the step's own batch, a step that also reads θ̄, an anchor
    "svrg": ({"estimator": "svrg", "svrg_every": 2, "eps": 1e-2}, None),
}


def lora_and_head(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recording(ZOTrainer):
    """Keeps each step's batch and returned loss."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches = [*getattr(self, "batches", []), {k: v.clone() for k, v in inputs.items()}]
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.losses = [*getattr(self, "losses", []), float(loss)]
        return loss


def trainable_model(exact: str | None):
    model = tiny_lora()
    if exact:  # the LM head trains too (exactly), beside the LoRA factors (by zeroth order)
        model.base_model.model.lm_head.weight.requires_grad_(True)
    return model


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_zo_trainer_equals_a_hand_written_loop(tmp_path, case):
    zo_kwargs, exact = CASES[case]
    args = training_args(tmp_path / "run", lr_scheduler_type="constant", learning_rate=1e-4)
    picks = (lambda name: exact in name) if exact else None
    trainer = Recording(
        model=trainable_model(exact),
        args=args,
        train_dataset=TokenRows(),
        zo_kwargs=zo_kwargs,
        exact=picks,
        exact_lr=0.5,
    )
    trainer.train()

    model = trainable_model(exact)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    head = [p for n, p in named if picks is not None and picks(n)]
    body = [p for n, p in named if not any(p is q for q in head)]
    opt = ZerothOrder(
        body, lr=1e-4, seed=0, exact_params=[{"params": head, "lr": 0.5}] if head else None, **zo_kwargs
    )
    losses = []
    model.eval()
    for batch in trainer.batches:
        losses.append(float(opt.step(lambda batch=batch: model(**batch).loss.float())))
    assert losses == trainer.losses and len(losses) == 3
    ours, theirs = lora_and_head(model), lora_and_head(trainer.model)
    assert ours.keys() == theirs.keys()
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    assert any(".lora_B" in n and bool(v.abs().sum() > 0) for n, v in ours.items())  # it trained


@pytest.mark.parametrize(
    "zo_kwargs",
    [{"eps": 1e-2}, {"eps": 1e-2, "estimator": "svrg", "svrg_every": 3}],  # svrg: resumed between anchors
    ids=["spsa", "svrg"],
)
def test_resumed_from_a_checkpoint_takes_the_same_steps(tmp_path, zo_kwargs):
    def run(out: Path, resume: str | None = None):
        args = training_args(out, max_steps=4, save_strategy="steps", save_steps=2, learning_rate=1e-4)
        trainer = ZOTrainer(model=tiny_lora(), args=args, train_dataset=TokenRows(), zo_kwargs=zo_kwargs)
        trainer.train(resume_from_checkpoint=resume)
        losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
        return lora_and_head(trainer.model), losses

    through, through_losses = run(tmp_path / "through")
    run(tmp_path / "stopped")  # the same run; its checkpoint-2 is where the resumed one starts
    resumed, resumed_losses = run(tmp_path / "resumed", resume=str(tmp_path / "stopped" / "checkpoint-2"))
    for name, value in through.items():
        assert torch.equal(value, resumed[name]), name
    assert resumed_losses == through_losses and len(through_losses) == 4  # the checkpoint's log included
    state = json.loads((tmp_path / "stopped" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2


def test_gradient_accumulation_and_taken_arguments_are_refused(tmp_path):
    args = training_args(tmp_path / "run", gradient_accumulation_steps=2)
    with pytest.raises(GradkitError, match="gradient_accumulation_steps=2"):
        ZOTrainer(model=tiny_lora(), args=args, train_dataset=TokenRows())
    with pytest.raises(GradkitError, match="zo_kwargs lr"):
        ZOTrainer(model=tiny_lora(), args=training_args(tmp_path / "b"), zo_kwargs={"lr": 1.0})


@pytest.mark.distributed
def test_two_processes_take_the_same_zeroth_order_steps(tmp_path):
    _torchrun("zo_trainer_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["weights"].keys() == ranks[1]["weights"].keys()
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(ranks[1]["weights"][name], value), name
        assert not torch.equal(value, ranks[0]["before"][name]) or ".lora_A" in name, name
    assert ranks[0]["losses"] == ranks[1]["losses"] and len(ranks[0]["losses"]) == 3
