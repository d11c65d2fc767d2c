"""gpu_timing: seconds per training step of each method on all-MiniLM-L6-v2 in bf16 autocast, on a GPU.

Methods (same random token batches, batch 32 x 128 tokens, a 2-label head): full fine-tuning with AdamW,
LoRA r = 8 with AdamW, LoRA with gradkit's LoRAPro (projected and full moments), gradkit's ZerothOrder
(two forward passes per step), full fine-tuning plus gradkit's EMA update, and gradkit's LoRA-GA
initialisation (exact and sketch estimators, 8 batches, timed once). Each step is timed with CUDA events
after ``--warmup`` untimed steps; the median of ``--steps`` steps is reported, with the peak allocated
memory (``torch.cuda.max_memory_allocated``) of each method.

    python -m benchmarks.gpu_timing                          # on a CUDA machine; writes results/gpu_timing.json
    python -m benchmarks.gpu_timing --device cpu --steps 2   # a smoke run of the same code (writes nothing)

``benchmarks/gpu_check.sh`` runs it; without CUDA it exits at once (status 0) unless ``--device cpu``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import report

TARGETS = ["query", "key", "value", "dense"]


def load_model(device: str):
    """all-MiniLM-L6-v2 with a fresh 2-label head, fp32 weights (bf16 comes from autocast)."""
    from transformers import AutoModelForSequenceClassification

    from gradkit.train.model import default_model_path

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2).to(device)


def lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, modules_to_save=["classifier"])
    return get_peft_model(model, config)


def make_batches(n: int, size: int, length: int, device: str) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.randint(1000, 20000, (size, length), generator=g).to(device),
            "attention_mask": torch.ones(size, length, dtype=torch.long).to(device),
            "labels": torch.randint(0, 2, (size,), generator=g).to(device),
        }
        for _ in range(n)
    ]


def timed(fn: Callable[[], None], device: str) -> float:
    """Seconds of one call of ``fn``: CUDA events on a GPU, perf_counter on a CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_fns(device: str, dtype: torch.dtype) -> dict[str, Callable[[], tuple]]:
    """Method name -> builder returning (model, one-step function)."""
    import gradkit

    def autocast():
        return torch.autocast(device_type=device.split(":")[0], dtype=dtype)

    def backprop(model, opt, batch, after=None):
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if after is not None:
            after()

    def full():
        model = load_model(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        return model, lambda b: backprop(model, opt, b)

    def full_ema():
        model = load_model(device)
        opt = torch.optim.AdamW(model.parameters(), lr=2e-5)
        ema = gradkit.EMA(model, decay=0.999)
        return model, lambda b: backprop(model, opt, b, ema.update)

    def lora_adamw():
        model = lora(load_model(device))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
        return model, lambda b: backprop(model, opt, b)

    def lora_pro(moments):
        def build():
            model = lora(load_model(device))
            opt = gradkit.LoRAPro(model, lr=2e-5, moments=moments)
            return model, lambda b: backprop(model, opt, b)

        return build

    def zeroth():
        model = load_model(device)
        opt = gradkit.ZerothOrder(model.parameters(), lr=1e-6, eps=1e-3)

        def one(b):
            with torch.no_grad(), autocast():
                opt.step(lambda: model(**b).loss)

        return model, one

    return {
        "full fine-tuning, AdamW": full,
        "full fine-tuning, AdamW + gradkit EMA": full_ema,
        "LoRA r=8, AdamW": lora_adamw,
        "LoRA r=8, gradkit LoRAPro (projected)": lora_pro("projected"),
        "LoRA r=8, gradkit LoRAPro (full moments)": lora_pro("full"),
        "gradkit ZerothOrder": zeroth,
    }


def run(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``), or
    None for a run that writes nothing (a smoke run)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--no-write", action="store_true", help="print only (the CPU smoke run never writes)")
    args = parser.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_timing: no CUDA device; nothing timed")
        return
    on_gpu = device.startswith("cuda")
    dtype = torch.bfloat16
    batches = make_batches(args.warmup + args.steps, args.batch_size, args.length, device)
    rows, raw = [], {}
    for name, build in step_fns(device, dtype).items():
        model, step = build()
        model.train()
        for b in batches[: args.warmup]:
            step(b)
        if on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times = [timed(lambda b=b, step=step: step(b), device) for b in batches[args.warmup :]]
        peak = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else float("nan")
        raw[name] = {"seconds": times, "peak_mib": peak}
        rows.append([name, f"{statistics.median(times) * 1000:.1f}", f"{peak:.0f}"])
        print(rows[-1], flush=True)
        del model, step
        if on_gpu:
            torch.cuda.empty_cache()
    import gradkit

    for estimator in ("exact", "sketch"):
        model = lora(load_model(device))
        seconds = timed(
            lambda model=model, estimator=estimator: gradkit.lora_ga_init(
                model, batches[:8], estimator=estimator, progress=False
            ),
            device,
        )
        name = f"gradkit lora_ga_init, estimator='{estimator}' (8 batches, once)"
        raw[name] = {"seconds": [seconds]}
        rows.append([name, f"{seconds * 1000:.1f}", "-"])
        print(rows[-1], flush=True)
    if not on_gpu or args.no_write:
        return
    return {
        "name": "gpu_timing",
        **{
            "title": "GPU step time of each method on all-MiniLM-L6-v2 (bf16 autocast)",
            "claim": "Seconds per training step of each gradkit method against plain AdamW on the same GPU and batches.",
            "tables": [
                {
                    "caption": f"batch {args.batch_size} x {args.length} random tokens, bf16 autocast, fp32 weights; median of "
                    f"{args.steps} steps after {args.warmup} warm-up steps (LoRA-GA: one initialisation)",
                    "columns": ["method", "ms per step", "peak allocated MiB"],
                    "rows": rows,
                }
            ],
            "notes": [
                "Timed with CUDA events around each step; peak memory from torch.cuda.max_memory_allocated."
            ],
            "raw": raw,
        },
    }


def main() -> None:
    report(run())


if __name__ == "__main__":
    main()
