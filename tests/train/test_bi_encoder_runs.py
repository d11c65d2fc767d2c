"""Bi-encoder sentence pairs (``--pair-encoding bi``) in whole runs: step 0 on the real all-MiniLM-L6-v2
equals sentence-transformers' own scores (STS-B Pearson of cos(u, v); RTE's fitted threshold classifier),
a LoRA run reloads (``load_trained``) to its test metrics and its ``encoder_adapter/`` loads into a plain
``SentenceTransformer`` with the same embeddings; on the tiny BERT a stopped run resumes to the same
bytes, and the zeroth-order and policy-gradient methods train the pair model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gradkit.cli import main
from gradkit.data import load_label_map, load_text_classification
from gradkit.train.bi_encoder import fitted_threshold
from gradkit.train.config import TrainConfig
from gradkit.train.evaluate import evaluate_texts
from gradkit.train.loop import finetune, resume
from gradkit.train.model import default_model_path
from gradkit.train.reload import load_trained

DATA = Path(__file__).resolve().parents[2] / "data"
# tokens per text in the real-model runs, and sentence-transformers' max_seq_length in the references
MAX_LENGTH = 64


def head_of(path: Path, rows: int, out: Path) -> Path:
    """The first ``rows`` examples of a real data file, with its header line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[: rows + 1]) + "\n", encoding="utf-8")
    return out


def read_pairs(path: Path, first: str, second: str, label: str) -> tuple[list[str], list[str], list[str]]:
    """The two texts and the label of every row, read here from the tab-separated file (not through
    gradkit's loader: the references below are independent of gradkit)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split("\t")
    rows = [line.split("\t") for line in lines[1:]]
    columns = [header.index(name) for name in (first, second, label)]
    return tuple([row[c] for row in rows] for c in columns)  # type: ignore[return-value]


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def sentence_transformer(adapter: Path | None = None):
    """The bundled MiniLM as sentence-transformers loads it (its own modules.json, pooling and
    normalisation), with ``max_seq_length`` set to the run's --max-length."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_model_path(), device="cpu")
    st.max_seq_length = MAX_LENGTH
    if adapter is not None:
        st.load_adapter(str(adapter))
    return st


def st_cosines(st, first: list[str], second: list[str]) -> torch.Tensor:
    u = st.encode(first, batch_size=64, convert_to_tensor=True)
    v = st.encode(second, batch_size=64, convert_to_tensor=True)
    return torch.nn.functional.cosine_similarity(u.double(), v.double(), dim=-1)


def finetune_cli(argv: list[str]) -> dict:
    """``gradkit finetune ARGV`` in this process; the run's summary.json."""
    assert main(["finetune", *argv]) == 0
    out = Path(argv[argv.index("--out") + 1])
    return json.loads((out / "summary.json").read_text())


# --- the real model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def st():
    """The plain SentenceTransformer, shared by the module's references (no adapter ever goes on it)."""
    return sentence_transformer()


@pytest.fixture(scope="module")
def stsb_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A 2-step bi LoRA run on STS-B (the default pair encoding of a sentence-transformers folder),
    tested on the first 200 pairs of the dev file: (run folder, test file, summary)."""
    root = tmp_path_factory.mktemp("bi-stsb")
    train = head_of(DATA / "stsb" / "train.tsv", 48, root / "train.tsv")
    test = head_of(DATA / "stsb" / "dev.tsv", 200, root / "test.tsv")
    run = root / "run"
    argv = ["--method", "lora", "--task", "regression", "--train", str(train), "--test", str(test)]
    argv += ["--steps", "2", "--batch-size", "8", "--lr", "2e-3", "--max-length", str(MAX_LENGTH)]
    return run, test, finetune_cli([*argv, "--out", str(run)])


@pytest.mark.integration
def test_stsb_step0_is_sentence_transformers_cosine_pearson(stsb_run, st):
    """step 0 of a bi run is the zero-shot score of the model as its users run it: the Pearson of
    sentence-transformers' cos(encode(s1), encode(s2)) with the STS-B scores."""
    _, test, summary = stsb_run
    assert summary["pair_encoding"]["encoding"] == "bi"
    assert summary["pair_encoding"]["pooling"] == {"mode": "mean", "normalize": True}
    assert "sentence-transformers" in summary["pair_encoding"]["reason"]
    first, second, scores = read_pairs(test, "sentence1", "sentence2", "score")
    assert len(first) == 200 and summary["test_examples"] == 200
    reference = pearson(st_cosines(st, first, second), torch.tensor([float(s) for s in scores]))
    assert reference > 0.8  # the zero-shot model is good on STS-B (0.8696 on the whole dev set)
    assert abs(summary["step0"]["test_pearson"] - reference) < 1e-4, (summary["step0"], reference)


