"""The three small full-batch problems shared by the dynamics benchmarks, as
``loss_fn(theta) -> scalar`` on a flat float64 vector (the form ``gradkit.dynamics`` takes):

(a) ``quadratic``: L = ½ θᵀAθ, n = 20, eigenvalues log-spaced in [1, 100] (condition number 100).
(b) ``logistic``: L2-regularised (λ = 1e-3) logistic regression on frozen all-MiniLM-L6-v2 sentence
    embeddings (mean-pooled, L2-normalised, 384-d plus a bias) of 2,000 SST-2 training sentences
    (the first 2,000 of a seeded shuffle), cached in benchmarks/runs/dynamics/ after the first run.
(c) ``mlp``: a 384-32-2 tanh MLP (12.4 k parameters) on 500 of those embeddings, cross-entropy.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / "runs" / "dynamics"
SST2 = ROOT / "data" / "sst2" / "train.tsv"


def sst2_embeddings(n: int = 2000) -> tuple[torch.Tensor, torch.Tensor]:
    path = CACHE / f"sst2_minilm_{n}.pt"
    if path.exists():
        data = torch.load(path)
        return data["x"], data["y"]
    from transformers import AutoModel, AutoTokenizer

    from gradkit.train.model import default_model_path

    rows = [line.rstrip("\n").split("\t") for line in SST2.read_text().splitlines()[1:]]
    random.Random(0).shuffle(rows)
    rows = rows[:n]
    folder = default_model_path()
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    feats = []
    with torch.no_grad():
        for i in range(0, n, 64):
            batch = tok(
                [r[0] for r in rows[i : i + 64]],
                padding=True,
                truncation=True,
                max_length=64,
                return_tensors="pt",
            )
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            feats.append(F.normalize((h * m).sum(1) / m.sum(1), dim=1))
    x = torch.cat(feats).to(torch.float64)
    y = torch.tensor([int(r[1]) for r in rows])
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save({"x": x, "y": y}, path)
    return x, y


def quadratic(seed: int = 0, n: int = 20, cond: float = 100.0):
    """(loss_fn, theta0); theta0 is drawn with ``seed``, A is the same for every seed."""
    gen = torch.Generator().manual_seed(1234)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (q * torch.logspace(0, math.log10(cond), n, dtype=torch.float64)) @ q.T
    a = (a + a.T) / 2
    theta0 = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (lambda th: 0.5 * th @ (a @ th)), theta0


def logistic(seed: int = 0, reg: float = 1e-3):
    x, y = sst2_embeddings()
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)
    yf = y.to(x.dtype)

    def loss_fn(th):
        return F.binary_cross_entropy_with_logits(xb @ th, yf) + 0.5 * reg * (th @ th)

    theta0 = 0.1 * torch.randn(xb.shape[1], generator=torch.Generator().manual_seed(seed), dtype=x.dtype)
    return loss_fn, theta0


def mlp(seed: int = 0, n: int = 500, hidden: int = 32):
    x, y = sst2_embeddings()
    x, y = x[:n], y[:n]
    d = x.shape[1]
    sizes = [hidden * d, hidden, 2 * hidden, 2]
    gen = torch.Generator().manual_seed(seed)
    w1 = torch.randn(hidden, d, generator=gen, dtype=x.dtype) / math.sqrt(d) * 3  # normalised inputs: |x| = 1
    w2 = torch.randn(2, hidden, generator=gen, dtype=x.dtype) / math.sqrt(hidden)
    theta0 = torch.cat(
        [w1.reshape(-1), torch.zeros(hidden, dtype=x.dtype), w2.reshape(-1), torch.zeros(2, dtype=x.dtype)]
    )

    def loss_fn(th):
        a, b, c, e = torch.split(th, sizes)
        h = torch.tanh(x @ a.view(hidden, d).T + b)
        return F.cross_entropy(h @ c.view(2, hidden).T + e, y)

    return loss_fn, theta0


PROBLEMS = {"quadratic": quadratic, "logistic": logistic, "mlp": mlp}
