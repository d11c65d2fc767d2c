"""Every setting of a run checked before anything is written: one place, one line per problem.

:func:`check_config` covers what the settings alone decide (ranges of numbers, the run folder);
:func:`check_model` what needs the loaded model and tokenizer (the position limit, the padding token);
:func:`check_lora_rank` the LoRA rank against the layers it adapts. Each raises
:class:`~gradkit.errors.GradkitError` naming the option, the value, the allowed range and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.train.bi_encoder import PairSetup, pair_setup
from gradkit.train.config import OPTIMIZER_METHODS, TrainConfig
from gradkit.train.method_options import ZerothOrderOptions, check_options
from gradkit.train.metrics import check_metric
from gradkit.train.model import adaptable_layers, default_model_path, label_texts, layer_shape
from gradkit.train.settings import check_settings, settings_from

# a warning (not an error) when LoRA would train more than this share of the model's parameters
LORA_SHARE_WARNING = 0.25
# --steps as TrainConfig declares it: --examples may set the budget only where --steps was left alone
DEFAULT_STEPS = next(f.default for f in dataclasses.fields(TrainConfig) if f.name == "steps")


def check_config(cfg: TrainConfig, *, resume: bool = False) -> None:
    """The settings' own choices and ranges (declared with each field of TrainConfig and of the
    methods' options dataclasses), how they combine, and the run folder (an existing one when
    ``resume``); nothing is loaded and nothing is written."""
    check_settings(cfg)  # every field's choices and range (gradkit.train.config)
    check_options(cfg.options)  # every method option's (gradkit.train.method_options)
    if cfg.dev is not None and cfg.dev_fraction is not None:
        raise GradkitError("--dev and --dev-fraction both name a dev set; pass one of them")
    if cfg.eval_every and cfg.dev is None and cfg.dev_fraction is None:
        raise GradkitError(
            f"--eval-every {cfg.eval_every} needs a dev set (never the test set): pass --dev FILE or "
            "--dev-fraction 0.1 (carved from the training file)"
        )
    if cfg.keep_best and not cfg.eval_every:
        raise GradkitError("--keep-best picks the best of the dev evaluations: pass --eval-every N with it")
    check_task(cfg)
    check_zeroth_order(cfg)
    check_optimizer(cfg)
    check_batch_schedule(cfg)
    check_precision(cfg)
    check_fsdp(cfg)
    if cfg.report_to == "tensorboard" and not (
        importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
    ):
        raise GradkitError(
            "--report-to tensorboard needs the tensorboard package: pip install tensorboard "
            "(or pip install 'gradkit[tensorboard]')"
        )
    if cfg.targets != "all-linear" and not [t for t in cfg.targets.split(",") if t.strip()]:
        raise GradkitError(
            f"--targets {cfg.targets!r} names no layer; pass comma-separated Linear names (e.g. query,value) "
            "or all-linear"
        )
    if cfg.model is not None and not Path(cfg.model, "config.json").is_file():
        raise GradkitError(
            f"--model {cfg.model} is not a model folder (no config.json there); pass a local Hugging Face "
            "model folder, one that AutoModel.from_pretrained loads"
        )
    if cfg.out is not None and not resume:
        if not str(cfg.out).strip():
            raise GradkitError("--out is empty; pass a folder path for the run")
        # only the main process judges whether the folder is empty: it writes the folder, and another
        # process that reaches this check later would find the main one's first files there
        main = int(os.environ.get("RANK", "0")) == 0
        check_out(Path(cfg.out), cfg.overwrite, inputs=run_inputs(cfg), empty=main)


def check_task(cfg: TrainConfig) -> None:
    """The task, its metric, the head's initialisation and the head warm-up agree with each other."""
    check_metric(cfg.task, cfg.metric)
    if cfg.head_init == "labels" and cfg.task == "regression":
        raise GradkitError(
            "--head-init labels builds one class vector per label text, and --task regression has no "
            "classes; use --head-init random (or --head-warmup N to start from a trained head)"
        )
    if cfg.head_init != "labels":
        for option, value in (("label-text", cfg.label_text), ("label-template", cfg.label_template)):
            if value is not None:
                raise GradkitError(f"--{option} shapes the label-text head: pass --head-init labels with it")
    if cfg.label_template is not None and "{}" not in cfg.label_template:
        raise GradkitError(
            f"--label-template {cfg.label_template!r} has no {{}} for the label text; pass e.g. "
            "--label-template 'It was {}.'"
        )
    if cfg.task == "causal-lm":
        check_causal_lm(cfg)
    elif cfg.text_field is not None:
        raise GradkitError(
            f"--text-field {cfg.text_field} names the text of a causal-LM data file: pass --task causal-lm "
            "with it (classification reads --text-col)"
        )
    if cfg.head_lr is not None and not cfg.head_warmup:
        raise GradkitError("--head-lr is the head warm-up's learning rate: pass --head-warmup N with it")
    check_pair_settings(cfg)


