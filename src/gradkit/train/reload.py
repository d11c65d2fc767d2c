"""Load what a run trained back into a model: the final weights (or ``best/``, ``ema/``) of any method,
onto a freshly loaded base, with the head the run used (a new linear head, a regression head or the
label-text head), so its outputs reproduce the run's."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from gradkit.data import load_label_map
from gradkit.errors import GradkitError
from gradkit.train.bi_encoder import PairSetup, SimilarityHead, bi_pooling, load_bi_encoder
from gradkit.train.causal import load_causal_lm
from gradkit.train.model import LabelTextHead, default_model_path, load_classifier, load_tokenizer

WEIGHTS = ("final", "best", "ema")


def load_trained(run_dir: str | os.PathLike, which: str = "final") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a finished run folder, the model in eval mode.

    The base model is the run's ``config.json`` ``model`` (the bundled MiniLM when it was None), with
    the run's task and head shape (``--task causal-lm``: the ``AutoModelForCausalLM`` itself, no head);
    LoRA-family runs load their ``adapter/`` with plain PEFT
    (``PeftModel.from_pretrained``), other methods their ``trainable.safetensors`` (the tensors they
    trained, by name). ``which``: ``"final"``, ``"best"`` (``--keep-best``) or ``"ema"`` (``--ema``).
    """
    if which not in WEIGHTS:
        raise GradkitError(f"which={which!r} is not one of: {', '.join(WEIGHTS)}")
    run = Path(run_dir)
    if not (run / "config.json").is_file():
        raise GradkitError(f"{run}: no config.json there; pass the folder of a gradkit finetune run")
    cfg = json.loads((run / "config.json").read_text())
    folder = run if which == "final" else run / which
    if not folder.is_dir():
        raise GradkitError(
            f"{run} has no {which}/ weights (the run did not use --{'keep-best' if which == 'best' else which})"
        )
    task = cfg.get("task", "classification")
    names = load_label_map(run / "labels.json") if task == "classification" else []
    if task == "causal-lm":  # the plain AutoModelForCausalLM, fp32; a LoRA adapter goes on it with PEFT
        model = load_causal_lm(cfg["model"])
    elif cfg.get("pair_encoding") == "bi":
        model = _bi_encoder(run, cfg, max(len(names), 1))
    else:
        model = load_classifier(cfg["model"], max(len(names), 1), pooling=cfg["pooling"], task=task)
    if cfg.get("head_init") == "labels":
        # the shape alone: the trained class vectors, bias and scale come from the saved weights
        model.head = LabelTextHead(torch.zeros(len(names), model.encoder.config.hidden_size))
    if (folder / "adapter" / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder / "adapter"))
    elif (folder / "trainable.safetensors").is_file():
        from safetensors.torch import load_file

        tensors = load_file(str(folder / "trainable.safetensors"))
        own = dict(model.named_parameters())
        unknown = [k for k in tensors if k not in own]
        if unknown:
            raise GradkitError(
                f"{folder}/trainable.safetensors holds {unknown[0]!r}, which the model has not"
            )
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)
    else:
        raise GradkitError(f"{folder}: no adapter/ and no trainable.safetensors; the run did not finish")
    model.eval()
    return model, load_tokenizer(cfg["model"])


def _bi_encoder(run: Path, cfg: dict[str, Any], num_labels: int) -> Any:
    """The run's bi-encoder pair model, its head in the trained shape (the similarity head's class of
    similar pairs from summary.json; every trained value comes from the saved weights)."""
    path = cfg["model"] or default_model_path()
    setup = PairSetup("bi", "the run's", bi_pooling(path, cfg["pooling"]), cfg.get("pair_loss"))
    model = load_bi_encoder(
        path, num_labels, setup, task=cfg["task"], features=cfg["pair_features"], head=cfg["head_init"]
    )
    if cfg["head_init"] == "similarity":
        summary = json.loads((run / "summary.json").read_text())
        model.head = SimilarityHead(summary["pair_encoding"]["similarity_head"]["similar_class"])
    return model
