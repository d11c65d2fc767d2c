"""How a run ends when something outside it goes wrong: SIGTERM recorded as a stop (like Ctrl-C), a
failed write (a full disk) as one line saying how to go on, and a non-finite test loss flagged rather
than reported as a result. Used by the harness's recipe (:mod:`gradkit.train.loop`)."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, the launcher ending a job whose other process ended): an
    interruption like Ctrl-C, recorded as ``stopped`` in status.json."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the run goes on (main thread only: Python delivers
    signals there), so that status.json records the stop and how to resume."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def non_finite_warning(summary: dict[str, Any]) -> str | None:
    """A line saying which weights' test loss is not finite (NaN or inf: their test metrics are no
    result), or None when every test loss is finite (or there is no test set)."""
    losses = {
        "final": summary.get("test_loss"),
        "EMA": summary.get("ema", {}).get("test_loss"),
        "best-on-dev": summary.get("best", {}).get("test_loss"),
    }
    broken = [name for name, v in losses.items() if isinstance(v, float) and not math.isfinite(v)]
    if not broken:
        return None
    return (
        f"non_finite: the test loss of the {', '.join(broken)} weights is not finite, so their test "
        "metrics are not a result; lower --lr (or check the data) and run again"
    )


def disk_error(err: OSError, out: Path, last: int | None) -> GradkitError:
    """One line for a write that failed (a full disk): the file, the reason, and how to go on."""
    then = (
        f"free space, then continue from step {last} with gradkit finetune --resume {out}"
        if last is not None
        else "free space, then start the run again"
    )
    return GradkitError(f"could not write {err.filename or out}: {err.strerror or err}; {then}")
