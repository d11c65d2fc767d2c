"""EMA: closed forms over scripted weight sequences, warmup formulas, buffers, swap, resume, wrappers."""

from __future__ import annotations

import math
import socket

import pytest
import torch
from torch import nn

from gradkit.ema import EMA, ema_decay, interval_decay, unwrap_model
from gradkit.errors import GradkitError


def _scripted(model: nn.Module, steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Set the model's parameters to a fixed random sequence; returns the sequence (step 1..steps)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
        for _ in range(steps)
    ]


def _set(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])


def _closed_form(theta0, seq, coeffs):
    """Θ_T = (∏ a_s)·θ_0 + Σ_s (1−a_s)·(∏_{u>s} a_u)·θ_s, in float64."""
    out = {}
    for n in theta0:
        total = torch.zeros_like(theta0[n], dtype=torch.float64)
        for s, w in enumerate(seq):
            total += (1 - coeffs[s]) * math.prod(coeffs[s + 1 :]) * w[n].double()
        out[n] = total + math.prod(coeffs) * theta0[n].double()
    return out


@pytest.mark.parametrize("warmup", [None, "power", "bias_corrected"])
def test_matches_closed_form_sum(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, decay=0.9, warmup=warmup)
    seq = _scripted(model, 30)
    for w in seq:
        _set(model, w)
        ema.update()
    coeffs = [ema_decay(s, 0.9, warmup) for s in range(1, 31)]
    want = _closed_form(theta0, seq, coeffs)
    got = ema.averaged_state_dict()
    for n in theta0:
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-6, rtol=0)


def test_warmup_formulas_by_hand():
    assert ema_decay(7, 0.99) == 0.99
    assert ema_decay(1, 0.99, "power") == 0.0
    assert ema_decay(2, 0.99, "power") == pytest.approx(1 - 2 ** (-2 / 3))  # 0.370039
    assert ema_decay(10, 0.99, "power") == pytest.approx(1 - 10 ** (-2 / 3))  # 0.784557
    assert ema_decay(11, 0.9, "power", gamma=2.0, power=0.75) == pytest.approx(1 - 6**-0.75)
    assert ema_decay(10**6, 0.99, "power") == 0.99  # capped at decay
    assert ema_decay(1, 0.9, "bias_corrected") == 0.0
    assert ema_decay(2, 0.9, "bias_corrected") == pytest.approx(0.9 * 0.1 / 0.19)
    assert ema_decay(3, 0.9, "bias_corrected") == pytest.approx(0.9 * 0.19 / 0.271)
    assert ema_decay(10**5, 0.9, "bias_corrected") == pytest.approx(0.9)
    with pytest.raises(GradkitError):
        ema_decay(0, 0.9)
    with pytest.raises(GradkitError):
        EMA(nn.Linear(2, 2), warmup="cosine")


def test_bias_corrected_is_adam_correction_of_zero_started_average():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.8, warmup="bias_corrected")
    seq = _scripted(model, 12, seed=3)
    m = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for s, w in enumerate(seq, start=1):
        _set(model, w)
        ema.update()
        for n in m:
            m[n] = 0.8 * m[n] + 0.2 * w[n].double()
            torch.testing.assert_close(
                ema.averaged_state_dict()[n].double(), m[n] / (1 - 0.8**s), atol=1e-6, rtol=0
            )


