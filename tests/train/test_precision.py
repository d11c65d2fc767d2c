"""``--precision bf16``: the forward runs in bfloat16 autocast (every Linear's output is bf16, the losses
move off their fp32 values), the weights stay fp32 and training stays finite, for lora and full on the
tiny BERT and the tiny Llama; LoRA-Pro's small solves and LoRA-GA's SVD get fp32 inputs outside autocast."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal_common import pairs_file, save_tiny_llama  # noqa: E402

from gradkit.errors import GradkitError  # noqa: E402
from gradkit.train.config import TrainConfig  # noqa: E402
from gradkit.train.loop import finetune  # noqa: E402
from gradkit.train.methods import get_method  # noqa: E402

SST2 = Path(__file__).resolve().parents[2] / "data" / "sst2"


def head_of(path: Path, rows: int, out: Path) -> Path:
    lines = path.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def setups(tmp_path_factory, tiny_model_dir) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("precision")
    return {
        "bert": dict(
            model=str(tiny_model_dir),
            train=str(head_of(SST2 / "train.tsv", 32, root / "train.tsv")),
            test=str(head_of(SST2 / "test.tsv", 16, root / "test.tsv")),
        ),
        "llama": dict(
            task="causal-lm",
            model=str(save_tiny_llama(root / "llama")),
            train=str(pairs_file(root / "train.jsonl", 32)),
            test=str(pairs_file(root / "test.jsonl", 12, start=200)),
        ),
    }


def spy(name: str):
    """The registered method ``name``, recording the dtype of every nn.Linear output (from before
    ``prepare``, so LoRA-GA's estimation is seen) and keeping the model it trains."""
    base = type(get_method(name))

    class Spy(base):  # type: ignore[misc, valid-type]
        def prepare(self, model, cfg, batches):
            self.dtypes = []
            for m in model.modules():
                if isinstance(m, nn.Linear):
                    m.register_forward_hook(lambda mod, args, out: self.dtypes.append(out.dtype))
            self.model = super().prepare(model, cfg, batches)
            return self.model

    return Spy()


def run(setups, kind: str, method: str, precision: str, out: Path, **kw):
    cfg = TrainConfig(
        method=method, precision=precision, steps=3, batch_size=8, max_length=48, out=str(out), **setups[kind]
    )
    for key, value in kw.items():
        cfg.options[key] = value
    probe = spy(method)
    return finetune(cfg, progress=False, method=probe), probe


@pytest.mark.parametrize("method", ["lora", "full"])
@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_bf16_trains_with_fp32_weights(setups, tmp_path, kind, method):
    summary, probe = run(setups, kind, method, "bf16", tmp_path / "bf16")
    assert summary["precision"] == "bf16"
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["test_loss"])
    assert probe.dtypes and set(probe.dtypes) == {torch.bfloat16}  # every forward, training and eval
    assert {p.dtype for p in probe.model.parameters()} == {torch.float32}
    trained = [p for p in probe.model.parameters() if p.requires_grad]
    assert trained and all(torch.isfinite(p).all() for p in trained)
    reference, ref_probe = run(setups, kind, method, "fp32", tmp_path / "fp32")
    assert set(ref_probe.dtypes) == {torch.float32}
    # the same model and data at step 0, computed in bf16: close to fp32, but not the same numbers
    assert summary["step0"]["test_loss"] == pytest.approx(reference["step0"]["test_loss"], rel=2e-2)
    assert summary["step0"]["test_loss"] != reference["step0"]["test_loss"]


def record_linalg(monkeypatch, names):
    """Wrap ``torch.linalg.<name>``: every call's input dtypes and whether autocast was on."""
    calls = []
    for name in names:
        original = getattr(torch.linalg, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            dtypes = [a.dtype for a in args if torch.is_tensor(a)]
            calls.append((_name, dtypes, torch.is_autocast_enabled("cpu")))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, wrapped)
    return calls


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_pro_solves_in_fp32_under_bf16(setups, tmp_path, monkeypatch, kind):
    calls = record_linalg(monkeypatch, ["eigh", "svd", "solve", "inv", "cholesky", "qr"])
    summary, probe = run(setups, kind, "lora-pro", "bf16", tmp_path / "pro")
    assert math.isfinite(summary["final_train_loss"])
    assert set(probe.dtypes) == {torch.bfloat16}
    names = {name for name, _, _ in calls}
    assert "svd" in names, names  # the factors' SVDs behind the projections and the Sylvester solve
    for name, dtypes, autocast in calls:
        assert not autocast, name
        assert set(dtypes) <= {torch.float32, torch.float64}, (name, dtypes)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_lora_ga_svd_in_fp32_under_bf16(setups, tmp_path, monkeypatch, kind):
    calls = record_linalg(monkeypatch, ["svd", "qr"])
    summary, probe = run(setups, kind, "lora-ga", "bf16", tmp_path / "ga", ga_batches=2)
    assert math.isfinite(summary["final_train_loss"])
    assert set(probe.dtypes) == {torch.bfloat16}  # the estimation's forwards too
    svds = [c for c in calls if c[0] == "svd"]
    assert svds
    for name, dtypes, autocast in calls:
        assert not autocast, name
        assert set(dtypes) <= {torch.float32, torch.float64}, (name, dtypes)
    assert {p.dtype for p in probe.model.parameters()} == {torch.float32}


def test_an_unknown_precision_is_refused():
    from gradkit.train.validate import check_config

    with pytest.raises(GradkitError, match="--precision 'fp16' is not one of: fp32, bf16"):
        check_config(TrainConfig(precision="fp16"))


def test_a_bf16_run_resumes_to_the_same_weights(setups, tmp_path):
    """The autocast forward is set up again on resume: stopped at step 2 and resumed, a bf16 run ends
    with the uninterrupted run's test loss, bit for bit."""
    from gradkit.train.loop import resume

    def cfg(out):
        return TrainConfig(
            method="lora",
            precision="bf16",
            steps=4,
            batch_size=8,
            max_length=48,
            save_every=2,
            out=str(out),
            **setups["llama"],
        )

    whole = finetune(cfg(tmp_path / "whole"), progress=False)
    finetune(cfg(tmp_path / "cut"), progress=False, stop_after=2)
    again = resume(tmp_path / "cut", progress=False)
    assert again["test_loss"] == whole["test_loss"] and again["resumed_from_step"] == 2
