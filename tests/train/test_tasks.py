"""The harness on every task shape (sentence pairs, regression, CoLA's MCC), the label-text head (zero-shot
from step 0, saved and reloaded with its logits), the head warm-up (before the method, on the stream's
first batches, the same for every method of a compare) and the bad inputs these options bring."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gradkit.cli import main
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune

DATA = Path(__file__).resolve().parents[2] / "data"


def head_of(path: Path, rows: int, out: Path, header: bool = True) -> Path:
    """The first ``rows`` examples of a real data file (with its header line)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out.write_text("\n".join(lines[: rows + int(header)]) + "\n", encoding="utf-8")
    return out


@pytest.fixture
def rte(tmp_path) -> tuple[Path, Path]:
    return (
        head_of(DATA / "rte" / "train.tsv", 48, tmp_path / "rte_train.tsv"),
        head_of(DATA / "rte" / "dev.tsv", 16, tmp_path / "rte_dev.tsv"),
    )


@pytest.fixture
def stsb(tmp_path) -> tuple[Path, Path]:
    return (
        head_of(DATA / "stsb" / "train.tsv", 48, tmp_path / "stsb_train.tsv"),
        head_of(DATA / "stsb" / "dev.tsv", 16, tmp_path / "stsb_dev.tsv"),
    )


def tiny(tiny_model_dir, out: Path, **kw) -> TrainConfig:
    values = dict(model=str(tiny_model_dir), steps=3, batch_size=8, max_length=48, out=str(out))
    values.update(kw)
    return TrainConfig(**values)


def test_pairs_are_encoded_as_one_pair_with_segment_ids(tiny_model_dir, rte):
    from gradkit.data import load_text_classification
    from gradkit.train.model import load_tokenizer
    from gradkit.train.tokenize import tokenize_data

    data = load_text_classification(rte[0])
    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokens = tokenize_data(tokenizer, data, 512)
    first = tokens.features[0]
    expected = tokenizer(data.texts[0], data.pairs[0])
    assert first["input_ids"] == expected["input_ids"]
    assert first["input_ids"].count(tokenizer.sep_token_id) == 2
    assert set(first["token_type_ids"]) == {0, 1}  # the second text is segment 1
    batch = tokens.collate([0, 1])
    assert batch["labels"].dtype == torch.long and "token_type_ids" in batch


@pytest.mark.parametrize("method", ["lora", "full", "mezo"])
def test_a_pair_task_trains_and_reports_step_zero_metrics(tiny_model_dir, tmp_path, rte, method):
    cfg = tiny(tiny_model_dir, tmp_path / method, method=method, train=str(rte[0]), test=str(rte[1]))
    summary = finetune(cfg, progress=False)
    assert summary["task"] == "classification" and summary["metric"] == "accuracy"
    assert summary["test_examples"] == 16
    for key in ("test_accuracy", "test_macro_f1", "test_mcc", "test_loss"):
        assert key in summary and key in summary["step0"], key
    # step 0 is the same model for every method: the seeded random head on the loaded encoder
    assert summary["step0"] == json.loads((tmp_path / method / "summary.json").read_text())["step0"]


def test_step_zero_metrics_are_the_same_model_for_every_method(tiny_model_dir, tmp_path, rte):
    runs = [
        finetune(
            tiny(tiny_model_dir, tmp_path / m, method=m, train=str(rte[0]), test=str(rte[1])), progress=False
        )
        for m in ("head", "lora-ga")
    ]
    assert runs[0]["step0"] == runs[1]["step0"]


