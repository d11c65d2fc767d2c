"""One plain dataclass holds every setting of a fine-tuning run; it is written to config.json."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainConfig:
    """Settings of one run. ``None`` means "the method's or data's default"."""

    method: str = "lora"
    model: str | None = None  # local Hugging Face folder; None = bundled all-MiniLM-L6-v2
    train: str | None = None  # TSV / CSV / JSON lines; None = bundled SST-2 sample
    test: str | None = None
    text_col: str | None = None  # name or 0-based index; None = "sentence"/"text" or the first column
    label_col: str | None = None  # name or 0-based index; None = "label" or the last column
    text_pair_col: str | None = (
        None  # second text of a sentence pair; None = sentence2 beside sentence1, else none
    )
    task: str = "classification"  # or "regression": a float label column, one output, mean squared error;
    # or "causal-lm": JSON lines of prompt/response (or text_field) on an AutoModelForCausalLM folder
    metric: str | None = None  # reported and used by --keep-best; None = accuracy / pearson / perplexity
    text_field: str | None = None  # causal-lm: the JSON key of plain texts (loss on every token)
    precision: str = "fp32"  # or "bf16": bf16 autocast of the forward (CPU and CUDA), fp32 master weights
    fsdp: bool = False  # FSDP2: fully_shard per transformer block, then the root; torchrun N >= 2
    head_init: str = "random"  # or "labels": a LabelTextHead from the encoder's embeddings of the label texts
    label_text: str | None = (
        None  # the label texts, comma-separated in label-id order; None = the label names
    )
    label_template: str | None = None  # e.g. "It was {}."; None = the label text alone
    head_warmup: int = 0  # steps that train the head alone before the method starts (LP-FT)
    head_lr: float | None = None  # the head warm-up's AdamW lr; None = the head method's default
    steps: int = 300
    batch_size: int = 32  # global batch: split across processes under accelerate / torchrun
    lr: float | None = None  # None = the method's default_lr
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    rank: int = 8
    alpha: float = 16.0
    targets: str = "all-linear"  # comma-separated module-name suffixes, or every Linear of the encoder
    rslora: bool = False
    lora_dropout: float = 0.0
    ema: float | None = None  # weight-EMA decay; None = no EMA. Both raw and EMA weights are evaluated
    ema_warmup: str | None = "bias_corrected"  # see gradkit.ema.ema_decay
    pooling: str = "mean"  # "mean" over tokens, or "cls"
    max_length: int = 128
    eval_batch_size: int = 128
    log_every: int = 1
    schedule: str = "linear"  # "linear": warmup then linear decay to 0; "constant": lr at every step
    evaluate: bool = (
        True  # evaluate on the test set at the end (a measuring run such as noise-scale needs none)
    )
    grad_accum: int = (
        1  # micro-batches of batch_size per optimiser step: the step's batch is batch_size x this
    )
    trim_padding: bool = True  # cut each batch into length-sorted parts with little padding (same gradient)
    eval_every: int = 0  # evaluate on the dev set every this many steps (and at the end); 0: at the end only
    dev: str | None = None  # dev file (same format as train); or dev_fraction of the training file
    dev_fraction: float | None = None
    keep_best: bool = False  # also keep and test the weights of the best dev accuracy (needs eval_every)
    save_every: int = 0  # write a resumable checkpoint every this many steps; 0: none
    report_to: str = "none"  # "tensorboard": also log through accelerate's tracker into <out>/tensorboard
    seed: int = 0
    out: str | None = None  # run folder; None = runs/<method>-<time> (a new one)
    overwrite: bool = False  # an existing non-empty ``out`` is refused unless this is set (then cleared)
    options: dict[str, Any] = field(default_factory=dict)  # method-specific CLI options

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
