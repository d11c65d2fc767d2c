"""Each method's own options as a small dataclass, and the catalogue of the harness' methods.

An option is one field (:func:`~gradkit.train.settings.setting`): its default, help text, choices and
range. ``gradkit finetune`` / ``compare`` derive a command-line option from it (the group's title
names the methods that read it, from :data:`CATALOGUE`), :func:`check_options` validates a run's
``cfg.options`` against every group before anything is loaded, and a method reads its options with
:func:`~gradkit.train.settings.settings_from` (``LoraGAOptions`` from ``cfg.options``). config.json keeps
``cfg.options`` as a plain dict of these values.

Torch-free, like :mod:`gradkit.train.config`: ``gradkit --help`` reads this module, and the methods
themselves (:mod:`gradkit.train.methods`) import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from gradkit.errors import GradkitError
from gradkit.train.settings import Range, setting, settings_from

# gradkit.lora.ga's ESTIMATORS and SCALES, gradkit.optim.lora_pro's MOMENTS, DEFAULT_MOMENTS and
# OPTIMIZERS, lora_pro_math's X_SOLUTIONS, gradkit.optim.zeroth_order's DISTRIBUTIONS and zo_estimators'
# ESTIMATORS, written out so that building the command line imports no torch (tests/train/test_cli.py
# checks they stay equal)
ESTIMATORS = ("exact", "sketch")
SCALES = ("stable", "unit", "gd")
MOMENTS = ("full", "projected", "factor")
DEFAULT_MOMENTS = "projected"
OPTIMIZERS = ("adamw", "sgd")
X_SOLUTIONS = ("sylvester", "symmetric", "zero")
ZO_DISTRIBUTIONS = ("gaussian", "rademacher")
ZO_ESTIMATORS = ("spsa", "fzoo", "svrg")
ZO_EXACT = ("none", "head")
# --zo-samples when not given: one direction for MeZO's spsa; FZOO's σ needs several probes
ZO_DEFAULT_SAMPLES = {"spsa": 1, "fzoo": 8, "svrg": 1}
ZO_PARAMS = ("lora", "all", "head")
OBJECTIVES = ("loss", "accuracy", "f1")
CORDA_METHODS = ("ipm", "kpm")

POSITIVE = Range(0, low_open=True)


@dataclass(frozen=True)
class LoraGAOptions:
    """LoRA-GA's initialisation (docs/lora_ga.md)."""

    title: ClassVar[str] = "LoRA-GA"

    ga_batches: int = setting(
        8,
        "training batches whose mean gradient initialises the adapter",
        range=Range(1),
        example="8",
    )
    ga_estimator: str = setting(
        "exact",
        "exact (one fp32 gradient per target weight, default) or sketch (never forms it; "
        "O(r (in + out)) memory per layer)",
        choices=ESTIMATORS,
    )
    ga_sketch_passes: int = setting(
        1,
        "passes of the sketch estimator: 1 (streaming, default) or 2 (linear in the gradient: "
        "under torchrun it equals the one-process sketch exactly)",
        choices=(1, 2),
    )
    ga_scale: str = setting(
        "stable",
        "factor scale: stable (the paper's out^(1/4)/sqrt(gamma), default), unit, or gd "
        "(first SGD step = -lr * G_2r)",
        choices=SCALES,
    )
    ga_gamma: float = setting(16.0, "gamma of the stable scale", range=POSITIVE, example="16")


@dataclass(frozen=True)
class LoraProOptions:
    """LoRA-Pro's optimiser (gradkit.LoRAPro)."""

    title: ClassVar[str] = "LoRA-Pro"

    pro_optimizer: str = setting(
        "adamw", "adamw (default) or sgd (the closed form, no moments)", choices=OPTIMIZERS
    )
    pro_moments: str = setting(
        DEFAULT_MOMENTS,
        "AdamW moments: projected (memory-light, default), factor (memory-light) "
        "or full (the paper's out x in moments)",
        choices=MOMENTS,
    )
    pro_x: str = setting(
        "sylvester",
        "free r x r matrix X: sylvester (the paper's, default), symmetric or zero",
        choices=X_SOLUTIONS,
    )


@dataclass(frozen=True)
class LoraPlusOptions:
    """LoRA+ through PEFT's create_loraplus_optimizer."""

    title: ClassVar[str] = "LoRA+"

    loraplus_ratio: float = setting(
        16.0, "learning rate of lora_B over lora_A's", range=POSITIVE, example="16"
    )


@dataclass(frozen=True)
class PeftLoraGAOptions:
    """PEFT's own LoRA-GA (preprocess_loraga)."""

    title: ClassVar[str] = "PEFT's LoRA-GA"

    peft_ga_batches: int = setting(8, "batches for the gradient estimate", range=Range(1), example="8")


