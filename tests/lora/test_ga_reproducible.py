"""LoRA-GA's init gives the same bytes under every numerical mode of the CPU that leaves its gradient
unchanged: each case runs in a fresh process (``ATEN_CPU_CAPABILITY`` and ``MKL_CBWR`` are read once,
when torch and MKL load). The factorisation alone (:func:`gradkit.linalg.truncated_svd`) is checked
under every mode from one fixed gradient; the whole init under the modes that give the model the same
gradient bits (docs/lora_ga.md, "Reproducibility": which settings must match, and why)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import peft_lora

from gradkit.linalg import EXACT_SVD_MAX_DIM, canonical_signs, cpu_model, truncated_svd
from gradkit.lora.ga import RECORD, lora_ga_init
from gradkit.lora.pairs import lora_pairs

TESTS = Path(__file__).resolve().parents[1]

# the truncated SVD of each saved gradient (the exact and the randomized path), as sha256 of its bytes
FACTORISE = """
import hashlib, json, sys, torch
from gradkit.linalg import truncated_svd
digest = hashlib.sha256()
for G in torch.load(sys.argv[1]):
    for t in truncated_svd(G, 8):
        digest.update(t.contiguous().numpy().tobytes())
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability(), "svd": digest.hexdigest()}))
"""

# the gradient LoRA-GA estimates and the (A0, B0) it writes on the tiny BERT, as sha256 of their bytes
INIT = """
import hashlib, json, sys, torch
sys.path.insert(0, sys.argv[2])
from helpers import peft_lora
from gradkit.lora.estimate import estimate_gradients
from gradkit.lora.ga import RECORD, lora_ga_init
from gradkit.lora.pairs import lora_pairs
from gradkit.train.model import load_classifier

def digest(tensors):
    d = hashlib.sha256()
    for t in tensors:
        d.update(t.detach().contiguous().numpy().tobytes())
    return d.hexdigest()

