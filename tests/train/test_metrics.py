import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from gradkit.train.measures import ranks_agree
from gradkit.train.metrics import accuracy, macro_f1, window_mean
from gradkit.train.plots import smooth


def test_accuracy_and_macro_f1_against_hand_counts():
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    labels = torch.tensor([0, 1, 1, 1, 2, 0])
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(preds, labels, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class absent from both sides is left out of the mean
    assert macro_f1(torch.tensor([0, 1]), torch.tensor([0, 1]), 5) == 1.0


def test_window_mean_and_smoothing():
    values = [float(v) for v in range(1, 21)]
    assert window_mean(values, 10) == pytest.approx(5.5)
    assert window_mean(values, 3, window=10) == pytest.approx(2.0)
    assert smooth([4.0, 4.0, 4.0]) == pytest.approx([4.0, 4.0, 4.0])  # bias-corrected: no warm-up sag


def test_matthews_correlation_against_hand_counts():
    from gradkit.train.metrics import matthews_corrcoef

    # TP = 3, TN = 2, FP = 1, FN = 2: (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4) = 4 / sqrt(240)
    labels = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])
    preds = torch.tensor([1, 1, 1, 0, 0, 0, 0, 1])
    assert matthews_corrcoef(preds, labels, 2) == pytest.approx(4 / 240**0.5, abs=1e-12)
    assert matthews_corrcoef(labels, labels, 2) == pytest.approx(1.0)
    assert matthews_corrcoef(1 - labels, labels, 2) == pytest.approx(-1.0)
    assert matthews_corrcoef(torch.ones(8, dtype=torch.long), labels, 2) == 0.0  # one predicted class
    # three classes, Gorodkin's form: s = 6, c = 4, t = (2, 2, 2), p = (2, 1, 3)
    # (4*6 - (4 + 2 + 6)) / sqrt((36 - (4 + 1 + 9)) * (36 - 12)) = 12 / sqrt(22 * 24)
    labels3 = torch.tensor([0, 0, 1, 1, 2, 2])
    preds3 = torch.tensor([0, 2, 1, 0, 2, 2])
    assert matthews_corrcoef(preds3, labels3, 3) == pytest.approx(12 / (22 * 24) ** 0.5, abs=1e-12)


def test_pearson_and_spearman_against_hand_values():
    from gradkit.train.metrics import average_ranks, pearson, spearman

    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0])
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-0.5, -1.5, 1.5, 0.5): 0.75 + 0.75 + 0.75 + 0.75 = 3 over 5
    assert pearson(x, y) == pytest.approx(0.6, abs=1e-12)
    assert pearson(x, 2 * x + 7) == pytest.approx(1.0)
    assert spearman(x, x**3) == pytest.approx(1.0)  # monotone, not linear: rho 1, r below 1
    assert pearson(x, x**3) < 0.99
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    assert math.isnan(pearson(x, torch.ones(4)))  # a constant side has no correlation
    # ties: ranks (1, 2.5, 2.5, 4) against (1, 2, 3, 4): r = 4.5 / sqrt(4.5 * 5)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), x) == pytest.approx(4.5 / (4.5 * 5) ** 0.5, abs=1e-12)


def test_task_metrics_and_metric_choice():
    from gradkit.errors import GradkitError
    from gradkit.train.metrics import check_metric, format_metric, task_metrics

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    out = task_metrics("classification", logits, torch.tensor([0, 1, 1]), "dev")
    assert out["dev_accuracy"] == pytest.approx(2 / 3) and set(out) == {
        "dev_accuracy",
        "dev_macro_f1",
        "dev_mcc",
    }
    reg = task_metrics(
        "regression", torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1.0, 3.0, 2.0]), "test"
    )
    assert reg == {"test_pearson": pytest.approx(0.5), "test_spearman": pytest.approx(0.5)}
    assert (
        check_metric("classification", None) == "accuracy" and check_metric("regression", None) == "pearson"
    )
    with pytest.raises(GradkitError, match="--metric 'mcc' is not a regression metric"):
        check_metric("regression", "mcc")
    assert format_metric("accuracy", 0.8394) == "83.94%" and format_metric("mcc", 0.41234) == "0.4123"


def test_spearman_of_nan_predictions_is_nan_and_never_kept_as_best():
    from gradkit.train.metrics import is_better, spearman, task_metrics

    labels = torch.arange(6.0)
    assert math.isnan(spearman(torch.full((6,), math.nan), labels))  # scipy's spearmanr: nan
    assert math.isnan(spearman(torch.tensor([0.0, 1, math.nan, 3, 4, 5]), labels))
    assert math.isnan(spearman(labels, torch.tensor([0.0, 1, 2, 3, math.nan, 5])))
    dev = task_metrics("regression", torch.full((6, 1), math.nan), labels, "dev")
    assert math.isnan(dev["dev_spearman"])
    # --keep-best compares with is_better: a NaN score is never better, not even than nothing yet
    assert not is_better("spearman", dev["dev_spearman"], None)
    assert not is_better("spearman", dev["dev_spearman"], 0.1)


def test_ranks_agree_hashes_parameters_of_every_shape_including_0_dim():
    """The end-of-run check that every rank holds the same weights reads 0-dim parameters too (the
    label-text head's log-scale is one)."""
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(2.0))
    model.weight = nn.Parameter(torch.ones(2, 3))
    assert ranks_agree(model, Accelerator(cpu=True))
