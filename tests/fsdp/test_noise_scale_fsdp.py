"""NoiseScale on an FSDP2-sharded model (2 processes, gloo): the two-batch estimate from each rank's
local gradient (hooks on FSDP2's unsharded parameters, before the reduce-scatter) against the reduced
one (the ranks' shards of the mean gradient), equal to the same estimates computed by hand in one
process from each rank's local gradient and their mean, which is what the DDP source measures
(tests/scaling/test_noise_scale_ddp.py).

Tolerances are fp32's: the model and its gradients are float32 (eps 1.2e-7). The squared norms agree
to 1e-6 relative (measured at most 2.5e-7); the estimates derived from them to 1e-4 relative (measured
at most 1.1e-5, in the per-example |G|² estimate, a difference of nearly equal terms that scales the
rounding up), b_simple to 1e-5 (measured at most 1.2e-6)."""

from __future__ import annotations

import pytest
from fsdp_common import launch

pytestmark = pytest.mark.distributed

NORMS = ("small_sq_norm", "big_sq_norm")
ESTIMATES = ("grad_sq_norm", "trace_sigma", "smoothed_grad_sq_norm", "smoothed_trace_sigma")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("worker_noise_scale.py", tmp_path_factory.mktemp("noise_scale_fsdp"))


def _assert_same(got: list[dict], want: list[dict], b_small: int, b_big: int) -> None:
    assert len(got) == len(want) == 3
    measurable = 0
    for g, w in zip(got, want, strict=True):
        assert (g["b_small"], g["b_big"]) == (w["b_small"], w["b_big"]) == (b_small, b_big)
        # the local gradients are noisier than the reduced one: a recorder that read the reduced
        # gradient for both would not pass
        assert w["small_sq_norm"] > 1.1 * w["big_sq_norm"]
        for key in NORMS:
            assert g[key] == pytest.approx(w[key], rel=1e-6), key
        for key in ESTIMATES:
            assert g[key] == pytest.approx(w[key], rel=1e-4), key
        assert (g["b_simple"] is None) == (w["b_simple"] is None)
        if w["b_simple"] is not None:
            measurable += 1
            assert g["b_simple"] == pytest.approx(w["b_simple"], rel=1e-5)
    assert measurable >= 2


@pytest.mark.parametrize("case", ["one_micro", "accumulate_no_sync", "accumulate_sync_each"])
def test_local_vs_reduced_gradient_equals_the_hand_computed_estimate(ranks, case):
    """One micro-batch of 4 per rank (b = 4, B = 8), and accumulation over two micro-batches of 2 per
    rank (b = 2, B = 8), with FSDP2's gradient sync off for the first micro-batch (the unsharded local
    gradient accumulates, one reduce-scatter per step) or on for both (two reduce-scatters): every
    rank reports the estimates the reference computes from the ranks' local micro-batch gradients, the
    hooks sit on all 10 trainable parameters' unsharded copies, and the sharded model trains as the
    reference does (weights within 3e-8)."""
    b_small = 4 if case == "one_micro" else 2
    for rank in ranks:
        result = rank[case]
        assert result["hooked"] == rank["trainable"] == 10
        assert result["weights_diff"] < 1e-6
        _assert_same(result["got"], result["want"], b_small, 8)


def test_per_example_source_on_sharded_model_equals_one_process(ranks):
    """Per-example norms (b = 1) of every Linear on the sharded model, against the same recorder on
    the unsharded model with the whole batch in one process: B = both ranks' 8 examples and |G_B|² the
    squared norm of the reduced gradient (the ranks' shard norms summed)."""
    for rank in ranks:
        _assert_same(rank["per_example"]["got"], rank["per_example"]["want"], 1, 8)


def test_every_rank_reports_the_same_estimates(ranks):
    for case in ("one_micro", "accumulate_no_sync", "accumulate_sync_each", "per_example"):
        assert ranks[0][case]["got"] == ranks[1][case]["got"], case


def test_refuses_what_it_cannot_measure(ranks):
    """A sharded model with distributed=False or fused=True (both would read the reduced gradient as a
    local one), and a trainable parameter outside fully_shard (FSDP2 never reduces it): clear errors."""
    for rank in ranks:
        got = rank["refusals"]
        assert "distributed=False" in got["distributed_false"]
        assert "fused=True" in got["fused"]
        assert "'head.weight'" in got["plain_parameter"] and "fully_shard" in got["plain_parameter"]
