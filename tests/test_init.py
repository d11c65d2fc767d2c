"""gradkit.init (truncated normal with the real std, BERT init) and gradkit.audit_init (the init auditor)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import gradkit
from gradkit.audit import RULES, audit_init, expected_std, to_markdown
from gradkit.errors import GradkitError
from gradkit.init import _inside, bert_init_, truncated_normal_, truncation_std_factor


def _pdf(b: float) -> float:
    return math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)


def _truncated_moments(b: float) -> tuple[float, float]:
    """E[z²] and E[z⁴] of a standard normal truncated to [−b, b] (closed forms)."""
    mass = math.erf(b / math.sqrt(2))
    m2 = 1 - 2 * b * _pdf(b) / mass
    m4 = 3 - 2 * _pdf(b) * (b**3 + 3 * b) / mass
    return m2, m4


# ---------------------------------------------------------------- truncation_std_factor


@pytest.mark.parametrize("bound", [0.01, 0.05, 0.0999, 0.1, 0.5, 1.0, 2.0, 3.0, 6.0, 10.0])
def test_truncation_std_factor_equals_the_variance_integral(bound):
    import mpmath

    mpmath.mp.dps = 40
    num = mpmath.quad(lambda x: x * x * mpmath.exp(-x * x / 2), [-bound, bound])
    den = mpmath.quad(lambda x: mpmath.exp(-x * x / 2), [-bound, bound])
    exact = float(mpmath.sqrt(num / den))
    assert truncation_std_factor(bound) == pytest.approx(exact, rel=1e-11, abs=0)


def test_truncation_std_factor_known_values():
    assert truncation_std_factor(2.0) == pytest.approx(0.8796256610, abs=1e-10)
    assert 1 / truncation_std_factor(2.0) == pytest.approx(1.1368472, abs=1e-7)  # DESIGN 3.6
    assert 0.02 * truncation_std_factor(2.0) == pytest.approx(0.017593, abs=1e-6)  # BERT's real std
    assert truncation_std_factor(math.inf) == 1.0


# ---------------------------------------------------------------- truncated_normal_


@pytest.mark.parametrize("bound", [0.5, 0.99, 1.0, 2.0, 3.0])  # inverse CDF below 1, rejection from 1
def test_a_million_draws_have_the_requested_std_within_its_standard_error(bound):
    n, std = 10**6, 0.02
    x = truncated_normal_(torch.empty(n), std, bound, torch.Generator().manual_seed(1)).double()
    # Var(sample variance) = (μ4 − σ⁴)/n for the truncated law; the std's standard error is that / (2σ)
    m2, m4 = _truncated_moments(bound)
    sigma = std / math.sqrt(m2)
    se_var = math.sqrt((m4 - m2 * m2) * sigma**4 / n)
    se_std = se_var / (2 * std)
    assert abs(float(x.std()) - std) < 4 * se_std
    assert abs(float(x.mean())) < 4 * std / math.sqrt(n)
    cut = bound * sigma
    assert float(x.abs().max()) <= cut
    assert float(x.abs().max()) > 0.99 * cut  # the tail is reached, not clipped short


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize(
    ("std", "bound", "mean"), [(0.02, 2.0, 0.0), (0.7, 0.5, 0.1), (3.0, 3.0, -1.0), (1e-3, 2.0, 0.25)]
)
def test_no_value_outside_the_cut_in_any_dtype(dtype, std, bound, mean):
    x = torch.empty(200_000, dtype=dtype)
    truncated_normal_(x, std, bound, torch.Generator().manual_seed(2), mean=mean)
    assert x.dtype == dtype
    half = bound * std / truncation_std_factor(bound)
    v = x.double()
    assert float(v.min()) >= mean - half and float(v.max()) <= mean + half
    if (
        torch.finfo(dtype).eps * (abs(mean) + half) < std / 20
    ):  # the dtype resolves the std (bf16 at 0.25: no)
        assert float((v - mean).std()) == pytest.approx(std, rel=0.03)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_clamp_limit_is_the_last_representable_value_inside_the_cut(dtype):
    for limit in (2 * 0.02 / truncation_std_factor(2.0), 0.1 + 1e-7, 1.0 / 3.0):
        inside = _inside(limit, dtype, toward=0.0)
        assert float(inside) <= limit
        assert float(torch.nextafter(inside, torch.tensor(math.inf, dtype=dtype))) > limit
        low = _inside(-limit, dtype, toward=0.0)
        assert float(low) >= -limit
        assert float(torch.nextafter(low, torch.tensor(-math.inf, dtype=dtype))) < -limit


def test_bound_inf_is_the_plain_normal():
    x = truncated_normal_(torch.empty(10**6), 0.5, math.inf, torch.Generator().manual_seed(3))
    assert float(x.std()) == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(2 * 10**6))
    assert float(x.abs().max()) > 4 * 0.5


def test_generator_reproducible_and_the_global_rng_untouched():
    before = torch.get_rng_state()
    a = truncated_normal_(torch.empty(1000), 0.02, generator=torch.Generator().manual_seed(7))
    b = truncated_normal_(torch.empty(1000), 0.02, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), before)
    # without a generator: the global RNG, like torch.nn.init
    torch.manual_seed(5)
    c = truncated_normal_(torch.empty(1000), 0.02)
    torch.manual_seed(5)
    d = truncated_normal_(torch.empty(1000), 0.02)
    assert torch.equal(c, d) and not torch.equal(a, c)


def test_fills_a_parameter_in_place_and_returns_it():
    layer = nn.Linear(8, 4)
    out = truncated_normal_(layer.weight, 0.1, generator=torch.Generator().manual_seed(0))
    assert out is layer.weight and layer.weight.requires_grad
    assert truncated_normal_(torch.empty(0), 0.1).numel() == 0


@pytest.mark.parametrize(
    ("tensor", "kwargs"),
    [
        (torch.empty(4), {"std": 0.0}),
        (torch.empty(4), {"std": -0.02}),
        (torch.empty(4), {"std": math.nan}),
        (torch.empty(4), {"std": math.inf}),
        (torch.empty(4), {"std": "a"}),
        (torch.empty(4), {"std": 0.02, "bound": 0.0}),
        (torch.empty(4), {"std": 0.02, "bound": -2.0}),
        (torch.empty(4), {"std": 0.02, "bound": math.nan}),
        (torch.empty(4), {"std": 0.02, "mean": math.inf}),
        (torch.empty(4, dtype=torch.long), {"std": 0.02}),
        (torch.empty(4, dtype=torch.bool), {"std": 0.02}),
        ([0.0, 1.0], {"std": 0.02}),
    ],
)
def test_bad_input_is_one_line_gradkit_error(tensor, kwargs):
    with pytest.raises(GradkitError) as info:
        truncated_normal_(tensor, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(GradkitError):
        truncation_std_factor(0.0)


def test_public_names():
    assert gradkit.truncated_normal_ is truncated_normal_
    assert gradkit.init.bert_init_ is bert_init_
    assert gradkit.init.truncation_std_factor is truncation_std_factor
    assert gradkit.audit_init is audit_init
    assert gradkit.audit.to_markdown is to_markdown
    assert {"audit", "init", "models", "audit_init", "truncated_normal_"} <= set(dir(gradkit))


# ---------------------------------------------------------------- bert_init_


def _tiny_bert(pad: int = 0):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        pad_token_id=pad,
    )
    return BertModel(config)


@pytest.mark.parametrize("truncated", [True, False])
def test_bert_init_gives_the_real_std_and_bert_constants(truncated):
    model = _tiny_bert(pad=3)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7.0)
    before = torch.get_rng_state()
    assert (
        bert_init_(model, std=0.02, truncated=truncated, generator=torch.Generator().manual_seed(0)) is model
    )
    assert torch.equal(torch.get_rng_state(), before)
    cut = 2 * 0.02 / truncation_std_factor(2.0)
    checked = 0
    for m in model.modules():
        if isinstance(m, nn.Linear | nn.Embedding):
            w = m.weight.detach().double()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                assert torch.all(w[m.padding_idx] == 0)
                w = torch.cat([w[: m.padding_idx], w[m.padding_idx + 1 :]])
            n = w.numel()
            assert abs(float(w.std()) - 0.02) < 5 * 0.02 / math.sqrt(2 * n), type(m)
            if truncated:
                assert float(w.abs().max()) <= cut
            if isinstance(m, nn.Linear):
                assert torch.all(m.bias == 0)
            checked += 1
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert checked == 3 + 2 * 6 + 1  # embeddings, 6 Linear per layer, pooler
    # all Linear weights pooled: a tight check on the real std
    pooled = torch.cat(
        [m.weight.detach().flatten() for m in model.modules() if isinstance(m, nn.Linear)]
    ).double()
    assert float(pooled.std()) == pytest.approx(0.02, abs=4 * 0.02 / math.sqrt(2 * pooled.numel()))


def test_bert_init_refuses_a_non_module():
    with pytest.raises(GradkitError):
        bert_init_(torch.empty(3))


# ---------------------------------------------------------------- audit_init


def _linear(fan_in: int, fan_out: int, std: float, seed: int = 0, uniform: bool = False) -> nn.Linear:
    layer = nn.Linear(fan_in, fan_out)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if uniform:
            a = std * math.sqrt(3)
            layer.weight.uniform_(-a, a, generator=g)
        else:
            layer.weight.normal_(0.0, std, generator=g)
        layer.bias.zero_()
    return layer


def _row(rows, name):
    return next(r for r in rows if r.name == name)


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("uniform", [False, True])
def test_auditor_passes_a_weight_built_to_satisfy_each_rule(rule, uniform):
    layer = _linear(100, 300, expected_std(rule, 100, 300), uniform=uniform)
    for asked in (rule, "auto"):
        rows = audit_init(layer, rule=asked)
        w = _row(rows, "weight")
        assert w.rule == rule and w.flags == (), (asked, w)
        assert (w.fan_in, w.fan_out, w.shape, w.role) == (100, 300, (300, 100), "weight")
        assert w.std_ratio == pytest.approx(1.0, abs=0.03)
        b = _row(rows, "bias")
        if asked == "torch":  # PyTorch's default bias is uniform on ±1/sqrt(fan_in), not 0
            assert b.rule == "torch" and "std" in b.flags
        else:
            assert b.rule == "zero" and b.flags == ()


@pytest.mark.parametrize("rule", RULES)
def test_auditor_flags_a_weight_built_to_violate_each_rule(rule):
    std = expected_std(rule, 100, 300)
    too_wide = _linear(100, 300, 1.3 * std)
    assert "std" in _row(audit_init(too_wide, rule=rule), "weight").flags
    too_narrow = _linear(100, 300, 0.85 * std)
    assert "std" in _row(audit_init(too_narrow, rule=rule), "weight").flags
    shifted = _linear(100, 300, std)
    with torch.no_grad():
        shifted.weight += 0.5 * std
    assert _row(audit_init(shifted, rule=rule), "weight").flags == ("mean",)
    outlier = _linear(100, 300, std)
    with torch.no_grad():
        outlier.weight[0, 0] = 50 * std
    row = _row(audit_init(outlier, rule=rule), "weight")
    assert row.flags == ("tail",) and row.max_abs_z > 40
    broken = _linear(100, 300, std)
    with torch.no_grad():
        broken.weight[1, 2] = math.nan
    assert "nonfinite" in _row(audit_init(broken, rule=rule), "weight").flags


def test_auditor_norms_and_biases():
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64))
    with torch.no_grad():
        model[0].weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(0))
        model[0].bias.zero_()
    rows = audit_init(model, rule="bert")
    assert [(r.role, r.rule, r.flags) for r in rows] == [
        ("weight", "bert", ()),
        ("bias", "zero", ()),
        ("norm_weight", "one", ()),
        ("norm_bias", "zero", ()),
    ]
    with torch.no_grad():
        model[0].bias.fill_(0.1)
        model[1].weight.fill_(0.5)
        model[1].bias.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    rows = audit_init(model, rule="bert")
    assert _row(rows, "0.bias").flags == ("mean",)
    assert _row(rows, "1.weight").flags == ("mean",)
    assert "std" in _row(rows, "1.bias").flags


def test_auditor_recognises_pytorch_defaults():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(1000, 64), nn.Linear(256, 512), nn.Conv2d(3, 16, 3))
    rows = audit_init(model)  # auto
    assert [(r.name, r.rule, r.flags) for r in rows] == [
        ("0.weight", "torch", ()),  # N(0, 1)
        ("1.weight", "torch", ()),  # uniform ±1/sqrt(fan_in)
        ("1.bias", "torch", ()),
        ("2.weight", "torch", ()),
        ("2.bias", "torch", ()),
    ]
    conv = _row(rows, "2.weight")
    assert (conv.fan_in, conv.fan_out) == (27, 144)  # as torch.nn.init computes them
    assert (_row(rows, "2.bias").fan_in, _row(rows, "1.bias").fan_in) == (27, 256)
    # the same defaults under a rule that expects zero biases: flagged
    assert (
        "mean" in _row(audit_init(model, rule="bert"), "1.bias").flags
        or "std" in _row(audit_init(model, rule="bert"), "1.bias").flags
    )
    kaiming = nn.Conv2d(8, 16, 3)
    nn.init.kaiming_normal_(kaiming.weight, generator=torch.Generator().manual_seed(0))
    assert _row(audit_init(kaiming), "weight").rule == "kaiming"


def test_auditor_tells_bert_from_tensorflow_bert():
    ours = nn.Linear(256, 256)
    tf = nn.Linear(256, 256)
    g = torch.Generator().manual_seed(0)
    truncated_normal_(ours.weight, 0.02, generator=g)
    truncated_normal_(tf.weight, 0.02 * truncation_std_factor(2.0), generator=g)  # TF's stddev=0.02
    torch_default = nn.Linear(256, 256)
    nn.init.trunc_normal_(torch_default.weight, std=0.02, generator=g)  # cut at ±2 absolute: a plain normal
    assert _row(audit_init(ours), "weight").rule == "bert"
    assert _row(audit_init(tf), "weight").rule == "bert_tf"
    assert _row(audit_init(torch_default), "weight").rule == "bert"
    assert "std" in _row(audit_init(tf, rule="bert"), "weight").flags


def test_auditor_rows_statistics_and_markdown():
    layer = _linear(50, 40, 0.02, seed=3)
    tied = nn.Module()
    tied.emb = nn.Embedding(40, 50)
    tied.head = nn.Linear(50, 40, bias=False)
    tied.head.weight = tied.emb.weight
    tied.scale = nn.Parameter(torch.tensor(1.0))
    rows = audit_init(layer)
    w = layer.weight.detach().double()
    z = (w - w.mean()) / w.std()
    row = _row(rows, "weight")
    assert row.mean == pytest.approx(float(w.mean())) and row.std == pytest.approx(float(w.std()))
    assert row.max_abs_z == pytest.approx(float(z.abs().max()))
    assert row.frac_beyond_2 == pytest.approx(float((z.abs() > 2).double().mean()))
    assert row.frac_beyond_4 == pytest.approx(float((z.abs() > 4).double().mean()))
    assert row.as_dict()["shape"] == [40, 50]
    rows = audit_init(tied)
    assert [(r.name, r.role) for r in rows] == [("scale", "other"), ("emb.weight", "embedding")]
    assert _row(rows, "scale").rule is None
    text = to_markdown(audit_init(layer))
    lines = text.strip().splitlines()
    assert len(lines) == 2 + 2 and lines[0].startswith("| name |") and "`weight`" in lines[2]
    assert to_markdown(audit_init(layer), only_flagged=True).strip().count("\n") == 1


def test_auditor_marks_meta_parameters():
    with torch.device("meta"):
        layer = nn.Linear(3, 4)
    rows = audit_init(layer)
    assert [(r.name, r.flags, r.rule) for r in rows] == [
        ("weight", ("meta",), None),
        ("bias", ("meta",), None),
    ]
    assert math.isnan(rows[0].std) and rows[0].fan_in == 3


def test_auditor_bad_input():
    for bad_rule in ("he", "Xavier", ""):
        with pytest.raises(GradkitError) as info:
            audit_init(nn.Linear(2, 2), rule=bad_rule)
        assert "\n" not in str(info.value) and "kaiming" in str(info.value)
    with pytest.raises(GradkitError):
        audit_init({"w": torch.zeros(2)})


def test_auditor_on_a_from_config_bert_and_after_bert_init():
    from transformers import AutoModel

    torch.manual_seed(0)
    # Hugging Face's init: N(0, 0.02²), biases 0, LayerNorm 1/0
    model = AutoModel.from_config(_tiny_bert().config)
    rows = audit_init(model)
    assert len(rows) == len(list(model.parameters()))
    assert [r.name for r in rows if r.flags] == []
    # 0.02 and TF's 0.0176 are 12 % apart: a 2x64 token-type table may sit nearer either; large ones may not
    assert {r.rule for r in rows if r.role in ("weight", "embedding") and r.numel >= 1000} == {"bert"}
    assert {(r.role, r.rule) for r in rows if r.role not in ("weight", "embedding")} == {
        ("bias", "zero"),
        ("norm_weight", "one"),
        ("norm_bias", "zero"),
    }
    bert_init_(model, generator=torch.Generator().manual_seed(1))
    assert [r.name for r in audit_init(model, rule="bert") if r.flags] == []


def test_auditor_on_a_local_hugging_face_folder(tiny_model_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_model_dir)
    rows = audit_init(model)
    word = _row(rows, "embeddings.word_embeddings.weight")
    assert (word.shape, word.fan_in, word.fan_out, word.rule) == ((30522, 32), 32, 30522, "bert")
    assert not any(r.flags for r in rows)


@pytest.mark.integration
def test_auditor_on_the_bundled_minilm():
    from transformers import AutoModel

    from gradkit.train.model import default_model_path, quiet_transformers

    with quiet_transformers():
        model = AutoModel.from_pretrained(default_model_path())
    rows = audit_init(model)
    assert len(rows) == len(list(model.parameters()))
    word = _row(rows, "embeddings.word_embeddings.weight")
    assert word.shape == (30522, 384) and (word.fan_in, word.fan_out) == (384, 30522)
    w = model.embeddings.word_embeddings.weight.detach().double()
    assert word.std == pytest.approx(float(w.std()))
    # trained weights are not at their init: trained LayerNorms are no longer 1 and 0
    ln = _row(rows, "embeddings.LayerNorm.weight")
    assert ln.rule == "one" and "std" in ln.flags
    assert sum(1 for r in rows if r.flags) > len(rows) // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("bound", [1e-5, 1e-6, 1e-7, 1e-12, 1e-300])
def test_a_tiny_bound_keeps_the_std_in_every_dtype(dtype, bound):
    # the law is uniform on ±√3·std to any precision here: its std's standard error is 0.3·std/√n
    n, std = 10**6, 0.02
    x = truncated_normal_(torch.empty(n, dtype=dtype), std, bound, torch.Generator().manual_seed(4)).double()
    resolution = 0.02 if dtype == torch.bfloat16 else 1e-6  # bf16 rounds each value by up to 2^-9
    assert float(x.std()) == pytest.approx(std, rel=4 * 0.3 / math.sqrt(n) + resolution)
    assert float(x.abs().max()) <= math.sqrt(3) * std * (1 + 1e-6)
    assert float(x.abs().max()) > 0.99 * math.sqrt(3) * std


@pytest.mark.parametrize("bound", [1e300, 9e307, 1.7e308])
def test_a_huge_bound_is_the_plain_normal_not_nan(bound):
    assert truncation_std_factor(bound) == 1.0
    x = truncated_normal_(torch.empty(10**5), 0.5, bound, torch.Generator().manual_seed(5))
    assert bool(torch.isfinite(x).all())
    assert float(x.std()) == pytest.approx(0.5, abs=4 * 0.5 / math.sqrt(2 * 10**5))


def test_what_float64_cannot_honour_is_refused():
    with pytest.raises(GradkitError, match="below 1e-300"):
        truncated_normal_(torch.empty(3), 0.02, 1e-310)
    with pytest.raises(GradkitError, match="beyond float64's range"):
        truncated_normal_(torch.empty(3), 10.0, 1e308)
    x = torch.zeros(3)
    with pytest.raises(GradkitError):
        truncated_normal_(x, 0.02, 1e-320)
    assert torch.equal(x, torch.zeros(3))  # nothing written


def test_auditor_holds_a_known_architecture_to_its_own_init():
    from transformers import AutoModel, BertConfig

    from gradkit.audit import architecture_rule, looks_trained

    config = _tiny_bert().config
    config.initializer_range = 0.05
    torch.manual_seed(0)
    model = AutoModel.from_config(BertConfig.from_dict(config.to_dict()))
    assert architecture_rule(model) == ("bert", 0.05)
    rows = audit_init(model)
    assert [r.name for r in rows if r.flags] == [] and not looks_trained(rows)
    assert {r.expected_std for r in rows if r.role in ("weight", "embedding")} == {0.05}
    with torch.no_grad():  # one weight by another rule: under the architecture's rule it is flagged
        nn.init.kaiming_normal_(model.encoder.layer[0].output.dense.weight)
        model.encoder.layer[0].output.dense.bias.uniform_(-0.1, 0.1)
    flagged = {r.name for r in audit_init(model) if r.flags}
    assert flagged == {"encoder.layer.0.output.dense.weight", "encoder.layer.0.output.dense.bias"}
    assert architecture_rule(nn.Linear(3, 3)) is None
    with torch.no_grad():  # what training does: every LayerNorm gain and bias moves off 1 and 0
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.01 * torch.randn(p.shape))
    assert looks_trained(audit_init(model))
