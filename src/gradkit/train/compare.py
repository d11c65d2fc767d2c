"""``gradkit compare``: run several methods under the same budget and put them side by side.

Each method runs in its own child process, so its peak memory is its own and one method's failure
does not stop the others. The comparison folder holds one run folder per method, comparison.json,
a table (table.md) and every method's loss curve on one plot (loss.png).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError
from gradkit.files import atomic_path, clear_folder, write_json
from gradkit.train.config import TrainConfig
from gradkit.train.datasets import load_datasets
from gradkit.train.loop import finetune
from gradkit.train.methods import get_method
from gradkit.train.metrics import format_metric
from gradkit.train.plots import plot_losses
from gradkit.train.run_folder import default_out
from gradkit.train.validate import check_config, check_data, check_out, check_pairs, run_inputs


def _child(cfg: TrainConfig, debug: bool, report: Any) -> None:
    """Run one method; send ``None`` on success or the failure's one-line reason through ``report``."""
    try:
        finetune(cfg)
    except GradkitError as err:
        reason, code = str(err), 2
    except Exception as err:
        reason, code = f"{type(err).__name__}: {err}", 1
        if debug:  # the whole traceback, as the user asked
            report.send(" ".join(reason.split()))
            raise
    else:
        report.send(None)
        return
    reason = " ".join(reason.split())  # one line, whatever the exception's message held
    report.send(reason)
    print(f"gradkit: error: {cfg.method}: {reason}", file=sys.stderr)
    raise SystemExit(code)


def format_table(summaries: list[dict[str, Any]]) -> str:
    """A Markdown table of the headline numbers, one row per method: the task's metric at step 0
    (before any training), after the head warm-up when there was one, at the end, with EMA and
    best-on-dev where the run kept them."""
    done = [s for s in summaries if "error" not in s]
    metric = done[0].get("metric", "accuracy") if done else "accuracy"
    name = {"accuracy": "acc", "macro_f1": "macro-F1", "mcc": "MCC"}.get(metric, metric)
    with_start = any("step0" in s for s in done)
    with_warmup = any("head_warmup" in s for s in done)
    with_ema = any("ema" in s for s in done)
    with_best = any("best" in s for s in done)
    with_f1 = metric == "accuracy"
    head = (
        "method",
        "lr",
        "train loss",
        *((f"step-0 test {name}",) if with_start else ()),
        *((f"after head warm-up test {name}",) if with_warmup else ()),
        f"test {name}",
        *((f"EMA test {name}",) if with_ema else ()),
        *((f"best-on-dev test {name} (step)",) if with_best else ()),
        *(("macro-F1",) if with_f1 else ()),
        "s/step",
        "peak MB",
        "trainable",
        "optim state",
    )

    def shown(part: dict[str, Any] | None) -> str:
        return format_metric(metric, part.get(f"test_{metric}")) if part else "-"

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        if "error" in s:
            lines.append(f"| {s['method']} | failed: {s['error']} |" + " |" * (len(head) - 2))
            continue
        best = s.get("best")
        cells = [
            s["method"],
            f"{s['lr']:g}",
            f"{s['final_train_loss']:.4f}",
            *([shown(s.get("step0"))] if with_start else []),
            *([shown(s.get("head_warmup"))] if with_warmup else []),
            shown(s),
            *([shown(s.get("ema"))] if with_ema else []),
            *([f"{shown(best)} ({best['step']})" if best else "-"] if with_best else []),
            *([format_metric("macro_f1", s.get("test_macro_f1"))] if with_f1 else []),
            f"{s['seconds_per_step']:.3f}",
            f"{s['peak_memory_mb']:.0f}",
            f"{s['trainable_parameters']:,}",
            f"{s['optimizer_state_bytes'] / 2**20:.1f} MiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compare(
    cfg: TrainConfig, methods: list[str], *, debug: bool = False, keep_existing: bool = False
) -> list[dict[str, Any]]:
    """Run ``methods`` one after another with ``cfg`` (each at its default lr unless ``cfg.lr``).

    A method that fails does not stop the others: its row says why (the error's one line; with
    ``debug`` its child also prints the traceback) and its summary holds ``"error"``.

    ``cfg.out`` must be new or empty (``cfg.overwrite``: it is cleared first). With ``keep_existing``
    (for scripts that gather runs in one folder, such as the benchmarks) it may hold other runs, and
    only each method's own folder ``out/<method>`` must be new or empty (``cfg.overwrite`` clears that
    folder alone)."""
    for name in methods:
        get_method(name)  # unknown names fail before anything runs
    if not methods:
        raise GradkitError("--methods names no method; pass e.g. --methods head,lora")
    repeated = sorted({name for name in methods if methods.count(name) > 1})
    if repeated:  # each method's run folder is out/<method>: a second run of it has no folder of its own
        raise GradkitError(
            f"--methods names {', '.join(repeated)} more than once; name each method once (for repeats, "
            "run compare again with another --seed or --out)"
        )
    for name in methods:  # so do bad settings, each method's own combinations included
        check_config(dataclasses.replace(cfg, method=name, out=None))
    train = load_datasets(cfg)[0]
    check_data(cfg, train)  # and data errors
    check_pairs(cfg, train)  # and the pair encoding's (the model folder's pooling among them)
    out = Path(cfg.out) if cfg.out else default_out("compare")
    for folder in [out / name for name in methods] if keep_existing else [out]:
        check_out(folder, cfg.overwrite, inputs=run_inputs(cfg))
        if cfg.overwrite and folder.is_dir():
            clear_folder(folder)
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[dict[str, Any]] = []
    curves, dev_curves = {}, {}
    for name in methods:
        run_dir = out / name
        summary = _run_method(dataclasses.replace(cfg, method=name, out=str(run_dir), overwrite=False), debug)
        summaries.append(summary)
        if "error" in summary:
            continue
        curves[name], dev = _curves(run_dir / "metrics.jsonl")
        if dev[0]:
            dev_curves[name] = dev
    table = format_table(summaries)
    write_json(out / "comparison.json", {"config": cfg.to_dict(), "methods": methods, "summaries": summaries})
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(table + "\n")
    if curves:
        plot_losses(
            curves,
            out / "loss.png",
            title=f"train loss, {_budget(cfg)}",
            dev=dev_curves or None,
        )
    print(table)
    print(f"\nrun folder: {out}")
    return summaries


