"""gradkit.models.toy_transformer: shapes, causality, norm placement, tied embeddings, init, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradkit
from gradkit.errors import GradkitError
from gradkit.init import truncation_std_factor
from gradkit.models import ToyTransformer, toy_transformer


def _model(norm: str = "post", **kwargs) -> ToyTransformer:
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return toy_transformer(vocab=50, d_model=32, n_layers=3, n_heads=4, norm=norm, max_len=16, **kwargs)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_shapes_and_blocks(norm):
    model = _model(norm)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    assert model(ids).shape == (2, 12, 50)
    assert isinstance(model.blocks, nn.ModuleList) and len(model.blocks) == 3
    assert all(block.norm == norm for block in model.blocks)
    assert gradkit.models.toy_transformer is toy_transformer


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_a_future_token_does_not_change_earlier_logits(norm):
    model = _model(norm).eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 50
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def _block_io(block: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        block.ln1.register_forward_hook(lambda m, i, o: seen.setdefault("ln1_in", i[0])),
        block.ln2.register_forward_hook(lambda m, i, o: seen.setdefault("ln2_out", o)),
        block.attn.register_forward_hook(lambda m, i, o: seen.setdefault("attn_out", o)),
    ]
    try:
        with torch.no_grad():
            seen["out"] = block(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_post_ln_normalises_the_residual_sum_and_pre_ln_the_branch_input():
    x = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3)) * 3 + 1
    post = _model("post").blocks[0]
    seen = _block_io(post, x)
    torch.testing.assert_close(seen["ln1_in"], x + seen["attn_out"])  # LN(x + F(x))
    torch.testing.assert_close(seen["out"], seen["ln2_out"])  # the block ends in its norm
    assert seen["out"].mean(-1).abs().max() < 1e-5
    pre = _model("pre").blocks[0]
    seen = _block_io(pre, x)
    torch.testing.assert_close(seen["ln1_in"], x)  # x + F(LN(x)): the norm sees the block input
    assert seen["out"].mean(-1).abs().max() > 0.5  # the residual stream is not normalised
    assert isinstance(_model("pre").ln_f, nn.LayerNorm) and isinstance(_model("post").ln_f, nn.Identity)


def test_tied_and_untied_embeddings():
    tied = _model(tie_embeddings=True)
    assert tied.head.weight is tied.wte.weight
    assert (
        sum(p.numel() for p in tied.parameters())
        == sum(p.numel() for p in _model(tie_embeddings=False).parameters()) - 50 * 32
    )
    tied(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert tied.wte.weight.grad is not None and tied.wte.weight.grad.abs().sum() > 0
    untied = _model(tie_embeddings=False)
    assert untied.head.weight is not untied.wte.weight


def test_init_is_bert_with_the_real_std_and_reproducible():
    before = torch.get_rng_state()
    a = toy_transformer(64, 64, 2, 4, init_std=0.05, generator=torch.Generator().manual_seed(4))
    b = toy_transformer(64, 64, 2, 4, init_std=0.05, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), before)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    weights = torch.cat(
        [m.weight.detach().flatten() for m in a.modules() if isinstance(m, nn.Linear)]
    ).double()
    assert float(weights.std()) == pytest.approx(0.05, abs=4 * 0.05 / math.sqrt(2 * weights.numel()))
    assert float(weights.abs().max()) <= 2 * 0.05 / truncation_std_factor(2.0)
    for m in a.modules():
        if isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear) and m.bias is not None:
            assert torch.all(m.bias == 0)


def test_a_few_adamw_steps_learn_a_repeated_sequence():
    model = _model("pre")
    ids = torch.arange(16).remainder(5).unsqueeze(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"norm": "mid"},
        {"n_heads": 5},
        {"d_model": 0},
        {"vocab": 2.5},
        {"n_layers": True},
        {"max_len": 0},
        {"init_std": 0.0},
    ],
)
def test_bad_arguments_are_one_line_gradkit_errors(kwargs):
    args = {"vocab": 50, "d_model": 32, "n_layers": 2, "n_heads": 4, **kwargs}
    with pytest.raises(GradkitError) as info:
        toy_transformer(**args)
    assert "\n" not in str(info.value)


def test_too_long_or_flat_ids_are_refused():
    model = _model()
    for ids in (torch.zeros(1, 17, dtype=torch.long), torch.zeros(8, dtype=torch.long)):
        with pytest.raises(GradkitError, match="max_len"):
            model(ids)
