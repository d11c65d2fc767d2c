"""gradkit.gradient_flow (per-block gradient flow) and the ``gradkit diagnose`` command."""

from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import gradkit
from gradkit.diagnostics import (
    BLOCK_PATTERNS,
    adamw_first_step,
    depth_decay,
    find_blocks,
    gradient_flow,
    plot_gradient_flow,
    to_markdown,
)
from gradkit.errors import GradkitError
from gradkit.models import toy_transformer

# ---------------------------------------------------------------- a 2-layer model computed by hand


class Residual(nn.Module):
    """y = x + A x (A has no bias): a residual block whose branch is one matrix."""

    def __init__(self, d: int):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return x + self.lin(x)


class TwoLayer(nn.Module):
    def __init__(self, d: int = 5):
        super().__init__()
        self.blocks = nn.ModuleList([Residual(d), Residual(d)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def _half_square(model, batch):
    return 0.5 * model(batch).pow(2).sum()


def _two_layer(seed: int = 0, d: int = 5) -> TwoLayer:
    g = torch.Generator().manual_seed(seed)
    model = TwoLayer(d).double()
    with torch.no_grad():
        for block in model.blocks:
            block.lin.weight.copy_(torch.randn(d, d, generator=g, dtype=torch.float64) * 0.3)
    return model


def test_two_layer_numbers_equal_the_hand_computation():
    """y1 = (I + A) x, y2 = (I + B) y1, L = ½|y2|² per batch, gradient of the mean loss over 2 batches:
    ∂L/∂B = y2 y1ᵀ, ∂L/∂y1 = (I + B)ᵀ y2, ∂L/∂A = ∂L/∂y1 xᵀ (rows are examples, summed)."""
    model = _two_layer()
    A, B = (b.lin.weight.detach().clone() for b in model.blocks)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    lr, wd, eps = 1e-3, 0.1, 1e-8
    rows = gradient_flow(model, batches, _half_square, lr=lr, weight_decay=wd, eps=eps)
    assert [r.name for r in rows] == ["blocks.0", "blocks.1"] and [r.index for r in rows] == [0, 1]

    eye = torch.eye(5, dtype=torch.float64)
    gA = torch.zeros_like(A)
    gB = torch.zeros_like(B)
    sums = {k: 0.0 for k in ("y1", "y2", "x", "d1", "d2", "n")}
    for x in batches:
        y1 = x @ (eye + A).T
        y2 = y1 @ (eye + B).T
        gB += y2.T @ y1 / 2
        gA += (y2 @ (eye + B)).T @ x / 2
        sums["y1"] += y1.pow(2).sum().item()
        sums["y2"] += y2.pow(2).sum().item()
        sums["x"] += x.pow(2).sum().item()
        sums["d1"] += (x @ A.T).pow(2).sum().item()
        sums["d2"] += (y1 @ B.T).pow(2).sum().item()
        sums["n"] += x.numel()
    for row, W, G, out, inp, branch in (
        (rows[0], A, gA, "y1", "x", "d1"),
        (rows[1], B, gB, "y2", "y1", "d2"),
    ):
        assert row.num_params == 25
        assert row.grad_norm == pytest.approx(G.norm().item(), rel=1e-12)
        assert row.weight_norm == pytest.approx(W.norm().item(), rel=1e-12)
        assert row.act_rms == pytest.approx(math.sqrt(sums[out] / sums["n"]), rel=1e-12)
        assert row.input_rms == pytest.approx(math.sqrt(sums[inp] / sums["n"]), rel=1e-12)
        # the residual ratio |y − x|/|x| is |F(x)|/|x| for a block without a norm
        assert row.residual_ratio == pytest.approx(math.sqrt(sums[branch] / sums[inp]), rel=1e-10)
        # AdamW's first step: −lr·λ·θ − lr·g/(|g| + ε)
        delta = -lr * wd * W - lr * G / (G.abs() + eps)
        assert row.update_norm == pytest.approx(delta.norm().item(), rel=1e-9)
        assert row.update_ratio == pytest.approx(delta.norm().item() / W.norm().item(), rel=1e-9)
    median = (rows[0].grad_norm + rows[1].grad_norm) / 2
    assert rows[0].grad_rel == pytest.approx(rows[0].grad_norm / median)


def test_one_batch_a_dict_batch_and_num_batches():
    model = _two_layer()
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(4, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    alone = gradient_flow(model, batches[0], _half_square)
    capped = gradient_flow(model, batches, _half_square, num_batches=1)
    assert [r.grad_norm for r in alone] == [r.grad_norm for r in capped]

    class WithLoss(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return argparse.Namespace(loss=0.5 * self.inner(x).pow(2).sum())

    wrapped = gradient_flow(WithLoss(model), {"x": batches[0]}, blocks="inner.blocks.*")
    assert [r.grad_norm for r in wrapped] == pytest.approx([r.grad_norm for r in alone], rel=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01, 0.3])
def test_adamw_first_step_is_torch_adamw_first_step(weight_decay):
    g = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(6, 4, generator=g))
    grad = torch.randn(6, 4, generator=g)
    grad[0, 0] = 0.0  # a zero gradient moves only by weight decay
    before = w.detach().clone()
    delta = adamw_first_step(w, grad, lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    assert torch.equal(w.detach(), before)  # nothing modified
    for foreach in (False, True):
        p = nn.Parameter(before.clone())
        p.grad = grad.clone()
        opt = torch.optim.AdamW(
            [p], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay, foreach=foreach
        )
        opt.step()
        torch.testing.assert_close(delta, p.detach() - before, rtol=0, atol=2e-8)
    assert delta[0, 0].item() == pytest.approx(
        -1e-2 * weight_decay * before[0, 0].item(), abs=2e-7
    )  # fp32 rounding


def test_the_update_ratio_is_a_sign_step_whatever_the_gradient_scale():
    """Adam's first step is lr·sign(g) (ε aside): scaling the loss scales the gradient, not the update."""
    model = _two_layer()
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    small = gradient_flow(model, x, lambda m, b: 1e-3 * _half_square(m, b), weight_decay=0.0, lr=1e-3)
    big = gradient_flow(model, x, _half_square, weight_decay=0.0, lr=1e-3)
    for s, b in zip(small, big, strict=True):
        assert s.grad_norm == pytest.approx(1e-3 * b.grad_norm, rel=1e-10)
        assert s.update_ratio == pytest.approx(b.update_ratio, rel=1e-4)
        assert b.update_norm == pytest.approx(1e-3 * math.sqrt(b.num_params), rel=1e-4)


def test_the_model_is_left_as_found():
    model = toy_transformer(
        vocab=30, d_model=16, n_layers=2, n_heads=2, generator=torch.Generator().manual_seed(0)
    )
    model.train()
    model.blocks[1].eval()
    model.blocks[0].attn.qkv.weight.requires_grad_(False)
    model.wte.weight.requires_grad_(False)
    marker = torch.full_like(model.blocks[1].mlp.fc.weight, 7.0)
    model.blocks[1].mlp.fc.weight.grad = marker.clone()
    state = copy.deepcopy(model.state_dict())
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    ids = torch.randint(0, 30, (2, 9), generator=torch.Generator().manual_seed(5))

    torch.manual_seed(123)
    rng = torch.get_rng_state()
    rows = gradient_flow(model, [ids], lambda m, b: m(b).logsumexp(-1).mean())
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == requires
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(model.blocks[1].mlp.fc.weight.grad, marker)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "blocks.1.mlp.fc.weight")
    # frozen weights are measured too: the gradient is of every floating parameter of the block
    assert rows[0].grad_norm > 0


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = nn.Sequential()
    model.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))])
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(6))

    def loss(m, b):
        return m.blocks[0](b).pow(2).sum()

    a = gradient_flow(model, x, loss)[0].grad_norm
    assert gradient_flow(model, x, loss)[0].grad_norm == a
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    trained = gradient_flow(model, x, loss, train_mode=True)[0].grad_norm
    assert trained != a and torch.equal(torch.get_rng_state(), rng)  # dropout's draws were on a forked RNG


