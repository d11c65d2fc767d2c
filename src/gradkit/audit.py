"""The init auditor: for every parameter tensor, what its values really are against what a named rule expects.

``audit_init(model, rule="auto")`` returns one :class:`InitRow` per parameter tensor; ``to_markdown``
prints them as a table. See :func:`audit_init` for the rules, the choice ``"auto"`` makes and the flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError

__all__ = [
    "BERT_FAMILY",
    "RULES",
    "InitRow",
    "architecture_rule",
    "audit_init",
    "comparison_markdown",
    "expected_std",
    "fans",
    "looks_trained",
    "rms_from_init_value",
    "to_markdown",
]

# the named rules for weights, in the order "auto" breaks ties
RULES = ("bert", "bert_tf", "xavier", "kaiming", "lecun", "torch")
_TF_FACTOR = (
    0.8796256610342398  # gradkit.init.truncation_std_factor(2.0), kept here so the audit imports nothing
)
# Hugging Face model types whose ``_init_weights`` is BERT's: every Linear and Embedding weight
# N(0, config.initializer_range²) (an embedding's padding row 0), every bias 0, LayerNorm 1 and 0
BERT_FAMILY = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")
STD_TOLERANCE = 0.10
TAIL_SIGMAS = 6.0
_CONST_ATOL = 1e-6


@dataclass
class InitRow:
    """One parameter tensor: its measured statistics, the rule it is compared with, and the flags raised.

    ``max_abs_z`` and ``frac_beyond_2``/``frac_beyond_4`` are in units of the measured std around the
    measured mean (0 for a constant tensor). ``expected_std`` is the rule's (0 for the constant rules
    "zero" and "one"; None where no rule applies); ``std_ratio`` = std / expected_std.
    """

    name: str
    shape: tuple[int, ...]
    role: str  # weight, embedding, bias, norm_weight, norm_bias, other
    fan_in: int | None
    fan_out: int | None
    numel: int
    mean: float
    std: float
    max_abs_z: float
    frac_beyond_2: float
    frac_beyond_4: float
    rule: str | None
    expected_mean: float | None
    expected_std: float | None
    std_ratio: float | None
    tolerance: float | None
    flags: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["flags"] = list(self.shape), list(self.flags)
        return d


def fans(shape: tuple[int, ...] | torch.Size) -> tuple[int, int] | None:
    """(fan_in, fan_out) as ``torch.nn.init`` computes them: dim 1 and dim 0 times the receptive field
    (the product of the dims after the second); None for a tensor with fewer than 2 dims."""
    if len(shape) < 2:
        return None
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


def expected_std(rule: str, fan_in: int, fan_out: int, *, embedding: bool = False) -> float:
    """The std a weight of the given fans has under ``rule`` (one of :data:`RULES`).

    - ``"bert"``: 0.02 (Devlin et al. 2019, as Hugging Face initialises BERT: N(0, 0.02²); also
      ``gradkit.init.bert_init_``, whose 0.02 is the real std of its truncated normal);
    - ``"bert_tf"``: 0.02·0.8796 = 0.01759, the real std of TensorFlow's ``truncated_normal(stddev=0.02)``
      that the original BERT code drew from (cut at ±2σ);
    - ``"xavier"``: sqrt(2/(fan_in + fan_out)) (Glorot & Bengio 2010; uniform and normal alike);
    - ``"kaiming"``: sqrt(2/fan_in) (He et al. 2015, fan-in mode, ReLU gain sqrt(2));
    - ``"lecun"``: 1/sqrt(fan_in) (LeCun et al. 1998; He's fan-in rule with gain 1);
    - ``"torch"``: PyTorch's own default: 1/sqrt(3·fan_in) for Linear and Conv weights
      (``kaiming_uniform_(a=sqrt(5))``: uniform on ±1/sqrt(fan_in)), and 1 for ``nn.Embedding`` (N(0, 1)).
    """
    if rule == "bert":
        return 0.02
    if rule == "bert_tf":
        return 0.02 * _TF_FACTOR
    if rule == "xavier":
        return math.sqrt(2.0 / (fan_in + fan_out))
    if rule == "kaiming":
        return math.sqrt(2.0 / fan_in)
    if rule == "lecun":
        return 1.0 / math.sqrt(fan_in)
    if rule == "torch":
        return 1.0 if embedding else 1.0 / math.sqrt(3.0 * fan_in)
    raise GradkitError(f"unknown init rule {rule!r}; use 'auto' or one of {', '.join(RULES)}")


def architecture_rule(model: nn.Module) -> tuple[str, float] | None:
    """``(model_type, std)`` for a Hugging Face model of a family whose init gradkit knows
    (:data:`BERT_FAMILY`: N(0, std²) with std = ``config.initializer_range`` for every weight and
    embedding, zero biases, LayerNorm ones and zeros), else None."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    std = getattr(config, "initializer_range", None)
    if model_type in BERT_FAMILY and isinstance(std, int | float) and std > 0:
        return str(model_type), float(std)
    return None


def _is_norm(module: nn.Module) -> bool:
    norm_types: tuple[type, ...] = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
    if hasattr(nn, "RMSNorm"):
        norm_types = (*norm_types, nn.RMSNorm)
    return isinstance(module, norm_types) or "norm" in type(module).__name__.lower()


def _role(module: nn.Module, pname: str, param: torch.Tensor) -> tuple[str, torch.Tensor | None]:
    """The tensor's role, and for a bias the weight beside it (whose fans the bias rule uses)."""
    if _is_norm(module):
        return {"weight": "norm_weight", "bias": "norm_bias"}.get(pname, "other"), None
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) and pname == "weight":
        return "embedding", None
    if "bias" in pname and param.dim() <= 1:
        sibling = getattr(module, pname.replace("bias", "weight"), None)
        return "bias", sibling if isinstance(sibling, torch.Tensor) else None
    if param.dim() >= 2:
        return "weight", None
    return "other", None


