"""Batches cut into parts: every example once, the whole batch's gradient, less padding; gradient
accumulation equals one big batch; dev evaluation, best-on-dev weights and TensorBoard files."""

from __future__ import annotations

import json

import pytest
import torch

from gradkit.train.batching import _cuts, padded_positions, split_batch
from gradkit.train.config import TrainConfig
from gradkit.train.loop import finetune
from gradkit.train.methods import accumulate_gradients
from gradkit.train.tokenize import tokenize


class _NoAccelerator:
    """The two accelerate calls accumulate_gradients makes, for a model on one process."""

    num_processes = 1

    @staticmethod
    def no_sync(model):
        import contextlib

        return contextlib.nullcontext()

    @staticmethod
    def backward(loss):
        loss.backward()


def _texts_batch(tiny_model_dir, n=12):
    from gradkit.data import load_text_classification
    from gradkit.train.model import load_tokenizer

    data = load_text_classification(None, split="train")
    tokens = tokenize(load_tokenizer(str(tiny_model_dir)), data.texts[:n], data.labels[:n], 64)
    return tokens.collate(range(n))


def test_cuts_are_the_cheapest_partition_by_brute_force():
    import itertools

    lengths = [3, 4, 4, 9, 10, 22, 23, 40]
    for overhead, limit in [(0, 8), (5, 8), (20, 8), (1000, 8), (5, 3)]:

        def cost(ends, overhead=overhead):
            begins = [0, *ends[:-1]]
            return sum((e - b) * lengths[e - 1] + overhead for b, e in zip(begins, ends, strict=True))

        best = min(
            cost([*cut, len(lengths)])
            for k in range(len(lengths))
            for cut in itertools.combinations(range(1, len(lengths)), k)
            if all(e - b <= limit for b, e in zip([0, *cut], [*cut, len(lengths)], strict=True))
        )
        ends = _cuts(lengths, limit, overhead)
        assert cost(ends) == best
        assert all(e - b <= limit for b, e in zip([0, *ends[:-1]], ends, strict=True))


@pytest.mark.parametrize("trim,max_examples", [(True, None), (True, 5), (False, 4)])
def test_parts_hold_every_example_once_with_weights_summing_to_one(tiny_model_dir, trim, max_examples):
    batch = _texts_batch(tiny_model_dir)
    parts = split_batch(batch, max_examples=max_examples, trim=trim)
    assert sum(w for _, w in parts) == pytest.approx(1.0)
    seen = sorted(
        tuple(row[mask.bool()].tolist())
        for part, _ in parts
        for row, mask in zip(part["input_ids"], part["attention_mask"], strict=True)
    )
    expected = sorted(
        tuple(row[mask.bool()].tolist())
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
    )
    assert seen == expected
    for part, weight in parts:
        assert weight == len(part["labels"]) / len(batch["labels"])
        assert part["attention_mask"][:, -1].any()  # trimmed: no column of padding alone
        if max_examples:
            assert len(part["labels"]) <= max_examples
    assert padded_positions(parts) <= batch["input_ids"].numel()


