"""batch_schedule: does a batch that grows with the measured noise scale train in fewer optimiser steps
for the same examples, and does the online noise scale land near the critical batch measured directly?

Workload (pre-training-like): ``gradkit.models.toy_transformer`` (Pre-LN, d_model 64, 2 layers, 4 heads,
tied embeddings) as a character LM on Tiny Shakespeare from scratch, AdamW (no weight decay). First 90%
of the text to train, the last 10% held out (a fixed set of ``EVAL_WINDOWS`` windows). An example is one
window of ``CONTEXT`` characters (the loss on every position), drawn i.i.d. from a seeded generator, so
every schedule at a seed reads the same stream of windows. One torch thread per run, two runs at a time.

(b) The same budget of ``BUDGET`` examples with four schedules, each at its best lr from a factor-2 grid
chosen on seed 0 by the final held-out loss (the grid extended past an edge), then 3 seeds: a fixed small
batch (``BASE``), a fixed large batch (``LARGE``), ``ramp`` (doubling every eighth of the budget up to
``MAX_BATCH``) and ``noise`` (every ``CHECK`` steps the multiple of ``BASE`` nearest the smoothed
``B_simple``, up to ``MAX_BATCH``, the lr times Adam's law; ``noise-0.25`` aims at a quarter of it). The library's ``BatchSchedule`` and
``NoiseScale`` with the same base-batch lr schedule as the harness (``gradkit.train.batch_growth``:
5% linear warm-up, linear decay to 0 over the examples).

(a) The critical batch measured directly (``gradkit.scaling.critical_batch_size`` on branched runs): the
fixed-small run at its best lr, with the noise-scale monitor on (two micro-batches a step), is checkpointed
at 10%, 30% and 70% of the budget; so is a plain-SGD run at batch ``BASE`` (``sgd-16``, its lr tuned the
same way). From each checkpoint, branches at ``BRANCHES`` batch sizes (each at the checkpoint's lr times
the optimiser's law from ``BASE`` at the online ``B_simple``, constant) train until the held-out loss falls by
``DROP`` of its value; Zhang et al.'s 20% rule reads the critical batch. Beside it: the online ``B_simple``
and the Hessian-aware ``B_noise`` (``b_noise_hessian``) at the checkpoint.

On MiniLM, (a) runs through ``gradkit noise-scale --branch`` (:mod:`gradkit.train.branches`): the measuring run
at fixed-16's best lr, constant, ends at each of ``FT_POINTS`` steps, and branches at ``FT_BRANCHES`` train to a
``FT_DROP`` lower held-out loss (the dev share of the training file).

The overhead of measuring and scheduling: interleaved timing in one process of a step at ``BASE`` with
and without the monitor (which splits the step into two micro-batches and reads their gradients).

    OMP_NUM_THREADS=1 python -m benchmarks.batch_schedule            # the measured run (about 20 minutes)
    OMP_NUM_THREADS=1 python -m benchmarks.batch_schedule --quick    # smoke run: a minute; numbers mean nothing
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import IMAGES, ROOT, mean_and_sd, report, save_figure
from benchmarks.method_regimes import RUNS, finetune
from gradkit.errors import GradkitError
from gradkit.models import toy_transformer
from gradkit.scaling import BatchSchedule, NoiseScale
from gradkit.scaling.critical_batch import critical_batch_size, steps_to_target
from gradkit.scaling.hessian import b_noise_hessian
from gradkit.train.batch_growth import lr_fraction
from gradkit.train.branches import branch_lr

TEXT = ROOT / "data" / "tinyshakespeare" / "input.txt"
CACHE = ROOT / "benchmarks" / "runs" / "batch_schedule"
CONTEXT, D_MODEL, LAYERS, HEADS = 64, 64, 2, 4
BASE, LARGE, MAX_BATCH, CHECK = 16, 128, 256, 25
BUDGET, WARMUP, EVAL_EVERY, EVAL_WINDOWS = 32_000, 0.05, 1_600, 512
NOISE_BETA = 0.95
POINTS = (0.1, 0.3, 0.7)  # checkpoints of the fixed-small run, as shares of the budget
BRANCHES = (16, 32, 64, 128, 256, 512)
DROP, BRANCH_EXAMPLES = 0.02, 24_000
SEEDS = (0, 1, 2)
SCHEDULES = {  # name: (mode, base batch, lr grid a factor 2 apart)
    "fixed-16": ("fixed", BASE, [1e-3, 2e-3, 4e-3, 8e-3]),
    "fixed-128": ("fixed", LARGE, [2e-3, 4e-3, 8e-3, 1.6e-2]),
    "ramp": ("ramp", BASE, [1e-3, 2e-3, 4e-3, 8e-3]),
    "noise": ("noise", BASE, [1e-3, 2e-3, 4e-3, 8e-3]),
    "noise-0.25": ("noise", BASE, [2e-3, 4e-3, 8e-3, 1.6e-2]),  # aiming at a quarter of B_simple
}
FRACTIONS = {"noise-0.25": 0.25}  # --batch-noise-fraction where it is not 1
# plain SGD (no momentum, McCandlish et al.'s setting) at the small batch: the run (a) branches from for SGD
SGD_SCHEDULES = {"sgd-16": ("fixed", BASE, [0.25, 0.5, 1.0, 2.0])}

# the fine-tuning workload: all-MiniLM-L6-v2 full fine-tuning on the full SST-2 training file through
# the harness (gradkit finetune), from the label-text head; held-out = 2% of the training file
FT_BUDGET, FT_MAX = 3_200, 256
FT_COMMON = [
    *("--method", "full", "--train", str(ROOT / "data" / "sst2" / "train.tsv")),
    *("--test", str(ROOT / "data" / "sst2" / "test.tsv"), "--dev-fraction", "0.02", "--max-length", "64"),
    *("--head-init", "labels", "--label-text", "terrible,great", "--label-template", "It was {}."),
    *("--examples", str(FT_BUDGET), "--warmup-ratio", "0.05"),
]
FT_SCHEDULES = {  # name: (options, eval every N steps, lr grid a factor 2 apart)
    "fixed-16": (["--batch-size", "16"], 25, [2.5e-5, 5e-5, 1e-4]),
    "fixed-128": (["--batch-size", "128"], 5, [5e-5, 1e-4, 2e-4]),
    "ramp": (
        ["--batch-size", "16", "--batch-schedule", "ramp", "--batch-max", str(FT_MAX)],
        10,
        [2.5e-5, 5e-5, 1e-4],
    ),
    "noise": (
        [
            "--batch-size",
            "16",
            "--batch-schedule",
            "noise",
            "--batch-check",
            "10",
            "--batch-max",
            str(FT_MAX),
        ],
        10,
        [2.5e-5, 5e-5, 1e-4],
    ),
}

# (a) on the fine-tuning workload: gradkit noise-scale --branch (the measuring run at fixed-16's lr, constant,
# its B_simple from two micro-batches of 8) ending at 10%, 30% and 70% of fixed-16's 200 steps
FT_POINTS = (20, 60, 140)
FT_BRANCHES = (16, 32, 64, 128, 256)
FT_DROP = 0.05  # 2% lay within one evaluation for every size at the first point: no resolution
FT_CBS = [
    *("--train", str(ROOT / "data" / "sst2" / "train.tsv"), "--dev-fraction", "0.02", "--max-length", "64"),
    *("--head-init", "labels", "--label-text", "terrible,great", "--label-template", "It was {}."),
    *("--batch-size", "16", "--micro-batches", "2", "--branch", ",".join(map(str, FT_BRANCHES))),
    *("--branch-drop", str(FT_DROP), "--branch-examples", "2048", "--branch-eval-examples", "32"),
]
FT_CBS_SEEDS = (0, 1)

_DATA: dict[str, Any] = {}


def data(quick: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], int]:
    """Training tokens, the fixed held-out windows, the vocabulary size (loaded once per process)."""
    if "train" not in _DATA:
        text = TEXT.read_text()[: 300_000 if quick else None]
        chars = sorted(set(text))
        tokens = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
        cut = int(0.9 * len(tokens))
        held = windows(tokens[cut:], EVAL_WINDOWS, torch.Generator().manual_seed(12345))
        _DATA.update(train=tokens[:cut], held=held, vocab=len(chars))
    return _DATA["train"], _DATA["held"], _DATA["vocab"]


def windows(tokens: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.randint(0, len(tokens) - CONTEXT - 1, (n,), generator=gen)
    w = tokens[start[:, None] + torch.arange(CONTEXT + 1)]
    return w[:, :-1], w[:, 1:]


def loss_of(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def held_out(model, held) -> float:
    with torch.no_grad():
        return loss_of(model, *held).item()


def new_optimizer(name: str, model, lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay, or plain SGD."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)


def new_model(seed: int, vocab: int):
    gen = torch.Generator().manual_seed(seed)
    return toy_transformer(vocab, D_MODEL, LAYERS, HEADS, norm="pre", max_len=CONTEXT, generator=gen)


def step_on(model, opt, x, y, parts: int, recorder) -> float:
    """One optimiser step on the batch ``(x, y)`` cut into ``parts`` micro-batches (gradients summed
    to the batch mean); the recorder reads each micro-batch's gradient."""
    total = 0.0
    for cx, cy in zip(x.chunk(parts), y.chunk(parts), strict=True):
        loss = loss_of(model, cx, cy) * (len(cx) / len(x))
        loss.backward()
        total += loss.item()
        if recorder is not None:
            recorder.micro_step(len(cx))
    if recorder is not None:
        recorder.step()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


