"""LoRA-GA: initialise LoRA from the SVD of the full fine-tuning gradient (Wang, Yu & Li, "LoRA-GA:
Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000, NeurIPS 2024).

With ``G = U diag(sigma) V^T`` the (averaged) gradient of a target weight, the default split "ArB2r"
sets ``A0 = V^T[:r]`` and ``B0 = U[:, r:2r]``. LoRA's first SGD step on (A, B) then moves the weight by

    dW = -lr * s^2 * (B0 B0^T G + G A0^T A0) = -lr * s^2 * G_2r,

``G_2r`` the best rank-2r approximation of G: the first LoRA step is the best low-rank step of full
fine-tuning. The base is offset, ``W0 <- W0 - s B0 A0``, so the model's output is unchanged at init.
The factors carry no singular values (the paper's and the official code's split; PEFT's version folds
them into B and scales only B, which changes that first step).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.lora.pairs import LoraPair, lora_pairs
from gradkit.lora.sketch import GradientSketch

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr")
SCALES = ("stable", "unit", "gd")
ESTIMATORS = ("exact", "sketch")
# the attribute of a LoRA layer that records {adapter: (A0, B0)} (CPU copies) for save_adapter
RECORD = "gradkit_lora_ga"
# exact LAPACK SVD up to this min(out, in); randomized subspace iteration above. Measured on one CPU
# thread for rank 16: 384 x 384 takes 14 ms exact against 3.7 ms randomized, 384 x 1536 54 against 12 ms,
# 1024 x 4096 580 against 84 ms; on MiniLM's SST-2 gradients the randomized rank-16 error is within 1e-7
# of the optimal one (6 power steps, 2 * rank + 8 columns)
EXACT_SVD_MAX_DIM = 128


# ---------------------------------------------------------------------------------------------- math
def split_svd(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, r: int, direction: str = "ArB2r"):
    """Split the top-2r singular triplets of G between the LoRA factors; returns (A0: r x in, B0: out x r).

    "ArB2r": A0 = Vh[:r], B0 = U[:, r:2r]; "A2rBr": A0 = Vh[r:2r], B0 = U[:, :r]; "ArBr": A0 = Vh[1:2r:2],
    B0 = U[:, 0:2r:2]. Each uses every one of the top 2r triplets exactly once, so
    ``B0 B0^T G + G A0^T A0 = G_2r`` (LoRA-GA, section 3.2). S is only checked: the factors are orthonormal.
    """
    if S.numel() < 2 * r or U.shape[1] < 2 * r or Vh.shape[0] < 2 * r:
        raise ValueError(f"need the top {2 * r} singular triplets, got {S.numel()}")
    if direction == "ArB2r":
        a, b = slice(0, r), slice(r, 2 * r)
    elif direction == "A2rBr":
        a, b = slice(r, 2 * r), slice(0, r)
    elif direction == "ArBr":
        a, b = slice(1, 2 * r, 2), slice(0, 2 * r, 2)
    else:
        raise GradkitError(f"unknown direction {direction!r}; use one of {', '.join(DIRECTIONS)}")
    return Vh[a].clone(), U[:, b].clone()


def stable_scale(out_features: int, gamma: float = 16) -> float:
    """LoRA-GA's scale-stable factor ``out^(1/4) / sqrt(gamma)``, applied to both A0 and B0 (section 3.3):
    it keeps the adapter's output and updates O(1) as the width grows; the paper pairs it with rsLoRA."""
    return out_features**0.25 / math.sqrt(gamma)


def factor_scale(scale: str, out_features: int, scaling: float, gamma: float = 16) -> float:
    """The factor c multiplying both A0 and B0; the first SGD step is then ``-lr * s^2 * c^2 * G_2r``.

    "stable": c = out^(1/4) / sqrt(gamma). "unit": c = 1 (orthonormal factors, step ``-lr s^2 G_2r``).
    "gd": c = 1 / s, the official code's ``scale="gd"`` (PEFT: "gd_scale"): the first LoRA step is then
    exactly ``-lr * G_2r``, full fine-tuning's gradient-descent step at the same learning rate restricted
    to the best rank-2r subspace, whatever alpha and r are.
    """
    if scale == "stable":
        return stable_scale(out_features, gamma)
    if scale == "unit":
        return 1.0
    if scale == "gd":
        return 1.0 / scaling
    raise GradkitError(f"unknown scale {scale!r}; use one of {', '.join(SCALES)}")