gen = torch.Generator().manual_seed(0)
batches = [{"input_ids": torch.randint(1000, 2000, (4, 12), generator=gen),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=gen)} for _ in range(2)]
model = peft_lora(load_classifier(sys.argv[1], num_labels=2, seed=0))
pairs = lora_pairs(model)
G, _ = estimate_gradients(model, batches, pairs, progress=False)
gradient = digest(G[p.name] for p in pairs)
model = peft_lora(load_classifier(sys.argv[1], num_labels=2, seed=0))
lora_ga_init(model, batches, progress=False)
factors = digest(t for p in lora_pairs(model) for t in p.layer.__dict__[RECORD][p.adapter])
print(json.dumps({"gradient": gradient, "factors": factors}))
"""


def _run(script: str, args: list[str], capability: str, cbwr: str | None) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1"}
    env.pop("MKL_CBWR", None)
    if cbwr is not None:
        env["MKL_CBWR"] = cbwr
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_canonical_signs_make_the_largest_entry_of_each_u_positive_and_keep_the_product():
    gen = torch.Generator().manual_seed(0)
    U, S, Vh = torch.linalg.svd(torch.randn(12, 7, generator=gen, dtype=torch.float64), full_matrices=False)
    flips = torch.tensor([1.0, -1, -1, 1, -1, 1, 1], dtype=torch.float64)
    for signs in (torch.ones(7, dtype=torch.float64), flips):  # two equally valid SVDs give one result
        Uc, Vhc = canonical_signs(U * signs, Vh * signs.unsqueeze(1))
        assert torch.equal(Uc, canonical_signs(U, Vh)[0]) and torch.equal(Vhc, canonical_signs(U, Vh)[1])
        assert (Uc.gather(0, Uc.abs().argmax(0, keepdim=True)) > 0).all()
        torch.testing.assert_close((Uc * S) @ Vhc, (U * S) @ Vh, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(40, 24), (EXACT_SVD_MAX_DIM + 40, EXACT_SVD_MAX_DIM + 72)])
def test_truncated_svd_returns_canonical_signs_and_is_continuous_in_g(shape):
    """Exact and randomized path: each u's largest entry is positive (LAPACK's own signs differ between
    MKL's code paths, and LoRA-GA uses u_i and v_j apart), and a perturbation at rounding level moves
    the factors at rounding level."""
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(*shape, generator=gen) * 0.9 ** torch.arange(shape[1], dtype=torch.float32)
    U, S, Vh = truncated_svd(G, 6)
    assert (U.gather(0, U.abs().argmax(0, keepdim=True)) > 0).all()
    assert (S[:-1] >= S[1:]).all()
    nudged = G * (1 + 1e-7 * torch.randn(*shape, generator=gen))
    for a, b in zip((U, S, Vh), truncated_svd(nudged, 6), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_the_factorisation_gives_the_same_bytes_under_every_cpu_mode(tmp_path):
    """One saved gradient, factorised (exact and randomized path) in fresh processes under each ATen
    capability and MKL code path: the bytes agree."""
    gen = torch.Generator().manual_seed(1)
    path = tmp_path / "gradients.pt"
    wide = EXACT_SVD_MAX_DIM + 200
    torch.save(
        [torch.randn(48, 96, generator=gen), torch.randn(EXACT_SVD_MAX_DIM + 32, wide, generator=gen)], path
    )
    modes = [("default", "COMPATIBLE"), ("avx2", "AVX2"), ("avx512", None)]  # each ATen and MKL path
    results = [_run(FACTORISE, [str(path)], cap, cbwr) for cap, cbwr in modes]
    assert len({r["svd"] for r in results}) == 1, list(zip(modes, results, strict=True))


def test_lora_ga_init_gives_the_same_bytes_under_every_mkl_path_that_keeps_the_gradient(tiny_model_dir):
    """The whole init in fresh processes: MKL's native path (unset) and MKL_CBWR=AVX2 give the model the
    same gradient bits, and then the same (A0, B0) bytes. MKL_CBWR=COMPATIBLE changes the gradient's
    matmuls themselves (so the factors differ by rounding): the mode must match, as the docs say."""
    args = [str(tiny_model_dir), str(TESTS)]
    native, avx2 = (_run(INIT, args, "avx2", cbwr) for cbwr in (None, "AVX2"))
    assert native["gradient"] == avx2["gradient"]
    assert native["factors"] == avx2["factors"]


def test_summary_records_the_cpu_and_the_numerical_mode(tmp_path, tiny_model_dir):
    """summary.json names what decides the bits beside the thread count: the CPU model, the capability
    ATen runs (here lowered to AVX2), MKL's code path and the factorisation mode."""
    rows = "".join(f"{'good fine film' if i % 2 else 'bad dull plot'} {i}\t{i % 2}\n" for i in range(16))
    for name in ("tr.tsv", "te.tsv"):
        (tmp_path / name).write_text("sentence\tlabel\n" + rows)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
    args = [
        "--train",
        "tr.tsv",
        "--test",
        "te.tsv",
        "--steps",
        "1",
        "--batch-size",
        "4",
        "--max-length",
        "16",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "gradkit", "finetune", "--method", "lora-ga", "--model", str(tiny_model_dir)]
        + [*args, "--ga-batches", "1", "--out", "run"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cpu_capability"] == "AVX2" and summary["mkl_cbwr"] == "AVX2"
    assert summary["cpu_model"] == cpu_model() and summary["cpu_model"]
    assert summary["factorisation_mode"] == "float64, canonical signs"
    assert summary["torch_threads"] >= 1


@pytest.mark.parametrize("estimator", ["exact", "sketch"])
def test_every_estimator_writes_factors_with_canonical_signs(tiny_classifier, estimator):
    """B0 = c U[:, r:2r] (c > 0): each column's largest-magnitude entry is positive, whatever sign LAPACK
    gave, for the exact SVD and for the sketches alike."""
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, 2000, (4, 12), generator=gen),
            "attention_mask": torch.ones(4, 12, dtype=torch.long),
            "labels": torch.randint(0, 2, (4,), generator=gen),
        }
        for _ in range(2)
    ]
    model = peft_lora(tiny_classifier)
    lora_ga_init(model, batches, estimator=estimator, progress=False)
    for pair in lora_pairs(model):
        B0 = pair.layer.__dict__[RECORD][pair.adapter][1]
        assert (B0.gather(0, B0.abs().argmax(0, keepdim=True)) > 0).all(), pair.name
