"""BatchScheduleCallback in a real (tiny) Trainer run: its advice follows the measured noise scale and the
schedule's law, reaches the logs and the output folder, and continues from a checkpoint."""

from __future__ import annotations

import json

import pytest
from helpers import LogRecorder, TokenRows

transformers = pytest.importorskip("transformers")

from gradkit.integrations.batch_schedule_callback import (  # noqa: E402
    ADVICE_FILE,
    STATE_FILE,
    BatchScheduleCallback,
)
from gradkit.scaling.batch_schedule import BatchSchedule, noise_multiple  # noqa: E402
from gradkit.train.model import load_classifier  # noqa: E402

FRACTION = 50.0  # a large share of B_simple: the tiny run's schedule grows within a few steps


def train(tiny_model_dir, out, resume=None, **extra):
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    model = load_classifier(str(tiny_model_dir), num_labels=2, seed=0)
    cb, probe = (
        BatchScheduleCallback(check_every=2, noise_fraction=FRACTION, beta=0.5, **extra),
        LogRecorder(),
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=TokenRows(n=64), callbacks=[cb, probe]
    )
    trainer.train(resume_from_checkpoint=resume)
    return cb, probe


def test_the_advice_follows_the_noise_scale_and_adams_law(tiny_model_dir, tmp_path):
    cb, probe = train(tiny_model_dir, tmp_path)
    assert cb.recommendations, "the schedule should grow within 6 steps at this fraction"
    b_simple = {h["step"]: h["b_simple"] for h in cb.history}
    law = BatchSchedule(8, "noise", law="adam")
    batch, factor = 8, 1.0
    for advice in cb.recommendations:
        step = advice["step"]
        assert step % 2 == 0 and advice["b_simple"] == b_simple[step]
        assert advice["batch"] == 8 * noise_multiple(b_simple[step], 8, FRACTION, 64) > batch
        factor *= law.lr_ratio(batch, advice["batch"], advice["b_simple"])
        batch = advice["batch"]
        assert advice["gradient_accumulation_steps"] == 2 * batch // 8
        assert advice["lr_factor"] == factor and advice["learning_rate"] == pytest.approx(1e-3 * factor)
    assert any(log.get("batch_schedule/advised_batch") == batch for log in probe.logs)
    written = json.loads((tmp_path / ADVICE_FILE).read_text())
    assert written == {"base_batch": 8, "growths": cb.recommendations}


def test_a_resumed_run_continues_the_schedule(tiny_model_dir, tmp_path):
    through, _ = train(tiny_model_dir, tmp_path / "through")
    first = through.recommendations[0]["step"]
    assert (tmp_path / "through" / f"checkpoint-{first}" / STATE_FILE).exists()
    resumed, _ = train(
        tiny_model_dir, tmp_path / "through", resume=str(tmp_path / "through" / f"checkpoint-{first}")
    )
    assert resumed.recommendations == through.recommendations
    assert resumed.schedule.state_dict() == through.schedule.state_dict()


def test_bad_options_are_refused_when_the_callback_is_made():
    from gradkit.errors import GradkitError

    with pytest.raises(GradkitError, match="unknown batch schedule"):
        BatchScheduleCallback(mode="grow")
    with pytest.raises(GradkitError, match="ramp schedule needs ramp_examples"):
        BatchScheduleCallback(mode="ramp")
