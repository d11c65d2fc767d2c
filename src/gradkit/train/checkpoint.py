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

- ``manifest.json``: the step, the SHA-256 of every other file of the folder and of the run's
  ``config.json``; ``checkpoints/latest.json`` names the folder and holds the manifest's own SHA-256.

The data position is the step: the training stream is a fixed function of the seed. The folder is
filled under a temporary name and renamed; then ``checkpoints/latest.json`` is replaced atomically
to point at it, and older checkpoints are removed. A run stopped at any moment therefore leaves
either the previous checkpoint or the new one, never a half-written one; a write that fails (a full
disk) removes the temporary folder and leaves the previous checkpoint as it was. Before a resume
loads anything, :func:`find_checkpoint` checks every checksum, so a damaged file is refused in one
line naming it, never loaded.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.files import DamagedFile, read_json, sha256_file, write_json
from gradkit.fsdp import is_dtensor, local, local_part, reshard

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
MANIFEST = "manifest.json"
RUN_CONFIG = "config.json"  # the run folder's settings, checked against the manifest on resume


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
    Returns its folder. A write that fails (``OSError``: a full disk) removes the temporary folder and
    raises :class:`GradkitError`; the previous checkpoint stays as it was."""
    from safetensors.torch import save_file

    root = out / CHECKPOINTS
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    try:
        if main:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier(accelerator)
        if main:
            whole = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
            save_file(whole, str(tmp / "tensors.safetensors"))
            if best is not None:
                save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
            torch.save(state, tmp / "state.pt")
        own = {"rng": rng_state(), "local": local_state or {}}
        if sharded_state is not None:
            own["sharded"] = sharded_state
        torch.save(own, tmp / f"rng-rank{process_index}.pt")
        _barrier(accelerator)
        if main:
            manifest = _write_manifest(out, tmp, step)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            write_json(root / LATEST, {"step": step, "folder": name, "manifest_sha256": manifest})
    except OSError as err:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        kept = latest_checkpoint(out)
        after = f"resume from {kept.name}" if kept is not None else "start the run again"
        raise GradkitError(
            f"could not write the checkpoint of step {step} in {root}: {err.strerror or err} "
            f"({err.filename or tmp}); free space there (or fix the folder), then {after}"
            + (f" with gradkit finetune --resume {out}" if kept is not None else "")
        ) from err
    except BaseException:  # an interruption (Ctrl-C, SIGTERM) mid-write: no half-written folder left
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if main:
        for old in root.iterdir():
            if old.is_dir() and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier(accelerator)
    return final


def _write_manifest(out: Path, folder: Path, step: int) -> str:
    """Write ``folder/manifest.json`` (the SHA-256 of every file of the checkpoint and of the run's
    config.json); returns the manifest's own SHA-256."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}
    config = out / RUN_CONFIG
    manifest = {
        "step": step,
        "sha256": files,
        "config_sha256": sha256_file(config) if config.is_file() else None,
    }
    write_json(folder / MANIFEST, manifest)
    return sha256_file(folder / MANIFEST)