def test_post_ln_branch_ratio_and_the_orthogonal_closed_form():
    """``branches``: |F(x)|/|x| of each branch of a Post-LN block, checked by calling the module; and
    |y − x|/|x| of LN(x + F) with F ⟂ x follows sqrt(2 − 2/sqrt(1 + r²))."""
    model = toy_transformer(
        vocab=40,
        d_model=32,
        n_layers=3,
        n_heads=4,
        norm="post",
        init_std=0.1,
        generator=torch.Generator().manual_seed(0),
    )
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(7))

    def loss(m, b):
        return F.cross_entropy(m(b).reshape(-1, 40), b.reshape(-1))

    rows = gradient_flow(model, ids, loss, branches=("attn", "mlp"))
    model.eval()
    with torch.no_grad():
        x = model.wte(ids) + model.wpe(torch.arange(12))
        for row, block in zip(rows, model.blocks, strict=True):
            a = block.attn(x)
            x1 = block.ln1(x + a)
            m = block.mlp(x1)
            assert row.branch_ratios["attn"] == pytest.approx((a.norm() / x.norm()).item(), rel=1e-5)
            assert row.branch_ratios["mlp"] == pytest.approx((m.norm() / x1.norm()).item(), rel=1e-5)
            y = block.ln2(x1 + m)
            assert row.residual_ratio == pytest.approx(((y - x).norm() / x.norm()).item(), rel=1e-5)
            x = y
    assert "\\|F\\|/\\|x\\| attn" in to_markdown(rows)  # pipes escaped inside a markdown cell

    ln = nn.LayerNorm(4096, eps=0.0, elementwise_affine=False).double()
    g = torch.Generator().manual_seed(8)
    x = torch.randn(64, 4096, generator=g, dtype=torch.float64)
    x = (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True, correction=0)
    for r in (0.1, 1.0, 3.0):
        f = torch.randn(64, 4096, generator=g, dtype=torch.float64)
        f -= f.mean(-1, keepdim=True)
        f -= (f * x).sum(-1, keepdim=True) / (x * x).sum(-1, keepdim=True) * x  # ⟂ x, row by row
        f *= r * x.norm(dim=-1, keepdim=True) / f.norm(dim=-1, keepdim=True)
        q = ((ln(x + f) - x).norm() / x.norm()).item()
        assert q == pytest.approx(math.sqrt(2 - 2 / math.sqrt(1 + r * r)), rel=1e-6)