@pytest.mark.parametrize("warmup", [None, "power", "bias_corrected"])
def test_every_n_equals_every_step_on_sample_and_hold(warmup):
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    ema_n, ema_1 = EMA(a, 0.9, warmup, every=3), EMA(b, 0.9, warmup)
    seq = _scripted(a, 12, seed=1)
    moved = []
    for s, w in enumerate(seq, start=1):
        _set(a, w)
        moved.append(ema_n.update())
        held = seq[((s - 1) // 3) * 3 + 2]  # the weights at the next multiple of 3
        _set(b, held)
        ema_1.update()
    assert moved == [False, False, True] * 4
    for x, y in zip(ema_n.shadow, ema_1.shadow, strict=True):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert interval_decay(3, 6, 0.9) == pytest.approx(0.9**3)


def test_explicit_step_drives_warmup():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.99, warmup="power")
    _set(model, _scripted(model, 1)[0])
    ema.update(step=1)  # a_1 = 0: the average is the current weights, not the initial ones
    for s, p in zip(ema.shadow, model.parameters(), strict=True):
        assert torch.equal(s, p.detach())
    assert ema.step == 1 and ema.last_update == 1
    with pytest.raises(GradkitError):
        ema.update(step=0)


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


@pytest.mark.parametrize("mode", ["average", "copy"])
def test_buffers_averaged_or_copied(mode):
    model = _bn_model()
    ema = EMA(model, decay=0.5, buffers=mode)
    history = [model[1].running_mean.clone()]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        model(torch.randn(8, 4, generator=g) * 3 + 1)
        history.append(model[1].running_mean.clone())
        ema.update()
    got = ema.averaged_state_dict()
    if mode == "copy":
        assert torch.equal(got["1.running_mean"], history[-1])
    else:
        want = history[0].double() * 0.5**4 + sum(
            0.5 * 0.5 ** (4 - s) * history[s].double() for s in range(1, 5)
        )
        torch.testing.assert_close(got["1.running_mean"].double(), want, atol=1e-6, rtol=0)
        assert not torch.equal(got["1.running_mean"], history[-1])
    assert int(got["1.num_batches_tracked"]) == 4  # integer buffers always copied


def test_swapped_restores_bit_identical_also_after_exception():
    model = _bn_model()
    ema = EMA(model, decay=0.9)
    for w in _scripted(model, 3):
        _set(model, w)
        model(torch.randn(8, 4))
        ema.update()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.swapped() as m:
        assert m is model
        for k, v in model.state_dict().items():
            assert torch.equal(v, ema.averaged_state_dict()[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped():
        with torch.no_grad():
            model[0].weight.add_(1.0)  # even weights changed inside the block come back
        raise RuntimeError("boom")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_resume_is_exact():
    model = _bn_model()
    seq = _scripted(model, 10, seed=2)
    ema = EMA(model, decay=0.9, warmup="power", every=2)
    for w in seq[:5]:
        _set(model, w)
        ema.update()
    state = ema.state_dict()
    resumed = EMA(model, decay=0.5)  # different settings and starting point: all come from the state
    resumed.load_state_dict(state)
    for w in seq[5:]:
        _set(model, w)
        ema.update()
        resumed.update()
    assert resumed.step == ema.step == 10
    for x, y in zip(ema.shadow, resumed.shadow, strict=True):
        assert torch.equal(x, y)
    with pytest.raises(GradkitError):
        EMA(nn.Linear(2, 2)).load_state_dict(state)


def test_copy_to_another_model_and_follows_dtype_change():
    model = _bn_model()
    ema = EMA(model, decay=0.9)
    for w in _scripted(model, 3):
        _set(model, w)
        ema.update()
    other = _bn_model()
    ema.copy_to(other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, ema.averaged_state_dict()[k])
    model.double()  # buffers are replaced, parameters keep identity: the EMA reads them live
    ema.update()
    assert ema.shadow[0].dtype == torch.float32
    with pytest.raises(GradkitError):
        ema.copy_to(nn.Linear(2, 2))


def _train_steps(wrapped, inner, ema, steps=3):
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = wrapped(torch.randn(8, 4, generator=g)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def test_torch_compile_model_is_really_updated():
    model = _bn_model()
    compiled = torch.compile(model, backend="eager")
    assert unwrap_model(compiled) is model
    ema = EMA(compiled, decay=0.5)
    assert not any("_orig_mod" in n for n in ema.names)
    start = [s.clone() for s in ema.shadow]
    _train_steps(compiled, model, ema)
    assert not torch.equal(start[0], ema.shadow[0])  # the average moved
    assert torch.equal(ema.averaged_state_dict()["1.num_batches_tracked"], model[1].num_batches_tracked)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_model_is_really_updated():
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{_free_port()}")
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp, decay=0.5)
        assert ema.module is model and ema.names[0] == "0.weight"
        w0 = model[0].weight.detach().clone()
        _train_steps(ddp, model, ema, steps=1)
        want = 0.5 * w0 + 0.5 * model[0].weight.detach()
        torch.testing.assert_close(ema.shadow[0], want, atol=1e-7, rtol=0)
        assert not torch.equal(ema.shadow[0], w0)
        del ddp  # the DDP reducer must go before its process group (gloo teardown can deadlock otherwise)
    finally:
        dist.destroy_process_group()


def test_dtype_and_device_options():
    model = nn.Linear(3, 3).to(torch.bfloat16)
    ema = EMA(model, decay=0.9, device="cpu", shadow_dtype=torch.float32)
    assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in ema.shadow)
    ema.update()
    with ema.swapped():
        assert model.weight.dtype == torch.bfloat16


# -- half precision -----------------------------------------------------------------------------
HALF = [torch.bfloat16, torch.float16]


def _constant_target_model(dtype, init=1.0):
    model = nn.Linear(4, 3).to(dtype)
    with torch.no_grad():
        model.weight.fill_(init)
        model.bias.fill_(init)
    return model


def _exact_towards(target, init, coeffs):
    """Θ_n = target + (init − target)·∏ a_s, in float64: the EMA of a constant sequence."""
    return target + (init - target) * math.prod(coeffs)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("warmup", [None, "power", "bias_corrected"])
def test_half_precision_average_moves_and_matches_fp64_closed_form(dtype, warmup):
    """Weights 1.0 at step 1, then 1.5: Θ_n = 1.5 + (Θ_1 − 1.5)·∏_{s=2}^{n} a_s. With decay 0.999 the
    step (1 − a)·Δ ≤ 5e-4 is below half an ulp of bf16 (and fp16) at 1.0, so a shadow kept in the
    parameter's dtype never moves (1.0000 after 1,000 updates, exact 1.3162); the default fp32
    shadow follows the fp64 closed form, and rounds to it in the model's dtype, at every checkpoint."""
    model = _constant_target_model(dtype)
    ema = EMA(model, decay=0.999, warmup=warmup)
    assert all(s.dtype == torch.float32 for s in ema.shadow)
    coeffs = [ema_decay(s, 0.999, warmup) for s in range(1, 1002)]
    ema.update()  # step 1 at the initial weights 1.0: Θ_1 = 1.0 whatever a_1 is
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.5)
    for step in range(2, 1002):
        ema.update()
        if step not in (2, 10, 100, 1001):
            continue
        exact = _exact_towards(1.5, 1.0, coeffs[1:step])
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(exact))
        for s in ema.shadow:
            assert (s.double() - exact).abs().max().item() < ulp / 8, step  # fp32 rounding only
            assert torch.equal(s.to(dtype), torch.full_like(s, exact, dtype=torch.float64).to(dtype))
        # the export in the model's dtype is the closed form rounded once to that dtype
        for k, v in ema.averaged_state_dict().items():
            assert v.dtype == dtype, k
            assert torch.equal(v, torch.full_like(v, exact, dtype=torch.float64).to(dtype)), (k, step)
    if warmup is None:
        assert exact == pytest.approx(1.5 - 0.5 * 0.999**1000) and abs(exact - 1.3162) < 1e-4
    full = ema.averaged_state_dict(full_precision=True)
    assert all(v.dtype == torch.float32 for v in full.values())


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_swapped_casts_in_and_restores_bit_exact(dtype):
    model = _constant_target_model(dtype)
    ema = EMA(model, decay=0.999)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.5)
    for _ in range(1000):
        ema.update()
    with torch.no_grad():
        model.weight.add_(torch.randn(model.weight.shape).to(dtype) * 1e-2)  # distinct training weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = _exact_towards(1.5, 1.0, [0.999] * 1000)
    with ema.swapped() as m:
        for k, v in m.state_dict().items():
            assert v.dtype == dtype
            assert torch.equal(v, torch.full_like(v, exact, dtype=torch.float64).to(dtype)), k
    for k, v in model.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, before[k])


