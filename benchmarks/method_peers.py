"""method_peers: each gradkit method beside what a practitioner would pick instead, in the same harness,
on the same data, each at its own best learning rate.

Every run is ``gradkit finetune`` on all-MiniLM-L6-v2, batch 16, one torch thread, two runs at a time on
the 2 cores. Each row's lr is chosen on seed 0 by the final dev metric (10% of the training file carved
off; the GLUE dev set is the test set and chooses nothing; a tie goes to the lower dev loss) from a
factor-2 grid, extended while the best sits at an edge (at most ``MAX_EXTENSIONS`` times, said in the
notes when that cap is what stopped it); seeds 1 and 2 then run at that lr.

- ``sst2-r8``: SST-2 from the label-text head ("It was terrible." / "It was great.") with a 50-step head
  warm-up, then 100 steps of the method; LoRA rank 8 on every encoder Linear. The peers of LoRA-GA
  (PEFT's PiSSA, OLoRA, EVA, CorDA and LoRA-GA), of LoRA-Pro (LoRA-RITE, LoRA+), of the weight EMA
  (Schedule-Free AdamW) and of spectral steepest descent (torch.optim.Muon), beside LoRA and full
  fine-tuning. The EMA row reads the LoRA runs' averaged weights (decay ``EMA_DECAY``; the average
  never changes training) and chooses its lr by the average's own dev score.
- ``stsb-bi-r1``: STS-B as the model's users train pairs (a bi-encoder scored by cos(u, v)), from its
  zero-shot start, LoRA rank 1 on query and value, 150 steps: LoRA-Pro beside LoRA-RITE and LoRA+,
  and LoRA with spectral steepest descent or Muon beside LoRA with AdamW.
- ``sst2-r1`` and ``stsb-bi-r8``: the other rank of each task, LoRA-Pro's family at rank 1 on query and
  value on SST-2 and LoRA-GA's at rank 8 on STS-B. Full fine-tuning takes no rank: these settings read
  it from ``sst2-r8`` and from pair_regimes' committed runs of the same options (as ``stsb-bi-r1`` does).

The rows run in the order of ``ROWS`` (the goals' comparisons first); rows after "when time allows" may
be missing from a result. Where a row's seed sd exceeds a tenth of its mean gap to full fine-tuning,
``--more-seeds`` adds seeds 3 and 4, and the table says where that was asked and not run. ``--timing``
then times each row's best lr alone (``TIMING_STEPS`` steps, one run at a time, nothing else running).

    python -m benchmarks.method_peers                  # every row, 3 seeds (finished runs are reused)
    python -m benchmarks.method_peers --more-seeds --timing   # then the seed rule, then s/step alone
    python -m benchmarks.method_peers --report-only    # rewrite the result from finished runs
    python -m benchmarks.method_peers --more-seeds --only "stsb-bi-r1/LoRA-Pro,stsb-bi-r1/LoRA-RITE"
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT, mean_and_sd, write_result
from benchmarks.method_regimes import COMMON, DATA, RUNS, SST2_LABELS, finetune, rows_of

SEEDS = (0, 1, 2)
MORE_SEEDS = (3, 4)  # where a row's seed sd exceeds a tenth of its mean gap to full fine-tuning
MAX_EXTENSIONS = 4
EMA_DECAY = 0.95  # a horizon of about 20 steps, for runs of 100 and 150 steps
TIMING_STEPS = 30  # s/step alone: the method's own steps, one run at a time
# the goal on STS-B rank 1 is met by a margin beyond 2 seed-sd, or by the guide saying which to use there
PAIRS_ADVICE = "Use LoRA-Pro for low-rank pairs."
STSB = ["--train", f"{DATA}/stsb/train.tsv", "--test", f"{DATA}/stsb/dev.tsv", "--task", "regression"]
RANK1 = ["--rank", "1", "--targets", "query,value"]
SETTINGS = {
    "sst2-r8": {
        "short": "SST-2 (accuracy %), LoRA rank 8",
        "title": "SST-2 (accuracy), label-text head + 50-step head warm-up, 100 steps, LoRA rank 8 on every Linear",
        "options": [*COMMON, *SST2_LABELS, "--head-warmup", "50", "--steps", "100"],
    },
    "stsb-bi-r1": {
        "short": "STS-B bi-encoder (Pearson), LoRA rank 1 on q, v",
        "title": "STS-B (Pearson), bi-encoder from its zero-shot start, 150 steps, LoRA rank 1 on query and value",
        "options": [
            *COMMON,
            *STSB,
            *["--pair-encoding", "bi", "--steps", "150", *RANK1],
        ],
    },
    "sst2-r1": {
        "short": "SST-2 (accuracy %), LoRA rank 1 on q, v",
        "title": "SST-2 (accuracy), label-text head + 50-step head warm-up, 100 steps, LoRA rank 1 on query and value",
        "options": [*COMMON, *SST2_LABELS, "--head-warmup", "50", "--steps", "100", *RANK1],
    },
    "stsb-bi-r8": {
        "short": "STS-B bi-encoder (Pearson), LoRA rank 8",
        "title": "STS-B (Pearson), bi-encoder from its zero-shot start, 150 steps, LoRA rank 8 on every Linear",
        "options": [*COMMON, *STSB, "--pair-encoding", "bi", "--steps", "150"],
    },
}


def folder_name(label: str) -> str:
    """A row label as a folder name: "LoRA + Muon" -> "LoRA+Muon", "PEFT LoRA-GA" -> "PEFT-LoRA-GA"."""
    return label.replace(" + ", "+").replace(" ", "-")


@dataclass(frozen=True)
class Row:
    """One row of the guide: ``method`` with ``options`` in ``setting`` over the lr ``grid``; ``peer_of``
    names the gradkit method it stands beside; ``ema``: read the runs' weight average instead."""

    setting: str
    label: str
    method: str
    options: tuple[str, ...]
    grid: tuple[float, ...]
    peer_of: str = ""
    ema: bool = False

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.label}"

    @property
    def folder(self) -> str:
        """Runs are shared by rows that differ only in what they read (LoRA and its EMA)."""
        return folder_name(self.label.removesuffix(" + EMA"))