@dataclass(frozen=True)
class PeftInitOptions:
    """PEFT's data-aware LoRA initialisations (gradkit.train.methods.peft_inits)."""

    title: ClassVar[str] = "PEFT's LoRA initialisations"

    peft_init_batches: int = setting(
        8,
        "eva, corda: training batches of the initialisation's data pass (the stream's next ones)",
        range=Range(1),
        example="8",
    )
    eva_rho: float = setting(
        2.0,
        "eva: a layer's rank may grow to rho times --rank by explained variance (1: every layer keeps --rank)",
        range=Range(1),
        example="2.0",
    )
    corda_method: str = setting(
        "ipm",
        "corda: ipm adapts the input covariance's principal components (instruction-previewed), kpm keeps "
        "them frozen and adapts the smallest (knowledge-preserved)",
        choices=CORDA_METHODS,
    )


@dataclass(frozen=True)
class ZerothOrderOptions:
    """MeZO's zeroth-order step and the policy-gradient sampler."""

    title: ClassVar[str] = "zeroth order and policy gradient"

    zo_params: str = setting(
        "lora",
        "what trains: lora (LoRA factors and head, default), all (every weight) or head",
        choices=ZO_PARAMS,
    )
    zo_eps: float = setting(1e-3, "perturbation scale eps", range=POSITIVE, example="1e-3")
    zo_estimator: str = setting(
        "spsa",
        "mezo's gradient estimate: spsa (MeZO: f(θ + eps z) - f(θ - eps z), 2 forwards per direction) or "
        "fzoo (FZOO: f(θ) and N one-sided probes f(θ + eps z), N + 1 forwards, the step divided by the "
        "probes' standard deviation, so a step moves about lr / eps per unit direction: sweep lr near "
        "1e-5 at eps 1e-3) or svrg (MeZO-SVRG: spsa with an anchor estimate over --zo-svrg-batches "
        "batches every --zo-svrg-every steps as control variate, 4 forwards per step in between; keeps "
        "one copy of the trained weights)",
        choices=ZO_ESTIMATORS,
    )
    zo_svrg_every: int = setting(
        10, "svrg: an anchor step every N steps (1: every step is one)", range=Range(1), example="10"
    )
    zo_svrg_batches: int = setting(
        8,
        "svrg: the anchor step at step s averages the loss over the step batches s .. s + N - 1",
        range=Range(1),
        example="8",
    )
    zo_svrg_anchor_lr_scale: float = setting(
        1.0, "svrg: the anchor step's lr over --lr (MeZO-SVRG's eta1 / eta2)", range=POSITIVE, example="1.0"
    )
    zo_samples: int | None = setting(
        None,
        "directions per step (default: 1 for spsa and svrg, 8 for fzoo, which needs at least 2)",
        range=Range(1),
        example="8",
    )
    zo_distribution: str | None = setting(
        None,
        "law of the directions z: gaussian (MeZO) or rademacher (±1, Spall's SPSA; cheaper to draw); "
        "default: the estimator's (gaussian for spsa and svrg, rademacher for fzoo)",
        choices=ZO_DISTRIBUTIONS,
    )
    zo_exact: str = setting(
        "none",
        "head: mezo trains the classification head with its exact gradient (a backward through the head "
        "alone, SGD at --zo-exact-lr) and the rest by zeroth order, in one step; none: all by zeroth order",
        choices=ZO_EXACT,
    )
    zo_exact_lr: float = setting(
        1.0,
        "SGD learning rate of the head under --zo-exact head (a starting point: sweep it; docs/zeroth_order.md)",
        range=POSITIVE,
        example="1.0",
    )
    objective: str = setting(
        "loss",
        "mezo minimises the loss (default), or 1 - accuracy / 1 - macro-F1 of argmax predictions",
        choices=OBJECTIVES,
    )
    pg_temperature: float = setting(
        1.0,
        "policy-gradient: labels are sampled from softmax(logits / T)",
        range=POSITIVE,
        example="1.0",
    )


@dataclass(frozen=True)
class NoiseScaleOptions:
    """The measuring run of gradkit noise-scale (gradkit.train.methods.NoiseScaleProbe)."""

    title: ClassVar[str] = "noise-scale measurement"

    micro_batches: int = setting(
        4,
        "micro-batches per step: the small batch is batch-size/micro-batches",
        range=Range(2),
        example="4",
        why="at least 2: the estimate needs two batch sizes",
    )
    probe_optimizer: str = setting(
        "adam", "optimiser of the measuring run", choices=("adam", "sgd"), flag="--optimizer"
    )
    trainable: str = setting("full", "train every weight or the head only", choices=("full", "head"))
    beta: float = setting(
        0.95, "EMA coefficient of the estimates", range=Range(0, 1, high_open=True), example="0.95"
    )
    branch: str | None = setting(
        None,
        "also measure the critical batch directly: from the run's end, one short run per batch size of "
        "this comma-separated list, each at its lr from the optimiser's law, to a lower held-out loss "
        "(Zhang et al.'s rule); needs a dev set (--dev-fraction or --dev)",
        metavar="B1,B2,...",
    )
    branch_drop: float = setting(
        0.02,
        "--branch: each branch trains until the held-out loss is this share below the run's",
        range=Range(0, 1, low_open=True, high_open=True),
        example="0.02",
    )
    branch_examples: int = setting(
        4096,
        "--branch: the examples a branch may train on; one that has not reached the target by then "
        "counts as past the critical batch",
        range=Range(1),
        example="4096",
    )
    branch_eval_examples: int = setting(
        256,
        "--branch: evaluate the held-out loss every this many examples of a branch (whole steps)",
        range=Range(1),
        example="256",
    )


