"""A toy causal transformer, readable top to bottom (nanoGPT-style), for init and depth experiments.

``toy_transformer(vocab, d_model, n_layers, n_heads, norm="post" | "pre")`` builds a character-LM
friendly decoder: token and learned position embeddings, ``n_layers`` blocks in ``model.blocks``
(an ``nn.ModuleList``), and a linear head (tied to the token embedding by default);
``model(ids)`` maps int64 ids (batch, time) to logits (batch, time, vocab).

A block is two residual sub-layers, attention then MLP, each with its own LayerNorm:

- ``norm="post"`` (the original transformer, BERT): ``x = ln(x + F(x))``;
- ``norm="pre"`` (GPT-2 and most models since): ``x = x + F(ln(x))``, with a final LayerNorm
  ``ln_f`` before the head (``nn.Identity`` for Post-LN, whose blocks already end in a norm).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from gradkit.errors import GradkitError
from gradkit.init import bert_init_


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # position i sees 0..i only
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One residual block: attention then MLP, the LayerNorms placed by ``norm`` ("post" or "pre")."""

    def __init__(self, d_model: int, n_heads: int, norm: str):
        super().__init__()
        self.norm = norm
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm == "pre":
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.mlp(x))


class ToyTransformer(nn.Module):
    """Causal LM: ``forward(ids) -> logits``. Built by :func:`toy_transformer`."""

    def __init__(
        self,
        vocab: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        norm: str,
        tie_embeddings: bool,
        max_len: int,
    ):
        super().__init__()
        self.norm, self.max_len = norm, max_len
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads, norm) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(d_model, vocab, bias=False)
        if tie_embeddings:
            self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] > self.max_len:
            raise GradkitError(
                f"toy transformer takes ids of shape (batch, time) with time <= max_len={self.max_len}, "
                f"got {tuple(ids.shape)}; crop the sequence or build the model with a larger max_len"
            )
        pos = torch.arange(ids.shape[1], device=ids.device)
        x = self.wte(ids) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def toy_transformer(
    vocab: int,
    d_model: int,
    n_layers: int,
    n_heads: int,
    norm: str = "post",
    init_std: float = 0.02,
    tie_embeddings: bool = True,
    max_len: int = 256,
    generator: torch.Generator | None = None,
) -> ToyTransformer:
    """A small causal transformer, Post-LN (``norm="post"``) or Pre-LN (``norm="pre"``).

    Initialised by :func:`gradkit.init.bert_init_` with real std ``init_std``: every Linear and
    Embedding weight from a normal truncated at ±2σ whose std is ``init_std``, biases 0, LayerNorms
    1 and 0 (as BERT, Devlin et al. 2019). With ``tie_embeddings`` the head's weight is the token
    embedding. ``generator`` (a CPU ``torch.Generator``) makes the init reproducible without touching
    the global RNG; with ``None`` the global RNG is used, as any ``nn.Module`` constructor does.

    >>> model = toy_transformer(vocab=65, d_model=32, n_layers=2, n_heads=4, norm="pre")
    >>> model(torch.zeros(1, 8, dtype=torch.long)).shape
    torch.Size([1, 8, 65])
    """
    for name, value in (("vocab", vocab), ("d_model", d_model), ("n_layers", n_layers), ("n_heads", n_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise GradkitError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise GradkitError(f"max_len must be a positive integer, got {max_len!r}")
    if d_model % n_heads:
        raise GradkitError(
            f"d_model={d_model} is not divisible by n_heads={n_heads}; pick a divisor of d_model"
        )
    if norm not in ("post", "pre"):
        raise GradkitError(f"norm must be 'post' or 'pre', got {norm!r}")
    # nn.Linear and nn.Embedding draw their own init from the global RNG when built: with a generator,
    # that RNG is put back as it was; every parameter is then overwritten by bert_init_ below
    with torch.random.fork_rng(devices=[], enabled=generator is not None):
        model = ToyTransformer(vocab, d_model, n_layers, n_heads, norm, tie_embeddings, max_len)
    bert_init_(model, std=init_std, truncated=True, generator=generator)
    return model
