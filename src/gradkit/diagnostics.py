"""Per-block gradient flow: where in depth a transformer's gradient grows, stays, or dies.

``gradient_flow(model, batches, loss_fn)`` runs forward and backward on a few batches, without
changing the model, and returns one :class:`FlowRow` per block: the block's output RMS, the residual
ratio |y − x|/|x|, its gradient and weight norms, and the relative update one AdamW step would make.
:func:`to_markdown` prints the rows, :func:`plot_gradient_flow` draws them (layer on x, log scale),
:func:`depth_decay` fits the per-block factor of a geometric decay.

Background. A Post-LN block x ↦ LN(x + F(x)) divides the residual sum by its norm; when
|F(x)| ≈ |x| and F(x) is uncorrelated with x that norm is √2·|x|, so every path through earlier
blocks is scaled by 1/√2 per residual sub-layer, and the backward pass scales the gradient the same
way (Xiong et al. 2020, "On Layer Normalization in the Transformer Architecture"; Liu et al. 2020,
"Understanding the Difficulty of Training Transformers"). Pre-LN, x ↦ x + F(LN(x)), keeps the
identity path and a depth-independent gradient.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradkit.capture import capture, first_tensor, name_matches
from gradkit.ema import unwrap_model
from gradkit.errors import GradkitError
from gradkit.files import atomic_path

__all__ = [
    "BLOCK_PATTERNS",
    "FlowRow",
    "adamw_first_step",
    "depth_decay",
    "find_blocks",
    "gradient_flow",
    "plot_gradient_flow",
    "to_markdown",
]

# "which modules are the blocks", tried in order; each also matches under any prefix (``**.``)
BLOCK_PATTERNS = (
    "encoder.layer.*",  # BERT, RoBERTa, MiniLM (BertModel.encoder.layer.N)
    "h.*",  # GPT-2 (GPT2Model.h.N, GPT2LMHeadModel.transformer.h.N)
    "layers.*",  # Llama, Mistral, Qwen (LlamaModel.layers.N, LlamaForCausalLM.model.layers.N)
    "blocks.*",  # gradkit.models.toy_transformer
)
FLAG_FACTOR = 10.0


@dataclass
class FlowRow:
    """One block. Norms are Frobenius norms over all the block's parameters (``grad_norm``,
    ``weight_norm``, ``update_norm``) or over every element of its output on every batch.

    ``act_rms``: sqrt(mean of y²) of the block output y over all batches (padding positions included);
    ``input_rms`` the same for its input x. ``residual_ratio``: |y − x|/|x| pooled over batches (None
    when x and y differ in shape). ``branch_ratios``: |F(u)|/|u| of each sub-module named in
    ``branches`` (its output over its first input). ``grad_norm``: |∂L/∂θ| of the mean loss over the
    batches; ``update_ratio``: |Δθ|/|θ| of one AdamW step (:func:`adamw_first_step`).
    ``grad_rel``: grad_norm / the median grad_norm over blocks.
    """

    index: int
    name: str
    num_params: int
    act_rms: float
    input_rms: float | None
    residual_ratio: float | None
    grad_norm: float
    weight_norm: float
    update_norm: float
    update_ratio: float
    grad_rel: float
    branch_ratios: dict[str, float] = field(default_factory=dict)
    flags: tuple[str, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["flags"] = list(self.flags)
        return d


def _block_index(name: str) -> int | None:
    last = name.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else None


def find_blocks(model: nn.Module, blocks: str | Sequence[str] | None = None) -> dict[str, nn.Module]:
    """The blocks of ``model``, in forward order (the order of ``named_modules``), by name.

    ``blocks``: a glob on dotted module names (``*`` inside one component, ``**`` across them; see
    :func:`gradkit.capture.name_matches`) or a list of them. ``None`` tries :data:`BLOCK_PATTERNS`
    (BERT ``encoder.layer.N``, GPT-2 ``h.N``, Llama ``layers.N``, the toy transformer's
    ``blocks.N``), each at the top level or under any prefix, keeping names that end in an index;
    the first pattern that matches wins.
    """
    modules = dict(unwrap_model(model).named_modules())
    if blocks is None:
        for pattern in BLOCK_PATTERNS:
            hits = {
                n: m
                for n, m in modules.items()
                if _block_index(n) is not None
                and (name_matches(n, pattern) or name_matches(n, "**." + pattern))
            }
            if hits:
                return hits
        raise GradkitError(
            "no transformer blocks found (tried "
            + ", ".join(BLOCK_PATTERNS)
            + "); pass blocks='<pattern>', e.g. blocks='model.decoder.layers.*'"
        )
    patterns = [blocks] if isinstance(blocks, str) else list(blocks)
    hits = {n: m for n, m in modules.items() if n and any(name_matches(n, p) for p in patterns)}
    if not hits:
        raise GradkitError(
            f"blocks pattern {blocks!r} matches no module; see model.named_modules() for names "
            "(globs: * within one name component, ** across them)"
        )
    return hits


def adamw_first_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> torch.Tensor:
    """The change Δθ that the first ``torch.optim.AdamW`` step makes to ``param``; nothing is modified.

    AdamW (Loshchilov & Hutter 2019) at step 1, from zero moments, in torch's order of operations:
    θ ← θ·(1 − lr·λ); m = (1 − β1)·g, v = (1 − β2)·g²; θ ← θ − (lr/(1 − β1))·m / (sqrt(v)/sqrt(1 − β2) + ε).
    Up to rounding this is Δθ = −lr·λ·θ − lr·g/(|g| + ε): a sign step of size lr, whatever |g| is.
    """
    beta1, beta2 = betas
    p = param.detach()
    g = grad.detach().to(p.dtype)
    new = p.mul(1 - lr * weight_decay)
    exp_avg = g.mul(1 - beta1)
    exp_avg_sq = g.mul(g).mul_(1 - beta2)
    bias_correction1 = 1 - beta1
    bias_correction2 = 1 - beta2
    denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(eps)
    new.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    return new - p


def _loss(model: nn.Module, batch: Any, loss_fn: Callable | None) -> torch.Tensor:
    if loss_fn is not None:
        loss = loss_fn(model, batch)
    else:
        if not isinstance(batch, Mapping):
            raise GradkitError(
                f"without a loss_fn each batch must be a dict for model(**batch), got {type(batch).__name__}; "
                "pass loss_fn=lambda model, batch: ..."
            )
        loss = getattr(model(**batch), "loss", None)
        if loss is None:
            raise GradkitError(
                "model(**batch) returned no .loss; put the labels in the batch or pass a loss_fn"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise GradkitError("the loss must be a scalar tensor (loss_fn(model, batch) -> scalar)")
    return loss.reshape(())


def _sq(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).sum())


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else 0.5 * (finite[mid - 1] + finite[mid])


def _devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def gradient_flow(
    model: nn.Module,
    batches: Iterable[Any] | Mapping[str, Any] | torch.Tensor,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    *,
    blocks: str | Sequence[str] | None = None,
    branches: Sequence[str] | None = None,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    num_batches: int | None = None,
    flag_factor: float = FLAG_FACTOR,
    train_mode: bool = False,
) -> list[FlowRow]:
    """Per-block gradient flow of ``model`` on ``batches``: one :class:`FlowRow` per block, in depth order.

    What it is for: seeing where in depth the gradient lives at init or at any checkpoint, the question
    of Xiong et al. 2020 ("On Layer Normalization in the Transformer Architecture": Post-LN's
    LN(x + F(x)) against Pre-LN's x + F(LN x)) and Liu et al. 2020 ("Understanding the Difficulty of
    Training Transformers": how much each residual branch F(x) weighs against the stream x).

    **Inputs.** ``batches``: an iterable of batches (a list, a DataLoader), or one batch (a dict or a
    tensor); ``num_batches`` caps how many are used. ``loss_fn(model, batch) -> scalar``; ``None``
    means ``model(**batch).loss``. The gradient is that of the mean loss over the batches (the sum
    of per-batch gradients / their number). ``blocks``: a name pattern (:func:`find_blocks`); built in
    for BERT, GPT-2, Llama and the toy transformer.

    **Measured per block** (activations through :func:`gradkit.capture`, inputs and outputs):

    - ``act_rms`` = sqrt(Σ y² / n) over every element of the output y on every batch;
    - ``residual_ratio`` = |y − x| / |x| (Frobenius norms summed over the batches). For a Pre-LN block
      y = x + F(LN x) (GPT-2, Llama) it is exactly the residual-branch ratio |F|/|x|, all branches
      together. A Post-LN block y = LN(x + F(x)) (BERT) renormalises: then it is the relative change
      the block makes to the stream; with F(x) ⟂ x, x of RMS 1 and LN's gain 1 and bias 0 it equals
      sqrt(2 − 2/sqrt(1 + r²)) for r = |F(x)|/|x| (≈ r when r is small, at most √2). For r itself in
      a Post-LN block, name its branch sub-modules in ``branches`` (globs relative to the block, e.g.
      ``("attn", "mlp")`` for the toy transformer): ``branch_ratios[b]`` = |F(u)|/|u|, the module's
      output over its first input, which is the stream x for Post-LN branches;
    - ``grad_norm`` = |∂L/∂θ| and ``weight_norm`` = |θ| over all the block's floating parameters;
    - ``update_ratio`` = |Δθ|/|θ| for the first step of ``torch.optim.AdamW(lr, betas, eps,
      weight_decay)`` on this gradient (:func:`adamw_first_step`: ≈ lr·sqrt(#params)/|θ|, a sign step).

    **Flags** (``flag_factor`` F = 10 by default; m = median grad_norm over the blocks):
    ``"vanishing"`` when grad_norm < m/F or grad_norm = 0; ``"exploding"`` when grad_norm > m·F or
    act_rms > F·(median act_rms); ``"nonfinite"`` for a NaN/inf loss, gradient or activation. A deep
    Post-LN stack at init shows "vanishing" in its lower blocks once they sit an order of magnitude
    below the middle one.

    **The model is left as found**: gradients come from ``torch.autograd.grad`` (``.grad`` is never
    touched), ``requires_grad`` is set on every floating parameter for the measurement and restored
    after, the global RNG (CPU and CUDA) is forked, and the model runs in eval mode (no dropout;
    ``train_mode=True`` keeps train mode) with every module's mode restored. Raises
    :class:`GradkitError` for bad input.
    """
    _check_arguments(model, lr, flag_factor, num_batches)
    if isinstance(batches, (Mapping, torch.Tensor)):
        batches = [batches]
    targets = _Targets.of(model, blocks, branches)
    with _left_as_found(model, targets.all_params, train_mode):
        measured = _measure(model, batches, loss_fn, targets, num_batches)
    rows = [
        _block_row(n, position, targets, measured, (lr, betas, eps, weight_decay))
        for position, n in enumerate(targets.names)
    ]
    _flag(rows, flag_factor)
    return rows


def _check_arguments(model: Any, lr: Any, flag_factor: Any, num_batches: Any) -> None:
    if not isinstance(model, nn.Module):
        raise GradkitError(f"gradient_flow takes an nn.Module, got {type(model).__name__}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise GradkitError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(flag_factor, (int, float)) and flag_factor > 1):
        raise GradkitError(f"flag_factor must be a number above 1, got {flag_factor!r}")
    if num_batches is not None and (
        isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1
    ):
        raise GradkitError(f"num_batches must be a positive integer or None, got {num_batches!r}")


@dataclass
class _Targets:
    """What gradient_flow measures: the blocks by name, the branch sub-modules named in each (relative
    names, and their full names), each block's floating parameters, and all of them once each."""

    names: list[str]
    branch_names: dict[str, list[str]]
    branch_full: list[str]
    params: dict[str, list[torch.Tensor]]
    all_params: list[torch.Tensor]
    index: dict[int, int]  # id(parameter) -> position in all_params

    @classmethod
    def of(
        cls, model: nn.Module, blocks: str | Sequence[str] | None, branches: Sequence[str] | None
    ) -> _Targets:
        found = find_blocks(model, blocks)
        names = list(found)
        branch_names = {
            n: [
                m
                for m in dict(found[n].named_modules())
                if m and any(name_matches(m, b) for b in branches or ())
            ]
            for n in names
        }
        if branches and not any(branch_names.values()):
            raise GradkitError(
                f"branches {list(branches)!r} match no sub-module of the blocks (e.g. {names[0]!r})"
            )
        branch_full = [f"{n}.{b}" for n in names for b in branch_names[n]]
        params = {n: [p for p in found[n].parameters() if p.is_floating_point()] for n in names}
        all_params: list[torch.Tensor] = []
        seen: set[int] = set()
        for n in names:
            for p in params[n]:
                if id(p) not in seen:
                    seen.add(id(p))
                    all_params.append(p)
        if not all_params:
            raise GradkitError("the blocks have no floating-point parameters to measure")
        index = {id(p): i for i, p in enumerate(all_params)}
        return cls(names, branch_names, branch_full, params, all_params, index)


@contextlib.contextmanager
def _left_as_found(model: nn.Module, params: list[torch.Tensor], train_mode: bool) -> Iterator[None]:
    """Measure in eval mode (or train mode) with ``requires_grad`` on ``params`` and the global RNG
    forked; every parameter's ``requires_grad`` and every module's mode are restored afterwards."""
    requires = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=_devices(model)):
            model.train(train_mode)
            for p in params:
                p.requires_grad_(True)
            yield
    finally:
        for p, flag in requires:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


@dataclass
class _Measured:
    """Sums over the batches: per block ``y2``, ``n``, ``x2``, ``d2`` (Σ y², #elements, Σ x², Σ (y − x)²)
    and ``res`` (0 once a block's input and output differ in shape); per branch [Σ y², Σ x²]; the
    summed gradient of each parameter; the batch count; whether a loss was not finite."""

    sums: dict[str, dict[str, float]]
    branch_sums: dict[str, list[float]]
    grads: list[torch.Tensor | None]
    count: int = 0
    nonfinite_loss: bool = False


def _measure(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None,
    targets: _Targets,
    num_batches: int | None,
) -> _Measured:
    """Forward and backward on each batch (up to ``num_batches``), adding up activations and gradients."""
    names, branch_full = targets.names, targets.branch_full
    measured = _Measured(
        sums={n: {"y2": 0.0, "n": 0.0, "x2": 0.0, "d2": 0.0, "res": 1.0} for n in names},
        branch_sums={b: [0.0, 0.0] for b in branch_full},
        grads=[None] * len(targets.all_params),
    )
    grads = measured.grads
    for batch in batches:
        if num_batches is not None and measured.count >= num_batches:
            break
        with (
            capture(model, names + branch_full, what="output", to=None) as outs,
            capture(model, names + branch_full, what="input", to=None) as ins,
        ):
            loss = _loss(model, batch, loss_fn)
            if not loss.requires_grad:
                raise GradkitError(
                    "the loss does not depend on any parameter of the blocks (computed under "
                    "torch.no_grad, or detached?); return a loss computed from the model's output"
                )
            got = torch.autograd.grad(loss, targets.all_params, allow_unused=True)
        measured.nonfinite_loss |= not bool(torch.isfinite(loss.detach()))
        for i, g in enumerate(got):
            if g is not None:
                grads[i] = g.detach().clone() if grads[i] is None else grads[i] + g
        _add_activations(measured, names, branch_full, outs, ins)
        measured.count += 1
    if measured.count == 0:
        raise GradkitError("batches is empty; pass at least one batch")
    return measured


def _add_activations(
    measured: _Measured, names: list[str], branch_full: list[str], outs: Mapping, ins: Mapping
) -> None:
    for n in names:
        s = measured.sums[n]
        for y, x in zip(outs[n], ins[n], strict=True):
            if y is None:
                continue
            s["y2"] += _sq(y)
            s["n"] += y.numel()
            x = first_tensor(x)
            if x is None or x.shape != y.shape:
                s["res"] = 0.0  # no residual ratio for this block
                continue
            s["x2"] += _sq(x)
            s["d2"] += _sq(y.double() - x.double())
    for b in branch_full:
        for y, x in zip(outs[b], ins[b], strict=True):
            x = first_tensor(x)
            if y is not None and x is not None:
                measured.branch_sums[b][0] += _sq(y)
                measured.branch_sums[b][1] += _sq(x)


def _block_row(
    n: str,
    position: int,
    targets: _Targets,
    measured: _Measured,
    adamw: tuple[float, tuple[float, float], float, float],
) -> FlowRow:
    """One block's row from the sums (``grad_rel`` and the gradient flags come from :func:`_flag`)."""
    lr, betas, eps, weight_decay = adamw
    g2 = w2 = u2 = 0.0
    nonfinite = measured.nonfinite_loss
    for p in targets.params[n]:
        g = measured.grads[targets.index[id(p)]]
        g = torch.zeros_like(p) if g is None else g / measured.count
        w2 += _sq(p)
        g2 += _sq(g)
        u2 += _sq(adamw_first_step(p, g, lr, betas, eps, weight_decay))
    s = measured.sums[n]
    act = math.sqrt(s["y2"] / s["n"]) if s["n"] else math.nan
    has_res = s["res"] > 0 and s["n"] > 0
    input_rms = math.sqrt(s["x2"] / s["n"]) if has_res else None
    ratio = math.sqrt(s["d2"] / s["x2"]) if has_res and s["x2"] > 0 else None
    branch = {}
    for b in targets.branch_names[n]:
        y2, x2 = measured.branch_sums[f"{n}.{b}"]
        branch[b] = math.sqrt(y2 / x2) if x2 > 0 else math.nan
    weight_norm, grad_norm = math.sqrt(w2), math.sqrt(g2)
    nonfinite |= not all(math.isfinite(v) for v in (grad_norm, act))
    index = _block_index(n)
    return FlowRow(
        index=index if index is not None else position,
        name=n,
        num_params=sum(p.numel() for p in targets.params[n]),
        act_rms=act,
        input_rms=input_rms,
        residual_ratio=ratio,
        grad_norm=grad_norm,
        weight_norm=weight_norm,
        update_norm=math.sqrt(u2),
        update_ratio=math.sqrt(u2) / weight_norm if weight_norm > 0 else math.inf,
        grad_rel=math.nan,
        branch_ratios=branch,
        flags=("nonfinite",) if nonfinite else (),
    )


def _flag(rows: list[FlowRow], factor: float) -> None:
    """Set each row's ``grad_rel`` and add its "vanishing" / "exploding" flags against the medians."""
    med_g = _median([r.grad_norm for r in rows])
    med_a = _median([r.act_rms for r in rows])
    for r in rows:
        flags = list(r.flags)
        r.grad_rel = r.grad_norm / med_g if med_g > 0 else math.nan
        if r.grad_norm == 0 or (med_g > 0 and r.grad_norm < med_g / factor):
            flags.append("vanishing")
        if (med_g > 0 and r.grad_norm > med_g * factor) or (med_a > 0 and r.act_rms > med_a * factor):
            flags.append("exploding")
        r.flags = tuple(flags)


def depth_decay(values: Sequence[float]) -> float:
    """The per-block factor c of a geometric trend v_i ≈ a·c^i, by least squares on log v_i against i.

    For gradient norms listed from the lowest block to the highest, c < 1 means the gradient grows
    toward the output (equivalently it shrinks by c per block going down): the Post-LN argument
    predicts c ≈ (1/√2)^k for k residual sub-layers per block when |F(x)| ≈ |x| (Xiong et al. 2020).
    Non-positive or non-finite values are skipped; fewer than 2 left gives NaN.
    """
    pts = [
        (i, math.log(v))
        for i, v in enumerate(values)
        if isinstance(v, (int, float)) and v > 0 and math.isfinite(v)
    ]
    if len(pts) < 2:
        return math.nan
    mi = sum(i for i, _ in pts) / len(pts)
    ml = sum(v for _, v in pts) / len(pts)
    slope = sum((i - mi) * (v - ml) for i, v in pts) / sum((i - mi) ** 2 for i, _ in pts)
    return math.exp(-slope)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.{digits}g}"
    return str(value)


def to_markdown(rows: Sequence[FlowRow], digits: int = 4) -> str:
    """The rows as a markdown table, one line per block."""
    branches = sorted({b for r in rows for b in r.branch_ratios})
    columns = ["block", "name", "params", "act RMS", "|y−x|/|x|"]
    columns += [f"|F|/|x| {b}" for b in branches]
    columns += ["grad norm", "grad / median", "weight norm", "AdamW |Δθ|/|θ|", "flags"]
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.index, f"`{r.name}`", r.num_params, r.act_rms, r.residual_ratio]
        cells += [r.branch_ratios.get(b) for b in branches]
        cells += [r.grad_norm, r.grad_rel, r.weight_norm, r.update_ratio, ", ".join(r.flags) or "ok"]
        lines.append("| " + " | ".join(_fmt(c, digits) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _positive(values: list[Any]) -> list[float]:
    return [v if isinstance(v, (int, float)) and v > 0 and math.isfinite(v) else math.nan for v in values]


def plot_gradient_flow(
    rows: Sequence[FlowRow],
    path: str | Path | None = None,
    *,
    title: str | None = None,
    axes: Sequence[Any] | None = None,
    label: str | None = None,
):
    """Draw the rows: block index on x, log-scale y; left panel gradient norm and AdamW update ratio,
    right panel activation RMS and residual ratio. Uses matplotlib's Agg backend when it creates the
    figure. ``path``: write a PNG there atomically and close the figure; otherwise return it.
    ``axes`` (two matplotlib axes) draws onto existing panels (``label`` prefixes the legend), so
    several models can share one plot."""
    import matplotlib

    if axes is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    else:
        fig = axes[0].figure
    x = [r.index for r in rows]
    prefix = f"{label}: " if label else ""
    left, right = axes
    (line,) = left.plot(x, _positive([r.grad_norm for r in rows]), "o-", label=f"{prefix}grad norm |∂L/∂θ|")
    left.plot(
        x, _positive([r.update_ratio for r in rows]), "s--", color=line.get_color(), alpha=0.6,
        label=f"{prefix}AdamW |Δθ|/|θ|",
    )  # fmt: skip
    for r in rows:
        if "vanishing" in r.flags or "exploding" in r.flags:
            left.plot([r.index], _positive([r.grad_norm]), "x", color="red", markersize=10)
    left.set_yscale("log")
    left.set_xlabel("block (input side → output side)")
    left.set_title("gradient and update size per block")
    (line,) = right.plot(x, _positive([r.act_rms for r in rows]), "o-", label=f"{prefix}output RMS")
    right.plot(
        x, _positive([r.residual_ratio for r in rows]), "s--", color=line.get_color(), alpha=0.6,
        label=f"{prefix}|y − x|/|x|",
    )  # fmt: skip
    right.set_yscale("log")
    right.set_xlabel("block (input side → output side)")
    right.set_title("activations per block")
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    if path is None:
        return fig
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return None
