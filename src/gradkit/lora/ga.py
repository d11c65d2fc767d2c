"""LoRA-GA: initialise LoRA from the SVD of the full fine-tuning gradient (Wang, Yu & Li, "LoRA-GA:
Low-Rank Adaptation with Gradient Approximation", arXiv 2407.05000, NeurIPS 2024).

With ``G = U diag(sigma) V^T`` the (averaged) gradient of a target weight, the default split "ArB2r"
sets ``A0 = V^T[:r]`` and ``B0 = U[:, r:2r]``. LoRA's first SGD step on (A, B) then moves the weight by

    dW = -lr * s^2 * (B0 B0^T G + G A0^T A0) = -lr * s^2 * G_2r,

``G_2r`` the best rank-2r approximation of G: the first LoRA step is the best low-rank step of full
fine-tuning. The base is offset, ``W0 <- W0 - s B0 A0``, so the model's output is unchanged at init.
The factors carry no singular values (the paper's and the official code's split; PEFT's version folds
them into B and scales only B, which changes that first step).

FSDP2 (``fully_shard``, row-sharded base weights): the exact estimator adds each rank's rows of every
reduce-scattered weight gradient to an fp32 sum, so no rank forms a whole gradient while the batches
run; for the SVD each layer's gradient is gathered on one rank (round robin over layers), which
broadcasts the top-2r triplets (:mod:`gradkit.lora.sharded`). The sketches are built from
activations as without FSDP and reduced across ranks. Every rank writes its own rows of A0, B0 and
of the offset base ``W0 - s B0 A0``. The init equals the single-process one on the union of the
ranks' batches (tests/fsdp).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import full, is_dtensor, local, local_part, reshard
from gradkit.linalg import canonical_signs, truncated_svd
from gradkit.lora.estimate import estimate_gradients, estimate_sketches
from gradkit.lora.pairs import LoraPair, lora_pairs
from gradkit.lora.sharded import ShardedGradient, local_rows

DIRECTIONS = ("ArB2r", "ArBr", "A2rBr")
SCALES = ("stable", "unit", "gd")
ESTIMATORS = ("exact", "sketch")
# the attribute of a LoRA layer that records {adapter: (A0, B0)} (CPU copies) for save_adapter
RECORD = "gradkit_lora_ga"


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


# -------------------------------------------------------------------------------------------- report
@dataclass
class LayerReport:
    """One target layer: the 2r singular values kept, the share of ||G||_F^2 they hold (estimated from
    the sketches for the sketch estimator), the seconds of its SVD and init, and the bytes its estimate
    held at its peak (a sketch's one-update workspace not included: see :class:`LoraGAReport`)."""

    name: str
    shape: tuple[int, int]
    rank: int
    singular_values: torch.Tensor
    energy_captured: float
    seconds: float
    bytes_held: int


@dataclass
class LoraGAReport:
    """What :func:`lora_ga_init` did. ``bytes_held`` counts the estimator's tensors exactly: every layer's
    estimate at its peak plus, for the sketch, the largest single update's workspace (updates run one
    layer at a time, so only one workspace is ever live)."""

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
        if full(pair.B.detach()).abs().max() > 0:
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
    local(pair.A).copy_(local_part(A0, pair.A))  # FSDP2: each rank writes its own rows
    local(pair.B).copy_(local_part(B0, pair.B))
    weight = pair.layer.get_base_layer().weight
    fan = getattr(pair.layer, "fan_in_fan_out", False)
    # offset with the factors as the adapter holds them (after the dtype cast), in fp32, then cast
    if is_dtensor(weight):  # only this rank's rows of s B0 A0 (weight layout: in x out when fan)
        rows = local_rows(weight)
        a, b = A0.float().to(weight.device), B0.float().to(weight.device)
        delta = s * ((a.T[rows] @ b.T) if fan else (b[rows] @ a))
        part = local(weight)
        part.copy_((part.float() - delta).to(part.dtype))
    else:
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
    sketch_passes: int = 1,
) -> LoraGAReport:
    """Initialise every LoRA layer of ``peft_model`` with LoRA-GA (arXiv 2407.05000), in place.

    1. G = mean over the first ``num_batches`` batches (all, if None) of the gradient of each target base
       weight, in fp32, in eval mode, everything else frozen (``loss_fn(model, batch)``, or
       ``model(**batch).loss``). Under torch.distributed the sums and batch counts are all-reduced, so
       every rank gets the init of the union of all ranks' batches. ``estimator="exact"`` holds one fp32
       gradient per layer (on CPU with ``offload=True``); ``"sketch"`` never forms it
       (:mod:`gradkit.lora.sketch`). ``sketch_passes=1`` (default) streams a truncated SVD of the sum
       through one pass, holding ``w (in + out)`` floats per layer, w = 2r + ``sketch_oversample``
       (default max(8, r)); ``sketch_passes=2`` runs the batches twice, holds ``(k + l)(in + out)``
       floats, k = 2r + ``sketch_oversample`` (default max(8, r)), l = 2k + 1, and is linear in G, so under
       torch.distributed it equals the single-process sketch exactly (the one-pass sketch is merged
       across ranks, equal to the single-process one up to its approximation error).
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
    _check_options(estimator, direction, scale, sketch_passes, num_batches)
    # DDP / accelerate wrappers: estimate on the module itself (its gradients need no reducer)
    while isinstance(getattr(peft_model, "module", None), nn.Module):
        peft_model = peft_model.module
    _refuse_quantised(peft_model)
    reshard(peft_model)  # FSDP2: the sharded parameters registered (a forward leaves the root gathered)
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
    _check_estimates(pairs, estimates, total)
    bytes_held = sum(_nbytes(e) for e in estimates.values())
    if estimator == "sketch":
        bytes_held += max(e.work_nbytes for e in estimates.values())
    report = LoraGAReport(estimator, direction, scale, total, estimate_seconds, 0.0, bytes_held)
    for index, pair in enumerate(pairs):
        report.layers.append(
            _init_layer(pair, index, estimates, estimator, direction, scale, stable_gamma, seed)
        )
    reshard(peft_model)  # FSDP2: the next forward gathers the new shards
    report.seconds = time.perf_counter() - start
    return report


def _check_options(
    estimator: str, direction: str, scale: str, sketch_passes: int, num_batches: int | None
) -> None:
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


def _check_estimates(pairs: list[LoraPair], estimates: dict[str, Any], total: int) -> None:
    """Refuse no batches, a non-finite estimate, or estimates that are all zero."""
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


def _init_layer(
    pair: LoraPair,
    index: int,
    estimates: dict[str, Any],
    estimator: str,
    direction: str,
    scale: str,
    gamma: float,
    seed: int,
) -> LayerReport:
    """Top-2r SVD of one layer's estimate, written into its adapter (:func:`_apply`); its report line.
    The estimate is taken out of ``estimates`` and freed before the adapter is written."""
    t0 = time.perf_counter()
    estimate = estimates.pop(pair.name)
    held = _nbytes(estimate)
    if isinstance(estimate, ShardedGradient):  # FSDP2: gathered on one rank (round robin) for the SVD
        U, S, Vh = estimate.svd(2 * pair.rank, owner=index, seed=seed)
        total_sq = estimate.frobenius_sq()
    elif estimator == "exact":
        U, S, Vh = truncated_svd(estimate, 2 * pair.rank, seed=seed)
        total_sq = float(torch.linalg.vector_norm(estimate, dtype=torch.float64)) ** 2
    else:  # the sketches' fp32 factors carry LAPACK's signs: fixed as truncated_svd fixes them
        U, S, Vh = estimate.svd(2 * pair.rank)
        U, Vh = canonical_signs(U, Vh)
        total_sq = estimate.frobenius_sq()
    del estimate
    _apply(pair, U, Vh, direction, scale, gamma)
    energy = min(1.0, float(S.double().square().sum()) / total_sq) if total_sq > 0 else 0.0
    return LayerReport(
        pair.name,
        tuple(pair.base_weight.shape),
        pair.rank,
        S.detach().cpu(),
        energy,
        time.perf_counter() - t0,
        held,
    )


def _finite(estimate) -> bool:
    return bool(torch.isfinite(estimate).all()) if torch.is_tensor(estimate) else estimate.isfinite()


def _is_zero(estimate) -> bool:
    return not bool(estimate.any()) if torch.is_tensor(estimate) else estimate.is_zero()


def _nbytes(estimate) -> int:
    return estimate.numel() * estimate.element_size() if torch.is_tensor(estimate) else estimate.peak_nbytes