@pytest.mark.integration
def test_stsb_lora_run_reloads_to_its_metrics_and_its_encoder_adapter_into_sentence_transformers(
    stsb_run, st
):

    run, test, summary = stsb_run
    model, tokenizer = load_trained(run)
    data = load_text_classification(str(test), task="regression")
    # as docs/tasks.md scores a reloaded run: evaluate_texts tokenises each text of a pair on its own
    again = evaluate_texts(model, data, tokenizer, MAX_LENGTH)
    assert again["test_pearson"] == pytest.approx(summary["test_pearson"], abs=1e-6)
    assert again["test_spearman"] == pytest.approx(summary["test_spearman"], abs=1e-6)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)

    # the encoder's LoRA alone, attached to a plain SentenceTransformer through PEFT: the same embeddings
    first, second, _ = read_pairs(test, "sentence1", "sentence2", "score")
    texts = first[:8] + second[:8]
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    with torch.no_grad():
        ours = model.base_model.model.embed(**tokens)
    adapted = sentence_transformer(adapter=run / "encoder_adapter").encode(texts, convert_to_tensor=True)
    plain = st.encode(texts, convert_to_tensor=True)
    assert (ours - adapted).abs().max().item() < 1e-5
    assert (ours - plain).abs().max().item() > 1e-4  # the adapter changed the embeddings


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory) -> tuple[Path, Path, Path, dict]:
    """A 2-step bi LoRA run on RTE with the similarity head: (run, train file, test file, summary)."""
    root = tmp_path_factory.mktemp("bi-rte")
    train = head_of(DATA / "rte" / "train.tsv", 64, root / "train.tsv")
    test = head_of(DATA / "rte" / "dev.tsv", 48, root / "test.tsv")
    run = root / "run"
    argv = ["--method", "lora", "--head-init", "similarity", "--train", str(train), "--test", str(test)]
    argv += ["--steps", "2", "--batch-size", "8", "--max-length", str(MAX_LENGTH), "--out", str(run)]
    return run, train, test, finetune_cli(argv)


@pytest.mark.integration
def test_rte_similarity_head_step0_is_the_fitted_threshold_classifier(rte_run, st):
    """The threshold fitted on the training file's first rows (all 64 here) is the best cut of
    sentence-transformers' cosines there, and step 0 on the test file is that cut's accuracy."""

    run, train, test, summary = rte_run
    fit = summary["pair_encoding"]["similarity_head"]
    names = json.loads((run / "labels.json").read_text())["label_names"]
    first, second, labels = read_pairs(train, "sentence1", "sentence2", "label")
    train_ids = torch.tensor([names.index(name) for name in labels])
    similar, threshold = fitted_threshold(st_cosines(st, first, second), train_ids)
    assert fit["rows"] == 64 and fit["similar_class"] == similar
    assert fit["threshold"] == pytest.approx(threshold, abs=1e-5)

    first, second, labels = read_pairs(test, "sentence1", "sentence2", "label")
    test_ids = torch.tensor([names.index(name) for name in labels])
    predicted_similar = st_cosines(st, first, second) > fit["threshold"]
    accuracy = float((predicted_similar == (test_ids == fit["similar_class"])).double().mean())
    assert summary["step0"]["test_accuracy"] == pytest.approx(accuracy, abs=1e-6)  # summary: float32


@pytest.mark.integration
def test_rte_similarity_run_reloads_to_its_test_accuracy(rte_run):

    run, _, test, summary = rte_run
    model, tokenizer = load_trained(run)
    data = load_text_classification(str(test), label_names=load_label_map(run / "labels.json"))
    again = evaluate_texts(model, data, tokenizer, MAX_LENGTH)
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], abs=1e-6)


# --- the tiny BERT (not a sentence-transformers folder: --pair-encoding bi is explicit) -----------------


@pytest.fixture
def tiny_pairs(tmp_path) -> dict[str, Path]:
    return {
        "stsb_train": head_of(DATA / "stsb" / "train.tsv", 48, tmp_path / "stsb_train.tsv"),
        "stsb_test": head_of(DATA / "stsb" / "dev.tsv", 16, tmp_path / "stsb_test.tsv"),
        "rte_train": head_of(DATA / "rte" / "train.tsv", 48, tmp_path / "rte_train.tsv"),
        "rte_test": head_of(DATA / "rte" / "dev.tsv", 16, tmp_path / "rte_test.tsv"),
    }