def _stats(x: torch.Tensor) -> tuple[float, float, float, float, float, bool]:
    x = x.detach().to(torch.float64).flatten()
    finite = bool(torch.isfinite(x).all())
    if not finite:
        x = x[torch.isfinite(x)]
    if x.numel() == 0:
        return math.nan, math.nan, math.nan, math.nan, math.nan, finite
    mean = float(x.mean())
    std = float(x.std()) if x.numel() > 1 else 0.0
    if std == 0.0:
        return mean, 0.0, 0.0, 0.0, 0.0, finite
    z = (x - mean).abs_().div_(std)
    return mean, std, float(z.max()), float((z > 2).double().mean()), float((z > 4).double().mean()), finite


def _log_distance(std: float, expected: float) -> float:
    return abs(math.log(std / expected)) if std > 0 else math.inf


def audit_init(model: nn.Module, rule: str = "auto") -> list[InitRow]:
    """One :class:`InitRow` per parameter tensor of ``model``: measured mean, std, tails; the rule's std; flags.

    Works on any ``nn.Module`` (a Hugging Face model from ``from_pretrained`` or ``from_config``
    included). Tied parameters appear once, under their first name. Statistics are computed in float64.

    **Roles and what each expects.** A parameter of a normalisation module (``nn.LayerNorm``,
    ``nn.GroupNorm``, batch norms, ``nn.RMSNorm``, or any module whose class name contains "Norm")
    is ``norm_weight`` (rule ``"one"``: every value 1) or ``norm_bias`` (rule ``"zero"``). A 1-D
    parameter whose name contains "bias" is a ``bias``: rule ``"zero"``, except under
    ``rule="torch"``, which expects PyTorch's default bias (uniform on ±1/sqrt(fan_in), std
    1/sqrt(3·fan_in), with the fans of the weight beside it, as ``nn.Linear.reset_parameters`` does;
    ``fan_in``/``fan_out`` of a bias row are that weight's). ``nn.Embedding`` weights are
    ``embedding``, other tensors of 2 or more dims ``weight``: both are compared with the std of
    ``rule`` (see :func:`expected_std`: "bert" 0.02, "bert_tf" 0.0176, "xavier"
    sqrt(2/(fan_in+fan_out)) (Glorot & Bengio 2010), "kaiming" sqrt(2/fan_in) (He et al. 2015),
    "lecun" 1/sqrt(fan_in), "torch" PyTorch's default), all with mean 0. Anything else (``other``:
    scalars, 1-D non-bias vectors) gets no rule; only its tail and finiteness are checked.

    **rule="auto"** on a model of a known family (:func:`architecture_rule`: a Hugging Face BERT,
    RoBERTa, ELECTRA, DistilBERT …): that architecture's own init for every tensor, rule "bert" with
    std ``config.initializer_range`` for every weight and embedding, "zero" for every bias, norms "one"
    and "zero" — so a tensor initialised by another rule is flagged. On any other model, per tensor:
    norm weights "one", norm biases "zero"; a bias "zero" if all its values are 0, else "torch" when
    its weight's fans are known (else "zero"); a weight or embedding the named rule of :data:`RULES`
    whose std is closest to the measured one in ratio (smallest |log(std/expected)|, ties to the
    earlier name). The row's ``rule`` names the choice. So a flag under per-tensor "auto" means no
    known rule fits. A trained model is not at any init: see :func:`looks_trained`.

    **Flags** (``row.flags``):

    - ``"std"``: |std/expected − 1| > ``tolerance`` = max(10 %, 3 standard errors of a sample std,
      3/sqrt(2(n − 1))) — the standard error term only matters below ~450 values; for the constant
      rules ("one", "zero"), values not all equal (std above 1e-6·max(1, |c|));
    - ``"mean"``: |mean − expected mean| > max(0.1·expected std, 4·expected std/sqrt(n)); for the
      constant rules, a mean off the constant c by more than 1e-6·max(1, |c|);
    - ``"tail"``: a value beyond 6 measured std from the mean (a normal has that with probability
      2e-9 per value; torch's ``trunc_normal_`` with a small std produced 1,000σ outliers in the
      torch versions that sampled it by erfinv, pytorch issue 155588);
    - ``"nonfinite"``: NaN or inf values (the statistics are then over the finite ones);
    - ``"meta"``: a parameter on the meta device (not materialised; its statistics are NaN).
    """
    if not isinstance(model, nn.Module):
        raise GradkitError(f"audit_init takes an nn.Module, got {type(model).__name__}")
    if rule != "auto" and rule not in RULES:
        raise GradkitError(f"unknown init rule {rule!r}; use 'auto' or one of {', '.join(RULES)}")
    family = architecture_rule(model) if rule == "auto" else None
    family_std = family[1] if family is not None else None
    rows = []
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner, _, pname = name.rpartition(".")
        module = modules[owner]
        role, sibling = _role(module, pname, param)
        shape = tuple(param.shape)
        fan = fans(shape) if sibling is None else fans(tuple(sibling.shape))
        fan_in, fan_out = fan if fan is not None else (None, None)
        if param.is_meta:  # not materialised: nothing to measure
            unknown = (math.nan,) * 5 + (None,) * 5
            rows.append(InitRow(name, shape, role, fan_in, fan_out, param.numel(), *unknown, ("meta",)))
            continue
        mean, std, max_z, beyond2, beyond4, finite = _stats(param)
        n = param.numel()

        chosen, exp_mean, exp_std = _expectation(role, rule, mean, std, fan_in, fan_out, family_std)
        flags, ratio, tol = _flags(n, mean, std, max_z, finite, exp_mean, exp_std)
        rows.append(
            InitRow(
                name, shape, role, fan_in, fan_out, n, mean, std, max_z, beyond2, beyond4,
                chosen, exp_mean, exp_std, ratio, tol, tuple(flags),
            )
        )  # fmt: skip
    return rows


