"""BatchSchedule: the noise mode's multiples and their learning-rate factors against the closed forms,
the ramp's doublings, never shrinking, the cap, resume, and bad arguments."""

from __future__ import annotations

import math

import pytest

from gradkit import BatchSchedule, GradkitError
from gradkit.scaling.batch_schedule import noise_multiple, ramp_multiple
from gradkit.scaling.laws import lr_for_batch


def test_noise_multiple_is_the_rounded_share_of_b_simple_within_the_cap():
    assert noise_multiple(100.0, 16, 1.0, 64) == 6  # round(6.25)
    assert noise_multiple(100.0, 16, 0.5, 64) == 3  # round(3.125)
    assert noise_multiple(3.0, 16, 1.0, 64) == 1  # never below the base batch
    assert noise_multiple(1e6, 16, 1.0, 8) == 8  # the cap


def test_ramp_doubles_every_ramp_examples_up_to_the_cap():
    assert [ramp_multiple(e, 100, 8) for e in (0, 99, 100, 250, 300, 10_000)] == [1, 1, 2, 4, 8, 8]
    assert ramp_multiple(10**9, 1, 6) == 6  # a cap that is not a power of two


def test_noise_schedule_checks_on_its_steps_and_never_shrinks():
    s = BatchSchedule(16, "noise", check_every=10, max_batch=128, law="sgd")
    assert not s.update(5, 80, b_simple=200.0)  # not a check step
    assert not s.update(10, 160, b_simple=None)  # not measurable yet
    assert s.update(10, 160, b_simple=100.0) and s.batch_size == 96  # round(100/16) = 6
    assert not s.update(20, 1120, b_simple=20.0) and s.batch_size == 96  # it asks for 1: kept at 6
    assert s.update(30, 2080, b_simple=1000.0) and s.batch_size == 128  # capped at 8 x 16
    assert [c["batch"] for c in s.changes] == [96, 128]


@pytest.mark.parametrize("law", ["sgd", "adam"])
def test_lr_factor_is_the_product_of_the_laws_ratios(law):
    s = BatchSchedule(16, "noise", check_every=1, law=law)
    s.update(1, 16, b_simple=64.0)  # 16 -> 64
    s.update(2, 80, b_simple=256.0)  # 64 -> 256
    if law == "sgd":
        first = lr_for_batch(1.0, 16, 64, optimizer="sgd", b_noise=64.0)
        second = lr_for_batch(1.0, 64, 256, optimizer="sgd", b_noise=256.0)
        assert first == pytest.approx((1 + 64 / 16) / (1 + 64 / 64))  # McCandlish's closed form: 2.5
    else:
        first = lr_for_batch(1.0, 16, 64, optimizer="adam", kappa=8.0, b_noise=64.0)
        second = lr_for_batch(1.0, 64, 256, optimizer="adam", kappa=16.0, b_noise=256.0)
    assert s.lr_factor == pytest.approx(first * second, rel=1e-12)
    assert s.batch_size == 256


def test_adam_factor_grows_like_sqrt_batch_far_below_the_noise_scale():
    """Adam's sign-descent law: for B, B' << B_noise the optimal lr scales as sqrt(B'/B)."""
    s = BatchSchedule(1, "noise", check_every=1, max_batch=4, law="adam")
    s.update(1, 1, b_simple=4e4)  # asks for far more than the cap, 4
    assert s.batch_size == 4 and s.lr_factor == pytest.approx(math.sqrt(4), rel=1e-3)


def test_ramp_and_fixed():
    ramp = BatchSchedule(8, "ramp", ramp_examples=100, max_batch=32)
    grew = [ramp.update(step, step * 8) for step in range(1, 60)]
    assert ramp.batch_size == 32 and sum(grew) == 2 and ramp.lr_factor == 1.0
    fixed = BatchSchedule(8, "fixed")
    assert not any(fixed.update(step, step * 8, b_simple=1e4) for step in range(1, 200))
    assert fixed.batch_size == 8


def test_state_dict_round_trip_continues_the_same_schedule():
    a = BatchSchedule(16, "noise", check_every=2, law="adam")
    for step, b in ((2, 40.0), (4, 90.0)):
        a.update(step, step * 16, b_simple=b)
    b_sched = BatchSchedule(16, "noise", check_every=2, law="adam")
    b_sched.load_state_dict(a.state_dict())
    for sched in (a, b_sched):
        sched.update(6, 200, b_simple=400.0)
    assert (a.batch_size, a.lr_factor, a.changes) == (b_sched.batch_size, b_sched.lr_factor, b_sched.changes)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"mode": "grow"}, "unknown batch schedule 'grow'"),
        ({"max_batch": 8}, "max_batch 8 must be a multiple of base_batch 16"),
        ({"max_batch": 40}, "max_batch 40 must be a multiple"),
        ({"noise_fraction": 0.0}, "noise_fraction must be > 0"),
        ({"check_every": 0}, "check_every must be an integer >= 1"),
        ({"mode": "ramp"}, "the ramp schedule needs ramp_examples"),
        ({"law": "lion"}, "unknown learning-rate law 'lion'"),
    ],
)
def test_bad_arguments_are_clear_errors(kwargs, fragment):
    with pytest.raises(GradkitError, match=fragment):
        BatchSchedule(16, **kwargs)
