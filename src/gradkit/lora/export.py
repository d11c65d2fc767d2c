"""Save a LoRA adapter that plain PEFT loads onto the ORIGINAL, untouched base model.

A layer initialised by :func:`gradkit.lora_ga_init` computes ``(W0 - s B0 A0) x + s B A x``: its base
weight was offset so the model's output was unchanged at init. Relative to the original W0 the trained
change is

    dW = s (B A - B0 A0) = s [B, -B0] [A; A0],

a rank-2r LoRA adapter with ``A' = cat([A, A0], dim=0)``, ``B' = cat([B, -B0], dim=1)``, ``r' = 2r`` and
``alpha' = 2 alpha`` (``sqrt(2) alpha`` with rsLoRA, whose scale is ``alpha / sqrt(r)``), so its scale
``s`` is unchanged (LoRA-GA, arXiv 2407.05000; the same difference form PEFT uses to convert PiSSA and
OLoRA adapters). :func:`save_adapter` writes it with PEFT's own ``save_pretrained``, so the files, key
names, ``modules_to_save`` (e.g. a classification head) and config are PEFT's; only the doubled layers
and their config entries differ. A model without LoRA-GA layers is saved as PEFT saves it, with its
sets of names sorted.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.files import atomic_dir
from gradkit.lora.ga import RECORD


def _unwrap(model: nn.Module) -> nn.Module:
    """The PeftModel inside DDP / accelerate / torch.compile wrappers (by attribute, no isinstance on
    optional wrappers)."""
    for _ in range(4):
        if hasattr(model, "peft_config"):
            return model
        model = getattr(model, "module", None) or getattr(model, "_orig_mod", None) or model
    return model


def _adapter_name(model: nn.Module, adapter: str | None) -> str:
    if adapter is not None:
        if adapter not in model.peft_config:
            raise GradkitError(
                f"the model has no adapter {adapter!r}; its adapters are {', '.join(model.peft_config)}"
            )
        return adapter
    active = getattr(model, "active_adapter", None)
    if isinstance(active, (list, tuple)):
        if len(active) != 1:
            raise GradkitError(
                f"the model has {len(active)} active adapters {list(active)}; pass adapter=name to save_adapter"
            )
        active = active[0]
    return active or "default"


def _difference_form(
    model: nn.Module, adapter: str
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, float]]]:
    """For every LoRA-GA layer of ``adapter``: the rank-2r factors (keyed as in ``model.state_dict()``) and
    the layer's (r', alpha') (keyed by its module name in the base model, as PEFT's patterns see it)."""
    from peft.tuners.lora import LoraLayer

    inner = model.base_model.model
    replaced: dict[str, torch.Tensor] = {}
    wanted: dict[str, tuple[int, float]] = {}
    for name, layer in inner.named_modules():
        if not isinstance(layer, LoraLayer) or adapter not in layer.lora_A:
            continue
        record = layer.__dict__.get(RECORD, {}).get(adapter)
        rank, alpha = int(layer.r[adapter]), float(layer.lora_alpha[adapter])
        if record is None:
            wanted[name] = (rank, alpha)
            continue
        A0, B0 = record
        A, B = layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
        if A0.shape != A.shape or B0.shape != B.shape:
            raise GradkitError(
                f"layer {name}: the LoRA-GA record ({tuple(B0.shape)} x {tuple(A0.shape)}) does not match the "
                f"adapter ({tuple(B.shape)} x {tuple(A.shape)}); was the adapter resized after lora_ga_init?"
            )
        prefix = f"base_model.model.{name}"
        replaced[f"{prefix}.lora_A.{adapter}.weight"] = torch.cat([A, A0.to(A.device, A.dtype)], dim=0)
        replaced[f"{prefix}.lora_B.{adapter}.weight"] = torch.cat([B, -B0.to(B.device, B.dtype)], dim=1)
        rslora = bool(layer.use_rslora.get(adapter, False)) if isinstance(layer.use_rslora, dict) else False
        # s = alpha / r (or alpha / sqrt(r)) is unchanged when r doubles and alpha doubles (or grows by sqrt 2)
        wanted[name] = (2 * rank, alpha * (math.sqrt(2.0) if rslora else 2.0))
    return replaced, wanted


def _resolve(config, name: str) -> tuple[int, float]:
    """(r, alpha) that PEFT gives module ``name`` under ``config`` (PEFT's own pattern matching)."""
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key(config.rank_pattern.keys(), name)
    a_key = get_pattern_key(config.alpha_pattern.keys(), name)
    return int(config.rank_pattern.get(r_key, config.r)), float(
        config.alpha_pattern.get(a_key, config.lora_alpha)
    )


def _export_config(config, wanted: dict[str, tuple[int, float]], rslora: bool):
    """A copy of ``config`` under which every layer gets its (r', alpha').

    The global r, alpha and every existing pattern are transformed like the LoRA-GA layers (the usual
    case: every layer of the adapter was initialised); any layer that then resolves differently (a
    mix of initialised and plain layers) gets an exact-name pattern entry placed first, since PEFT takes
    the first matching key."""
    new = copy.deepcopy(config)
    if any(r != _resolve(config, name)[0] for name, (r, _) in wanted.items()):
        grow = math.sqrt(2.0) if rslora else 2.0
        new.r = 2 * config.r
        new.lora_alpha = config.lora_alpha * grow
        new.rank_pattern = {k: 2 * v for k, v in (config.rank_pattern or {}).items()}
        new.alpha_pattern = {k: v * grow for k, v in (config.alpha_pattern or {}).items()}
    exact_r, exact_alpha = {}, {}
    for name, (r, alpha) in wanted.items():
        got_r, got_alpha = _resolve(new, name)
        key = re.escape(name)
        if got_r != r:
            exact_r[key] = r
        if not math.isclose(got_alpha, alpha, rel_tol=1e-12):
            exact_alpha[key] = alpha
    new.rank_pattern = {**exact_r, **new.rank_pattern}
    new.alpha_pattern = {**exact_alpha, **new.alpha_pattern}
    for name, (r, alpha) in wanted.items():  # PEFT must resolve every layer to the intended (r', alpha')
        got = _resolve(new, name)
        if got[0] != r or not math.isclose(got[1], alpha, rel_tol=1e-12):
            raise GradkitError(
                f"cannot express the rank/alpha of layer {name} in the adapter config; please report"
            )
    return new


@contextlib.contextmanager
def _swapped_config(model: nn.Module, adapter: str, config) -> Iterator[None]:
    """PEFT's ``save_pretrained`` writes ``model.peft_config[adapter]``: lend it the export config."""
    original = model.peft_config[adapter]
    model.peft_config[adapter] = config
    try:
        yield
    finally:
        model.peft_config[adapter] = original


@contextlib.contextmanager
def stable_config(model: nn.Module) -> Iterator[None]:
    """While ``model.save_pretrained`` writes adapter_config.json: PEFT keeps ``target_modules`` (and its
    other collections of names) as sets and writes ``list(set)``, whose order follows the string hash
    (``PYTHONHASHSEED``). Lend it copies of the configs holding each set as a sorted list, so the same
    adapter writes the same bytes in every process; PEFT turns the list back into a set when it loads."""
    originals = dict(model.peft_config)
    for name, config in originals.items():
        stable = copy.copy(config)
        for key, value in vars(config).items():
            if isinstance(value, (set, frozenset)):
                setattr(stable, key, sorted(value))
        model.peft_config[name] = stable
    try:
        yield
    finally:
        model.peft_config.update(originals)


def save_adapter(peft_model: nn.Module, path: str | os.PathLike, *, adapter: str | None = None) -> Path:
    """Write ``peft_model``'s LoRA adapter to the folder ``path`` in PEFT's format (adapter_config.json,
    adapter_model.safetensors) so that ``PeftModel.from_pretrained(original_base, path)`` reproduces the
    trained model on the ORIGINAL base weights.

    Layers initialised by :func:`gradkit.lora_ga_init` are written in the difference form
    ``s (B A - B0 A0)``: ``A' = [A; A0]``, ``B' = [B, -B0]``, ``r' = 2r``, ``alpha' = 2 alpha``
    (``sqrt(2) alpha`` with rsLoRA), per layer through ``rank_pattern``/``alpha_pattern`` where needed.
    Other layers and ``modules_to_save`` (e.g. a classification head) are PEFT's own, so a model without
    LoRA-GA layers is saved as ``peft_model.save_pretrained`` saves it, its collections of names (PEFT's
    sets) sorted (:func:`stable_config`) and its ``init_lora_weights`` plain LoRA's (``True``: the file
    holds trained factors, and PiSSA's or CorDA's initialisation would rewrite the base it is loaded onto). ``adapter`` defaults to
    the active one. The folder is written beside ``path`` under a temporary name, then renamed onto it
    (an existing folder is replaced). Returns ``path``.
    """
    from peft import LoraConfig, PeftModel

    model = _unwrap(peft_model)
    if not isinstance(model, PeftModel):
        raise GradkitError(
            f"save_adapter needs a PEFT model (peft.get_peft_model(...)), got {type(peft_model).__name__}; "
            "for other models save the state_dict"
        )
    adapter = _adapter_name(model, adapter)
    config = model.peft_config[adapter]
    if not isinstance(config, LoraConfig):
        raise GradkitError(
            f"adapter {adapter!r} is {type(config).__name__}; save_adapter writes LoRA adapters"
        )
    replaced, wanted = _difference_form(model, adapter)
    path = Path(path)
    with atomic_dir(path) as tmp:
        staging = tmp / "peft"
        state = dict(model.state_dict())  # references, no copies
        state.update(replaced)
        export = (
            _export_config(config, wanted, bool(config.use_rslora)) if replaced else copy.deepcopy(config)
        )
        # the file holds the trained factors: loading must run no initialisation of its own (PiSSA's or
        # CorDA's would rewrite the base weights it is loaded onto)
        export.init_lora_weights = True
        for name in ("eva_config", "corda_config"):  # their initialisation's settings, read by nothing now
            if getattr(export, name, None) is not None:
                setattr(export, name, None)
        with _swapped_config(model, adapter, export), stable_config(model):
            model.save_pretrained(str(staging), selected_adapters=[adapter], state_dict=state)
        # PEFT puts a non-default adapter in a subfolder of its own name; the caller asked for `path`
        source = staging if adapter == "default" else staging / adapter
        for item in source.iterdir():
            if item.is_file():
                shutil.move(str(item), tmp / item.name)
        if (staging / "README.md").is_file() and not (tmp / "README.md").exists():
            shutil.move(str(staging / "README.md"), tmp / "README.md")
        shutil.rmtree(staging)
    return path


def save_encoder_adapter(
    adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, prefix: str = "encoder."
) -> Path:
    """Write the part of the PEFT adapter in ``adapter_dir`` that adapts the submodule ``prefix`` (the
    encoder of a model that wraps one), renamed as an adapter of that submodule alone: keys
    ``base_model.model.<prefix>X`` become ``base_model.model.X``, ``modules_to_save`` (the wrapper's
    head) and other keys are left out, and ``target_modules`` lists the adapted layers by name. The encoder then takes it directly: a plain
    ``SentenceTransformer``'s ``load_adapter``, or ``PeftModel.from_pretrained(AutoModel...)``.
    Written under a temporary name and renamed onto ``out_dir``. Returns ``out_dir``."""
    import json

    from safetensors.torch import load_file, save_file

    source, root = Path(adapter_dir), "base_model.model."
    config = json.loads((source / "adapter_config.json").read_text())
    tensors = load_file(str(source / "adapter_model.safetensors"))
    kept = {
        root + key[len(root + prefix) :]: value
        for key, value in tensors.items()
        if key.startswith(root + prefix)
    }
    if not kept:
        raise GradkitError(
            f"{source}: the adapter adapts nothing under {prefix!r}; there is no encoder adapter"
        )
    config["modules_to_save"] = None
    # the adapted layers by their full names: a suffix such as "dense" would also match layers the
    # wrapper never loaded (BERT's pooler), which PEFT would then adapt with fresh weights
    config["target_modules"] = sorted(
        {key[len(root) :].split(".lora_")[0] for key in kept if ".lora_" in key}
    )
    for pattern in ("rank_pattern", "alpha_pattern"):
        if isinstance(config.get(pattern), dict):
            config[pattern] = {
                (k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in config[pattern].items()
            }
    with atomic_dir(Path(out_dir)) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(kept, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return Path(out_dir)
