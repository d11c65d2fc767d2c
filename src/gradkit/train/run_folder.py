"""The run folder's own files, written by the main process alone (the others' calls do nothing):

- ``config.json``: the settings, with the learning rate used and the number of processes;
- ``labels.json``: the label map (id = label as in the training file; none for a causal LM);
- ``status.json``: ``running``, ``stopped`` (interrupted, or ``stop_after``), ``failed`` (an error: its
  one-line reason) or ``finished``, with the step reached and the step of the checkpoint a resumed
  run starts from;
- ``metrics.jsonl``: one JSON row per logged train step, dev evaluation and head warm-up step;
- ``summary.json`` and ``loss.png`` when the run finishes.

The main process holds a lock on the folder (:func:`~gradkit.files.lock_folder`: ``flock`` on the
folder itself, nothing written) from the moment it is made, or found, to the run's end: a second run
or a ``--resume`` of the same folder is refused while one writes it.

The weights, ``checkpoints/`` (:mod:`gradkit.train.checkpoint`) and ``ema/``, ``best/`` are written
by the method and the checkpoint code into the same folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import IO, Any

from gradkit.data import save_label_map
from gradkit.errors import GradkitError
from gradkit.files import (
    DamagedFile,
    atomic_path,
    clear_folder,
    json_line,
    lock_folder,
    read_json,
    unlock_folder,
    write_json,
)
from gradkit.train.config import TrainConfig
from gradkit.train.plots import plot_losses
from gradkit.train.run_state import RunState

CONFIG = "config.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"


def default_out(method: str) -> Path:
    """``runs/<method>-<time>``, with ``-2``, ``-3``, ... when a run of the same second has it."""
    base = Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class RunFolder:
    """The files of the run folder ``path`` of a run of ``steps`` steps; ``main``: this process writes
    them (the other processes of a data-parallel run hold a RunFolder that writes nothing)."""

    def __init__(self, path: Path, *, steps: int, main: bool = True):
        self.path, self.steps, self.main = path, steps, main
        self._metrics: IO[str] | None = None

    def lock(self, what: str = "--out") -> None:
        """Take the folder's lock when it exists (main process); refused while another run holds it."""
        if self.main and self.path.is_dir():
            lock_folder(self.path, what)

    def unlock(self) -> None:
        """Release the folder's lock (at the end of the run, whatever the end)."""
        if self.main:
            unlock_folder(self.path)

    def create(self, cfg: TrainConfig, lr: float, processes: int, train_data: Any) -> None:
        """Make the folder (cleared first with ``cfg.overwrite``) with ``config.json`` and ``labels.json``,
        under its lock: a run that made the folder meanwhile is not mixed with (its files refuse this one)."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock()
        if cfg.overwrite:
            clear_folder(self.path)
        elif any(self.path.iterdir()):
            raise GradkitError(
                f"--out {self.path}: another run wrote that folder while this one was starting; pass "
                "another folder, or --overwrite to replace it"
            )
        write_json(self.path / CONFIG, {**cfg.to_dict(), "lr": lr, "num_processes": processes})
        if cfg.task != "causal-lm":  # a causal LM has no labels
            save_label_map(train_data, self.path / "labels.json")

    def has_config(self) -> bool:
        """True when the folder holds a ``config.json`` (it is a run folder)."""
        return (self.path / CONFIG).is_file()

    def read_config(self) -> dict[str, Any]:
        """The settings ``config.json`` holds; :class:`GradkitError` naming the file when it is damaged."""
        try:
            saved = read_json(self.path / CONFIG)
            if not isinstance(saved, dict) or "method" not in saved:
                raise DamagedFile(self.path / CONFIG, "does not hold a run's settings")
        except DamagedFile as err:
            raise GradkitError(f"{err}; restore it or start the run again") from None
        return saved

    def read_status(self) -> str | None:
        """The ``status`` of ``status.json``; :class:`GradkitError` naming the file when it is missing or
        damaged (it says whether the run finished)."""
        try:
            saved = read_json(self.path / STATUS)
            if not isinstance(saved, dict) or not isinstance(saved.get("status"), str):
                raise DamagedFile(self.path / STATUS, "does not hold a run's status")
        except DamagedFile as err:
            if (self.path / SUMMARY).is_file():
                raise GradkitError(f"{err}; the run has finished (summary.json): nothing to resume") from None
            raise GradkitError(
                f'{err}; if the run did not finish, write {{"status": "stopped"}} into it and resume again'
            ) from None
        return saved["status"]

    def status(
        self,
        status: str,
        *,
        step: int,
        checkpoint_step: int | None,
        reason: str | None = None,
        warning: str | None = None,
    ) -> None:
        """Replace ``status.json``: ``{"status", "updated": <UTC time>, ["reason",] ["warning",] "step",
        "steps", "checkpoint_step"}`` (``warning``: a finished run whose results are not sound)."""
        if not self.main:
            return
        fields: dict[str, Any] = {"reason": reason} if reason is not None else {}
        if warning is not None:
            fields["warning"] = warning
        fields.update(step=step, steps=self.steps, checkpoint_step=checkpoint_step)
        updated = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(self.path / STATUS, {"status": status, "updated": updated, **fields})

    def open_metrics(self, resumed_at: int | None, warmup_losses: list[float]) -> None:
        """Start ``metrics.jsonl``: a new run writes it afresh, the head warm-up's rows first (apart
        from the method's); a run resumed at step ``resumed_at`` keeps the complete rows up to there
        and appends."""
        if not self.main:
            return
        path = self.path / METRICS
        if resumed_at is not None:
            _keep_rows(path, resumed_at)
        self._metrics = open(path, "a" if resumed_at is not None else "w")  # noqa: SIM115 (open across the loop)
        if resumed_at is None:
            for i, loss in enumerate(warmup_losses, 1):
                self._metrics.write(json_line({"head_warmup_step": i, "loss": loss}) + "\n")

    def write_row(self, row: dict[str, Any]) -> None:
        """Append one row to ``metrics.jsonl`` and flush it (a row is on disk once written)."""
        if self._metrics is not None:
            self._metrics.write(json_line(row) + "\n")
            self._metrics.flush()

    def close_metrics(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def finish(
        self,
        summary: dict[str, Any],
        method: str,
        state: RunState,
        batch_sizes: tuple[list[int], list[int]] | None = None,
    ) -> None:
        """Write ``summary.json`` and ``loss.png`` (the train loss, the dev loss when there was one, and
        ``batch_sizes``, each step's batch, in a panel below when given)."""
        if not self.main:
            return
        write_json(self.path / SUMMARY, summary)
        curve = state.dev_curve
        dev = {method: ([s for s, _ in curve], [v for _, v in curve])} if curve else None
        plot_losses(
            {method: (state.loss_steps, state.losses)},
            self.path / "loss.png",
            title=f"{method}: train loss" + (" and dev loss" if curve else ""),
            dev=dev,
            batch_sizes=batch_sizes,
        )


def _keep_rows(path: Path, last_step: int) -> None:
    """Rewrite metrics.jsonl (atomically) with only its complete rows of steps up to ``last_step``: a
    resumed run appends from there (a row cut short by a hard kill is dropped too)."""
    kept = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if row.get("step", 0 if "head_warmup_step" in row else last_step + 1) <= last_step:
                kept.append(line)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