def check_pair_settings(cfg: TrainConfig) -> None:
    """The bi-encoder's options agree with the task (what the settings alone decide; the data and the
    model folder are checked by :func:`check_pairs`)."""
    if cfg.pair_loss is not None and cfg.task != "regression":
        raise GradkitError(
            f"--pair-loss {cfg.pair_loss} scores a similarity (regression); --task {cfg.task} trains "
            "with cross-entropy: drop --pair-loss, or pass --task regression"
        )
    if cfg.head_init == "similarity" and cfg.task != "classification":
        raise GradkitError(
            f"--head-init similarity thresholds cos(u, v) into two classes, and --task {cfg.task} has "
            "no classes; drop it (bi-encoder regression already starts from cos(u, v))"
        )
    if cfg.head_warmup and cfg.pair_loss == "cosent":
        raise GradkitError(
            "--head-warmup with --pair-loss cosent: CoSENT ranks the cosines, which the regression "
            "head's scale and offset do not change, so the warm-up has nothing to train; drop --head-warmup"
        )
    if cfg.task == "causal-lm" and cfg.pair_encoding is not None:
        raise GradkitError("--pair-encoding is for sentence pairs; --task causal-lm has none: drop it")


def check_pairs(cfg: TrainConfig, train: Any) -> PairSetup | None:
    """How the run encodes sentence pairs (:func:`gradkit.train.bi_encoder.pair_setup`), with the
    options that need a bi-encoder refused under a cross-encoder and the similarity head's two
    classes checked. None when the data have no pairs (and no pair option is set)."""
    setup = pair_setup(
        cfg.model or default_model_path(), cfg.pair_encoding, cfg.task, cfg.pair_loss, train, cfg.pooling
    )
    bi_only = {
        "--pair-loss": cfg.pair_loss is not None,
        "--pair-features": cfg.pair_features != "diff",
        "--head-init similarity": cfg.head_init == "similarity",
    }
    named = [option for option, set_ in bi_only.items() if set_]
    if named and (setup is None or setup.encoding != "bi"):
        why = "the data have no second text" if setup is None else setup.reason
        raise GradkitError(
            f"{named[0]} shapes a bi-encoder's pair model, and this run is not one ({why}); pass "
            "--pair-encoding bi with a --text-pair-col, or drop it"
        )
    if setup is None or setup.encoding != "bi":
        return setup
    if cfg.head_init == "labels":
        raise GradkitError(
            "--head-init labels compares one text with label texts, and a bi-encoder compares a pair's "
            "two texts; use --head-init similarity (two classes) or random, or --pair-encoding cross"
        )
    if cfg.head_init == "similarity" and train.num_outputs != 2:
        raise GradkitError(
            f"--head-init similarity thresholds cos(u, v) into two classes, and the training file has "
            f"{train.num_outputs}; use --head-init random (a head on [u, v, |u - v|])"
        )
    return setup