def test_regression_trains_with_mse_and_reports_correlations(tiny_model_dir, tmp_path, stsb):
    cfg = tiny(
        tiny_model_dir,
        tmp_path / "r",
        method="lora",
        task="regression",
        train=str(stsb[0]),
        test=str(stsb[1]),
    )
    summary = finetune(cfg, progress=False)
    assert summary["task"] == "regression" and summary["metric"] == "pearson"
    assert {"test_pearson", "test_spearman", "test_loss"} <= set(summary)
    assert "test_accuracy" not in summary
    assert -1.0 <= summary["test_pearson"] <= 1.0

    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.reload import load_trained

    # the adapter reloads with the regression head and gives the same test loss (MSE of the one output)
    model, tokenizer = load_trained(tmp_path / "r")
    assert model.base_model.model.head.original_module.out_features == 1
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(model, test, tokenizer, cfg.max_length)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
    assert again["test_pearson"] == pytest.approx(summary["test_pearson"], abs=1e-6)


def test_regression_loss_is_the_mean_squared_error_of_the_output(tiny_model_dir):
    from gradkit.train.model import load_classifier

    model = load_classifier(str(tiny_model_dir), 1, task="regression").eval()
    ids = torch.tensor([[101, 2023, 102], [101, 2009, 102]])
    targets = torch.tensor([1.5, -2.0])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=targets)
    assert out.logits.shape == (2, 1)
    assert out.loss.item() == pytest.approx(((out.logits.squeeze(-1) - targets) ** 2).mean().item(), rel=1e-6)


