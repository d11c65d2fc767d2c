"""Sentence pairs and regression targets in gradkit.data: GLUE's RTE, STS-B and CoLA formats as they
ship, explicit pair columns in every format, and a one-line error for every bad pair or target."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradkit.data import load_text_classification
from gradkit.errors import GradkitError

DATA = Path(__file__).resolve().parents[2] / "data"


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8", newline="")
    return path


def test_rte_reads_as_pairs_of_sentence1_and_sentence2_with_string_labels():
    data = load_text_classification(DATA / "rte" / "train.tsv")
    assert len(data) == 2490 and data.pairs is not None and len(data.pairs) == 2490
    assert data.label_names == ["entailment", "not_entailment"]
    (first, second), label = data[0]
    assert first == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert second == "Weapons of Mass Destruction Found in Iraq."
    assert label == 1  # not_entailment
    dev = load_text_classification(DATA / "rte" / "dev.tsv", split="test", label_names=data.label_names)
    assert len(dev) == 277 and dev.pairs is not None


def test_stsb_reads_as_pairs_with_float_targets_from_the_last_column():
    data = load_text_classification(DATA / "stsb" / "train.tsv", task="regression")
    assert len(data) == 5749 and data.task == "regression" and data.num_outputs == 1
    assert data.label_names == [] and all(isinstance(v, float) for v in data.labels)
    assert min(data.labels) == 0.0 and max(data.labels) == 5.0
    assert data[0] == (("A plane is taking off.", "An air plane is taking off."), 5.0)


def test_cola_without_header_by_column_index_keeps_straight_quotes():
    data = load_text_classification(DATA / "cola" / "train.tsv", text_col=3, label_col=1)
    assert len(data) == 8551 and data.pairs is None and data.label_names == ["0", "1"]
    assert data[0] == ("Our friends won't buy this analysis, let alone the next one we propose.", 1)
    assert any('"' in t for t in data.texts)  # quotes are text, not CSV quoting
    dev = load_text_classification(
        DATA / "cola" / "dev.tsv", split="test", text_col="3", label_col="1", label_names=["0", "1"]
    )
    assert len(dev) == 1043  # the last line has no newline and is still read


@pytest.mark.parametrize(
    "name, content, kw",
    [
        ("p.tsv", "premise\thypothesis\tlabel\nIt rains.\tThe street is wet.\tyes\nA cat.\tA dog.\tno\n", {}),
        ("p.csv", 'premise,hypothesis,label\nIt rains.,"The street, wet.",yes\nA cat.,A dog.,no\n', {}),
        (
            "p.jsonl",
            '{"premise": "It rains.", "hypothesis": "The street, wet.", "label": "yes"}\n'
            '{"premise": "A cat.", "hypothesis": "A dog.", "label": "no"}\n',
            {},
        ),
    ],
    ids=["tsv", "csv", "jsonl"],
)
def test_an_explicit_pair_column_by_name_in_every_format(tmp_path, name, content, kw):
    data = load_text_classification(
        write(tmp_path, name, content), text_col="premise", text_pair_col="hypothesis", **kw
    )
    assert data.texts == ["It rains.", "A cat."]
    assert data.pairs[0] in ("The street is wet.", "The street, wet.") and data.pairs[1] == "A dog."
    assert data.labels == [1, 0]


def test_a_pair_column_by_index_without_header(tmp_path):
    path = write(tmp_path, "p.tsv", "It rains.\tThe street is wet.\t1\nA cat.\tA dog.\t0\n")
    data = load_text_classification(path, text_col=0, text_pair_col="1", label_col=2)
    assert data.pairs == ["The street is wet.", "A dog."] and data.labels == [1, 0]


def test_integer_targets_are_floats_in_regression(tmp_path):
    path = write(tmp_path, "r.jsonl", '{"text": "a", "label": 4}\n{"text": "b", "label": -0.5}\n')
    data = load_text_classification(path, task="regression")
    assert data.labels == [4.0, -0.5] and all(isinstance(v, float) for v in data.labels)


BAD = {
    "missing-pair-column": (
        "p.tsv",
        "sentence\tlabel\na\t1\nb\t0\n",
        {"text_pair_col": "hypothesis"},
        "no column named 'hypothesis'; available columns: 'sentence', 'label'; pass --text-pair-col",
    ),
    "pair-index-out-of-range": (
        "p.tsv",
        "a\tb\t1\nc\td\t0\n",
        {"text_pair_col": 7},
        "text-pair column index 7 is out of range; there are 3 columns",
    ),
    "pair-is-the-text": (
        "p.tsv",
        "sentence\tlabel\na\t1\nb\t0\n",
        {"text_pair_col": "sentence"},
        "text and text-pair are both column 0; choose different --text-col and --text-pair-col",
    ),
    "empty-second-text": (
        "p.tsv",
        "sentence1\tsentence2\tlabel\na\tb\t1\nc\t \t0\n",
        {},
        "line 3: no second text (column 'sentence2' is empty or missing)",
    ),
    "jsonl-empty-second-text": (
        "p.jsonl",
        '{"sentence1": "a", "sentence2": "b", "label": 1}\n{"sentence1": "c", "label": 0}\n',
        {},
        "line 2: no second text (key 'sentence2' is empty or missing)",
    ),
    "regression-word-label": (
        "r.tsv",
        "sentence\tlabel\na\t3.5\nb\thigh\n",
        {"task": "regression"},
        "line 3: label 'high' is not a number; --task regression needs a numeric label column",
    ),
    "regression-nan": (
        "r.tsv",
        "sentence\tlabel\na\t3.5\nb\tnan\n",
        {"task": "regression"},
        "line 3: label 'nan' is not finite",
    ),
    "regression-inf-json": (
        "r.jsonl",
        '{"text": "a", "label": 1.5}\n{"text": "b", "label": "inf"}\n',
        {"task": "regression"},
        "line 2: label 'inf' is not finite",
    ),
    "unknown-task": ("r.tsv", "sentence\tlabel\na\t1\nb\t0\n", {"task": "ranking"}, "unknown task 'ranking'"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_pairs_and_targets_give_one_line_errors(tmp_path, case):
    name, content, kw, fragment = BAD[case]
    with pytest.raises(GradkitError) as err:
        load_text_classification(write(tmp_path, name, content), **kw)
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
