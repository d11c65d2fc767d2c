"""NoiseScaleCallback in a real (tiny) Trainer run with gradient accumulation and clipping."""

from __future__ import annotations

import json

import pytest
from helpers import LogRecorder, TokenRows

transformers = pytest.importorskip("transformers")

from gradkit.integrations.noise_scale_callback import HISTORY_FILE, STATE_FILE, NoiseScaleCallback  # noqa: E402
from gradkit.train.model import load_classifier  # noqa: E402


def test_noise_scale_callback_logs_b_simple(tiny_model_dir, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        max_grad_norm=1e-3,  # aggressive clipping: the measured batch gradient is taken before it
        logging_steps=2,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = load_classifier(str(tiny_model_dir), num_labels=2, seed=0)
    cb, probe = NoiseScaleCallback(beta=0.5), LogRecorder()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenRows(), callbacks=[cb, probe])
    trainer.train()
    assert [h["step"] for h in cb.history] == [1, 2, 3, 4]
    assert cb.gns.step == 4 and cb.gns.last["b_big"] == 8 and cb.gns.last["b_small"] == 1
    # clipping to 1e-3 did not reach the measurement: |G_B|^2 is far above 1e-6
    assert cb.gns.last["big_sq_norm"] > 1e-4
    assert all(h["b_simple"] is None or h["b_simple"] > 0 for h in cb.history)
    rows = [json.loads(line) for line in (tmp_path / HISTORY_FILE).read_text().splitlines()]
    assert rows == cb.history
    assert (tmp_path / "checkpoint-2" / STATE_FILE).exists()
    assert cb.gns.b_simple is not None and cb.gns.b_simple > 0
    assert any(log.get("noise_scale/b_simple") == cb.history[1]["b_simple"] for log in probe.logs)
    assert cb.recorder is None and not any(m._forward_hooks for m in model.modules())
