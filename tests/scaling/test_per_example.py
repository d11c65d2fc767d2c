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


# -- a Linear called several times per forward pass (issue 12, item 5) ------------------------------
def _reference_fn(model, loss_one, *inputs):
    """|g_n|^2 over all parameters with torch.func: vmap over examples of grad of one example's loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = vmap(grad(loss_one), in_dims=(None, *[0] * len(inputs)))(params, *inputs)
    n = len(inputs[0])
    return sum(g.reshape(n, -1).pow(2).sum(1) for g in grads.values())


class _Twice(nn.Module):
    """One square Linear applied twice (a reused block), then a head."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.block = nn.Linear(d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = torch.tanh(self.block(x))
        h = torch.tanh(self.block(h))
        if h.dim() == 3:
            h = h.mean(1)
        return self.head(h)


@pytest.mark.parametrize("shape", [(10, 6), (10, 3, 6), (10, 7, 6)])
def test_linear_called_twice_equals_torch_func(shape):
    gen = torch.Generator().manual_seed(4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = _Twice()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],), generator=gen)
    model.double()

    def loss_one(p, xi, yi):
        return nn.functional.cross_entropy(functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    gns = NoiseScale(model)
    with gns.per_example_hooks() as rec:
        nn.functional.cross_entropy(model(x), y).backward()
        rec.step()
    ref = _reference_fn(model, loss_one, x, y)
    torch.testing.assert_close(rec.last_per_example, ref, rtol=1e-10, atol=0)
    big = sum(p.grad.pow(2).sum() for p in model.parameters())
    assert gns.last["big_sq_norm"] == pytest.approx(big.item(), rel=1e-10)


class _ThreeLengths(nn.Module):
    """One Linear called on sequences of 3 and 5 tokens and on a plain (N, d) batch, plus a fourth call
    whose output never reaches the loss (its output gradient never arrives)."""

    def __init__(self, d=5):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 1, bias=False)

    def forward(self, a, b, c):
        ha = torch.tanh(self.shared(a)).mean(1)
        hb = torch.tanh(self.shared(b)).sum(1)
        hc = torch.tanh(self.shared(c))
        self.shared(c)  # unused: contributes nothing to the gradient
        return self.head(ha * hb + hc).squeeze(-1)


def test_linear_called_three_times_with_different_sequence_lengths_equals_torch_func():
    gen = torch.Generator().manual_seed(5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = _ThreeLengths().double()
    n = 7
    a = torch.randn(n, 3, 5, generator=gen, dtype=torch.float64)
    b = torch.randn(n, 5, 5, generator=gen, dtype=torch.float64)
    c = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)

    def loss_one(p, ai, bi, ci, yi):
        out = functional_call(model, p, (ai.unsqueeze(0), bi.unsqueeze(0), ci.unsqueeze(0)))
        return (out - yi).pow(2).sum()

    gns = NoiseScale(model)
    with gns.per_example_hooks() as rec:
        (model(a, b, c) - y).pow(2).mean().backward()
        rec.step()
    ref = _reference_fn(model, loss_one, a, b, c, y)
    torch.testing.assert_close(rec.last_per_example, ref, rtol=1e-10, atol=0)


class _Tied(nn.Module):
    """Two Linear modules sharing one weight (own biases): the shared weight's per-example gradient is
    the sum of both modules' parts."""

    def __init__(self, d=4):
        super().__init__()
        self.enc = nn.Linear(d, d)
        self.dec = nn.Linear(d, d)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x))).sum(-1)


def test_linears_sharing_a_weight_equal_torch_func_and_count_it_once():
    gen = torch.Generator().manual_seed(6)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(6)
        model = _Tied().double()
    x = torch.randn(9, 2, 4, generator=gen, dtype=torch.float64)

    def loss_one(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),)).pow(2).sum()

    gns = NoiseScale(model)
    with gns.per_example_hooks() as rec:
        model(x).pow(2).sum(-1).mean().backward()
        rec.step()
    ref = _reference_fn(model, loss_one, x)
    torch.testing.assert_close(rec.last_per_example, ref, rtol=1e-10, atol=0)
    big = sum(p.grad.pow(2).sum() for p in model.parameters())  # parameters() lists the tied weight once
    assert gns.last["big_sq_norm"] == pytest.approx(big.item(), rel=1e-10)


class _TiedToEmbedding(nn.Module):
    def __init__(self, vocab=7, d=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.body = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))


def test_linear_weight_tied_to_a_non_linear_module_is_refused_or_left_out():
    model = _TiedToEmbedding()
    with pytest.raises(GradkitError, match="lm_head"):
        NoiseScale(model).per_example_hooks(modules=[model.body, model.lm_head])
    with pytest.warns(UserWarning, match="lm_head"):
        rec = NoiseScale(model).per_example_hooks()
    assert rec.linears == [model.body]
    rec.remove()


def test_calls_with_different_batch_sizes_are_refused_with_the_module_name():
    class _Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 3)

        def forward(self, x):
            return self.proj(self.proj(x).reshape(-1, 3)).sum()  # second call sees N*T rows

    model = _Flat()
    with NoiseScale(model).per_example_hooks() as rec, pytest.raises(GradkitError, match="proj"):
        model(torch.randn(4, 2, 3)).backward()
        rec.step()