@dataclass(frozen=True)
class MethodCard:
    """What the command line says about a method: one line, and the option groups it reads."""

    summary: str
    options: tuple[type, ...] = ()


# every method of gradkit.train.methods (tests/train/test_config_options.py checks they agree)
CATALOGUE: dict[str, MethodCard] = {
    "head": MethodCard("linear probe: only the classification head trains"),
    "full": MethodCard("full fine-tuning: every weight, AdamW"),
    "lora": MethodCard("PEFT LoRA on the encoder's attention and feed-forward Linear layers"),
    "lora-ga": MethodCard(
        "LoRA initialised with LoRA-GA: the first step is the best rank-2r step of full fine-tuning",
        (LoraGAOptions,),
    ),
    "lora-ga-pro": MethodCard(
        "LoRA-GA initialisation, then LoRA-Pro's optimiser (both factors non-zero from step one)",
        (LoraGAOptions, LoraProOptions),
    ),
    "lora-pro": MethodCard(
        "LoRA with LoRA-Pro's optimiser: each step the closest low-rank match to full fine-tuning",
        (LoraProOptions,),
    ),
    "lora-rite": MethodCard(
        "LoRA with LoRA-RITE (pytorch-optimizer's LoRARite: each factor preconditioned in the other's "
        "r x r basis, invariant to how B A is split); the head with AdamW; pip install 'gradkit[peers]'"
    ),
    "lora-plus": MethodCard(
        "LoRA with LoRA+ (PEFT): lora_B's learning rate is --loraplus-ratio times lora_A's",
        (LoraPlusOptions,),
    ),
    "peft-lora-ga": MethodCard(
        "PEFT's own LoRA-GA initialisation (preprocess_loraga), for comparison with lora-ga",
        (PeftLoraGAOptions,),
    ),
    "pissa": MethodCard(
        "PEFT's PiSSA: LoRA from each weight's top singular components, the base their residual",
    ),
    "olora": MethodCard("PEFT's OLoRA: LoRA from a QR decomposition of each weight, the base the residual"),
    "eva": MethodCard(
        "PEFT's EVA: A from the SVD of each layer's input activations, ranks redistributed, B = 0",
        (PeftInitOptions,),
    ),
    "corda": MethodCard(
        "PEFT's CorDA: LoRA from the decomposition of W times its input covariance, the base the residual",
        (PeftInitOptions,),
    ),
    "mezo": MethodCard(
        "zeroth-order (MeZO): two forwards per step, no backward, memory of inference",
        (ZerothOrderOptions,),
    ),
    "policy-gradient": MethodCard(
        "REINFORCE: sample labels from softmax(logits/T), reward correctness (optimises accuracy)",
        (ZerothOrderOptions,),
    ),
}

# the methods gradkit compare runs when --methods is not given
COMPARED_BY_DEFAULT = ("head", "lora", "lora-ga", "full")

# every option group a run's cfg.options may hold: the methods' and the noise-scale probe's
OPTION_GROUPS: tuple[type, ...] = (
    LoraGAOptions,
    LoraProOptions,
    LoraPlusOptions,
    PeftLoraGAOptions,
    PeftInitOptions,
    ZerothOrderOptions,
    NoiseScaleOptions,
)


def method_groups() -> list[type]:
    """The option groups of the catalogue's methods, each once, in the catalogue's order."""
    groups: list[type] = []
    for card in CATALOGUE.values():
        groups += [group for group in card.options if group not in groups]
    return groups


def group_title(group: type) -> str:
    """``LoRA-GA (--method lora-ga, lora-ga-pro)``: the group's title and the methods that read it."""
    users = [name for name, card in CATALOGUE.items() if group in card.options]
    return f"{group.title} (--method {', '.join(users)})" if users else group.title


def check_options(options: Mapping[str, Any]) -> None:
    """Every entry of a run's ``cfg.options`` names an option of some group and is within its
    choices and range (options a method does not read are checked too: a bad value is refused
    whichever method runs)."""
    known = {field.name for group in OPTION_GROUPS for field in dataclasses.fields(group)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise GradkitError(
            f"options {', '.join(map(repr, unknown))} belong to no method; the options are: "
            f"{', '.join(sorted(known))}"
        )
    for group in OPTION_GROUPS:
        settings_from(group, options)
