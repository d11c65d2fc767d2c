"""Several optimisers stepped as one, each owning its own parameters: Muon or spectral steepest descent
on the matrices and AdamW on the rest (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM
Training", arXiv 2502.16982), or LoRA-RITE on the LoRA factors and AdamW on the head.

:class:`CombinedOptimizer` is a ``torch.optim.Optimizer`` whose ``param_groups`` are the inner
optimisers' own group dicts, in order, so a learning-rate scheduler, accelerate's wrapper and gradient
clipping see every parameter once, and a change to a group's ``lr`` reaches the optimiser that owns it.
The groups are read live, since an inner
``load_state_dict`` (accelerate calls one when it prepares an optimiser) replaces the group dicts. Its
``state_dict`` has the standard layout, the inner ones' concatenated: parameter ``i`` of the
combined order is inner parameter ``i − offset`` of the optimiser that owns it, so the checkpoint code
(and FSDP2's shard bookkeeping, which indexes the flattened ``param_groups``) treats it as any single
optimiser. ``train()`` and ``eval()`` reach the inner optimisers that have them (Schedule-Free's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from gradkit.errors import GradkitError

__all__ = ["CombinedOptimizer"]


class CombinedOptimizer(Optimizer):
    """The inner ``optimizers`` as one optimiser; no parameter may belong to two of them."""

    def __init__(self, optimizers: Sequence[Optimizer]):
        if not optimizers:
            raise GradkitError("CombinedOptimizer needs at least one optimiser")
        seen: set[int] = set()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if id(p) in seen:
                        raise GradkitError("a parameter belongs to two of the combined optimisers")
                    seen.add(id(p))
        # the base class keeps hooks and bookkeeping (with groups of its own while it initialises); then
        # param_groups is the inner optimisers' own
        super().__init__([{"params": list(g["params"])} for o in optimizers for g in o.param_groups], {})
        self.optimizers = list(optimizers)
        del self.__dict__["_base_groups"], self.__dict__["_base_state"]

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        """The inner optimisers' group dicts, read live: an inner ``load_state_dict`` replaces them."""
        if "optimizers" not in self.__dict__:  # the base class initialising
            return self.__dict__["_base_groups"]
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @param_groups.setter
    def param_groups(self, groups: list[dict[str, Any]]) -> None:
        """Only the base class's initialisation assigns the groups."""
        self.__dict__["_base_groups"] = groups

    @property
    def state(self) -> dict[Any, Any]:  # type: ignore[override]
        """Every inner optimiser's per-parameter state, each parameter's own dict (a parameter is in one
        optimiser). A new mapping on each read, not a ChainMap: the inner states are defaultdicts, whose
        lookup of another optimiser's parameter would add an empty entry instead of failing."""
        if "optimizers" not in self.__dict__:  # the base class initialising
            return self.__dict__["_base_state"]
        return {p: entry for optimizer in self.optimizers for p, entry in optimizer.state.items()}

    @state.setter
    def state(self, state: Any) -> None:
        """Only the base class's initialisation assigns the state."""
        self.__dict__["_base_state"] = state

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> Any:
        """Each inner optimiser's step; ``closure`` (if any) is evaluated once, first."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def train(self) -> None:
        """Training mode for the inner optimisers that have one (Schedule-Free: the weights at ``y``)."""
        for optimizer in self.optimizers:
            if callable(getattr(optimizer, "train", None)):
                optimizer.train()

    def eval(self) -> None:
        """Evaluation mode for the inner optimisers that have one (Schedule-Free: the weights at ``x``)."""
        for optimizer in self.optimizers:
            if callable(getattr(optimizer, "eval", None)):
                optimizer.eval()

    def _sizes(self) -> list[tuple[int, int]]:
        """Per inner optimiser: its groups and its parameters."""
        return [(len(o.param_groups), sum(len(g["params"]) for g in o.param_groups)) for o in self.optimizers]

    def state_dict(self) -> dict[str, Any]:
        """The inner state dicts as one, parameter indices offset into the combined order."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        offset = 0
        for optimizer, (_, count) in zip(self.optimizers, self._sizes(), strict=True):
            inner = optimizer.state_dict()
            state.update({int(i) + offset: value for i, value in inner["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in inner["param_groups"]]
            offset += count
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Split a :meth:`state_dict` back into the inner optimisers' (each checks its own part)."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise GradkitError(
                f"the saved optimiser state has {len(groups)} parameter groups, this optimiser "
                f"{len(self.param_groups)}: it was saved with another --optimizer or method"
            )
        first_group = offset = 0
        for optimizer, (n_groups, count) in zip(self.optimizers, self._sizes(), strict=True):
            mine = groups[first_group : first_group + n_groups]
            inner_state = {
                int(i) - offset: value
                for i, value in state_dict["state"].items()
                if offset <= int(i) < offset + count
            }
            optimizer.load_state_dict(
                {
                    "state": inner_state,
                    "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine],
                }
            )
            first_group += n_groups
            offset += count
