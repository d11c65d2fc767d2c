"""gradkit.train.faults: SIGTERM is recorded at once even while the main thread is stuck in a call that
does not return (a collective waiting on a rank that died), and turned into an interruption when the
main thread runs again."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gradkit.train.faults import non_finite_warning

STUCK = """
import os, signal, sys, time
from gradkit.train.faults import Terminated, sigterm_as_interrupt

marker, release = sys.argv[1], int(sys.argv[2])
def record():
    with open(marker, "w") as f:
        f.write("recorded")
try:
    with sigterm_as_interrupt(record):
        # only the other threads take SIGTERM now: the main thread stands for one blocked in a C call
        # (a read of a pipe) until the test has seen the record, however slowly a loaded machine
        # schedules either side; the test signals only once the kernel shows this thread in the read,
        # since Python runs its handlers in the main thread whatever its mask while it runs bytecode
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        print("ready", flush=True)
        os.read(release, 1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # delivered now: Terminated
        time.sleep(30)
except Terminated:
    print("terminated", flush=True)
"""


def test_sigterm_is_recorded_while_the_main_thread_is_stuck(tmp_path):
    marker = tmp_path / "recorded"
    release, unblock = os.pipe()
    command = [sys.executable, "-c", STUCK, str(marker), str(release)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, pass_fds=(release,))
    os.close(release)
    try:
        assert proc.stdout.readline().strip() == "ready"
        _wait_until_reading(proc.pid, release, deadline=time.monotonic() + 30)
        proc.terminate()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() and proc.poll() is None  # recorded while the main thread is still stuck
        os.write(unblock, b"x")
        out, _ = proc.communicate(timeout=30)
    finally:
        os.close(unblock)
        if proc.poll() is None:
            proc.kill()
    assert out.strip() == "terminated" and proc.returncode == 0


def _wait_until_reading(pid: int, fd: int, deadline: float) -> None:
    """Wait until the kernel shows process ``pid``'s main thread in a system call on descriptor ``fd``
    (``/proc/PID/syscall``: the call's number, then its arguments, the first being the descriptor)."""
    path = Path(f"/proc/{pid}/syscall")
    while True:
        try:
            fields = path.read_text().split()
        except OSError:
            pytest.skip("no readable /proc/PID/syscall here: the test cannot tell when the child blocks")
        if len(fields) > 1 and fields[0] not in ("running", "-1") and int(fields[1], 16) == fd:
            return
        assert time.monotonic() < deadline, f"the child never blocked reading descriptor {fd}: {fields}"
        time.sleep(0.01)


@pytest.mark.parametrize(
    "summary, flagged",
    [
        ({"test_loss": 0.5}, None),
        ({"test_loss": float("nan")}, "final"),
        ({"test_loss": 0.5, "ema": {"test_loss": float("inf")}}, "EMA"),
        ({"test_loss": 0.5, "best": {"test_loss": float("nan")}}, "best-on-dev"),
        ({}, None),
    ],
)
def test_a_non_finite_test_loss_is_named(summary, flagged):
    warning = non_finite_warning(summary)
    if flagged is None:
        assert warning is None
    else:
        assert warning.startswith("non_finite:") and f"the {flagged} weights" in warning
