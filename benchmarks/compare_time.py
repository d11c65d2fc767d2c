"""compare_time: how long README command 1 (``gradkit compare`` on its defaults) takes, where the time
goes, and what the harness' padding-aware batches save against one padded forward pass per batch.

(a) ``/usr/bin/time -v gradkit compare`` with every default (head, LoRA, LoRA-GA and full fine-tuning of
    all-MiniLM-L6-v2 on the bundled SST-2 sample, 300 steps of batch 32): wall time and peak RSS of the
    whole command, and each method's phases from its summary.json (reading data, tokenising, loading
    the model, preparing it, LoRA-GA's estimation included, training, evaluating).
(b) The same four methods for ``--steps 40`` with and without ``--no-trim-padding`` (each batch one
    forward pass padded to its longest text), interleaved: seconds per step and the padded token
    positions each computes.

The accuracies of (a) are set against the seed-0 floor the one-padded-pass harness gave (head
77.87 %, LoRA 82.91 %, LoRA-GA 82.57 %, full 84.75 %; CHANGELOG.md, 2026-11-30).

    python -m benchmarks.compare_time            # (a) and (b), about 15 minutes on 2 CPU cores
    python -m benchmarks.compare_time --quick    # a smoke run: 5 steps, the same code path
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, write_result

METHODS = ("head", "lora", "lora-ga", "full")
BEFORE = {"head": 0.7787, "lora": 0.8291, "lora-ga": 0.8257, "full": 0.8475}  # seed 0, the floor
GOAL_SECONDS = 600


def timed_compare(out: Path, *extra: str) -> dict:
    """Run ``gradkit compare`` under /usr/bin/time -v; its wall seconds, peak RSS and summaries."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "gradkit", "compare", "--out", str(out), *extra]
    print("+", " ".join(cmd[2:]), flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"compare failed ({result.returncode}):\n{result.stderr[-3000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", result.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    parts = [float(x) for x in wall.group(1).split(":")] if wall else [seconds]
    wall_seconds = sum(v * 60**i for i, v in enumerate(reversed(parts)))
    summaries = json.loads((out / "comparison.json").read_text())["summaries"]
    return {
        "wall_seconds": round(wall_seconds, 1),
        "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None,
        "summaries": {s["method"]: s for s in summaries},
    }


def padded_positions(steps: int, trim: bool) -> tuple[int, int]:
    """Token positions the default stream computes in ``steps`` steps (padding included) and real tokens."""
    from gradkit.data import load_text_classification
    from gradkit.train.batching import padded_positions as positions
    from gradkit.train.batching import split_batch
    from gradkit.train.datasets import training_order
    from gradkit.train.model import load_tokenizer
    from gradkit.train.tokenize import tokenize

    data = load_text_classification(None, split="train")
    tokens = tokenize(load_tokenizer(None), data.texts, data.labels, 128)
    order = training_order(len(data), steps * 32, 0)
    total = real = 0
    for step in range(steps):
        batch = tokens.collate(order[step * 32 : (step + 1) * 32])
        total += positions(split_batch(batch, max_examples=32, trim=trim))
        real += int(batch["attention_mask"].sum())
    return total, real


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 steps: check the script, not the numbers")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    short = 5 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = timed_compare(tmp / "default", *(["--steps", "5"] if args.quick else []))
        speed = {}
        for trim in (True, False):  # (b): the two batchings, one after the other
            flag = [] if trim else ["--no-trim-padding"]
            speed[trim] = timed_compare(tmp / f"steps-{trim}", "--steps", str(short), *flag)
    trimmed, real = padded_positions(300, True)
    untrimmed, _ = padded_positions(300, False)

    rows = []
    for name in METHODS:
        s = full["summaries"][name]
        phases = s["phase_seconds"]
        rows.append(
            [
                name,
                f"{100 * s['test_accuracy']:.2f} %",
                f"{100 * BEFORE[name]:.2f} %",
                "yes" if s["test_accuracy"] >= BEFORE[name] else "no",
                f"{phases.get('read_data', 0) + phases.get('load_model', 0):.1f}",
                f"{phases.get('tokenize', 0):.1f}",
                f"{phases.get('prepare', 0):.1f}",
                f"{phases.get('train', 0):.1f}",
                f"{phases.get('evaluate', 0):.1f}",
            ]
        )
    speed_rows = []
    for name in METHODS:
        new, old = speed[True]["summaries"][name], speed[False]["summaries"][name]
        speed_rows.append(
            [
                name,
                f"{old['seconds_per_step']:.3f}",
                f"{new['seconds_per_step']:.3f}",
                f"{old['seconds_per_step'] / new['seconds_per_step']:.2f}x",
            ]
        )
    minutes = full["wall_seconds"] / 60
    met = full["wall_seconds"] < GOAL_SECONDS
    notes = [
        f"Whole command: {minutes:.1f} minutes wall ({full['wall_seconds']:.0f} s; goal under 10 minutes: "
        f"{'met' if met else 'not met'}), peak RSS {full['peak_rss_mb']} MB (the largest of its processes: each method "
        "runs in a child process of its own).",
        f"Token positions computed in the 300 default steps: {untrimmed:,} padded to each batch's longest text, "
        f"{trimmed:,} with the length-sorted parts, {real:,} real tokens "
        f"({untrimmed / real:.2f}x and {trimmed / real:.2f}x the real count).",
        f"Load average when the benchmark started: {load:.2f} (2 cores; above about 0.5 other work shared them).",
    ]
    return {
        "name": "compare_time",
        **{
            "title": "README command 1: the default gradkit compare, timed",
            "claim": "The default `gradkit compare` (4 methods x 300 steps on the bundled SST-2 sample) finishes "
            "in under 10 minutes on 2 CPU cores with no method below the seed-0 accuracy the one-padded-pass harness gave.",
            "tables": [
                {
                    "caption": "(a) `gradkit compare` on its defaults, each method's test accuracy and phases "
                    "(seconds; 'load' is reading the data and tokenizer plus loading the model)",
                    "columns": [
                        "method",
                        "test acc",
                        "before (seed 0)",
                        "not lower",
                        "load s",
                        "tokenise s",
                        "prepare s",
                        "train s",
                        "evaluate s",
                    ],
                    "rows": rows,
                },
                {
                    "caption": f"(b) seconds per step over {short} steps: one padded forward pass per batch "
                    "(`--no-trim-padding`, the harness before) against length-sorted parts (default)",
                    "columns": ["method", "padded batch s/step", "parts s/step", "speed-up"],
                    "rows": speed_rows,
                },
            ],
            "notes": notes,
            "raw": {
                "default": full,
                "trim": speed[True],
                "no_trim": speed[False],
                "positions": {"trimmed": trimmed, "untrimmed": untrimmed, "real": real},
                "load_average": load,
            },
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
