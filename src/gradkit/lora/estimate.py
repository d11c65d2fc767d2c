"""LoRA-GA's gradient estimators: the mean gradient of every target base weight over a set of batches,
either exactly (one fp32 sum per weight) or as a low-rank sketch that never forms a weight gradient
(:mod:`gradkit.lora.sketch`). Both run in eval mode with everything but what they need frozen, restore
every flag afterwards, and combine processes under torch.distributed."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from gradkit.fsdp import is_sharded, local, shard_offset
from gradkit.lora import distributed
from gradkit.lora.pairs import LoraPair
from gradkit.lora.sharded import ShardedGradient
from gradkit.lora.sketch import StreamingSketch, TwoPassSketch

Sketch = StreamingSketch | TwoPassSketch


@contextlib.contextmanager
def estimation_mode(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
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


def run_batches(model, batches, loss_fn, num_batches, progress, desc, after_backward=None) -> int:
    """Forward and backward on each batch (then ``after_backward()``, if given); returns how many ran
    on this process."""
    from tqdm.auto import tqdm

    total = num_batches
    if total is None and hasattr(batches, "__len__"):
        total = len(batches)
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    quiet = not progress or distributed.rank() != 0
    count = 0
    for batch in tqdm(batches, total=total, desc=desc, disable=quiet, dynamic_ncols=True):
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
        if after_backward is not None:
            after_backward()
        count += 1
    return count


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
    weights = [pair.layer.get_base_layer().weight for pair in pairs]
    if any(is_sharded(w) for w in weights):
        return _estimate_sharded(model, batches, pairs, weights, loss_fn, num_batches, progress, offload)
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

    handles = []
    try:
        with estimation_mode(model, weights):
            for pair, weight in zip(pairs, weights, strict=True):
                handles.append(
                    weight.register_post_accumulate_grad_hook(lambda p, name=pair.name: hook(p, name))
                )
            count = run_batches(model, batches, loss_fn, num_batches, progress, "LoRA-GA gradients")
    finally:
        for h in handles:
            h.remove()
    device = weights[0].device if not offload else torch.device("cpu")
    total = distributed.global_count(count, device)
    grads: dict[str, torch.Tensor] = {}
    for pair, weight in zip(pairs, weights, strict=True):
        g = sums.pop(pair.name, None)
        if g is None:  # no batch here, or the layer does not reach the loss
            g = torch.zeros(weight.shape, device=device)
        distributed.all_reduce_tensors_([g])
        g.div_(max(total, 1))
        grads[pair.name] = g.T if getattr(pair.layer, "fan_in_fan_out", False) else g
    return grads, total


def _estimate_sharded(model, batches, pairs, weights, loss_fn, num_batches, progress, offload):
    """FSDP2: after every backward, add this rank's rows of each base weight's (reduce-scattered,
    rank-averaged) gradient to an fp32 sum and free the gradient; the whole gradient of a layer is
    never formed. Returns ({name: ShardedGradient}, total batches)."""
    sums: dict[str, torch.Tensor] = {}

    def after_backward() -> None:
        for pair, weight in zip(pairs, weights, strict=True):
            grad, weight.grad = weight.grad, None
            if grad is None:
                continue
            part = local(grad).to("cpu" if offload else grad.device, torch.float32, copy=True)
            acc = sums.get(pair.name)
            if acc is None:
                sums[pair.name] = part
            else:
                acc.add_(part)

    with estimation_mode(model, weights):
        count = run_batches(
            model, batches, loss_fn, num_batches, progress, "LoRA-GA gradients", after_backward
        )
    device = weights[0].device if not offload else torch.device("cpu")
    total = distributed.global_count(count, device)
    # every rank ran `count` backwards; each reduce-scattered gradient is the mean over the world's
    # batches of that step, so the mean over all `total` batches is sum * world / total
    factor = distributed.world_size() / max(total, 1)
    grads = {}
    for pair, weight in zip(pairs, weights, strict=True):
        part = sums.pop(pair.name, None)
        if part is None:
            part = torch.zeros(shard_offset(weight)[0], device=device)
        grads[pair.name] = ShardedGradient(
            part.mul_(factor), weight, getattr(pair.layer, "fan_in_fan_out", False)
        )
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
    passes: int = 1,
) -> tuple[dict[str, Sketch], int]:
    """Sketches of every pair's mean base-weight gradient from forward-input and output-grad hooks: no
    weight gradient is ever formed (nothing but hooked inputs requires grad). ``passes=1``:
    :class:`~gradkit.lora.sketch.StreamingSketch`; ``passes=2``: :class:`~gradkit.lora.sketch.TwoPassSketch`
    (the batches are kept as a list of the first ``num_batches`` for pass 2). Combined over processes
    after each pass; returns ({name: sketch}, total batches)."""
    sketches: dict[str, Sketch] = {}
    handles = []

    def pre_hook(module, args):
        # a leaf here makes the output require grad, so its gradient is computed; nothing upstream
        # required grad, so no gradient path is cut
        if torch.is_grad_enabled() and not args[0].requires_grad:
            return (args[0].detach().requires_grad_(True), *args[1:])
        return None

    def forward_hook(module, args, out, sketch):
        if out.requires_grad:
            # the input is handed over once and dropped after use: a closure holding it would keep every
            # layer's input alive until the whole backward pass ends, raising the peak memory
            held = [args[0]]
            out.register_hook(lambda dy: sketch.update(dy, held.pop()))

    kind = StreamingSketch if passes == 1 else TwoPassSketch
    for index, pair in enumerate(pairs):
        base = pair.layer.get_base_layer()
        out_f, in_f = pair.base_weight.shape
        sketch = kind(
            out_f,
            in_f,
            2 * pair.rank,
            seed=seed * 1_000_003 + index,
            device=base.weight.device,
            oversample=oversample,
        )
        sketches[pair.name] = sketch
        handles.append(base.register_forward_pre_hook(pre_hook))
        handles.append(
            base.register_forward_hook(lambda m, a, o, sketch=sketch: forward_hook(m, a, o, sketch))
        )
    if passes > 1:
        batches = list(batches if num_batches is None else itertools.islice(batches, num_batches))
    device = next(iter(sketches.values())).device
    total = 0
    try:
        with estimation_mode(model, []):
            for pass_index in range(passes):
                desc = "LoRA-GA sketch" + (f" pass {pass_index + 1}/{passes}" if passes > 1 else "")
                count = run_batches(model, batches, loss_fn, num_batches, progress, desc)
                if pass_index == 0:
                    total = distributed.global_count(count, device)
                    if total == 0:
                        break
                for sketch in sketches.values():
                    sketch.reduce()
                    if pass_index + 1 < passes:
                        sketch.next_pass()
    finally:
        for h in handles:
            h.remove()
    for sketch in sketches.values():
        sketch.scale_(1.0 / max(total, 1))
    return sketches, total
