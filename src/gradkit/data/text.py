"""Text-classification and text-regression data sets (single texts or sentence pairs) from TSV, CSV or
JSON lines files, and the bundled SST-2 sample.

One loader, :func:`load_text_classification`, reads a file into texts (and second texts of a pair) and
integer label ids, or float targets with ``task="regression"``; every
problem with the file is a :class:`~gradkit.errors.GradkitError` whose one line names the file, the
line where there is one, and the fix. Nothing is written while loading, so a bad file leaves no
partial run behind.

Rules, in the order they apply:

- Format by suffix: ``.tsv``/``.tab`` tab-separated (read with ``csv.QUOTE_NONE``: SST-2 text has
  bare quotes), ``.csv`` comma-separated with the usual CSV quoting, ``.jsonl``/``.json``/``.ndjson``
  one JSON object per line. Any other suffix is sniffed from the first non-blank line: ``{`` means JSON
  lines, a tab means TSV, else CSV.
- Header (TSV/CSV): ``header=True``/``False`` forces it. Otherwise the first row is a header when a
  column is chosen by name, or when the row holds ``sentence`` or ``text`` and ``label``
  (case-insensitive). Otherwise there is no header.
- Columns: a name (needs a header; matched exactly, then case-insensitively) or a 0-based index
  (an ``int`` or a string of digits, as the CLI passes it). Defaults: text is the column named
  ``sentence`` or ``text``, else column 0; label is the column named ``label``, else the last
  column. In JSON lines the columns are keys (an index counts keys in order of first appearance).
- Sentence pairs: ``text_pair_col`` names the second text of each example (the tokenizer encodes the
  two as one pair). Without ``text_col`` and ``text_pair_col``, a header holding both ``sentence1`` and
  ``sentence2`` (GLUE's RTE, STS-B, MRPC...) reads as pairs of those columns. An empty second text is
  an error, as an empty text is.
- Labels (``task="classification"``): when every label is an integer, the ids follow their numeric
  order (``"0","1"`` -> 0, 1; ``"-1","1"`` -> 0, 1); otherwise the distinct strings in sorted order.
  ``label_names`` (the train set's, for a test set) fixes the mapping instead; a label outside it is
  an error.
- Targets (``task="regression"``): every label must be a finite number (``"3.8"``, ``4``); a word,
  NaN or infinity is an error naming the line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradkit.errors import GradkitError

_INT = re.compile(r"[+-]?\d+\Z")
_DEFAULT_NAMES = {"text": ("sentence", "text"), "label": ("label",)}
_SUFFIXES = {
    ".tsv": "tsv",
    ".tab": "tsv",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
_SPLITS = ("train", "test")
# csv's own cap on one field is 128 KiB, which a long document exceeds; this is the largest a C long holds
# on every platform (csv stores the limit in one), so any text that fits in memory is read
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)
TASKS = ("classification", "regression")
_PAIR_NAMES = ("sentence1", "sentence2")  # GLUE's pair columns: read as a pair when no column is chosen

Column = str | int | None


@dataclass
class TextClassificationData:
    """Texts and their label ids ``0..num_classes-1``; ``label_names[i]`` is label ``i`` as written
    in the file (``"0"``, ``"1"`` or ``"neg"``, ``"pos"``). With sentence pairs ``pairs[i]`` is the
    second text of example ``i``; with ``task="regression"`` the labels are float targets and
    ``label_names`` is empty. Indexing gives ``(text, label)``, or ``((text, pair), label)``."""

    texts: list[str]
    labels: list[int] | list[float]
    label_names: list[str]
    path: str
    pairs: list[str] | None = None
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def num_outputs(self) -> int:
        """Outputs of a model for this data: one logit per class, or one value for regression."""
        return 1 if self.task == "regression" else self.num_classes

    @property
    def label_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[Any, int | float]:
        if self.pairs is not None:
            return (self.texts[i], self.pairs[i]), self.labels[i]
        return self.texts[i], self.labels[i]


def bundled_sst2(split: str) -> str:
    """Path of the SST-2 sample shipped in the package: ``"train"`` (4,000 rows drawn with a fixed
    seed from the SST-2 train set, see scripts/make_sst2_sample.py) or ``"test"`` (the 872 rows of
    the GLUE dev set). Socher et al. 2013, "Recursive Deep Models for Semantic Compositionality Over
    a Sentiment Treebank"; Wang et al. 2018, GLUE."""
    if split not in _SPLITS:
        raise GradkitError(f"unknown bundled SST-2 split {split!r}; use 'train' or 'test'")
    return str(Path(__file__).resolve().parent / "sst2" / f"{split}.tsv")