def _expectation(
    role: str,
    rule: str,
    mean: float,
    std: float,
    fan_in: int | None,
    fan_out: int | None,
    family_std: float | None = None,
) -> tuple[str | None, float | None, float | None]:
    """The rule chosen for a tensor of ``role`` and the mean and std it expects (None, None, None for
    ``other``); see :func:`audit_init` for the choice under ``rule="auto"`` (``family_std``: the
    known architecture's std, which fixes every choice)."""
    if role == "norm_weight":
        return "one", 1.0, 0.0
    if role == "norm_bias":
        return "zero", 0.0, 0.0
    if family_std is not None:
        if role == "bias":
            return "zero", 0.0, 0.0
        if role in ("weight", "embedding"):
            return "bert", 0.0, family_std
        return None, None, None
    if role == "bias":
        zero = std == 0.0 and mean == 0.0
        if fan_in is not None and (rule == "torch" or (rule == "auto" and not zero)):
            return "torch", 0.0, 1.0 / math.sqrt(3.0 * fan_in)
        return "zero", 0.0, 0.0
    if role in ("weight", "embedding"):
        emb = role == "embedding"
        if rule == "auto":
            chosen = min(
                RULES, key=lambda r: _log_distance(std, expected_std(r, fan_in, fan_out, embedding=emb))
            )
        else:
            chosen = rule
        return chosen, 0.0, expected_std(chosen, fan_in, fan_out, embedding=emb)
    return None, None, None


