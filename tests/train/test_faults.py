"""gradkit.train.faults: SIGTERM is recorded at once even while the main thread is stuck in a call that
does not return (a collective waiting on a rank that died), and turned into an interruption when the
main thread runs again."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from gradkit.train.faults import non_finite_warning

STUCK = """
import os, signal, sys, time
from gradkit.train.faults import Terminated, sigterm_as_interrupt

marker, release = sys.argv[1], sys.argv[2]
def record():
    with open(marker, "w") as f:
        f.write("recorded")
try:
    with sigterm_as_interrupt(record):
        # only the other threads take SIGTERM now: the main thread stands for one blocked in a C call
        # (opening and reading a named pipe) until the test has seen the record, however slowly a
        # loaded machine schedules either side; a named pipe, not an inherited descriptor, so that
        # nothing the test process closes can release it early
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        print("ready", flush=True)
        os.read(os.open(release, os.O_RDONLY), 1)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # delivered now: Terminated
        time.sleep(30)
except Terminated:
    print("terminated", flush=True)
"""


def test_sigterm_is_recorded_while_the_main_thread_is_stuck(tmp_path):
    marker, release = tmp_path / "recorded", tmp_path / "release"
    os.mkfifo(release)
    command = [sys.executable, "-c", STUCK, str(marker), str(release)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.terminate()
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists() and proc.poll() is None  # recorded while the main thread is still stuck
        _write_once_read(release, deadline=time.monotonic() + 30)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.strip() == "terminated" and proc.returncode == 0


def _write_once_read(fifo, deadline):
    """Write one byte into ``fifo`` as soon as a reader holds it open (ENXIO until then)."""
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as err:
            if err.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


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