# methods that need a classification head (or sampled class labels) and so have no causal-LM form
HEAD_METHODS = ("head", "policy-gradient")


def check_causal_lm(cfg: TrainConfig) -> None:
    """``--task causal-lm``: a model folder and data files are given, and no option of the classifier
    (its head, its columns, a metric objective) is set."""
    if cfg.method in HEAD_METHODS:
        raise GradkitError(
            f"--method {cfg.method} trains a classification head, and a causal LM has none (it predicts "
            "its own vocabulary); use lora, lora-ga, lora-pro, full or mezo"
        )
    if cfg.head_init != "random":
        raise GradkitError(
            f"--head-init {cfg.head_init} builds a classification head, and --task causal-lm has none; drop it"
        )
    if cfg.head_warmup:
        raise GradkitError(
            f"--head-warmup {cfg.head_warmup} trains a classification head first, and --task causal-lm has "
            "none; drop it"
        )
    for option, value in (
        ("text-col", cfg.text_col),
        ("label-col", cfg.label_col),
        ("text-pair-col", cfg.text_pair_col),
    ):
        if value is not None:
            raise GradkitError(
                f"--{option} is a column of classification data; causal-LM data are JSON lines of "
                '"prompt"/"response" (or --text-field NAME for plain texts): drop it'
            )
    options = settings_from(ZerothOrderOptions, cfg.options)
    if options.objective != "loss":
        raise GradkitError(
            f"--objective {options.objective} scores predicted classes, and --task causal-lm has none; use "
            "--objective loss"
        )
    if options.zo_params == "head":
        raise GradkitError(
            "--zo-params head trains a classification head, which a causal LM has not; use lora or all"
        )
    if cfg.model is None:
        raise GradkitError(
            "--task causal-lm needs --model PATH, a local causal language model folder (Llama, Qwen, "
            "GPT-2...); the bundled MiniLM is an encoder"
        )
    if cfg.train is None:
        raise GradkitError(
            '--task causal-lm needs --train FILE: JSON lines of {"prompt": ..., "response": ...} (or '
            "--text-field NAME, or a .txt file); there is no bundled causal-LM data set"
        )
    if cfg.evaluate and cfg.test is None:
        raise GradkitError(
            "--task causal-lm needs --test FILE (held-out loss and perplexity), in the format of --train"
        )


def check_zeroth_order(cfg: TrainConfig) -> None:
    """mezo's estimator, its number of probes and the exact head agree with each other and the run."""
    if cfg.method != "mezo":
        return
    options = settings_from(ZerothOrderOptions, cfg.options)
    if options.zo_estimator == "fzoo" and options.zo_samples is not None and options.zo_samples < 2:
        raise GradkitError(
            f"--zo-samples {options.zo_samples} with --zo-estimator fzoo: FZOO divides its step by the "
            "standard deviation of its probes, which needs at least 2; pass --zo-samples 8 (its default)"
        )
    if options.zo_exact == "none":
        return
    if options.zo_params == "head":
        raise GradkitError(
            "--zo-exact head with --zo-params head leaves nothing to zeroth order; train the encoder too "
            "(--zo-params lora or all), or train the head alone by its gradient with --method head"
        )
    if cfg.task == "causal-lm":
        raise GradkitError(
            "--zo-exact head trains a classification head, and --task causal-lm has none; drop it"
        )
    if options.objective != "loss":
        raise GradkitError(
            f"--zo-exact head takes the gradient of the objective, and --objective {options.objective} "
            "(a count of argmax predictions) has none; use --objective loss, or drop --zo-exact"
        )
    if cfg.fsdp:
        raise GradkitError(
            "--zo-exact head is not supported under --fsdp (the head's gradient would need FSDP2's "
            "backward); drop one of them"
        )