def test_pre_ln_residual_ratio_is_the_sum_of_branches():
    model = toy_transformer(
        vocab=40, d_model=32, n_layers=2, n_heads=4, norm="pre", generator=torch.Generator().manual_seed(1)
    )
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(9))
    rows = gradient_flow(model, ids, lambda m, b: m(b).pow(2).mean())
    model.eval()
    with torch.no_grad():
        x = model.wte(ids) + model.wpe(torch.arange(10))
        for row, block in zip(rows, model.blocks, strict=True):
            f1 = block.attn(block.ln1(x))
            f2 = block.mlp(block.ln2(x + f1))
            assert row.residual_ratio == pytest.approx(((f1 + f2).norm() / x.norm()).item(), rel=1e-5)
            x = x + f1 + f2
            assert row.act_rms == pytest.approx(x.pow(2).mean().sqrt().item(), rel=1e-5)


def test_flags_follow_the_documented_thresholds():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(3, 3, bias=False) for _ in range(5)])
    scales = [1e-3, 0.5, 1.0, 2.0, 50.0]

    def loss(m, b):
        return sum(s * blk(b).sum() for s, blk in zip(scales, m.blocks, strict=True))

    x = torch.ones(2, 3)
    rows = gradient_flow(model, x, loss)
    # every block's gradient is scale·(column sums of x) in every row: the norms are proportional to the scales
    assert [r.grad_rel for r in rows] == pytest.approx(scales, rel=1e-6)
    assert [r.flags for r in rows] == [("vanishing",), (), (), (), ("exploding",)]
    relaxed = gradient_flow(model, x, loss, flag_factor=1e4)
    assert all(not r.flags for r in relaxed)
    zero = gradient_flow(
        model, x, lambda m, b: m.blocks[0](b).sum() + 0 * sum(p.sum() for p in m.parameters())
    )
    assert all("vanishing" in r.flags for r in zero[1:])
    bad = gradient_flow(model, x, lambda m, b: m.blocks[0](b).sum() * float("nan"))
    assert all("nonfinite" in r.flags for r in bad)


