"""gradkit.data.text: formats, headers, columns, labels, the bundled SST-2 sample, seeded shuffling
and one-line errors for bad input."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import torch

from gradkit.data import (
    TextClassificationData,
    bundled_sst2,
    load_label_map,
    load_text_classification,
    save_label_map,
    shuffled_order,
)
from gradkit.errors import GradkitError


def write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")
    return path


def load(path, **kw) -> TextClassificationData:
    return load_text_classification(str(path), **kw)


# --- formats, headers, columns ---------------------------------------------------------------------


def test_tsv_with_header_keeps_quotes_and_strips_trailing_space(tmp_path):
    p = write(tmp_path, "d.tsv", 'sentence\tlabel\nit \'s "great" \t1\na dull , flat film \t0\n')
    d = load(p)
    assert d.texts == ['it \'s "great"', "a dull , flat film"]
    assert d.labels == [1, 0] and d.label_names == ["0", "1"] and d.num_classes == 2
    assert len(d) == 2 and d[0] == ('it \'s "great"', 1) and d.path == str(p)


def test_tsv_without_header_uses_first_and_last_columns(tmp_path):
    p = write(
        tmp_path, "d.tsv", "good movie\tx\t1\r\nbad movie\ty\t0\r\n\n"
    )  # CRLF and a trailing blank line
    d = load(p)
    assert d.texts == ["good movie", "bad movie"] and d.labels == [1, 0]


def test_csv_with_header_and_quoted_fields(tmp_path):
    p = write(tmp_path, "d.csv", 'id,text,label\n7,"fine, really ""fine""",pos\n8,"two\nlines",neg\n')
    d = load(p)
    assert d.texts == ['fine, really "fine"', "two\nlines"]
    assert d.label_names == ["neg", "pos"] and d.labels == [1, 0]


def test_csv_without_header(tmp_path):
    d = load(write(tmp_path, "d.csv", 'great,1\n"awful, truly",0\n'))
    assert d.texts == ["great", "awful, truly"] and d.labels == [1, 0]


@pytest.mark.parametrize("name, sep", [("d.tsv", "\t"), ("d.csv", ",")])
def test_a_five_megabyte_text_is_read_whole(tmp_path, name, sep):
    long = "word " * 1_000_000  # 5 MB, beyond csv's default field limit of 128 KiB
    d = load(write(tmp_path, name, f"text{sep}label\n{long}{sep}1\nshort{sep}0\n"))
    assert len(d) == 2 and d.texts[0] == long.strip() and d.texts[1] == "short"