# what a method without a backprop gradient of the loss does instead (no batch schedule for it)
NO_LOSS_GRADIENT = {
    "mezo": "zeroth order estimates its step from forward passes at one batch",
    "policy-gradient": "its step is a REINFORCE estimate of the metric's gradient",
}


def check_batch_schedule(cfg: TrainConfig) -> None:
    """The budget (``--examples`` or ``--steps``) and a growing ``--batch-schedule`` agree with each
    other, the method and the task."""
    step_examples = cfg.batch_size * cfg.grad_accum
    schedule, grows = cfg.batch_schedule, cfg.batch_schedule != "fixed"
    if cfg.examples is not None:
        if cfg.examples % step_examples:
            whole = max(1, round(cfg.examples / step_examples)) * step_examples
            raise GradkitError(
                f"--examples {cfg.examples} is not a whole number of batches of {step_examples} examples "
                f"(--batch-size x --grad-accum); pass e.g. --examples {whole}"
            )
        if cfg.steps not in (DEFAULT_STEPS, cfg.examples // step_examples):
            raise GradkitError("--examples and --steps both set the budget; pass one of them")
    unused = {"--batch-max": cfg.batch_max, "--batch-ramp-examples": cfg.batch_ramp_examples}
    if schedule != "ramp" and cfg.batch_ramp_examples is not None:
        raise GradkitError(
            "--batch-ramp-examples sets --batch-schedule ramp's doublings; drop it or pass --batch-schedule ramp"
        )
    if not grows:
        given = [name for name, value in unused.items() if value is not None]
        if given:
            raise GradkitError(
                f"{given[0]} applies to a growing --batch-schedule; drop it or pass noise or ramp"
            )
        return
    if cfg.method in NO_LOSS_GRADIENT:
        raise GradkitError(
            f"--batch-schedule {schedule} grows the accumulated gradient of a backprop method and scales "
            f"its AdamW lr, and {cfg.method} has none ({NO_LOSS_GRADIENT[cfg.method]}); use "
            "--batch-schedule fixed"
        )
    if cfg.examples is None:
        raise GradkitError(
            f"--batch-schedule {schedule} counts the budget in examples, since its number of steps depends "
            f"on the batches it picks: pass --examples N instead of --steps (--steps {cfg.steps} at "
            f"{step_examples} a step is --examples {cfg.steps * step_examples})"
        )
    if cfg.batch_max is not None and (cfg.batch_max < step_examples or cfg.batch_max % step_examples):
        raise GradkitError(
            f"--batch-max {cfg.batch_max} must be a multiple of the step's batch {step_examples} "
            f"(--batch-size x --grad-accum) and at least it; pass e.g. --batch-max {16 * step_examples}"
        )
    if schedule == "noise":
        _check_noise_schedule(cfg, step_examples)


def _check_noise_schedule(cfg: TrainConfig, step_examples: int) -> None:
    """The noise scale is measured per example, from at least two micro-batches a step."""
    if cfg.task == "causal-lm":
        raise GradkitError(
            "--batch-schedule noise measures the noise scale per example, and a causal LM's loss is a mean "
            "over tokens; use --batch-schedule ramp"
        )
    if cfg.pair_loss == "cosent":
        raise GradkitError(
            "--batch-schedule noise needs a loss that is a mean over examples, and --pair-loss cosent "
            "ranks every pair of the batch; use --pair-loss mse or --batch-schedule ramp"
        )
    if step_examples < 2:
        raise GradkitError(
            "--batch-schedule noise compares two batch sizes inside each step, which needs at least 2 "
            "examples a step; pass --batch-size 2 or more"
        )


# optional packages: the setting that needs one, and the package's import name
PEER_PACKAGES = {"--optimizer schedule-free": "schedulefree", "--method lora-rite": "pytorch_optimizer"}


def check_optimizer(cfg: TrainConfig) -> None:
    """``--optimizer`` only where the method trains with it, and the optional packages the peers need."""
    if cfg.optimizer != "adamw" and cfg.method not in OPTIMIZER_METHODS:
        raise GradkitError(
            f"--optimizer {cfg.optimizer} trains --method {' or '.join(OPTIMIZER_METHODS)}; --method "
            f"{cfg.method} has its own optimiser: leave --optimizer at adamw"
        )
    if cfg.optimizer != "adamw" and cfg.batch_schedule != "fixed":
        raise GradkitError(
            f"--batch-schedule {cfg.batch_schedule} scales the lr by Adam's batch-size law as the batch grows, "
            f"which is AdamW's, not --optimizer {cfg.optimizer}'s; use --optimizer adamw with it"
        )
    needs = {
        "--optimizer schedule-free": cfg.optimizer == "schedule-free",
        "--method lora-rite": cfg.method == "lora-rite",
    }
    for setting, package in PEER_PACKAGES.items():
        if needs[setting] and importlib.util.find_spec(package) is None:
            raise GradkitError(f"{setting} needs the {package} package: pip install 'gradkit[peers]'")


def check_precision(cfg: TrainConfig) -> None:
    """``--precision``: fp32, or bf16 where the device computes it (every CPU; CUDA GPUs that support
    bf16; the value itself is checked with the other settings)."""
    if cfg.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise GradkitError("--precision bf16: this GPU does not compute in bfloat16; use --precision fp32")


# methods that cannot train an FSDP2-sharded model, and why (gradkit.train.sharding)
FSDP_REFUSED: dict[str, str] = {
    "lora-rite": "pytorch-optimizer's LoRARite does not take FSDP2's sharded factors; drop --fsdp (LoRA's "
    "factors are small: DDP holds them whole)",
}


def check_fsdp(cfg: TrainConfig, processes: int | None = None) -> None:
    """``--fsdp`` shards the model over the launch's processes: it is refused in a one-process run
    (``processes``: the launch's count, by default torchrun's ``WORLD_SIZE``), where there is nothing to
    shard over, and with a method that cannot run sharded."""
    if not cfg.fsdp:
        return
    if processes is None:
        processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes < 2:
        raise GradkitError(
            "--fsdp shards the model over several processes and this run has one; launch it with "
            "torchrun --nproc_per_node N (N >= 2), or drop --fsdp"
        )
    reason = FSDP_REFUSED.get(cfg.method)
    if reason is not None:
        raise GradkitError(f"--fsdp with --method {cfg.method}: {reason}")
    if cfg.optimizer == "muon":
        raise GradkitError(
            "--optimizer muon with --fsdp: torch.optim.Muon orthogonalises each rank's rows of a matrix, not "
            "the whole matrix; use --optimizer steepest-spectral, which computes each matrix's step whole"
        )


def check_data(cfg: TrainConfig, train: Any) -> list[str] | None:
    """What the settings and the loaded training data decide together: the step's batch fits the data
    (:func:`check_step_batch`), and the label-text head has one text per label. Returns the label
    texts for ``--head-init labels`` (else None)."""
    check_step_batch(cfg, len(train))
    if cfg.head_init == "labels" and cfg.task != "causal-lm":
        return label_texts(train.label_names, cfg.label_text, cfg.label_template)
    return None


def check_step_batch(cfg: TrainConfig, train_rows: int) -> None:
    """With ``--grad-accum`` a step's batch (batch size x K) must fit in the training set, and so must
    a growing schedule's largest batch."""
    step_examples = cfg.batch_size * cfg.grad_accum
    if cfg.grad_accum > 1 and step_examples > train_rows:
        raise GradkitError(
            f"--grad-accum {cfg.grad_accum} makes each step hold {step_examples:,} examples, more than the "
            f"{train_rows:,} training rows; pass a smaller --grad-accum"
        )
    if cfg.batch_max is not None and cfg.batch_max > train_rows:
        fits = max(1, train_rows // step_examples) * step_examples
        raise GradkitError(
            f"--batch-max {cfg.batch_max:,} is more than the {train_rows:,} training rows; pass at most "
            f"--batch-max {fits}"
        )


def run_inputs(cfg: TrainConfig) -> dict[str, str | None]:
    """What a run reads, by option: the data files and the model folder (None: the bundled one)."""
    return {"--train": cfg.train, "--test": cfg.test, "--dev": cfg.dev, "--model": cfg.model}


def check_out(
    out: Path, overwrite: bool, *, inputs: Mapping[str, str | None] | None = None, empty: bool = True
) -> None:
    """A run folder must be new or empty unless ``--overwrite`` (which clears it when the run starts;
    ``empty=False`` leaves that check out), and must not hold any of the run's ``inputs`` (option ->
    path): clearing it would delete them."""
    if out.exists() and not out.is_dir():
        raise GradkitError(f"--out {out} is a file; pass a folder path for the run")
    folder = out.resolve()
    for option, path in (inputs or {}).items():
        if (
            path is not None
            and str(path).strip()
            and folder in (Path(path).resolve(), *Path(path).resolve().parents)
        ):
            raise GradkitError(
                f"--out {out} holds {option} {path}, an input of this run (--overwrite would delete it); "
                "pass a new folder for the run, outside the inputs' folders"
            )
    if empty and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise GradkitError(
            f"--out {out} already holds files (an earlier run?); pass another folder, or --overwrite to "
            "replace its contents"
        )
    parent = out.parent if not out.exists() else out
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GradkitError(f"--out {out}: cannot write in {parent}; pass a folder you can write to")


def position_limit(model: nn.Module, tokenizer: Any) -> int | None:
    """The longest input the model accepts: its position embeddings, or the tokenizer's stated limit."""
    config = getattr(getattr(model, "encoder", model), "config", None)
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [
        int(x) for x in limits if isinstance(x, int) and 0 < x < 10**7
    ]  # tokenizers say 1e30 for "none"
    return min(limits) if limits else None


def check_model(cfg: TrainConfig, model: nn.Module, tokenizer: Any, path: str) -> None:
    """What needs the model and tokenizer: the position limit and the padding token."""
    limit = position_limit(model, tokenizer)
    if limit is not None and cfg.max_length > limit:
        raise GradkitError(
            f"--max-length {cfg.max_length} exceeds the {limit} positions of the model ({path}); "
            f"pass --max-length 1..{limit} (longer texts are truncated to it)"
        )
    if tokenizer.pad_token is None:
        raise GradkitError(
            f"the tokenizer in {path} has no padding token and no end-of-text token to pad with; "
            "gradkit pads each batch: add a pad_token to its tokenizer_config.json"
        )


def check_lora_rank(cfg: TrainConfig, model: nn.Module, targets: list[str]) -> None:
    """The rank fits every targeted layer (1 .. min(in, out)); warn when LoRA would train a large share
    of the model (a rank that large gives up what LoRA is for)."""
    shapes = [
        layer_shape(m)
        for name, m in adaptable_layers(model)
        if any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not shapes:
        return
    largest = min(min(shape) for shape in shapes)
    if cfg.rank > largest:
        raise GradkitError(
            f"--rank {cfg.rank} exceeds min(in, out) = {largest} of the smallest targeted layer; pass --rank "
            f"1..{largest}"
        )
    lora = sum(cfg.rank * (fan_in + fan_out) for fan_in, fan_out in shapes)
    total = sum(p.numel() for p in model.parameters())
    if lora > LORA_SHARE_WARNING * total:
        warnings.warn(
            f"LoRA at --rank {cfg.rank} trains {lora / 1e6:.1f} M parameters, {100 * lora / total:.0f}% of the "
            f"model's {total / 1e6:.1f} M (and AdamW keeps two more copies): a smaller rank is what LoRA is for",
            stacklevel=2,
        )
