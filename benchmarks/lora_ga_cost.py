"""lora_ga_cost: what LoRA-GA's initialisation costs — gradkit's exact and sketch estimators against
PEFT's own ``preprocess_loraga`` + ``LoraConfig(init_lora_weights="lora_ga")``, on the same batches.

Each run happens in a child process of its own (this script with ``--child``), so its peak memory is
its own: after the model and batches are loaded the child resets its peak-RSS mark (Linux
``/proc/self/clear_refs``; where that is refused, the current RSS is the baseline) and reports
``ru_maxrss`` after the initialisation minus that baseline (the "live peak" from one extra run per method
with a fixed malloc mmap threshold, so that it tracks live bytes; see LIVE_PEAK_ENV). Wall time and the process's CPU time cover
the estimation and the initialisation (SVDs, offsets); with one torch thread the CPU time is the one that
other work sharing the machine inflates least. "Estimator bytes" is an exact count of the tensors each
estimator holds at its peak: PEFT's and gradkit exact's per-layer fp32 gradients, gradkit sketch's
states (plus one layer update's workspace for the one-pass sketch).
A reference row runs the same forward and backward passes with every weight requiring grad (what any
gradient estimate costs at least, with full backward).

Settings:
  (a) all-MiniLM-L6-v2 + SST-2, 16 batches of 32 x 64 tokens (activations dominate memory);
  (b) a randomly initialised BERT-large-shaped encoder (hidden 1024, 24 layers, intermediate 4096,
      ~300 M parameters) with batches of 2 x 32 SST-2 tokens, 8 batches (gradients dominate memory).
LoRA r = 8, alpha = 16 on every encoder Linear, classification head in ``modules_to_save``.

    python -m benchmarks.lora_ga_cost            # both settings (several minutes on 2 CPU cores)
    python -m benchmarks.lora_ga_cost --quick    # a smoke run: tiny sizes, the same code path
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT, machine, write_result

SST2 = ROOT / "data" / "sst2" / "train.tsv"
METHODS = ("peft", "gradkit-exact", "gradkit-sketch", "gradkit-sketch2", "backward-reference")
LABELS = {
    "peft": "PEFT preprocess_loraga + init_lora_weights='lora_ga'",
    "gradkit-exact": "gradkit lora_ga_init, estimator='exact'",
    "gradkit-sketch": "gradkit lora_ga_init, estimator='sketch' (one pass, the default)",
    "gradkit-sketch2": "gradkit lora_ga_init, estimator='sketch', sketch_passes=2",
    "backward-reference": "reference: the same forward+backward passes, all weights require grad",
}
ACCURACY = "accuracy"  # a child that compares both sketches with the exact gradients (setting a only)
SETTINGS: dict[str, dict[str, Any]] = {
    "a": {"title": "(a) all-MiniLM-L6-v2, SST-2", "model": "minilm", "batches": 16, "size": 32, "length": 64},
    "b": {
        "title": "(b) random BERT-large-shaped encoder",
        "model": "bert-large",
        "batches": 8,
        "size": 2,
        "length": 32,
        "hidden": 1024,
        "layers": 24,
        "heads": 16,
        "intermediate": 4096,
    },
}
QUICK: dict[str, dict[str, Any]] = {  # the same code path, tiny sizes
    "a": {**SETTINGS["a"], "batches": 2, "size": 4, "length": 16},
    "b": {
        **SETTINGS["b"],
        "batches": 2,
        "size": 2,
        "length": 8,
        "hidden": 64,
        "layers": 2,
        "heads": 2,
        "intermediate": 256,
    },
}
RANK, ALPHA = 8, 16


# ---------------------------------------------------------------------------------------------- child
def _rss_reset() -> tuple[int, str]:
    """Reset the peak-RSS mark to the current RSS where Linux allows; returns (baseline KiB, how)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "clear_refs"
    except OSError:
        with open("/proc/self/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return rss, "current VmRSS"


def _batches(setting: dict[str, Any]):
    import torch

    from gradkit.data import load_text_classification
    from gradkit.data.text import shuffled_order
    from gradkit.train.model import load_tokenizer

    data = load_text_classification(str(SST2) if SST2.is_file() else None)
    tokenizer = load_tokenizer()  # MiniLM's: BERT's uncased 30,522-token vocabulary
    order = shuffled_order(len(data), 0)
    n, size, length = setting["batches"], setting["size"], setting["length"]
    batches = []
    for i in range(n):
        rows = [order[(i * size + j) % len(order)] for j in range(size)]
        enc = dict(
            tokenizer(
                [data.texts[k] for k in rows],
                padding="max_length",
                truncation=True,
                max_length=length,
                return_tensors="pt",
            )
        )
        enc["labels"] = torch.tensor([data.labels[k] for k in rows])
        batches.append(enc)
    return batches


def _model(setting: dict[str, Any]):
    import torch
    from transformers import BertConfig, BertModel

    from gradkit.train.model import SequenceClassifier, load_classifier

    if setting["model"] == "minilm":
        return load_classifier(None, num_labels=2, seed=0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=setting["hidden"],
        num_hidden_layers=setting["layers"],
        num_attention_heads=setting["heads"],
        intermediate_size=setting["intermediate"],
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SequenceClassifier(BertModel(config, add_pooling_layer=False), 2)
    return model


def _lora_config(model, **kwargs):
    from peft import LoraConfig

    from gradkit.train.model import lora_target_names

    return LoraConfig(
        r=RANK,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules=lora_target_names(model),
        modules_to_save=["head"],
        **kwargs,
    )


def accuracy_child(setting: dict[str, Any], threads: int | None) -> dict[str, Any]:
    """Each sketch's rank-2r error against the optimal one, per layer, on the benchmark's own batches."""
    import torch
    from peft import get_peft_model

    from gradkit.lora.estimate import estimate_gradients, estimate_sketches
    from gradkit.lora.pairs import lora_pairs
    from gradkit.lora.sketch import relative_excess_error

    if threads:
        torch.set_num_threads(threads)
    model = _model(setting)
    model = get_peft_model(model, _lora_config(model))
    batches = _batches(setting)
    pairs = lora_pairs(model)
    grads, _ = estimate_gradients(model, batches, pairs, progress=False)
    out: dict[str, Any] = {"layers": len(pairs)}
    for passes in (1, 2):
        sketches, _ = estimate_sketches(model, batches, pairs, progress=False, passes=passes)
        errors = sorted(
            relative_excess_error(grads[p.name], *sketches[p.name].svd(2 * p.rank)) for p in pairs
        )
        out[f"passes_{passes}"] = {
            "within_5pct": sum(e <= 0.05 for e in errors) / len(errors),
            "median": errors[len(errors) // 2],
            "max": errors[-1],
        }
    return out


def child(method: str, setting: dict[str, Any], threads: int | None) -> dict[str, Any]:
    import gc

    import torch

    if method == ACCURACY:
        return accuracy_child(setting, threads)
    if threads:
        torch.set_num_threads(threads)
    model = _model(setting)
    batches = _batches(setting)
    out: dict[str, Any] = {"method": method, "parameters": sum(p.numel() for p in model.parameters())}
    if method.startswith("gradkit"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(model))
    gc.collect()
    baseline, how = _rss_reset()
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == "peft":
        from peft import LoraGAConfig, get_peft_model, preprocess_loraga
        from peft.tuners.lora.loraga import get_target_modules

        config = _lora_config(
            model,
            init_lora_weights="lora_ga",
            lora_ga_config=LoraGAConfig(direction="ArB2r", scale="stable", stable_gamma=16),
        )

        def train_step() -> None:
            for batch in batches:
                model(**batch).loss.backward()

        preprocess_loraga(model, config, train_step)
        out["estimate_seconds"] = time.perf_counter() - start
        out["estimator_bytes"] = sum(m._peft_loraga_grad.nbytes for _, m in get_target_modules(model, config))
        model = get_peft_model(model, config)
    elif method == "backward-reference":
        model.train()
        for batch in batches:
            model(**batch).loss.backward()
        out["estimate_seconds"] = time.perf_counter() - start
        out["estimator_bytes"] = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
    else:
        from gradkit.lora.ga import lora_ga_init

        estimator = "exact" if method == "gradkit-exact" else "sketch"
        passes = 2 if method == "gradkit-sketch2" else 1
        report = lora_ga_init(model, batches, estimator=estimator, sketch_passes=passes, progress=False)
        out["estimate_seconds"] = report.estimate_seconds
        out["estimator_bytes"] = report.bytes_held
        out["energy_captured"] = report.energy_captured
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_increase_mb"] = (peak - baseline) / 1024
    out["baseline_rss_mb"] = baseline / 1024
    out["baseline"] = how
    return out


# --------------------------------------------------------------------------------------------- parent
# glibc's malloc keeps freed heap memory and moves its mmap threshold as it goes, so ru_maxrss varies by
# +-50 MB between runs of the same method; with a fixed threshold every tensor above it is its own mapping,
# returned on free, and the peak RSS tracks the live bytes (measured: identical across repeated runs). It
# slows allocation (fresh pages are zeroed), so those runs give the peak and the timed runs the time.
LIVE_PEAK_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def run_child(
    method: str, setting: dict[str, Any], threads: int | None, live_peak: bool = False
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.lora_ga_cost",
        "--child",
        method,
        "--setting",
        json.dumps(setting),
    ]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if live_peak:
        env.update(LIVE_PEAK_ENV)
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each measured figure over repeated runs of one method (bytes are exact: the same)."""
    import statistics

    keys = ("seconds", "cpu_seconds", "peak_increase_mb")
    return {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in keys}}


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}x" if y else "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--child`` and ``--setting`` are the child process's."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, the same code path (a smoke run)")
    parser.add_argument("--settings", default="a,b", help="comma-separated: a, b (default %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads in each child (default: torch's)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="timed runs of each method, medians shown (default %(default)s)",
    )
    parser.add_argument("--child", choices=(*METHODS, ACCURACY), help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def measure_setting(key: str, setting: dict[str, Any], args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Every method on one setting, each in its own child, round robin: the cost table (and, for setting
    a, the sketches' accuracy table) and the raw runs."""
    tables: list[dict[str, Any]] = []
    repeats: dict[str, list[dict[str, Any]]] = {method: [] for method in METHODS}
    live: dict[str, dict[str, Any]] = {}
    for rep in range(args.repeats + 1):  # round robin, so a drift in the machine's load hits every method
        for method in METHODS:
            live_run = rep == args.repeats
            kind = "live peak" if live_run else f"timed run {rep + 1}/{args.repeats}"
            print(f"{setting['title']}: {LABELS[method]} ({kind}) ...", flush=True)
            r = run_child(method, setting, args.threads, live_peak=live_run)
            if live_run:
                live[method] = r
            else:
                repeats[method].append(r)
            print(
                f"  {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), peak +{r['peak_increase_mb']:.0f} MB, "
                f"estimator {r['estimator_bytes'] / 2**20:.1f} MiB",
                flush=True,
            )
    runs = {method: _median_run(done) for method, done in repeats.items()}
    peft_run = runs["peft"]
    rows = []
    for method in METHODS:
        r = runs[method]
        rows.append(
            [
                LABELS[method],
                f"{r['seconds']:.1f}",
                _ratio(r["seconds"], peft_run["seconds"]),
                f"{r['cpu_seconds']:.1f}",
                _ratio(r["cpu_seconds"], peft_run["cpu_seconds"]),
                f"{live[method]['peak_increase_mb']:.0f}",
                _ratio(live[method]["peak_increase_mb"], live["peft"]["peak_increase_mb"]),
                ", ".join(f"{x['peak_increase_mb']:.0f}" for x in repeats[method]),
                f"{r['estimator_bytes'] / 2**20:.1f}",
                _ratio(r["estimator_bytes"], peft_run["estimator_bytes"]),
            ]
        )
        if method != "peft":
            print(
                f"{setting['title']}: {method} / PEFT: wall {rows[-1][2]}, CPU {rows[-1][4]}, "
                f"peak increase {rows[-1][6]}, estimator bytes {rows[-1][9]}"
            )
    shape = (
        f"{setting['batches']} batches of {setting['size']} x {setting['length']} tokens, "
        f"{peft_run['parameters'] / 1e6:.1f} M parameters"
    )
    tables.append(
        {
            "caption": f"{setting['title']}: {shape}; LoRA r = {RANK}; ratios are against PEFT (< 1: cheaper)",
            "columns": [
                "initialisation",
                "wall s",
                "wall / PEFT",
                "CPU s",
                "CPU / PEFT",
                "live peak increase MB",
                "live peak / PEFT",
                "RSS peak increase MB, timed runs",
                "estimator MiB",
                "bytes / PEFT",
            ],
            "rows": rows,
        }
    )
    raw = {"setting": setting, "runs": repeats, "live_peak_runs": live}
    if key == "a":
        print(f"{setting['title']}: sketch accuracy against the exact gradients ...", flush=True)
        acc = run_child(ACCURACY, setting, args.threads)
        raw["accuracy"] = acc
        tables.append(
            {
                "caption": f"{setting['title']}, the same batches: each sketch's rank-{2 * RANK} error "
                f"||G - G_hat||_F against the optimal ||G - G_{2 * RANK}||_F, over {acc['layers']} layers",
                "columns": ["sketch", "layers within 5 % of optimal", "median excess", "worst excess"],
                "rows": [
                    [
                        LABELS[method].split(", ", 1)[1],
                        f"{100 * acc[part]['within_5pct']:.0f} %",
                        f"{100 * acc[part]['median']:.1f} %",
                        f"{100 * acc[part]['max']:.1f} %",
                    ]
                    for method, part in (("gradkit-sketch", "passes_1"), ("gradkit-sketch2", "passes_2"))
                ],
            }
        )
        print(json.dumps(acc), flush=True)
    return tables, raw


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure every setting of ``--settings``; returns the result (``name`` and the fields of
    ``benchmarks/results/<name>.json``)."""
    import peft

    table_settings = QUICK if args.quick else SETTINGS
    load_before = os.getloadavg()[0]  # other work on the machine skews wall times: say how much there was
    tables, raw, notes = [], {}, []
    for key in [s.strip() for s in args.settings.split(",") if s.strip()]:
        setting_tables, raw[key] = measure_setting(key, table_settings[key], args)
        tables += setting_tables
    notes += [
        f"peft {peft.__version__}. PEFT estimates in train mode (dropout on) with a full fp32 gradient per target "
        "weight; gradkit estimates in eval mode. PEFT folds the singular values into B and scales only B; "
        "gradkit's factors are the paper's (orthonormal, both scaled), so the two inits differ by design.",
        "gradkit sketch (one pass) streams a truncated SVD of each layer's gradient sum: it holds w (in + out + 1) "
        "+ 8 out floats per layer, w = 3r = 24, plus one layer update's workspace; no weight-gradient "
        "product is formed. sketch_passes=2 runs the batches twice (range/co-range sketches, then exact "
        "products with the bases found) and holds (k + l)(in + out) + 8 out floats per layer, k = 2r + 8, "
        "l = 2k + 1.",
        "Peak increase: ru_maxrss after the initialisation minus the RSS after model and batches were loaded, "
        "each run a fresh child process (baseline method per run in the raw data). With glibc's default "
        "allocator it varies by tens of MB between runs of the same method (freed heap memory is kept, the "
        "mmap threshold moves), so each method also runs once with MALLOC_MMAP_THRESHOLD_=131072: every "
        "tensor above 128 KiB is then its own mapping, returned when freed, and the peak tracks the live "
        "bytes (the 'live peak' columns; repeated runs gave the same figure to the MB). Times are medians of "
        f"{args.repeats} timed runs with the default allocator, run round robin over the methods.",
        f"Torch threads per child: {args.threads or 'torch default'}; 1-minute load average "
        f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end "
        f"(above the child's own share it means other processes shared the {os.cpu_count()} cores).",
    ]
    if args.quick:
        notes.insert(0, "QUICK smoke run (tiny sizes): the numbers say nothing about cost.")
    return {
        "name": "lora_ga_cost",
        "title": "LoRA-GA initialisation cost: gradkit exact and sketch vs PEFT",
        "claim": "gradkit's one-pass sketch estimator holds a fraction of the gradient bytes PEFT's LoRA-GA "
        "holds, with a rank-2r error near the optimal one; time and peak memory as measured.",
        "tables": tables,
        "notes": notes,
        "raw": raw,
    }


def report(result: dict[str, Any], args: argparse.Namespace) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command); a smoke
    run's (``--quick``) to the temporary folder instead."""
    if args.quick:  # never into benchmarks/results/, which docs/benchmarks.md is rendered from
        fields = {k: v for k, v in result.items() if k != "name"}
        path = Path(tempfile.gettempdir()) / "lora_ga_cost_quick.json"
        path.write_text(json.dumps({"name": "lora_ga_cost_quick", "machine": machine(), **fields}, indent=2))
        print(f"wrote {path} (quick run: not a result)")
    else:
        write_result(result["name"], result)


def main() -> None:
    args = parse_args()
    if args.child:  # one measured run, in a process of its own: its result on the last line of stdout
        print(json.dumps(child(args.child, json.loads(args.setting), args.threads)))
        return
    report(run(args), args)


if __name__ == "__main__":
    main()
