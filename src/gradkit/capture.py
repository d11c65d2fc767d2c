"""Capture intermediate tensors: module outputs, inputs or output gradients by name pattern, and any
value tapped inside ``forward`` with :func:`tap`.

Each recorded value is detached and copied at the moment it is produced, so in-place operations that
run later (``nn.ReLU(inplace=True)``, residual ``+=``) cannot change it, and a module called several
times yields one entry per call instead of overwriting the previous one.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import re
import sys
import types
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

from gradkit.ema import unwrap_model
from gradkit.errors import GradkitError

__all__ = ["capture", "tap", "first_tensor", "all_tensors", "name_matches"]

_WHAT = ("output", "input", "grad")
# the captures open in this thread / task; tap() is a no-op while this is empty
_ACTIVE: ContextVar[tuple[_Recorder, ...]] = ContextVar("gradkit_capture", default=())


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in ``value``, searching tuples, lists and dicts (HF ``ModelOutput``) in order."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    for item in items:
        found = first_tensor(item)
        if found is not None:
            return found
    return None


def all_tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor in ``value`` (tuples, lists, dicts), depth first, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (tuple, list)) else ()
    return [t for item in items for t in all_tensors(item)]


class _Recorder:
    """State of one open :func:`capture`: where values go and how they are copied."""

    def __init__(self, what: str, to: torch.device | None, every_tensor: bool, taps: Any) -> None:
        self.what, self.to, self.every_tensor, self.taps = what, to, every_tensor, taps
        self.got: dict[str, list[Any]] = {}
        self.active = True

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        # one copy: .to(copy=True) clones when the device is unchanged
        return t.detach().to(self.to or t.device, copy=True)

    def record_value(self, name: str, value: Any) -> None:
        if self.every_tensor:
            self.got[name].append(tuple(self.copy(t) for t in all_tensors(value)))
        else:
            t = first_tensor(value)
            self.got[name].append(None if t is None else self.copy(t))

    def record_grad(self, name: str, value: Any) -> None:
        tensors = [
            t
            for t in (all_tensors(value) if self.every_tensor else [first_tensor(value)])
            if t is not None and t.requires_grad
        ]
        if not tensors:
            return  # no backward will reach this value (e.g. under torch.no_grad)
        entries = self.got[name]
        slot = len(entries)
        entries.append([None] * len(tensors))
        for k, t in enumerate(tensors):
            t.register_hook(self._grad_hook(entries, slot, k))

    def _grad_hook(self, entries: list, slot: int, k: int):
        def hook(grad: torch.Tensor) -> None:
            if self.active:  # the hook outlives the block on the saved graph: ignore late calls
                g = self.copy(grad)
                entries[slot][k] = g if entries[slot][k] is None else entries[slot][k] + g

        return hook

    def record_tap(self, name: str, tensor: torch.Tensor) -> None:
        if self.taps is False or (
            self.taps is not True and not any(name_matches(name, p) for p in self.taps)
        ):
            return
        self.got.setdefault(name, [])
        if self.what == "grad":
            self.record_grad(name, tensor)
        else:
            self.record_value(name, tensor)

    def finish(self) -> None:
        self.active = False
        if self.what != "grad":
            return
        for name, entries in self.got.items():
            done = [e for e in entries if all(g is not None for g in e)]
            self.got[name] = [tuple(e) if self.every_tensor else e[0] for e in done]


def name_matches(name: str, pattern: str) -> bool:
    """Glob on dotted module names: ``*`` and ``?`` stay inside one name component (``*`` never
    crosses a dot), ``**`` spans any number of components, ``[...]`` is a character class.

    So ``"encoder.layer.*.output"`` matches ``encoder.layer.3.output`` but not
    ``encoder.layer.3.attention.output`` (plain fnmatch would match both).
    """
    return _compile(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=256)
def _compile(pattern: str) -> re.Pattern[str]:
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[" and "]" in pattern[i + 2 :]:
            j = pattern.index("]", i + 2)
            body = pattern[i + 1 : j].replace("\\", "\\\\")  # ranges like [0-3] must stay unescaped
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


def _match(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Module] = {}
    for pattern in patterns:
        hits = [n for n in modules if name_matches(n, pattern)]
        if not hits:
            close = difflib.get_close_matches(pattern, [n for n in modules if n], n=3, cutoff=0.4)
            hint = f"close names: {', '.join(close)}" if close else "see model.named_modules() for names"
            raise GradkitError(f"capture pattern {pattern!r} matches no module; {hint}")
        for n in hits:
            chosen[n] = modules[n]
    return chosen


@contextlib.contextmanager
def capture(
    model: nn.Module,
    patterns: str | Sequence[str] = (),
    what: str = "output",
    to: str | torch.device | None = "cpu",
    *,
    all_outputs: bool = False,
    taps: bool | Sequence[str] = True,
) -> Iterator[dict[str, list[Any]]]:
    """Record what the modules whose names match ``patterns`` produce while the block runs; yields
    ``{name: [value per call]}``. Patterns are globs on dotted names (:func:`name_matches`:
    ``"encoder.layer.*.output"``, ``"**.attention"``).

    ``what``: ``"output"`` (forward hook), ``"input"`` (forward pre-hook; positional then keyword
    arguments) or ``"grad"`` (∂loss/∂output, through a hook on the output tensor: no module backward
    hook, so in-place ops after the module stay legal). Values are detached copies moved to ``to``
    (None keeps the device). A module whose output is a tuple / dict records its first tensor (HF
    layers put the hidden states first); ``all_outputs=True`` records a tuple of all its tensors.
    Gradient lists follow forward-call order; calls whose backward has not run by the end are dropped;
    several backward passes through one call add up, as ``.grad`` does.

    Values passed to :func:`tap` inside the block are recorded under their tap name (``taps``: True
    for all, False for none, or a list of globs). Names from ``model`` are those of the unwrapped model
    (no ``module.`` / ``_orig_mod.`` prefix). Hooks are removed on exit, also when the block raises.
    A pattern that matches no module raises :class:`GradkitError` listing close names.
    """
    if what not in _WHAT:
        raise GradkitError(f"capture what={what!r} is not supported; use one of {_WHAT}")
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if isinstance(taps, str):
        taps = [taps]
    modules = _match(unwrap_model(model), patterns)
    rec = _Recorder(what, torch.device(to) if to is not None else None, all_outputs, taps)
    handles = []
    for name, module in modules.items():
        rec.got[name] = []
        if what == "output":
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: rec.record_value(n, out)))
        elif what == "input":
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, kw, n=name: rec.record_value(n, (a, kw)), with_kwargs=True
                )
            )
        else:
            handles.append(module.register_forward_hook(lambda m, a, out, n=name: rec.record_grad(n, out)))
    token = _ACTIVE.set(_ACTIVE.get() + (rec,))
    try:
        yield rec.got
    finally:
        _ACTIVE.reset(token)
        for h in handles:
            h.remove()
        rec.finish()


def tap(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """Record ``tensor`` under ``name`` in every open :func:`capture` and return it unchanged.

    Put it anywhere inside ``forward`` (``x = gradkit.tap("attn.scores", scores)``); outside a capture
    it only reads one context variable.
    """
    active = _ACTIVE.get()
    if active:
        for rec in active:
            rec.record_tap(name, tensor)
    return tensor


class _CallableModule(types.ModuleType):
    """``gradkit.capture`` is both this module and the function: once the submodule is imported (for
    example through ``gradkit.tap``), Python makes the package attribute ``gradkit.capture`` the module,
    so the module forwards calls to :func:`capture`."""

    def __call__(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager[dict[str, list[Any]]]:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