def _budget(cfg: TrainConfig) -> str:
    """``300 steps of batch 32``, or with ``--examples`` ``9,600 examples from batch 32, noise schedule``."""
    batch = cfg.batch_size * cfg.grad_accum
    if cfg.examples is None:
        return f"{cfg.steps} steps of batch {batch}"
    grows = "" if cfg.batch_schedule == "fixed" else f", {cfg.batch_schedule} schedule"
    return f"{cfg.examples:,} examples from batch {batch}{grows}"


def _run_method(cfg: TrainConfig, debug: bool) -> dict[str, Any]:
    """Run ``cfg`` in a child process: its summary, or ``{"method", "error"}`` with the one-line reason
    it failed (the child's own, or how it ended when it could not say)."""
    ctx = multiprocessing.get_context("spawn")
    reader, writer = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(cfg, debug, writer))
    child.start()
    writer.close()  # the child holds the only writer: recv() ends when it exits, whatever happens
    try:
        reason = reader.recv()
    except EOFError:  # killed (out of memory, a signal) before it could say why
        reason = None
    child.join()
    reader.close()
    summary_path = Path(cfg.out) / "summary.json"
    if child.exitcode != 0 or not summary_path.exists():
        if reason is None:
            code = child.exitcode
            reason = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return {"method": cfg.method, "error": reason}
    return json.loads(summary_path.read_text())


Curve = tuple[list[int], list[float]]


def _curves(metrics: Path) -> tuple[Curve, Curve]:
    """The train-loss and dev-loss curves ``(steps, losses)`` of a run's metrics.jsonl."""
    steps, losses, dev_steps, dev_losses = [], [], [], []
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        if "step" in row and "loss" in row:  # a train row (dev rows: dev_loss; warm-up rows: no step)
            steps.append(row["step"])
            losses.append(row["loss"])
        elif "dev_loss" in row:
            dev_steps.append(row["step"])
            dev_losses.append(row["dev_loss"])
    return (steps, losses), (dev_steps, dev_losses)