def optimizer(name: str) -> tuple[str, ...]:
    return ("--optimizer", name)


EMA = ("--ema", str(EMA_DECAY))
# in the order they run: the rows the goals compare first
ROWS = [
    Row("sst2-r8", "LoRA", "lora", EMA, (5e-4, 1e-3, 2e-3)),
    Row("sst2-r8", "LoRA + EMA", "lora", EMA, (5e-4, 1e-3, 2e-3), peer_of="LoRA + Schedule-Free", ema=True),
    Row("stsb-bi-r1", "LoRA", "lora", (), (2e-3, 4e-3, 8e-3)),
    Row("stsb-bi-r1", "LoRA-Pro", "lora-pro", (), (1.28e-2, 2.56e-2, 5.12e-2)),
    Row("stsb-bi-r1", "LoRA-RITE", "lora-rite", (), (1e-3, 2e-3, 4e-3), peer_of="LoRA-Pro"),
    Row("stsb-bi-r1", "LoRA + spectral", "lora", optimizer("steepest-spectral"), (1e-3, 2e-3, 4e-3)),
    Row("sst2-r8", "LoRA + spectral", "lora", optimizer("steepest-spectral"), (5e-4, 1e-3, 2e-3)),
    Row("sst2-r8", "LoRA-GA", "lora-ga", (), (5e-5, 1e-4, 2e-4)),
    Row("sst2-r8", "PiSSA", "pissa", (), (1.25e-4, 2.5e-4, 5e-4), peer_of="LoRA-GA"),
    Row("sst2-r8", "EVA", "eva", (), (5e-4, 1e-3, 2e-3), peer_of="LoRA-GA"),
    Row("sst2-r8", "CorDA", "corda", (), (1.25e-4, 2.5e-4, 5e-4), peer_of="LoRA-GA"),
    Row("sst2-r8", "PEFT LoRA-GA", "peft-lora-ga", (), (5e-5, 1e-4, 2e-4), peer_of="LoRA-GA"),
    Row("sst2-r8", "LoRA-Pro", "lora-pro", (), (5e-4, 1e-3, 2e-3)),
    Row("sst2-r8", "LoRA-RITE", "lora-rite", (), (5e-4, 1e-3, 2e-3), peer_of="LoRA-Pro"),
    Row("sst2-r8", "LoRA + Schedule-Free", "lora", optimizer("schedule-free"), (1e-3, 2e-3, 4e-3)),
    Row("sst2-r8", "LoRA + Muon", "lora", optimizer("muon"), (5e-4, 1e-3, 2e-3), peer_of="LoRA + spectral"),
    Row("sst2-r8", "LoRA+", "lora-plus", (), (2.5e-4, 5e-4, 1e-3), peer_of="LoRA-Pro"),
    Row("sst2-r8", "full fine-tuning", "full", (), (2.5e-5, 5e-5, 1e-4)),
    # the other rank of each task: LoRA-Pro's family at rank 1 on SST-2, LoRA-GA's at rank 8 on STS-B
    Row("sst2-r1", "LoRA", "lora", (), (1e-3, 2e-3, 4e-3)),
    Row("sst2-r1", "LoRA-Pro", "lora-pro", (), (4e-3, 8e-3, 1.6e-2)),
    Row("sst2-r1", "LoRA-RITE", "lora-rite", (), (1e-3, 2e-3, 4e-3), peer_of="LoRA-Pro"),
    Row("sst2-r1", "LoRA + spectral", "lora", optimizer("steepest-spectral"), (1e-3, 2e-3, 4e-3)),
    Row("stsb-bi-r8", "LoRA", "lora", (), (5e-4, 1e-3, 2e-3)),
    Row("stsb-bi-r8", "LoRA-GA", "lora-ga", (), (5e-5, 1e-4, 2e-4)),
    Row("stsb-bi-r8", "PiSSA", "pissa", (), (1.25e-4, 2.5e-4, 5e-4), peer_of="LoRA-GA"),
    Row("stsb-bi-r8", "EVA", "eva", (), (5e-4, 1e-3, 2e-3), peer_of="LoRA-GA"),
    # when time allows
    Row("sst2-r8", "OLoRA", "olora", (), (1.25e-4, 2.5e-4, 5e-4), peer_of="LoRA-GA"),
    Row("stsb-bi-r8", "CorDA", "corda", (), (1.25e-4, 2.5e-4, 5e-4), peer_of="LoRA-GA"),
    Row("stsb-bi-r8", "PEFT LoRA-GA", "peft-lora-ga", (), (5e-5, 1e-4, 2e-4), peer_of="LoRA-GA"),
    Row("sst2-r1", "LoRA+", "lora-plus", (), (5e-4, 1e-3, 2e-3), peer_of="LoRA-Pro"),
    Row("sst2-r1", "LoRA + Muon", "lora", optimizer("muon"), (1e-3, 2e-3, 4e-3), peer_of="LoRA + spectral"),
    Row(
        "stsb-bi-r1", "LoRA + Muon", "lora", optimizer("muon"), (1e-3, 2e-3, 4e-3), peer_of="LoRA + spectral"
    ),
    Row("stsb-bi-r1", "LoRA+", "lora-plus", (), (5e-4, 1e-3, 2e-3), peer_of="LoRA-Pro"),
]
# where a setting's full fine-tuning is read when it has no row of its own: runs of the same options (full
# fine-tuning takes no rank) in another benchmark's committed result, or in another setting here
FULL_ELSEWHERE = {
    "stsb-bi-r1": ("pair_regimes", "bi/stsb-bi/full"),
    "stsb-bi-r8": ("pair_regimes", "bi/stsb-bi/full"),
    "sst2-r1": ("method_peers", "sst2-r8/full fine-tuning"),
}


