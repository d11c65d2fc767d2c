"""The model side of ``--task causal-lm``: any local ``AutoModelForCausalLM`` folder, checked to be a
decoder, and the loss per token and perplexity its evaluation reports.

Labels follow Hugging Face's causal-LM convention (:func:`gradkit.train.tokenize.tokenize_causal`):
``labels`` has the shape of ``input_ids``, the model shifts them (position t's logits predict the token
at t + 1) and ignores ``IGNORE_INDEX``. Prompt positions, padding and position 0 (which nothing
predicts) carry it, so the loss of a batch is

    L = (1 / T) * sum over response positions t of -log p(x_t | x_<t),    T = number of such positions,

the mean cross-entropy over the batch's response tokens (every token of plain texts). A batch cut into
parts (:func:`gradkit.train.batching.split_batch`) weighs each part by its share ``T_c / T`` of those
tokens, so ``sum_c (T_c / T) L_c = L`` exactly, and so is the gradient.
"""

from __future__ import annotations

import math

import torch

from gradkit.errors import GradkitError
from gradkit.train.model import check_model_dir, quiet_transformers
from gradkit.train.tokenize import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(sum of -log p(label), count)`` over the shifted labelled positions, the sum in fp32 from
    fp32 logits: position t's logits score the label at t + 1."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return nll, int((shift_labels != IGNORE_INDEX).sum())


def perplexity(loss: float) -> float:
    """``exp(loss)``, the perplexity of a mean per-token cross-entropy (inf past float range)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def load_causal_lm(path: str | None):
    """A local ``AutoModelForCausalLM`` folder (Llama-, Qwen-, GPT-2-style), in fp32 whatever dtype it
    was saved in (the master weights; ``--precision bf16`` autocasts the computation). Draws leave the
    global RNG as it was."""
    from transformers import AutoModelForCausalLM

    if path is None:
        raise GradkitError(
            "--task causal-lm needs --model PATH, a local causal language model folder (Llama, Qwen, "
            "GPT-2...); the bundled MiniLM is an encoder"
        )
    check_model_dir(path)
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except ValueError as err:
            raise GradkitError(
                f"{path} is not a causal language model AutoModelForCausalLM can load "
                f"({str(err).splitlines()[0][:160]}); pass a decoder folder (Llama, Qwen, GPT-2...)"
            ) from None
        except OSError as err:
            raise GradkitError(f"cannot load a model from {path}: {str(err).splitlines()[0]}") from None
    if not is_causal(model):
        raise GradkitError(
            f"{path} is not a causal language model: its outputs at a position depend on later tokens "
            f"({type(model).__name__} attends both ways); pass a decoder folder (Llama, Qwen, GPT-2...)"
        )
    return model


@torch.no_grad()
def is_causal(model) -> bool:
    """True when the logits at positions 0..2 do not change with the token at position 3 (eval mode): a
    decoder. An encoder loaded as a language model (BERT's ``BertLMHeadModel`` without ``is_decoder``)
    sees the token it is asked to predict, and its loss would mean nothing."""
    was_training = model.training
    model.eval()
    ids = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 1]], device=next(model.parameters()).device)
    logits = model(input_ids=ids).logits[:, :3].float()
    model.train(was_training)
    return bool(torch.allclose(logits[0], logits[1], rtol=1e-4, atol=1e-5))
