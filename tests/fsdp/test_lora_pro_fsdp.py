"""LoRAPro on an FSDP2-sharded PEFT model (2 processes, gloo): the factors and their gradients are
gathered (r (in + out) values per layer), the full-moment form keeps only this rank's rows of its
out x in moments, and the steps equal the unsharded single-process steps on the whole batch."""

from __future__ import annotations

import pytest
from fsdp_common import launch

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return launch("worker_lora_pro.py", tmp_path_factory.mktemp("lora_pro_fsdp"))


@pytest.mark.parametrize("form", ["adamw-full", "adamw-projected", "adamw-factor", "sgd-projected"])
def test_sharded_steps_equal_the_unsharded_steps(ranks, form):
    """Three steps (B = 0 first, then the general branch; weight decay; an AdamW head): every
    parameter, gathered, equals the single-process result to fp32 rounding (measured: 5e-7 to 3e-6
    for the AdamW forms, 4e-5 for SGD whose factors move by ~5)."""
    for rank in ranks:
        got = rank[form]
        assert got["moved"] > 0.1  # the steps did change the weights
        assert got["diff"] <= 2e-5 * max(1.0, got["moved"]), got


def test_full_moments_hold_only_this_ranks_rows(ranks):
    """moments="full": each rank's out x in moment is its rows of B (FSDP2's row shard), so the
    ranks' moments add up to out rows, never out x in on one rank."""
    shapes = [rank["adamw-full"]["moment_shapes"] for rank in ranks]
    for name in shapes[0]:
        rows = [s[name][0][0] for s in shapes]
        for s in shapes:
            moment, b_local, a_full = s[name]
            assert moment[0] == b_local[0] and moment[1] == a_full[1]
        out = sum(rows)
        assert rows == [(out + 1) // 2, out // 2]  # torch.chunk's split: uneven for odd out


def test_bf16_solves_run_in_fp32(ranks):
    """bf16 factors (random B: the general branch, Sylvester X): the step equals the update computed
    in fp64 from the same bf16 factors and gradients, rounded once to bf16 (at most 1 bf16 eps of the
    larger of the old and new value; measured 0.76)."""
    for rank in ranks:
        got = rank["bf16"]
        assert got["dtypes"] == ["torch.bfloat16"]
        assert got["bf16_moved"] > 0.01
        assert got["bf16_worst_ulps"] <= 1.0, got
