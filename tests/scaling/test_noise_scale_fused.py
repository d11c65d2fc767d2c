"""The fused accumulation source (one multi-tensor read of the accumulated gradients per micro-batch)
gives what the per-parameter tensor hooks give, step after step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from gradkit import GradkitError, NoiseScale


class Net(nn.Module):
    """A small encoder, plus a branch only some micro-batches use (its gradient appears mid-step)."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)
        self.extra = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = self.body(x).mean(1)
        return self.head(h) + (self.extra(h) if use_extra else 0)


def _run(fused: bool, set_to_none: bool, dtype: torch.dtype) -> list[dict[str, float]]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Net().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    gns = NoiseScale(model, beta=0.5)
    gen = torch.Generator().manual_seed(1)
    sizes = [3, 5, 4, 4]
    out = []
    with gns.accumulation_hooks(fused=fused, grad_scale=2.0) as rec:
        assert rec.fused is fused
        for _ in range(3):
            x = torch.randn(sum(sizes), 6, 16, generator=gen).to(dtype)
            y = torch.randint(0, 3, (sum(sizes),), generator=gen)
            for i, (cx, cy) in enumerate(zip(x.split(sizes), y.split(sizes), strict=True)):
                loss = nn.functional.cross_entropy(model(cx, use_extra=i >= 1).float(), cy, reduction="sum")
                (2.0 * loss / sum(sizes)).backward()
                rec.micro_step(len(cy))
            rec.step()
            out.append(dict(gns.last))
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
    return out


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fused_reads_equal_the_hooks(dtype, set_to_none):
    hooks = _run(False, set_to_none, dtype)
    fused = _run(True, set_to_none, dtype)
    # float32 norms of the same increments (float64 stays float64); bf16 grads: the fused path forms
    # a_i − a_{i−1} in bf16, the hook saw Δ_i itself, so only bf16 rounding apart
    rel = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(hooks, fused, strict=True):
        for key in ("small_sq_norm", "big_sq_norm", "b_small", "b_big"):
            assert b[key] == pytest.approx(a[key], rel=rel), key


def test_fused_is_the_default_in_one_process_and_keeps_the_misuse_errors():
    model = nn.Linear(3, 1)
    rec = NoiseScale(model).accumulation_hooks()
    assert rec.fused and not rec._handles
    with pytest.raises(GradkitError, match="no micro-batches"):
        rec.step()
    with pytest.raises(GradkitError, match="no gradient"):
        rec.micro_step(4)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(GradkitError, match="not closed with micro_step"):
        rec.step()
    rec.micro_step(4)
    with pytest.raises(GradkitError, match="no gradient"):
        rec.micro_step(4)  # no backward since the last call
    model(torch.randn(4, 3)).sum().backward()
    rec.micro_step(4)
    rec.step()
    rec.remove()
    assert all(prev is None for prev in rec._previous)


def test_fused_does_not_change_the_gradients():
    model = nn.Linear(4, 2)
    twin = copy.deepcopy(model)
    x = torch.randn(6, 4)
    with NoiseScale(model).accumulation_hooks() as rec:
        for chunk in x.split(3):
            model(chunk).pow(2).sum().backward()
            rec.micro_step(3)
        rec.step()
    twin(x).pow(2).sum().backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad)
