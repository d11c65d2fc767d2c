"""The bi-encoder pair model (gradkit.train.bi_encoder) against sentence-transformers as the independent
reference: its pooling, CoSENT, the threshold classifier and the heads, a bi batch cut into parts with
the whole batch's loss, the folder's pooling configuration, and the pair options' bad inputs."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gradkit.cli import main
from gradkit.errors import GradkitError
from gradkit.train.batching import split_batch
from gradkit.train.bi_encoder import (
    POOLING_MODES,
    CosineRegressionHead,
    PairSetup,
    Pooling,
    SimilarityHead,
    cosent_loss,
    fitted_threshold,
    folder_pooling,
    label_range,
    load_bi_encoder,
    pool_tokens,
)
from gradkit.train.model import default_model_path, load_tokenizer
from gradkit.train.tokenize import PAIR_PREFIX, BiTokenized, pad_features, tokenize_bi

DATA = Path(__file__).resolve().parents[2] / "data"
TINY = ("--steps", "1", "--batch-size", "4", "--max-length", "16")


def real_rows(name: str, rows: int) -> list[dict[str, str]]:
    """The first ``rows`` rows of a bundled GLUE file (real sentence pairs)."""
    with open(DATA / name / "train.tsv", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [row for _, row in zip(range(rows), reader, strict=False)]


def write_pairs(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    path.write_text(
        "sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in rows), encoding="utf-8"
    )
    return path


# -- 1. pooling: sentence-transformers' Pooling module is the reference


def _right_padded_mask(lengths: list[int], width: int) -> torch.Tensor:
    return (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_tokens_matches_sentence_transformers_pooling(mode):
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    generator = torch.Generator().manual_seed(0)
    lengths = [1, 3, 7, 9, 2, 9]
    hidden = torch.randn(len(lengths), 9, 16, generator=generator)
    mask = _right_padded_mask(lengths, 9)
    hidden[mask == 0] = 1e3  # padding positions hold garbage that must not leak in
    expected = STPooling(16, pooling_mode=mode)({"token_embeddings": hidden, "attention_mask": mask})
    got = pool_tokens(hidden, mask, mode)
    assert got.shape == (len(lengths), 16)
    torch.testing.assert_close(got, expected["sentence_embedding"], atol=1e-6, rtol=1e-6)


def test_pool_tokens_refuses_an_unknown_mode_in_one_line():
    with pytest.raises(GradkitError) as err:
        pool_tokens(torch.zeros(1, 2, 3), torch.ones(1, 2), "weightedmean")
    assert "\n" not in str(err.value) and "weightedmean" in str(err.value)


# -- 2. CoSENT


def _cosent_brute(cosines: list[float], labels: list[float], scale: float = 20.0) -> float:
    """log(1 + sum_{(i, j): y_i > y_j} exp(scale * (cos_j - cos_i))), written out term by term."""
    total = 1.0
    for i in range(len(cosines)):
        for j in range(len(cosines)):
            if labels[i] > labels[j]:
                total += math.exp(scale * (cosines[j] - cosines[i]))
    return math.log(total)


def test_cosent_is_the_formula_and_sentence_transformers_cosent():
    from sentence_transformers.sentence_transformer.losses.cosent import CoSENTLoss
    from sentence_transformers.util import pairwise_cos_sim

    generator = torch.Generator().manual_seed(1)
    u, v = torch.randn(10, 8, generator=generator), torch.randn(10, 8, generator=generator)
    cosines = nn.functional.cosine_similarity(u, v, dim=-1)
    labels = torch.tensor([0.0, 1.2, 5.0, 3.8, 1.2, 2.5, 0.0, 4.4, 3.8, 2.0])  # ties included
    got = cosent_loss(cosines, labels)
    assert float(got) == pytest.approx(_cosent_brute(cosines.tolist(), labels.tolist()), rel=1e-5)
    for scale in (1.0, 7.5):
        assert float(cosent_loss(cosines, labels, scale)) == pytest.approx(
            _cosent_brute(cosines.tolist(), labels.tolist(), scale), rel=1e-5
        )
    # sentence-transformers' CoSENTLoss reads only its scale and similarity function off the instance
    reference = SimpleNamespace(scale=20.0, similarity_fct=pairwise_cos_sim)
    expected = CoSENTLoss.compute_loss_from_embeddings(reference, [u, v], labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cosent_depends_only_on_the_order_of_the_labels():
    generator = torch.Generator().manual_seed(2)
    cosines = torch.rand(12, generator=generator) * 2 - 1
    labels = torch.tensor([0.0, 0.4, 1.0, 2.2, 2.2, 3.0, 3.6, 4.0, 4.8, 5.0, 0.4, 1.6])
    loss = cosent_loss(cosines, labels)
    for mapped in (
        labels + 7.0,
        3 * labels - 2,
        labels**3,
        torch.exp(labels),
        torch.argsort(torch.argsort(labels)),
    ):
        torch.testing.assert_close(cosent_loss(cosines, mapped.float()), loss)
    # the order reversed is another loss
    assert not torch.allclose(cosent_loss(cosines, -labels), loss)


def test_cosent_without_ordered_pairs_is_log_one():
    cosines = torch.tensor([0.9, -0.3, 0.1, 0.5], requires_grad=True)
    loss = cosent_loss(cosines, torch.full((4,), 2.5))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(cosines.grad, torch.zeros(4))


def test_cosent_is_small_when_the_cosines_rank_as_the_labels():
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    ranked = cosent_loss(torch.tensor([0.1, 0.4, 0.7, 0.9]), labels)
    reversed_ = cosent_loss(torch.tensor([0.9, 0.7, 0.4, 0.1]), labels)
    assert float(ranked) < 0.05 < 5.0 < float(reversed_)


# -- 3. the threshold classifier


def _accuracy(cosines: torch.Tensor, labels: torch.Tensor, similar: int, threshold: float) -> float:
    return float(((cosines > threshold).long() == (labels == similar).long()).double().mean())


@pytest.mark.parametrize("similar", [0, 1])
def test_fitted_threshold_separates_separable_classes(similar):
    cosines = torch.tensor([0.7, 0.1, 0.8, 0.3, 0.2])
    high = torch.tensor([1, 0, 1, 0, 0])
    labels = high if similar == 1 else 1 - high
    got_similar, threshold = fitted_threshold(cosines, labels)
    assert got_similar == similar  # the class with the larger mean cosine
    assert 0.3 < threshold < 0.7 and threshold == pytest.approx(0.5)
    assert _accuracy(cosines, labels, got_similar, threshold) == 1.0


def test_fitted_threshold_takes_the_lowest_of_tied_cuts():
    # sorted is_similar = [0, 1, 0, 1]: cutting after 0.1 or after 0.3 both get 3 of 4 right
    cosines = torch.tensor([0.4, 0.1, 0.3, 0.2])
    labels = torch.tensor([1, 0, 0, 1])
    similar, threshold = fitted_threshold(cosines, labels)
    assert similar == 1 and threshold == pytest.approx(0.15)
    assert _accuracy(cosines, labels, similar, threshold) == 0.75


def test_fitted_threshold_is_the_best_cut_and_deterministic():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (40,), generator=generator)
    cosines = torch.rand(40, generator=generator) * 0.6 + 0.3 * labels
    similar, threshold = fitted_threshold(cosines, labels)
    values = sorted(cosines.tolist())
    candidates = [values[0] - 1, values[-1] + 1] + [
        (a + b) / 2 for a, b in zip(values, values[1:], strict=False)
    ]
    best = max(_accuracy(cosines, labels, similar, t) for t in candidates)
    assert _accuracy(cosines, labels, similar, threshold) == best
    assert fitted_threshold(cosines, labels) == (similar, threshold)
    order = torch.randperm(40, generator=generator)
    assert fitted_threshold(cosines[order], labels[order]) == (similar, threshold)


# -- 4. the heads


@pytest.mark.parametrize("similar", [0, 1])
def test_similarity_head_gives_sigmoid_of_scaled_distance_to_the_threshold(similar):
    head = SimilarityHead(similar, threshold=0.42, scale=13.0)
    cosines = torch.tensor([[-0.5], [0.0], [0.42], [0.6], [1.0]])
    probabilities = torch.softmax(head(cosines), dim=-1)
    expected = torch.sigmoid(13.0 * (cosines.squeeze(-1) - 0.42))
    torch.testing.assert_close(probabilities[:, similar], expected)
    torch.testing.assert_close(probabilities[:, 1 - similar], 1 - expected)
    assert {name for name, _ in head.named_parameters()} == {"threshold", "log_scale"}


def test_cosine_regression_head_maps_cosine_onto_the_label_range():
    low, high = label_range([2.5, 0.0, 5.0, 3.8])
    assert (low, high) == (0.0, 5.0)
    head = CosineRegressionHead(*label_range([1.0, 4.0, 2.0]))
    torch.testing.assert_close(head(torch.tensor([0.0, 1.0, 0.5])), torch.tensor([1.0, 4.0, 2.5]))
    assert label_range([3.0, 3.0]) == (3.0, 4.0)  # one value: a range of width 1, not 0
    assert all(p.requires_grad for p in head.parameters())


# -- 5. and 6. the pair model on a tiny BERT, batches cut into parts


def _stsb_tokens(tiny_model_dir, n: int) -> BiTokenized:
    rows = real_rows("stsb", n)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return tokenize_bi(
        tokenizer,
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        [float(r["score"]) for r in rows],
        64,
    )


def _rte_tokens(tiny_model_dir, n: int) -> BiTokenized:
    rows = real_rows("rte", n)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    return tokenize_bi(
        tokenizer,
        [r["sentence1"] for r in rows],
        [r["sentence2"] for r in rows],
        [int(r["label"] == "entailment") for r in rows],
        64,
    )


def _bi_model(tiny_model_dir, task: str, loss: str | None = None, **kw):
    setup = PairSetup("bi", "test", Pooling("mean", True, "t"), loss)
    labels = [0.0, 5.0] if task == "regression" else None
    model = load_bi_encoder(str(tiny_model_dir), 2, setup, task=task, labels=labels, **kw)
    return model.eval()


def test_bi_tokens_pad_each_text_to_its_own_longest(tiny_model_dir):
    tokens = _stsb_tokens(tiny_model_dir, 8)
    batch = tokens.collate(range(8))
    first = [len(f["input_ids"]) for f in tokens.features]
    second = [len(f[PAIR_PREFIX + "input_ids"]) for f in tokens.features]
    assert batch["input_ids"].shape == (8, max(first))
    assert batch[PAIR_PREFIX + "input_ids"].shape == (8, max(second))
    assert batch["attention_mask"].sum(1).tolist() == first
    assert batch[PAIR_PREFIX + "attention_mask"].sum(1).tolist() == second
    assert tokens.lengths() == [a + b for a, b in zip(first, second, strict=True)]
    assert batch["labels"].dtype == torch.float32


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_parts_of_a_bi_batch_give_the_whole_batch_loss(tiny_model_dir, task):
    n = 12
    tokens = _stsb_tokens(tiny_model_dir, n) if task == "regression" else _rte_tokens(tiny_model_dir, n)
    model = _bi_model(tiny_model_dir, task, "mse" if task == "regression" else None)
    batch = tokens.collate(range(n))
    with torch.no_grad():
        whole = float(model(**batch).loss)
        parts = split_batch(batch, max_examples=4)
        assert len(parts) >= 3 and sum(w for _, w in parts) == pytest.approx(1.0)
        combined = sum(w * float(model(**part).loss) for part, w in parts)
    assert combined == pytest.approx(whole, abs=1e-5)
    sums = []
    for part, _ in parts:
        for prefix in ("", PAIR_PREFIX):  # each text of the pair to the part's own longest
            longest = int(part[prefix + "attention_mask"].sum(1).max())
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                assert part[prefix + key].shape[1] == longest
        sums += (part["attention_mask"].sum(1) + part[PAIR_PREFIX + "attention_mask"].sum(1)).tolist()
    assert sums == sorted(sums)  # sorted by the sum of the two lengths
    assert sorted(sums) == sorted(tokens.lengths())


def test_a_left_padded_bi_batch_is_moved_right_before_it_is_cut(tiny_model_dir):
    n = 10
    tokens = _stsb_tokens(tiny_model_dir, n)
    model = _bi_model(tiny_model_dir, "regression", "mse")
    right = tokens.collate(range(n))
    first = [{k: v for k, v in f.items() if not k.startswith(PAIR_PREFIX)} for f in tokens.features]
    second = [
        {k[len(PAIR_PREFIX) :]: v for k, v in f.items() if k.startswith(PAIR_PREFIX)} for f in tokens.features
    ]
    left = pad_features(first, tokens.pad_id, "left")
    left.update({PAIR_PREFIX + k: v for k, v in pad_features(second, tokens.pad_id, "left").items()})
    left["labels"] = right["labels"]
    assert bool((left["attention_mask"][:, 0] == 0).any())
    assert bool((left[PAIR_PREFIX + "attention_mask"][:, 0] == 0).any())
    [(whole, weight)] = split_batch(left, trim=False)
    assert weight == 1.0
    assert whole.keys() == right.keys()
    for key in right:
        assert torch.equal(whole[key], right[key]), key
    with torch.no_grad():
        expected = float(model(**right).loss)
        parts = split_batch(left, max_examples=3)
        assert sum(w * float(model(**part).loss) for part, w in parts) == pytest.approx(expected, abs=1e-5)


def test_cosent_runs_take_the_batch_whole_or_in_consecutive_parts(tiny_model_dir):
    from gradkit.train.config import TrainConfig
    from gradkit.train.methods.base import parts_of

    batch = _stsb_tokens(tiny_model_dir, 8).collate(range(8))
    accelerator = SimpleNamespace(num_processes=1)
    [(whole, _)] = parts_of(
        batch, TrainConfig(batch_size=8, pair_loss="cosent", task="regression"), accelerator
    )
    assert torch.equal(whole["labels"], batch["labels"])  # the ranking sees the batch in its order
    parts = parts_of(
        batch, TrainConfig(batch_size=8, grad_accum=2, pair_loss="cosent", task="regression"), accelerator
    )
    assert torch.equal(torch.cat([p["labels"] for p, _ in parts]), batch["labels"])


def test_one_encoder_call_gives_each_texts_own_embedding(tiny_model_dir):
    tokens = _stsb_tokens(tiny_model_dir, 6)
    model = _bi_model(tiny_model_dir, "regression", "mse")
    batch = tokens.collate(range(6))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        u, v = model.pair_embeddings(**inputs)
        for i, feature in enumerate(tokens.features):  # each text alone: no padding at all
            alone_u = model.embed(
                **{k: torch.tensor([feature[k]]) for k in ("input_ids", "attention_mask", "token_type_ids")}
            )
            alone_v = model.embed(
                **{
                    k: torch.tensor([feature[PAIR_PREFIX + k]])
                    for k in ("input_ids", "attention_mask", "token_type_ids")
                }
            )
            torch.testing.assert_close(u[i : i + 1], alone_u, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v[i : i + 1], alone_v, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(6))  # the folder's Normalize
        pooled = model.pool(**inputs)
        torch.testing.assert_close(pooled, nn.functional.cosine_similarity(u, v, dim=-1).unsqueeze(-1))
        torch.testing.assert_close(model(**inputs).logits, model.head(pooled))


def test_pair_embeddings_match_mean_pooled_hidden_states_of_the_encoder(tiny_model_dir):
    tokens = _stsb_tokens(tiny_model_dir, 4)
    model = _bi_model(tiny_model_dir, "classification")
    batch = tokens.collate(range(4))
    with torch.no_grad():
        u, _ = model.pair_embeddings(**{k: v for k, v in batch.items() if k != "labels"})
        hidden = model.encoder(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(u, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("features, width", [("diff", 3), ("diff-product", 4)])
def test_classification_features_are_u_v_and_their_difference(tiny_model_dir, features, width):
    tokens = _rte_tokens(tiny_model_dir, 5)
    model = _bi_model(tiny_model_dir, "classification", features=features)
    inputs = {k: v for k, v in tokens.collate(range(5)).items() if k != "labels"}
    with torch.no_grad():
        u, v = model.pair_embeddings(**inputs)
        pooled = model.pool(**inputs)
        logits = model(**inputs).logits
    hidden = model.encoder.config.hidden_size
    assert pooled.shape == (5, width * hidden) and logits.shape == (5, 2)
    expected = [u, v, (u - v).abs()] + ([u * v] if features == "diff-product" else [])
    torch.testing.assert_close(pooled, torch.cat(expected, dim=-1))
    assert model.head.in_features == width * hidden


def test_the_similarity_head_at_step_0_is_the_fitted_threshold_classifier(tiny_model_dir):
    from gradkit.train.bi_encoder import fit_similarity_head

    tokens = _rte_tokens(tiny_model_dir, 24)
    model = _bi_model(tiny_model_dir, "classification", head="similarity").train()
    batch = tokens.collate(range(24))
    fit = fit_similarity_head(model, batch, batch_size=5)  # in chunks: the same cosines
    assert model.training  # the fit looks in eval mode and leaves the mode as it was
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.eval()
    with torch.no_grad():
        cosines = model.pool(**inputs).squeeze(-1)
        predicted = model(**inputs).logits.argmax(-1)
    assert (fit["similar_class"], fit["threshold"]) == fitted_threshold(cosines.double(), batch["labels"])
    similar = fit["similar_class"]
    expected = torch.where(cosines > fit["threshold"], similar, 1 - similar)
    assert torch.equal(predicted, expected)
    accuracy = float((predicted == batch["labels"]).double().mean())
    assert fit["fit_accuracy"] == pytest.approx(accuracy) and fit["rows"] == 24


def test_pair_setup_defaults_to_bi_for_a_sentence_transformers_folder(tiny_model_dir, tmp_path):
    from gradkit.train.bi_encoder import pair_setup

    pairs, single = SimpleNamespace(pairs=["b"]), SimpleNamespace(pairs=None)
    bundled = pair_setup(default_model_path(), None, "regression", None, pairs)
    assert (bundled.encoding, bundled.loss, bundled.pooling.mode, bundled.pooling.normalize) == (
        "bi",
        "mse",
        "mean",
        True,
    )
    assert "sentence-transformers" in bundled.reason
    assert pair_setup(str(tiny_model_dir), None, "regression", None, pairs).encoding == "cross"
    forced = pair_setup(str(tiny_model_dir), "bi", "classification", None, pairs, pooling="cls")
    assert (forced.loss, forced.pooling.mode, forced.pooling.normalize) == (None, "cls", False)
    assert pair_setup(str(tiny_model_dir), "bi", "regression", "cosent", pairs).loss == "cosent"
    assert pair_setup(default_model_path(), "cross", "regression", None, pairs).to_dict() == {
        "encoding": "cross",
        "reason": "--pair-encoding cross",
    }
    assert pair_setup(default_model_path(), None, "classification", None, single) is None


# -- 7. the folder's pooling configuration


def _st_folder(tmp_path: Path, pooling_config, normalize: bool = True, name: str = "st") -> Path:
    folder = tmp_path / name
    (folder / "1_Pooling").mkdir(parents=True)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    if isinstance(pooling_config, dict):
        pooling_config = json.dumps(pooling_config)
    if pooling_config is not None:
        config = folder / "1_Pooling" / "config.json"
        if isinstance(pooling_config, bytes):
            config.write_bytes(pooling_config)
        else:
            config.write_text(pooling_config)
    return folder


def _legacy(mode: str | None) -> dict:
    keys = {
        "cls": "pooling_mode_cls_token",
        "mean": "pooling_mode_mean_tokens",
        "max": "pooling_mode_max_tokens",
        "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
        "lasttoken": "pooling_mode_lasttoken",
    }
    return {"word_embedding_dimension": 32, **{key: name == mode for name, key in keys.items()}}


CONFIGS = {
    **{f"legacy-{mode}": _legacy(mode) for mode in POOLING_MODES},
    **{f"new-{mode}": {"embedding_dimension": 32, "pooling_mode": mode} for mode in POOLING_MODES},
    "new-list-of-one": {"embedding_dimension": 32, "pooling_mode": ["max"]},
    "legacy-none-set": _legacy(None),
    "dimension-only": {"word_embedding_dimension": 32},
}


@pytest.mark.parametrize("case", list(CONFIGS), ids=list(CONFIGS))
def test_folder_pooling_reads_the_mode_sentence_transformers_reads(tmp_path, case):
    from sentence_transformers.sentence_transformer.modules import Pooling as STPooling

    folder = _st_folder(tmp_path, CONFIGS[case])
    expected = STPooling.load(str(folder), subfolder="1_Pooling").pooling_mode
    pooling = folder_pooling(str(folder))
    assert pooling is not None and pooling.mode == expected and pooling.normalize
    assert pooling.source.endswith("config.json")


def test_folder_pooling_sees_whether_a_normalize_module_follows(tmp_path):
    assert folder_pooling(str(_st_folder(tmp_path, _legacy("mean"), normalize=False, name="a"))) == Pooling(
        "mean", False, str(tmp_path / "a" / "1_Pooling" / "config.json")
    )
    assert folder_pooling(str(_st_folder(tmp_path, _legacy("mean"), name="b"))).normalize
    bundled = folder_pooling(default_model_path())  # all-MiniLM-L6-v2: mean pooling, then Normalize
    assert (bundled.mode, bundled.normalize) == ("mean", True)
    assert folder_pooling(str(tmp_path)) is None  # no modules.json: not a sentence-transformers folder


BAD_FOLDERS = {
    "missing": (None, "is missing"),
    "garbage": ("{pooling_mode: mean", "cannot be read as JSON"),
    "not-utf8": (b"\xff\xfe\x00garbage\n{", "cannot be read as JSON"),
    "empty": ("", "cannot be read as JSON"),
    "weightedmean": (
        {"embedding_dimension": 32, "pooling_mode": "weightedmean"},
        "'weightedmean' is not one",
    ),
    "legacy-weightedmean": (
        {"pooling_mode_weightedmean_tokens": True, "pooling_mode_mean_tokens": False},
        "'weightedmean' is not one",
    ),
    "two-modes": (
        {"embedding_dimension": 32, "pooling_mode": ["mean", "max"]},
        "is not one gradkit computes",
    ),
    "not-an-object": ("[1, 2]", "is not one gradkit computes"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS), ids=list(BAD_FOLDERS))
def test_an_unusable_pooling_configuration_is_one_line(tmp_path, case):
    config, fragment = BAD_FOLDERS[case]
    folder = _st_folder(tmp_path, config)
    with pytest.raises(GradkitError) as err:
        folder_pooling(str(folder))
    message = str(err.value)
    assert "\n" not in message and fragment in message, message
    assert "config.json" in message and "--pair-encoding cross" in message


def test_an_unreadable_pooling_configuration_or_module_list_is_one_line(tmp_path):
    folder = _st_folder(tmp_path, None)
    (folder / "1_Pooling" / "config.json").mkdir()  # unreadable as a file, whoever runs the test
    with pytest.raises(GradkitError) as err:
        folder_pooling(str(folder))
    assert "\n" not in str(err.value) and "cannot be read" in str(err.value)
    for modules, fragment in [
        ("not json", "cannot be read as JSON"),
        ('{"a": 1}', "is not a list of modules"),
        ('[{"type": "x.Transformer"}]', "lists no Pooling module"),
    ]:
        (folder / "modules.json").write_text(modules)
        with pytest.raises(GradkitError) as err:
            folder_pooling(str(folder))
        assert "\n" not in str(err.value) and fragment in str(err.value), str(err.value)


# -- 8. bad pair options through the command line: one line, exit 2, nothing written


@pytest.fixture
def pair_files(tmp_path) -> dict[str, Path]:
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    stsb = [(r["sentence1"], r["sentence2"], r["score"]) for r in real_rows("stsb", 24)]
    rte = [(r["sentence1"], r["sentence2"], r["label"]) for r in real_rows("rte", 24)]
    # three classes from STS-B's scores: unrelated (< 2), related (< 4), equivalent
    three = [(a, b, "0" if float(y) < 2 else "1" if float(y) < 4 else "2") for a, b, y in stsb]
    assert len({y for _, _, y in three}) == 3
    return {
        "stsb": write_pairs(inputs / "stsb.tsv", stsb),
        "rte": write_pairs(inputs / "rte.tsv", rte),
        "three": write_pairs(inputs / "three.tsv", three),
    }


BAD_PAIRS = {
    "bi-without-pairs": (
        None,
        ("--pair-encoding", "bi"),
        "--pair-encoding bi embeds the two texts of a pair",
    ),
    "similarity-regression": (
        "stsb",
        ("--task", "regression", "--pair-encoding", "bi", "--head-init", "similarity"),
        "--head-init similarity thresholds cos(u, v) into two classes, and --task regression",
    ),
    "similarity-three-classes": (
        "three",
        ("--pair-encoding", "bi", "--head-init", "similarity"),
        "the training file has 3",
    ),
    "cosent-classification": (
        "rte",
        ("--pair-encoding", "bi", "--pair-loss", "cosent"),
        "--pair-loss cosent scores",
    ),
    "mse-cross": (
        "stsb",
        ("--task", "regression", "--pair-encoding", "cross", "--pair-loss", "mse"),
        "--pair-loss shapes a bi-encoder's pair model",
    ),
    "features-cross": (
        "rte",
        ("--pair-features", "diff-product"),
        "--pair-features shapes a bi-encoder's pair model",
    ),
    "labels-bi": (
        "rte",
        ("--pair-encoding", "bi", "--head-init", "labels"),
        "--head-init labels compares one text with label texts",
    ),
    "warmup-cosent": (
        "stsb",
        ("--task", "regression", "--pair-encoding", "bi", "--head-warmup", "5", "--pair-loss", "cosent"),
        "--head-warmup with --pair-loss cosent",
    ),
}


def _refused(capsys, tmp_path, args, fragment) -> None:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    for command in ("finetune", "compare"):
        code = main([command, *TINY, *args, "--out", str(work / "run")])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and lines[0].startswith("gradkit: error: "), err
        assert fragment in lines[0], lines[0]
        assert list(work.iterdir()) == []


@pytest.mark.parametrize("case", list(BAD_PAIRS), ids=list(BAD_PAIRS))
def test_bad_pair_options_stop_before_anything_is_written(
    tmp_path, monkeypatch, capsys, tiny_model_dir, pair_files, case
):
    data, args, fragment = BAD_PAIRS[case]
    monkeypatch.chdir(tmp_path)
    files = () if data is None else ("--train", str(pair_files[data]), "--test", str(pair_files[data]))
    _refused(capsys, tmp_path, ("--model", str(tiny_model_dir), *files, *args), fragment)


def test_a_sentence_transformers_folder_with_a_garbage_pooling_config_is_refused(
    tmp_path, monkeypatch, capsys, tiny_model_dir, pair_files
):
    model = tmp_path / "st-model"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(_st_folder(tmp_path, "{pooling_mode: mean"), model, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)
    files = ("--train", str(pair_files["stsb"]), "--test", str(pair_files["stsb"]))
    # bi by default (the folder is a sentence-transformers one), so its pooling must be read
    _refused(
        capsys, tmp_path, ("--model", str(model), "--task", "regression", *files), "cannot be read as JSON"
    )