def load_text_classification(
    path: str | os.PathLike | None = None,
    *,
    split: str = "train",
    text_col: Column = None,
    label_col: Column = None,
    label_names: list[str] | None = None,
    header: bool | None = None,
    text_pair_col: Column = None,
    task: str = "classification",
) -> TextClassificationData:
    """Read a text-classification (or, with ``task="regression"``, text-regression) file, of single
    texts or of sentence pairs (rules in the module docstring).

    ``path=None`` reads the bundled SST-2 sample of ``split``. ``split="train"`` (without
    ``label_names``) requires at least 2 classes. Texts lose their trailing whitespace.
    """
    if task not in TASKS:
        raise GradkitError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}")
    if path is None:
        path = bundled_sst2(split)
    path = Path(path)
    text = _read(path)
    fmt = _SUFFIXES.get(path.suffix.lower()) or _sniff(text)
    if fmt == "jsonl":
        rows = _read_jsonl(path, text, text_col, label_col, text_pair_col)
    else:
        rows = _read_delimited(path, text, fmt, text_col, label_col, header, text_pair_col)
    if not rows:
        what = "is empty" if not text.strip() else "has no examples (only a header or blank lines)"
        raise GradkitError(f"{path}: {what}; add rows of text and label")
    texts = [t for _, t, _, _ in rows]
    pairs = [p for _, _, p, _ in rows] if rows[0][2] is not None else None
    if task == "regression":
        targets = [_target(path, line, label) for line, _, _, label in rows]
        return TextClassificationData(texts, targets, [], str(path), pairs, task)
    ids, names = _label_ids(path, [(line, label) for line, _, _, label in rows], label_names)
    if label_names is None and split == "train" and len(names) < 2:
        raise GradkitError(
            f"{path}: every training label is {names[0]!r}; a classifier needs at least 2 classes, "
            "check the label column or the file"
        )
    return TextClassificationData(texts, ids, names, str(path), pairs, task)


def _target(path: Path, line: int, label: str) -> float:
    """A regression target: a finite number, else one line naming the row."""
    try:
        value = float(label)
    except ValueError:
        raise GradkitError(
            f"{path}, line {line}: label {label!r} is not a number; --task regression needs a numeric "
            "label column (check --label-col, or use --task classification)"
        ) from None
    if not math.isfinite(value):
        raise GradkitError(
            f"{path}, line {line}: label {label!r} is not finite; fix the value or drop the row"
        )
    return value