@pytest.mark.parametrize("trim,max_examples", [(True, None), (False, 3)])
def test_parts_give_the_whole_batch_loss_and_gradient(tiny_classifier, tiny_model_dir, trim, max_examples):
    model = tiny_classifier.eval()  # no dropout: the same function on both sides
    batch = _texts_batch(tiny_model_dir)
    loss = model(**batch).loss
    loss.backward()
    whole = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    parts = split_batch(batch, max_examples=max_examples, trim=trim)
    assert len(parts) > 1
    total = accumulate_gradients(model, parts, _NoAccelerator())
    assert total.item() == pytest.approx(loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, whole[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def no_dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny BERT without dropout (so micro-batching and one batch compute the same function)."""
    import shutil

    from transformers import AutoConfig

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, path / f.name)
    config = AutoConfig.from_pretrained(path)
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    config.save_pretrained(path)
    return path


def test_grad_accum_equals_one_batch_of_the_same_examples(no_dropout_model_dir, tmp_path):
    from safetensors.torch import load_file

    def run(name, batch_size, grad_accum, trim):
        cfg = TrainConfig(
            method="full",
            model=str(no_dropout_model_dir),
            steps=3,
            batch_size=batch_size,
            grad_accum=grad_accum,
            trim_padding=trim,
            max_length=32,
            evaluate=False,
            out=str(tmp_path / name),
        )
        summary = finetune(cfg, progress=False)
        return summary, load_file(str(tmp_path / name / "trainable.safetensors"))

    one, one_weights = run("one", 16, 1, False)
    for name, (batch_size, grad_accum, trim) in {"accum": (8, 2, False), "accum-trim": (4, 4, True)}.items():
        accum, weights = run(name, batch_size, grad_accum, trim)
        assert accum["final_train_loss"] == pytest.approx(one["final_train_loss"], rel=1e-5)
        for key, value in one_weights.items():
            torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_dev_evaluation_and_best_weights_are_chosen_on_dev_only(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.model import load_classifier, load_tokenizer

    cfg = TrainConfig(
        method="lora",
        model=str(tiny_model_dir),
        steps=6,
        batch_size=8,
        max_length=32,
        lr=5e-3,
        dev_fraction=0.05,
        eval_every=2,
        keep_best=True,
        out=str(tmp_path / "run"),
    )
    summary = finetune(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev_rows = [r for r in rows if "dev_loss" in r]
    assert [r["step"] for r in dev_rows] == [2, 4, 6]
    assert summary["train_examples"] + summary["dev_examples"] == 4000 and summary["dev_examples"] == 200
    best_row = max(dev_rows, key=lambda r: (r["dev_accuracy"], -r["step"]))  # the first of the best
    assert summary["best"]["step"] == best_row["step"]
    assert summary["best"]["dev_accuracy"] == best_row["dev_accuracy"]
    # the saved best adapter scores the test set as the summary says; the final one as well
    _, _, test = load_datasets(cfg)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    for folder, expected in [("best/adapter", summary["best"]), ("adapter", summary)]:
        loaded = PeftModel.from_pretrained(
            load_classifier(str(tiny_model_dir), 2, seed=0), tmp_path / "run" / folder
        )
        again = evaluate_texts(loaded, test, tokenizer, 32)
        assert again["test_accuracy"] == expected["test_accuracy"], folder


def test_dev_rows_do_not_change_training(tiny_model_dir, tmp_path):
    """Evaluating on dev draws no random numbers and changes no weight: the train losses are the same."""
    common = dict(method="lora", model=str(tiny_model_dir), steps=4, batch_size=8, max_length=32)
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\na fine film\t1\na dull film\t0\n")
    plain = finetune(TrainConfig(**common, out=str(tmp_path / "a")), progress=False)
    with_dev = finetune(
        TrainConfig(**common, dev=str(dev), eval_every=1, out=str(tmp_path / "b")), progress=False
    )
    assert with_dev["final_train_loss"] == plain["final_train_loss"]
    assert with_dev["test_accuracy"] == plain["test_accuracy"]
    assert with_dev["dev_examples"] == 2


def test_tensorboard_gets_the_train_and_dev_scalars(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        method="head",
        model=str(tiny_model_dir),
        steps=4,
        batch_size=8,
        max_length=32,
        dev_fraction=0.01,
        eval_every=2,
        report_to="tensorboard",
        out=str(tmp_path / "run"),
    )
    finetune(cfg, progress=False)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("dev/accuracy")] == [2, 4]


def test_a_left_padding_tokenizer_gives_the_same_loss_whole_split_and_unpadded():
    # GPT-2 numbers positions from each row's start (0, 1, …), padding included: a left-padded row's
    # tokens sit at shifted positions, so only right padding keeps a padded batch position-correct
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from gradkit.train.tokenize import pad_features
    from tests.train.causal_common import shakespeare_lines, word_tokenizer

    tok = word_tokenizer(bos=False)
    tok.pad_token = "<pad>"
    tok.padding_side = "left"
    config = GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=2,
        pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).eval()
    n = 8
    tokens = tokenize(tok, shakespeare_lines(n), [i % 2 for i in range(n)], 32)
    assert len(set(tokens.lengths())) > 1
    with torch.no_grad():
        alone = sum(float(model(**tokens.collate([i])).loss) for i in range(n)) / n  # no padding at all
        batch = tokens.collate(range(n))
        whole = float(model(**batch).loss)
        for trim, limit in [(True, None), (True, 3), (False, None), (False, 3)]:
            parts = split_batch(batch, trim=trim, max_examples=limit)
            assert sum(w * float(model(**p).loss) for p, w in parts) == pytest.approx(alone, rel=1e-5)
        # a batch padded on the left by hand: its parts are realigned to the right
        left = pad_features([tokens.features[i] for i in range(n)], tok.pad_token_id, "left")
        left["labels"] = batch["labels"]
        (one, w), *_ = split_batch(left, trim=False)
        assert w == 1.0 and float(model(**one).loss) == pytest.approx(alone, rel=1e-5)
    assert whole == pytest.approx(alone, rel=1e-5)
