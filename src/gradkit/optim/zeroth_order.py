"""MeZO-style zeroth-order optimiser: two forward passes per step, no backward, memory of inference.

Each step estimates the gradient by simultaneous perturbation (SPSA; Spall 1992) along a random
direction ``z`` and moves along it (MeZO: Malladi et al. 2023, arXiv 2305.17333)::

    d_k   = (f(θ + ε z_k) - f(θ - ε z_k)) / 2          k = 1..n   (n = n_samples)
    θ_g  <- θ_g - lr_g · ( (1/n) Σ_k (d_k / ε_g) z_k,g  +  λ_g θ_g )

With one ``ε`` for every group, ``d_k / ε`` is the usual projected gradient ``(f+ - f-) / 2ε`` and
``E[proj · z] = ∇f + O(ε²)`` for any ``z`` with ``E[z zᵀ] = I``: ``distribution="gaussian"``
(the default, MeZO's ``z ~ N(0, I)``) or ``"rademacher"`` (independent ±1 coordinates, Spall's
original choice; several times cheaper to draw on a CPU, see :mod:`gradkit.optim.zo_directions`). Per-group ``ε_g`` is allowed: dividing by the group's own ``ε_g``
keeps the estimate of each group's gradient unbiased, but another group h adds variance in
proportion to ``(ε_h / ε_g)²``, so keep the groups' ``ε`` within a small factor of each other. Weight decay ``λ`` is decoupled and skipped
for 1-D parameters (biases, normalisation weights) unless the group says ``decay_1d=True``.
The losses are read in their own precision (an fp64 loss stays fp64) and ``d_k`` is taken in fp64,
so a small ``ε`` on a large loss is not rounded to a zero difference.

``estimator="fzoo"`` (FZOO: Dang et al. 2025, arXiv 2506.09034) replaces the two-sided pairs by
``n >= 2`` one-sided probes around one shared base evaluation, ``n + 1`` forwards per step, and
divides the step by the probes' standard deviation ``σ``::

    θ_g  <- θ_g - lr_g · ( (1/n) Σ_k ((f(θ + ε z_k) - f(θ)) / (σ ε_g)) z_k  +  λ_g θ_g )

``estimator="svrg"`` (MeZO-SVRG: Gautam et al. 2024, arXiv 2404.08080) is ``spsa`` with a control
variate: every ``svrg_every`` steps an anchor step (:attr:`ZerothOrder.anchor_due`; the caller's
closure then covers a large batch) stores ``θ̄ = θ`` and its projected gradients ``c̄_j`` along its own
``z̄_j``, and each step in between evaluates its minibatch at ``θ`` and ``θ̄`` along the same ``z_k``::

    θ  <- θ - lr · ( (1/n) Σ_k ((f(θ+εz_k) - f(θ-εz_k) - f(θ̄+εz_k) + f(θ̄-εz_k)) / 2ε) z_k
                     + (1/m) Σ_j (c̄_j / ε) z̄_j )

``θ̄`` is one buffer the size of the zeroth-order parameters, kept in the optimiser's state (it is
saved with ``state_dict`` and counted as optimiser-state bytes); ``z̄_j`` are regenerated from their
seeds like every other direction. Its embeddings are perturbed densely (the anchor's ``z̄`` is added to
every row at every step).

(:mod:`gradkit.optim.zo_estimators` holds the estimators' formulas). Parameter groups marked exact
(``exact_params=``) are trained in the same step with the closure's own autograd gradient instead
(:mod:`gradkit.optim.zo_exact`): a classification head's exact gradient costs a backward through the
head alone, while a zeroth-order estimate of it would add its share of noise to every step.

What gradkit guarantees, beyond the reference MeZO code:

- **Seed trick without the global RNG.** ``z`` is never stored: :mod:`gradkit.optim.zo_directions`
  rebuilds any parameter's slice of it from ``(seed, parameter index)`` with private generators,
  in any order. The global torch RNG is never read or reset.
- **n_samples > 1 without stored gradients.** Only the n scalars ``d_k`` and their seeds are kept;
  the update regenerates each ``z_k`` per parameter. All n directions are evaluated at the same
  ``θ`` (true n-SPSA), unlike updating after each sample.
- **One z per parameter, whatever reads it.** Every evaluation is ``f`` at exactly ``θ + ε z`` and
  the update uses that same ``z``, for every use a parameter has in the closure: inside the forward
  of the module that holds it, in several modules (tied weights), or outside any module (a bare
  tensor in the closure, a penalty term, a parent reading a child's weight). ``ZerothOrder([p])``
  optimises a plain tensor objective like any torch optimiser.
- **Exact restore** (``restore="exact"``, the default): the stored parameters come back bit for bit
  in every dtype (adding then subtracting ``ε z`` in bf16/fp16 would round twice): nothing is written
  into the original storage, each read sees a perturbed copy (:mod:`gradkit.optim.zo_perturb`).
- **Sparse embeddings** (``sparse_embeddings=True``, the default, exact restore only). An
  ``nn.Embedding`` row that nothing reads has gradient exactly 0, and its share of ``proj · z`` is
  pure noise. When every use of an embedding matrix in a step is an ``nn.Embedding`` lookup, only
  the rows looked up are perturbed (in place, their original bits saved and copied back) and
  updated, and neither a matrix-sized copy nor matrix-sized Gaussian draws are made. When anything
  also reads the whole matrix (a tied LM head, as in GPT-2, OPT and BERT's MLM head), the same
  ``z`` is used there and every row is updated. This is decided in each step from what ran (see
  :mod:`gradkit.optim.zo_directions`). Decoupled weight decay shrinks the whole matrix either way.
  Under data parallelism (an initialised process group of more than one process) the ranks look up
  different rows, so embeddings get MeZO's dense ``z`` there and every rank takes the same step.
- **restore="subtract"** is the classic in-place ``+ε z``, ``-2ε z``, ``+ε z`` (arithmetic in fp32,
  stored in the parameter's dtype): exact in fp32 only up to rounding, not exact in bf16/fp16.
- A parameter that no evaluation of a step reads has gradient exactly 0: it is not updated (no
  noise, no decay) and a one-time warning names it.
- **Bad losses.** A non-finite loss skips the step (weights restored, no update), counts it in
  ``skipped_steps``, warns once, and raises :class:`GradkitError` after ``max_bad_steps`` in a row.

Under data parallelism every rank builds the optimiser with the same ``seed``; the closure should
return the loss all-reduced over ranks (a scalar), so every rank computes the same ``d_k`` and takes
the same step without exchanging anything else.

**FSDP2** (``fully_shard``: parameters are row-sharded DTensors). Each rank perturbs and updates its
own shard in place, with its rows of the same ``z`` (:meth:`Directions.range_chunks` draws only the
chunks that overlap them), so the all-gathered weights every forward sees are exactly ``θ ± ε z`` and
the step equals the unsharded one; nothing is gathered by the optimiser. Memory per rank: its shard,
plus (``restore="exact"``) one saved copy of its shard of the optimised parameters, plus at most one
chunk of ``z``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from gradkit.errors import GradkitError
from gradkit.estimators import scalar_value
from gradkit.fsdp import is_dtensor, local
from gradkit.optim.zo_directions import DISTRIBUTIONS, Directions, work_dtype
from gradkit.optim.zo_estimators import (
    DEFAULT_DISTRIBUTION,
    ESTIMATORS,
    MIN_SAMPLES,
    fzoo_differences,
    spsa_differences,
    svrg_differences,
)
from gradkit.optim.zo_exact import ExactGradients, exact_update_
from gradkit.optim.zo_perturb import (
    Entry,
    FreshGather,
    Perturbed,
    data_parallel,
    perturb_shards,
    restore_shards,
    shard_pieces,
    shift_,
)

__all__ = ["ZerothOrder", "RESTORE_MODES", "DISTRIBUTIONS", "ESTIMATORS"]

RESTORE_MODES = ("exact", "subtract")


class ZerothOrder(torch.optim.Optimizer):
    """Zeroth-order SGD (two-sided SPSA, MeZO's seed trick; arXiv 2305.17333). See the module docstring.

    ``step(closure)`` calls ``closure()`` ``2 * n_samples`` times (``estimator="spsa"``) or
    ``n_samples + 1`` times (``"fzoo"``) under ``torch.no_grad()``; it must return the scalar loss of
    the current parameters (a 0-dim tensor or a number) and must not call ``backward``. It returns an
    estimate of the loss at ``θ`` as a 0-dim fp32 tensor (``spsa``: the mean of the evaluations;
    ``fzoo``: its base evaluation ``f(θ)``), also kept in ``last_loss``; ``last_projected_grads`` holds
    the step's projected gradients (``(f+ - f-) / 2ε``, or ``(f_k - f_0) / ε``) and ``last_sigma``
    FZOO's ``σ``.

    Args:
        params: tensors or param groups (any set: a whole model, LoRA factors, a head, plain tensors).
        lr: step size (SGD scale; MeZO uses 1e-6 to 1e-7 for full fine-tuning).
        eps: perturbation scale ε (> 0).
        n_samples: directions per step; their estimates are averaged.
        weight_decay: decoupled weight decay λ (not applied to 1-D parameters unless ``decay_1d``).
        restore: ``"exact"`` (bit-identical, hook-based) or ``"subtract"`` (classic add/subtract).
        seed: seed of the private generator; use the same on every rank under data parallelism.
        decay_1d: also decay 1-D parameters (biases, norms).
        max_bad_steps: consecutive non-finite steps tolerated before raising.
        sparse_embeddings: perturb and update only the embedding rows the step looks up when
            nothing else reads the matrix (exact restore only; see the module docstring).
        distribution: ``"gaussian"`` (z ~ N(0, I), MeZO) or ``"rademacher"`` (z ∈ {−1, +1}ⁿ uniformly,
            Spall 1992); both give an unbiased estimate of the same smoothed gradient. Default: the
            estimator's own (gaussian for ``spsa``, rademacher for ``fzoo``).
        estimator: ``"spsa"`` (two-sided, MeZO) or ``"fzoo"`` (``n_samples >= 2`` one-sided probes
            around one shared ``f(θ)``, the step divided by the probes' standard deviation; FZOO,
            arXiv 2506.09034) or ``"svrg"`` (``spsa`` with MeZO-SVRG's anchor control variate, arXiv
            2404.08080; restore="exact" only); the formulas are in :mod:`gradkit.optim.zo_estimators`.
        exact_params: tensors or param groups trained with the closure's exact autograd gradient
            instead (SGD, ``p <- p (1 - lr λ) - lr ∇p``; a head, say), each group with its own ``lr``;
            the closure's loss must then keep its graph to them. See :mod:`gradkit.optim.zo_exact`.
        svrg_every: ``svrg``: an anchor step every this many steps (``q``; 1: every step is one).
        anchor_lr_scale: ``svrg``: the anchor step's lr over ``lr`` (MeZO-SVRG's ``η1 / η2``).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        n_samples: int = 1,
        weight_decay: float = 0.0,
        restore: str = "exact",
        seed: int = 0,
        *,
        decay_1d: bool = False,
        max_bad_steps: int = 5,
        sparse_embeddings: bool = True,
        distribution: str | None = None,
        estimator: str = "spsa",
        exact_params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None = None,
        svrg_every: int = 10,
        anchor_lr_scale: float = 1.0,
    ):
        params = list(params)
        if not params or all(isinstance(g, dict) and not list(g.get("params", [])) for g in params):
            raise GradkitError(
                "ZerothOrder got an empty parameter list; pass the parameters to train "
                "(e.g. [p for p in model.parameters() if p.requires_grad])"
            )
        if estimator not in ESTIMATORS:
            raise GradkitError(f"unknown estimator {estimator!r}; choose one of: {', '.join(ESTIMATORS)}")
        distribution = DEFAULT_DISTRIBUTION[estimator] if distribution is None else distribution
        if restore not in RESTORE_MODES:
            raise GradkitError(f"unknown restore {restore!r}; choose one of: {', '.join(RESTORE_MODES)}")
        if distribution not in DISTRIBUTIONS:
            raise GradkitError(
                f"unknown distribution {distribution!r}; choose one of: {', '.join(DISTRIBUTIONS)}"
            )
        least = MIN_SAMPLES[estimator]
        if not isinstance(n_samples, int) or n_samples < least:
            raise GradkitError(
                f"n_samples must be an integer >= {least} for estimator {estimator!r}, got {n_samples!r}; "
                f"pass e.g. {least}"
            )
        if max_bad_steps < 1:
            raise GradkitError(f"max_bad_steps must be >= 1, got {max_bad_steps}")
        _check_svrg(estimator, restore, svrg_every, anchor_lr_scale)
        defaults = dict(lr=lr, eps=eps, weight_decay=weight_decay, decay_1d=decay_1d, exact=False)
        super().__init__(params, defaults)
        for group in _as_groups(exact_params):
            self.add_param_group({**group, "exact": True})
        self.estimator = estimator
        self.n_samples = n_samples
        self.restore = restore
        self.sparse_embeddings = bool(sparse_embeddings) and restore == "exact"
        self._directions = Directions(distribution)
        self._sparse_now = False
        self.max_bad_steps = max_bad_steps
        self.steps = 0  # steps that updated the parameters
        self.skipped_steps = 0  # steps skipped for a non-finite loss, in total
        self.bad_steps_in_row = 0
        self.last_loss: torch.Tensor | None = None
        self.last_projected_grads: list[float] = []
        self.last_sigma: float | None = None
        self._sharded: list[Entry] = []
        self._saved: list[torch.Tensor] | None = None  # FSDP2: saved shards (exact) or [] (subtract)
        self._at = 0.0  # restore="subtract": the stored parameters are at θ + _at·ε z
        self._generator = torch.Generator().manual_seed(int(seed))
        self.svrg_every, self.anchor_lr_scale = int(svrg_every), float(anchor_lr_scale)
        self._anchor: list[tuple[int, float]] = []  # svrg: the anchor's (seed, c̄_j), θ̄ in self.state
        self._since_anchor = 0  # svrg: steps taken since the anchor step
        self._base: list[torch.Tensor] | None = None  # FSDP2 svrg: the shards evaluations start from
        self._warned_bad = False
        self._warned_unused = False

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if not (math.isfinite(group["eps"]) and group["eps"] > 0):
            raise GradkitError(f"eps must be > 0, got {group['eps']}; pass e.g. eps=1e-3")
        for name in ("lr", "weight_decay"):  # NaN fails every comparison: it must not pass for >= 0
            if not (math.isfinite(group[name]) and group[name] >= 0):
                raise GradkitError(
                    f"{name} must be finite and >= 0, got {group[name]}; pass e.g. {name}=1e-4"
                )
        for p in group["params"]:
            if not p.is_floating_point():
                raise GradkitError(
                    f"ZerothOrder got a {p.dtype} parameter; it optimises floating-point tensors only"
                )
            if group["exact"] and is_dtensor(p):
                raise GradkitError(
                    "exact_params are not supported on FSDP2-sharded parameters; train them by zeroth "
                    "order too, or leave them unsharded"
                )
        if all(g["exact"] for g in self.param_groups):
            raise GradkitError(
                "every parameter of ZerothOrder is exact, so nothing is left for the zeroth-order estimate; "
                "pass the zeroth-order parameters as params (or use torch.optim.SGD)"
            )

    def _entries(self) -> list[Entry]:
        """The zeroth-order parameters with their group and index (exact groups are left out and do not
        shift the indices the directions are drawn from)."""
        entries, index = [], 0
        for group in self.param_groups:
            if group["exact"]:
                continue
            for p in group["params"]:
                entries.append((group, p, index))
                index += 1
        return entries

    def _exact_gradients(self, entries: list[Entry]) -> ExactGradients | None:
        exact = [p for g in self.param_groups if g["exact"] for p in g["params"]]
        return ExactGradients(exact, [p for _, p, _ in entries]) if exact else None

    # -- the step ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """Take one zeroth-order step; ``closure()`` returns the scalar loss (see the class doc).

        Evaluate the loss around ``θ`` (:meth:`_spsa` or :meth:`_fzoo`), restoring ``θ`` after each
        evaluation; then update along every ``z_k`` (:meth:`_update`) and the exact groups by their
        gradient (:meth:`_update_exact`)."""
        if closure is None:
            raise GradkitError(
                "ZerothOrder.step needs a closure returning the loss: opt.step(lambda: loss_fn())"
            )
        entries = self._entries()
        seeds, seen = self._begin_step(entries)
        exact = self._exact_gradients(entries)
        estimate = {"spsa": self._spsa, "fzoo": self._fzoo, "svrg": self._svrg}[self.estimator]
        try:
            with exact.zeroth_frozen() if exact else contextlib.nullcontext():
                values, diffs = estimate(closure, entries, seeds, seen, exact)
            if diffs is None:
                return self._skip(values)
            self.bad_steps_in_row = 0
            lr_scale = 1.0
            if self.estimator == "svrg":
                seeds, diffs, lr_scale = self._svrg_terms(entries, seeds, diffs)
            self._update(entries, seeds, diffs, seen, lr_scale)
            if exact is not None:
                self._update_exact(exact)
        finally:
            self._saved = None
        self.steps += 1
        at_theta = values[0] if self.estimator == "fzoo" else sum(values) / len(values)
        self.last_loss = torch.tensor(at_theta, dtype=torch.float32)
        return self.last_loss

    def _spsa(
        self, closure: Callable[[], Any], entries: list[Entry], seeds: list[int], seen: set[int], exact
    ) -> tuple[list[float], list[float] | None]:
        """Every evaluation's loss and ``d_k = (f+ − f−) / 2`` (None after a non-finite loss)."""
        values: list[float] = []
        for k, seed in enumerate(seeds):
            losses = self._two_sided(closure, entries, seed, seen, k == 0, exact)
            values.extend(losses)
            if not all(math.isfinite(v) for v in losses):
                return values, None
        diffs = spsa_differences(values[0::2], values[1::2])  # fp64: the losses' own precision
        eps0 = entries[0][0]["eps"]
        self.last_projected_grads = [d / eps0 for d in diffs]
        return values, diffs

    @property
    def anchor_due(self) -> bool:
        """``svrg``: the next step is an anchor step (its closure should cover the large batch)."""
        return self.estimator == "svrg" and (not self._anchor or self._since_anchor >= self.svrg_every - 1)

    def _svrg(
        self, closure: Callable[[], Any], entries: list[Entry], seeds: list[int], seen: set[int], exact
    ) -> tuple[list[float], list[float] | None]:
        """An anchor step's ``spsa`` evaluations, or a step's losses at ``θ`` and MeZO-SVRG's
        ``d_k`` (the minibatch's difference at ``θ`` less the one at ``θ̄``; None after a non-finite loss)."""
        if self.anchor_due:
            return self._spsa(closure, entries, seeds, seen, exact)
        here: list[float] = []
        there: list[float] = []
        for k, seed in enumerate(seeds):
            losses = self._two_sided(closure, entries, seed, seen, k == 0, exact)
            here.extend(losses)
            if not all(math.isfinite(v) for v in losses):
                return here, None
            with self._at_anchor(entries):  # the exact parameters get no gradient at θ̄
                losses = self._two_sided(closure, entries, seed, seen, False)
            there.extend(losses)
            if not all(math.isfinite(v) for v in losses):
                return here + there, None
        diffs = svrg_differences(here[0::2], here[1::2], there[0::2], there[1::2])
        eps0 = entries[0][0]["eps"]
        self.last_projected_grads = [d / eps0 for d in diffs]
        return here, diffs

    @contextlib.contextmanager
    def _at_anchor(self, entries: list[Entry]):
        """Every zeroth-order parameter reads as the anchor ``θ̄`` (plain tensors: their ``.data`` is the
        anchor buffer; FSDP2 shards: evaluations perturb from the anchor's shard)."""
        plain = [p for _, p, _ in entries if not is_dtensor(p)]
        originals = [p.data for p in plain]
        for p in plain:
            p.data = self.state[p]["svrg_anchor"]
        self._base = [local(self.state[p]["svrg_anchor"]) for _, p, _ in self._sharded]
        try:
            yield
        finally:
            for p, original in zip(plain, originals, strict=True):
                p.data = original
            self._base = None

    def _svrg_terms(
        self, entries: list[Entry], seeds: list[int], diffs: list[float]
    ) -> tuple[list[int], list[float], float]:
        """The directions, ``d`` and lr scale the update takes. An anchor step first stores ``θ̄ = θ``
        and its ``(seed, c̄_j)``; a step in between adds the anchor's directions, each set weighted so
        the update's ``1 / (n + m)`` makes ``1/n`` of the fresh and ``1/m`` of the anchor's."""
        if self.anchor_due:
            for _, p, _ in entries:
                state = self.state[p]
                if "svrg_anchor" in state:
                    state["svrg_anchor"].copy_(p.data)
                else:
                    state["svrg_anchor"] = p.data.detach().clone()
            self._anchor = list(zip(seeds, diffs, strict=True))
            self._since_anchor = 0
            return seeds, diffs, self.anchor_lr_scale
        n, m = len(seeds), len(self._anchor)
        self._since_anchor += 1
        all_seeds = seeds + [seed for seed, _ in self._anchor]
        all_diffs = [d * (n + m) / n for d in diffs] + [c * (n + m) / m for _, c in self._anchor]
        return all_seeds, all_diffs, 1.0

    def _fzoo(
        self, closure: Callable[[], Any], entries: list[Entry], seeds: list[int], seen: set[int], exact
    ) -> tuple[list[float], list[float] | None]:
        """``[f(θ), f(θ + ε z_1), ..]`` and FZOO's ``d_k = (f_k − f_0) / σ`` (None after a non-finite loss)."""
        fresh = FreshGather() if self._saved is not None else contextlib.nullcontext()
        with fresh:  # the base evaluation reads θ itself (its exact gradient is the one taken)
            base = scalar_value(exact.evaluate(closure, 1.0) if exact else closure(), "the closure")
        values = [base]
        for k, seed in enumerate(seeds):
            if not math.isfinite(values[-1]):
                return values, None
            try:
                self._move(entries, seed, 1.0)
                values.append(self._evaluate(closure, entries, seed, 1.0, seen))
                if k == 0 and self.restore == "exact" and math.isfinite(values[-1]):
                    self._check_seen(entries, seen)
            finally:
                self._move(entries, seed, 0.0)
        if not math.isfinite(values[-1]):
            return values, None
        diffs, self.last_sigma = fzoo_differences(base, values[1:])
        eps0 = entries[0][0]["eps"]
        self.last_projected_grads = [(f - base) / eps0 for f in values[1:]]
        return values, diffs

    def _begin_step(self, entries: list[Entry]) -> tuple[list[int], set[int]]:
        """The step's seeds (one per direction) and the set of indices read so far."""
        self._directions.new_step()
        # under data parallelism each rank looks up other rows, and every rank must take the same step:
        # dense z there (as MeZO), so the ranks need to exchange nothing but the losses
        self._sparse_now = self.sparse_embeddings and not data_parallel()
        seeds = [int(torch.randint(0, 2**62, (1,), generator=self._generator)) for _ in range(self.n_samples)]
        # FSDP2: sharded parameters are perturbed in place on every rank (FSDP gathers them whole for
        # every forward, so they count as read); exact restore copies their saved bits back
        self._sharded = [e for e in entries if is_dtensor(e[1])]
        if self.estimator == "svrg":  # the anchor's z̄ is added to every row at every step
            self._sparse_now = False
        if self._sharded:
            self._saved = (
                [local(p.data).clone() for _, p, _ in self._sharded] if self.restore == "exact" else []
            )
        self._at = 0.0
        return seeds, {index for _, _, index in self._sharded}

    def _two_sided(
        self,
        closure: Callable[[], Any],
        entries: list[Entry],
        seed: int,
        seen: set[int],
        first: bool,
        exact: ExactGradients | None = None,
    ) -> list[float]:
        """``[f(θ + ε z), f(θ − ε z)]`` along the direction of ``seed`` (only the first when it is not
        finite), with ``θ`` restored afterwards, also when the closure raises. With exact parameters,
        each evaluation adds ``1/(2n)`` of their gradient there (:class:`ExactGradients`)."""
        weight = 1.0 / (2 * self.n_samples)
        try:
            self._move(entries, seed, 1.0)
            losses = [self._evaluate(closure, entries, seed, 1.0, seen, exact, weight)]
            if not math.isfinite(losses[0]):
                return losses
            if first and self.restore == "exact":
                self._check_seen(entries, seen)
            self._move(entries, seed, -1.0)
            losses.append(self._evaluate(closure, entries, seed, -1.0, seen, exact, weight))
            return losses
        finally:
            self._move(entries, seed, 0.0)

    def _move(self, entries: list[Entry], seed: int, to: float) -> None:
        """restore="subtract": shift the stored parameters in place to ``θ + to·ε z`` (``to = 0``: back
        to ``θ``), from where they are: +1, then −2, then +1, as MeZO. restore="exact" writes nothing
        here: each evaluation reads ``θ + sign ε z`` through :class:`Perturbed`."""
        if self.restore == "subtract" and to != self._at:
            shift_(self._directions, entries, seed, to - self._at)
        self._at = to

    def _evaluate(
        self,
        closure: Callable[[], Any],
        entries: list[Entry],
        seed: int,
        sign: float,
        seen: set[int],
        exact: ExactGradients | None = None,
        weight: float = 0.0,
    ) -> float:
        """One call of the closure with every optimised tensor read as ``θ + sign ε z`` (and, with
        ``exact``, ``weight`` times the exact parameters' gradient there accumulated)."""
        fresh = FreshGather() if self._saved is not None else contextlib.nullcontext()
        if exact is not None:
            closure = functools.partial(exact.evaluate, closure, weight)
        if self.restore == "subtract":
            with fresh:
                value = closure()
        else:
            plain = [e for e in entries if not is_dtensor(e[1])]
            base = self._base if self._base is not None else (self._saved or [])
            perturb_shards(self._directions, self._sharded, base, seed, sign)
            try:
                with Perturbed(self._directions, plain, seed, sign, seen, self._sparse_now), fresh:
                    value = closure()
            finally:
                restore_shards(self._sharded, self._saved or [])
        return scalar_value(value, "the closure")

    def _check_seen(self, entries, seen: set[int]) -> None:
        missing = [(index, tuple(p.shape)) for _, p, index in entries if index not in seen]
        if missing and not self._warned_unused:
            self._warned_unused = True
            shown = ", ".join(f"#{i} {list(s)}" for i, s in missing[:5])
            warnings.warn(
                f"ZerothOrder: {len(missing)} tensor(s) ({shown}) were not read by the closure, so they "
                "were not perturbed and are not updated (their gradient is 0); drop them from the optimiser",
                stacklevel=5,
            )

    def _update(
        self,
        entries: list[Entry],
        seeds: list[int],
        diffs: list[float],
        seen: set[int],
        lr_scale: float = 1.0,
    ) -> None:
        """``θ_g <- θ_g − lr_g ((1/n) Σ_k (d_k / ε_g) z_k + λ_g θ_g)``, regenerating each ``z_k``
        (``lr_g`` times ``lr_scale``: ``svrg``'s anchor steps)."""
        n = len(seeds)
        for group, p, index in entries:
            lr = group["lr"] * lr_scale
            if lr == 0 or (self.restore == "exact" and index not in seen):
                continue
            decay = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
            coefs = [-lr * d / (group["eps"] * n) for d in diffs]
            if decay == 0 and not any(coefs):
                continue
            shrink = 1.0 - lr * decay if decay else None
            if is_dtensor(p):  # FSDP2: this rank's rows of every z_k, chunk by chunk
                chunked = [shard_pieces(self._directions, p, index, seed) for seed in seeds]
                pieces = ((chunk[0][0], [z for _, z in chunk]) for chunk in zip(*chunked, strict=True))
                _add_directions(pieces, coefs, shrink)
                continue
            rows = self._directions.sparse_rows(index)
            if rows is not None:  # only lookups read it: decay everywhere, noise on the rows read
                self._update_rows(p, index, rows, seeds, coefs, shrink)
                continue
            # chunk by chunk: the c-th chunk of every z_k, so nothing larger than a chunk is allocated
            # (bf16/fp16: plus one fp32 copy of the chunk)
            chunked = [self._directions.chunks(p.data, seed, index) for seed in seeds]
            pieces = ((chunk[0][1], [z for _, _, z in chunk]) for chunk in zip(*chunked, strict=True))
            _add_directions(pieces, coefs, shrink)

    def _update_exact(self, exact: ExactGradients) -> None:
        """``p <- p (1 − lr λ) − lr ∇p`` for every parameter of the exact groups (decay as for the rest)."""
        grads = iter(exact.gradients())
        for group in self.param_groups:
            if not group["exact"]:
                continue
            for p in group["params"]:
                decay = group["weight_decay"] if (p.ndim >= 2 or group["decay_1d"]) else 0.0
                exact_update_(p, next(grads), group["lr"], decay)

    def _update_rows(
        self,
        p: torch.Tensor,
        index: int,
        rows: torch.Tensor,
        seeds: list[int],
        coefs: list[float],
        shrink: float | None,
    ) -> None:
        """Sparse embedding: decay the whole matrix, add the directions on the rows looked up only."""
        if shrink is not None:  # in place: no parameter-sized copy (bf16/fp16 round the product once)
            p.data.mul_(shrink)
        work = p.data[rows].to(work_dtype(p.dtype))
        for seed, coef in zip(seeds, coefs, strict=True):
            if coef:
                work.add_(self._directions.on_rows(p.data, seed, index, rows), alpha=coef)
        p.data[rows] = work.to(p.dtype)

    def _skip(self, values: list[float]) -> torch.Tensor:
        self.skipped_steps += 1
        self.bad_steps_in_row += 1
        self.last_projected_grads = []
        self.last_loss = torch.tensor(sum(values) / len(values), dtype=torch.float32)
        if self.bad_steps_in_row >= self.max_bad_steps:
            raise GradkitError(
                f"the loss was not finite in {self.bad_steps_in_row} steps in a row (last {values[-1]}); "
                "lower lr or eps, or check the closure's inputs"
            )
        if not self._warned_bad:
            self._warned_bad = True
            warnings.warn(
                f"ZerothOrder: non-finite loss {values[-1]}; step skipped (weights unchanged). Further skips "
                f"are counted in .skipped_steps; {self.max_bad_steps} in a row raise an error",
                stacklevel=4,
            )
        return self.last_loss

    # -- resume -----------------------------------------------------------------------------
    @property
    def distribution(self) -> str:
        """``"gaussian"`` or ``"rademacher"``: the law of each direction ``z``."""
        return self._directions.distribution

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["zeroth_order"] = {
            "generator": self._generator.get_state(),
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "bad_steps_in_row": self.bad_steps_in_row,
            "n_samples": self.n_samples,
            "restore": self.restore,
            "sparse_embeddings": self.sparse_embeddings,
            "distribution": self._directions.distribution,
            "estimator": self.estimator,
            "svrg": {
                "anchor": list(self._anchor),
                "since_anchor": self._since_anchor,
                "every": self.svrg_every,
                "anchor_lr_scale": self.anchor_lr_scale,
            },
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("zeroth_order", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self._generator.set_state(extra["generator"])
            self.steps = int(extra["steps"])
            self.skipped_steps = int(extra["skipped_steps"])
            self.bad_steps_in_row = int(extra["bad_steps_in_row"])
            self.n_samples = int(extra["n_samples"])
            self.restore = extra["restore"]
            self.sparse_embeddings = bool(extra.get("sparse_embeddings", False))
            if "distribution" in extra:  # a state without it drew Gaussians
                self._directions.distribution = extra["distribution"]
            self.estimator = extra.get("estimator", "spsa")  # a state without it was MeZO's
            svrg = extra.get("svrg", {})
            self._anchor = [(int(seed), float(c)) for seed, c in svrg.get("anchor", [])]
            self._since_anchor = int(svrg.get("since_anchor", 0))
            self.svrg_every = int(svrg.get("every", self.svrg_every))
            self.anchor_lr_scale = float(svrg.get("anchor_lr_scale", self.anchor_lr_scale))


def _check_svrg(estimator: str, restore: str, every: int, anchor_lr_scale: float) -> None:
    """``svrg``'s own arguments (checked for every estimator: a bad value is a bug wherever it is)."""
    if not isinstance(every, int) or every < 1:
        raise GradkitError(f"svrg_every must be an integer >= 1, got {every!r}; pass e.g. svrg_every=10")
    if not (math.isfinite(anchor_lr_scale) and anchor_lr_scale > 0):
        raise GradkitError(f"anchor_lr_scale must be finite and > 0, got {anchor_lr_scale}; pass e.g. 1.0")
    if estimator == "svrg" and restore != "exact":
        raise GradkitError(
            "estimator 'svrg' evaluates at its stored anchor through exact restore; use restore='exact'"
        )


def _as_groups(params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Param groups from tensors (one group) or group dicts, as torch.optim reads ``params``."""
    items = list(params or [])
    if items and not isinstance(items[0], dict):
        return [{"params": items}]
    return [dict(g) for g in items]


def _add_directions(
    pieces: Iterable[tuple[torch.Tensor, list[torch.Tensor]]], coefs: list[float], shrink: float | None
) -> None:
    """For each ``(part, [z_1 .. z_n] there)``: ``part <- shrink·part + Σ_k coef_k z_k``, in at least fp32
    (a bf16/fp16 part is computed in an fp32 copy and written back once)."""
    for part, zs in pieces:
        wd = work_dtype(part.dtype)
        work = part if part.dtype == wd else part.to(wd)
        if shrink is not None:
            work.mul_(shrink)
        for z, coef in zip(zs, coefs, strict=True):
            if coef:
                work.add_(z, alpha=coef)
        if work is not part:
            part.copy_(work)
