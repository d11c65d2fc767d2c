"""save_adapter: LoRA-GA's rank-2r difference form loads with plain PEFT onto the ORIGINAL base and
reproduces the trained model (plain, rsLoRA, rank/alpha patterns, a named adapter); a plain LoRA model
is saved exactly as PEFT saves it; the harness method ``lora-ga`` end to end through the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import peft_lora as _peft

from gradkit.errors import GradkitError
from gradkit.lora.export import _export_config, _resolve, save_adapter
from gradkit.lora.ga import lora_ga_init
from gradkit.lora.pairs import lora_pairs


def _batch(seed=0, n=4, length=12):
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1000, 2000, (n, length), generator=gen),
        "attention_mask": torch.ones(n, length, dtype=torch.long),
        "labels": torch.randint(0, 2, (n,), generator=gen),
    }


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _fresh_base(model_dir):
    from gradkit.train.model import load_classifier

    return load_classifier(str(model_dir), num_labels=2, seed=0)


def _load(model_dir, path):
    from peft import PeftModel

    return PeftModel.from_pretrained(_fresh_base(model_dir), str(path))


def _train(model, steps=4, lr=1e-2):
    """A few AdamW steps in train mode (dropout on), so A, B and the head all move."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        model(**_batch(seed=10 + step)).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize(
    "config, estimator",
    [
        ({}, "exact"),
        ({"use_rslora": True}, "sketch"),
        ({"use_rslora": True, "rank_pattern": {"query": 2}, "alpha_pattern": {"value": 3.0}}, "exact"),
        ({"rank_pattern": {"intermediate.dense": 6}, "alpha_pattern": {"key": 2.0}}, "exact"),
    ],
    ids=["plain", "rslora", "rslora-patterns", "patterns"],
)
def test_round_trip_onto_the_original_base(tmp_path, tiny_model_dir, config, estimator):
    model = _peft(_fresh_base(tiny_model_dir), **config)
    lora_ga_init(model, [_batch(1), _batch(2)], estimator=estimator, progress=False)
    _train(model)
    probe = _batch(seed=99)
    trained = _logits(model, probe)
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    loaded = _load(tiny_model_dir, path)
    assert (_logits(loaded, probe) - trained).abs().max() <= 1e-4
    # every loaded layer has rank 2r and the trained model's scale
    trained_pairs = {p.name: p for p in lora_pairs(model)}
    for pair in lora_pairs(loaded):
        assert pair.rank == 2 * trained_pairs[pair.name].rank
        assert pair.scaling == pytest.approx(trained_pairs[pair.name].scaling, rel=1e-12)
    saved = json.loads((path / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["lora_alpha"] == pytest.approx(
        8.0 * (math.sqrt(2) if config.get("use_rslora") else 2)
    )
    assert saved["modules_to_save"] == ["head"]


def test_plain_lora_is_saved_exactly_as_peft_saves_it(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    model = _peft(_fresh_base(tiny_model_dir), rank_pattern={"query": 2})
    _train(model, steps=2)
    save_adapter(model, tmp_path / "ours")
    model.save_pretrained(str(tmp_path / "peft"))
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert ours["target_modules"] == sorted(theirs["target_modules"])  # PEFT's order follows the hash seed
    assert ours == {**theirs, "target_modules": ours["target_modules"]}
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ours", "peft"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    probe = _batch(seed=5)
    assert torch.allclose(
        _logits(_load(tiny_model_dir, tmp_path / "ours"), probe), _logits(model, probe), atol=1e-6
    )


def test_named_adapter_replaced_folder_and_no_leftovers(tmp_path, tiny_model_dir):
    model = _peft(_fresh_base(tiny_model_dir), adapter="task")
    lora_ga_init(model, [_batch(1)], progress=False)
    _train(model, steps=2)
    target = tmp_path / "out" / "adapter"
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("old")
    save_adapter(model, target)
    assert not (target / "stale.txt").exists() and (target / "adapter_config.json").is_file()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["adapter"]  # the temporary folder is gone
    probe = _batch(seed=3)
    assert (_logits(_load(tiny_model_dir, target), probe) - _logits(model, probe)).abs().max() <= 1e-4


def test_export_config_for_a_mix_of_initialised_and_plain_layers():
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, rank_pattern={"query": 2}, alpha_pattern={"value": 3})
    wanted = {  # two LoRA-GA layers (r and alpha doubled), two plain ones
        "layer.0.query": (4, 16.0),
        "layer.0.value": (8, 6.0),
        "layer.1.query": (2, 8.0),
        "layer.1.key": (4, 8.0),
    }
    export = _export_config(config, wanted, rslora=False)
    assert {name: _resolve(export, name) for name in wanted} == wanted
    assert config.r == 4 and config.rank_pattern == {"query": 2}  # the model's own config is untouched


def test_bad_inputs(tmp_path, tiny_classifier):
    with pytest.raises(GradkitError, match="needs a PEFT model"):
        save_adapter(tiny_classifier, tmp_path / "a")
    model = _peft(tiny_classifier)
    with pytest.raises(GradkitError, match="no adapter 'other'"):
        save_adapter(model, tmp_path / "a", adapter="other")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("method", ["lora-ga", "lora-ga-pro"])
def test_finetune_through_the_cli_loads_onto_the_original_base(tmp_path, tiny_model_dir, monkeypatch, method):
    from gradkit.cli import main
    from gradkit.train.methods import available_methods

    cls = available_methods()[method]
    original_save = cls.save
    seen = {}

    def save(self, model, out_dir):  # the trained model's logits, just before it is saved
        seen["logits"] = _logits(model, _batch(seed=7))
        seen["report"] = self.report
        original_save(self, model, out_dir)

    monkeypatch.setattr(cls, "save", save)
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--method",
            method,
            "--model",
            str(tiny_model_dir),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--max-length",
            "16",
            "--rank",
            "2",
            "--ga-batches",
            "2",
            "--ga-estimator",
            "sketch",
            "--lr",
            "1e-2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert seen["report"].num_batches == 2 and seen["report"].estimator == "sketch"
    config = json.loads((out / "config.json").read_text())
    assert config["options"]["ga_batches"] == 2 and config["lr"] == 1e-2
    assert json.loads((out / "lora_ga.json").read_text())["num_batches"] == 2
    loaded = _load(tiny_model_dir, out / "adapter")
    assert (_logits(loaded, _batch(seed=7)) - seen["logits"]).abs().max() <= 1e-4


_SAVE_TWICE = """
import sys
from pathlib import Path

import torch
from helpers import peft_lora

from gradkit.lora.export import save_adapter
from gradkit.lora.ga import lora_ga_init
from gradkit.train.methods.lora import Lora
from gradkit.train.model import load_classifier

model_dir, out = sys.argv[1], Path(sys.argv[2])
torch.manual_seed(0)  # PEFT draws A from the global generator
plain = peft_lora(load_classifier(model_dir, num_labels=2, seed=0))
Lora().save(plain, out / "lora")  # the harness's lora: PEFT's save_pretrained
ga = peft_lora(load_classifier(model_dir, num_labels=2, seed=0))
g = torch.Generator().manual_seed(0)
batch = {
    "input_ids": torch.randint(1000, 2000, (4, 12), generator=g),
    "attention_mask": torch.ones(4, 12, dtype=torch.long),
    "labels": torch.tensor([0, 1, 0, 1]),
}
lora_ga_init(ga, [batch], seed=0)
save_adapter(ga, out / "lora-ga")  # the difference form through save_adapter
"""


def test_adapter_folders_are_byte_identical_whatever_the_hash_seed(tiny_model_dir, tmp_path):
    """PEFT keeps target_modules as a set; the saved folder must not follow PYTHONHASHSEED."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from peft import PeftModel

    tests = Path(__file__).resolve().parents[1]
    script = tmp_path / "save_twice.py"
    script.write_text(_SAVE_TWICE)
    folders = []
    for seed in ("1", "2", "3"):
        out = tmp_path / f"hash-{seed}"
        env = {
            **os.environ,
            "PYTHONHASHSEED": seed,
            "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1",
        }
        subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(out)], env=env, check=True)
        folders.append(
            {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
        )
    assert "lora/adapter/adapter_config.json" in folders[0] and "lora-ga/adapter_config.json" in folders[0]
    assert folders[0] == folders[1] == folders[2]
    config = json.loads(folders[0]["lora/adapter/adapter_config.json"])
    assert config["target_modules"] == sorted(config["target_modules"])
    for name in ("lora/adapter", "lora-ga"):  # plain PEFT loads the sorted list back
        loaded = PeftModel.from_pretrained(_fresh_base(tiny_model_dir), str(tmp_path / "hash-1" / name))
        assert loaded.peft_config["default"].target_modules == set(config["target_modules"])
