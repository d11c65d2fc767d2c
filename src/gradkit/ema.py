"""Exponential moving average of a model's weights (Polyak averaging with a finite horizon).

After each optimiser step the average ``Θ`` moves towards the training weights ``θ``::

    Θ_s = a_s·Θ_{s-1} + (1 − a_s)·θ_s,        Θ_0 = θ_0 (the weights when the EMA is built)

It never touches the training trajectory: the optimiser only ever sees ``θ``. Evaluate or save with
``Θ`` through :meth:`EMA.swapped` or :meth:`EMA.copy_to`. References: Polyak & Juditsky (1992),
"Acceleration of stochastic approximation by averaging"; the warmup schedule follows the
``1 − (1 + t/γ)^(−p)`` form popularised by TensorFlow's and timm's model EMAs; the bias-corrected form
is Adam's first-moment correction (Kingma & Ba, 2015) applied to weights.

Precision: the average of a half-precision (bf16/fp16) model is kept in float32 by default. In the
parameter's own dtype a step ``(1 − a)·(θ − Θ)`` below half an ulp of ``Θ`` rounds away: at
``a = 0.999`` a bf16 average moves only while ``|θ − Θ|`` exceeds about 2-4 times ``|Θ|`` (fp16: about
0.25-0.5 times), so in practice it never moves.

FSDP2 (``fully_shard``: parameters are row-sharded DTensors). Each rank averages its own shard: the
average of a sharded parameter is a plain tensor shaped like this rank's shard (no rank ever holds a
whole copy), updated from the local shard with the same fused lerp. :meth:`swapped` and
:meth:`copy_to` write the local shards and reshard the model's FSDP modules, so the next forward
gathers the averaged (then the restored) weights. :meth:`state_dict` holds this rank's shards: save
one file per rank and resume with the same number of ranks. :meth:`save_safetensors` gathers the
average one tensor at a time into a single safetensors file written by rank 0, keyed like the
unsharded model's ``state_dict()``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.fsdp import gather_rows, is_dtensor, reshard
from gradkit.fsdp import local as local_shard

__all__ = ["EMA", "ema_decay", "interval_decay", "unwrap_model"]

_WARMUPS = (None, "power", "bias_corrected")
_SHADOW_DTYPES = ("auto", "param")


def _shadow_dtype(choice: str | torch.dtype, t: torch.Tensor) -> torch.dtype:
    """The dtype the average of tensor ``t`` is kept in."""
    if not t.is_floating_point() or choice == "param":
        return t.dtype
    if choice == "auto":  # half precision (bf16, fp16, fp8) is averaged in float32
        return torch.float32 if torch.finfo(t.dtype).bits < 32 else t.dtype
    return choice


def ema_decay(
    step: int, decay: float, warmup: str | None = None, *, gamma: float = 1.0, power: float = 2 / 3
) -> float:
    """The averaging coefficient ``a_s`` used at optimiser step ``s`` (1-based).

    - ``warmup=None``: ``a_s = decay``.
    - ``"power"``: ``a_s = min(decay, 1 − (1 + (s−1)/γ)^(−p))``; ``a_1 = 0`` so the average starts at the
      weights after the first step, then its horizon grows like ``s/γ`` (γ=1, p=2/3 by default; p=3/4
      is a slower ramp used for long runs).
    - ``"bias_corrected"``: ``a_s = decay·(1 − decay^(s−1)) / (1 − decay^s)``. This is exactly Adam's
      correction: with the zero-started average ``M_s = decay·M_{s−1} + (1−decay)·θ_s`` one has
      ``Θ_s = M_s / (1 − decay^s)``, i.e. a weighted mean of θ_1..θ_s with weights ∝ decay^(s−i).
    """
    if step < 1:
        raise GradkitError(f"EMA step must be >= 1 (1-based optimiser step), got {step}")
    if warmup is None:
        return float(decay)
    if warmup == "power":
        return min(float(decay), 1.0 - (1.0 + (step - 1) / gamma) ** (-power))
    if warmup == "bias_corrected":
        return decay * (1.0 - decay ** (step - 1)) / (1.0 - decay**step)
    raise GradkitError(f"unknown EMA warmup {warmup!r}; use one of {_WARMUPS}")


def interval_decay(
    last: int, step: int, decay: float, warmup: str | None = None, *, gamma: float = 1.0, power: float = 2 / 3
) -> float:
    """Coefficient for one update that covers optimiser steps ``last+1 .. step``: ``∏_s a_s``.

    Updating only every N steps with this product gives exactly the every-step EMA of the sequence in
    which each skipped step's weights are replaced by the weights at the next update ("sample and
    hold"), so the horizon measured in optimiser steps does not depend on N.
    """
    if warmup is None:
        return float(decay) ** (step - last)
    if warmup == "bias_corrected":  # the product telescopes
        return decay ** (step - last) * (1.0 - decay**last) / (1.0 - decay**step)
    out = 1.0
    for s in range(last + 1, step + 1):
        out *= ema_decay(s, decay, warmup, gamma=gamma, power=power)
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip torch.compile (``_orig_mod``), DDP / DataParallel / DeepSpeed / accelerate wrappers.

    A wrapper is recognised by identity, not by name: a module with a ``.module`` child whose
    parameters and buffers are exactly the same tensor objects as the wrapper's own.
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and _same_tensors(model, inner):
            model = inner
    return model


def _same_tensors(a: nn.Module, b: nn.Module) -> bool:
    def ids(m: nn.Module) -> set[int]:
        return {id(t) for t in m.parameters()} | {id(t) for t in m.buffers()}

    return ids(a) == ids(b)


def _slots(module: nn.Module, buffers: bool) -> list[tuple[str, nn.Module, str, bool]]:
    """(qualified name, owner module, local name, is_parameter) for every distinct tensor, tied once."""
    out, seen = [], set()
    for mod_name, mod in module.named_modules(remove_duplicate=True):
        groups = [(mod._parameters, True)] + ([(mod._buffers, False)] if buffers else [])
        for table, is_param in groups:
            for local, t in table.items():
                if t is None or id(t) in seen:
                    continue
                if not is_param and local in getattr(mod, "_non_persistent_buffers_set", ()):
                    # non-persistent buffers (position ids, masks) are constants, not state
                    continue
                seen.add(id(t))
                out.append((f"{mod_name}.{local}" if mod_name else local, mod, local, is_param))
    return out


class EMA:
    """Exponential moving average of a model's parameters and buffers, updated in place.

    ``Θ ← a·Θ + (1 − a)·θ`` with ``a`` from :func:`ema_decay` (``decay`` or a warmup schedule), one fused
    ``torch._foreach_lerp_`` per (device, dtype) group (``_foreach_mul_`` + ``_foreach_add_``, which
    convert in the kernel, where the average is kept in another dtype than the model, e.g. float32 for
    bf16: no cast copy of the model is made); non-floating buffers are copied.

    Guarantees: for every floating tensor, after ``n`` updates the average equals the closed form
    ``(∏ a_s)·θ_0 + Σ_s (1 − a_s)·(∏_{u>s} a_u)·θ_s`` up to rounding in the average's dtype (float32 for
    fp32, bf16 and fp16 models by default); :meth:`swapped` and :meth:`copy_to` put it into the model
    rounded once to the model's dtype, and :meth:`swapped` restores the training weights bit for bit.

    Args:
        model: the training model; DDP, torch.compile and accelerate wrappers are unwrapped. The EMA
            keeps (module, attribute) references to its tensors, so it follows ``model.to(...)`` and
            never matches by name.
        decay: the target coefficient ``a`` (horizon ≈ 1/(1−a) steps).
        warmup: None, ``"power"`` (``gamma``, ``power``) or ``"bias_corrected"``; see :func:`ema_decay`.
        buffers: ``"average"`` averages floating buffers (BatchNorm running statistics) like parameters;
            ``"copy"`` copies the current buffers at every update. Integer buffers are always copied.
        device: keep the average on another device (e.g. ``"cpu"`` to save accelerator memory).
        shadow_dtype: the dtype of the floating average. ``"auto"`` (default): float32 for half-precision
            tensors (bf16, fp16), the tensor's own dtype otherwise, so the average of a half-precision
            model is exact to float32 rounding; it costs 4 bytes per element, 2x the bf16 parameter
            bytes (see :attr:`shadow_bytes`). ``"param"``: the tensor's own dtype, half the memory, but
            an update moves an element only when ``(1 − a)·|θ − Θ|`` exceeds half an ulp of ``Θ``: with
            ``decay=0.999`` a bf16 average stays put unless ``|θ − Θ|`` exceeds about 2-4 times
            ``|Θ|`` (fp16: 0.25-0.5 times), i.e. it stalls.
            A ``torch.dtype`` (e.g. ``torch.float64``): that dtype for every floating tensor.
        every: average only every ``every``-th optimiser step, with the product of the per-step
            coefficients (:func:`interval_decay`), so the horizon in steps stays the same.

    Call :meth:`update` once after each ``optimizer.step()``.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.999,
        warmup: str | None = None,
        buffers: str = "average",
        device: str | torch.device | None = None,
        every: int = 1,
        *,
        gamma: float = 1.0,
        power: float = 2 / 3,
        shadow_dtype: str | torch.dtype = "auto",
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise GradkitError(f"EMA decay must be in [0, 1), got {decay}; e.g. decay=0.999")
        if warmup not in _WARMUPS:
            raise GradkitError(f"unknown EMA warmup {warmup!r}; use one of {_WARMUPS}")
        if buffers not in ("average", "copy"):
            raise GradkitError(f"EMA buffers must be 'average' or 'copy', got {buffers!r}")
        if int(every) != every or every < 1:
            raise GradkitError(f"EMA every must be a positive integer, got {every!r}")
        if gamma <= 0 or power <= 0:
            raise GradkitError(f"EMA warmup needs gamma > 0 and power > 0, got gamma={gamma}, power={power}")
        if isinstance(shadow_dtype, torch.dtype):
            if not shadow_dtype.is_floating_point:
                raise GradkitError(
                    f"EMA shadow_dtype must be a floating dtype, got {shadow_dtype}; e.g. torch.float32"
                )
        elif shadow_dtype not in _SHADOW_DTYPES:
            raise GradkitError(
                f"EMA shadow_dtype must be 'auto', 'param' or a floating torch.dtype, got {shadow_dtype!r}"
            )
        self.shadow_dtype = shadow_dtype
        self.decay, self.warmup, self.buffers, self.every = float(decay), warmup, buffers, int(every)
        self.gamma, self.power = float(gamma), float(power)
        self.device = torch.device(device) if device is not None else None
        self.step = 0  # optimiser steps seen
        self.last_update = 0  # optimiser step of the last applied average
        self.module = unwrap_model(model)
        reshard(self.module)  # FSDP2: register the sharded parameters (a forward leaves the root gathered)
        self._slots = _slots(self.module, buffers=True)
        self.names = [s[0] for s in self._slots]
        # FSDP2 registers the root's gathered (plain) weights after a forward: hold the sharded
        # parameters themselves, which FSDP keeps for the whole run
        self._sharded = {i: t for i, t in enumerate(self._live()) if is_dtensor(t)}
        self.shadow: list[torch.Tensor] = []
        with torch.no_grad():
            for t in self._live():  # a sharded tensor is averaged as its local shard
                cast = _shadow_dtype(shadow_dtype, t)
                self.shadow.append(
                    local_shard(t.detach()).to(device=self.device or t.device, dtype=cast, copy=True)
                )
        self._build_groups()

    # -- bookkeeping -------------------------------------------------------------------------------
    def _live(self) -> list[torch.Tensor]:
        """The tracked tensors as the EMA reads and writes them: this rank's shard of a sharded one."""
        sharded = getattr(self, "_sharded", {})
        return [
            local_shard(sharded[i]) if i in sharded else (m._parameters if p else m._buffers)[name]
            for i, (_, m, name, p) in enumerate(self._slots)
        ]

    def _build_groups(self) -> None:
        averaged: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        self._copied: list[int] = []
        for i, ((_, _, _, is_param), s) in enumerate(zip(self._slots, self.shadow, strict=True)):
            if s.is_floating_point() and (is_param or self.buffers == "average"):
                averaged.setdefault((s.device, s.dtype), []).append(i)
            else:
                self._copied.append(i)
        self._groups = [(key, idx, [self.shadow[i] for i in idx]) for key, idx in averaged.items()]

    def decay_at(self, step: int) -> float:
        """The per-step coefficient :func:`ema_decay` for this EMA's settings at optimiser step ``step``."""
        return ema_decay(step, self.decay, self.warmup, gamma=self.gamma, power=self.power)

    # -- the update --------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, step: int | None = None) -> bool:
        """Record one optimiser step and average if it is due; returns whether the average moved.

        ``step``: the 1-based number of optimiser steps taken so far (e.g. ``global_step``); if None the
        EMA counts its own calls. Warmup always uses this count. The update at step ``s`` uses
        ``a = ∏_{u = last+1}^{s} a_u`` (one factor when ``every=1``).
        """
        if step is None:
            step = self.step + 1
        elif step < self.last_update:
            raise GradkitError(f"EMA step went backwards ({step} < {self.last_update}); pass the global step")
        self.step = int(step)
        if self.step % self.every or self.step == self.last_update:
            return False
        a = interval_decay(
            self.last_update, self.step, self.decay, self.warmup, gamma=self.gamma, power=self.power
        )
        self.last_update = self.step
        live = self._live()
        for (device, dtype), idx, shadows in self._groups:
            same, same_src, mixed, mixed_src = [], [], [], []
            for i, s in zip(idx, shadows, strict=True):
                t = live[i] if live[i].device == device else live[i].to(device=device)
                if t.dtype == dtype:
                    same.append(s)
                    same_src.append(t)
                else:
                    mixed.append(s)
                    mixed_src.append(t)
            if same:
                torch._foreach_lerp_(same, same_src, 1.0 - a)
            if mixed:
                # Θ ← a·Θ + (1 − a)·θ; add_ converts θ in the kernel: no float32 copy of the model
                torch._foreach_mul_(mixed, a)
                torch._foreach_add_(mixed, mixed_src, alpha=1.0 - a)
        for i in self._copied:
            self.shadow[i].copy_(live[i])
        return True

    # -- using the average -------------------------------------------------------------------------
    @torch.no_grad()
    def copy_to(self, model: nn.Module | None = None) -> None:
        """Write the averaged weights into ``model`` (default: the tracked model), by module structure.

        A different model must have the same architecture once unwrapped (same parameter and buffer
        names and shapes); values are cast to its dtype and device.
        """
        if model is None or unwrap_model(model) is self.module:
            targets = self._live()
            for t, s in zip(targets, self.shadow, strict=True):
                t.copy_(s)
            if self._sharded:
                reshard(self.module)  # the next forward gathers the new shards, not FSDP's cached root
            return
        else:
            tables = {n: (m, local, p) for n, m, local, p in _slots(unwrap_model(model), buffers=True)}
            missing = [n for n in self.names if n not in tables]
            if missing:
                raise GradkitError(
                    f"copy_to: target model lacks {missing[:3]}; pass a model of the same "
                    "architecture as the one the EMA tracks"
                )
            targets = [
                (tables[n][0]._parameters if tables[n][2] else tables[n][0]._buffers)[tables[n][1]]
                for n in self.names
            ]
        for t, s in zip(targets, self.shadow, strict=True):
            if t.shape != s.shape:
                raise GradkitError(
                    f"copy_to: shape {tuple(t.shape)} != EMA shape {tuple(s.shape)}; "
                    "the target has a different architecture"
                )
            t.copy_(s)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[nn.Module]:
        """Put the averaged weights into the tracked model for the block, then restore the training
        weights bit for bit, also when the block raises. Yields the (unwrapped) model."""
        with torch.no_grad():
            backup = [t.detach().clone() for t in self._live()]  # FSDP2: this rank's shards only
            self.copy_to()
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for t, b in zip(self._live(), backup, strict=True):
                    t.copy_(b)
                if self._sharded:
                    reshard(self.module)

    def averaged_state_dict(self, *, full_precision: bool = False) -> dict[str, torch.Tensor]:
        """The averaged weights keyed like the unwrapped model's ``state_dict()`` (for saving).

        By default each tensor is in the tracked model's current dtype, i.e. exactly what
        :meth:`swapped` and :meth:`copy_to` put into the model (the float32 average of a bf16 model is
        rounded once to bf16; tensors already in the model's dtype are returned as they are, not
        copied). ``full_precision=True``: the average as kept (``shadow_dtype``), e.g. float32.
        Under FSDP2 a sharded tensor's entry is this rank's shard; :meth:`save_safetensors` gathers.
        """
        if full_precision:
            return dict(zip(self.names, self.shadow, strict=True))
        return {
            n: s if s.dtype == t.dtype else s.to(t.dtype)
            for n, s, t in zip(self.names, self.shadow, self._live(), strict=True)
        }

    @property
    def sharded(self) -> bool:
        """True when some tracked tensor is sharded by FSDP2: each rank then averages its own shard, and
        :meth:`save_safetensors` is a collective (every rank must call it)."""
        return bool(self._sharded)

    @torch.no_grad()
    def save_safetensors(
        self, path: str, *, full_precision: bool = False, metadata: dict[str, str] | None = None
    ) -> None:
        """Save the averaged weights as one safetensors file keyed like :meth:`averaged_state_dict`.

        Under FSDP2 every rank must call it: each sharded tensor is all-gathered in turn (one whole
        tensor at a time on each rank) and rank 0 writes the file, so rank 0 holds the whole averaged
        model on the CPU while writing. Without FSDP it is ``safetensors.torch.save_file`` of
        :meth:`averaged_state_dict` (rank 0 only under DDP). ``metadata``: the file's string metadata."""
        from safetensors.torch import save_file

        dist = torch.distributed
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        out = {}
        tensors = self.averaged_state_dict(full_precision=full_precision)
        for i, name in enumerate(self.names):
            value = tensors[name]
            if i in self._sharded:  # this rank's shard -> the whole tensor (a collective)
                value = gather_rows(value.to(self._sharded[i].device), self._sharded[i])
            if rank == 0:
                out[name] = value.detach().to("cpu").contiguous()
            del value
        if rank == 0:
            save_file(out, path, metadata=metadata)

    @property
    def shadow_bytes(self) -> int:
        """Memory held by the average, in bytes (float32 for a bf16 model: 2x its parameter bytes)."""
        return sum(s.numel() * s.element_size() for s in self.shadow)

    # -- resume ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: settings, step counters and the averaged tensors."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "buffers": self.buffers,
            "every": self.every,
            "gamma": self.gamma,
            "power": self.power,
            "step": self.step,
            "last_update": self.last_update,
            "shadow": {n: s.clone() for n, s in zip(self.names, self.shadow, strict=True)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore counters, settings and averaged tensors saved by :meth:`state_dict`."""
        shadow = state["shadow"]
        missing = [n for n in self.names if n not in shadow]
        if missing:
            raise GradkitError(f"EMA state lacks {missing[:3]}; it was saved from a different model")
        for n, s in zip(self.names, self.shadow, strict=True):
            if shadow[n].shape != s.shape:
                raise GradkitError(
                    f"EMA state for {n} has shape {tuple(shadow[n].shape)}, "
                    f"expected {tuple(s.shape)}; it was saved from a different model"
                )
            s.copy_(shadow[n])
        self.decay, self.warmup, self.buffers = float(state["decay"]), state["warmup"], state["buffers"]
        self.every, self.gamma, self.power = int(state["every"]), float(state["gamma"]), float(state["power"])
        self.step, self.last_update = int(state["step"]), int(state["last_update"])
        self._build_groups()

    def __repr__(self) -> str:
        n = sum(s.numel() for s in self.shadow)
        return (
            f"EMA(decay={self.decay}, warmup={self.warmup!r}, buffers={self.buffers!r}, every={self.every}, "
            f"step={self.step}, tensors={len(self.shadow)}, numel={n}, shadow_dtype={self.shadow_dtype!r})"
        )
