import pytest
import torch

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
