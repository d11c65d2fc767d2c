"""``--fsdp``: the harness's model sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

:func:`shard_model` applies plain ``fully_shard`` to every transformer block (the elements of the
model's longest list of same-class modules: BERT's ``encoder.layer``, Llama's ``model.layers``, GPT-2's
``transformer.h``) and then to the root, so every parameter becomes a row-sharded DTensor (``Shard(0)``)
and each block is all-gathered only around its own forward and backward. The loop shards after the
method's ``prepare`` (PEFT's LoRA layers exist; ``lora-ga`` shards inside its ``prepare``, before
:func:`gradkit.lora_ga_init`, which then sums sharded gradients) and before the optimiser is built, and
does not hand the model to ``accelerator.prepare`` (no DDP around FSDP).

What leaves the ranks is gathered here:

- :func:`full_weights`: for ``method.save`` (every method's own format: the PEFT adapter, LoRA-GA's
  difference form, ``trainable.safetensors``), every sharded parameter is gathered one at a time (every
  rank takes part); on the rank that writes, the model's parameters are whole plain tensors for the
  block, on the others nothing is kept.
- :func:`full_tensors`: a checkpoint's ``tensors.safetensors`` holds whole tensors, exactly the
  file an unsharded run writes; :func:`gradkit.train.checkpoint.load_tensors` writes each rank's
  rows back.
- :func:`local_optimizer_state` / :func:`load_local_optimizer_state`: the optimiser's state is saved
  per rank (each rank's shards as plain tensors, in ``rng-rank{r}.pt``), as is the EMA's (its
  average is per-rank shards already).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import fsdp_modules, full, is_dtensor, local, reshard


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's transformer blocks: the elements of its longest ``nn.ModuleList`` whose elements are
    all of one class and hold parameters (BERT's encoder layers, a causal LM's decoder layers). Empty
    when the model has no such list."""
    best: list[nn.Module] = []
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) <= len(best):
            continue
        items = list(module)
        if len({type(m) for m in items}) == 1 and any(True for _ in items[0].parameters()):
            best = items
    return best


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard`` each transformer block, then the root (in place; returned). A model that is
    already sharded (``lora-ga`` shards before its initialisation) is returned as it is. Needs the
    process group that ``torchrun`` / accelerate set up."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    if not (dist.is_available() and dist.is_initialized()):
        raise GradkitError(
            "--fsdp shards the model over the processes of a launch, and no process group is running; "
            "start the run with torchrun --nproc_per_node N (N >= 2)"
        )
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def full_weights(model: nn.Module, keep: bool) -> Iterator[nn.Module]:
    """Every sharded parameter of ``model`` gathered whole for the block, on the ranks where ``keep``.

    Every rank must enter (each parameter is an all-gather, one at a time); on a rank with ``keep`` the
    model's parameters are plain ``nn.Parameter`` s holding the whole tensors (same names and
    ``requires_grad``, shared parameters stay shared), so any saving code reads them as in one
    process; the others hold nothing extra. The sharded parameters are put back afterwards. Without
    DTensor parameters this does nothing."""
    if not any(is_dtensor(p) for p in model.parameters()):
        yield model
        return
    reshard(model)  # FSDP2 registers the sharded parameters again: these are the ones replaced
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    gathered: dict[int, nn.Parameter] = {}
    try:
        for module in model.modules():
            for name, param in list(module._parameters.items()):
                if param is None or not is_dtensor(param):
                    continue
                if id(param) not in gathered:
                    whole = full(param.detach())
                    gathered[id(param)] = (
                        nn.Parameter(whole, requires_grad=param.requires_grad) if keep else param
                    )
                if keep:
                    swapped.append((module, name, param))
                    module._parameters[name] = gathered[id(param)]
        yield model
    finally:
        for module, name, param in swapped:
            module._parameters[name] = param


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with every DTensor gathered whole (collective: every rank calls it, in the same key
    order); plain tensors pass through."""
    return {name: full(t.detach()) for name, t in tensors.items()}


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's optimiser state for a checkpoint: ``state_dict()`` with every DTensor replaced by its
    local shard (plain tensors load with ``weights_only``), and the places it was a DTensor."""
    state = dict(getattr(optimizer, "optimizer", optimizer).state_dict())
    state["state"] = {k: dict(v) for k, v in state["state"].items()}  # the optimiser's own dicts otherwise
    sharded = []
    for index, entry in state["state"].items():
        for key, value in list(entry.items()):
            if is_dtensor(value):
                entry[key] = local(value).detach().clone()
                sharded.append([index, key])
    return {"state_dict": state, "sharded": sharded}


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Load :func:`local_optimizer_state`'s result: the local shards become DTensors again, laid out like
    the parameters they belong to, then ``load_state_dict``."""
    from torch.distributed.tensor import DTensor

    inner = getattr(optimizer, "optimizer", optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    state = copy.copy(saved["state_dict"])
    state["state"] = {k: dict(v) for k, v in state["state"].items()}
    for index, key in saved["sharded"]:
        param = params[int(index)]
        if not is_dtensor(param):
            raise GradkitError(
                "the checkpoint's optimiser state is sharded and the model is not; resume with --fsdp"
            )
        value = state["state"][index][key]
        state["state"][index][key] = DTensor.from_local(
            value,
            param.device_mesh,
            param.placements,
            shape=param.shape,
            stride=param.stride(),
            run_check=False,
        )
    inner.load_state_dict(state)


def is_sharded_model(model: nn.Module) -> bool:
    """True when ``fully_shard`` wraps some module of ``model``."""
    return bool(fsdp_modules(model))