def latest_checkpoint(out: Path) -> Path | None:
    """The folder ``checkpoints/latest.json`` points at, or None when the run saved none (or the pointer
    is unreadable). Nothing is verified: :func:`find_checkpoint` does that before a resume."""
    try:
        folder = out / CHECKPOINTS / read_json(out / CHECKPOINTS / LATEST)["folder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if folder.is_dir() else None


def verify_checkpoint(folder: Path, manifest_sha256: str | None = None) -> int:
    """Check a checkpoint folder against its ``manifest.json`` (and the manifest against
    ``manifest_sha256``, as ``latest.json`` records it): every file listed is there with its SHA-256,
    and the run's config.json too. Returns the step; raises :class:`~gradkit.files.DamagedFile` naming the first file
    that does not match."""
    manifest_path = folder / MANIFEST
    manifest = read_json(manifest_path)
    if manifest_sha256 is not None and sha256_file(manifest_path) != manifest_sha256:
        raise DamagedFile(manifest_path, f"does not match the checksum {LATEST} records")
    try:
        step, files, config_sha = int(manifest["step"]), dict(manifest["sha256"]), manifest["config_sha256"]
    except (KeyError, TypeError, ValueError):
        raise DamagedFile(
            manifest_path, "lacks the step or the checksums of the checkpoint's files"
        ) from None
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedFile(path, "is missing")
        if path.stat().st_size == 0:
            raise DamagedFile(path, "is empty")
        if sha256_file(path) != digest:
            raise DamagedFile(path, "does not match its checksum in manifest.json (cut short or overwritten)")
    config = folder.parent.parent / RUN_CONFIG
    if config_sha is not None and (not config.is_file() or sha256_file(config) != config_sha):
        raise DamagedFile(config, "is missing or differs from the one this run was checkpointed with")
    return step


def _intact_checkpoints(run: Path, but: Path | None) -> list[Path]:
    """The step folders of ``run`` other than ``but`` whose files all match their manifests, latest first."""
    root = run / CHECKPOINTS
    folders = sorted(root.glob("step-*"), reverse=True) if root.is_dir() else []
    intact = []
    for folder in folders:
        if folder.is_dir() and folder != but:
            try:
                verify_checkpoint(folder)
            except GradkitError:
                continue
            intact.append(folder)
    return intact


def find_checkpoint(run: Path) -> Path:
    """The checkpoint ``run`` resumes from, every checksum verified before anything is loaded. Anything
    missing or damaged raises one :class:`GradkitError` line naming the file and what to do: resume from
    an intact step folder beside it when there is one, else start the run again."""
    pointer = run / CHECKPOINTS / LATEST
    folder = None
    try:
        if not pointer.is_file() and not any((run / CHECKPOINTS).glob("step-*")):
            raise GradkitError(
                f"{run} holds no checkpoint to resume from; it ran without --save-every or stopped before "
                "its first one: start it again"
            )
        latest = read_json(pointer)
        if not isinstance(latest, dict) or not isinstance(latest.get("folder"), str):
            raise DamagedFile(pointer, "does not name a checkpoint folder")
        folder = run / CHECKPOINTS / latest["folder"]
        if folder.parent != run / CHECKPOINTS or not folder.is_dir():
            raise DamagedFile(pointer, f"names {latest['folder']}, which is not a checkpoint folder there")
        step = verify_checkpoint(folder, latest.get("manifest_sha256") or "")
        if step != latest.get("step"):
            raise DamagedFile(pointer, f"says step {latest.get('step')} but {folder.name} holds step {step}")
        return folder
    except DamagedFile as err:
        raise GradkitError(f"--resume {run}: {err}; {_what_to_do(run, folder, err.path)}") from None


def _what_to_do(run: Path, damaged: Path | None, path: Path) -> str:
    """The way on from a damaged checkpoint: an intact step folder beside it, else a new run."""
    if path.name == RUN_CONFIG:
        return f"restore {RUN_CONFIG} or start the run again (gradkit finetune ... --overwrite)"
    others = _intact_checkpoints(run, damaged)
    if others:
        return f"resume from the intact checkpoint {others[0].name}: gradkit finetune --resume {others[0]}"
    return "no intact checkpoint is left: start the run again (gradkit finetune ... --overwrite)"


def load_checkpoint(folder: Path, process_index: int = 0):
    """``(tensors, state, best, local)`` of a checkpoint folder; ``best`` is None without one;
    ``local`` is this process's ``{"rng": ..., "local": ...}``. A file that does not load raises
    :class:`GradkitError` naming it."""
    from safetensors.torch import load_file

    rng_path = folder / f"rng-rank{process_index}.pt"
    if not rng_path.is_file():
        raise GradkitError(
            f"{folder} has no random state for process {process_index}; resume with the number of "
            "processes the run was started with"
        )
    best_path = folder / "best.safetensors"
    path = folder / "tensors.safetensors"
    try:
        tensors = load_file(str(path))
        best = load_file(str(path := best_path)) if best_path.is_file() else None
        state = torch.load(path := folder / "state.pt", weights_only=True)
        local = torch.load(path := rng_path, weights_only=True)
    except Exception as err:  # safetensors, pickle and zip errors alike: the file is not what was saved
        reason = " ".join(str(err).split())[:200]
        raise GradkitError(f"{path} does not load ({reason}); start the run again") from None
    return tensors, state, best, local


def load_method_state(folder: Path, process_index: int = 0) -> dict:
    """The method's own state in a checkpoint (what :meth:`Method.state_dict` returned on this process),
    read alone: a method may need it to shape the model before the tensors are loaded."""
    try:
        return torch.load(folder / f"rng-rank{process_index}.pt", weights_only=True)["local"]
    except Exception as err:
        reason = " ".join(str(err).split())[:200]
        raise GradkitError(f"{folder} has no readable state for process {process_index} ({reason})") from None


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
