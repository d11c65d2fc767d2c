"""Classification metrics as pure functions of predicted and true label ids."""

from __future__ import annotations

import torch


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the label."""
    return (preds == labels).float().mean().item() if labels.numel() else float("nan")


def macro_f1(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean over classes of F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c).

    A class absent from both predictions and labels has an undefined F1 and is left out of the mean.
    """
    scores = []
    for c in range(num_classes):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else float("nan")


def window_mean(values: list[float], end: int, window: int = 10) -> float:
    """Mean of ``values[end - window : end]`` (1-based step ``end``): a steadier train loss at a step."""
    chunk = values[max(0, end - window) : end]
    return sum(chunk) / len(chunk) if chunk else float("nan")