def test_cola_metric_mcc_is_reported_and_chooses_the_best(tiny_model_dir, tmp_path):
    train = head_of(DATA / "cola" / "train.tsv", 64, tmp_path / "cola_train.tsv", header=False)
    test = head_of(DATA / "cola" / "dev.tsv", 24, tmp_path / "cola_dev.tsv", header=False)
    cfg = tiny(
        tiny_model_dir,
        tmp_path / "c",
        method="head",
        train=str(train),
        test=str(test),
        text_col="3",
        label_col="1",
        metric="mcc",
        steps=4,
        dev_fraction=0.25,
        eval_every=2,
        keep_best=True,
    )
    summary = finetune(cfg, progress=False)
    assert summary["metric"] == "mcc" and "test_mcc" in summary
    dev_rows = [json.loads(line) for line in (tmp_path / "c" / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [r for r in dev_rows if "dev_mcc" in r]
    best = max(dev_rows, key=lambda r: r["dev_mcc"])  # the first of equal values: the loop keeps a strict >
    assert summary["best"]["step"] == best["step"] and summary["best"]["dev_mcc"] == best["dev_mcc"]


# --- the label-text head ----------------------------------------------------------------------------


def test_label_text_head_is_scale_times_cosine_plus_bias():
    from gradkit.train.model import LabelTextHead

    vectors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    head = LabelTextHead(vectors, scale=10.0)
    x = torch.tensor([[3.0, 4.0]])
    assert torch.allclose(head(x), torch.tensor([[10 * 0.6, 10 * 0.8]]))
    with torch.no_grad():
        head.bias.copy_(torch.tensor([1.0, -1.0]))
        head.log_scale.fill_(0.0)
    assert torch.allclose(head(x), torch.tensor([[1.6, -0.2]]))
    assert {n for n, _ in head.named_parameters()} == {"weight", "bias", "log_scale"}


def test_label_texts_from_names_option_json_and_template():
    from gradkit.errors import GradkitError
    from gradkit.train.model import label_texts

    assert label_texts(["entailment", "not_entailment"], None, None) == ["entailment", "not entailment"]
    assert label_texts(["0", "1"], "terrible, great", "It was {}.") == ["It was terrible.", "It was great."]
    assert label_texts(["0", "1"], '["bad, really", "good"]', None) == ["bad, really", "good"]
    with pytest.raises(GradkitError, match="the labels are numbers"):
        label_texts(["0", "1"], None, None)
    with pytest.raises(GradkitError, match="gives 3 texts for 2 labels"):
        label_texts(["0", "1"], "a,b,c", None)
    with pytest.raises(GradkitError, match="one is empty"):
        label_texts(["0", "1"], "a,", None)


def test_zero_shot_head_classifies_texts_that_are_their_label_texts(tiny_model_dir, tmp_path):
    """On a fixture where each test text is its label's text, the zero-shot (step-0) accuracy is 1:
    each sentence embedding is its own label vector (cosine 1), whatever the encoder's weights."""
    rows = ["sentence\tlabel"] + [f"It was {w}.\t{w}" for w in ("great", "terrible", "fine", "awful")]
    train = tmp_path / "train.tsv"
    train.write_text("\n".join(rows * 3) + "\n")
    test = tmp_path / "test.tsv"
    test.write_text("\n".join(rows) + "\n")
    cfg = tiny(
        tiny_model_dir,
        tmp_path / "zs",
        method="head",
        train=str(train),
        test=str(test),
        head_init="labels",
        label_template="It was {}.",
        steps=1,
        batch_size=4,
    )
    summary = finetune(cfg, progress=False)
    assert summary["step0"]["test_accuracy"] == 1.0


def test_label_head_adapter_reloads_in_plain_peft_and_reproduces_the_logits(tiny_model_dir, tmp_path, rte):
    from peft import PeftModel

    from gradkit.train.datasets import load_datasets
    from gradkit.train.model import LabelTextHead, load_classifier
    from gradkit.train.reload import load_trained
    from gradkit.train.tokenize import tokenize_data

    out = tmp_path / "lh"
    cfg = tiny(
        tiny_model_dir,
        out,
        method="lora",
        train=str(rte[0]),
        test=str(rte[1]),
        head_init="labels",
        head_warmup=2,
    )
    summary = finetune(cfg, progress=False)
    model, tokenizer = load_trained(out)
    assert isinstance(model.base_model.model.head.modules_to_save["default"], LabelTextHead)
    _, _, test = load_datasets(cfg)
    batch = tokenize_data(tokenizer, test, cfg.max_length).collate(range(len(test)))
    with torch.no_grad():
        logits = model(**batch).logits

    # plain PEFT onto a base whose head has the label-text shape gives the same logits
    base = load_classifier(str(tiny_model_dir), 2)
    base.head = LabelTextHead(torch.zeros(2, base.encoder.config.hidden_size))
    plain = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, logits)
    loss = torch.nn.functional.cross_entropy(logits, batch["labels"]).item()
    assert loss == pytest.approx(summary["test_loss"], rel=1e-5)
    assert (logits.argmax(-1) == batch["labels"]).float().mean().item() == pytest.approx(
        summary["test_accuracy"]
    )


@pytest.mark.parametrize("method", ["head", "full"])
def test_saved_label_heads_of_other_methods_reload(tiny_model_dir, tmp_path, rte, method):
    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.reload import load_trained

    cfg = tiny(
        tiny_model_dir,
        tmp_path / method,
        method=method,
        train=str(rte[0]),
        test=str(rte[1]),
        head_init="labels",
    )
    summary = finetune(cfg, progress=False)
    model, tokenizer = load_trained(tmp_path / method)
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(model, test, tokenizer, cfg.max_length)
    assert again["test_accuracy"] == summary["test_accuracy"]
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


# --- the head warm-up -------------------------------------------------------------------------------


def test_head_warmup_trains_only_the_head_and_restores_flags(tiny_classifier):
    from gradkit.train.head_warmup import warm_up_head

    model = tiny_classifier
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)  # a flag to be restored as found
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.tensor([[101, 2023, 2003, 102], [101, 2009, 102, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids > 0).long(), "labels": torch.tensor([0, 1])}
    seen = []
    report = warm_up_head(model, [batch, batch, batch], lr=1e-2, on_step=lambda s, loss: seen.append(s))
    assert report["steps"] == 3 and seen == [1, 2, 3] and report["losses"][-1] < report["losses"][0]
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == name.startswith("head."), name
        assert param.requires_grad == flags[name], name
    assert model.training  # the warm-up ran in eval mode and gave the mode back


def test_head_warmup_reads_the_streams_first_batches_before_the_method(tiny_model_dir, tmp_path, monkeypatch):
    """The warm-up sees the stream's first N step batches, before ``prepare``; the method's step 1 takes
    the next batch of the stream; metrics.jsonl has the warm-up's rows apart, first."""
    from gradkit.train import head_warmup, methods
    from gradkit.train.datasets import TrainingStream, load_datasets
    from gradkit.train.model import load_tokenizer
    from gradkit.train.tokenize import tokenize_data

    events: list[tuple[str, list[int]]] = []
    real_warmup, real_step, real_prepare = (
        head_warmup.warm_up_head,
        methods.Method.train_step,
        methods.Head.prepare,
    )

    def spy_warmup(model, batches, **kw):
        batches = list(batches)
        events.extend(("warmup", b["input_ids"][:, 1].tolist()) for b in batches)
        return real_warmup(model, batches, **kw)

    def spy_prepare(self, model, cfg, batches):
        events.append(("prepare", []))
        return real_prepare(self, model, cfg, batches)

    def spy_step(self, model, batch, *args):
        events.append(("step", batch["input_ids"][:, 1].tolist()))
        return real_step(self, model, batch, *args)

    monkeypatch.setattr(head_warmup, "warm_up_head", spy_warmup)
    monkeypatch.setattr(methods.Head, "prepare", spy_prepare)
    monkeypatch.setattr(methods.Method, "train_step", spy_step)
    cfg = tiny(
        tiny_model_dir, tmp_path / "w", method="head", head_warmup=2, steps=2, batch_size=4, head_lr=5e-3
    )
    summary = finetune(cfg, progress=False)

    train, _, _ = load_datasets(cfg)
    tokens = tokenize_data(load_tokenizer(str(tiny_model_dir)), train, cfg.max_length)
    order = TrainingStream(len(train), cfg.seed).slice(0, 16)
    first_tokens = [tokens.features[i]["input_ids"][1] for i in order]
    assert [e[0] for e in events] == ["warmup", "warmup", "prepare", "step", "step"]
    assert sorted(events[0][1]) == sorted(first_tokens[0:4]) and sorted(events[1][1]) == sorted(
        first_tokens[4:8]
    )
    assert sorted(events[3][1]) == sorted(first_tokens[8:12])
    rows = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("head_warmup_step") for r in rows[:2]] == [1, 2] and [r.get("step") for r in rows[2:]] == [
        1,
        2,
    ]
    assert summary["head_warmup"]["steps"] == 2 and summary["head_warmup"]["lr"] == 5e-3
    assert summary["head_warmup"]["examples"] == 8 and "test_accuracy" in summary["head_warmup"]
    assert summary["steps"] == 2  # the method's own steps, counted apart from the warm-up's