def shuffled_order(n: int, seed: int, epoch: int = 0) -> list[int]:
    """A permutation of ``range(n)``, the same for the same ``(seed, epoch)`` on every machine and
    process, fresh for each epoch. ``torch.randperm`` draws from a private ``torch.Generator`` seeded
    with the first 63 bits of BLAKE2b(``"seed:epoch"``), so nearby seeds and epochs give unrelated
    streams and the global RNG state is untouched."""
    import torch

    if n < 0:
        raise GradkitError(f"shuffled_order needs n >= 0, got {n}")
    digest = hashlib.blake2b(f"{int(seed)}:{int(epoch)}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    return torch.randperm(n, generator=generator).tolist()


def save_label_map(data: TextClassificationData, path: str | os.PathLike) -> None:
    """Write ``{"label_names": [...], "label_to_id": {...}}`` to ``path`` atomically (labels.json in
    a run folder); :func:`load_label_map` reads it back for ``label_names=``."""
    from gradkit.files import write_json

    write_json(path, {"label_names": list(data.label_names), "label_to_id": data.label_to_id})


def load_label_map(path: str | os.PathLike) -> list[str]:
    """The ``label_names`` saved by :func:`save_label_map` (pass them to
    :func:`load_text_classification` to map new data with the same ids)."""
    path = Path(path)
    try:
        names = json.loads(_read(path))["label_names"]
    except (json.JSONDecodeError, KeyError, TypeError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise GradkitError(
            f"{path}: not a label map (expected a labels.json written by gradkit with 'label_names')"
        )
    return names


# --- reading -------------------------------------------------------------------------------------


def _read(path: Path) -> str:
    if not path.exists():
        raise GradkitError(f"{path}: no such file; check the path (a .tsv, .csv or .jsonl file)")
    if path.is_dir():
        raise GradkitError(
            f"{path}: is a folder, not a file; pass the data file inside it (.tsv, .csv or .jsonl)"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise GradkitError(f"{path}: cannot be read ({err.strerror}); check its permissions") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise GradkitError(f"{path}, line {line}: not valid UTF-8 text; re-save the file as UTF-8") from None


def _sniff(text: str) -> str:
    first = next((line for line in text.split("\n") if line.strip()), "")
    if first.lstrip().startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in first else "csv"


def _is_name(col: Column) -> bool:
    return isinstance(col, str) and not col.strip().isdigit()


def _read_delimited(
    path: Path,
    text: str,
    fmt: str,
    text_col: Column,
    label_col: Column,
    header: bool | None,
    pair_col: Column = None,
):
    """``[(line, text, pair or None, label)]`` from a TSV or CSV file (a field of any length)."""
    csv.field_size_limit(_FIELD_LIMIT)
    if fmt == "tsv":
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    records, start = [], 1
    try:
        for cells in reader:
            if len(cells) > 1 or (cells and cells[0].strip()):  # blank lines separate nothing
                records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as err:
        raise GradkitError(
            f"{path}, line {start}: not valid {fmt.upper()} ({err}); fix the quoting"
        ) from None
    if not records:
        return []

    first = records[0][1]
    names = [c.strip() for c in first]
    lowered = {n.lower() for n in names}
    if header is None:
        header = (
            _is_name(text_col)
            or _is_name(label_col)
            or _is_name(pair_col)
            or bool(lowered & set(_DEFAULT_NAMES["text"]) and "label" in lowered)
            or set(_PAIR_NAMES) <= lowered
        )
    elif not header:
        for col in (text_col, label_col, pair_col):
            if _is_name(col):
                raise GradkitError(
                    f"{path}: column {col!r} is a name but header=False; use a 0-based index instead"
                )
    columns = names if header else None
    ncols = len(first)
    if ncols < 2:
        raise GradkitError(
            f"{path}, line {records[0][0]}: found 1 column; a text and a label column are needed, separated "
            f"by {'a tab' if fmt == 'tsv' else 'a comma'} (the suffix .tsv or .csv picks the separator)"
        )
    if text_col is None and pair_col is None and columns and set(_PAIR_NAMES) <= lowered:
        text_col, pair_col = _PAIR_NAMES
    ti = _column_index(path, text_col, columns, ncols, "text", 0)
    li = _column_index(path, label_col, columns, ncols, "label", ncols - 1)
    pi = None if pair_col is None else _column_index(path, pair_col, columns, ncols, "text-pair", None)
    _distinct(path, {"text": ti, "label": li, "text-pair": pi}, "column")

    def what(i: int) -> str:
        return f"column {columns[i]!r}" if columns else f"column {i}"

    rows = []
    for line, cells in records[1:] if header else records:
        if len(cells) > ncols:
            raise GradkitError(
                f"{path}, line {line}: {len(cells)} fields but the first row has {ncols}; a text holds the "
                f"separator ({'remove the stray tab' if fmt == 'tsv' else 'quote the field'})"
            )
        label = cells[li].strip() if li < len(cells) else ""
        if not label:
            raise GradkitError(
                f"{path}, line {line}: no label ({what(li)} is empty or missing); add it or drop the row"
            )
        values = []
        for i, role in ((ti, "text"), (pi, "second text")):
            value = None
            if i is not None:
                value = cells[i].rstrip() if i < len(cells) else ""
                if not value.strip():
                    raise GradkitError(
                        f"{path}, line {line}: no {role} ({what(i)} is empty or missing); add it or drop the row"
                    )
            values.append(value)
        rows.append((line, values[0], values[1], label))
    return rows


def _distinct(path: Path, roles: dict[str, int | str | None], kind: str) -> None:
    """Text, second text and label must be different columns (keys)."""
    seen: dict[Any, str] = {}
    for role, where in roles.items():
        if where is None:
            continue
        if where in seen:
            shown = f"{kind} {where!r}" if isinstance(where, str) else f"{kind} {where}"
            raise GradkitError(
                f"{path}: {seen[where]} and {role} are both {shown}; choose different --{seen[where]}-col and "
                f"--{role}-col"
            )
        seen[where] = role


def _column_index(
    path: Path, col: Column, columns: list[str] | None, ncols: int, role: str, fallback: int | None
) -> int:
    """Resolve a column given by name, index, digit string, or None (the default names of ``role``,
    else ``fallback``). ``columns`` are the header cells or JSON keys, None without a header."""
    shown = ", ".join(map(repr, columns or []))
    if col is None:
        defaults = _DEFAULT_NAMES[role]
        lowered = [c.lower() for c in columns or []]
        found = next((lowered.index(d) for d in defaults if d in lowered), fallback)
        if found is None:
            raise GradkitError(
                f"{path}: no {' or '.join(map(repr, defaults))} key (keys: {shown}); "
                f"pass --{role}-col as one of them"
            )
        return found
    if isinstance(col, str) and col.strip().isdigit():
        col = int(col)
    if isinstance(col, int) and not isinstance(col, bool):
        if not 0 <= col < ncols:
            raise GradkitError(
                f"{path}: {role} column index {col} is out of range; "
                f"there are {ncols} columns, use 0..{ncols - 1}"
            )
        return col
    found = _find_name(str(col), columns or [])
    if found is None:
        raise GradkitError(
            f"{path}: no column named {col!r}; available columns: {shown}; pass --{role}-col as one of them "
            "or a 0-based index"
        )
    return found


def _find_name(name: str, columns: list[str]) -> int | None:
    name = name.strip()
    if name in columns:
        return columns.index(name)
    lowered = [c.lower() for c in columns]
    return lowered.index(name.lower()) if name.lower() in lowered else None


def _read_jsonl(path: Path, text: str, text_col: Column, label_col: Column, pair_col: Column = None):
    """``[(line, text, pair or None, label)]`` from a JSON lines file; columns are keys."""
    objects = []
    for line, raw in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not raw.strip():
            continue
        if not objects and raw.lstrip().startswith("["):
            raise GradkitError(f"{path}: is a JSON array; write one JSON object per line (JSON lines)")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            raise GradkitError(
                f"{path}, line {line}: not valid JSON ({err.msg}); write one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise GradkitError(
                f"{path}, line {line}: a JSON {type(obj).__name__}, not an object; write one object per line"
            )
        objects.append((line, obj))
    if not objects:
        return []

    keys = list(dict.fromkeys(k for _, obj in objects for k in obj))  # union, in order of first appearance
    if text_col is None and pair_col is None and set(_PAIR_NAMES) <= {k.lower() for k in keys}:
        text_col, pair_col = _PAIR_NAMES
    tkey = keys[_column_index(path, text_col, keys, len(keys), "text", None)]
    lkey = keys[_column_index(path, label_col, keys, len(keys), "label", None)]
    pkey = (
        None if pair_col is None else keys[_column_index(path, pair_col, keys, len(keys), "text-pair", None)]
    )
    _distinct(path, {"text": tkey, "label": lkey, "text-pair": pkey}, "key")
    rows = []
    for line, obj in objects:
        label = _json_label(path, line, obj.get(lkey), lkey)
        values = []
        for key, role in ((tkey, "text"), (pkey, "second text")):
            text_value = None
            if key is not None:
                value = obj.get(key)
                text_value = (
                    "" if value is None else (value if isinstance(value, str) else json.dumps(value)).rstrip()
                )
                if not text_value.strip():
                    raise GradkitError(
                        f"{path}, line {line}: no {role} (key {key!r} is empty or missing); add it or drop the row"
                    )
            values.append(text_value)
        rows.append((line, values[0], values[1], label))
    return rows


def _json_label(path: Path, line: int, value: Any, key: str) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    if isinstance(value, float | str):
        label = str(value).strip()
        if label:
            return label
    elif value is not None:
        raise GradkitError(
            f"{path}, line {line}: the label under {key!r} is a JSON {type(value).__name__}; "
            "use a string or a number"
        )
    raise GradkitError(
        f"{path}, line {line}: no label (key {key!r} is empty or missing); add it or drop the row"
    )


# --- labels --------------------------------------------------------------------------------------


def _label_ids(
    path: Path, raw: list[tuple[int, str]], label_names: list[str] | None
) -> tuple[list[int], list[str]]:
    """Map label strings to ids: through ``label_names`` when given, else integers in numeric order
    or strings in sorted order."""
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        ids = []
        for line, label in raw:
            i = index.get(label)
            if i is None and _INT.match(label):  # "01" or "+1" in a file whose train labels read "1"
                i = index.get(str(int(label)))
            if i is None:
                shown = ", ".join(map(repr, names[:20])) + (", ..." if len(names) > 20 else "")
                raise GradkitError(
                    f"{path}, line {line}: label {label!r} is not one of the training labels ({shown}); "
                    "fix the label or train on data that has it"
                )
            ids.append(i)
        return ids, names
    distinct = {label for _, label in raw}
    if all(_INT.match(label) for label in distinct):
        names = [str(v) for v in sorted({int(label) for label in distinct})]
        index = {n: i for i, n in enumerate(names)}
        return [index[str(int(label))] for _, label in raw], names
    names = sorted(distinct)
    index = {n: i for i, n in enumerate(names)}
    return [index[label] for _, label in raw], names
