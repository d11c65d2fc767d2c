"""SteepestDescent on an FSDP2-sharded model (2 processes, gloo): the l2/rms norms all-reduced, sign
descent per row, and each spectral direction computed whole on one owner rank and scattered back, so
the steps equal the unsharded ones (uneven shards: 11, 13 and 9 rows over 2 ranks)."""

from __future__ import annotations

import pytest
from fsdp_common import launch

pytestmark = pytest.mark.distributed

CASES = ["l2", "rms", "linf", "spectral", "spectral-newton-schulz"]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("worker_steepest.py", tmp_path_factory.mktemp("steepest_fsdp"))


@pytest.mark.parametrize("case", CASES)
def test_sharded_steps_equal_the_unsharded_steps(ranks, case):
    """3 steps, Nesterov momentum 0.9, weight decay, both optimisers given the same gradients (with
    8-row batches some gradients are rank-deficient: the spectral step turns their rounding-level
    directions into unit ones, so any difference in the gradients would show there): the gathered
    weights equal the one-process run to 1e-6 in fp32 and 1e-12 in fp64 and moved by far more, on
    every rank."""
    for rank in ranks:
        for dtype, tol in (("fp32", 1e-6), ("fp64", 1e-12)):
            got = rank[f"{case}-{dtype}"]
            assert got["sharded"] and got["moved"] > 0.05, got
            assert got["diff"] < tol, (dtype, got)
