"""Checkpoints that resume a run bit for bit.

A checkpoint is a folder ``checkpoints/step-NNNNNNN/`` holding

- ``tensors.safetensors``: what the method trains and anything its preparation changed
  (:meth:`~gradkit.train.methods.Method.checkpoint_tensors`: LoRA factors and head, every weight for
  full fine-tuning, LoRA-GA's offset base weights and its initial factors); ``best.safetensors``, the
  same tensors at the best dev score (``--keep-best``);
- ``state.pt``: the step, the losses so far, the optimiser (LoRA-Pro's moments, ZerothOrder's
  generator and step count), the scheduler, the EMA, the method's own state and the loop's;
- ``rng-rank{r}.pt``: each process's torch, CUDA, Python and NumPy random states and the method's
  per-process state (policy gradient's sampling generator); under ``--fsdp`` also the process's shards
  of the optimiser and EMA state (``sharded``: :mod:`gradkit.train.sharding`), which ``state.pt`` then
  leaves out. ``tensors.safetensors`` holds whole tensors either way (gathered under ``--fsdp``).

The data position is the step: the training stream is a fixed function of the seed. The folder is
filled under a temporary name and renamed; then ``checkpoints/latest.json`` is replaced atomically
to point at it, and older checkpoints are removed. A run stopped at any moment therefore leaves
either the previous checkpoint or the new one, never a half-written one.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.files import write_json
from gradkit.fsdp import is_dtensor, local, local_part, reshard

CHECKPOINTS = "checkpoints"


def rng_state() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, Python, NumPy) as plain tensors and lists."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _python_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype("int64")),
            int(pos),
            int(has_gauss),
            float(gauss),
        ]
    except ImportError:
        pass
    return state


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


def _barrier(accelerator: Any) -> None:
    if accelerator is not None:
        accelerator.wait_for_everyone()


def save_checkpoint(
    out: Path,
    step: int,
    *,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
    local_state: dict[str, Any] | None = None,
    sharded_state: dict[str, Any] | None = None,
    accelerator: Any = None,
    process_index: int = 0,
    main: bool = True,
) -> Path:
    """Write the checkpoint of ``step`` (every process calls this; the main one writes the shared files,
    each its random state and ``sharded_state``), point ``latest.json`` at it and remove older ones.
    Returns its folder."""
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier(accelerator)
    if main:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors")
        )
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save(state, tmp / "state.pt")
    own = {"rng": rng_state(), "local": local_state or {}}
    if sharded_state is not None:
        own["sharded"] = sharded_state
    torch.save(own, tmp / f"rng-rank{process_index}.pt")
    _barrier(accelerator)
    if main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        write_json(root / "latest.json", {"step": step, "folder": name})
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``checkpoints/latest.json`` points at, or None when the run saved none."""
    pointer = out / CHECKPOINTS / "latest.json"
    if not pointer.is_file():
        return None
    folder = out / CHECKPOINTS / json.loads(pointer.read_text())["folder"]
    return folder if (folder / "state.pt").is_file() else None


def load_checkpoint(folder: Path, process_index: int = 0):
    """``(tensors, state, best, local)`` of a checkpoint folder; ``best`` is None without one;
    ``local`` is this process's ``{"rng": ..., "local": ...}``."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "tensors.safetensors"))
    best_path = folder / "best.safetensors"
    best = load_file(str(best_path)) if best_path.is_file() else None
    state = torch.load(folder / "state.pt", weights_only=True)
    rng_path = folder / f"rng-rank{process_index}.pt"
    if not rng_path.is_file():
        raise GradkitError(
            f"{folder} has no random state for process {process_index}; resume with the number of "
            "processes the run was started with"
        )
    local = torch.load(rng_path, weights_only=True)
    return tensors, state, best, local


def load_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy checkpoint tensors into the model's parameters and buffers of the same names (exact). A
    parameter sharded by FSDP2 takes this rank's rows of a whole tensor (or a DTensor laid out like it),
    and the model is resharded so that its next forward gathers the new values."""
    reshard(model)  # after a forward alone FSDP2 leaves the root's unsharded parameters registered
    own = dict(model.named_parameters())
    own.update(model.named_buffers())
    missing = [name for name in tensors if name not in own]
    if missing:
        raise GradkitError(
            f"the checkpoint holds {missing[0]} ({len(missing)} tensors in all) that the model lacks; "
            "resume with the model and method the run was started with"
        )
    with torch.no_grad():
        for name, value in tensors.items():
            target = own[name]
            if is_dtensor(target) and not is_dtensor(value):
                local(target).copy_(local_part(value.to(target.device), target))
            else:
                target.copy_(value)
    reshard(model)