def run_dir(row: Row, lr: float, seed: int) -> Path:
    return RUNS / "peers" / row.setting / row.folder / f"lr{lr:g}-seed{seed}"


def arguments(row: Row, lr: float, seed: int) -> list[str]:
    options = SETTINGS[row.setting]["options"]
    return [*options, "--method", row.method, *row.options, "--lr", f"{lr:g}", "--seed", str(seed)]


def timing_dir(row: Row) -> Path:
    return RUNS / "peers" / "timing" / row.setting / folder_name(row.label)


def timing_arguments(row: Row, lr: float) -> list[str]:
    """The row's seed-0 run at ``lr`` cut to the method's own steps: ``TIMING_STEPS`` of them, with no
    head warm-up, no dev set, and no weight average unless the row reads one."""
    args = arguments(row, lr, SEEDS[0])
    flags, values = args[::2], args[1::2]
    assert all(flag.startswith("--") for flag in flags), args
    dropped = {"--head-warmup", "--dev-fraction"} | (set() if row.ema else {"--ema"})
    timed = {"--steps": str(TIMING_STEPS)}
    pairs = [
        (flag, timed.get(flag, value))
        for flag, value in zip(flags, values, strict=True)
        if flag not in dropped
    ]
    return [item for pair in pairs for item in pair]