def test_compare_gives_every_method_the_same_warmup(tiny_model_dir, tmp_path, rte):
    from gradkit.train.compare import compare

    cfg = tiny(
        tiny_model_dir,
        tmp_path / "cmp",
        train=str(rte[0]),
        test=str(rte[1]),
        head_warmup=2,
        head_init="labels",
    )
    summaries = compare(cfg, ["lora", "full"])
    warm = [s["head_warmup"] for s in summaries]
    assert (
        warm[0]["test_loss"] == warm[1]["test_loss"]
        and warm[0]["final_train_loss"] == warm[1]["final_train_loss"]
    )
    table = (tmp_path / "cmp" / "table.md").read_text()
    assert "step-0 test acc" in table and "after head warm-up test acc" in table


def test_a_resumed_run_with_label_head_and_warmup_ends_bit_identical(tiny_model_dir, tmp_path, rte):
    from gradkit.train.loop import resume

    def cfg(out):
        return tiny(
            tiny_model_dir,
            out,
            method="lora-ga",
            train=str(rte[0]),
            test=str(rte[1]),
            head_init="labels",
            head_warmup=2,
            steps=4,
            save_every=2,
            options={"ga_batches": 1},
        )

    through = finetune(cfg(tmp_path / "a"), progress=False)
    finetune(cfg(tmp_path / "b"), progress=False, stop_after=3)
    again = resume(tmp_path / "b", progress=False)
    for key in ("test_loss", "step0", "head_warmup", "final_train_loss"):
        if key == "head_warmup":
            assert {k: v for k, v in again[key].items() if k != "seconds"} == {
                k: v for k, v in through[key].items() if k != "seconds"
            }
        else:
            assert again[key] == through[key], key
    files = [
        p.relative_to(tmp_path / "a")
        for p in (tmp_path / "a").rglob("*.safetensors")
        if "checkpoints" not in p.parts
    ]
    assert files and all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
    )


