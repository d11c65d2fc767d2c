"""How a run ends when something outside it goes wrong: SIGTERM recorded as a stop (like Ctrl-C), a
failed write (a full disk) as one line saying how to go on, and a non-finite test loss flagged rather
than reported as a result. Used by the harness's recipe (:mod:`gradkit.train.loop`)."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler, the launcher ending a job whose other process ended): an
    interruption like Ctrl-C, recorded as ``stopped`` in status.json."""


@contextlib.contextmanager
def sigterm_as_interrupt(on_sigterm: Callable[[], None] | None = None) -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the run goes on (main thread only: Python delivers
    signals there), so that status.json records the stop and how to resume.

    A process blocked in a collective (waiting on a rank that died) runs no Python until the call
    returns, and the launcher kills it a few seconds after its SIGTERM; so ``on_sigterm`` also runs at
    once, in a watcher thread woken through :func:`signal.set_wakeup_fd` (CPython's C-level handler
    writes the signal's number there from whichever thread the signal reaches), to record the stop
    before that."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated("SIGTERM")

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    watcher = threading.Thread(target=_watch, args=(read_fd, on_sigterm), daemon=True)
    watcher.start()
    previous = signal.signal(signal.SIGTERM, terminate)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGTERM, previous)
        os.write(write_fd, _STOP_WATCHING)
        watcher.join()
        os.close(write_fd)
        os.close(read_fd)


_STOP_WATCHING = bytes([0])  # no signal has number 0


def _watch(read_fd: int, on_sigterm: Callable[[], None] | None) -> None:
    """Read signal numbers from the wakeup pipe until told to stop; call ``on_sigterm`` on SIGTERM."""
    while True:
        numbers = os.read(read_fd, 64)
        if int(signal.SIGTERM) in numbers and on_sigterm is not None:
            with contextlib.suppress(Exception):  # recording the stop must never become the error
                on_sigterm()
        if not numbers or 0 in numbers:
            return


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
