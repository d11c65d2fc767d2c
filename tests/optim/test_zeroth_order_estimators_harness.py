"""``mezo --zo-estimator fzoo`` and ``--zo-exact head`` in the harness, on a tiny random BERT: the
forwards per step, the head in its own exact group, resume bit for bit, and each bad combination
refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from test_zeroth_order_harness import small_config

from gradkit.cli import main
from gradkit.train.loop import finetune, resume
from gradkit.train.methods.zeroth_order import Mezo, is_head
from gradkit.train.model import load_classifier


def count_objective_calls(monkeypatch) -> dict[str, int]:
    """Count the harness's closure evaluations (each calls ``objective_value`` once per batch)."""
    import gradkit.train.methods.zeroth_order as zo_method

    calls = {"n": 0}
    real = zo_method.objective_value

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(zo_method, "objective_value", counting)
    return calls


def test_fzoo_runs_its_base_and_probes_each_step(tiny_model_dir, tmp_path, monkeypatch):
    calls = count_objective_calls(monkeypatch)
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_estimator="fzoo", zo_samples=3)
    cfg.lr = 1e-5
    finetune(cfg, progress=False)
    assert calls["n"] == 3 * (3 + 1)  # 3 steps of f(θ) and 3 probes
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["options"]["zo_estimator"] == "fzoo"


def test_exact_head_is_its_own_group_at_its_own_lr(tiny_model_dir, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_exact="head", zo_exact_lr=0.05)
    method = Mezo()
    model = method.prepare(load_classifier(str(tiny_model_dir), 2, seed=0), cfg, [])
    opt = method.make_optimizer(model, cfg, 1e-4)
    names = {id(p): n for n, p in model.named_parameters()}
    exact = [g for g in opt.param_groups if g["exact"]]
    zeroth = [g for g in opt.param_groups if not g["exact"]]
    assert len(exact) == 1 and exact[0]["lr"] == 0.05
    assert {names[id(p)] for p in exact[0]["params"]} == {
        n for n, p in model.named_parameters() if p.requires_grad and is_head(n)
    }
    assert exact[0]["params"] and all(not is_head(names[id(p)]) for g in zeroth for p in g["params"])
    assert any("lora_" in names[id(p)] for g in zeroth for p in g["params"])