# --- bad inputs -------------------------------------------------------------------------------------

TINY = ("--steps", "1", "--batch-size", "4", "--max-length", "16")
BAD = {
    "regression-label-head": (
        ("--task", "regression", "--head-init", "labels"),
        "--task regression has no classes",
    ),
    "label-text-without-head": (("--label-text", "bad,good"), "--label-text shapes the label-text head"),
    "template-without-braces": (
        ("--head-init", "labels", "--label-template", "It was"),
        "--label-template 'It was' has no {} for the label text",
    ),
    "metric-of-other-task": (
        ("--task", "regression", "--metric", "mcc"),
        "--metric 'mcc' is not a regression metric",
    ),
    "head-lr-without-warmup": (("--head-lr", "1e-3"), "--head-lr is the head warm-up's learning rate"),
    "head-warmup-negative": (("--head-warmup", "-1"), "--head-warmup -1 is not allowed"),
    "head-lr-zero": (("--head-warmup", "2", "--head-lr", "0"), "--head-lr 0.0 is not allowed"),
    "numeric-labels-without-text": (("--head-init", "labels"), "the labels are numbers (0, 1)"),
    "label-text-count": (
        ("--head-init", "labels", "--label-text", "a,b,c"),
        "--label-text gives 3 texts for 2 labels",
    ),
    "regression-on-word-labels": (
        ("--task", "regression", "--train", "{rte}"),
        "is not a number; --task regression",
    ),
    "missing-pair-column": (("--text-pair-col", "hypothesis"), "no column named 'hypothesis'"),
    "pairs-against-single-test": (
        ("--train", "{rte}", "--test", "{single}"),
        "does not read as sentence pairs like the training file",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
@pytest.mark.parametrize("command", ["finetune", "compare"])
def test_bad_task_and_head_options_stop_before_anything_is_written(
    tmp_path, monkeypatch, capsys, rte, case, command
):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    train = rte[0].rename(inputs / "rte.tsv")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    args, fragment = BAD[case]
    single = inputs / "single.tsv"  # one RTE premise per row, with RTE's labels: no second text
    single.write_text("sentence\tlabel\nNo Weapons of Mass Destruction Found in Iraq Yet.\tnot_entailment\n")
    args = tuple(a.replace("{rte}", str(train)).replace("{single}", str(single)) for a in args)
    code = main([command, *TINY, *args, "--out", str(work / "run")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("gradkit: error: "), err
    assert fragment in lines[0], lines[0]
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    "method, extra, fragment",
    [
        ("policy-gradient", (), "policy-gradient samples class labels"),
        ("mezo", ("--objective", "accuracy"), "--objective accuracy scores argmax predictions"),
    ],
)
def test_methods_that_need_classes_refuse_regression(
    tiny_model_dir, tmp_path, capsys, stsb, method, extra, fragment
):
    out = tmp_path / "run"
    code = main(
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            *TINY,
            "--method",
            method,
            *extra,
            "--task",
            "regression",
            "--train",
            str(stsb[0]),
            "--test",
            str(stsb[1]),
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