@pytest.mark.parametrize("dtype", HALF)
def test_shadow_dtype_param_keeps_the_memory_and_the_documented_stall(dtype):
    """shadow_dtype="param" halves the EMA memory; the price is the documented rounding: the average
    cannot move by less than half an ulp per update."""
    model = _constant_target_model(dtype)
    ema = EMA(model, decay=0.999, shadow_dtype="param")
    assert all(s.dtype == dtype for s in ema.shadow)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.5)
    for _ in range(1000):
        ema.update()
    # the stall in the parameter's dtype: bf16 stays at 1.0, fp16 stops at 1.0117; exact is 1.3162
    exact = _exact_towards(1.5, 1.0, [0.999] * 1000)
    assert all((s.double() - exact).abs().min().item() > 0.3 for s in ema.shadow)
    assert ema.shadow_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    fp32 = EMA(model, decay=0.999)
    assert fp32.shadow_bytes == 2 * ema.shadow_bytes


def test_shadow_dtype_options_and_fp32_models_unchanged():
    model = nn.Linear(3, 3)
    assert all(s.dtype == torch.float32 for s in EMA(model).shadow)
    assert all(s.dtype == torch.float64 for s in EMA(model, shadow_dtype=torch.float64).shadow)
    with pytest.raises(GradkitError, match="shadow_dtype"):
        EMA(model, shadow_dtype="half")
    with pytest.raises(GradkitError, match="floating"):
        EMA(model, shadow_dtype=torch.int64)


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_state_dict_resume_and_buffers(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).to(dtype)
    ema = EMA(model, decay=0.9, warmup="power")
    seq = _scripted(model, 8, seed=5)
    for w in seq[:4]:
        _set(model, w)
        ema.update()
    state = ema.state_dict()
    assert all(v.dtype == torch.float32 for k, v in state["shadow"].items() if "num_batches" not in k)
    assert state["shadow"]["1.num_batches_tracked"].dtype == torch.int64
    resumed = EMA(model, decay=0.5)
    resumed.load_state_dict(state)
    for w in seq[4:]:
        _set(model, w)
        ema.update()
        resumed.update()
    for x, y in zip(ema.shadow, resumed.shadow, strict=True):
        assert torch.equal(x, y)
    # the average of the half-precision sequence is the fp64 closed form up to fp32 rounding
    coeffs = [ema_decay(s, 0.9, "power") for s in range(1, 9)]
    start = {n: seq[0][n].double() for n in seq[0]}  # a_1 = 0: the start does not matter
    want = _closed_form(start, seq, coeffs)
    got = ema.averaged_state_dict(full_precision=True)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], atol=1e-6, rtol=0)
