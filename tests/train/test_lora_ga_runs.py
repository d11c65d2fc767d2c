"""LoRA-GA runs through the harness: its best-on-dev weights go into checkpoints, and its report
(lora_ga.json, also under ema/) survives any number of resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune, resume


def config(tiny_model_dir, out: Path, **overrides) -> TrainConfig:
    values = dict(
        method="lora-ga",
        model=str(tiny_model_dir),
        steps=5,
        batch_size=8,
        max_length=32,
        save_every=1,
        out=str(out),
        options={"ga_batches": 2},
    )
    values.update(overrides)
    return TrainConfig(**values)


def without_timings(data: Any) -> Any:
    """The report less its measured seconds (the only part that differs between two equal runs)."""
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if not k.endswith("seconds")}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def test_a_checkpoint_after_a_best_dev_score_holds_the_initial_factors(tiny_model_dir, tmp_path):
    # the initial factors are slices of an SVD; the best copy of them is saved at the next checkpoint
    cfg = config(tiny_model_dir, tmp_path / "run", steps=3, dev_fraction=0.1, eval_every=1, keep_best=True)
    summary = finetune(cfg, progress=False)
    assert summary["best"]["step"] in (1, 2, 3)
    assert (tmp_path / "run" / "best" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "lora_ga.json").is_file()


def test_the_report_survives_two_resumes_in_a_row(tiny_model_dir, tmp_path):
    finetune(config(tiny_model_dir, tmp_path / "through", ema=0.9), progress=False)
    run = tmp_path / "twice"
    finetune(config(tiny_model_dir, run, ema=0.9), progress=False, stop_after=2)
    resume(run, progress=False, stop_after=3)  # the first resume stops again
    resume(run, progress=False)
    for name in ("lora_ga.json", "ema/lora_ga.json"):
        expected = json.loads((tmp_path / "through" / name).read_text())
        assert (run / name).is_file(), name
        assert without_timings(json.loads((run / name).read_text())) == without_timings(expected), name
