"""The data a run reads: the train, dev and test sets (the dev set given, or carved out of the training
file), a one-line description of them, the seeded training stream whose position is the step, and
the batches each step reads from it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from gradkit.data import load_text_classification, shuffled_order
from gradkit.data.causal import load_causal_lm_data
from gradkit.errors import GradkitError
from gradkit.train.config import TrainConfig


def load_datasets(cfg: TrainConfig):
    """``(train, dev, test)``: the dev and test labels are mapped through the train label ids. ``dev``
    is ``cfg.dev``, or ``cfg.dev_fraction`` of the training file carved out of it (seeded; those rows
    are not trained on), or None; ``test`` is None when the run does not evaluate. Pairs and
    regression targets follow ``cfg.text_pair_col`` and ``cfg.task``; ``--task causal-lm`` reads
    :func:`gradkit.data.causal.load_causal_lm_data` files (``cfg.text_field``)."""
    if cfg.task == "causal-lm":

        def read(path):
            return load_causal_lm_data(path, text_field=cfg.text_field)

        train, dev = read(cfg.train), read(cfg.dev) if cfg.dev is not None else None
        if dev is None and cfg.dev_fraction is not None:
            train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
        return train, dev, read(cfg.test) if cfg.evaluate else None

    cols = {
        "text_col": _column(cfg.text_col),
        "label_col": _column(cfg.label_col),
        "text_pair_col": _column(cfg.text_pair_col),
        "task": cfg.task,
    }
    train = load_text_classification(cfg.train, split="train", **cols)
    names = train.label_names if cfg.task == "classification" else None
    dev = None
    if cfg.dev is not None:
        dev = load_text_classification(cfg.dev, split="test", label_names=names, **cols)
    elif cfg.dev_fraction is not None:
        train, dev = carve_dev(train, cfg.dev_fraction, cfg.seed)
    if not cfg.evaluate:
        return train, dev, None
    test = load_text_classification(cfg.test, split="test", label_names=names, **cols)
    for other in (dev, test):
        if other is not None and (other.pairs is None) != (train.pairs is None):
            what = "sentence pairs" if train.pairs is not None else "single texts"
            raise GradkitError(
                f"{other.path} does not read as {what} like the training file {train.path}; give both files "
                "the same columns (or pass --text-pair-col)"
            )
    return train, dev, test


def carve_dev(train, fraction: float, seed: int):
    """Split ``round(fraction * n)`` rows (at least 1, seeded by ``seed``, independent of the training
    order's stream) off the training set as a dev set; both keep the file's order."""
    n = len(train)
    n_dev = max(1, round(fraction * n))
    if n_dev >= n:
        raise GradkitError(
            f"--dev-fraction {fraction:g} of {n} training rows leaves none to train on; pass a smaller "
            "fraction (e.g. 0.1) or a --dev file"
        )
    chosen = set(shuffled_order(n, seed, epoch=-1)[:n_dev])  # epoch -1: a stream no training epoch uses

    def subset(dev: bool, path: str):
        rows = [i for i in range(n) if (i in chosen) == dev]
        if hasattr(train, "select"):  # causal-LM data
            return train.select(rows, path)
        pairs = None if train.pairs is None else [train.pairs[i] for i in rows]
        return dataclasses.replace(
            train,
            texts=[train.texts[i] for i in rows],
            labels=[train.labels[i] for i in rows],
            pairs=pairs,
            path=path,
        )

    return subset(False, train.path), subset(True, f"{train.path} [dev: {n_dev} rows carved, seed {seed}]")


def describe_data(train, test, shown: int = 10, dev=None) -> str:
    """One line saying what a run read: rows per split, single texts or pairs, and the label map (id =
    label as in the file) or the range of the regression targets."""
    if getattr(train, "task", None) == "causal-lm":
        dev_part = f"dev {dev.path} ({len(dev):,} rows), " if dev is not None else ""
        test_part = f"test {test.path} ({len(test):,} rows)" if test is not None else "no test set"
        kind = (
            "plain texts, loss on every token"
            if train.plain
            else "prompt/response pairs, loss on the response tokens"
        )
        return f"data: train {train.path} ({len(train):,} rows), {dev_part}{test_part}; causal LM: {kind}"
    test_part = f"test {test.path} ({len(test.texts):,} rows)" if test is not None else "no test set"
    dev_part = f"dev {dev.path} ({len(dev.texts):,} rows), " if dev is not None else ""
    kind = "sentence pairs; " if getattr(train, "pairs", None) is not None else ""
    if getattr(train, "task", "classification") == "regression":
        target = f"regression targets in [{min(train.labels):g}, {max(train.labels):g}]"
    else:
        labels = ", ".join(f"{i} = {name!r}" for i, name in enumerate(train.label_names[:shown]))
        more = f", ... ({train.num_classes - shown} more)" if train.num_classes > shown else ""
        target = f"{train.num_classes} classes: {labels}{more}"
    return f"data: train {train.path} ({len(train.texts):,} rows), {dev_part}{test_part}; {kind}{target}"


def _column(value: str | int | None) -> str | int | None:
    return int(value) if isinstance(value, str) and value.isdigit() else value


class TrainingStream:
    """The training stream: example indices, one seeded shuffle of ``range(n)`` per epoch, read by slice
    (a step's batch is the next slice, so the data position of a run is its step). Only the epochs a
    slice touches are drawn, so a long run costs no memory up front."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch: tuple[int, list[int]] | None = None

    def _order(self, epoch: int) -> list[int]:
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, shuffled_order(self.n, self.seed, epoch))
        return self._epoch[1]

    def slice(self, start: int, stop: int) -> list[int]:
        out: list[int] = []
        while start < stop:
            epoch, offset = divmod(start, self.n)
            take = min(stop - start, self.n - offset)
            out.extend(self._order(epoch)[offset : offset + take])
            start += take
        return out


def training_order(n: int, total: int, seed: int) -> list[int]:
    """The first ``total`` indices of :class:`TrainingStream` ``(n, seed)``."""
    return TrainingStream(n, seed).slice(0, total)


class StepBatches:
    """The batches each step reads from the training stream, on ``device``. A step's batch is
    ``step_examples`` examples (``--batch-size`` times ``--grad-accum``) and this process takes its
    contiguous share; the head warm-up reads the stream's first ``warmup_steps`` step batches and the
    method's step 1 the next one. A growing batch (:meth:`resize`) changes the examples of every step
    from a given one on; each step still reads the stream's next examples."""

    def __init__(
        self,
        tokens: Any,
        stream: TrainingStream,
        *,
        step_examples: int,
        warmup_steps: int,
        processes: int,
        rank: int,
        device: Any,
    ):
        self.tokens, self.stream, self.device = tokens, stream, device
        self.step_examples = step_examples
        self.warmup_examples = warmup_steps * step_examples
        self.processes, self.rank = processes, rank
        self.layout = [(1, step_examples)]  # (first step, examples per step) of each stretch of steps

    def _batch(self, first: int, size: int) -> dict[str, torch.Tensor]:
        batch = self.tokens.collate(self.stream.slice(first, first + size))
        return {k: v.to(self.device) for k, v in batch.items()}

    def resize(self, step: int, examples: int) -> None:
        """From step ``step`` on, each step's batch holds ``examples`` examples (a multiple of the
        processes); the stretches after it are dropped."""
        if examples % self.processes:
            raise GradkitError(
                f"a batch of {examples} examples does not split over {self.processes} processes"
            )
        self.layout = [(first, size) for first, size in self.layout if first < step] + [(step, examples)]

    def span(self, step: int) -> tuple[int, int]:
        """The first example (after the warm-up's) of step ``step``'s batch in the stream, and its size."""
        first = 0
        for i, (begin, size) in enumerate(self.layout):
            end = self.layout[i + 1][0] if i + 1 < len(self.layout) else None
            if end is None or step < end:
                return first + (step - begin) * size, size
            first += (end - begin) * size
        raise AssertionError("unreachable: the last stretch has no end")

    def warmup(self, step: int) -> dict[str, torch.Tensor]:
        """This process's share of the head warm-up's step ``step`` (1-based)."""
        share = self.step_examples // self.processes
        return self._batch((step - 1) * self.step_examples + self.rank * share, share)

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """This process's share of the method's step ``step`` (1-based)."""
        first, size = self.span(step)
        share = size // self.processes
        return self._batch(self.warmup_examples + first + self.rank * share, share)

    def examples(self, first: int, size: int) -> dict[str, torch.Tensor]:
        """Examples ``first .. first + size`` of the stream after the warm-up's, whole on every process
        (what a branch from a run's state reads: :mod:`gradkit.train.branches`)."""
        return self._batch(self.warmup_examples + first, size)

    def whole(self, count: int, size: int) -> Iterator[dict[str, torch.Tensor]]:
        """The ``count`` batches of ``size`` examples after the warm-up's, whole on every process (what
        a method that looks at data before training, such as LoRA-GA, reads)."""
        for i in range(count):
            yield self._batch(self.warmup_examples + i * size, size)
