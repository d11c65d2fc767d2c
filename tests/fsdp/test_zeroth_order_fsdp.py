"""ZerothOrder on an FSDP2-sharded model (2 processes, gloo): each rank perturbs and updates its own
shard with its rows of the shared z, so the steps equal the unsharded ones, every rank computes the
same projected gradients, and the exact restore is bit-exact in bf16 under FSDP."""

from __future__ import annotations

import pytest
from fsdp_common import launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("worker_zeroth_order.py", tmp_path_factory.mktemp("zo_fsdp"))


@pytest.mark.parametrize(
    "estimator, restore",
    [("spsa", "exact"), ("spsa", "subtract"), ("fzoo", "exact"), ("fzoo", "subtract"), ("svrg", "exact")],
)
def test_sharded_steps_equal_the_unsharded_steps(ranks, restore, estimator):
    """fp64, 3 steps x 2 directions (fzoo: a base and 3 probes; svrg: an anchor, a step that reads the
    anchor's shards, an anchor), weight decay: gathered weights within
    1e-12 of the single-process run (measured 1.4e-14 exact, 2.7e-14 subtract for spsa; the weights
    moved by 0.2), the same projected gradients (to the rounding of the two ways of averaging the
    loss), bit-identical on every rank, and a forward after the steps reads the updated weights
    (FSDP2's root gather is not stale)."""
    key = f"fp64-{restore}" if estimator == "spsa" else f"fp64-{estimator}-{restore}"
    for rank in ranks:
        got = rank[key]
        assert got["sharded"]
        assert got["moved"] > 0.1
        assert got["diff"] < 1e-12 and got["output_diff"] < 1e-12, got
        assert got["grads"] == pytest.approx(got["grads_ref"], rel=1e-10, abs=1e-12)
    assert ranks[0][key]["grads"] == ranks[1][key]["grads"]


def test_exact_restore_is_bit_exact_in_bf16_under_fsdp(ranks):
    """bf16 shards, lr = 0, two steps of two directions: "exact" leaves every bit of every shard and
    the next forward's output unchanged although the evaluations saw perturbed weights (non-zero
    projected gradients); "subtract" (add then subtract in bf16) does not, which shows the check bites."""
    for rank in ranks:
        exact, subtract = rank["bf16-exact"], rank["bf16-subtract"]
        assert all(abs(g) > 1e-3 for g in exact["projected"])
        assert exact["changed_elements"] == 0 and exact["output_identical"]
        assert subtract["changed_elements"] > 0 and not subtract["output_identical"]
    assert ranks[0]["bf16-exact"]["projected"] == ranks[1]["bf16-exact"]["projected"]
