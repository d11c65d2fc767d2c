"""ZerothOrder: exact restore in every dtype, the seed trick and the global RNG, the update formula,
resume, bad input, and a loss that goes down."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

from gradkit import GradkitError, ZerothOrder


class Net(nn.Module):
    """Embedding, LayerNorm, a block called twice (shared weights), and a parameter of the root."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.norm = nn.LayerNorm(16)
        self.block = nn.Linear(16, 16)
        self.scale = nn.Parameter(torch.ones(16))
        self.head = nn.Linear(16, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.embed(tokens).mean(1))
        h = torch.tanh(self.block(torch.tanh(self.block(h)))) * self.scale
        return self.head(h)


def make_problem(dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Net().to(dtype)
    tokens = torch.randint(0, 50, (64, 5), generator=g)
    labels = torch.randint(0, 3, (64,), generator=g)

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(net(tokens).float(), labels)

    return net, closure


def bits(module: nn.Module) -> list[torch.Tensor]:
    """Raw bit patterns (so -0.0 vs 0.0 and NaN payloads count as differences)."""
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return [p.detach().clone().view(ints[p.element_size()]) for p in module.parameters()]


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run a test as is (these small parameters fit one chunk of z) and with z generated in chunks
    of 10 elements, the path every parameter over a million elements takes."""
    if request.param == "chunked":
        monkeypatch.setattr("gradkit.optim.zo_directions.CHUNK", 10)
    return request.param


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_lr_zero_step_with_exact_restore_is_bit_identical(dtype, chunking):
    net, closure = make_problem(dtype)
    with torch.no_grad():
        net.head.bias[0] = -0.0  # signed zeros survive too
    before = bits(net)
    opt = ZerothOrder(net.parameters(), lr=0.0, eps=1e-2, n_samples=3, weight_decay=0.1, restore="exact")
    for _ in range(3):
        loss = opt.step(closure)
        assert torch.isfinite(loss) and loss.shape == ()
    assert same_bits(before, bits(net))
    assert all(abs(d) > 0 for d in opt.last_projected_grads)  # the perturbation did change the loss


def test_subtract_restore_is_not_exact_in_bf16():
    """The classic add-then-subtract loses bits in bf16: the exactness test above can fail."""
    net, closure = make_problem(torch.bfloat16)
    before = bits(net)
    opt = ZerothOrder(net.parameters(), lr=0.0, eps=1e-2, restore="subtract")
    opt.step(closure)
    assert not same_bits(before, bits(net))


def test_exact_and_subtract_evaluate_the_same_points_in_fp32(chunking):
    """Same seed, same directions: the hook-based perturbation sees the same losses as in-place."""
    results = {}
    for restore in ("exact", "subtract"):
        net, closure = make_problem(torch.float64)
        opt = ZerothOrder(
            net.parameters(), lr=1e-2, eps=1e-3, n_samples=2, restore=restore, seed=5, sparse_embeddings=False
        )
        for _ in range(3):
            opt.step(closure)
        results[restore] = (opt.last_projected_grads, [p.detach().clone() for p in net.parameters()])
    assert results["exact"][0] == pytest.approx(results["subtract"][0], rel=1e-6, abs=1e-9)
    for a, b in zip(results["exact"][1], results["subtract"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("restore", ["exact", "subtract"])
def test_a_step_leaves_the_global_rng_untouched(restore):
    net, closure = make_problem()
    state = torch.get_rng_state()
    opt = ZerothOrder(net.parameters(), lr=1e-3, n_samples=2, restore=restore)
    opt.step(closure)
    assert torch.equal(state, torch.get_rng_state())


class Linear1D(nn.Module):
    """f(θ) = c·θ: the directional derivative is exact, so the update is easy to predict."""

    def __init__(self, c: torch.Tensor):
        super().__init__()
        self.c = c
        self.w = nn.Parameter(torch.zeros_like(c))

    def forward(self) -> torch.Tensor:
        return (self.w * self.c).sum()


def test_update_is_unbiased_with_n_samples_and_per_group_eps(chunking):
    c1 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    c2 = torch.tensor([3.0, 0.0], dtype=torch.float64)
    a, b = Linear1D(c1), Linear1D(c2)
    lr = 1e-3
    opt = ZerothOrder([{"params": [a.w]}, {"params": [b.w], "eps": 2e-3}], lr=lr, eps=1e-3, n_samples=4000)
    opt.step(lambda: a() + b())
    # E[(c·z) z] = c: each group moves by about -lr * c; the sampling error per coordinate is about
    # |ε_h c_h / ε_g| / sqrt(n) summed over groups h (here at most 0.1)
    torch.testing.assert_close(a.w.detach() / -lr, c1, atol=0.4, rtol=0)
    torch.testing.assert_close(b.w.detach() / -lr, c2, atol=0.4, rtol=0)


def test_weight_decay_skips_one_dimensional_parameters(chunking):
    net, _ = make_problem()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = ZerothOrder(net.parameters(), lr=0.1, weight_decay=0.5)
    tokens = torch.zeros(2, 5, dtype=torch.long)
    opt.step(lambda: net(tokens).sum() * 0 + 1)  # constant loss: the update is the decay alone
    for name, param in net.named_parameters():
        factor = 1 - 0.1 * 0.5 if param.ndim >= 2 else 1.0
        torch.testing.assert_close(param.detach(), before[name] * factor, msg=name)


def test_resumed_run_takes_exactly_the_same_steps(chunking):
    net, closure = make_problem()
    opt = ZerothOrder(net.parameters(), lr=1e-2, eps=1e-3, n_samples=2, weight_decay=0.01)
    for _ in range(3):
        opt.step(closure)
    buffer = io.BytesIO()
    torch.save({"model": net.state_dict(), "opt": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(closure)
    straight = bits(net)

    net2, closure2 = make_problem(seed=0)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    net2.load_state_dict(saved["model"])
    opt2 = ZerothOrder(net2.parameters(), lr=1e-2, eps=1e-3, n_samples=2, weight_decay=0.01, seed=123)
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 3
    for _ in range(3):
        opt2.step(closure2)
    assert same_bits(straight, bits(net2))


def test_learning_rate_lives_in_param_groups_for_schedulers():
    net, closure = make_problem()
    opt = ZerothOrder(net.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.0 if step >= 1 else 1.0)
    opt.step(closure)
    sched.step()
    before = bits(net)
    opt.step(closure)  # lr is now 0
    assert same_bits(before, bits(net))


def small_classifier():
    """A 10-16-3 tanh MLP and the closure of its cross-entropy on 256 linearly separable points."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, 3, generator=g)).argmax(1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))

    def closure() -> torch.Tensor:
        return nn.functional.cross_entropy(model(x), y)

    return model, closure


def test_loss_goes_down_on_a_small_classifier():
    model, closure = small_classifier()
    first = closure().item()
    opt = ZerothOrder(model.parameters(), lr=2e-2, eps=1e-3, n_samples=4)
    for _ in range(600):
        opt.step(closure)
    assert closure().item() < 0.4 * first  # 1.10 -> 0.27 with these seeds


@pytest.mark.parametrize("restore", ["exact", "subtract"])
def test_non_scalar_closure_is_a_clear_error_and_weights_are_restored(restore):
    net, _ = make_problem()
    before = bits(net)
    opt = ZerothOrder(net.parameters(), restore=restore)
    tokens = torch.zeros(4, 5, dtype=torch.long)
    with pytest.raises(GradkitError, match="shape"):
        opt.step(lambda: net(tokens))
    if restore == "exact":
        assert same_bits(before, bits(net))
    else:  # put back by subtraction: equal up to fp32 rounding
        for a, p in zip(before, net.parameters(), strict=True):
            torch.testing.assert_close(a.view(torch.float32), p.detach())


@pytest.mark.parametrize("restore", ["exact", "subtract"])
def test_non_finite_loss_skips_warns_once_then_fails(restore):
    net, closure = make_problem()
    before = bits(net)
    opt = ZerothOrder(net.parameters(), lr=1e-2, restore=restore, max_bad_steps=3)
    with pytest.warns(UserWarning, match="non-finite"):
        loss = opt.step(lambda: closure() * float("nan"))
    assert torch.isnan(loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once only
        opt.step(lambda: closure() + float("inf"))
        assert opt.skipped_steps == 2 and opt.steps == 0
        if restore == "exact":
            assert same_bits(before, bits(net))
        opt.step(closure)  # a good step resets the count in a row
        assert opt.bad_steps_in_row == 0 and opt.steps == 1
        opt.step(lambda: closure() * float("nan"))
        opt.step(lambda: closure() * float("nan"))
        with pytest.raises(GradkitError, match="3 steps in a row"):
            opt.step(lambda: closure() * float("nan"))
    assert opt.skipped_steps == 5


def test_bad_arguments_are_clear_errors():
    net, _ = make_problem()
    with pytest.raises(GradkitError, match="eps must be > 0"):
        ZerothOrder(net.parameters(), eps=0.0)
    with pytest.raises(GradkitError, match="eps must be > 0"):
        ZerothOrder([{"params": [net.scale], "eps": -1.0}])
    with pytest.raises(GradkitError, match="empty parameter list"):
        ZerothOrder([])
    with pytest.raises(GradkitError, match="empty parameter list"):
        ZerothOrder(p for p in net.parameters() if p.ndim > 5)
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(GradkitError, match="lr must be finite"):
            ZerothOrder(net.parameters(), lr=bad)
        with pytest.raises(GradkitError, match="weight_decay must be finite"):
            ZerothOrder(net.parameters(), weight_decay=bad)
    with pytest.raises(GradkitError, match="eps must be > 0"):
        ZerothOrder(net.parameters(), eps=float("nan"))
    with pytest.raises(GradkitError, match="restore"):
        ZerothOrder(net.parameters(), restore="undo")
    with pytest.raises(GradkitError, match="n_samples"):
        ZerothOrder(net.parameters(), n_samples=0)
    with pytest.raises(GradkitError, match="closure"):
        ZerothOrder(net.parameters()).step()


def test_unused_parameter_warns_once_and_is_not_updated_with_exact_restore():
    net, closure = make_problem()
    spare = nn.Parameter(torch.ones(4, 4))
    opt = ZerothOrder([*net.parameters(), spare], lr=1e-2)
    with pytest.warns(UserWarning, match="not perturbed"):
        opt.step(closure)
    assert torch.equal(spare.detach(), torch.ones(4, 4))


def test_exact_restore_reaches_peft_lora_layers(tiny_classifier):
    """Every LoRA factor and the head are perturbed inside their modules' forwards: the hook-based
    evaluation gives the same losses as perturbing in place."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        tiny_classifier, LoraConfig(r=2, target_modules=["query", "value"], modules_to_save=["head"])
    ).double()
    model.eval()
    batch = {
        "input_ids": torch.randint(1000, 2000, (4, 8), generator=torch.Generator().manual_seed(0)),
        "labels": torch.tensor([0, 1, 1, 0]),
    }
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = {}
    for restore in ("exact", "subtract"):
        clone = copy.deepcopy(model)
        params = [p for p in clone.parameters() if p.requires_grad]
        opt = ZerothOrder(params, lr=0.0, eps=1e-3, restore=restore, seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no "not perturbed" warning: every factor was reached
            opt.step(lambda clone=clone: clone(**batch).loss)
        grads[restore] = opt.last_projected_grads[0]
    assert len(trainable) > 4 and grads["exact"] != 0.0
    assert grads["exact"] == pytest.approx(grads["subtract"], rel=1e-6)


class Lookup(nn.Module):
    """f(E) = sum_i c_i · E[ids_i]: the gradient is known, and zero on rows never looked up."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.embed = nn.Embedding(rows, dim)

    def forward(self, ids: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (self.embed(ids) * c).sum()


def test_sparse_embeddings_update_used_rows_without_bias_and_leave_the_rest_alone():
    g = torch.Generator().manual_seed(0)
    model = Lookup(20, 3).double()
    ids = torch.tensor([2, 5, 5, 11])
    c = torch.randn(4, 3, generator=g, dtype=torch.float64)
    grad = torch.zeros(20, 3, dtype=torch.float64).index_add_(0, ids, c)
    before = model.embed.weight.detach().clone()
    lr = 1e-3
    opt = ZerothOrder(model.parameters(), lr=lr, eps=1e-3, n_samples=4000)
    opt.step(lambda: model(ids, c))
    moved = (model.embed.weight.detach() - before) / -lr
    unused = torch.ones(20, dtype=torch.bool)
    unused[ids] = False
    assert torch.equal(moved[unused], torch.zeros_like(moved[unused]))  # exactly: no noise there
    # E[(g·z) z] = g on the 3 used rows (9 coordinates): sampling error about |g| / sqrt(n) ≈ 0.05
    torch.testing.assert_close(moved[~unused], grad[~unused], atol=0.25, rtol=0)


def test_dense_embeddings_put_noise_on_every_row():
    model = Lookup(20, 3).double()
    ids = torch.tensor([2, 5])
    before = model.embed.weight.detach().clone()
    opt = ZerothOrder(model.parameters(), lr=1e-3, eps=1e-3, sparse_embeddings=False)
    opt.step(lambda: model(ids, torch.ones(2, 3, dtype=torch.float64)))
    assert bool((model.embed.weight.detach() != before).all())


def one_direction_consistency(params: list[torch.Tensor], closure, lr: float = 1e-6, **kwargs) -> None:
    """One fp64 step with one sample on a quadratic objective, where the central difference is exact:
    the projected gradient must equal ∇f·z for the z the update used (z = Δθ / (-lr · proj), zero on
    what was not updated), and every entry with a nonzero gradient must have moved. A use of a tensor
    evaluated with another z than its update, or a tensor never perturbed, breaks the equality."""
    grads = torch.autograd.grad(closure(), params)  # the gradient at θ, before the step
    before = [p.detach().clone() for p in params]
    opt = ZerothOrder(params, lr=lr, eps=1e-3, seed=3, **kwargs)
    opt.step(closure)
    (proj,) = opt.last_projected_grads
    zs = [(p.detach() - b) / (-lr * proj) for p, b in zip(params, before, strict=True)]
    predicted = sum(float((g * z).sum()) for g, z in zip(grads, zs, strict=True))
    assert predicted == pytest.approx(proj, rel=1e-6)
    for g, z in zip(grads, zs, strict=True):
        assert bool((z[g != 0] != 0).all())  # everything the loss depends on was updated


class TiedLM(nn.Module):
    """An embedding whose matrix is also the output layer (GPT-2, OPT, BERT-MLM): as a tied
    ``nn.Linear`` head, or read by the parent's forward (``F.linear(h, embed.weight)``)."""

    def __init__(self, rows: int = 10, dim: int = 4, head: str = "module"):
        super().__init__()
        self.embed = nn.Embedding(rows, dim)
        self.head_kind = head
        if head == "module":
            self.head = nn.Linear(dim, rows, bias=False)
            self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(ids))
        if self.head_kind == "module":
            return self.head(h)
        return nn.functional.linear(h, self.embed.weight)


@pytest.mark.parametrize("head", ["module", "parent-reads-weight"])
def test_tied_embedding_uses_one_z_for_the_lookup_and_the_head(head, chunking):
    torch.manual_seed(0)
    model = TiedLM(head=head).double()
    ids = torch.tensor([1, 3, 3, 6])
    C = torch.randn(4, 10, dtype=torch.float64)

    def closure() -> torch.Tensor:  # quadratic in E through the head, plus the lookup's own term
        h = model.embed(ids)
        logits = model.head(h) if head == "module" else nn.functional.linear(h, model.embed.weight)
        return (logits * C).sum() + 0.5 * (h**2).sum()

    with torch.enable_grad():
        one_direction_consistency(list(model.parameters()), closure)


def test_tied_head_estimate_is_unbiased_against_autograd():
    """The mean of many SPSA estimates through a tied head is the autograd gradient, within
    Monte-Carlo error, on the rows the batch looked up and on the rows only the head reads."""
    torch.manual_seed(0)
    model = TiedLM(rows=8, dim=3).double()
    ids = torch.tensor([[1, 2], [2, 5]])
    labels = torch.tensor([[2, 7], [0, 4]])

    def loss() -> torch.Tensor:
        return nn.functional.cross_entropy(model(ids).reshape(-1, 8), labels.reshape(-1))

    with torch.enable_grad():
        (grad,) = torch.autograd.grad(loss(), [model.embed.weight])
    before = model.embed.weight.detach().clone()
    lr, n = 1e-6, 3000
    opt = ZerothOrder(model.parameters(), lr=lr, eps=1e-4, n_samples=n, seed=1)
    opt.step(loss)
    estimate = (model.embed.weight.detach() - before) / -lr
    # each estimate (g·z) z has E|ĝ - g|² ≈ |g|² (d + 1) with d = 24: relative error of the mean ≈ 0.09
    # (0.10 here; 0.60 when the head and the lookup saw different z, and the head-only rows got 0)
    assert float((estimate - grad).norm() / grad.norm()) < 0.2
    unread = torch.ones(8, dtype=torch.bool)
    unread[ids.reshape(-1)] = False  # rows only the head reads: a true gradient, not zero
    assert float((estimate[unread] - grad[unread]).norm() / grad[unread].norm()) < 0.45  # 0.17 here


def test_lookups_of_other_rows_in_one_step_share_the_steps_direction(chunking):
    """An encoder and a decoder sharing one embedding look up different rows: every lookup sees the
    same z, the rows either read are updated, and no other row moves (sparse path throughout)."""
    torch.manual_seed(0)
    model = Lookup(20, 3).double()
    first, second = torch.tensor([1, 2, 2]), torch.tensor([7, 2, 15])
    c1, c2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)

    def closure() -> torch.Tensor:
        e1 = model.embed(first)
        return (e1 * c1).sum() + 0.5 * (e1**2).sum() + (model.embed(second) * c2).sum()

    before = model.embed.weight.detach().clone()
    with torch.enable_grad():
        one_direction_consistency(list(model.parameters()), closure)
    moved = (model.embed.weight.detach() != before).any(1)
    assert moved.nonzero().reshape(-1).tolist() == [1, 2, 7, 15]


def test_plain_tensor_objective_is_optimised():
    """A torch optimiser must optimise the plain tensors it is given, read in the closure directly."""
    theta = torch.zeros(6, dtype=torch.float64)
    target = torch.linspace(-1, 1, 6, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return ((theta - target) ** 2).sum()

    leaf = theta.clone().requires_grad_()
    with torch.enable_grad():
        one_direction_consistency([leaf], lambda: ((leaf - target) ** 2).sum())
    opt = ZerothOrder([theta], lr=0.05, eps=1e-3, n_samples=4)
    first = float(loss())
    for _ in range(200):
        opt.step(loss)
    assert float(loss()) < 1e-3 * first


class PenaltyParent(nn.Module):
    """A child Linear used in its own forward, read again by the parent's forward, and a loose
    parameter of the parent that no module forward ever reads; the closure adds a penalty."""

    def __init__(self):
        super().__init__()
        self.child = nn.Linear(4, 3)
        self.bare = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.child(x) + x[:, :3] @ self.child.weight[:, :3].T + self.bare


def test_parameters_read_outside_their_module_are_perturbed_and_updated(chunking):
    torch.manual_seed(0)
    model = PenaltyParent().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    C = torch.randn(5, 3, dtype=torch.float64)

    def closure() -> torch.Tensor:
        return (model(x) * C).sum() + 0.3 * (model.child.weight**2).sum() + (model.bare**2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is reported unused
        with torch.enable_grad():
            one_direction_consistency(list(model.parameters()), closure)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reads_outside_modules_are_restored_bit_for_bit(dtype, chunking):
    torch.manual_seed(0)
    model = PenaltyParent().to(dtype)
    tied = TiedLM(head="parent-reads-weight").to(dtype)
    loose = torch.randn(7).to(dtype)
    x = torch.randn(5, 4).to(dtype)
    before = bits(model) + bits(tied) + [loose.clone().view(torch.int16)]

    def closure() -> torch.Tensor:
        out = model(x).float().sum() + (model.child.weight.float() ** 2).sum() + loose.float().sum()
        return out + tied(torch.tensor([1, 2])).float().sum()

    opt = ZerothOrder([*model.parameters(), *tied.parameters(), loose], lr=0.0, eps=1e-2, n_samples=2)
    opt.step(closure)
    assert same_bits(before, bits(model) + bits(tied) + [loose.view(torch.int16)])
    assert all(abs(d) > 0 for d in opt.last_projected_grads)


def test_the_loss_difference_keeps_the_losses_own_precision():
    """fp64 losses with a small eps: the difference is below fp32's resolution of the loss."""
    c = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = torch.zeros(3, dtype=torch.float64)
    lr = 1e-3
    opt = ZerothOrder([w], lr=lr, eps=1e-6, seed=2)
    opt.step(lambda: 1000.0 + (c * w).sum())
    (proj,) = opt.last_projected_grads
    z = w / (-lr * proj)
    assert proj != 0.0
    assert proj == pytest.approx(float(c @ z), rel=1e-6)


def test_tied_lm_head_of_a_transformers_gpt2():
    """GPT-2's lm_head shares the token embedding: one step's slope equals ∇f·z for the z its update
    used (up to the central difference's O(eps²)), and the rows only the head reads move too."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=50, n_positions=16, n_embd=16, n_layer=2, n_head=2, tie_word_embeddings=True
    )
    model = GPT2LMHeadModel(config).double().eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 20, (2, 8))  # rows 20..49 are never looked up; the head reads every row

    def loss() -> torch.Tensor:  # in fp64 (the model's own loss upcasts the logits to fp32)
        logits = model(input_ids=ids).logits[:, :-1]
        return nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))

    params = list(model.parameters())
    with torch.enable_grad():
        grads = torch.autograd.grad(loss(), params)
    before = [p.detach().clone() for p in params]
    lr = 1e-7
    opt = ZerothOrder(params, lr=lr, eps=1e-5, seed=0)
    opt.step(loss)
    (proj,) = opt.last_projected_grads
    zs = [(p.detach() - b) / (-lr * proj) for p, b in zip(params, before, strict=True)]
    predicted = sum(float((g * z).sum()) for g, z in zip(grads, zs, strict=True))
    assert predicted == pytest.approx(proj, rel=1e-4)  # 9e-7 here; 9e-2 with the head's z apart
    assert bool((zs[0] != 0).any(1).all())  # all 50 rows of the tied matrix moved (10 before)
