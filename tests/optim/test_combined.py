"""CombinedOptimizer: the inner optimisers' steps exactly, one set of groups for a scheduler, and a
standard state dict that round-trips."""

from __future__ import annotations

import copy

import pytest
import torch

from gradkit.errors import GradkitError
from gradkit.optim.combined import CombinedOptimizer


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=gen)),
        torch.nn.Parameter(torch.randn(3, generator=gen)),
    ]


def _loss(params) -> torch.Tensor:
    matrix, vector = params
    return (matrix @ vector).pow(2).sum() + matrix.sum() * vector.sum()


def _pair(params):
    return [torch.optim.SGD([params[0]], lr=0.1, momentum=0.9), torch.optim.AdamW([params[1]], lr=0.01)]


def _train(optimizer, params, steps: int, scheduler=None) -> None:
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(params).backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def test_the_combined_step_is_each_inner_step():
    alone, together = _params(), _params()
    inner = _pair(alone)
    for _ in range(5):
        for optimizer in inner:
            optimizer.zero_grad()
        _loss(alone).backward()
        for optimizer in inner:
            optimizer.step()
    _train(CombinedOptimizer(_pair(together)), together, 5)
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)


def test_a_scheduler_reaches_every_inner_group():
    params = _params()
    combined = CombinedOptimizer(_pair(params))
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lambda step: 0.5**step)
    _train(combined, params, 3, scheduler)
    assert [o.param_groups[0]["lr"] for o in combined.optimizers] == [0.1 * 0.125, 0.01 * 0.125]


def test_the_state_dict_round_trips_and_resumes_bit_for_bit():
    straight, resumed = _params(), _params()
    first = CombinedOptimizer(_pair(straight))
    _train(first, straight, 3)
    saved = copy.deepcopy(first.state_dict())
    # the standard layout: parameter 0 is the SGD's, parameter 1 AdamW's
    assert sorted(saved["state"]) == [0, 1] and "momentum_buffer" in saved["state"][0]
    assert "exp_avg" in saved["state"][1] and [g["params"] for g in saved["param_groups"]] == [[0], [1]]
    weights = [p.detach().clone() for p in straight]
    _train(first, straight, 4)

    with torch.no_grad():
        for p, w in zip(resumed, weights, strict=True):
            p.copy_(w)
    second = CombinedOptimizer(_pair(resumed))
    second.load_state_dict(saved)
    _train(second, resumed, 4)
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_a_state_of_another_layout_is_refused():
    params = _params()
    combined = CombinedOptimizer(_pair(params))
    other = torch.optim.AdamW(params, lr=0.01).state_dict()
    with pytest.raises(GradkitError, match="another --optimizer"):
        combined.load_state_dict(other)


def test_a_parameter_in_two_optimizers_is_refused():
    params = _params()
    with pytest.raises(GradkitError, match="belongs to two"):
        CombinedOptimizer([torch.optim.SGD(params, lr=0.1), torch.optim.AdamW([params[0]], lr=0.1)])


def test_the_groups_stay_live_after_an_inner_load_state_dict():
    """accelerate's prepare reloads the state dict, which replaces torch's group dicts: a scheduler
    must still reach the groups the inner optimisers step with."""
    params = _params()
    combined = CombinedOptimizer(_pair(params))
    combined.load_state_dict(combined.state_dict())
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lambda step: 0.5)
    assert scheduler.get_last_lr() == [0.05, 0.005]
    assert [o.param_groups[0]["lr"] for o in combined.optimizers] == [0.05, 0.005]


def test_the_state_is_every_inner_optimizers_state():
    from gradkit.train.measures import optimizer_state_bytes

    params = _params()
    inner = _pair(params)
    combined = CombinedOptimizer(inner)
    _train(combined, params, 2)
    assert set(combined.state) == {params[0], params[1]}
    assert combined.state[params[0]] is inner[0].state[params[0]]
    expected = sum(
        v.numel() * v.element_size()
        for o in inner
        for s in o.state.values()
        for v in s.values()
        if torch.is_tensor(v)
    )
    assert optimizer_state_bytes(combined) == expected > 0