def time_alone(measured: dict[str, dict[str, Any]], report_only: bool) -> None:
    """Each measured row's ``alone``: seconds per step of :func:`timing_arguments` at its best lr, the
    runs one at a time (read where finished; with ``report_only`` nothing runs)."""
    for m in measured.values():
        summary = finetune(timing_arguments(m["row"], m["lr"]), timing_dir(m["row"]), report_only)
        if summary is not None:
            m["alone"] = summary["seconds_per_step"]


def read(row: Row, lr: float, seed: int) -> dict[str, Any]:
    """A finished run as the row reads it: the final dev metric and loss, the test metric, the cost."""
    out = run_dir(row, lr, seed)
    summary = json.loads((out / "summary.json").read_text())
    metric, prefix = summary["metric"], "dev_ema" if row.ema else "dev"
    last_dev = rows_of(out)[1][-1]
    tested = summary["ema"] if row.ema else summary
    return {
        "dev": last_dev[f"{prefix}_{metric}"],
        "dev_loss": last_dev[f"{prefix}_loss"],
        "test": tested[f"test_{metric}"],
        "metric": metric,
        "step0": summary.get("step0", {}).get(f"test_{metric}"),
        "seconds_per_step": summary["seconds_per_step"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "trainable": summary["trainable_parameters"],
        "optimizer_state_bytes": summary["optimizer_state_bytes"],
    }


def tune(
    row: Row, pool: ThreadPoolExecutor, report_only: bool, seeds: tuple[int, ...] = SEEDS
) -> dict[str, Any] | None:
    """The row's seed-0 sweep (extended while the best is at an edge), then its other ``seeds`` at the
    best lr; None when a run is missing and ``report_only``."""

    def runs(lrs_seeds: list[tuple[float, int]]) -> bool:
        pending: list[Future] = []
        for lr, seed in lrs_seeds:
            args, out = arguments(row, lr, seed), run_dir(row, lr, seed)
            if finetune(args, out, report_only=True) is None:  # a finished run is reused at once
                if report_only:
                    return False
                pending.append(pool.submit(finetune, args, out, False))
        for future in pending:
            future.result()
        return True

    grid, extensions = list(row.grid), 0
    while True:
        if not runs([(lr, SEEDS[0]) for lr in grid]):
            return None
        sweep = {lr: read(row, lr, SEEDS[0]) for lr in grid}
        best = max(grid, key=lambda lr: (sweep[lr]["dev"], -sweep[lr]["dev_loss"]))
        if best not in (grid[0], grid[-1]) or extensions == MAX_EXTENSIONS:
            break
        grid = [grid[0] / 2, *grid] if best == grid[0] else [*grid, grid[-1] * 2]
        extensions += 1
    if not runs([(best, seed) for seed in seeds[1:]]):
        return None
    return {
        "sweep": {f"{lr:g}": sweep[lr]["dev"] for lr in grid},
        "lr": best,
        "edge": best in (grid[0], grid[-1]),
        "seeds": {seed: read(row, best, seed) for seed in seeds},
    }


def shown(metric: str, mean: float, sd: float) -> str:
    scale, digits = (100, 2) if metric == "accuracy" else (1, 4)
    return f"{mean * scale:.{digits}f} ± {sd * scale:.{digits}f}"


def asks_more_seeds(measured: dict[str, dict[str, Any]], key: str) -> bool:
    """The seed rule: 5 seeds where the seed sd exceeds a tenth of the mean gap to full fine-tuning."""
    row, (mean, sd) = measured[key]["row"], test_scores(measured, key)
    full = full_scores(measured, row.setting)
    return full is not None and row.method != "full" and sd > 0.1 * abs(full[0] - mean)


def measure_all(
    report_only: bool, jobs: int, more_seeds: bool, only: frozenset[str] = frozenset()
) -> dict[str, dict[str, Any]]:
    """Every row of ``ROWS`` that is (or, unless ``report_only``, can be) measured, by key; with
    ``more_seeds``, seeds 3 and 4 too where :func:`asks_more_seeds` (finished ones are always read);
    with ``only``, just those rows run and the rest are read where finished.
    Rows sharing runs (LoRA and its EMA) are measured one after the other; up to three chains at a time
    keep the ``jobs`` workers busy while a chain waits on its last run."""
    chains: dict[tuple[str, str], list[Row]] = {}
    for row in ROWS:
        chains.setdefault((row.setting, row.folder), []).append(row)

    def measured_chains(rows_of_chains, seeds: tuple[int, ...], only_read: bool) -> dict[str, dict]:
        def chain(rows: list[Row]) -> list[tuple[Row, dict | None]]:
            return [
                (row, tune(row, pool, only_read or bool(only and row.key not in only), seeds)) for row in rows
            ]

        done = [coordinators.submit(chain, rows) for rows in rows_of_chains if rows]
        return {row.key: {"row": row, **m} for future in done for row, m in future.result() if m}

    with ThreadPoolExecutor(jobs) as pool, ThreadPoolExecutor(3) as coordinators:
        measured = measured_chains(chains.values(), SEEDS, report_only)
        asked = {key for key in measured if asks_more_seeds(measured, key)}
        more = [[row for row in rows if row.key in asked] for rows in chains.values()]
        measured.update(measured_chains(more, SEEDS + MORE_SEEDS, report_only or not more_seeds))
    for key in asked:
        measured[key]["asked_more_seeds"] = True
    return measured


def table(setting: str, measured: dict[str, dict[str, Any]]) -> dict:
    rows = []
    for key, m in measured.items():
        if not key.startswith(f"{setting}/"):
            continue
        row, runs = m["row"], list(m["seeds"].values())
        rows.append(
            cells(
                (row.label, row.peer_of or "-"),
                m["sweep"],
                f"{m['lr']:g}" + (" (edge)" if m["edge"] else ""),
                runs,
                seed_count(len(runs), m.get("asked_more_seeds", False)),
                m.get("alone"),
            )
        )
    return {
        "caption": SETTINGS[setting]["title"] + ": test metric, mean ± sd over the seeds at the best dev lr "
        "(5 asked: the seed sd exceeds a tenth of the mean gap to full fine-tuning).",
        "columns": [
            "method",
            "beside",
            "seed-0 dev by lr",
            "best lr",
            "test (mean ± sd)",
            "seeds",
            "s/step, 2 at a time",
            "s/step alone",
            "peak MB",
            "trainable",
            "optimizer state MiB",
        ],
        "rows": rows + quoted_full(measured, setting),
    }


def seed_count(seeds: int, asked: bool) -> str:
    if not asked:
        return str(seeds)
    return f"{seeds} (5 asked)" if seeds == 5 else f"{seeds} (5 asked; not run)"


def quoted_full(measured: dict[str, dict[str, Any]], setting: str) -> list[list[str]]:
    """The table row of ``setting``'s full fine-tuning read from elsewhere (:func:`full_elsewhere`)."""
    quoted = full_elsewhere(measured, setting)
    if quoted is None:
        return []
    label = f"full fine-tuning ({quoted['source']}, the same options)"
    runs = quoted["runs"]
    sweep = {f"{float(lr):g}": v for lr, v in quoted["scores"].items()}
    return [cells((label, "-"), sweep, f"{quoted['lr']:g}", runs, str(len(runs)), quoted["alone"])]


def cells(
    names: tuple[str, str],
    sweep: dict[str, float],
    lr: str,
    runs: list[dict],
    seeds: str,
    alone: float | None,
) -> list[str]:
    """One row of a setting's table: method and the method it stands beside, the seed-0 dev metric by
    lr, the chosen lr, the test metric's mean ± sd, the seeds, s/step (the runs', two at a time, and
    ``alone``, one at a time) and the cost of the first seed's run."""
    first = runs[0]
    return [
        *names,
        ", ".join(f"{lr_}: {v:.4f}" for lr_, v in sweep.items()),
        lr,
        shown(first["metric"], *mean_and_sd([r["test"] for r in runs])),
        seeds,
        f"{statistics.fmean(r['seconds_per_step'] for r in runs):.2f}",
        seconds(alone),
        f"{first['peak_memory_mb']:.0f}",
        f"{first['trainable']:,}",
        f"{first['optimizer_state_bytes'] / 2**20:.2f}",
    ]


def seconds(per_step: float | None) -> str:
    return "-" if per_step is None else f"{per_step:.2f}"


def test_scores(measured: dict[str, dict[str, Any]], key: str) -> tuple[float, float] | None:
    if key not in measured:
        return None
    return mean_and_sd([s["test"] for s in measured[key]["seeds"].values()])


def full_elsewhere(measured: dict[str, dict[str, Any]], setting: str) -> dict[str, Any] | None:
    """``setting``'s full fine-tuning from ``FULL_ELSEWHERE`` when it has no row of its own: its source,
    lr, metric, seed-0 dev scores by lr and runs (each with ``test`` and the cost fields); else None."""
    if f"{setting}/full fine-tuning" in measured or setting not in FULL_ELSEWHERE:
        return None
    name, key = FULL_ELSEWHERE[setting]
    if name == "method_peers":
        if key not in measured:
            return None
        m = measured[key]
        runs = list(m["seeds"].values())
        return {
            "source": key.split("/")[0],
            "lr": m["lr"],
            "metric": runs[0]["metric"],
            "scores": m["sweep"],
            "runs": runs,
            "alone": m.get("alone"),
        }
    quoted = json.loads((RESULTS / f"{name}.json").read_text())["raw"]["runs"][key]
    runs = [{**r, "metric": quoted["metric"]} for r in quoted["runs"].values()]
    return {
        "source": name,
        "lr": quoted["lr"],
        "metric": quoted["metric"],
        "scores": quoted["scores"],
        "runs": runs,
        "alone": None,
    }


def full_scores(measured: dict[str, dict[str, Any]], setting: str) -> tuple[float, float] | None:
    """Full fine-tuning's test mean and sd in ``setting`` (its own row, else :func:`full_elsewhere`)."""
    here = test_scores(measured, f"{setting}/full fine-tuning")
    if here is not None or (quoted := full_elsewhere(measured, setting)) is None:
        return here
    return mean_and_sd([r["test"] for r in quoted["runs"]])


def versus(measured: dict, setting: str, first: str, second: str) -> tuple[str, bool | None]:
    """``first`` against ``second``: their means ± sd, the difference, 2 x the larger sd, and whether
    ``first`` is ahead by more than that (None when either row is missing)."""
    a, b = test_scores(measured, f"{setting}/{first}"), test_scores(measured, f"{setting}/{second}")
    if a is None or b is None:
        return f"{setting}: not measured", None
    margin = 2 * max(a[1], b[1])
    text = (
        f"{setting}: {first} {a[0]:.4f} ± {a[1]:.4f}, {second} {b[0]:.4f} ± {b[1]:.4f}, "
        f"difference {a[0] - b[0]:+.4f} against 2 sd = {margin:.4f}"
    )
    return text, a[0] - b[0] > margin


PEERS = {
    "LoRA-GA": (
        "PiSSA",
        "EVA",
        "CorDA",
        "PEFT LoRA-GA",
    ),  # the goal names these four (OLoRA is a row when time allows)
    "LoRA-Pro": ("LoRA-RITE", "LoRA+"),
    "LoRA + EMA": ("LoRA + Schedule-Free",),
    "LoRA + spectral": ("LoRA + Muon",),
}


def goals(measured: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The goals, each met or not with the numbers (the step cost is optimizer_step_cost's)."""
    present = {
        method: [p for p in peers if f"sst2-r8/{p}" in measured]
        for method, peers in PEERS.items()
        if f"sst2-r8/{method}" in measured
    }
    every = all(len(present.get(m, ())) == len(p) for m, p in PEERS.items())
    bi, bi_met = versus(measured, "stsb-bi-r1", "LoRA-Pro", "LoRA-RITE")
    cross = json.loads((RESULTS / "peers_stsb.json").read_text())["goals"][0]
    advised = PAIRS_ADVICE in (ROOT / "README.md").read_text()
    spectral = [versus(measured, s, "LoRA", "LoRA + spectral") for s in ("sst2-r8", "sst2-r1", "stsb-bi-r1")]
    cost = json.loads((RESULTS / "optimizer_step_cost.json").read_text())["goals"][0]
    return [
        {
            "goal": "every gradkit method appears beside its nearest peer (SST-2, rank 8)",
            "target": "; ".join(f"{m} beside {', '.join(p)}" for m, p in PEERS.items()),
            "measured": "; ".join(f"{m} beside {', '.join(p) or 'none'}" for m, p in present.items()),
            "met": every,
        },
        {
            "goal": "LoRA-Pro >= LoRA-RITE on STS-B at rank 1 by more than 2 seed-sd, in each formulation, "
            "or the guide says plainly which to use there",
            "target": "mean(LoRA-Pro) - mean(LoRA-RITE) > 2 x the larger seed sd, bi- and cross-encoder; "
            f"else README's guide says {PAIRS_ADVICE!r}",
            "measured": f"bi-encoder, {bi}; cross-encoder (peers_stsb): {cross['measured']}; the README "
            + ("says" if advised else "does not say")
            + f" {PAIRS_ADVICE!r}",
            "met": (bool(bi_met) and cross["met"]) or advised,
        },
        {
            "goal": "LoRA + spectral steepest descent vs LoRA + AdamW, both tuned: the difference, and whether "
            "spectral is at least AdamW's (the 2026 claim) within 2 seed-sd",
            "target": "mean(spectral) >= mean(AdamW) - 2 x the larger seed sd, in each setting",
            "measured": "; ".join(text for text, _ in spectral),
            "met": all(ahead is False for _, ahead in spectral),
        },
        {
            "goal": "SteepestDescent spectral under FSDP2 equals one process to 1e-6 (fp32) and its step costs "
            "<= 1.5x AdamW's per parameter at MiniLM shapes",
            "target": "<= 1e-6 from one process (tests/optim/test_steepest.py, docs/fsdp.md); <= 1.5x AdamW",
            "measured": "equality: within 6e-8 in fp32 (tested on 2 gloo processes); step cost (optimizer_step_cost): "
            + cost["measured"],
            "met": cost["met"],
        },
    ]


def guide_rows(measured: dict[str, dict[str, Any]]) -> list[list[str]]:
    """The README's rows: each setting's methods by test score, best first (full fine-tuning quoted
    from its committed runs where this run did not measure it)."""
    rows = []
    for setting, spec in SETTINGS.items():
        scored = [
            (m["row"].label, m["row"].peer_of or "-", m["lr"], list(m["seeds"].values()), m.get("alone"))
            for key, m in measured.items()
            if key.startswith(f"{setting}/")
        ]
        if quoted := full_elsewhere(measured, setting):
            label = f"full fine-tuning ({quoted['source']})"
            scored.append((label, "-", quoted["lr"], quoted["runs"], quoted["alone"]))
        scored.sort(key=lambda item: -statistics.fmean(s["test"] for s in item[3]))
        for label, peer_of, lr, runs, alone in scored:
            metric, state = runs[0]["metric"], runs[0]["optimizer_state_bytes"] / 2**20
            test = shown(metric, *mean_and_sd([r["test"] for r in runs]))
            rows.append([spec["short"], label, peer_of, f"{lr:g}", test, seconds(alone), f"{state:.2f}"])
    return rows


def build_result(measured: dict[str, dict[str, Any]], notes: list[str]) -> dict[str, Any]:
    tables = []
    for setting in SETTINGS:
        tables.append(table(setting, measured))
    edges = [f"{k} ({m['lr']:g})" for k, m in measured.items() if m["edge"]]
    seed_counts = sorted({len(m["seeds"]) for m in measured.values()})
    return {
        "title": "Each method beside its peers: PEFT's inits, LoRA-RITE, LoRA+, Schedule-Free, Muon",
        "claim": "every gradkit method beside what the field ships for the same purpose, each at its best lr",
        "tables": tables,
        "notes": [
            "Every row chose its lr on seed 0 by the final dev metric; the grids started at three factor-2 "
            f"points and were extended while the best sat at an edge, at most {MAX_EXTENSIONS} times.",
            "Rows whose best lr is still at an edge of the extended grid: "
            + (", ".join(edges) or "none")
            + ".",
            f"The EMA row reads the LoRA row's runs (decay {EMA_DECAY}, bias-corrected warm-up) and chooses its "
            "lr by the average's own dev score; the average never changes training.",
            "'s/step, 2 at a time' is the tuning runs' training-loop wall time per step (dev evaluations included), "
            "two one-thread runs at a time on the 2 cores, some of them beside a run of the test suite, so it "
            f"varies with what ran beside. 's/step alone' is {TIMING_STEPS} steps of the seed-0 run at the best lr "
            "with no head warm-up and no dev set, one run at a time with nothing else running (--timing).",
            *notes,
        ],
        "goals": goals(measured),
        "raw": {
            key: {
                "method": m["row"].method,
                "options": list(m["row"].options),
                "ema": m["row"].ema,
                "sweep": m["sweep"],
                "lr": m["lr"],
                "runs": m["seeds"],
                "seconds_per_step_alone": m.get("alone"),
            }
            for key, m in measured.items()
        },
        "readme_table": {
            "marker": "method-peers",
            "caption": "all-MiniLM-L6-v2 on 2 CPU cores, batch 16, each method at its best dev lr from a "
            f"factor-2 grid, test metric mean ± sd over {' or '.join(map(str, seed_counts))} seeds "
            "(`benchmarks/method_peers.py`; each row's seeds and details in docs/benchmarks.md).",
            "columns": ["task", "method", "beside", "lr", "test", "s/step alone", "optimizer state MiB"],
            "rows": guide_rows(measured),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--report-only", action="store_true", help="write the result from finished runs")
    parser.add_argument(
        "--more-seeds", action="store_true", help="seeds 3 and 4 where the rule asks for them"
    )
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated setting/label keys to run (the rest are read where finished)",
    )
    parser.add_argument(
        "--timing", action="store_true", help="then time each row's best lr alone, one run at a time"
    )
    parser.add_argument("--note", action="append", default=[], help="a note for the result (repeatable)")
    args = parser.parse_args(argv)
    only = frozenset(filter(None, args.only.split(",")))
    if unknown := only - {row.key for row in ROWS}:
        parser.error(f"--only: no row {', '.join(sorted(unknown))}; the rows are setting/label keys of ROWS")
    measured = measure_all(args.report_only, args.jobs, args.more_seeds, only)
    time_alone(measured, report_only=args.report_only or not args.timing)
    result = build_result(measured, args.note)
    for t in result["tables"]:
        print(t["caption"])
        for row in t["rows"]:
            print(" | ".join(row))
    for goal in result["goals"]:
        print(f"{'met' if goal['met'] else 'NOT met'}: {goal['goal']}: {goal['measured']}")
    write_result("method_peers", result)


if __name__ == "__main__":
    main()