def _flags(
    n: int,
    mean: float,
    std: float,
    max_z: float,
    finite: bool,
    exp_mean: float | None,
    exp_std: float | None,
) -> tuple[list[str], float | None, float | None]:
    """The flags of a measured tensor against its expectation, with ``std / expected`` and the
    tolerance it was held to (None for the constant rules and for no rule)."""
    flags = []
    ratio = tol = None
    if exp_std is not None and exp_mean is not None:
        if exp_std == 0.0:
            atol = _CONST_ATOL * max(1.0, abs(exp_mean))
            if std > atol:
                flags.append("std")
            if abs(mean - exp_mean) > atol:
                flags.append("mean")
        else:
            ratio = std / exp_std
            tol = max(STD_TOLERANCE, 3.0 / math.sqrt(2.0 * max(n - 1, 1)))
            if abs(ratio - 1.0) > tol:
                flags.append("std")
            if abs(mean - exp_mean) > max(0.1 * exp_std, 4.0 * exp_std / math.sqrt(n)):
                flags.append("mean")
    if max_z > TAIL_SIGMAS:
        flags.append("tail")
    if not finite:
        flags.append("nonfinite")
    return flags, ratio, tol


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}"
    return str(value)


def to_markdown(rows: list[InitRow], *, only_flagged: bool = False, digits: int = 4) -> str:
    """The audit as a markdown table, one line per tensor (``only_flagged``: just the flagged ones)."""
    columns = [
        "name", "shape", "role", "fan_in", "fan_out", "mean", "std", "rule", "expected std",
        "std / expected", "max abs z", "> 2σ", "> 4σ", "flags",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if only_flagged and not r.flags:
            continue
        cells = [
            f"`{r.name}`", "×".join(map(str, r.shape)) or "scalar", r.role, r.fan_in, r.fan_out, r.mean, r.std,
            r.rule, r.expected_std, r.std_ratio, r.max_abs_z, r.frac_beyond_2, r.frac_beyond_4,
            ", ".join(r.flags) or "ok",
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c, digits) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def looks_trained(rows: list[InitRow]) -> bool:
    """True when more than half of the tensors that every init sets to a constant (norm gains 1,
    norm biases 0, biases under a "zero" rule) are off that constant: training moves them all, an
    initialisation (however wrong its random tensors) leaves them exact. False when there are none."""
    constant = [r for r in rows if r.rule in ("one", "zero") and "meta" not in r.flags]
    moved = [r for r in constant if {"std", "mean"} & set(r.flags)]
    return bool(constant) and 2 * len(moved) > len(constant)


def rms_from_init_value(row: InitRow) -> float | None:
    """How far a tensor is from its init's centre: sqrt(std² + (mean − expected mean)²), the RMS of
    (value − expected mean) (to the n/(n − 1) of the sample std); None where no rule applies."""
    if row.expected_mean is None or math.isnan(row.std):
        return None
    return math.hypot(row.std, row.mean - row.expected_mean)


def comparison_markdown(rows: list[InitRow], *, digits: int = 4) -> str:
    """A trained model's audit as a comparison with its init, one line per tensor and no flags: the
    init rule's std, the measured std and their ratio (for the random rules), and the RMS distance
    from the init's centre (1 for norm gains, 0 for biases: how far training moved the tensor)."""
    columns = [
        "name", "shape", "role", "init rule", "init std", "mean", "std", "std / init std",
        "rms from init centre", "max abs z",
    ]  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [
            f"`{r.name}`", "×".join(map(str, r.shape)) or "scalar", r.role, r.rule, r.expected_std, r.mean,
            r.std, r.std_ratio, rms_from_init_value(r), r.max_abs_z,
        ]  # fmt: skip
        lines.append("| " + " | ".join(_fmt(c, digits) for c in cells) + " |")
    return "\n".join(lines) + "\n"