def tiny_bi(tiny_model_dir, files: dict[str, Path], out: Path, shape: str, method: str, **kw) -> TrainConfig:
    """A bi-encoder run on the tiny BERT: ``shape`` ``"cosent"`` or ``"mse"`` (STS-B regression with that
    loss), ``"similarity"`` (RTE, similarity head) or ``"features"`` (RTE, a linear head on
    ``[u, v, |u - v|, u * v]``)."""
    stsb = dict(task="regression", train=str(files["stsb_train"]), test=str(files["stsb_test"]))
    rte = dict(train=str(files["rte_train"]), test=str(files["rte_test"]))
    task = {
        "cosent": dict(pair_loss="cosent", **stsb),
        "mse": dict(pair_loss="mse", **stsb),
        "similarity": dict(head_init="similarity", **rte),
        "features": dict(pair_features="diff-product", **rte),
    }[shape]
    values = dict(
        method=method,
        model=str(tiny_model_dir),
        pair_encoding="bi",
        steps=6,
        batch_size=8,
        max_length=32,
        save_every=2,
        out=str(out),
        **task,
    )
    values.update(kw)
    return TrainConfig(**values)


def saved_bytes(run: Path) -> dict[str, bytes]:
    """Every weight file the run saved (final, EMA, best, encoder adapter), by path in the run folder."""
    files = sorted(p for p in run.rglob("*.safetensors") if "checkpoints" not in p.parts)
    return {str(p.relative_to(run)): p.read_bytes() for p in files}


RESUMED = {
    ("cosent", "full"): {},
    ("cosent", "lora"): {"ema": 0.9, "dev_fraction": 0.25, "eval_every": 2, "keep_best": True},
    ("similarity", "lora-pro"): {},
    ("similarity", "lora-ga"): {"options": {"ga_batches": 2}},
    ("features", "lora"): {},
    ("mse", "lora-pro"): {},
}


@pytest.mark.parametrize(("shape", "method"), sorted(RESUMED))
def test_a_stopped_bi_run_resumes_bit_identical(tiny_model_dir, tmp_path, tiny_pairs, shape, method):
    extra = RESUMED[(shape, method)]
    through = finetune(
        tiny_bi(tiny_model_dir, tiny_pairs, tmp_path / "through", shape, method, **extra), progress=False
    )
    stopped = tiny_bi(tiny_model_dir, tiny_pairs, tmp_path / "stopped", shape, method, **extra)
    assert finetune(stopped, progress=False, stop_after=3)["checkpoint_step"] == 2
    again = resume(tmp_path / "stopped", progress=False)
    assert again["resumed_from_step"] == 2
    assert again["pair_encoding"] == through["pair_encoding"]
    assert again["pair_encoding"]["encoding"] == "bi"
    want = saved_bytes(tmp_path / "through")
    assert saved_bytes(tmp_path / "stopped") == want
    if method.startswith("lora"):
        assert "encoder_adapter/adapter_model.safetensors" in want
    rows = [
        [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        for run in (tmp_path / "stopped", tmp_path / "through")
    ]
    assert rows[0] == rows[1] and len([r for r in rows[0] if "loss" in r]) == 6
    for key in ("final_train_loss", "test_loss", "test_pearson", "test_accuracy", "ema", "best"):
        assert again.get(key) == through.get(key), key

    # the run reloads (load_trained) and scores its test file as the summary says
    model, tokenizer = load_trained(tmp_path / "through")
    task = "regression" if shape in ("cosent", "mse") else "classification"
    names = load_label_map(tmp_path / "through" / "labels.json") if task == "classification" else None
    test = tiny_pairs["stsb_test" if shape in ("cosent", "mse") else "rte_test"]
    scored = evaluate_texts(
        model, load_text_classification(str(test), task=task, label_names=names), tokenizer, 32
    )
    metric = "test_pearson" if shape in ("cosent", "mse") else "test_accuracy"
    assert scored[metric] == pytest.approx(through[metric], abs=1e-6)
    assert scored["test_loss"] == pytest.approx(through["test_loss"], rel=1e-5)


@pytest.mark.parametrize(
    ("shape", "method"), [("similarity", "mezo"), ("similarity", "policy-gradient"), ("cosent", "mezo")]
)
def test_zeroth_order_and_policy_gradient_train_a_bi_encoder(
    tiny_model_dir, tmp_path, tiny_pairs, shape, method
):
    out = tmp_path / method
    summary = finetune(
        tiny_bi(tiny_model_dir, tiny_pairs, out, shape, method, steps=2, save_every=0), progress=False
    )
    assert summary["status"] == "finished" and summary["pair_encoding"]["encoding"] == "bi"
    assert ("similarity_head" in summary["pair_encoding"]) == (shape == "similarity")
    assert math.isfinite(summary["final_train_loss"]) and math.isfinite(summary["test_loss"])
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