def train_run(spec: dict[str, Any]) -> dict[str, Any]:
    """One schedule at one lr and seed over the budget: held-out loss against examples and steps (and,
    with ``spec["points"]``, the states and online noise scale at those examples)."""
    torch.set_num_threads(1)
    train, held, vocab = data(spec["quick"])
    budget, base = spec["budget"], spec["base"]
    model = new_model(spec["seed"], vocab)
    opt = new_optimizer(spec.get("optimizer", "adam"), model, spec["lr"])
    schedule = BatchSchedule(
        base,
        spec["mode"],
        max_batch=MAX_BATCH,
        check_every=CHECK,
        noise_fraction=spec.get("fraction", 1.0),
        ramp_examples=budget // 8,
        law=spec.get("optimizer", "adam"),
    )
    monitored = spec["mode"] == "noise" or bool(spec.get("points"))
    gns = NoiseScale(model, beta=NOISE_BETA) if monitored else None
    recorder = gns.accumulation_hooks() if gns is not None else None
    gen = torch.Generator().manual_seed(1000 + spec["seed"])
    curve = [[0, 0, held_out(model, held), None]]  # examples, steps, held-out loss, B_simple
    points, pending = [], [round(p * budget / base) * base for p in spec.get("points", ())]
    used = step = 0
    start = time.process_time()
    while used < budget:
        step += 1
        batch = min(schedule.batch_size, budget - used)
        lr = spec["lr"] * lr_fraction(used // base, budget // base, WARMUP, "linear") * schedule.lr_factor
        for group in opt.param_groups:
            group["lr"] = lr
        parts = max(2 if monitored else 1, batch // base)
        step_on(model, opt, *windows(train, batch, gen), parts, recorder)
        before, used = used, used + batch
        b_simple = gns.b_simple if gns is not None else None
        schedule.update(step, used, b_simple)
        if used // EVAL_EVERY > before // EVAL_EVERY or used == budget:
            curve.append([used, step, held_out(model, held), b_simple])
        if pending and used >= pending[0]:
            pending.pop(0)
            points.append(checkpoint(model, opt, lr, used, step, b_simple, held))
    if recorder is not None:
        recorder.remove()
    return {
        **{k: spec[k] for k in ("name", "mode", "lr", "seed")},
        "curve": curve,
        "final": curve[-1][2],
        "steps": step,
        "changes": schedule.changes,
        "cpu_seconds": time.process_time() - start,
        "points": points,
    }


def checkpoint(model, opt, lr, used, step, b_simple, held) -> dict[str, Any]:
    return {
        "examples": used,
        "step": step,
        "lr": lr,
        "b_simple": b_simple,
        "loss": held_out(model, held),
        "model": {k: v.clone() for k, v in model.state_dict().items()},
        "opt": copy.deepcopy(opt.state_dict()),
    }


def branch(
    point: dict[str, Any], batch: int, seed: int, quick: bool, optimizer: str = "adam"
) -> float | None:
    """From the checkpoint ``point``, train at ``batch`` (constant lr: the checkpoint's times the
    optimiser's law from ``BASE`` at the online ``B_simple``) until the held-out loss is ``(1 - DROP)`` of the
    checkpoint's; the steps it took (``steps_to_target``; evaluations every ~256 examples), or None."""
    train, held, vocab = data(quick)
    model = new_model(0, vocab)
    model.load_state_dict(point["model"])
    lr = branch_lr(point["lr"], BASE, batch, point["b_simple"], optimizer)
    opt = new_optimizer(optimizer, model, lr)
    # a copy: load_state_dict keeps the given tensors, and the steps would change the checkpoint's moments
    # under the next branch
    opt.load_state_dict(copy.deepcopy(point["opt"]))
    for group in opt.param_groups:
        group["lr"] = lr
    gen = torch.Generator().manual_seed(10_000 * (seed + 1) + batch)
    target, every = (1 - DROP) * point["loss"], max(1, 256 // batch)
    curve = [(0, point["loss"])]
    for step in range(1, (BRANCH_EXAMPLES // (8 if quick else 1)) // batch + 1):
        step_on(model, opt, *windows(train, batch, gen), max(1, batch // BASE), None)
        if step % every == 0:
            curve.append((step, held_out(model, held)))
            if curve[-1][1] <= target:
                break
    return steps_to_target(curve, target)


def hessian_b_noise(point: dict[str, Any], quick: bool) -> float | None:
    """``B_noise = tr(HΣ)/(GᵀHG)`` at the checkpoint on 8 chunks of 64 training windows (None when the
    estimate is not positive)."""
    train, _, vocab = data(quick)
    model = new_model(0, vocab)
    model.load_state_dict(point["model"])
    gen = torch.Generator().manual_seed(777)
    chunks = [windows(train, 64, gen) for _ in range(8)]
    with sdpa_kernel(SDPBackend.MATH):  # CPU's fused attention kernel has no double backward
        result = b_noise_hessian(model, lambda m, c: loss_of(m, *c), chunks, 64)
    return result.b_noise


def cbs_seed(spec: dict[str, Any]) -> dict[str, Any]:
    """(a) at one seed: the monitored fixed-small run, then the branches at each checkpoint."""
    optimizer = spec.get("optimizer", "adam")
    try:
        run = train_run({**spec, "points": POINTS})
    except GradkitError as err:  # the noise-scale monitor refuses a non-finite gradient: the run diverged
        return {
            "seed": spec["seed"],
            "lr": spec["lr"],
            "optimizer": optimizer,
            "final": None,
            "points": [],
            "failed": str(err),
        }
    rows = []
    for point in run.pop("points"):
        if point["b_simple"] is None:
            rows.append({"examples": point["examples"], "b_simple": None})
            continue
        steps = [branch(point, b, spec["seed"], spec["quick"], optimizer) for b in BRANCHES]
        rows.append(
            {
                "examples": point["examples"],
                "step": point["step"],
                "loss": point["loss"],
                "b_simple": point["b_simple"],
                "b_noise": hessian_b_noise(point, spec["quick"]),
                "branch_steps": steps,
                **read_cbs(steps),
            }
        )
    return {
        "seed": spec["seed"],
        "lr": spec["lr"],
        "optimizer": optimizer,
        "final": run["final"],
        "points": rows,
    }


def read_cbs(steps: list[float | None], sizes: tuple[int, ...] = BRANCHES) -> dict[str, Any]:
    """Zhang et al.'s critical batch from the branches' steps to the target (None where no branch
    reached it), each rounded up to a whole step as ``steps_to_target`` does (a branch's interpolated
    crossing can lie before its first step)."""
    steps = [None if s is None else float(math.ceil(s - 1e-9)) for s in steps]
    if all(s is None for s in steps):
        none = dict.fromkeys(("cbs", "cbs_low", "cbs_high"))
        return {**none, "cbs_text": "no branch reached the target", "overhead": [None] * len(steps)}
    result = critical_batch_size(sizes, steps)
    return {
        "cbs": result.value,
        "cbs_low": result.low,
        "cbs_high": result.high,
        "cbs_text": result.describe(),
        "overhead": [r if math.isfinite(r) else None for r in result.overhead],
    }


def ft_cbs(seed: int, lr: float) -> dict[str, Any]:
    """(a) on MiniLM at one seed: ``gradkit noise-scale --branch`` ending at each of ``FT_POINTS`` (runs
    reused when finished), as a record shaped like :func:`cbs_seed`'s."""
    rows = []
    for steps in FT_POINTS:
        args = [*FT_CBS, "--steps", str(steps), "--lr", f"{lr:g}", "--seed", str(seed)]
        out = RUNS / "batch_schedule" / "cbs" / f"steps{steps}-seed{seed}"
        record = finetune(args, out, report_only=False, command="noise-scale")["branches"]
        rows.append(
            {
                "examples": 16 * steps,
                "step": steps,
                "loss": record["held_out_loss"],
                "b_simple": record["b_simple"],
                "b_noise": record["b_noise"],
                "branch_steps": record["steps"],
                **read_cbs(record["steps"], FT_BRANCHES),
            }
        )
    return {"seed": seed, "lr": lr, "optimizer": "adam", "workload": "minilm", "points": rows}


def overhead(quick: bool, rounds: int = 7, steps: int = 20) -> dict[str, float]:
    """ms per step at ``BASE``, interleaved in one process (median over ``rounds`` turns of ``steps``
    steps): plain (one micro-batch), split (two micro-batches, no monitor) and monitored (two
    micro-batches read by the noise-scale recorder, the schedule deciding every step)."""
    torch.set_num_threads(1)
    train, _, vocab = data(quick)
    gen = torch.Generator().manual_seed(5)
    setups = {}
    for name in ("plain", "split", "monitored"):
        model = new_model(0, vocab)
        gns = NoiseScale(model, beta=NOISE_BETA) if name == "monitored" else None
        setups[name] = (
            model,
            torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0),
            gns,
            gns.accumulation_hooks() if gns is not None else None,
            BatchSchedule(BASE, "noise", max_batch=BASE, check_every=1, law="adam"),
        )
    times: dict[str, list[float]] = {name: [] for name in setups}
    for turn in range(rounds + 1):
        batches = [windows(train, BASE, gen) for _ in range(steps)]
        for name, (model, opt, gns, recorder, schedule) in setups.items():
            start = time.perf_counter()
            for i, (x, y) in enumerate(batches, 1):
                step_on(model, opt, x, y, 1 if name == "plain" else 2, recorder)
                if gns is not None:
                    schedule.update(i, i * BASE, gns.b_simple)
            if turn:  # the first turn warms up
                times[name].append(1000 * (time.perf_counter() - start) / steps)
    return {name: statistics.median(v) for name, v in times.items()}


def cached(key: str, compute, spec: dict[str, Any]) -> dict[str, Any]:
    """The record of ``key`` from the cache, else computed (in a worker) and appended."""
    path = CACHE / ("quick.jsonl" if spec["quick"] else "runs.jsonl")
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record["key"] == key:
                return record
    record = {"key": key, **compute(spec)}
    CACHE.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def schedule_run(spec: dict[str, Any]) -> dict[str, Any]:
    key = f"run|{spec['name']}|{spec['lr']:g}|{spec['seed']}|{spec['budget']}"
    return cached(key, train_run, spec)


def cbs_run(spec: dict[str, Any]) -> dict[str, Any]:
    key = f"cbs|{spec['lr']:g}|{spec['seed']}|{spec['budget']}|{DROP}|{','.join(map(str, BRANCHES))}"
    # plain SGD keeps no state; Adam's branches each start from the checkpoint's own moments
    key += "|sgd" if spec["optimizer"] == "sgd" else "|fresh-moments"
    return cached(key, cbs_seed, spec)


def spec_of(name: str, lr: float, seed: int, quick: bool) -> dict[str, Any]:
    mode, base, _ = {**SCHEDULES, **SGD_SCHEDULES}[name]
    budget = BUDGET // 8 if quick else BUDGET
    return {
        "name": name,
        "mode": mode,
        "base": base,
        "lr": lr,
        "seed": seed,
        "budget": budget,
        "quick": quick,
        "fraction": FRACTIONS.get(name, 1.0),
        "optimizer": "sgd" if name in SGD_SCHEDULES else "adam",
    }


def tune(grids: dict[str, list[float]], run_many) -> dict[str, dict[str, Any]]:
    """Each schedule's lr grid on seed 0, extended by a factor 2 past an edge that wins (twice at most),
    then the best lr's other seeds; ``run_many([(schedule, lr, seed), ...])`` runs them (in parallel) and
    returns their records. Per schedule: the grid's finals, the best lr, the seed runs."""
    grids = {name: list(grid) for name, grid in grids.items()}
    finals: dict[str, dict[float, float]] = {name: {} for name in grids}
    for _ in range(3):
        todo = [(n, lr, 0) for n, grid in grids.items() for lr in grid if lr not in finals[n]]
        for (name, lr, _), run in zip(todo, run_many(todo), strict=True):
            finals[name][lr] = run["final"] if math.isfinite(run["final"]) else math.inf
        grown = False
        for name, grid in grids.items():
            best = min(finals[name], key=finals[name].get)
            if best == min(grid) and len(grid) < 6:
                grid.insert(0, best / 2)
                grown = True
            elif best == max(grid) and len(grid) < 6:
                grid.append(best * 2)
                grown = True
        if not grown:
            break
    best = {name: min(finals[name], key=finals[name].get) for name in grids}
    runs = run_many([(n, best[n], seed) for n in grids for seed in SEEDS])
    return {
        name: {
            "grid": {f"{lr:g}": v for lr, v in sorted(finals[name].items())},
            "lr": best[name],
            "runs": [r for r in runs if r["name"] == name],
        }
        for name in grids
    }


def ft_run(name: str, lr: float, seed: int) -> dict[str, Any]:
    """One harness run of the fine-tuning workload (reused when finished): its held-out (dev) loss
    against examples and steps."""
    options, every, _ = FT_SCHEDULES[name]
    args = [*FT_COMMON, *options, "--eval-every", str(every), "--lr", f"{lr:g}", "--seed", str(seed)]
    out = RUNS / "batch_schedule" / name / f"lr{lr:g}-seed{seed}"
    summary = finetune(args, out, report_only=False)
    examples, seen, curve = 0, {}, []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "dev_loss" in row:
            curve.append([seen[row["step"]], row["step"], row["dev_loss"], row.get("b_simple")])
        elif "step" in row:
            examples += row.get("batch_size", summary["batch_size"])
            seen[row["step"]] = examples
    return {
        "name": name,
        "lr": lr,
        "seed": seed,
        "curve": curve,
        "final": curve[-1][2],
        "steps": summary["steps"],
        "changes": summary.get("batch_schedule", {}).get("changes", []),
        "cpu_seconds": json.loads((out / "cpu.json").read_text())["cpu_seconds"],
        "test_accuracy": summary["test_accuracy"],
    }


def steps_to(curve: list[list[Any]], target: float) -> float | None:
    """The optimiser step where the held-out curve first reaches ``target`` (interpolated), or None."""
    for (_, s0, l0, _), (_, s1, l1, _) in zip(curve, curve[1:], strict=False):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1) if l0 > target else float(s0)
    return None


def schedule_table(tuned: dict[str, Any], workload: str) -> tuple[dict[str, Any], float, dict[str, Any]]:
    """(b)'s table for ``workload``, the fixed small batch's threshold (its final mean + sd), and per
    schedule the numbers the goals read."""
    small, small_sd = mean_and_sd([r["final"] for r in tuned["fixed-16"]["runs"]])
    threshold = small + small_sd
    small_steps = statistics.fmean(r["steps"] for r in tuned["fixed-16"]["runs"])
    rows, numbers = [], {}
    for name, t in tuned.items():
        finals = [r["final"] for r in t["runs"]]
        reach = [steps_to(r["curve"], threshold) for r in t["runs"]]
        reached = [s for s in reach if s is not None]
        steps = statistics.fmean(r["steps"] for r in t["runs"])
        examples = t["runs"][0]["curve"][-1][0]
        mean, sd = mean_and_sd(finals)
        numbers[name] = {"final": mean, "sd": sd, "steps": steps, "reach": reach}
        # the largest batch a run reached (a fixed batch: its examples over its steps)
        batches = sorted({c["batch"] for r in t["runs"] for c in r["changes"]} | {round(examples / steps)})
        rows.append(
            [
                name,
                f"{t['lr']:g}",
                f"{mean:.4f} ± {sd:.4f}",
                f"{steps:.0f} ({steps / small_steps:.2f}x)",
                f"{statistics.fmean(reached):.0f} ({len(reached)}/3)" if reached else "not reached",
                f"{batches[-1]}",
                f"{statistics.fmean(r['cpu_seconds'] for r in t['runs']):.0f}",
            ]
        )
    table = {
        "caption": f"{workload}: the same {tuned['fixed-16']['runs'][0]['curve'][-1][0]:,} examples with each "
        "schedule at its "
        f"best lr (seed 0 grid), 3 seeds. The threshold is the fixed small batch's final held-out loss plus "
        f"one seed sd: {threshold:.4f}.",
        "columns": [
            "schedule",
            "best lr",
            "final held-out loss",
            "optimiser steps (vs fixed-16)",
            "steps to the threshold (seeds reaching it)",
            "largest batch",
            "CPU s per run",
        ],
        "rows": rows,
    }
    return table, threshold, numbers


def recomputed(cbs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The critical batch of every point read again from its branches' steps with the library's rule
    as it is now (the cache keeps the steps, the measurement)."""
    for record in cbs:
        for point in record["points"]:
            if point.get("branch_steps") and record.get("workload") != "minilm":
                point.update(read_cbs(point["branch_steps"]))
    return cbs


def cbs_table(cbs: list[dict[str, Any]]) -> dict[str, Any]:
    rows = []
    for record in cbs:
        if record.get("failed"):  # the monitored run diverged: no checkpoint to branch from
            rows.append([workload_of(record), record["seed"], "-", "diverged", "-", "-", "-", "-"])
        for p in record["points"]:
            optimizer = workload_of(record)
            if p.get("b_simple") is None:
                rows.append([optimizer, record["seed"], p["examples"], "-", "not measurable", "-", "-", "-"])
                continue
            ratio = p["b_simple"] / p["cbs"] if p["cbs"] else None
            rows.append(
                [
                    optimizer,
                    record["seed"],
                    f"{p['examples']:,}",
                    f"{p['loss']:.3f}",
                    f"{p['b_simple']:.0f}",
                    f"{p['b_noise']:.0f}" if p["b_noise"] else "not positive",
                    p["cbs_text"],
                    f"{ratio:.2f}" if ratio else "-",
                ]
            )
    return {
        "caption": "The critical batch by branching (Zhang et al.'s 20% rule, each branch at the checkpoint's lr "
        "times the optimiser's law) beside the online B_simple and the Hessian-aware B_noise at the same "
        f"checkpoint. Char: branches at {', '.join(map(str, BRANCHES))} to a {100 * DROP:.0f}% lower held-out loss "
        "from the fixed-16 run (AdamW) and the plain-SGD run at batch 16 (sgd-16). MiniLM: gradkit noise-scale "
        f"--branch {','.join(map(str, FT_BRANCHES))} to a {100 * FT_DROP:.0f}% lower held-out loss, the measuring "
        f"run at fixed-16's lr (constant) ending at steps {', '.join(map(str, FT_POINTS))}.",
        "columns": [
            "run",
            "seed",
            "examples",
            "held-out loss",
            "online B_simple",
            "B_noise (Hessian)",
            "branched CBS",
            "B_simple / CBS",
        ],
        "rows": rows,
    }


def fewer_steps_goal(numbers: dict[str, Any], threshold: float, workload: str) -> dict[str, Any]:
    """noise against the fixed small batch, on the seed means: its final held-out loss within the small
    batch's mean plus one seed sd, in >= 30% fewer optimiser steps (its whole run's). The noise row with
    the lowest mean final loss stands for the schedule; the seeds that reached the threshold are named."""
    small = numbers["fixed-16"]
    name = min((v for v in numbers if v.startswith("noise")), key=lambda v: numbers[v]["final"])
    noise = numbers[name]
    reached = noise["final"] <= threshold
    fewer = 1 - noise["steps"] / small["steps"]
    seeds = sum(s is not None for s in noise["reach"])
    return {
        "goal": "noise reaches the fixed small batch's final held-out loss (within its seed sd) with >= 30% "
        f"fewer optimiser steps ({workload})",
        "target": f"mean final held-out loss <= {threshold:.4f} (fixed-16's mean + sd) in <= "
        f"{0.7 * small['steps']:.0f} steps (fixed-16: {small['steps']:.0f})",
        "measured": f"{name}: mean final {noise['final']:.4f} ± {noise['sd']:.4f} in {noise['steps']:.0f} steps "
        f"({100 * fewer:.0f}% fewer); {seeds} of {len(noise['reach'])} seeds reached the threshold",
        "met": reached and fewer >= 0.3,
    }


def workload_of(record: dict[str, Any]) -> str:
    """``char AdamW``, ``char SGD`` or ``MiniLM AdamW``."""
    workload = "MiniLM" if record.get("workload") == "minilm" else "char"
    return f"{workload} {'SGD' if record.get('optimizer') == 'sgd' else 'AdamW'}"


def within_goal(cbs: list[dict[str, Any]], optimizer: str) -> dict[str, Any]:
    """B_simple against the branched critical batch at every point where the branches measure one
    (a bracket is not a measurement), per workload; B_noise's count beside it."""
    parts, ratios = [], []
    for workload in dict.fromkeys(workload_of(r) for r in cbs):
        records = [r for r in cbs if workload_of(r) == workload]
        measured = [p for r in records for p in r["points"] if p.get("cbs")]
        these = [p["b_simple"] / p["cbs"] for p in measured]
        noise = [p["b_noise"] / p["cbs"] for p in measured if p.get("b_noise")]
        rest = sum(1 for r in records for p in r["points"] if p.get("b_simple") and not p.get("cbs"))
        parts.append(
            f"{workload}: B_simple within 2x at {sum(0.5 <= r <= 2 for r in these)} of {len(these)} points "
            f"(ratios {', '.join(f'{r:.2f}' for r in these)}), the Hessian B_noise at "
            f"{sum(0.5 <= r <= 2 for r in noise)} of {len(noise)}; {rest} {'point' if rest == 1 else 'points'} only "
            "bracketed or not reached"
        )
        ratios += these
    return {
        "goal": "the online estimate lands within 2x of the branched CBS at every point where CBS is measurable "
        f"({optimizer})",
        "target": "0.5 <= B_simple / CBS <= 2 at every measurable point",
        "measured": "; ".join(parts) if parts else "not measured",
        "met": bool(ratios) and all(0.5 <= r <= 2 for r in ratios),
    }


def goals(
    char: tuple[dict[str, Any], float],
    finetuned: tuple[dict[str, Any], float] | None,
    cbs: list[dict[str, Any]],
    cost: dict[str, float],
) -> list[dict]:
    """One entry per goal of the issue: target, measured, met."""
    extra = (cost["monitored"] - cost["plain"]) / cost["plain"]
    return [
        within_goal([r for r in cbs if r.get("optimizer", "adam") == "adam"], "AdamW"),
        within_goal([r for r in cbs if r.get("optimizer") == "sgd"], "plain SGD"),
        fewer_steps_goal(*char, "char transformer"),
        fewer_steps_goal(*finetuned, "MiniLM full fine-tuning on SST-2")
        if finetuned is not None
        else {
            "goal": "the same on the fine-tuning workload (all-MiniLM-L6-v2 full fine-tuning on SST-2)",
            "target": ">= 30% fewer optimiser steps at the fixed small batch's final held-out loss",
            "measured": "not measured in this run",
            "met": False,
        },
        {
            "goal": "the monitor-and-schedule overhead per example <= 5% of a training step",
            "target": "<= 5% at the base batch",
            "measured": f"{100 * extra:.1f}% ({cost['monitored']:.1f} ms against {cost['plain']:.1f} ms a step of {BASE}; "
            f"splitting into two micro-batches alone: {100 * (cost['split'] / cost['plain'] - 1):.1f}%)",
            "met": extra <= 0.05,
        },
    ]


def curve_panels(by_examples, by_steps, tuned: dict[str, Any], workload: str) -> None:
    """Held-out loss against examples (the seeds' curves interpolated onto common examples, then
    averaged: a growing batch evaluates at other examples on each seed) and against optimiser steps
    (each seed's curve: the seeds end at different steps)."""
    import numpy as np

    for i, (name, t) in enumerate(tuned.items()):
        curves = [[point for point in r["curve"] if point[0] > 0] for r in t["runs"]]
        first = max(c[0][0] for c in curves)
        grid = np.linspace(first, min(c[-1][0] for c in curves), 25)
        mean = np.mean([np.interp(grid, [p[0] for p in c], [p[2] for p in c]) for c in curves], axis=0)
        by_examples.plot(grid, mean, color=f"C{i}", label=f"{name} (lr {t['lr']:g})")
        for j, c in enumerate(curves):
            by_steps.plot(
                [p[1] for p in c], [p[2] for p in c], color=f"C{i}", alpha=0.6, label=name if j == 0 else None
            )
    by_examples.set(
        xlabel="examples", ylabel="held-out loss (mean of 3 seeds)", title=f"{workload}: against examples"
    )
    by_steps.set(
        xlabel="optimiser steps",
        ylabel="held-out loss (each seed)",
        xscale="log",
        title=f"{workload}: against optimiser steps",
    )


def plot(tuned: dict[str, Any], cbs: list[dict[str, Any]], finetuned: dict[str, Any] | None) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 1 if finetuned is None else 2
    fig, axes = plt.subplots(rows, 3, figsize=(15, 4.2 * rows), dpi=110, squeeze=False)
    curve_panels(axes[0][0], axes[0][1], tuned, "char transformer")
    cbs_panel(
        axes[0][2],
        [r for r in cbs if r.get("workload") != "minilm"],
        "char transformer, batch-16 runs, 3 seeds",
    )
    used = [axes[0][0], axes[0][1], axes[0][2]]
    if finetuned is not None:
        curve_panels(axes[1][0], axes[1][1], finetuned, "MiniLM on SST-2")
        minilm = [r for r in cbs if r.get("workload") == "minilm"]
        cbs_panel(axes[1][2], minilm, f"MiniLM on SST-2, noise-scale --branch, {len(minilm)} seed(s)")
        used += [axes[1][0], axes[1][1], axes[1][2]]
    for ax in used:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = IMAGES / "batch_schedule.png"
    save_figure(fig, path)
    return [str(path.relative_to(ROOT))]


def cbs_panel(noise, cbs: list[dict[str, Any]], title: str) -> None:
    """The branched critical batch and the online B_simple against the checkpoint's examples."""
    for r in cbs:
        filled = r.get("optimizer", "adam") == "adam"  # SGD's points hollow
        for key, color, marker in (("cbs", "C3", "s"), ("b_simple", "C0", "o")):
            points = [p for p in r["points"] if p.get(key)]
            noise.scatter(
                [p["examples"] for p in points],
                [p[key] for p in points],
                marker=marker,
                facecolors=color if filled else "none",
                edgecolors=color,
            )
    for key, color, marker in (("branched CBS (20% rule)", "C3", "s"), ("online B_simple", "C0", "o")):
        noise.scatter([], [], color=color, marker=marker, label=f"{key}: AdamW filled, SGD hollow")
    noise.set(xlabel="examples at the checkpoint", ylabel="batch size", yscale="log", title=title)


def run(quick: bool, jobs: int) -> dict[str, Any]:
    # first, while nothing else of this benchmark runs; kept with the runs, so a report rerun repeats it
    record = cached("overhead", lambda spec: overhead(spec["quick"]), {"quick": quick})
    cost = {name: ms for name, ms in record.items() if name != "key"}
    context = multiprocessing.get_context("spawn")
    with context.Pool(jobs) as pool:
        grids = {name: grid for name, (_, _, grid) in SCHEDULES.items()}
        tuned = tune(grids, lambda todo: pool.map(schedule_run, [spec_of(*item, quick) for item in todo]))
        cbs = pool.map(cbs_run, [spec_of("fixed-16", tuned["fixed-16"]["lr"], s, quick) for s in SEEDS])
        grids = {name: grid for name, (_, _, grid) in SGD_SCHEDULES.items()}
        sgd = tune(grids, lambda todo: pool.map(schedule_run, [spec_of(*item, quick) for item in todo]))
        cbs += pool.map(cbs_run, [spec_of("sgd-16", sgd["sgd-16"]["lr"], s, quick) for s in SEEDS])
    cbs = recomputed(cbs)
    finetuned = None
    if not quick:
        with ThreadPoolExecutor(jobs) as threads:
            grids = {name: grid for name, (_, _, grid) in FT_SCHEDULES.items()}
            finetuned = tune(grids, lambda todo: list(threads.map(lambda item: ft_run(*item), todo)))
            lr = finetuned["fixed-16"]["lr"]
            cbs += list(threads.map(lambda seed: ft_cbs(seed, lr), FT_CBS_SEEDS))
    table, threshold, numbers = schedule_table(tuned, "char transformer (examples: windows of 64 characters)")
    tables = [table]
    ft_goal = None
    if finetuned is not None:
        ft_table, ft_threshold, ft_numbers = schedule_table(finetuned, "MiniLM full fine-tuning on SST-2")
        tables.append(ft_table)
        ft_goal = (ft_numbers, ft_threshold)
    grid = {
        "caption": "lr search on seed 0: final held-out loss per lr",
        "columns": ["schedule", "lr: final held-out loss"],
        "rows": [
            [n, ", ".join(f"{lr}: {v:.4f}" for lr, v in t["grid"].items())]
            for n, t in {**tuned, **sgd}.items()
        ],
    }
    timing = {
        "caption": f"ms per step of {BASE} windows, interleaved in one process (median of 7 turns of 20 steps)",
        "columns": ["plain", "two micro-batches", "two micro-batches + noise monitor + schedule"],
        "rows": [[f"{cost['plain']:.1f}", f"{cost['split']:.1f}", f"{cost['monitored']:.1f}"]],
    }
    return {
        "name": "batch_schedule" + ("_quick" if quick else ""),
        "title": "A batch that grows with the noise scale, against fixed batches and a ramp (char transformer, MiniLM)",
        "claim": "Growing the batch as the measured noise scale grows reaches the small batch's loss in fewer optimiser "
        "steps for the same examples; the online B_simple lands near the critical batch measured by branching.",
        "tables": [*tables, cbs_table(cbs), timing, grid],
        "plots": [] if quick else plot(tuned, cbs, finetuned),
        "notes": [
            f"Model: toy_transformer(vocab=65, d_model={D_MODEL}, n_layers={LAYERS}, n_heads={HEADS}, norm='pre'), "
            f"context {CONTEXT}, AdamW without weight decay, budget {BUDGET:,} windows, base batch {BASE}, cap {MAX_BATCH}; "
            f"noise: decisions every {CHECK} steps, fraction 1 (noise-0.25: 0.25), B_simple smoothed with beta {NOISE_BETA}; ramp doubles every {BUDGET // 8:,} windows.",
            "MiniLM: gradkit finetune --method full from the label-text head on the full SST-2 training file (2% "
            f"held out), --examples {FT_BUDGET}, base batch 16, --batch-max {FT_MAX}, max length 64, warm-up 5%; noise "
            "decides every 10 steps; the held-out (dev) loss is evaluated every few steps and at the end.",
            "Critical batch (a): a branch's steps to the target are interpolated between its evaluations and "
            "rounded up to a whole step. Char: the held-out loss every ~256 examples. MiniLM: every 32 examples, "
            "at most 2,048 examples a branch; the measuring run's lr is fixed-16's best "
            "(1e-4), constant, its B_simple from two micro-batches of 8 (beta 0.95). The plain-SGD run is sgd-16 "
            "at its best lr; a seed whose monitored run diverged has no checkpoints.",
            "lr per schedule chosen on seed 0 from a factor-2 grid (extended past a winning edge), then 3 seeds; the lr "
            "schedule is the harness's: 5% warm-up, linear decay to 0 over examples, times the schedule's lr factor.",
        ],
        "goals": goals((numbers, threshold), ft_goal, cbs, cost),
        "raw": {"tuned": tuned, "sgd": sgd, "finetuned": finetuned, "cbs": cbs, "overhead": cost},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: an eighth of the budget")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time, one torch thread each")
    args = ap.parse_args()
    result = run(args.quick, args.jobs)
    if args.quick:  # a smoke run's numbers mean nothing: kept beside its cache, not among the results
        (CACHE / "quick.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {(CACHE / 'quick.json').relative_to(ROOT)}")
    else:
        report(result)


if __name__ == "__main__":
    main()