def first_sgd_step(
    G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, lr: float
) -> torch.Tensor:
    """The weight change of one SGD step on (A, B) to first order: with g_A = s B^T G, g_B = s G A^T,
    ``dW = s (B dA + dB A) = -lr s^2 (B B^T G + G A^T A)``."""
    return -lr * scaling**2 * (B @ (B.T @ G) + (G @ A.T) @ A)


def truncated_svd(G: torch.Tensor, rank: int, *, niter: int = 6, seed: int = 0):
    """Top-``rank`` singular triplets (U, S, Vh) of G in fp32.

    Exact (LAPACK) when min(G.shape) <= EXACT_SVD_MAX_DIM; otherwise randomized subspace iteration
    (Halko, Martinsson & Tropp 2011, Alg. 4.4) with 2*rank + 8 columns and ``niter`` re-orthonormalised
    power steps, from a private generator (the global RNG is untouched).
    """
    G = G.float()
    m, n = G.shape
    if min(m, n) <= EXACT_SVD_MAX_DIM or 2 * rank + 8 >= min(m, n):
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        return U[:, :rank], S[:rank], Vh[:rank]
    generator = torch.Generator(device=G.device).manual_seed(seed)
    omega = torch.randn(n, 2 * rank + 8, generator=generator, device=G.device)
    Q, _ = torch.linalg.qr(G @ omega)
    for _ in range(niter):
        Q, _ = torch.linalg.qr(G.T @ Q)
        Q, _ = torch.linalg.qr(G @ Q)
    Ub, S, Vh = torch.linalg.svd(Q.T @ G, full_matrices=False)
    return (Q @ Ub)[:, :rank], S[:rank], Vh[:rank]


