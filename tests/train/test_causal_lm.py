"""``--task causal-lm``: response-only labels against a hand-built example, token-weighted parts that give
the whole batch's loss and gradient, held-out loss and perplexity as the mean token NLL, every method that
applies (lora, lora-ga, lora-pro, full, mezo, EMA) on a tiny random Llama and GPT-2, the adapter reloaded
with plain PEFT reproducing the run's logits, --keep-best in perplexity's direction, and the bad inputs."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from causal_common import pairs_file, save_tiny_gpt2, save_tiny_llama, shakespeare_lines  # noqa: E402

from gradkit.cli import main  # noqa: E402
from gradkit.errors import GradkitError  # noqa: E402
from gradkit.train.config import TrainConfig  # noqa: E402
from gradkit.train.loop import finetune  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("causal")
    return {"llama": save_tiny_llama(root / "llama"), "gpt2": save_tiny_gpt2(root / "gpt2")}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("causal-data")
    return pairs_file(root / "train.jsonl", 32), pairs_file(root / "test.jsonl", 12, start=200)


def tiny(model: Path, data, out: Path, **kw) -> TrainConfig:
    values = dict(
        task="causal-lm",
        model=str(model),
        train=str(data[0]),
        test=str(data[1]),
        steps=2,
        batch_size=8,
        max_length=48,
        out=str(out),
    )
    values.update(kw)
    return TrainConfig(**values)


def tokenizer_of(path: Path):
    from gradkit.train.model import load_tokenizer

    return load_tokenizer(str(path))


# --- data and labels -------------------------------------------------------------------------------


def test_response_only_labels_match_a_hand_built_example(models):
    """Llama-style tokenizer: <s> + prompt + response + </s>; labels -100 on <s> and the prompt, the ids of
    the response and </s> after; GPT-2-style (no BOS): position 0 is -100 all the same (nothing predicts it)."""
    from gradkit.data.causal import CausalLMData
    from gradkit.train.tokenize import tokenize_causal

    data = CausalLMData(["First Citizen:\n"], ["Speak, speak."], "hand", [1])
    for arch, bos in (("llama", True), ("gpt2", False)):
        tok = tokenizer_of(models[arch])
        ids = tok.convert_tokens_to_ids
        prompt = ids(["First", "Citizen", ":"])
        response = ids(["Speak", ",", "speak", "."])
        assert tok.unk_token_id not in prompt + response
        start = [ids("<s>")] if bos else []
        eos = ids("</s>")
        tokens = tokenize_causal(tok, data, 64)
        assert tokens.features[0]["input_ids"] == start + prompt + response + [eos]
        expected = [-100] * len(start + prompt) + response + [eos]
        expected[0] = -100
        assert tokens.labels[0] == expected
        # truncation keeps the start: the response loses its end and its </s>
        cut = tokenize_causal(tok, data, len(start) + 3 + 2)
        assert cut.features[0]["input_ids"] == start + prompt + response[:2]
        assert cut.labels[0] == [-100] * len(start + prompt) + response[:2]
        with pytest.raises(GradkitError, match=r"hand:1: no token left to train on: the prompt takes"):
            tokenize_causal(tok, data, len(start) + 3)


def test_plain_texts_train_on_every_token_and_batches_pad_on_the_right(models, tmp_path):
    from gradkit.data.causal import load_causal_lm_data
    from gradkit.train.tokenize import tokenize_causal

    lines = shakespeare_lines(3)
    (tmp_path / "t.txt").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    rows = [{"text": line, "other": 1} for line in lines]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    txt = load_causal_lm_data(tmp_path / "t.txt")
    field = load_causal_lm_data(tmp_path / "t.jsonl", text_field="text")
    assert txt.responses == field.responses == lines and txt.plain and field.plain
    assert txt.lines == [1, 3, 5]
    tok = tokenizer_of(models["llama"])
    tokens = tokenize_causal(tok, field, 64)
    for feature, labels in zip(tokens.features, tokens.labels, strict=True):
        assert labels == [-100] + feature["input_ids"][1:]  # every token but the first (<s>)
    batch = tokens.collate([0, 1, 2])
    longest = max(tokens.lengths())
    assert batch["input_ids"].shape == batch["labels"].shape == (3, longest)
    for i, n in enumerate(tokens.lengths()):
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (longest - n)
        assert batch["input_ids"][i, n:].eq(tok.pad_token_id).all() and batch["labels"][i, n:].eq(-100).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_token_weighted_parts_give_the_whole_batch_loss_and_gradient(models, data, arch):
    """The loss is a mean over response tokens: parts weighted by T_c / T sum to the whole batch's loss
    and gradient (weighting by examples, n_c / N, would not)."""
    from gradkit.data.causal import load_causal_lm_data
    from gradkit.train.batching import split_batch
    from gradkit.train.causal import load_causal_lm
    from gradkit.train.tokenize import tokenize_causal

    tokens = tokenize_causal(tokenizer_of(models[arch]), load_causal_lm_data(data[0]), 48)
    batch = tokens.collate(list(range(10)))
    model = load_causal_lm(str(models[arch])).eval()

    def loss_and_grad(parts):
        model.zero_grad()
        total = sum(model(**part).loss * w for part, w in parts)
        total.backward()
        return total.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole, whole_grad = loss_and_grad([(batch, 1.0)])
    parts = split_batch(batch, max_examples=3)
    assert len(parts) >= 4
    counts = [int((p["labels"][:, 1:] != -100).sum()) for p, _ in parts]
    assert [w for _, w in parts] == [c / sum(counts) for c in counts]
    assert sum(counts) == int((batch["labels"][:, 1:] != -100).sum())
    split, split_grad = loss_and_grad(parts)
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=0)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-4, atol=1e-6)
    by_examples = sum(model(**p).loss.detach() * len(p["labels"]) / 10 for p, _ in parts)
    assert abs(float(by_examples - whole)) > 1e-4  # the example weights would be wrong here


def test_held_out_loss_is_the_mean_nll_per_response_token(models, data):
    from gradkit.data.causal import load_causal_lm_data
    from gradkit.train.causal import load_causal_lm
    from gradkit.train.evaluate import evaluate_causal
    from gradkit.train.tokenize import tokenize_causal

    tokens = tokenize_causal(tokenizer_of(models["llama"]), load_causal_lm_data(data[1]), 48)
    model = load_causal_lm(str(models["llama"])).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(tokens)):  # one example at a time, no padding: sum of -log p of its labels
            ids = torch.tensor([tokens.features[i]["input_ids"]])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            for t, label in enumerate(tokens.labels[i]):
                if label != -100:
                    total -= float(logp[t - 1, label])
                    count += 1
    got = evaluate_causal(model, tokens, batch_size=5)
    assert got["test_tokens"] == count == tokens.label_tokens()
    assert got["test_loss"] == pytest.approx(total / count, rel=1e-5)
    assert got["test_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lora_targets_of_each_architecture(models):
    from gradkit.train.causal import load_causal_lm
    from gradkit.train.model import lora_target_names

    llama = load_causal_lm(str(models["llama"]))
    assert lora_target_names(llama) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert lora_target_names(load_causal_lm(str(models["gpt2"]))) == ["c_attn", "c_fc", "c_proj"]


# --- every method, and the reload ------------------------------------------------------------------


def plain_peft(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).eval()


@pytest.mark.parametrize("method", ["lora", "lora-ga", "lora-pro", "full", "mezo"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_every_method_trains_and_reloads(models, data, tmp_path, arch, method):
    from gradkit.train.datasets import load_datasets
    from gradkit.train.evaluate import evaluate_texts
    from gradkit.train.reload import load_trained

    cfg = tiny(models[arch], data, tmp_path / "run", method=method)
    summary = finetune(cfg, progress=False)
    assert summary["task"] == "causal-lm" and summary["metric"] == "perplexity"
    assert math.isfinite(summary["final_train_loss"])
    assert summary["test_perplexity"] == pytest.approx(math.exp(summary["test_loss"]))
    assert summary["step0"]["test_tokens"] == summary["test_tokens"] > 0
    assert not (tmp_path / "run" / "labels.json").exists()
    model, tokenizer = load_trained(tmp_path / "run")
    _, _, test = load_datasets(cfg)
    again = evaluate_texts(model, test, tokenizer, cfg.max_length)
    assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
    adapter = tmp_path / "run" / "adapter"
    if method == "full":
        assert not adapter.exists()
        return
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and not config.get("modules_to_save")
    plain = plain_peft(models[arch], adapter)
    batch = test_batch(tokenizer, test, cfg.max_length)
    with torch.no_grad():
        expected = model(**batch).logits
        got = plain(**batch).logits
        base = plain.get_base_model()
        with plain.disable_adapter():
            untouched = base(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - untouched).abs().max() > 1e-6  # the adapter changed the model


def test_batch(tokenizer, data, max_length):
    from gradkit.train.tokenize import tokenize_causal

    batch = tokenize_causal(tokenizer, data, max_length).collate(range(4))
    return {k: v for k, v in batch.items() if k != "labels"}


test_batch.__test__ = False  # a helper, not a test


def test_ema_and_keep_best_in_perplexity_direction(models, data, tmp_path):
    """--ema saves an adapter of the averaged weights and tests it; --keep-best keeps the LOWEST dev
    perplexity (perplexity is lower-is-better)."""
    cfg = tiny(
        models["llama"],
        data,
        tmp_path / "run",
        steps=4,
        lr=5e-3,
        ema=0.5,
        eval_every=1,
        dev_fraction=0.25,
        keep_best=True,
    )
    summary = finetune(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    dev = [r for r in rows if "dev_perplexity" in r]
    assert len(dev) == 4
    best = min(dev, key=lambda r: r["dev_perplexity"])
    assert summary["best"]["step"] == best["step"]
    assert summary["best"]["dev_perplexity"] == best["dev_perplexity"]
    assert math.isfinite(summary["ema"]["test_perplexity"])
    assert (tmp_path / "run" / "ema" / "adapter" / "adapter_config.json").is_file()
    from gradkit.train.reload import load_trained

    load_trained(tmp_path / "run", "ema")


def test_metric_direction():
    from gradkit.train.metrics import is_better

    assert is_better("perplexity", 3.0, 4.0) and not is_better("perplexity", 4.0, 3.0)
    assert is_better("accuracy", 0.8, 0.7) and not is_better("accuracy", 0.7, 0.8)
    assert is_better("perplexity", 9.0, None) and not is_better("perplexity", math.nan, None)
    assert not is_better("perplexity", math.inf, 5.0)


def test_the_cli_runs_end_to_end(models, data, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(
        [
            "finetune",
            "--task",
            "causal-lm",
            "--model",
            str(models["gpt2"]),
            "--train",
            str(data[0]),
            "--test",
            str(data[1]),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--max-length",
            "32",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    assert "lora: test perplexity" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["test_perplexity"] > 1


# --- bad inputs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, field, message",
    [
        ('{"prompt": "a"}\n', None, r"x.jsonl:1: no 'response' key \(the keys are 'prompt'\)"),
        (
            '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": " "}\n',
            None,
            r"x.jsonl:2: empty 'response'",
        ),
        ('{"prompt": 3, "response": "b"}\n', None, r"x.jsonl:1: 'prompt' is a JSON int, not a string"),
        ("\n\n", None, r"x.jsonl holds no examples"),
        ('{"prompt": "a", "response": "b"\n', None, r"x.jsonl:1: not valid JSON"),
        ('["a", "b"]\n', None, r"x.jsonl:1: a JSON list, not an object"),
        ('{"prompt": "a", "response": "b"}\n', "text", r"x.jsonl:1: no 'text' key"),
    ],
)
def test_bad_data_is_one_line_naming_file_and_line(tmp_path, content, field, message):
    from gradkit.data.causal import load_causal_lm_data

    path = tmp_path / "x.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(GradkitError, match=message) as err:
        load_causal_lm_data(path, text_field=field)
    assert "\n" not in str(err.value)
    with pytest.raises(GradkitError, match="no such file"):
        load_causal_lm_data(tmp_path / "missing.jsonl")


def refused(capsys, tmp_path, args, message):
    out = tmp_path / "refused"
    code = main(["finetune", *args, "--steps", "1", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "head"], "--method head trains a classification head"),
        (["--method", "policy-gradient"], "--method policy-gradient trains a classification head"),
        (["--head-init", "labels"], "--head-init labels builds a classification head"),
        (["--head-warmup", "2"], "--head-warmup 2 trains a classification head first"),
        (["--text-col", "text"], "--text-col is a column of classification data"),
        (["--method", "mezo", "--objective", "accuracy"], "--objective accuracy scores predicted classes"),
        (["--metric", "accuracy"], "--metric 'accuracy' is not a causal-lm metric"),
        (["--precision", "fp16"], "invalid choice"),
    ],
)
def test_options_that_do_not_apply_are_refused(models, data, tmp_path, capsys, extra, message):
    args = ["--task", "causal-lm", "--model", str(models["llama"]), "--train", str(data[0])]
    refused(capsys, tmp_path, [*args, "--test", str(data[1]), *extra], message)


def test_missing_files_and_wrong_models_are_refused(models, data, tmp_path, capsys, tiny_model_dir):
    base = ["--task", "causal-lm", "--train", str(data[0]), "--test", str(data[1])]
    refused(capsys, tmp_path, base, "--task causal-lm needs --model PATH")
    refused(
        capsys,
        tmp_path,
        ["--task", "causal-lm", "--model", str(models["llama"]), "--train", str(data[0])],
        "--task causal-lm needs --test FILE",
    )
    refused(
        capsys,
        tmp_path,
        ["--text-field", "text"],
        "--text-field text names the text of a causal-LM data file",
    )
    refused(capsys, tmp_path, [*base, "--model", str(tiny_model_dir)], "is not a causal language model")


@pytest.mark.distributed
def test_two_processes_weigh_ranks_by_their_tokens(models, data, tmp_path):
    """Under torchrun the ranks hold different numbers of response tokens: the logged loss of step 1 (the
    global batch's token mean, before any update) and the trained weights' test loss equal one process's."""
    import os
    import subprocess

    args = [
        *("finetune", "--task", "causal-lm", "--method", "full", "--model", str(models["llama"])),
        *("--train", str(data[0]), "--test", str(data[1]), "--steps", "2", "--batch-size", "8"),
        *("--max-length", "48", "--lr", "1e-3"),
    ]
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd = [*launcher, "-m", "gradkit", *args, "--out", str(tmp_path / "two")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    def read(name):
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        rows = [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return summary, [r["loss"] for r in rows if "loss" in r]

    (one, one_losses), (two, two_losses) = read("one"), read("two")
    assert two["num_processes"] == 2 and two["ranks_identical"] is True
    assert two_losses == pytest.approx(one_losses, rel=1e-6)
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-5)