def test_depth_decay_recovers_a_geometric_factor():
    for c in (0.5, 1 / math.sqrt(2), 1.0, 1.3):
        values = [3.0 * c**i for i in range(12)]
        assert depth_decay(values) == pytest.approx(1 / c, rel=1e-12)  # listed upward: decay going down
    assert math.isnan(depth_decay([1.0]))
    assert depth_decay([0.0, 1.0, 2.0, float("nan"), 8.0]) == pytest.approx(0.5)  # 2^(i-1) at i = 1, 2, 4


def test_built_in_block_patterns_on_hugging_face_architectures():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    small = dict(vocab_size=64)
    bert = BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32, **small)
    )
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, **small))
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            **small,
        )
    )
    toy = toy_transformer(vocab=64, d_model=16, n_layers=2, n_heads=2)
    assert list(find_blocks(bert)) == [f"encoder.layer.{i}" for i in range(3)]
    assert list(find_blocks(gpt2)) == ["transformer.h.0", "transformer.h.1"]
    assert list(find_blocks(llama)) == ["model.layers.0", "model.layers.1"]
    assert list(find_blocks(toy)) == ["blocks.0", "blocks.1"]
    assert len(BLOCK_PATTERNS) == 4
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(10))
    for model in (gpt2, llama):
        rows = gradient_flow(model, {"input_ids": ids, "labels": ids})
        assert len(rows) == 2 and all(r.grad_norm > 0 and r.residual_ratio > 0 for r in rows)
    rows = gradient_flow(bert, {"input_ids": ids}, lambda m, b: m(**b).last_hidden_state.pow(2).mean())
    assert len(rows) == 3 and all(r.act_rms > 0 for r in rows)


def test_bad_input_is_a_one_line_gradkit_error():
    model = _two_layer()
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(GradkitError, match="no transformer blocks"):
        gradient_flow(nn.Linear(2, 2), torch.zeros(1, 2), lambda m, b: m(b).sum())
    with pytest.raises(GradkitError, match="matches no module"):
        gradient_flow(model, x, _half_square, blocks="layers.*")
    with pytest.raises(GradkitError, match="branches"):
        gradient_flow(model, x, _half_square, branches=("attn",))
    with pytest.raises(GradkitError, match="empty"):
        gradient_flow(model, [], _half_square)
    with pytest.raises(GradkitError, match="lr"):
        gradient_flow(model, x, _half_square, lr=0.0)
    with pytest.raises(GradkitError, match="num_batches"):
        gradient_flow(model, x, _half_square, num_batches=0)
    with pytest.raises(GradkitError, match="dict"):
        gradient_flow(model, [x])
    with pytest.raises(GradkitError, match="scalar"):
        gradient_flow(model, x, lambda m, b: m(b))
    with pytest.raises(GradkitError, match="does not depend"):
        gradient_flow(model, x, lambda m, b: _half_square(m, b).detach())
    model.blocks[0].lin.weight.requires_grad_(False)
    rng = torch.get_rng_state()
    requires = [p.requires_grad for p in model.parameters()]
    with pytest.raises(GradkitError, match="does not depend"):
        gradient_flow(model, x, lambda m, b: torch.rand(()))  # raises mid-run: the model is still restored
    assert (
        torch.equal(torch.get_rng_state(), rng) and [p.requires_grad for p in model.parameters()] == requires
    )
    with pytest.raises(GradkitError, match="nn.Module"):
        gradient_flow("model", x, _half_square)


def test_public_name_and_plot(tmp_path):
    assert gradkit.gradient_flow is gradient_flow
    model = _two_layer()
    rows = gradient_flow(model, torch.randn(3, 5, dtype=torch.float64), _half_square)
    path = tmp_path / "flow.png"
    assert plot_gradient_flow(rows, path, title="two layers") is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["flow.png"]  # no temporary file left behind
    table = to_markdown(rows)
    assert table.count("\n") == 2 + len(rows) and "`blocks.1`" in table
    json.dumps([r.as_dict() for r in rows])  # plain data


# ---------------------------------------------------------------- gradkit diagnose


def _parser() -> argparse.ArgumentParser:
    from gradkit.cli.diagnose import add_arguments

    parser = argparse.ArgumentParser(prog="gradkit diagnose")
    add_arguments(parser)
    return parser


def _diagnose(argv: list[str], capsys) -> tuple[int, str]:
    """The diagnose runner as the CLI calls it: a GradkitError is one line and exit status 2."""
    from gradkit.cli.diagnose import run_diagnose

    try:
        run_diagnose(_parser().parse_args(argv), progress=False)
    except GradkitError as err:
        return 2, str(err)
    return 0, capsys.readouterr().err


