"""Files that are whole or absent (write to a temporary name in the same folder, then rename) and strict
JSON. The ground floor: the library and the harness both write through it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError

try:  # POSIX; elsewhere a run folder is not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# folders this process has locked, by resolved path: the open descriptor that holds each lock
_LOCKS: dict[Path, int] = {}


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


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, as 64 hex digits (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def lock_folder(path: str | os.PathLike, what: str) -> None:
    """Hold an exclusive lock on the folder ``path`` itself (``flock`` on the folder's descriptor:
    nothing is written into it) until :func:`unlock_folder` or the process ends, so that two
    processes never write one folder. Locking a folder this process holds already does nothing; one
    that another process holds raises :class:`GradkitError` naming ``what`` (its option)."""
    key = Path(path).resolve()
    if fcntl is None or key in _LOCKS:
        return
    fd = os.open(key, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return  # a file system without flock (some network mounts): the folder goes unlocked
        raise GradkitError(
            f"{what} {path}: another gradkit run is writing that folder now; wait for it to end "
            "(or stop it), or pass another folder"
        ) from None
    _LOCKS[key] = fd


def unlock_folder(path: str | os.PathLike) -> None:
    """Release the lock :func:`lock_folder` took (nothing when this process holds none)."""
    fd = _LOCKS.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the last descriptor of the lock releases it


class DamagedFile(GradkitError):
    """A file that is missing or not what was written there: ``path`` and ``problem``."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path} {problem}")
        self.path, self.problem = path, problem


def read_json(path: str | os.PathLike) -> Any:
    """The JSON in ``path``; :class:`DamagedFile` when it is missing, empty or not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise DamagedFile(path, "is missing")
    data = path.read_bytes()
    if not data.strip():
        raise DamagedFile(path, "is empty")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        first = str(err).splitlines()[0]
        raise DamagedFile(path, f"is not valid JSON ({first}: cut short or overwritten?)") from None
