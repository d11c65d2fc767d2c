"""gradkit.scaling.critical_batch: Zhang et al.'s 20% rule on branched steps-to-target, exact against the
closed form of McCandlish et al.'s trade-off, its brackets, and the branching driver."""

from __future__ import annotations

import pytest

from gradkit.errors import GradkitError
from gradkit.scaling.critical_batch import branch_cbs, critical_batch_size, steps_to_target

SIZES = [16, 32, 64, 128, 256, 512, 1024]


def tradeoff_steps(s_min: float, e_min: float, batch: int) -> float:
    return s_min + e_min / batch


@pytest.mark.parametrize("s_min, e_min", [(100.0, 20_000.0), (40.0, 3_000.0), (10.0, 50_000.0)])
@pytest.mark.parametrize("tolerance", [0.2, 0.5])
def test_the_interpolated_critical_batch_is_the_tradeoffs_closed_form(s_min, e_min, tolerance):
    steps = [tradeoff_steps(s_min, e_min, b) for b in SIZES]
    result = critical_batch_size(SIZES, steps, tolerance=tolerance)
    closed = ((1 + tolerance) * (s_min * SIZES[0] + e_min) - e_min) / s_min
    if closed >= SIZES[-1]:
        assert result.value is None and result.low == SIZES[-1] and result.high is None
    else:
        assert result.value == pytest.approx(closed, rel=1e-12)
        assert result.low <= result.value < result.high
    for b, r in zip(SIZES, result.overhead, strict=True):  # r(B) = S(B) B / (S_0 B_0)
        assert r == pytest.approx(tradeoff_steps(s_min, e_min, b) * b / (steps[0] * SIZES[0]), rel=1e-12)


def test_perfect_linear_scaling_puts_it_beyond_the_largest_size():
    result = critical_batch_size(SIZES, [10_240 / b for b in SIZES])
    assert result.value is None and (result.low, result.high) == (1024, None)
    assert result.describe() == "B_crit >= 1024"


def test_a_branch_that_never_reached_the_target_brackets_it():
    steps = [100.0, 50.0, 26.0, None, 10.0]
    result = critical_batch_size([16, 32, 64, 128, 256], steps)
    assert result.value is None and (result.low, result.high) == (64, 128)
    assert result.describe() == "64 <= B_crit < 128"


def test_sizes_are_sorted_with_their_steps():
    steps = [tradeoff_steps(100, 20_000, b) for b in SIZES]
    shuffled = critical_batch_size(SIZES[::-1], steps[::-1])
    assert shuffled == critical_batch_size(SIZES, steps)


@pytest.mark.parametrize(
    "batches, steps, fragment",
    [
        ([16], [10.0], "at least two batch sizes"),
        ([16, 32], [10.0], "at least two batch sizes"),
        ([16, 16], [10.0, 5.0], "distinct positive integers"),
        ([16, 32], [None, None], "no batch size reached the target"),
        ([16, 32], [0.0, 5.0], "steps to the target must be > 0"),
    ],
)
def test_bad_measurements_are_refused(batches, steps, fragment):
    with pytest.raises(GradkitError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        critical_batch_size(batches, steps)


def test_branching_runs_every_size_smallest_first():
    seen = []

    def run_branch(batch: int) -> float:
        seen.append(batch)
        return tradeoff_steps(50.0, 8_000.0, batch)

    result = branch_cbs(run_branch, [256, 16, 64], progress=False)
    assert seen == [16, 64, 256]
    assert result == critical_batch_size([16, 64, 256], [tradeoff_steps(50.0, 8_000.0, b) for b in seen])


def test_linear_scaling_is_measured_from_the_most_example_efficient_size():
    """Smallest batches that need more examples than larger ones (a noise floor near the target at their
    lr) do not set the reference: r(B) is relative to the fewest examples."""
    sizes = [16, 32, 64, 128, 256]
    steps = [60.0, 14.0, 6.0, 3.5, 2.0]  # examples 960, 448, 384, 448, 512
    result = critical_batch_size(sizes, steps)
    assert result.overhead == pytest.approx([2.5, 7 / 6, 1.0, 7 / 6, 4 / 3])
    # r(32) = 7/6 is not past the limit but lies below B_0 = 64; past it r(128) = 7/6, r(256) = 4/3:
    # 128 + (1.2 - 7/6) / (4/3 - 7/6) * 128 = 153.6
    assert result.value == pytest.approx(153.6) and (result.low, result.high) == (128, 256)


@pytest.mark.parametrize(
    "curve, target, expected",
    [
        ([(0, 1.0), (4, 0.8), (8, 0.6)], 0.7, 6.0),  # halfway between the evaluations at 4 and 8
        ([(0, 1.0), (4, 0.8), (8, 0.6)], 0.75, 5.0),  # 5.0 exactly
        ([(0, 1.0), (4, 0.8), (8, 0.6)], 0.72, 6.0),  # 5.6: a run takes whole steps
        ([(0, 1.0), (2, 0.5)], 0.9, 1.0),  # crossed before the first evaluation: at least one step
        ([(0, 1.0), (4, 0.8), (8, 0.6)], 0.8, 4.0),  # an evaluation exactly at the target
        ([(0, 1.0), (4, 0.9), (8, 0.95), (12, 0.5)], 0.9, 4.0),  # the first crossing, not a later one
        ([(0, 1.0), (4, 0.9), (8, 0.85)], 0.5, None),  # never reached
        ([(0, 0.4), (4, 0.9)], 0.5, 0.0),  # already there at the start
    ],
)
def test_steps_to_target_interpolates_to_a_whole_step(curve, target, expected):
    assert steps_to_target(curve, target) == (None if expected is None else pytest.approx(expected))