def test_diagnose_end_to_end_on_a_tiny_random_bert(tiny_model_dir, tmp_path, capsys):
    from gradkit.audit import audit_init
    from gradkit.cli.diagnose import make_batches
    from gradkit.data.text import load_text_classification
    from gradkit.train.model import load_classifier, load_tokenizer

    out = tmp_path / "run"
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    code, _ = _diagnose(
        [
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--batches",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "16",
        ],
        capsys,
    )
    assert code == 0 and torch.equal(torch.get_rng_state(), rng)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        json.loads((out / "summary.json").read_text())["files"]
    )
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    flow = json.loads((out / "gradient_flow.json").read_text())
    audit = json.loads((out / "audit.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in flow] == ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    for png in ("gradient_flow.png", "audit.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (
        "| block |" in (out / "gradient_flow.md").read_text() and "| name |" in (out / "audit.md").read_text()
    )
    assert json.loads((out / "config.json").read_text())["batches"] == 2

    # the same numbers as the library functions on the same model and batches
    model = load_classifier(str(tiny_model_dir), num_labels=2, seed=0)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    batches = make_batches(load_text_classification(None), tokenizer, 2, 4, 16, seed=0)
    assert [len(b["labels"]) for b in batches] == [4, 4] and batches[0]["input_ids"].shape[1] <= 16
    direct = gradient_flow(model, batches, lr=1e-3)
    assert [r["grad_norm"] for r in flow] == pytest.approx([r.grad_norm for r in direct], rel=1e-6)
    assert [r["update_ratio"] for r in flow] == pytest.approx([r.update_ratio for r in direct], rel=1e-6)
    assert len(audit) == len(audit_init(model.encoder)) == summary["tensors"]
    assert summary["depth_decay_per_block"] == pytest.approx(
        depth_decay([r.grad_norm for r in direct]), rel=1e-6
    )

    # an empty folder is fine; a full one needs --overwrite, which replaces it
    code, _ = _diagnose(
        ["--model", str(tiny_model_dir), "--out", str(out), "--batches", "1", "--batch-size", "2"], capsys
    )
    assert code == 2
    code, _ = _diagnose(
        [
            "--model",
            str(tiny_model_dir),
            "--out",
            str(out),
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--overwrite",
        ],
        capsys,
    )
    assert code == 0 and json.loads((out / "config.json").read_text())["batches"] == 1


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batches", "0"], "--batches 0 is not allowed"),
        (["--batch-size", "-1"], "--batch-size -1 is not allowed"),
        (["--max-length", "1"], "--max-length 1 is not allowed"),
        (["--lr", "0"], "--lr 0.0 is not allowed"),
        (["--lr", "nan"], "--lr nan is not allowed"),
        (["--max-length", "1000"], "exceeds the 128 positions"),
        (["--batches", "1000", "--batch-size", "100"], "needs 100000 examples"),
        (["--blocks", "decoder.*"], "matches no module"),
        (["--blocks", " "], "--blocks is empty"),
        (["--train", "missing.tsv"], "no such file"),
        (["--train", "{tmp}/one_class.tsv"], "at least 2 classes"),
    ],
)
def test_diagnose_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, extra, message):
    _write(tmp_path / "one_class.tsv", "sentence\tlabel\na\t1\nb\t1\n")
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    out = tmp_path / "run"
    code, err = _diagnose(["--model", str(tiny_model_dir), "--out", str(out), *extra], capsys)
    assert code == 2 and message in err and "\n" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_diagnose_refuses_a_missing_or_non_model_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _diagnose(["--model", str(tmp_path / "nowhere"), "--out", str(out)], capsys)
    assert code == 2 and "no such folder" in err
    (tmp_path / "empty").mkdir()
    code, err = _diagnose(["--model", str(tmp_path / "empty"), "--out", str(out)], capsys)
    assert code == 2 and "no config.json" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, err = _diagnose(["--out", str(tmp_path / "full")], capsys)
    assert code == 2 and "already holds files" in err and (tmp_path / "full" / "x").read_text() == "x"
    assert not out.exists()


