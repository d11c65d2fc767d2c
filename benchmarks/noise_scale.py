"""Overhead of the noise-scale monitor per training step: no monitor vs the accumulation source (fused:
one multi-tensor read of the accumulated gradients per micro-batch, the default; and its per-parameter
tensor hooks, ``fused=False``) vs the per-example Linear hooks vs torch.func per-example gradients
(vmap(grad)), on a small transformer encoder (batch x tokens x features), same process, same data.

    OMP_NUM_THREADS=1 python -m benchmarks.noise_scale --quick     # seconds: a smoke run
    python -m benchmarks.noise_scale                               # the measured claim (minutes)

The modes run round robin (one step of each in turn), so a change in the machine's load hits them
alike. The batch-size sweep (B_crit from the S-E fit vs B_simple) is benchmarks/batch_size_sweep.py.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import report
from gradkit import NoiseScale


class Encoder(nn.Module):
    def __init__(self, d: int, layers: int, classes: int = 4):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=4 * d, dropout=0.0, batch_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.body(x).mean(1))


def _step_fn(mode: str, model: nn.Module, opt, micro: int, k: int):
    gns = NoiseScale(model)
    rec = None
    if mode == "accumulation":
        rec = gns.accumulation_hooks()  # fused in one process
        assert rec.fused
    elif mode == "accumulation_hooks":
        rec = gns.accumulation_hooks(fused=False)
    elif mode == "per_example":
        rec = gns.per_example_hooks()

    def step(x, y):
        for cx, cy in zip(x.split(micro), y.split(micro), strict=True):
            (nn.functional.cross_entropy(model(cx), cy) / k).backward()
            if mode.startswith("accumulation"):
                rec.micro_step(len(cy))
        if rec is not None:
            rec.step()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if mode == "torch_func":
        from torch.func import functional_call, grad, vmap

        def step(x, y):  # noqa: F811 - per-example gradients, then their norms, then the usual step
            params = {n: p.detach() for n, p in model.named_parameters()}

            def loss_one(p, xi, yi):
                return nn.functional.cross_entropy(
                    functional_call(model, p, (xi.unsqueeze(0),)), yi.unsqueeze(0)
                )

            for cx, cy in zip(x.split(micro), y.split(micro), strict=True):
                per = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, cx, cy)
                sum(g.reshape(len(cy), -1).pow(2).sum(1) for g in per.values()).sum().item()
                (nn.functional.cross_entropy(model(cx), cy) / k).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``), or
    None for a run that writes nothing (a smoke run)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, a few steps: a smoke run")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--instances", type=int, default=3, help="model instances per mode, all timed")
    ap.add_argument(
        "--load-note",
        default="Other jobs shared the 2 cores while this ran; the CPU-time ratios of the round robin are what "
        "hold up under such load.",
        help="a note on the machine's load, written into the result",
    )
    args = ap.parse_args(argv)
    d, layers, batch, tokens, k = (32, 1, 8, 8, 2) if args.quick else (128, 4, 32, 64, 4)
    steps = 3 if args.quick else args.steps
    micro = batch // k
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(batch, tokens, d, generator=gen), torch.randint(0, 4, (batch,), generator=gen))
        for _ in range(steps + 2)
    ]
    modes = ["none", "accumulation", "accumulation_hooks", "per_example", "torch_func"]
    # several model instances per mode: one instance's step time moves by a few % with where its
    # tensors happen to sit in memory, as much as the monitor costs
    steps_of: dict[str, list] = {mode: [] for mode in modes}
    for _ in range(args.instances):
        for mode in modes:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = Encoder(d, layers)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            steps_of[mode].append(_step_fn(mode, model, opt, micro, k))
            for x, y in data[:2]:  # warm-up
                steps_of[mode][-1](x, y)
    # round robin, one step of each mode in turn: a change in the machine's load hits every mode alike
    # CPU time of this thread, not wall time: with one torch thread every op runs here, and time spent
    # waiting while other processes hold the cores is not counted (wall time is kept for reference)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    wall: dict[str, list[float]] = {mode: [] for mode in modes}
    for x, y in data[2:]:
        for instance in range(args.instances):
            for mode in modes:
                t0, w0 = time.thread_time(), time.perf_counter()
                steps_of[mode][instance](x, y)
                times[mode].append(time.thread_time() - t0)
                wall[mode].append(time.perf_counter() - w0)
    base = statistics.median(times["none"])
    rows = [
        [
            m,
            round(1000 * statistics.median(times[m]), 2),
            round(statistics.median(times[m]) / base, 3),
            round(statistics.median(wall[m]) / statistics.median(wall["none"]), 3),
        ]
        for m in modes
    ]
    for r in rows:
        print(f"{r[0]:>13}: {r[1]:8.2f} CPU ms/step  x{r[2]:.3f} vs no monitor (wall x{r[3]:.3f})")
    if args.quick:  # a smoke run never goes into benchmarks/results/ (docs/benchmarks.md is made from it)
        print("--quick: not written to benchmarks/results/")
        return
    return {
        "name": "noise_scale",
        **{
            "title": "Noise-scale monitor overhead per training step",
            "claim": "the accumulation/DDP source costs <= 5% per step; per-example Linear hooks are far cheaper than torch.func per-example gradients",
            "tables": [
                {
                    "caption": f"encoder d={d}, {layers} layers, batch {batch} x {tokens} tokens, {k} micro-batches, median of {steps} steps x {args.instances} model instances",
                    "columns": ["monitor", "CPU ms / step", "x no monitor", "wall time x no monitor"],
                    "rows": rows,
                }
            ],
            "notes": ["--quick is a smoke run; its numbers mean nothing"]
            if args.quick
            else [
                f"Accumulation source (fused, the default in one process): {rows[1][2]:.3f}x the step without a "
                f"monitor (goal <= 1.05x); the same source with a tensor hook per parameter (fused=False, as "
                f"under DDP) {rows[2][2]:.3f}x; per-example Linear hooks {rows[3][2]:.3f}x; torch.func "
                f"per-example gradients {rows[4][2]:.3f}x.",
                "Fused: after each micro-batch's backward, three multi-tensor kernels (a_{i-1} - a_i into a kept "
                "copy of the accumulated gradient, torch._foreach_norm, copy a_i in) instead of a hook and a "
                "reduction per parameter; it costs one gradient's memory. Both give the same numbers (to float32 "
                "rounding; tests/scaling/test_noise_scale_fused.py).",
                "The modes ran round robin, one step each in turn, with one torch thread, timed by the thread's CPU "
                "time (time.thread_time: waits while other processes hold the cores are not counted); wall-time "
                "ratios, which such waits do disturb, are shown for reference.",
                args.load_note,
                "torch.func: in torch 2.13 vmap has no batching rule for CPU scaled-dot-product attention and "
                "falls back to a slower path (it warns), part of its cost here.",
            ],
            "raw": {"cpu_seconds": times, "wall_seconds": wall},
        },
    }


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
