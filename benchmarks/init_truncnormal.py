"""init_truncnormal: what std and what tail each "truncated normal, std 0.02" really gives, on 10^8 draws.

    OMP_NUM_THREADS=1 python -m benchmarks.init_truncnormal --draws 1000000   # seconds: a smoke run
    python -m benchmarks.init_truncnormal                                     # the measured table, 10^8 draws

Peers, all asked for std 0.02, in the same process:

- ``gradkit.init.truncated_normal_(t, 0.02)``: cut at ±2σ of a normal whose σ makes the real std 0.02;
- ``torch.nn.init.trunc_normal_(t, std=0.02)``: defaults a=-2, b=2 are ABSOLUTE (±100 std): no real cut;
- ``torch.nn.init.trunc_normal_(t, std=0.02, a=-0.04, b=0.04)``: the cut at ±2σ, std before truncation;
- timm's ``trunc_normal_tf_(t, std=0.02)``: cut at ±2σ (a, b in σ units), std before truncation;
- TensorFlow's ``truncated_normal(stddev=0.02)`` (BERT's), computed from its definition (cut at ±2σ,
  real std 0.02·0.8796), TensorFlow not being installed here.

Each runs on 10^8 draws in chunks of 10^7 (fp32, then bf16), accumulating the real std (float64
sums), the largest |value| and the values outside the implementation's own cut. timm is not a gradkit
dependency: ``pip install --no-deps timm``; ``timm/__init__`` imports torchvision, so its
``layers/weight_init.py`` (which imports only torch) is loaded by file path, unchanged. Without timm
its row is left out with a note. A second table repeats torch's default with std 0.002, where its
absolute cut lies at ±1,000 std (pytorch issue 155588).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import load_timm_file, write_result
from gradkit.init import truncated_normal_, truncation_std_factor

STD = 0.02
CHUNK = 10**7


def load_timm_weight_init():
    return load_timm_file("layers/weight_init.py")


def peers(std: float) -> list[tuple[str, str, float, Callable[[torch.Tensor, torch.Generator], None]]]:
    """(name, call as written, cut in absolute value, fill(tensor, generator)) for each implementation."""
    f2 = truncation_std_factor(2.0)
    rows = [
        (
            "gradkit truncated_normal_",
            f"truncated_normal_(t, {std})",
            2 * std / f2,
            lambda t, g: truncated_normal_(t, std, generator=g),
        ),
        (
            "torch trunc_normal_ (defaults)",
            f"trunc_normal_(t, std={std})",
            2.0,
            lambda t, g: torch.nn.init.trunc_normal_(t, std=std, generator=g),
        ),
        (
            "torch trunc_normal_ (cut at ±2σ)",
            f"trunc_normal_(t, std={std}, a={-2 * std:g}, b={2 * std:g})",
            2 * std,
            lambda t, g: torch.nn.init.trunc_normal_(t, std=std, a=-2 * std, b=2 * std, generator=g),
        ),
    ]
    timm = load_timm_weight_init()
    if timm is not None:

        def timm_fill(t, g):  # timm takes no generator: it draws from the global RNG
            torch.manual_seed(int(torch.randint(2**31, (), generator=g)))
            timm.trunc_normal_tf_(t, std=std)

        rows.append(("timm trunc_normal_tf_", f"trunc_normal_tf_(t, std={std})", 2 * std, timm_fill))
    return rows


def measure(fill, cut: float, dtype: torch.dtype, draws: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    total = total_sq = 0.0
    max_abs, outside, n = 0.0, 0, 0
    buf = torch.empty(CHUNK, dtype=dtype)
    t0 = time.perf_counter()
    fill_seconds = 0.0
    while n < draws:
        t = buf[: min(CHUNK, draws - n)]
        s = time.perf_counter()
        fill(t, g)
        fill_seconds += time.perf_counter() - s
        x = t.double()
        total += float(x.sum())
        total_sq += float(x.square().sum())
        max_abs = max(max_abs, float(x.abs().max()))
        outside += int((x.abs() > cut).sum())
        n += t.numel()
    mean = total / n
    std = math.sqrt(max(total_sq / n - mean * mean, 0.0) * n / (n - 1))
    return {
        "draws": n,
        "mean": mean,
        "std": std,
        "max_abs": max_abs,
        "outside_cut": outside,
        "seconds_fill": fill_seconds,
        "seconds": time.perf_counter() - t0,
    }


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=10**8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    f2 = truncation_std_factor(2.0)
    raw: dict = {"std_requested": STD, "truncation_std_factor_2": f2, "runs": []}
    tables, notes = [], []
    power = round(math.log10(args.draws))
    draws_label = f"10^{power}" if 10**power == args.draws else f"{args.draws:,}"

    implementations = peers(STD)
    if not any(name.startswith("timm") for name, *_ in implementations):
        notes.append("timm is not installed: its row is left out (pip install --no-deps timm).")
    for dtype, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        rows = []
        for name, call, cut, fill in implementations:
            r = measure(fill, cut, dtype, args.draws, args.seed)
            raw["runs"].append(
                {"implementation": name, "call": call, "std_requested": STD, "dtype": label, "cut": cut, **r}
            )
            rows.append(
                [
                    name,
                    f"`{call}`",
                    f"±{cut / STD:.4g}",
                    f"{r['std']:.5f}",
                    f"{r['std'] / STD:.4f}",
                    f"{r['mean'] / STD:+.5f}",
                    f"{r['max_abs'] / STD:.4f}",
                    f"{r['outside_cut']:,}",
                    f"{r['seconds_fill']:.1f}",
                ]
            )
            print(label, rows[-1], flush=True)
        if dtype == torch.float32:
            rows.append(
                [
                    "TensorFlow truncated_normal (BERT's)",
                    f"`truncated_normal(stddev={STD})`",
                    "±2",
                    f"{STD * f2:.5f}",
                    f"{f2:.4f}",
                    "0",
                    "2 (its cut)",
                    "0",
                    "computed, not run",
                ]
            )
        tables.append(
            {
                "caption": (
                    f"Asked for std {STD}, {draws_label} draws in {label} (chunks of 10^7, one seed): the cut and "
                    "the largest |value| in units of the REQUESTED std; 'outside' counts values past the "
                    "implementation's own cut (exact, in float64)"
                ),
                "columns": [
                    "implementation",
                    "call",
                    "cut (× requested std)",
                    "real std",
                    "real / requested",
                    "mean (× requested std)",
                    "max |z| (× requested std)",
                    "outside the cut",
                    "fill seconds",
                ],
                "rows": rows,
            }
        )

    # torch's absolute cut with a small std (pytorch issue 155588): how far the tail reaches
    small = 0.002
    tail_rows = []
    for name, call, cut, fill in peers(small)[:2]:
        r = measure(fill, cut, torch.float32, args.draws, args.seed + 1)
        raw["runs"].append(
            {"implementation": name, "call": call, "std_requested": small, "dtype": "fp32", "cut": cut, **r}
        )
        tail_rows.append(
            [name, f"`{call}`", f"±{cut / small:.4g}", f"{r['std']:.6f}", f"{r['max_abs'] / small:.4g}"]
        )
        print(tail_rows[-1], flush=True)
    tables.append(
        {
            "caption": f"Asked for std {small}, {draws_label} fp32 draws: how far the tail reaches",
            "columns": [
                "implementation",
                "call",
                "cut (× requested std)",
                "real std",
                "max |z| (× requested std)",
            ],
            "rows": tail_rows,
        }
    )

    ours = {(r["implementation"], r["dtype"]): r for r in raw["runs"] if r["std_requested"] == STD}
    g32, g16 = ours[("gradkit truncated_normal_", "fp32")], ours[("gradkit truncated_normal_", "bf16")]
    torch_default = ours[("torch trunc_normal_ (defaults)", "fp32")]
    torch_cut16 = ours[("torch trunc_normal_ (cut at ±2σ)", "bf16")]
    small_default = next(
        r for r in raw["runs"] if r["std_requested"] == small and r["implementation"].startswith("torch")
    )
    biased = [
        f"{r['implementation']} in {r['dtype']}: mean {r['mean'] / r['std_requested']:+.5f}× the requested std, "
        f"{abs(r['mean']) / (r['std'] / math.sqrt(r['draws'])):.0f} standard errors from 0: a biased sampler."
        for r in raw["runs"]
        if abs(r["mean"]) > 5 * r["std"] / math.sqrt(r["draws"])
    ]
    notes += [
        f"The real std of a normal cut at ±2σ is 0.8796σ (truncated-normal variance formula): "
        f"TensorFlow's and timm's 'std 0.02' is {STD * f2:.5f}; gradkit draws from σ = {STD / f2:.5f} "
        f"so that the real std is {STD} (measured {g32['std']:.5f} in fp32, {g16['std']:.5f} in bf16).",
        f"Standard error of the measured std on {draws_label} draws: about {STD / math.sqrt(2 * args.draws):.1e}.",
        f"torch's trunc_normal_ takes a and b as absolute values: with the defaults (±2) and std {STD} nothing "
        f"is cut, so its real std is the std asked for and its tail a normal's (max |z| {torch_default['max_abs'] / STD:.2f} "
        f"on these draws). torch {torch.__version__} samples it by rejection; the 1,000σ outliers of pytorch "
        f"issue 155588 (erfinv of uniforms near ±1, older versions) do not appear: max |z| "
        f"{small_default['max_abs'] / small:.2f} at std {small}.",
        f"In bf16 torch's cut at ±2σ lets {torch_cut16['outside_cut']:,} values past ±{2 * STD:g}: it casts its bounds "
        f"to bf16 first ({float(torch.tensor(2 * STD, dtype=torch.bfloat16)):.6f}).",
        *biased,
        "timm's trunc_normal_tf_ (like torch's before its rejection sampler) draws uniforms and applies erfinv "
        "in place, in the tensor's own dtype.",
        "gradkit samples in float32 (by rejection at bound 2) and clamps after the cast to the last representable "
        "value inside the cut, so bf16 rounding cannot carry a value past it.",
        "fill seconds: time spent in the initialiser itself, on a shared 2-core machine (indicative only).",
    ]
    return {
        "name": "init_truncnormal",
        **{
            "title": "Truncated-normal init: the real std and the tail of 'std 0.02'",
            "claim": (
                "gradkit.truncated_normal_(t, 0.02) has real std 0.02 and no value outside its ±2σ cut in fp32 "
                "and bf16; torch's trunc_normal_(std=0.02) cuts nothing (±2 absolute), TensorFlow's and timm's "
                "cut at ±2σ but give std 0.0176."
            ),
            "tables": tables,
            "notes": notes,
            "raw": raw,
        },
    }


def report(result: dict[str, Any]) -> None:
    """Write ``result`` to ``benchmarks/results/<name>.json`` (with the machine and the command)."""
    write_result(result["name"], result)


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
