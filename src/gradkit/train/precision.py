"""``--precision``: fp32, or bf16 autocast of the model's forward with fp32 master weights.

Under ``bf16`` the model's forward runs inside ``torch.autocast(device, torch.bfloat16)`` (matrix products
and attention in bf16; softmax, norms and losses where torch's autocast policy keeps fp32) and its
floating outputs come back as fp32. Nothing else is autocast: parameters, gradients and optimiser states
stay fp32, and the methods' own algebra (LoRA-Pro's solves, LoRA-GA's SVD and base offset, MeZO's
perturbations, the EMA) runs in fp32 outside the forward. It is done on the model itself, not through
accelerate's ``mixed_precision`` (a per-process singleton that a second run with another precision
cannot change).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import nn


def autocast(precision: str, device_type: str):
    """The context of a forward pass: bf16 autocast on ``device_type`` for ``"bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_fp32(out: Any) -> Any:
    """Floating tensors of a model output (a tensor, a ModelOutput or dict, a tuple) in fp32."""
    if torch.is_tensor(out):
        return out.float() if out.is_floating_point() and out.dtype != torch.float64 else out
    if isinstance(out, dict):  # transformers' ModelOutput is an OrderedDict
        for key in list(out.keys()):
            out[key] = _to_fp32(out[key])
        return out
    if isinstance(out, tuple):
        return type(out)(_to_fp32(v) for v in out)
    return out


def autocast_forward(model: nn.Module, precision: str, device_type: str) -> nn.Module:
    """Make every later ``model(...)`` run its forward under :func:`autocast` (outputs fp32); the
    module is changed in place (an instance ``forward``) and returned. fp32: nothing changes."""
    if precision != "bf16" or getattr(model, "_gradkit_precision", None) == precision:
        return model
    forward = model.forward

    @functools.wraps(forward)
    def autocast_forward_(*args, **kwargs):
        with autocast(precision, device_type):
            out = forward(*args, **kwargs)
        return _to_fp32(out)

    model.forward = autocast_forward_
    model._gradkit_precision = precision
    return model