# -------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One target layer: the 2r singular values kept, the share of ||G||_F^2 they hold (estimated from
    the sketches for the sketch estimator), the seconds of its SVD and init, its estimator bytes."""

    name: str
    shape: tuple[int, int]
    rank: int
    singular_values: torch.Tensor
    energy_captured: float
    seconds: float
    bytes_held: int


@dataclass
class LoraGAReport:
    """What :func:`lora_ga_init` did. ``bytes_held`` counts the estimator's tensors exactly."""

    estimator: str
    direction: str
    scale: str
    num_batches: int
    estimate_seconds: float
    seconds: float
    bytes_held: int
    layers: list[LayerReport] = field(default_factory=list)

    @property
    def energy_captured(self) -> float:
        """Mean over layers of the share of ||G||_F^2 in the top 2r singular values."""
        return sum(layer.energy_captured for layer in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict[str, Any]:
        """Plain values (JSON-ready): the settings, times, bytes and every layer's figures."""
        head = {
            k: getattr(self, k)
            for k in (
                "estimator",
                "direction",
                "scale",
                "num_batches",
                "estimate_seconds",
                "seconds",
                "bytes_held",
            )
        }
        layers = [
            {
                "name": layer.name,
                "shape": list(layer.shape),
                "rank": layer.rank,
                "singular_values": [float(v) for v in layer.singular_values],
                "energy_captured": layer.energy_captured,
                "seconds": layer.seconds,
                "bytes_held": layer.bytes_held,
            }
            for layer in self.layers
        ]
        return {**head, "energy_captured": self.energy_captured, "layers": layers}

    def __str__(self) -> str:
        return (
            f"LoRA-GA ({self.estimator}, {self.direction}, {self.scale}): {len(self.layers)} layers, "
            f"{self.num_batches} batches, energy captured {100 * self.energy_captured:.1f}% (mean), "
            f"estimator held {self.bytes_held / 2**20:.1f} MiB, {self.seconds:.1f} s "
            f"({self.estimate_seconds:.1f} s estimating)"
        )


# ---------------------------------------------------------------------------------------- estimation
@contextlib.contextmanager
def _estimation_mode(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Eval mode (no dropout: the init depends on the weights and batches only) with only ``trainable``
    requiring grad; every flag is restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    flags = {p: p.requires_grad for p in model.parameters()}
    # gradients the caller already had on the estimated weights are put aside, not mixed into G
    stashed = {p: p.grad for p in trainable}
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
        for p in trainable:
            p.grad = None
            p.requires_grad_(True)
        with torch.enable_grad():
            yield
    finally:
        for p, grad in stashed.items():
            p.grad = grad
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode


def _run_batches(model, batches, loss_fn, num_batches, progress, desc) -> int:
    """Forward and backward on each batch; returns how many ran on this process."""
    from tqdm.auto import tqdm

    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    bar = tqdm(batches, total=total, desc=desc, disable=not progress or _rank() != 0, dynamic_ncols=True)
    count = 0
    for batch in bar:
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
        count += 1
    return count


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum over processes in place when torch.distributed is initialised (NCCL gets CUDA copies)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    nccl = dist.get_backend() == "nccl"
    for t in tensors:
        if nccl and not t.is_cuda:
            tmp = t.cuda()
            dist.all_reduce(tmp)
            t.copy_(tmp.cpu())
        else:
            dist.all_reduce(t)


def _global_count(count: int, device) -> int:
    t = torch.tensor([float(count)], dtype=torch.float64, device=device)
    _all_reduce_sum([t])
    return int(t.item())


def estimate_gradients(
    model: nn.Module,
    batches: Iterable,
    pairs: list[LoraPair],
    *,
    loss_fn: Callable | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    offload: bool = False,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean fp32 gradient (out x in) of every pair's base weight over the batches, all-reduced over
    processes; returns ({name: G}, total batches). Only the base weights require grad; each batch's
    gradient is added to an fp32 sum by a post-accumulate hook and ``.grad`` is freed at once
    (``offload=True`` keeps the sums on CPU)."""
    sums: dict[str, torch.Tensor] = {}

    def hook(p: torch.Tensor, name: str) -> None:
        grad = p.grad
        p.grad = None
        if offload:
            grad = grad.to("cpu", torch.float32)
        acc = sums.get(name)
        if acc is None:  # an fp32 gradient on the right device becomes the sum itself
            sums[name] = grad.float() if grad.dtype != torch.float32 else grad
        else:
            acc.add_(grad.float())

    weights = [pair.layer.get_base_layer().weight for pair in pairs]
    handles = []
    try:
        with _estimation_mode(model, weights):
            for pair, weight in zip(pairs, weights, strict=True):
                handles.append(
                    weight.register_post_accumulate_grad_hook(lambda p, name=pair.name: hook(p, name))
                )
            count = _run_batches(model, batches, loss_fn, num_batches, progress, "LoRA-GA gradients")
    finally:
        for h in handles:
            h.remove()
    device = weights[0].device if not offload else torch.device("cpu")
    total = _global_count(count, device)
    grads: dict[str, torch.Tensor] = {}
    for pair, weight in zip(pairs, weights, strict=True):
        g = sums.pop(pair.name, None)
        if g is None:  # no batch here, or the layer does not reach the loss
            g = torch.zeros(weight.shape, device=device)
        _all_reduce_sum([g])
        g.div_(max(total, 1))
        grads[pair.name] = g.T if getattr(pair.layer, "fan_in_fan_out", False) else g
    return grads, total


def estimate_sketches(
    model: nn.Module,
    batches: Iterable,
    pairs: list[LoraPair],
    *,
    loss_fn: Callable | None = None,
    num_batches: int | None = None,
    progress: bool = True,
    seed: int = 0,
    oversample: int | None = None,
    passes: int = 2,
) -> tuple[dict[str, GradientSketch], int]:
    """Sketches of every pair's mean base-weight gradient (:class:`~gradkit.lora.sketch.GradientSketch`),
    from forward-input and output-grad hooks: no weight gradient is ever formed (nothing but hooked
    inputs requires grad). All-reduced over processes after each pass; returns ({name: sketch}, total
    batches). With ``passes=2`` the batches are kept (a list of the first ``num_batches``) for pass 2."""
    sketches: dict[str, GradientSketch] = {}
    handles = []

    def pre_hook(module, args):
        # a leaf here makes the output require grad, so its gradient is computed; nothing upstream
        # required grad, so no gradient path is cut
        if torch.is_grad_enabled() and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    for index, pair in enumerate(pairs):
        base = pair.layer.get_base_layer()
        out_f, in_f = pair.base_weight.shape
        sketch = GradientSketch(
            out_f,
            in_f,
            2 * pair.rank,
            seed=seed * 1_000_003 + index,
            device=base.weight.device,
            oversample=oversample,
            passes=passes,
        )
        sketches[pair.name] = sketch

        def forward_hook(module, args, out, sketch=sketch):
            if out.requires_grad:
                x = args[0]
                out.register_hook(lambda dy: sketch.update(dy, x))

        handles.append(base.register_forward_pre_hook(pre_hook))
        handles.append(base.register_forward_hook(forward_hook))
    if passes > 1:
        batches = list(batches if num_batches is None else itertools.islice(batches, num_batches))
    device = next(iter(sketches.values())).device
    try:
        with _estimation_mode(model, []):
            for pass_index in range(passes):
                desc = "LoRA-GA sketch" + (f" pass {pass_index + 1}/{passes}" if passes > 1 else "")
                count = _run_batches(model, batches, loss_fn, num_batches, progress, desc)
                if pass_index == 0:
                    total = _global_count(count, device)
                    if total == 0:
                        break
                for sketch in sketches.values():
                    _all_reduce_sum(sketch.tensors())
                    if pass_index + 1 < passes:
                        sketch.next_pass()
    finally:
        for h in handles:
            h.remove()
    for sketch in sketches.values():
        sketch.scale_(1.0 / max(total, 1))
    return sketches, total


# -------------------------------------------------------------------------------------------- driver
def _is_quantised(weight: torch.Tensor | None) -> bool:
    """bitsandbytes 4/8-bit (by class name or ``quant_state``), or any non-floating weight."""
    if weight is None:
        return False
    return (
        type(weight).__name__ in ("Params4bit", "Int8Params")
        or hasattr(weight, "quant_state")
        or not weight.dtype.is_floating_point
    )


def _refuse_quantised(model: nn.Module) -> None:
    """PEFT wraps quantised layers in their own LoRA classes (not ``lora.Linear``), so :func:`lora_pairs`
    would not see them and would report "no LoRA layer": name the real problem first."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            weight = getattr(module.get_base_layer(), "weight", None)
            if _is_quantised(weight):
                raise GradkitError(
                    f"layer {name} has a quantised base weight ({type(weight).__name__}, {weight.dtype}); "
                    "LoRA-GA needs full-precision gradients: run lora_ga_init and save_adapter on the "
                    "fp32/bf16 model, then load the adapter onto the quantised base"
                )


def _check_pairs(pairs: list[LoraPair]) -> None:
    for pair in pairs:
        if getattr(pair.layer, "use_dora", {}).get(pair.adapter, False):
            raise GradkitError(
                f"layer {pair.name} uses DoRA; LoRA-GA supports plain LoRA: set use_dora=False"
            )
        out_f, in_f = pair.base_weight.shape
        if 2 * pair.rank > min(out_f, in_f):
            raise GradkitError(
                f"layer {pair.name} ({out_f} x {in_f}) has rank r = {pair.rank} but LoRA-GA needs 2r <= "
                f"{min(out_f, in_f)}; lower r (or its rank_pattern entry) to at most {min(out_f, in_f) // 2}"
            )
        if getattr(pair.layer, "merged", False):
            raise GradkitError(
                f"layer {pair.name} has its adapter merged; call model.unmerge_adapter() first"
            )
        if pair.B.detach().abs().max() > 0:
            raise GradkitError(
                f"layer {pair.name} has a non-zero lora_B (already initialised or trained); lora_ga_init needs "
                "a fresh adapter: get_peft_model(base, LoraConfig(...)) with the default init_lora_weights"
            )


@torch.no_grad()
def _apply(pair: LoraPair, U, Vh, direction: str, scale: str, gamma: float):
    """Write (A0, B0) into the adapter and offset the base so the output is unchanged."""
    r, s = pair.rank, pair.scaling
    A0, B0 = split_svd(U, torch.ones(2 * r), Vh, r, direction)
    c = factor_scale(scale, B0.shape[0], s, gamma)
    A0 = (c * A0).to(pair.A.device, pair.A.dtype)
    B0 = (c * B0).to(pair.B.device, pair.B.dtype)
    pair.A.copy_(A0)
    pair.B.copy_(B0)
    weight = pair.layer.get_base_layer().weight
    fan = getattr(pair.layer, "fan_in_fan_out", False)
    # offset with the factors as the adapter holds them (after the dtype cast), in fp32, then cast
    new = pair.base_weight.float() - s * (B0.float().to(weight.device) @ A0.float().to(weight.device))
    weight.copy_((new.T if fan else new).to(weight.dtype))
    records = pair.layer.__dict__.setdefault(RECORD, {})
    records[pair.adapter] = (A0.detach().cpu().clone(), B0.detach().cpu().clone())


def lora_ga_init(
    peft_model: nn.Module,
    batches: Iterable,
    *,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    estimator: str = "exact",
    direction: str = "ArB2r",
    scale: str = "stable",
    stable_gamma: float = 16,
    num_batches: int | None = None,
    progress: bool = True,
    adapter: str | None = None,
    seed: int = 0,
    offload: bool = False,
    sketch_oversample: int | None = None,
    sketch_passes: int = 2,
) -> LoraGAReport:
    """Initialise every LoRA layer of ``peft_model`` with LoRA-GA (arXiv 2407.05000), in place.

    1. G = mean over the first ``num_batches`` batches (all, if None) of the gradient of each target base
       weight, in fp32, in eval mode, everything else frozen (``loss_fn(model, batch)``, or
       ``model(**batch).loss``). Under torch.distributed the sums and batch counts are all-reduced, so
       every rank gets the init of the union of all ranks' batches. ``estimator="exact"`` holds one fp32
       gradient per layer (on CPU with ``offload=True``); ``"sketch"`` never forms it and holds
       O((k + l)(in + out)) floats per layer, k = 2r + ``sketch_oversample`` (default max(8, r)),
       l = 2k + 1 (:mod:`gradkit.lora.sketch`). ``sketch_passes=2`` (default) runs the batches twice
       for a near-optimal rank-2r approximation; ``1`` is the cheaper single-pass sketch (coarser).
    2. Top-2r SVD of G, split by ``direction`` (:func:`split_svd`), both factors times
       :func:`factor_scale` (``scale`` "stable" | "unit" | "gd").
    3. ``W0 <- W0 - s B0 A0`` (fp32, then cast), so the output is unchanged; (A0, B0) are recorded so
       :func:`gradkit.save_adapter` can write an adapter for the original, untouched base.

    With ``G = U diag(sigma) V^T`` and the default "ArB2r" split, ``A0 = c V^T[:r]``, ``B0 = c U[:, r:2r]``, so
    one SGD step of learning rate lr on (A, B) moves every target weight by

        dW = -lr s^2 (B0 B0^T G + G A0^T A0) = -lr s^2 c^2 G_2r,

    the best rank-2r approximation of full fine-tuning's step (c = 1 for "unit", 1/s for "gd").

    Returns a :class:`LoraGAReport`. Works with rsLoRA and rank/alpha patterns (s and r are read per layer).
    Raises :class:`GradkitError` for a model without LoRA layers, no batches, ``2r > min(in, out)``, a
    non-finite or all-zero gradient, a quantised base, DoRA, a merged adapter or a non-zero ``lora_B``.
    """
    start = time.perf_counter()
    for value, allowed, what in (
        (estimator, ESTIMATORS, "estimator"),
        (direction, DIRECTIONS, "direction"),
        (scale, SCALES, "scale"),
    ):
        if value not in allowed:
            raise GradkitError(f"unknown {what} {value!r}; use one of {', '.join(allowed)}")
    if sketch_passes not in (1, 2):
        raise GradkitError(f"sketch_passes must be 1 or 2 (got {sketch_passes})")
    if num_batches is not None and num_batches < 1:
        raise GradkitError(
            f"num_batches must be at least 1 (got {num_batches}); pass None to use every batch"
        )
    # DDP / accelerate wrappers: estimate on the module itself (its gradients need no reducer)
    while isinstance(getattr(peft_model, "module", None), nn.Module):
        peft_model = peft_model.module
    _refuse_quantised(peft_model)
    pairs = lora_pairs(peft_model, adapter)
    _check_pairs(pairs)
    kwargs = dict(loss_fn=loss_fn, num_batches=num_batches, progress=progress)
    if estimator == "exact":
        estimates, total = estimate_gradients(peft_model, batches, pairs, offload=offload, **kwargs)
    else:
        estimates, total = estimate_sketches(
            peft_model,
            batches,
            pairs,
            seed=seed,
            passes=sketch_passes,
            oversample=sketch_oversample,
            **kwargs,
        )
    estimate_seconds = time.perf_counter() - start
    if total == 0:
        raise GradkitError("lora_ga_init got no batches; pass an iterable with at least one batch")
    bad = [p.name for p in pairs if not _finite(estimates[p.name])]
    if bad:
        raise GradkitError(
            f"the estimated gradient of {bad[0]} is not finite (NaN/Inf; {len(bad)} layer(s) in all); "
            "check the batches and the loss (e.g. fp16 overflow: estimate in fp32 or bf16)"
        )
    if all(_is_zero(e) for e in estimates.values()):
        raise GradkitError(
            "every estimated gradient is zero; the loss must depend on the adapted layers and be computed "
            "with gradients enabled (check loss_fn, or that model(**batch).loss is set)"
        )
    bytes_held = sum(_nbytes(e) for e in estimates.values())
    report = LoraGAReport(estimator, direction, scale, total, estimate_seconds, 0.0, bytes_held)
    for pair in pairs:
        t0 = time.perf_counter()
        estimate = estimates.pop(pair.name)  # freed layer by layer
        held = _nbytes(estimate)
        if estimator == "exact":
            U, S, Vh = truncated_svd(estimate, 2 * pair.rank, seed=seed)
            total_sq = float(torch.linalg.vector_norm(estimate, dtype=torch.float64)) ** 2
        else:
            U, S, Vh = estimate.svd(2 * pair.rank)
            total_sq = estimate.frobenius_sq()
        del estimate
        _apply(pair, U, Vh, direction, scale, stable_gamma)
        energy = min(1.0, float(S.double().square().sum()) / total_sq) if total_sq > 0 else 0.0
        report.layers.append(
            LayerReport(
                pair.name,
                tuple(pair.base_weight.shape),
                pair.rank,
                S.detach().cpu(),
                energy,
                time.perf_counter() - t0,
                held,
            )
        )
    report.seconds = time.perf_counter() - start
    return report


def _finite(estimate) -> bool:
    return bool(torch.isfinite(estimate).all()) if torch.is_tensor(estimate) else estimate.isfinite()


def _is_zero(estimate) -> bool:
    tensors = [estimate] if torch.is_tensor(estimate) else estimate.tensors()
    return not any(bool(t.any()) for t in tensors)


def _nbytes(estimate) -> int:
    return estimate.numel() * estimate.element_size() if torch.is_tensor(estimate) else estimate.peak_nbytes
