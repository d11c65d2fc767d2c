"""lora_pro: how close is each LoRA update to full fine-tuning's, and what does LoRA-Pro cost?

(1) Alignment. One LoRA + AdamW run on all-MiniLM-L6-v2 + SST-2 (rank 8, alpha 16, every encoder
Linear, lr 1e-3 constant, batch 16). At every step, for every one of the 36 target layers, the
full-weight gradient G at the current merged weights (the base weight's own gradient in the same
backward pass) and the equivalent update of W of each method, from the same gradients:

- LoRA (SGD): ``s (B g_A + g_B A)``; LoRA + AdamW: the trajectory's real step;
- LoRA-Pro SGD: ``P_B G + (I - P_B) G P_A``;
- LoRA-Pro AdamW, moments full / projected / factor: shadow optimisers that see the same gradient
  sequence (their step is taken, measured as ``s (B0 dA + dB A0)``, then undone).

Reported: cosine with G, and cosine with full fine-tuning's AdamW direction (Adam moments of G kept
along the same trajectory), mean and minimum over layers, at steps 1, 10, 50, 100.

(2) Cost, side by side in one process: step time (forward + backward + step) and ``optimizer.step()``
time, median over interleaved rounds, and exact optimiser-state bytes of LoRA + AdamW, LoRA-Pro with
full moments, projected and factor moments, and the SGD form.

    python -m benchmarks.lora_pro                  # 100 alignment steps, 12 cost rounds
    python -m benchmarks.lora_pro --steps 10 --rounds 4   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import IMAGES, ROOT, save_figure, write_result

SST2 = ROOT / "data" / "sst2" / "train.tsv"
CHECKPOINTS = (1, 10, 50, 100)
SHADOWS = ("full", "projected", "factor")
LABELS = {
    "lora_sgd": "LoRA (SGD)",
    "lora_adamw": "LoRA + AdamW",
    "pro_sgd": "LoRA-Pro SGD",
    "pro_full": "LoRA-Pro AdamW, full moments",
    "pro_projected": "LoRA-Pro AdamW, projected moments",
    "pro_factor": "LoRA-Pro AdamW, factor moments",
    "best_adam": "best LoRA can do: P_T(D_full)",
}


def build_model(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    from gradkit.train.model import load_classifier, lora_target_names

    model = load_classifier(seed=seed)
    torch.manual_seed(seed)  # PEFT draws lora_A from the global RNG
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=lora_target_names(model),
        modules_to_save=["head"],
    )
    return get_peft_model(model, cfg).train()


def make_batches(n: int, batch_size: int, max_length: int) -> list[dict[str, torch.Tensor]]:
    from gradkit.data import load_text_classification
    from gradkit.data.text import shuffled_order
    from gradkit.train.model import load_tokenizer

    data = load_text_classification(str(SST2) if SST2.is_file() else None)
    tokenizer = load_tokenizer()
    order = shuffled_order(len(data), 0)
    batches = []
    for i in range(n):
        idx = [order[(i * batch_size + j) % len(order)] for j in range(batch_size)]
        enc = dict(
            tokenizer(
                [data.texts[k] for k in idx],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        )
        enc["labels"] = torch.tensor([data.labels[k] for k in idx])
        batches.append(enc)
    return batches


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return round(float((x * y).sum() / (x.norm() * y.norm()).clamp_min(1e-30)), 5)


def alignment(batches, lr: float):
    from gradkit.lora.pairs import lora_pairs
    from gradkit.optim.lora_pro import (
        LoRAPro,
        equivalent_gradient,
        lora_equivalent_update,
        tangent_projection,
    )

    model = build_model()
    pairs = lora_pairs(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    shadows = {m: LoRAPro(model, lr=1.0, moments=m) for m in SHADOWS}  # built before base weights train
    for pair in pairs:  # the base weight's gradient is G at the merged weights (no dropout on LoRA)
        pair.layer.get_base_layer().weight.requires_grad_(True)
    full_m = [torch.zeros_like(p.base_weight) for p in pairs]
    full_v = [torch.zeros_like(p.base_weight) for p in pairs]
    per_step: dict[str, dict[str, list[list[float]]]] = {"G": {}, "adam": {}}
    losses = []
    for step, batch in enumerate(batches, 1):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
        A0 = [p.A.detach().clone() for p in pairs]
        B0 = [p.B.detach().clone() for p in pairs]
        G = [p.base_weight.grad.float() for p in pairs]
        snapshot = [t.detach().clone() for t in trainable]
        ups: dict[str, list[torch.Tensor]] = {"lora_sgd": [], "pro_sgd": [], "best_adam": []}
        D_full = []
        with torch.no_grad():
            for i, p in enumerate(pairs):
                ups["lora_sgd"].append(lora_equivalent_update(A0[i], B0[i], p.A.grad, p.B.grad, p.scaling))
                ups["pro_sgd"].append(equivalent_gradient(A0[i], B0[i], p.A.grad, p.B.grad, p.scaling))
                full_m[i].lerp_(G[i], 0.1)
                full_v[i].mul_(0.999).addcmul_(G[i], G[i], value=0.001)
                D = (full_m[i] / (1 - 0.9**step)) / ((full_v[i] / (1 - 0.999**step)).sqrt() + 1e-8)
                D_full.append(D)
                ups["best_adam"].append(tangent_projection(A0[i], B0[i], D))
            for name, opt in shadows.items():
                opt.step()
                ups[f"pro_{name}"] = [
                    -lora_equivalent_update(A0[i], B0[i], p.A - A0[i], p.B - B0[i], p.scaling)
                    for i, p in enumerate(pairs)
                ]
                for t, s in zip(trainable, snapshot, strict=True):
                    t.copy_(s)
            lora_opt.step()
            ups["lora_adamw"] = [
                -lora_equivalent_update(A0[i], B0[i], p.A - A0[i], p.B - B0[i], p.scaling)
                for i, p in enumerate(pairs)
            ]
        for key, updates in ups.items():
            per_step["G"].setdefault(key, []).append([cos(u, g) for u, g in zip(updates, G, strict=True)])
            per_step["adam"].setdefault(key, []).append(
                [cos(u, d) for u, d in zip(updates, D_full, strict=True)]
            )
        if step in CHECKPOINTS or step == len(batches):
            pro, lora = per_step["G"]["pro_sgd"][-1], per_step["G"]["lora_sgd"][-1]
            print(
                f"step {step}: loss {loss.item():.4f}  cos(G): LoRA {statistics.mean(lora):.3f}  "
                f"LoRA-Pro {statistics.mean(pro):.3f}",
                flush=True,
            )
    return per_step, [p.name for p in pairs], losses


def cost(batches, rounds: int, lr: float):
    from gradkit.optim.lora_pro import LoRAPro
    from gradkit.train.measures import optimizer_state_bytes

    def lora_adamw(model):
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    makers = {
        "LoRA + AdamW": lora_adamw,
        "LoRA-Pro AdamW, full moments": lambda m: LoRAPro(m, lr=1e-4, moments="full"),
        "LoRA-Pro AdamW, projected moments": lambda m: LoRAPro(m, lr=1e-4, moments="projected"),
        "LoRA-Pro AdamW, factor moments": lambda m: LoRAPro(m, lr=1e-4, moments="factor"),
        "LoRA-Pro SGD": lambda m: LoRAPro(m, lr=1e-4, optimizer="sgd"),
    }
    runs = {}
    for name, make in makers.items():
        model = build_model()
        runs[name] = (model, make(model), [], [])
    for r in range(rounds + 2):  # interleaved, so background load hits every method alike
        batch = batches[r % len(batches)]
        for model, opt, step_times, opt_times in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            if r >= 2:
                step_times.append(t2 - t0)
                opt_times.append(t2 - t1)
    out = {}
    for name, (model, opt, step_times, opt_times) in runs.items():
        lora_ids = {id(p) for n, p in model.named_parameters() if "lora_" in n}
        lora_bytes = sum(
            v.nbytes
            for p, st in opt.state.items()
            if id(p) in lora_ids
            for v in st.values()
            if torch.is_tensor(v)
        )
        out[name] = {
            "state_bytes": optimizer_state_bytes(opt),
            "lora_state_bytes": lora_bytes,
            "step_s": statistics.median(step_times),
            "opt_step_s": statistics.median(opt_times),
        }
    return out


def summarise(per_step, steps: list[int]) -> dict[str, list]:
    rows = {}
    for target in ("G", "adam"):
        table = []
        for step in steps:
            row = [step]
            for key in LABELS:
                if key == "best_adam" and target == "G":
                    continue
                values = per_step[target][key][step - 1]
                row.append(f"{statistics.mean(values):.3f} [{min(values):.3f}]")
            table.append(row)
        rows[target] = table
    return rows


def plot(per_step, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=120)
    for ax, target, title in (
        (axes[0], "G", "cosine with full FT's gradient G"),
        (axes[1], "adam", "cosine with full FT's AdamW direction"),
    ):
        for key, label in LABELS.items():
            if key == "best_adam" and target == "G":
                continue
            series = [statistics.mean(v) for v in per_step[target][key]]
            ax.plot(
                range(1, len(series) + 1),
                series,
                label=label,
                lw=1.2,
                ls="--" if key.startswith("lora") else "-",
            )
        ax.set_xlabel("step of the LoRA + AdamW run")
        ax.set_title(title + " (mean of 36 layers)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def run(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure; returns the result (``name`` and the fields of ``benchmarks/results/<name>.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)  # OpenMP threads spin badly when the 2 shared cores are oversubscribed

    batches = make_batches(max(args.steps, args.rounds + 2), args.batch_size, args.max_length)
    start = time.perf_counter()
    per_step, names, losses = alignment(batches[: args.steps], args.lr)
    align_s = time.perf_counter() - start
    start = time.perf_counter()
    costs = cost(batches, args.rounds, args.lr)
    cost_s = time.perf_counter() - start

    steps = [s for s in CHECKPOINTS if s <= args.steps] or [args.steps]
    rows = summarise(per_step, steps)
    violations = sum(
        p < lo - 1e-6
        for step_p, step_l in zip(per_step["G"]["pro_sgd"], per_step["G"]["lora_sgd"], strict=True)
        for p, lo in zip(step_p, step_l, strict=True)
    )
    violations_adamw = sum(
        p < lo - 1e-6
        for step_p, step_l in zip(per_step["G"]["pro_sgd"], per_step["G"]["lora_adamw"], strict=True)
        for p, lo in zip(step_p, step_l, strict=True)
    )
    base = costs["LoRA + AdamW"]
    cost_rows = [
        [
            name,
            c["state_bytes"],
            c["lora_state_bytes"],
            round(c["state_bytes"] / base["state_bytes"], 2),
            round(c["step_s"] * 1e3, 1),
            round(c["step_s"] / base["step_s"], 2),
            round(c["opt_step_s"] * 1e3, 2),
            round(c["opt_step_s"] / base["opt_step_s"], 2),
        ]
        for name, c in costs.items()
    ]
    for row in cost_rows:
        print(row)
    img = IMAGES / "lora_pro_alignment.png"
    plot(per_step, img)
    light = costs["LoRA-Pro AdamW, projected moments"]
    cols_G = ["step"] + [LABELS[k] for k in LABELS if k != "best_adam"]
    return {
        "name": "lora_pro",
        **{
            "title": "LoRA-Pro: alignment with full fine-tuning, and cost",
            "claim": "LoRA-Pro's update of W is the closest LoRA can make to full fine-tuning's at every step; "
            "the memory-light AdamW form keeps the state at O(r (in + out)) per layer",
            "tables": [
                {
                    "caption": f"Cosine between each method's update of W and full fine-tuning's gradient G, mean over "
                    f"the {len(names)} target layers [minimum], along one LoRA + AdamW run (MiniLM, SST-2)",
                    "columns": cols_G,
                    "rows": rows["G"],
                },
                {
                    "caption": "Cosine with full fine-tuning's AdamW direction (Adam moments of G along the same run), "
                    "mean over layers [minimum]",
                    "columns": ["step"] + list(LABELS.values()),
                    "rows": rows["adam"],
                },
                {
                    "caption": "Cost side by side in one process (median over interleaved rounds; ratios to LoRA + AdamW)",
                    "columns": [
                        "optimiser",
                        "state bytes",
                        "of which LoRA factors",
                        "state ratio",
                        "step ms",
                        "step ratio",
                        "optimizer.step() ms",
                        "opt.step ratio",
                    ],
                    "rows": cost_rows,
                },
            ],
            "plots": [str(img.relative_to(ROOT))],
            "notes": [
                f"Alignment: {args.steps} steps of one LoRA + AdamW run (lr {args.lr:g} constant, batch {args.batch_size}, "
                f"max length {args.max_length}, rank 8, alpha 16, all 36 encoder Linear layers); took {align_s:.0f} s.",
                f"LoRA-Pro SGD's cosine with G was below LoRA (SGD)'s in {violations} of "
                f"{len(names) * args.steps} (layer, step) cases and below LoRA + AdamW's in {violations_adamw} "
                "(it is the projection of G onto the space of LoRA updates, so it cannot be lower).",
                f"Goals for the memory-light (projected) form: state <= 3x LoRA + AdamW's: "
                f"{light['state_bytes'] / base['state_bytes']:.2f}x; step time <= 1.3x: "
                f"{light['step_s'] / base['step_s']:.2f}x (optimizer.step() alone "
                f"{light['opt_step_s'] / base['opt_step_s']:.2f}x).",
                f"Cost: {args.rounds} timed rounds after 2 warm-up rounds, batch {args.batch_size}; took {cost_s:.0f} s. "
                "One torch thread; the 2 CPU cores were shared with other work during the run: compare ratios, not absolute times.",
                "Training quality (train loss and test accuracy of each form at its best learning rate, 3 seeds) is "
                "measured by benchmarks/lora_quality.py: its own section.",
            ],
            "raw": {
                "layers": names,
                "losses": losses,
                "costs": costs,
                "cos_G": {k: v for k, v in per_step["G"].items()},
                "cos_adam": {k: v for k, v in per_step["adam"].items()},
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
