"""One plain dataclass holds every setting of a fine-tuning run; it is written to config.json.

Each field is declared once with :func:`~gradkit.train.settings.setting`: its default, help text,
choices and range. ``gradkit finetune`` / ``compare`` derive their options from these fields
(:mod:`gradkit.cli.options`), and :func:`~gradkit.train.settings.check_settings` checks them. The
fields are in the order of the command line's option groups. Torch-free: building the command line
imports this module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from gradkit.scaling.batch_schedule import BATCH_SCHEDULES
from gradkit.train.settings import Range, setting

MODEL_DATA = "model and data"
HEAD = "the head"
BUDGET = "budget and optimisation"
EVALUATION = "evaluation, checkpoints and logging"
LORA = "LoRA"

POSITIVE = Range(0, low_open=True)
AT_LEAST_0 = Range(0)
AT_LEAST_1 = Range(1)
FRACTION = Range(0, 1)
# --optimizer (built by gradkit.train.optimizers) and the methods that train with it
OPTIMIZERS = ("adamw", "muon", "steepest-spectral", "schedule-free")
OPTIMIZER_METHODS = ("lora", "full")


@dataclass
class TrainConfig:
    """Settings of one run. ``None`` means "the method's or data's default"."""

    method: str = setting("lora", "the fine-tuning method (see gradkit.train.methods)", cli=False)
    # -- model and data
    model: str | None = setting(
        None, "local Hugging Face encoder folder (default: bundled all-MiniLM-L6-v2)", group=MODEL_DATA
    )
    train: str | None = setting(
        None,
        "training file: TSV, CSV or JSON lines (default: bundled SST-2 sample, 4,000 rows)",
        group=MODEL_DATA,
    )
    test: str | None = setting(
        None, "test file, same format (default: bundled SST-2 GLUE dev set, 872 rows)", group=MODEL_DATA
    )
    text_col: str | None = setting(
        None, "text column: name or 0-based index (default: sentence/text, else first)", group=MODEL_DATA
    )
    label_col: str | None = setting(
        None, "label column: name or 0-based index (default: label, else last)", group=MODEL_DATA
    )
    text_pair_col: str | None = setting(
        None,
        "second text of a sentence pair (NLI, paraphrase, similarity): name or 0-based index; "
        "--pair-encoding says how the two are encoded (default: sentence2 when the file has sentence1 "
        "and sentence2)",
        group=MODEL_DATA,
    )
    task: str = setting(
        "classification",
        "classification (label ids, cross-entropy), regression (a numeric label, one output, mean "
        'squared error) or causal-lm (JSON lines of {"prompt", "response"} on a local AutoModelForCausalLM '
        "folder: mean cross-entropy of the response tokens; see docs/causal_lm.md)",
        choices=("classification", "regression", "causal-lm"),  # gradkit.train.metrics.TASK_METRICS
        group=MODEL_DATA,
    )
    metric: str | None = setting(
        None,
        "the metric reported and used by --keep-best (default: accuracy for classification, pearson "
        "for regression, perplexity for causal-lm, where lower is better; mcc is Matthews correlation, as "
        "GLUE scores CoLA)",
        choices=("accuracy", "macro_f1", "mcc", "pearson", "spearman", "perplexity"),
        group=MODEL_DATA,
    )
    text_field: str | None = setting(
        None,
        "causal-lm: read plain texts from this JSON key and train on every token (default: the "
        '"prompt"/"response" pair, loss on the response only; a .txt file is one text per line)',
        group=MODEL_DATA,
        metavar="NAME",
    )
    precision: str = setting(
        "fp32",
        "bf16: the forward pass in bfloat16 autocast (CPU and CUDA), weights, gradients and optimiser "
        "states kept in fp32",
        choices=("fp32", "bf16"),
        group=MODEL_DATA,
    )
    fsdp: bool = setting(
        False,
        "shard the model over the processes with FSDP2 (fully_shard on each transformer block and the "
        "root) instead of replicating it (DDP); needs torchrun --nproc_per_node N with N >= 2 (docs/fsdp.md)",
        group=MODEL_DATA,
    )
    max_length: int = setting(128, "tokens per example", range=Range(2), example="128", group=MODEL_DATA)
    pooling: str = setting(
        "mean",
        "pooled output for the head (a bi-encoder uses the pooling its sentence-transformers folder declares)",
        choices=("mean", "cls"),
        group=MODEL_DATA,
    )
    pair_encoding: str | None = setting(
        None,
        "sentence pairs: cross encodes a pair as one sequence ([CLS] a [SEP] b [SEP]) under a new head; bi "
        "embeds each text on its own with the model's pooling and compares the two embeddings, as "
        "sentence-transformers models are trained (default: bi for a sentence-transformers model folder, "
        "cross otherwise; docs/pairs.md)",
        choices=("cross", "bi"),
        group=MODEL_DATA,
    )
    pair_loss: str | None = setting(
        None,
        "bi-encoder regression: mse (squared error of lo + (hi - lo) * cos(u, v); default: it trained "
        "all-MiniLM-L6-v2 on STS-B better than CoSENT, docs/pairs.md) or cosent (a ranking loss on the "
        "batch's cosines)",
        choices=("mse", "cosent"),
        group=MODEL_DATA,
    )
    pair_features: str = setting(
        "diff",
        "bi-encoder classification head's input: diff = [u, v, |u - v|] (sentence-transformers' "
        "SoftmaxLoss); diff-product adds u * v",
        choices=("diff", "diff-product"),
        group=MODEL_DATA,
    )
    # -- the head
    head_init: str = setting(
        "random",
        "random: a new N(0, 0.02) head; labels: scale * cos(sentence, label text) with the encoder's "
        "own embeddings of the label texts (a zero-shot classifier from step 0); similarity (bi-encoder "
        "pairs, two classes): scale * (cos(u, v) - threshold), the threshold fitted on the training "
        "file's first rows (a zero-shot threshold classifier from step 0)",
        choices=("random", "labels", "similarity"),
        group=HEAD,
    )
    label_text: str | None = setting(
        None,
        "with --head-init labels: one text per label, comma-separated in label-id order (or a JSON "
        "list), e.g. terrible,great (default: the label names of the file)",
        group=HEAD,
    )
    label_template: str | None = setting(
        None,
        "with --head-init labels: each label text is put in this template's {}, e.g. 'It was {}.'",
        group=HEAD,
    )
    head_warmup: int = setting(
        0,
        "first train the head alone for N steps on the frozen encoder (LP-FT), then the method; the "
        "same warm-up for every method of a compare (0: none)",
        range=AT_LEAST_0,
        example="100 (or 0: no head warm-up)",
        group=HEAD,
        metavar="N",
    )
    head_lr: float | None = setting(
        None,
        "learning rate of the head warm-up (AdamW, constant; default: the head method's 2e-3)",
        range=POSITIVE,
        example="2e-3",
        group=HEAD,
    )
    # -- budget and optimisation
    steps: int = setting(300, "optimiser steps", range=AT_LEAST_1, example="300", group=BUDGET)
    batch_size: int = setting(
        32,
        "global batch size (split across processes under accelerate / torchrun)",
        range=AT_LEAST_1,
        example="32",
        group=BUDGET,
    )
    examples: int | None = setting(
        None,
        "the budget in training examples, in place of --steps (a multiple of --batch-size x --grad-accum); "
        "a growing --batch-schedule needs it, since its number of optimiser steps depends on the batch "
        "sizes it chooses",
        range=AT_LEAST_1,
        example="9600",
        group=BUDGET,
        metavar="N",
    )
    batch_schedule: str = setting(
        "fixed",
        "fixed: every step takes --batch-size examples; noise: every --batch-check steps the batch grows "
        "to the multiple of --batch-size nearest --batch-noise-fraction x the measured noise scale "
        "B_simple, never shrinking, up to --batch-max, and the lr follows Adam's batch-size law; ramp: "
        "the batch doubles every --batch-ramp-examples examples (a fixed warm-up, for comparison). A "
        "larger batch is more micro-batches of --batch-size, so memory stays that of --batch-size "
        "(docs/noise_scale.md)",
        choices=BATCH_SCHEDULES,
        group=BUDGET,
    )
    batch_check: int = setting(
        50,
        "noise: optimiser steps between batch-size decisions",
        range=AT_LEAST_1,
        example="50",
        group=BUDGET,
    )
    batch_noise_fraction: float = setting(
        1.0,
        "noise: the batch aimed at, as a fraction of the smoothed B_simple",
        range=POSITIVE,
        example="1.0",
        group=BUDGET,
    )
    batch_max: int | None = setting(
        None,
        "the largest batch a growing schedule may reach, a multiple of --batch-size x --grad-accum "
        "(default: 64 times that, or fewer to fit the training rows)",
        range=AT_LEAST_1,
        example="1024",
        group=BUDGET,
    )
    batch_ramp_examples: int | None = setting(
        None,
        "ramp: examples between doublings of the batch (default: an eighth of --examples)",
        range=AT_LEAST_1,
        example="1200",
        group=BUDGET,
    )
    lr: float | None = setting(
        None,
        "peak learning rate (default: each method's own)",
        range=POSITIVE,
        example="1e-4",
        why="a positive learning rate",
        group=BUDGET,
    )
    warmup_ratio: float = setting(
        0.1, "linear warmup share of steps", range=FRACTION, example="0.1", group=BUDGET
    )
    weight_decay: float = setting(
        0.01,
        "decoupled weight decay (not on biases, norms)",
        range=AT_LEAST_0,
        example="0.01",
        group=BUDGET,
    )
    optimizer: str = setting(
        "adamw",
        "the optimiser of --method lora and full: adamw; muon (torch.optim.Muon, Moonlight's lr scaling) or "
        "steepest-spectral (gradkit.SteepestDescent, exact orthogonalised steps at the same scaling) on the "
        "2-D LoRA factors or encoder weights with AdamW on the rest (embeddings, head, biases, norms); "
        "schedule-free (Schedule-Free AdamW: no lr decay, evaluated at its averaged weights; pip install "
        "'gradkit[peers]') (docs/optimizers.md)",
        choices=OPTIMIZERS,
        group=BUDGET,
    )
    max_grad_norm: float | None = setting(
        1.0,
        "0 disables clipping",
        range=AT_LEAST_0,
        example="1.0 (or 0 for no clipping)",
        group=BUDGET,
    )
    seed: int = setting(
        0,
        "seeds the data order, the new head and each method's randomness",
        range=Range(0, 2**32, high_open=True),
        example="0",
        why="numpy's generator takes a 32-bit seed",
        group=BUDGET,
    )
    out: str | None = setting(
        None, "run folder, new or empty (default: a new runs/<method>-<time>)", group=BUDGET
    )
    overwrite: bool = setting(
        False, "allow --out to be a folder that holds files: it is cleared", group=BUDGET
    )
    ema: float | None = setting(
        None,
        "also keep a weight EMA with this decay (e.g. 0.99); evaluates (dev and test) and saves both "
        "the raw and the EMA weights (the EMA never changes training)",
        range=Range(0, 1, high_open=True),
        example="0.99",
        group=BUDGET,
        metavar="DECAY",
    )
    ema_warmup: str | None = setting(
        "bias_corrected",
        "EMA warmup schedule (none: the average starts at the first step's weights; see "
        "gradkit.ema.ema_decay)",
        choices=(None, "power", "bias_corrected"),
        group=BUDGET,
    )
    # -- evaluation, checkpoints and logging
    grad_accum: int = setting(
        1,
        "micro-batches of --batch-size per optimiser step: the step's batch is batch-size x this",
        range=AT_LEAST_1,
        example="4",
        group=EVALUATION,
    )
    trim_padding: bool = setting(
        True,
        "run each batch as one forward pass padded to its longest text (default: length-sorted parts "
        "with little padding, the same gradient up to rounding)",
        group=EVALUATION,
        flag="--no-trim-padding",
    )
    dev: str | None = setting(
        None, "dev file for --eval-every and --keep-best (same format as --train)", group=EVALUATION
    )
    dev_fraction: float | None = setting(
        None,
        "carve this share of the training file off as the dev set (seeded; not trained on)",
        range=Range(0, 0.5, low_open=True),
        example="0.1",
        group=EVALUATION,
    )
    eval_every: int = setting(
        0,
        "evaluate on the dev set every N steps (and at the end); 0: at the end only",
        range=AT_LEAST_0,
        example="50 (or 0: the dev set at the end only)",
        group=EVALUATION,
    )
    keep_best: bool = setting(
        False,
        "also keep the weights of the best dev score (--metric) in best/ and test them (chosen on dev only)",
        group=EVALUATION,
    )
    save_every: int = setting(
        0,
        "write a checkpoint every N steps (resume with gradkit finetune --resume RUN_DIR); 0: none",
        range=AT_LEAST_0,
        example="100 (or 0: no checkpoints)",
        group=EVALUATION,
    )
    report_to: str = setting(
        "none",
        "also log metrics to TensorBoard (RUN_DIR/tensorboard; needs pip install tensorboard)",
        choices=("none", "tensorboard"),
        group=EVALUATION,
    )
    # -- LoRA
    rank: int = setting(8, "LoRA rank r", range=AT_LEAST_1, example="8", group=LORA)
    alpha: float = setting(
        16.0, "LoRA alpha: updates are scaled by alpha/rank", range=POSITIVE, example="16", group=LORA
    )
    targets: str = setting(
        "all-linear",
        "comma-separated Linear names to adapt, or all-linear (default) for every encoder Linear",
        group=LORA,
    )
    rslora: bool = setting(False, "scale alpha/sqrt(rank) instead of alpha/rank", group=LORA)
    lora_dropout: float = setting(
        0.0,
        "dropout on LoRA's input",
        range=Range(0, 1, high_open=True),
        example="0.1",
        group=LORA,
    )
    # -- settings of library callers (gradkit noise-scale, benchmarks); no command-line option
    eval_batch_size: int = setting(
        128, "examples per evaluation batch", range=AT_LEAST_1, example="128", cli=False
    )
    log_every: int = setting(1, "write a metrics.jsonl line every this many steps", cli=False)
    schedule: str = setting(
        "linear",
        "linear: warmup then linear decay to 0; constant: the lr at every step",
        choices=("linear", "constant"),
        cli=False,
    )
    evaluate: bool = setting(
        True,
        "evaluate on the test set at the end (a measuring run such as noise-scale needs none)",
        cli=False,
    )
    options: dict[str, Any] = setting(
        {},
        "each method's own options by name (gradkit.train.method_options), as plain values",
        cli=False,
    )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