def test_jsonl_keys_defaults_names_and_index(tmp_path):
    rows = [{"id": 1, "sentence": "good", "label": 1}, {"id": 2, "sentence": "bad", "label": 0}]
    p = write(tmp_path, "d.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    d = load(p)
    assert d.texts == ["good", "bad"] and d.labels == [1, 0] and d.label_names == ["0", "1"]
    by_index = load(p, text_col=1, label_col="0")  # keys in order of appearance: id, sentence, label
    assert by_index.texts == ["good", "bad"] and by_index.label_names == ["1", "2"]
    by_name = load(p, text_col="sentence", label_col="id")
    assert by_name.labels == [0, 1]


def test_json_suffix_reads_json_lines_with_string_and_bool_labels(tmp_path):
    p = write(tmp_path, "d.json", '{"text": "a", "y": "pos"}\n{"text": "b", "y": "neg"}\n')
    assert load(p, label_col="y").label_names == ["neg", "pos"]
    p = write(tmp_path, "b.json", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    assert load(p).label_names == ["false", "true"]


@pytest.mark.parametrize(
    "content",
    ['{"text": "good", "label": 1}\n{"text": "bad", "label": 0}\n', "good\t1\nbad\t0\n", "good,1\nbad,0\n"],
    ids=["jsonl", "tsv", "csv"],
)
def test_unknown_suffix_is_sniffed(tmp_path, content):
    d = load(write(tmp_path, "d.txt", content))
    assert d.texts == ["good", "bad"] and d.labels == [1, 0]


def test_columns_by_name_need_and_force_a_header(tmp_path):
    p = write(tmp_path, "d.tsv", "Review\tSentiment\tScore\nnice\tpos\t5\nmeh\tneg\t2\n")
    d = load(p, text_col="review", label_col="Sentiment")  # exact match, then case-insensitive
    assert d.texts == ["nice", "meh"] and d.label_names == ["neg", "pos"]
    assert load(p, label_col="Score").label_names == ["2", "5"]


def test_columns_by_index_and_digit_string(tmp_path):
    p = write(tmp_path, "d.csv", "1,nice,x\n0,meh,y\n")
    d = load(p, text_col=1, label_col="0")
    assert d.texts == ["nice", "meh"] and d.labels == [1, 0]
    assert load(p, text_col="1", label_col=2).label_names == ["x", "y"]


def test_header_keyword_forces_either_way(tmp_path):
    p = write(tmp_path, "d.tsv", "words\tclass\ngood\t1\nbad\t0\n")
    assert load(p, header=True).texts == ["good", "bad"]
    assert load(p).texts == ["words", "good", "bad"]  # no known names: the first row is data
    p = write(tmp_path, "e.tsv", "text\tlabel\ngood\t1\n")
    assert load(p, header=False, split="test").texts == ["text", "good"]


# --- labels ----------------------------------------------------------------------------------------


def test_integer_labels_follow_numeric_order(tmp_path):
    p = write(tmp_path, "d.tsv", "a\t10\nb\t-1\nc\t2\nd\t2\n")
    d = load(p)
    assert d.label_names == ["-1", "2", "10"] and d.labels == [2, 0, 1, 1]


def test_multiclass_string_labels(tmp_path):
    p = write(tmp_path, "d.csv", "text,label\na,neutral\nb,pos\nc,neg\nd,pos\ne,mixed\n")
    d = load(p)
    assert d.label_names == ["mixed", "neg", "neutral", "pos"] and d.num_classes == 4
    assert [d.label_names[i] for i in d.labels] == ["neutral", "pos", "neg", "pos", "mixed"]


def test_label_map_round_trip_maps_a_test_file_with_train_ids(tmp_path):
    train = load(write(tmp_path, "train.tsv", "text\tlabel\na\tpos\nb\tneg\nc\tneutral\n"))
    save_label_map(train, tmp_path / "run" / "labels.json")
    saved = json.loads((tmp_path / "run" / "labels.json").read_text())
    assert saved == {
        "label_names": ["neg", "neutral", "pos"],
        "label_to_id": {"neg": 0, "neutral": 1, "pos": 2},
    }
    assert [f.name for f in (tmp_path / "run").iterdir()] == ["labels.json"]  # no temporary file left
    names = load_label_map(tmp_path / "run" / "labels.json")
    test = load(write(tmp_path, "test.tsv", "text\tlabel\nx\tpos\ny\tpos\n"), split="test", label_names=names)
    assert test.labels == [2, 2] and test.label_names == names  # one class is fine for a test file


def test_label_names_map_integer_spellings(tmp_path):
    test = load(write(tmp_path, "t.tsv", "a\t01\nb\t0\n"), split="test", label_names=["0", "1"])
    assert test.labels == [1, 0]


def test_unseen_label_names_file_line_and_known_labels(tmp_path):
    p = write(tmp_path, "t.tsv", "text\tlabel\na\tpos\n\nb\tmaybe\n")
    with pytest.raises(GradkitError) as err:
        load(p, split="test", label_names=["neg", "pos"])
    msg = str(err.value)
    assert str(p) in msg and "line 4" in msg and "'maybe'" in msg and "'neg', 'pos'" in msg


# --- bundled sample and shuffling ------------------------------------------------------------------


def test_bundled_sst2_sample_sizes_and_classes():
    train, test = load_text_classification(split="train"), load_text_classification(split="test")
    assert len(train) == 4000 and len(test) == 872
    assert train.label_names == test.label_names == ["0", "1"]
    assert set(train.labels) == {0, 1}
    assert collections.Counter(test.labels) == {1: 444, 0: 428}
    assert all(t == t.rstrip() and t for t in train.texts + test.texts)
    assert Path(bundled_sst2("train")).name == "train.tsv" and train.path == bundled_sst2("train")
    with pytest.raises(GradkitError, match="'train' or 'test'"):
        bundled_sst2("dev")


def test_shuffled_order_is_a_seeded_permutation_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    order = shuffled_order(1000, seed=3, epoch=0)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sorted(order) == list(range(1000))
    assert order == shuffled_order(1000, seed=3, epoch=0)
    assert order != shuffled_order(1000, seed=4, epoch=0)
    assert order != shuffled_order(1000, seed=3, epoch=1)
    assert shuffled_order(1000, seed=3, epoch=1) != shuffled_order(1000, seed=4, epoch=0)
    assert shuffled_order(0, seed=1) == [] and shuffled_order(1, seed=1) == [0]


# --- bad input: one line naming the file (and line) ------------------------------------------------

BAD = {
    # name: (file name, content or None for no file, load keywords, fragments the message must hold)
    "missing file": ("nope.tsv", None, {}, ["no such file"]),
    "unknown column": ("d.tsv", "text\tlabel\na\t1\n", {"label_col": "y"}, ["'y'", "'text', 'label'"]),
    "index out of range": ("d.tsv", "a\t1\nb\t0\n", {"label_col": 5}, ["index 5", "0..1"]),
    "empty file": ("d.tsv", "", {}, ["is empty"]),
    "header only": ("d.csv", "text,label\n\n", {}, ["no examples"]),
    "empty label cell": ("d.tsv", "text\tlabel\na\t1\n\nb\t \n", {}, ["line 4", "no label"]),
    "missing label column": ("d.csv", "a,b,1\nc,d,0\ne\n", {"text_col": 0}, ["line 3", "no label"]),
    "no text": ("d.tsv", "text\tlabel\na\t1\n\t0\n", {}, ["line 3", "no text"]),
    "json no label": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, ["line 2", "no label"]),
    "json no text": (
        "d.jsonl",
        '{"text": "a", "label": 1}\n{"text": "", "label": 0}\n',
        {},
        ["line 2", "no text"],
    ),
    "json unknown key": (
        "d.jsonl",
        '{"review": "a", "label": 1}\n',
        {},
        ["'sentence' or 'text'", "'review'"],
    ),
    "bad json": ("d.jsonl", '{"text": "a", "label": 1}\n{"text": \n', {}, ["line 2", "not valid JSON"]),
    "json array": ("d.json", '[{"text": "a", "label": 1}]\n', {}, ["JSON array"]),
    "one class": ("d.tsv", "text\tlabel\na\t1\nb\t1\n", {}, ["at least 2 classes"]),
    "one column": ("d.csv", "just text\nmore\n", {}, ["1 column"]),
    "stray separator": ("d.tsv", "text\tlabel\na\t1\nb\tc\t0\n", {}, ["line 3", "3 fields"]),
    "bad encoding": ("d.tsv", b"text\tlabel\na\t1\nb\xff\xfe\t0\n", {}, ["line 3", "UTF-8"]),
    "named column without header": (
        "d.tsv",
        "a\t1\n",
        {"text_col": "text", "header": False},
        ["header=False"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_one_line_naming_the_file(tmp_path, case):
    name, content, kw, fragments = BAD[case]
    path = tmp_path / name if content is None else write(tmp_path, name, content)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(GradkitError) as err:
        load(path, **kw)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    for fragment in fragments:
        assert fragment in msg
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(GradkitError, match="is a folder") as err:
        load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_not_a_label_map(tmp_path):
    p = write(tmp_path, "labels.json", '{"names": []}')
    with pytest.raises(GradkitError, match="not a label map"):
        load_label_map(p)
