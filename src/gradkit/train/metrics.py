"""Evaluation metrics as pure functions of predictions and targets: classification (accuracy, macro-F1,
Matthews correlation) and regression (Pearson and Spearman correlation), and which metric a task
reports by default."""

from __future__ import annotations

import math

import torch

from gradkit.errors import GradkitError

# the metrics each task computes; the first is its default --metric
TASK_METRICS = {
    "classification": ("accuracy", "macro_f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "causal-lm": ("perplexity",),
}
# every metric is "higher is better" but these, which are "lower is better" (reported as they are)
LOWER_IS_BETTER = ("perplexity",)
PERCENT_METRICS = ("accuracy", "macro_f1")  # shown as percentages; correlations as they are


def default_metric(task: str) -> str:
    """The metric a task reports unless ``--metric`` says otherwise: accuracy, Pearson's r, or the
    perplexity of a causal LM."""
    return TASK_METRICS[task][0]


def check_metric(task: str, metric: str | None) -> str:
    """``metric`` (or the task's default) when the task computes it, else one clear error."""
    if task not in TASK_METRICS:
        raise GradkitError(f"--task {task!r} is not one of: {', '.join(TASK_METRICS)}")
    if metric is None:
        return default_metric(task)
    if metric not in TASK_METRICS[task]:
        raise GradkitError(
            f"--metric {metric!r} is not a {task} metric; pass one of: {', '.join(TASK_METRICS[task])}"
        )
    return metric


def is_better(metric: str, new: float, old: float | None) -> bool:
    """True when ``new`` beats ``old`` (None: nothing yet) in ``metric``'s own direction: larger for
    accuracy, F1, MCC and the correlations, smaller for :data:`LOWER_IS_BETTER` (perplexity). A value
    that is not finite (NaN, inf) never wins."""
    if new is None or not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new < old if metric in LOWER_IS_BETTER else new > old


def format_metric(metric: str, value: float) -> str:
    """``83.94%`` for accuracy and F1, ``0.5123`` for correlations."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{100 * value:.2f}%" if metric in PERCENT_METRICS else f"{value:.4f}"


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the label."""
    return (preds == labels).float().mean().item() if labels.numel() else float("nan")


def _confusion(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``C[i, j]`` = examples of true class i predicted as j (float64)."""
    index = labels.long() * num_classes + preds.long()
    counts = torch.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).double()


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


def matthews_corrcoef(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Matthews correlation (how GLUE scores CoLA; Matthews 1975), for K classes in Gorodkin's form
    (2004): with the confusion matrix C, s = N examples, c = correct, t_k = true count of k, p_k =
    predicted count of k,

        MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)),

    which for two classes is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)). 0 when either
    factor under the root is 0 (every prediction, or every label, one class), as scikit-learn does."""
    if not labels.numel():
        return float("nan")
    confusion = _confusion(preds, labels, num_classes)
    s = confusion.sum()
    c = confusion.trace()
    t = confusion.sum(1)
    p = confusion.sum(0)
    denominator = ((s * s - (p * p).sum()) * (s * s - (t * t).sum())).sqrt()
    if denominator == 0:
        return 0.0
    return ((c * s - (p * t).sum()) / denominator).item()


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r = sum (x - x̄)(y - ȳ) / sqrt(sum (x - x̄)^2 sum (y - ȳ)^2) (float64); NaN when
    either side is constant (no correlation is defined)."""
    x, y = x.double().flatten(), y.double().flatten()
    if x.numel() < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = (dx.square().sum() * dy.square().sum()).sqrt()
    return (dx @ dy / denominator).item() if denominator > 0 else float("nan")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x``, ties given the mean of the ranks they span (``scipy.stats.rankdata``'s
    "average")."""
    x = x.double().flatten()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    ranks = torch.empty_like(x)
    n, i = x.numel(), 0
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rho: Pearson's r of the average ranks (Spearman 1904); NaN when either side holds a
    NaN (no ranking is defined: scipy's ``spearmanr`` also propagates it) or is constant."""
    if bool(x.double().isnan().any()) or bool(y.double().isnan().any()):
        return float("nan")
    return pearson(average_ranks(x), average_ranks(y))


def task_metrics(task: str, outputs: torch.Tensor, labels: torch.Tensor, prefix: str) -> dict[str, float]:
    """Every metric of ``task`` from the model's outputs (logits ``(n, K)``, or predictions ``(n,)``
    for regression) and the true labels: ``{prefix}_<metric>``."""
    if task == "regression":
        values = outputs.reshape(-1)
        return {f"{prefix}_pearson": pearson(values, labels), f"{prefix}_spearman": spearman(values, labels)}
    preds = outputs.argmax(-1)
    num_classes = outputs.shape[-1]
    return {
        f"{prefix}_accuracy": accuracy(preds, labels),
        f"{prefix}_macro_f1": macro_f1(preds, labels, num_classes),
        f"{prefix}_mcc": matthews_corrcoef(preds, labels, num_classes),
    }


def window_mean(values: list[float], end: int, window: int = 10) -> float:
    """Mean of ``values[end - window : end]`` (1-based step ``end``): a steadier train loss at a step."""
    chunk = values[max(0, end - window) : end]
    return sum(chunk) / len(chunk) if chunk else float("nan")