def test_exact_head_trains_the_head_without_a_backward_through_the_encoder(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The hybrid's one backward starts at the loss and reaches the head's two tensors and nothing of
    the encoder (every leaf of its graph is a head tensor), while the encoder still moves by zeroth
    order."""
    import gradkit.optim.zo_exact as zo_exact

    real = torch.autograd.grad
    leaves: list[list[tuple[int, ...]]] = []

    def graph_leaves(fn) -> list[tuple[int, ...]]:
        found, stack, seen = [], [fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen:
                continue
            seen.add(id(node))
            if hasattr(node, "variable"):
                found.append(tuple(node.variable.shape))
            stack.extend(next_fn for next_fn, _ in node.next_functions)
        return sorted(found)

    def watching(outputs, inputs, *args, **kwargs):
        if torch.is_tensor(outputs):
            leaves.append(graph_leaves(outputs.grad_fn))
        return real(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(zo_exact.torch.autograd, "grad", watching)
    cfg = small_config(tiny_model_dir, tmp_path, "mezo", zo_params="all", zo_exact="head")
    before = load_classifier(str(tiny_model_dir), 2, seed=0).state_dict()
    finetune(cfg, progress=False)
    assert leaves == [[(2,), (2, 32)]] * 6  # head bias and weight, at both evaluations of every step
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "trainable.safetensors"))
    assert not torch.equal(saved["head.weight"], before["head.weight"])
    name = "encoder.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(saved[name], before[name])  # the encoder moved by zeroth order


def test_a_stopped_and_resumed_hybrid_fzoo_run_ends_bit_identical(tiny_model_dir, tmp_path):
    options = dict(zo_estimator="fzoo", zo_samples=2, zo_exact="head")

    def cfg(name: str):
        c = small_config(tiny_model_dir, tmp_path / name, "mezo", **options)
        c.steps, c.save_every, c.lr = 6, 2, 1e-5
        return c

    through = finetune(cfg("through"), progress=False)
    finetune(cfg("stopped"), progress=False, stop_after=3)
    again = resume(tmp_path / "stopped" / "run", progress=False)
    assert again["resumed_from_step"] == 2
    for name in ("trainable.safetensors", "adapter/adapter_model.safetensors"):
        a, b = tmp_path / "through" / "run" / name, tmp_path / "stopped" / "run" / name
        if a.exists():
            assert a.read_bytes() == b.read_bytes(), name
    assert again["final_train_loss"] == through["final_train_loss"]


BAD = {
    "fzoo-one-probe": (
        ("--zo-estimator", "fzoo", "--zo-samples", "1"),
        "--zo-samples 1 with --zo-estimator fzoo",
    ),
    "exact-head-alone": (("--zo-exact", "head", "--zo-params", "head"), "leaves nothing to zeroth order"),
    "exact-metric": (("--zo-exact", "head", "--objective", "accuracy"), "--objective accuracy"),
    "unknown-estimator": (("--zo-estimator", "mezo"), "--zo-estimator"),
    "exact-lr-zero": (("--zo-exact", "head", "--zo-exact-lr", "0"), "--zo-exact-lr 0.0 is not allowed"),
    "svrg-every-zero": (
        ("--zo-estimator", "svrg", "--zo-svrg-every", "0"),
        "--zo-svrg-every 0 is not allowed",
    ),
    "svrg-batches-zero": (("--zo-estimator", "svrg", "--zo-svrg-batches", "0"), "--zo-svrg-batches 0"),
    "svrg-scale-negative": (("--zo-svrg-anchor-lr-scale", "-1"), "--zo-svrg-anchor-lr-scale -1.0"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_estimator_options_are_one_line_errors(tmp_path, monkeypatch, capsys, case):
    monkeypatch.chdir(tmp_path)
    args, fragment = BAD[case]
    code = main(["finetune", "--method", "mezo", "--steps", "1", *args, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert fragment in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_compare_checks_each_methods_options_before_running_any(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["compare", "--methods", "head,mezo", "--zo-estimator", "fzoo", "--zo-samples", "1"]
    code = main([*args, "--steps", "1", "--out", str(tmp_path / "cmp")])
    assert code == 2 and "--zo-samples 1 with --zo-estimator fzoo" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_svrg_anchor_steps_read_their_batches_and_the_rest_four_forwards(
    tiny_model_dir, tmp_path, monkeypatch
):
    calls = count_objective_calls(monkeypatch)
    options = dict(zo_estimator="svrg", zo_svrg_every=2, zo_svrg_batches=3)
    finetune(small_config(tiny_model_dir, tmp_path, "mezo", **options), progress=False)
    # steps 1 and 3 are anchors (2 evaluations of 3 batches each), step 2 evaluates θ ± εz and θ̄ ± εz
    assert calls["n"] == 2 * 3 + 4 + 2 * 3
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    trained = sum(
        p.numel() for n, p in _prepared(tiny_model_dir, tmp_path).named_parameters() if p.requires_grad
    )
    assert summary["optimizer_state_bytes"] == 4 * trained  # θ̄: one fp32 copy of what trains


def _prepared(tiny_model_dir, tmp_path):
    cfg = small_config(tiny_model_dir, tmp_path / "probe", "mezo")
    return Mezo().prepare(load_classifier(str(tiny_model_dir), 2, seed=0), cfg, [])


def test_a_stopped_and_resumed_svrg_run_between_anchors_ends_bit_identical(tiny_model_dir, tmp_path):
    options = dict(zo_estimator="svrg", zo_svrg_every=3, zo_svrg_batches=2, zo_exact="head")

    def cfg(name: str):
        c = small_config(tiny_model_dir, tmp_path / name, "mezo", **options)
        c.steps, c.save_every = 6, 2
        return c

    through = finetune(cfg("through"), progress=False)
    finetune(cfg("stopped"), progress=False, stop_after=3)
    again = resume(tmp_path / "stopped" / "run", progress=False)
    assert again["resumed_from_step"] == 2  # one step past the first anchor: θ̄ comes from the checkpoint
    for name in ("trainable.safetensors", "adapter/adapter_model.safetensors"):
        a, b = tmp_path / "through" / "run" / name, tmp_path / "stopped" / "run" / name
        if a.exists():
            assert a.read_bytes() == b.read_bytes(), name
    assert again["final_train_loss"] == through["final_train_loss"]
