"""Sentence pairs as a bi-encoder (siamese) model sees them: each text embedded on its own with the
model's own pooling, the pair compared through its two embeddings ``u`` and ``v``.

This is how sentence-transformers models such as all-MiniLM-L6-v2 were trained and are used
(Reimers & Gurevych 2019, "Sentence-BERT", arXiv 1908.10084), so the pair task starts from what the
model already does: on STS-B, cos(u, v) is already a good similarity score before any training.

- Regression: the prediction is ``lo + (hi - lo) * cos(u, v)`` (the label range ``[lo, hi]`` of the
  training file; sentence-transformers' ``CosineSimilarityLoss`` scales the label to [0, 1] the same
  way), with the scale and offset trainable, and the loss the squared error of that prediction
  (``mse``) or CoSENT on the cosines (``cosent``, :func:`cosent_loss`).
- Classification: a linear head on ``[u, v, |u - v|]`` (sentence-transformers' ``SoftmaxLoss``;
  ``u * v`` too with ``diff-product``), or for two classes the similarity head
  (:class:`SimilarityHead`): logits from ``scale * (cos(u, v) - threshold)``, the threshold fitted on the
  training file's first rows, so step 0 is the zero-shot threshold classifier.

The pooling is the model folder's own (``modules.json`` and its Pooling module's ``config.json``:
:func:`folder_pooling`), with the L2 normalisation when the folder lists a Normalize module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gradkit.errors import GradkitError
from gradkit.train.model import load_encoder

# pooling modes of a sentence-transformers Pooling module that gradkit computes
POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "lasttoken")
# sentence-transformers' older config format: one boolean per mode
_LEGACY_MODE_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
# the training file's first rows that fit the similarity head's threshold (file order, not the seeded
# stream: every seed and every method starts from the same classifier)
SIMILARITY_FIT_ROWS = 256
# the run-folder subfolder with the encoder's LoRA alone, for sentence-transformers' load_adapter
ENCODER_ADAPTER = "encoder_adapter"
# CoSENT's scale on the cosines (Su's post and sentence-transformers' CoSENTLoss: 20)
COSENT_SCALE = 20.0
# the similarity head's initial scale on the cosines (a softmax temperature of 0.05, as LabelTextHead)
SIMILARITY_SCALE = 20.0


@dataclass(frozen=True)
class Pooling:
    """How a bi-encoder turns token states into one embedding: ``mode`` (one of :data:`POOLING_MODES`),
    ``normalize`` (L2 normalisation after pooling) and ``source`` (where this was read)."""

    mode: str
    normalize: bool
    source: str


@dataclass(frozen=True)
class PairSetup:
    """How a run encodes its sentence pairs: ``encoding`` ``"cross"`` or ``"bi"``, ``reason`` (why, for
    the summary), and for ``bi`` the ``pooling`` and the regression ``loss``."""

    encoding: str
    reason: str
    pooling: Pooling | None = None
    loss: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"encoding": self.encoding, "reason": self.reason}
        if self.pooling is not None:
            out["pooling"] = {"mode": self.pooling.mode, "normalize": self.pooling.normalize}
        if self.loss is not None:
            out["loss"] = self.loss
        return out


def pair_setup(
    model_path: str, encoding: str | None, task: str, loss: str | None, data: Any, pooling: str = "mean"
) -> PairSetup | None:
    """The pair encoding of a run on ``data`` (None when it has no second texts, where ``bi`` is
    refused): ``encoding`` when given, else ``bi`` for a sentence-transformers folder and ``cross``
    otherwise; for ``bi`` the pooling (:func:`bi_pooling`) and the regression loss (default ``mse``)."""
    if getattr(data, "pairs", None) is None:
        if encoding == "bi":
            raise GradkitError(
                "--pair-encoding bi embeds the two texts of a pair, and the data have one text column; "
                "pass --text-pair-col NAME (the second text), or drop --pair-encoding"
            )
        return None
    sentence_transformers = is_sentence_transformers_folder(model_path)
    if encoding is None:
        encoding = "bi" if sentence_transformers else "cross"
        reason = (
            "default: the model folder is a sentence-transformers bi-encoder"
            if sentence_transformers
            else "default: the model folder is not a sentence-transformers one"
        )
    else:
        reason = f"--pair-encoding {encoding}"
    if encoding == "cross":
        return PairSetup("cross", reason)
    loss = (loss or "mse") if task == "regression" else None
    return PairSetup("bi", reason, bi_pooling(model_path, pooling), loss)


def bi_pooling(model_path: str, pooling: str = "mean") -> Pooling:
    """A bi-encoder's pooling: the folder's own (:func:`folder_pooling`), or for a folder that declares
    none ``pooling`` (``--pooling``) without normalisation."""
    return folder_pooling(model_path) or Pooling(
        pooling, False, f"--pooling {pooling} (the folder declares none)"
    )


def is_sentence_transformers_folder(path: str) -> bool:
    """The folder was saved by sentence-transformers (it has ``modules.json`` or
    ``config_sentence_transformers.json``)."""
    return Path(path, "modules.json").is_file() or Path(path, "config_sentence_transformers.json").is_file()


def folder_pooling(path: str) -> Pooling | None:
    """The pooling a sentence-transformers folder declares: the Pooling module listed in
    ``modules.json`` (its ``config.json``: ``pooling_mode``, or the older ``pooling_mode_*_tokens``
    booleans) and whether a Normalize module follows. None for a folder without ``modules.json``.
    A configuration that cannot be read, or a mode gradkit does not compute, is refused in one line."""
    modules_file = Path(path, "modules.json")
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, "its module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise GradkitError(
            f"{modules_file} is not a list of modules; restore the model folder's modules.json"
        )
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if "Pooling" not in kinds:
        raise GradkitError(
            f"{modules_file} lists no Pooling module, so how the model pools its tokens is unknown; "
            "pass --pair-encoding cross, or a sentence-transformers folder with a Pooling module"
        )
    pooling_file = Path(path, str(modules[kinds.index("Pooling")].get("path", "")), "config.json")
    config = _read_json(pooling_file, "the Pooling module's configuration")
    mode = config.get("pooling_mode") if isinstance(config, dict) else None
    if mode is None and isinstance(config, dict):
        chosen = [name for key, name in _LEGACY_MODE_KEYS.items() if config.get(key)]
        # no mode set: sentence-transformers' Pooling then pools by the mean
        mode = chosen[0] if len(chosen) == 1 else (chosen or "mean")
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in POOLING_MODES:
        raise GradkitError(
            f"{pooling_file}: pooling mode {mode!r} is not one gradkit computes ({', '.join(POOLING_MODES)}); "
            "pass --pair-encoding cross, or a model whose Pooling module uses one of those"
        )
    return Pooling(str(mode), "Normalize" in kinds, str(pooling_file))


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise GradkitError(
            f"{path} is missing, so {what} cannot be read; restore the model folder, or pass --pair-encoding cross"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GradkitError(
            f"{path} cannot be read as JSON ({str(err).splitlines()[0]}); restore the model folder, or pass "
            "--pair-encoding cross"
        ) from None


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of ``hidden`` ``(batch, length, dim)`` over its real tokens (mask 1), as
    sentence-transformers' Pooling computes it: ``mean`` = sum_t m_t h_t / sum_t m_t,
    ``mean_sqrt_len_tokens`` = sum_t m_t h_t / sqrt(sum_t m_t), ``max`` over real tokens, ``cls`` the
    first real token, ``lasttoken`` the last real token (rows padded on the right)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    if mode in ("mean", "mean_sqrt_len_tokens"):
        total = (hidden * mask).sum(1)
        count = mask.sum(1).clamp_min(1e-9)
        return total / (count if mode == "mean" else count.sqrt())
    if mode == "max":
        return hidden.masked_fill(mask == 0, float("-inf")).max(1).values
    if mode == "cls":
        first = attention_mask.to(torch.int).argmax(1)
        return hidden[torch.arange(len(hidden), device=hidden.device), first]
    if mode == "lasttoken":
        last = (attention_mask.sum(1) - 1).clamp_min(0)
        return hidden[torch.arange(len(hidden), device=hidden.device), last]
    raise GradkitError(f"unknown pooling mode {mode!r}; use one of {', '.join(POOLING_MODES)}")


def cosent_loss(cosines: torch.Tensor, labels: torch.Tensor, scale: float = COSENT_SCALE) -> torch.Tensor:
    """CoSENT (Su Jianlin 2022, "CoSENT: a more efficient sentence vector scheme"; sentence-transformers'
    ``CoSENTLoss``): a ranking loss over every pair of examples in the batch,

        L = log(1 + sum_{(i, j): y_i > y_j} exp(scale * (cos_j - cos_i))),

    small when every more similar pair (larger label) has the larger cosine. It depends on the batch
    as a whole (not a mean of per-example losses), and only on the order of the labels."""
    cosines, labels = cosines.float().reshape(-1), labels.float().reshape(-1)
    differences = scale * (cosines[None, :] - cosines[:, None])  # [i, j] = scale * (cos_j - cos_i)
    ordered = labels[:, None] > labels[None, :]
    terms = differences.masked_fill(~ordered, float("-inf")).reshape(-1)
    return torch.logsumexp(torch.cat([terms.new_zeros(1), terms]), 0)


class CosineRegressionHead(nn.Module):
    """``prediction = offset + scale * cos``: the label range ``[lo, hi]`` as ``offset = lo`` and
    ``scale = hi - lo`` at the start (cos 1 predicts the top of the range, 0 the bottom), both trainable."""

    def __init__(self, low: float = 0.0, high: float = 1.0):
        super().__init__()
        # shape (1,): FSDP2's fully_shard (--fsdp) and the ranks' weight check take no 0-dim parameter
        self.scale = nn.Parameter(torch.tensor([float(high - low)]))
        self.offset = nn.Parameter(torch.tensor([float(low)]))

    def forward(self, cosines: torch.Tensor) -> torch.Tensor:
        return self.offset + self.scale * cosines


class SimilarityHead(nn.Module):
    """Two-class logits from one cosine: ``z = exp(log_scale) * (cos - threshold)``, the logit ``+z/2``
    for the class of similar pairs (``similar_class``) and ``-z/2`` for the other, so
    ``P(similar) = sigmoid(z)``. With the threshold fitted (:func:`fit_similarity_head`) it is the
    zero-shot threshold classifier of the pair's cosine; scale and threshold are trainable."""

    def __init__(self, similar_class: int = 1, threshold: float = 0.5, scale: float = SIMILARITY_SCALE):
        super().__init__()
        # shape (1,): FSDP2's fully_shard (--fsdp) and the ranks' weight check take no 0-dim parameter
        self.threshold = nn.Parameter(torch.tensor([float(threshold)]))
        self.log_scale = nn.Parameter(torch.tensor([math.log(scale)]))
        sign = torch.tensor([-0.5, 0.5]) if similar_class == 1 else torch.tensor([0.5, -0.5])
        self.register_buffer("sign", sign)

    def forward(self, cosines: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * (cosines - self.threshold) * self.sign


def fitted_threshold(cosines: torch.Tensor, labels: torch.Tensor) -> tuple[int, float]:
    """``(similar_class, threshold)`` of the best threshold classifier of two-class ``labels`` from
    ``cosines``: the similar class is the one with the larger mean cosine, the threshold the midpoint
    between consecutive sorted cosines where the most examples fall on their class's side (the lowest
    such midpoint when several tie). Deterministic; draws nothing."""
    cosines, labels = cosines.double().reshape(-1), labels.long().reshape(-1)
    means = [cosines[labels == c].mean() if bool((labels == c).any()) else -math.inf for c in (0, 1)]
    similar = int(means[1] >= means[0])
    order = torch.sort(cosines, stable=True).indices
    sorted_cos, is_similar = cosines[order], (labels[order] == similar).double()
    # cutting after position k: rows 0..k predicted dissimilar, the rest similar
    correct_below = torch.cumsum(1 - is_similar, 0)
    correct_above = is_similar.sum() - torch.cumsum(is_similar, 0)
    correct = torch.cat([is_similar.sum().reshape(1), correct_below + correct_above])
    cuts = torch.cat([sorted_cos[:1] - 1e-6, (sorted_cos[:-1] + sorted_cos[1:]) / 2, sorted_cos[-1:] + 1e-6])
    return similar, float(cuts[int(torch.argmax(correct))])


class BiEncoderPairModel(nn.Module):
    """A pair model of one shared encoder: ``u = pool(encoder(a))``, ``v = pool(encoder(b))`` (one
    encoder call over the ``2N`` texts), the head's input :meth:`pool` (the cosine, or the features
    ``[u, v, |u - v|(, u * v)]``) and ``logits = head(pool(...))``. Takes the batch keys of
    :class:`gradkit.train.tokenize.BiTokenized` (``input_ids`` ... for the first texts, ``pair_input_ids``
    ... for the second) and returns a ``SequenceClassifierOutput`` with ``.loss`` when labels are given.

    ``loss``: ``"mse"`` (regression, squared error of the prediction), ``"cosent"`` (regression,
    :func:`cosent_loss` on the cosines; a loss of the whole batch, so :attr:`batch_loss` is True and
    a batch is not cut into length-sorted parts) or ``"cross_entropy"`` (classification)."""

    # how its data are tokenised (read by gradkit.train.evaluate.evaluate_texts, through PEFT's wrapper too)
    pair_encoding = "bi"

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        pooling: Pooling,
        *,
        task: str = "classification",
        loss: str = "cross_entropy",
        features: str = "diff",
        head: str = "linear",
    ):
        super().__init__()
        self.encoder, self.pooling, self.task, self.loss = encoder, pooling, task, loss
        self.features, self.head_kind = features, head
        self.num_labels = 1 if task == "regression" else num_labels
        self.batch_loss = loss == "cosent"
        hidden = encoder.config.hidden_size
        self.head: nn.Module
        if task == "regression":
            self.head = CosineRegressionHead()
        elif head == "similarity":
            self.head = SimilarityHead()
        else:
            self.head = nn.Linear(hidden * (4 if features == "diff-product" else 3), num_labels)

    def embed(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        """One embedding per text, with the folder's pooling (and normalisation)."""
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = pool_tokens(hidden, attention_mask, self.pooling.mode)
        return nn.functional.normalize(pooled, dim=-1) if self.pooling.normalize else pooled

    def pair_embeddings(self, **batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(u, v)``: both texts of every pair through the encoder in one call (each row padded on the
        right to the longer of the two widths; the attention mask keeps the padding out)."""
        first = {k: v for k, v in batch.items() if not k.startswith("pair_") and k != "labels"}
        second = {k[len("pair_") :]: v for k, v in batch.items() if k.startswith("pair_")}
        width = max(first["input_ids"].shape[1], second["input_ids"].shape[1])
        stacked = {
            key: torch.cat([_pad_to(first[key], width), _pad_to(second[key], width)])
            for key in first
            if key in second
        }
        embeddings = self.embed(**stacked)
        n = first["input_ids"].shape[0]
        return embeddings[:n], embeddings[n:]

    def pool(self, **batch: torch.Tensor) -> torch.Tensor:
        """The head's input: ``cos(u, v)`` as ``(N, 1)`` for the regression and similarity heads, else
        ``[u, v, |u - v|]`` (and ``u * v`` with ``features="diff-product"``)."""
        u, v = self.pair_embeddings(**batch)
        if self.task == "regression" or self.head_kind == "similarity":
            return nn.functional.cosine_similarity(u.float(), v.float(), dim=-1).unsqueeze(-1)
        parts = [u, v, (u - v).abs()] + ([u * v] if self.features == "diff-product" else [])
        return torch.cat(parts, dim=-1)

    def loss_of(self, logits: torch.Tensor, labels: torch.Tensor, pooled: torch.Tensor | None = None):
        """The loss of the head's output; CoSENT reads the cosines (``pooled``) themselves."""
        if self.loss == "cosent":
            if pooled is None:
                raise GradkitError("CoSENT ranks the cosines: pass the head's input as pooled")
            # the head's output joins with weight 0: CoSENT does not read it, and DDP needs every trainable
            # parameter in the backward (a zero gradient leaves AdamW's step of the head at 0)
            return cosent_loss(pooled, labels) + 0.0 * logits.sum()
        if self.task == "regression":
            return nn.functional.mse_loss(logits.float().squeeze(-1), labels.float())
        return nn.functional.cross_entropy(logits.float(), labels)

    def forward(self, labels=None, **batch):
        from transformers.modeling_outputs import SequenceClassifierOutput

        pooled = self.pool(**batch)
        logits = self.head(pooled)
        loss = self.loss_of(logits, labels, pooled) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _pad_to(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` ``(N, L)`` padded on the right with zeros to ``(N, width)`` (masked positions)."""
    return nn.functional.pad(values, (0, width - values.shape[1])) if values.shape[1] < width else values


def label_range(labels: Any) -> tuple[float, float]:
    """``(lo, hi)`` of the training labels: the range the regression head maps cos(u, v) in [0, 1] to."""
    values = [float(v) for v in labels]
    low, high = min(values), max(values)
    return (low, high) if high > low else (low, low + 1.0)


def load_bi_encoder(
    path: str,
    num_labels: int,
    setup: PairSetup,
    *,
    task: str = "classification",
    features: str = "diff",
    head: str = "random",
    labels: Any = None,
    seed: int = 0,
) -> BiEncoderPairModel:
    """A :class:`BiEncoderPairModel` on the encoder in ``path`` (loaded as
    :func:`gradkit.train.model.load_encoder` loads it). Regression: the head maps cos(u, v) onto the
    range of ``labels`` (:func:`label_range`). Classification: ``head="similarity"`` gives a
    :class:`SimilarityHead` to fit (:func:`fit_similarity_head`), else a linear head on the pair
    features, N(0, 0.02^2) with zero bias from a private generator seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear's default init draws
        model = BiEncoderPairModel(
            load_encoder(path),
            num_labels,
            setup.pooling or Pooling("mean", False, "mean pooling"),
            task=task,
            loss=setup.loss or "cross_entropy",
            features=features,
            head="similarity" if head == "similarity" else "linear",
        )
    if task == "regression":
        low, high = label_range(labels if labels is not None else [0.0, 1.0])
        model.head = CosineRegressionHead(low, high)
    elif isinstance(model.head, nn.Linear):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator) * 0.02)
            model.head.bias.zero_()
    return model


@torch.no_grad()
def fit_similarity_head(
    model: BiEncoderPairModel, batch: dict[str, torch.Tensor], batch_size: int = 128, device: Any = "cpu"
) -> dict[str, float]:
    """Give ``model`` a :class:`SimilarityHead` whose class and threshold are fitted
    (:func:`fitted_threshold`) on ``batch`` (the training file's first rows), its cosines computed in
    eval mode, ``batch_size`` rows at a time; returns what was fitted, for the summary."""
    was_training = model.training
    model.eval()
    labels = batch["labels"]
    chunks = []
    for start in range(0, len(labels), batch_size):
        rows = {k: v[start : start + batch_size].to(device) for k, v in batch.items() if k != "labels"}
        chunks.append(model.pool(**rows).squeeze(-1).double().cpu())
    model.train(was_training)
    cosines = torch.cat(chunks)
    similar, threshold = fitted_threshold(cosines, labels)
    model.head = SimilarityHead(similar, threshold).to(device)
    predicted = (cosines > threshold).long()
    accuracy = float((predicted == (labels == similar).long()).double().mean())
    return {"similar_class": similar, "threshold": threshold, "rows": len(labels), "fit_accuracy": accuracy}
