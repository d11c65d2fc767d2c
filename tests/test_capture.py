"""capture/tap: one entry per call, copies safe from in-place ops, hooks removed, grads equal autograd's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradkit.capture import capture, tap
from gradkit.errors import GradkitError


class _Twice(nn.Module):
    """Calls ``block`` twice and ``relu`` in place on its result; taps an intermediate."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Linear(4, 4)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h = self.relu(self.block(x))
        h = tap("mid", h * 2)
        return self.head(self.relu(self.block(h)))


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


def test_called_twice_gives_two_entries_and_inplace_relu_does_not_leak():
    model, x = _Twice(), torch.randn(3, 4)
    with capture(model, ["block"]) as got:
        model(x)
    first = model.block(x)  # recompute the first call's pre-ReLU output
    assert len(got["block"]) == 2
    assert torch.equal(got["block"][0], first)
    assert (got["block"][0] < 0).any() and (got["block"][1] < 0).any()  # the in-place ReLU did not touch them


def test_hooks_removed_also_after_exception():
    model = _Twice()
    assert _hook_count(model) == 0
    for what in ("output", "input", "grad"):
        with capture(model, ["*"], what=what):
            assert _hook_count(model) > 0
        assert _hook_count(model) == 0
    with pytest.raises(RuntimeError, match="boom"), capture(model, ["block", "head"]):
        raise RuntimeError("boom")
    assert _hook_count(model) == 0


def test_grad_equals_autograd_in_forward_call_order():
    model, x = _Twice(), torch.randn(3, 4)
    with capture(model, ["block"], what="grad") as got:
        model(x).sum().backward()
    # reference: the same computation with retain_grad on both calls' outputs
    a = model.block(x)
    a.retain_grad()
    b = model.block(torch.relu(a) * 2)
    b.retain_grad()
    model.head(torch.relu(b)).sum().backward()
    assert len(got["block"]) == 2
    torch.testing.assert_close(got["block"][0], a.grad, atol=0, rtol=0)
    torch.testing.assert_close(got["block"][1], b.grad, atol=0, rtol=0)


def test_inputs_and_all_outputs_and_device():
    model, x = _Twice(), torch.randn(3, 4)
    with capture(model, "head", what="input", to=None) as got:
        model(x)
    h = torch.relu(model.block(torch.relu(model.block(x)) * 2))
    torch.testing.assert_close(got["head"][0], h, atol=0, rtol=0)

    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, {"b": x * 3}

    wrapper = nn.Sequential(Pair())
    with capture(wrapper, "0", all_outputs=True) as got:
        wrapper(x)
    one, three = got["0"][0]
    assert torch.equal(one, x + 1) and torch.equal(three, x * 3)


def test_tap_records_inside_capture_and_is_noop_outside():
    model, x = _Twice(), torch.randn(3, 4)
    t = torch.ones(2)
    assert tap("anything", t) is t  # outside a capture: same object, nothing kept
    with capture(model) as got:
        model(x)
        model(x)
    assert len(got["mid"]) == 2
    torch.testing.assert_close(got["mid"][0], torch.relu(model.block(x)) * 2, atol=0, rtol=0)
    with capture(model, taps=["other.*"]) as got:
        model(x)
    assert "mid" not in got
    with capture(model, what="grad") as got:  # tapped values' gradients
        model(x).sum().backward()
    assert got["mid"][0].shape == (3, 4)


def test_bad_pattern_lists_close_names():
    model = _Twice()
    with pytest.raises(GradkitError, match="close names: block") as err, capture(model, ["blok"]):
        pass
    assert "\n" not in str(err.value)
    with pytest.raises(GradkitError), capture(model, ["block"], what="weights"):
        pass


def test_hf_encoder_layers_match_hidden_states(tiny_classifier):
    model = tiny_classifier.eval()
    ids = torch.randint(1000, 2000, (2, 6))
    mask = torch.ones_like(ids)
    with torch.no_grad(), capture(model, ["encoder.encoder.layer.*"]) as got:
        model(input_ids=ids, attention_mask=mask)
    assert sorted(got) == ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    with torch.no_grad():
        ref = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for i in range(2):
        torch.testing.assert_close(got[f"encoder.encoder.layer.{i}"][0], ref[i + 1], atol=1e-6, rtol=0)


def test_name_globs_stay_inside_one_component():
    from gradkit.capture import name_matches

    assert name_matches("encoder.layer.3.output", "encoder.layer.*.output")
    assert not name_matches("encoder.layer.3.attention.output", "encoder.layer.*.output")
    assert name_matches("encoder.layer.3.attention.output", "**.output")
    assert name_matches("encoder.layer.3.output", "encoder.layer.[0-3].output")
    assert not name_matches("encoder.layer.4.output", "encoder.layer.[0-3].output")
    assert name_matches("encoder.layer.4.output", "encoder.layer.[!0-3].output")
    assert name_matches("layer.1", "layer.?") and not name_matches("layer.10", "layer.?")


def test_package_attribute_works_after_tap_imported_the_submodule():
    import gradkit
    import gradkit.capture as module

    model = _Twice()
    assert gradkit.tap is module.tap
    with gradkit.capture(model, "head") as got:  # whether this resolves to the function or the module
        model(torch.randn(2, 4))
    with module(model, "head") as got2:
        model(torch.randn(2, 4))
    assert len(got["head"]) == len(got2["head"]) == 1
