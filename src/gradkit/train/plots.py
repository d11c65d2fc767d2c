"""Loss-curve plots (PNG, matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from gradkit.files import atomic_path


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average, as TensorBoard draws loss curves."""
    out, avg = [], 0.0
    for t, v in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * v
        out.append(avg / (1 - beta**t))
    return out


def plot_losses(
    curves: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    path: str | Path,
    title: str = "train loss",
    dev: Mapping[str, tuple[Sequence[int], Sequence[float]]] | None = None,
    batch_sizes: tuple[Sequence[int], Sequence[int]] | None = None,
) -> None:
    """One line per run: raw per-step loss faint, its smoothed curve bold; ``dev`` losses (evaluated
    every few steps) as dashed lines with markers in the run's colour; ``batch_sizes`` (steps, each
    step's batch) as a step line in a panel below. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if batch_sizes is None:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    else:
        fig, (ax, below) = plt.subplots(
            2, 1, figsize=(7, 5.6), dpi=120, sharex=True, gridspec_kw={"height_ratios": [3, 1]}
        )
        below.step(batch_sizes[0], batch_sizes[1], where="post", color="C0")
        below.set_ylabel("batch size")
        below.set_yscale("log", base=2)
        below.grid(alpha=0.3)
    for i, (name, (steps, losses)) in enumerate(curves.items()):
        color = f"C{i % 10}"
        ax.plot(steps, losses, color=color, alpha=0.18, linewidth=0.8)
        ax.plot(steps, smooth(losses), color=color, linewidth=1.8, label=name)
        if dev and name in dev:
            dev_steps, dev_losses = dev[name]
            ax.plot(
                dev_steps,
                dev_losses,
                color=color,
                linestyle="--",
                marker="o",
                markersize=3,
                label=f"{name} (dev)",
            )
    (ax if batch_sizes is None else below).set_xlabel("step")
    ax.set_ylabel(
        "loss (train smoothed, raw faint; dev dashed)" if dev else "train loss (smoothed; raw faint)"
    )
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
