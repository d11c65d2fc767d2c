"""Files that are whole or absent (write to a temporary name in the same folder, then rename) and strict
JSON. The ground floor: the library and the harness both write through it."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``, else delete it.
    The file gets the permissions of a plain ``open``: 0o666 less the user's umask (a temporary file
    is created owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path` for a folder: fill the yielded folder, then it replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def clear_folder(path: Path) -> None:
    """Remove everything inside ``path`` (``--overwrite``), keeping the folder itself."""
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def json_safe(data: Any) -> Any:
    """``data`` with every non-finite float replaced by ``None`` (strict JSON has no NaN or Infinity;
    many parsers reject Python's bare ``NaN``). In a dict the key also gets a sibling
    ``<key>_not_finite`` saying which value it was (``"nan"``, ``"inf"`` or ``"-inf"``)."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        out: dict[Any, Any] = {}
        for key, value in data.items():
            out[key] = json_safe(value)
            if isinstance(value, float) and not math.isfinite(value):
                out[f"{key}_not_finite"] = repr(value)
        return out
    if isinstance(data, (list, tuple)):
        return [json_safe(value) for value in data]
    return data


def json_line(data: Any) -> str:
    """One strict-JSON line (non-finite floats as in :func:`json_safe`)."""
    return json.dumps(json_safe(data), allow_nan=False)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as strict JSON (non-finite floats as in :func:`json_safe`), atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, sort_keys=False, allow_nan=False) + "\n")