def test_the_gradkit_diagnose_command(tiny_model_dir, tmp_path, capsys):
    """Through ``gradkit.cli.main`` (the subcommand is registered in gradkit.cli's build_parser and main)."""
    from gradkit.cli import main

    out = tmp_path / "run"
    argv = [
        "diagnose",
        "--model",
        str(tiny_model_dir),
        "--out",
        str(out),
        "--batches",
        "1",
        "--batch-size",
        "2",
    ]
    assert main(argv) == 0
    assert (out / "gradient_flow.json").is_file() and "run folder" in capsys.readouterr().out
    assert main([*argv[:-2], "--batch-size", "0", "--out", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradkit: error: --batch-size 0") and err.count("\n") == 1
    assert not (tmp_path / "other").exists()


def _model_folder(tiny_model_dir, tmp_path, change) -> str:
    """The tiny BERT of ``tiny_model_dir``, changed in place by ``change``, saved with its tokenizer files."""
    import shutil

    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        change(model)
    path = tmp_path / "model"
    model.save_pretrained(path)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special")):
            shutil.copy(f, path / f.name)
    return str(path)


def _diagnose_summary(model_dir: str, out, capsys) -> dict:
    code, _ = _diagnose(
        ["--model", model_dir, "--out", str(out), "--batches", "1", "--batch-size", "2"], capsys
    )
    assert code == 0
    return json.loads((out / "summary.json").read_text())


def test_diagnose_holds_a_bert_against_berts_own_init(tiny_model_dir, tmp_path, capsys):
    from gradkit.init import bert_init_

    fresh = _diagnose_summary(str(tiny_model_dir), tmp_path / "fresh", capsys)
    inited = _model_folder(
        tiny_model_dir, tmp_path, lambda m: bert_init_(m, generator=torch.Generator().manual_seed(0))
    )
    after = _diagnose_summary(inited, tmp_path / "bert_init", capsys)
    for summary in (fresh, after):  # every tensor under BERT's rule: N(0, 0.02²), zero biases, norms 1/0
        assert summary["weights"] == "init" and summary["tensors_flagged"] == []
        assert summary["rules"] == ["bert", "one", "zero"]
    # one query weight drawn by Xavier's rule (std 0.18, not 0.02): a per-tensor guess called it "xavier"
    wrong = _model_folder(
        tiny_model_dir,
        tmp_path / "w",
        lambda m: nn.init.xavier_normal_(m.encoder.layer[1].attention.self.query.weight),
    )
    assert _diagnose_summary(wrong, tmp_path / "wrong", capsys)["tensors_flagged"] == [
        "encoder.layer.1.attention.self.query.weight"
    ]


def test_diagnose_compares_a_trained_model_with_its_init_without_flags(tiny_model_dir, tmp_path, capsys):
    def train_like(model):  # what training does to a BERT: norms off 1/0, biases off 0, weights grown
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            p.add_(
                torch.randn(p.shape, generator=gen) * (0.1 if "LayerNorm" in name or "bias" in name else 0.03)
            )

    out = tmp_path / "run"
    summary = _diagnose_summary(_model_folder(tiny_model_dir, tmp_path, train_like), out, capsys)
    assert summary["weights"] == "trained" and summary["tensors_flagged"] == []
    audit = json.loads((out / "audit.json").read_text())
    assert all(r["flags"] == [] for r in audit)
    ln = next(r for r in audit if r["name"] == "embeddings.LayerNorm.weight")
    assert ln["rms_from_init_centre"] == pytest.approx(0.1, rel=0.3)  # how far it moved from 1
    query = next(r for r in audit if r["name"] == "encoder.layer.0.attention.self.query.weight")
    assert query["std_ratio"] == pytest.approx(math.hypot(0.02, 0.03) / 0.02, rel=0.15)
    text = (out / "audit.md").read_text()
    assert (
        "is a trained model" in text
        and "| rms from init centre |" in text
        and "flags" not in text.split("\n")[4]
    )


@pytest.mark.integration
def test_diagnose_on_its_default_pretrained_minilm_flags_nothing_and_says_trained(tmp_path, capsys):
    out = tmp_path / "run"
    code, _ = _diagnose(["--out", str(out), "--batches", "1", "--batch-size", "2"], capsys)
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["weights"] == "trained" and summary["tensors"] == 101 and summary["tensors_flagged"] == []
    assert summary["init_rule"].startswith("bert: N(0, 0.02²)")
