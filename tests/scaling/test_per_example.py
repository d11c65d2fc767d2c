"""Per-example Linear-layer gradient norms from hooks equal torch.func per-sample gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from gradkit import GradkitError, NoiseScale
from gradkit.scaling.per_example import linear_per_example_sq_norms


class _Net(nn.Module):
    """Linear -> tanh -> (token mean, for sequences) -> Linear; cross-entropy mean over the batch."""

    def __init__(self, d_in=6, hidden=8, classes=3):
        super().__init__()
        self.inner = nn.Linear(d_in, hidden)
        self.out = nn.Linear(hidden, classes, bias=False)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        if h.dim() == 3:
            h = h.mean(1)
        return self.out(h)


def _reference(model, x, y):
    """|g_n|^2 over the Linear parameters with torch.func (vmap over examples)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(p, xi, yi):
        logits = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    return sum(g.reshape(len(x), -1).pow(2).sum(1) for g in grads.values())


@pytest.mark.parametrize("shape", [(10, 6), (10, 3, 6), (10, 7, 6)])  # 2-D, sequences: Gram and direct paths
def test_hook_norms_equal_torch_func_per_sample_gradients(shape):
    gen = torch.Generator().manual_seed(0)
    torch_state = torch.get_rng_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = _Net()
    x = torch.randn(*shape, generator=gen)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    gns = NoiseScale(model)
    with gns.per_example_hooks() as rec:
        nn.functional.cross_entropy(model(x), y).backward()
        rec.step()
    ref = _reference(model, x, y)
    assert torch.allclose(rec.last_per_example, ref, rtol=1e-5, atol=0)
    big = sum(p.grad.pow(2).sum() for p in model.parameters())
    assert gns.last["big_sq_norm"] == pytest.approx(big.item(), rel=1e-6)
    assert gns.last["small_sq_norm"] == pytest.approx(ref.mean().item(), rel=1e-5)
    assert (gns.last["b_small"], gns.last["b_big"]) == (1, shape[0])
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_accumulated_micro_batches_and_clipping_after_backward():
    """Two forward/backward passes accumulate; clipping after backward does not change the big norm."""
    gen = torch.Generator().manual_seed(1)
    model = _Net()
    x = torch.randn(8, 5, 6, generator=gen)
    y = torch.randint(0, 3, (8,), generator=gen)
    gns = NoiseScale(model)
    rec = gns.per_example_hooks()
    for cx, cy in zip(x.split(4), y.split(4), strict=True):
        (nn.functional.cross_entropy(model(cx), cy) / 2).backward()
    big = sum(p.grad.pow(2).sum() for p in model.parameters()).item()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    with torch.no_grad():
        model(x)  # an evaluation pass is not a micro-batch
    rec.step()
    rec.remove()
    assert torch.allclose(rec.last_per_example, _reference(model, x, y), rtol=1e-5, atol=0)
    assert gns.last["big_sq_norm"] == pytest.approx(big, rel=1e-6)
    assert gns.last["b_big"] == 8


@pytest.mark.parametrize("t, d_in, d_out", [(1, 5, 4), (3, 6, 8), (9, 6, 8)])
def test_gram_trick_equals_materialised_per_example_gradients(t, d_in, d_out):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, t, d_in, generator=gen, dtype=torch.float64)
    dy = torch.randn(4, t, d_out, generator=gen, dtype=torch.float64)
    per = torch.einsum("nto,nti->noi", dy, x)
    want = per.pow(2).sum((1, 2)) + dy.sum(1).pow(2).sum(-1)
    got = linear_per_example_sq_norms(x, dy, bias=True)
    assert torch.allclose(got, want, rtol=1e-12)
    with pytest.raises(GradkitError, match="leading"):
        linear_per_example_sq_norms(x, dy[:2])


def test_per_example_misuse():
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(GradkitError, match="no trainable nn.Linear"):
        NoiseScale(frozen).per_example_hooks()
    model = nn.Linear(3, 2)
    rec = NoiseScale(model).per_example_hooks()
    with pytest.raises(GradkitError, match="no backward pass"):
        rec.step()
    model(torch.randn(1, 3)).sum().backward()
    with pytest.raises(GradkitError, match=">= 2 examples"):
        rec.step()


def test_linear_used_without_calling_it_is_left_out_of_both_norms():
    """MultiheadAttention uses out_proj.weight without calling out_proj: no per-example norm for it,
    so its gradient must not enter the batch norm either."""

    class _Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.called = nn.Linear(4, 4)
            self.bypassed = nn.Linear(4, 2)

        def forward(self, x):
            return nn.functional.linear(torch.tanh(self.called(x)), self.bypassed.weight)

    model = _Functional()
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    gns = NoiseScale(model)
    with gns.per_example_hooks() as rec:
        model(x).pow(2).mean().backward()
        rec.step()
    called = sum(p.grad.pow(2).sum() for p in model.called.parameters()).item()
    assert gns.last["big_sq_norm"] == pytest.approx(called, rel=1e-6)
