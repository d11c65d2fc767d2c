"""EMACallback in a real (tiny) Trainer run: evaluation sees the EMA, training never does, files, resume."""

from __future__ import annotations

import pytest
import torch
from helpers import TokenRows

transformers = pytest.importorskip("transformers")

from gradkit.integrations.hf_trainer import EMA_STATE, EMA_WEIGHTS, EMACallback  # noqa: E402
from gradkit.train.model import load_classifier  # noqa: E402


class _Probe(transformers.TrainerCallback):
    """Runs before EMACallback's hooks: records what the model holds while the Trainer evaluates."""

    def __init__(self, ema_cb):
        self.ema_cb, self.seen = ema_cb, []

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        ema = self.ema_cb.ema.averaged_state_dict()
        same = all(torch.equal(v, ema[k]) for k, v in model.state_dict().items() if k in ema)
        self.seen.append((state.global_step, same, {k: v.clone() for k, v in ema.items()}))


def _trainer(path, out, callbacks, max_steps=6):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=5e-3,
        eval_strategy="steps",
        eval_steps=3,
        save_steps=3,
        logging_steps=3,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = load_classifier(str(path), num_labels=2, seed=0)
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=TokenRows(24, random_labels=True),
        eval_dataset=TokenRows(8, random_labels=True),
        callbacks=callbacks,
    )
    return trainer, model


def test_ema_callback_end_to_end(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    cb = EMACallback(decay=0.5)
    probe = _Probe(cb)
    trainer, model = _trainer(tiny_model_dir, tmp_path / "ema", [probe, cb])
    trainer.train()
    # evaluations during training ran on the EMA weights
    assert [(s, same) for s, same, _ in probe.seen] == [(3, True), (6, True)]
    # the training trajectory is untouched: same final weights as a run without the callback
    plain, plain_model = _trainer(tiny_model_dir, tmp_path / "plain", [])
    plain.train()
    for (k, v), w in zip(model.state_dict().items(), plain_model.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    # the model holds the raw weights after training, and the EMA really differs from them
    assert not torch.equal(model.head.weight, cb.ema.averaged_state_dict()["head.weight"])
    # checkpoints carry the EMA weights of their step and a resumable state
    saved = load_file(str(tmp_path / "ema" / "checkpoint-3" / EMA_WEIGHTS))
    for k, v in probe.seen[0][2].items():
        assert torch.equal(saved[k], v), k
    assert (tmp_path / "ema" / "checkpoint-3" / EMA_STATE).exists()
    assert (tmp_path / "ema" / EMA_WEIGHTS).exists()

    # resuming from checkpoint-3 continues the same average exactly
    cb2 = EMACallback(decay=0.5)
    resumed, _ = _trainer(tiny_model_dir, tmp_path / "ema", [cb2])
    resumed.train(resume_from_checkpoint=str(tmp_path / "ema" / "checkpoint-3"))
    assert cb2.ema.step == 6
    for k, v in cb.ema.averaged_state_dict().items():
        torch.testing.assert_close(cb2.ema.averaged_state_dict()[k], v, atol=1e-6, rtol=0)


def test_apply_at_end_and_bad_settings(tiny_model_dir, tmp_path):
    from gradkit.errors import GradkitError

    with pytest.raises(GradkitError):
        EMACallback(decay=1.5)
    cb = EMACallback(decay=0.5, apply_at_end=True, save_ema=False, evaluate_with_ema=False)
    trainer, model = _trainer(tiny_model_dir, tmp_path / "apply", [cb], max_steps=2)
    trainer.train()
    for k, v in cb.ema.averaged_state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    assert not (tmp_path / "apply" / EMA_WEIGHTS).exists()
