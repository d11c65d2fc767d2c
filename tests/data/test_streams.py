"""Sharding across workers and ranks (exactly once per epoch) and per-worker reproducible reseeding."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from gradkit.data.streams import ShardedIterable, WorkerSeeder, derive_seed, reseed, seed_worker
from gradkit.errors import GradkitError


def _epoch(make, ranks=2, workers=2, epoch=0):
    """All items from ``ranks`` simulated ranks, each with its own DataLoader of ``workers`` workers."""
    out = []
    for rank in range(ranks):
        ds = make(rank)
        ds.set_epoch(epoch)
        loader = DataLoader(ds, batch_size=50, num_workers=workers, multiprocessing_context="fork")
        out += [int(x) for batch in loader for x in batch]
    return out


def _gen():
    yield from range(1000)


@pytest.mark.parametrize("source", ["list", "generator"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_each_item_exactly_once_per_epoch(source, shuffle):
    src = list(range(1000)) if source == "list" else _gen

    def make(rank):
        return ShardedIterable(src, rank=rank, world_size=2, shuffle=shuffle, seed=3, buffer_size=64)

    first = _epoch(make)
    assert sorted(first) == list(range(1000))  # exactly once: no duplicate, none missing
    again = _epoch(make)
    assert again == first  # same seed and epoch: same order
    if shuffle:
        second = _epoch(make, epoch=1)
        assert sorted(second) == list(range(1000)) and second != first


def test_without_sharding_every_worker_replays_the_stream():
    class Plain(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(range(10))

    loader = DataLoader(Plain(), batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert Counter(int(x) for x in loader)[0] == 2  # the trap ShardedIterable removes


def test_len_and_bad_sources():
    ds = ShardedIterable(list(range(10)), rank=1, world_size=3)
    assert len(ds) == 3 and list(ds) == [1, 4, 7]
    with pytest.raises(GradkitError):
        ShardedIterable(iter(range(3)))
    with pytest.raises(GradkitError):
        list(ShardedIterable([1, 2], rank=2, world_size=2))


class _Augmented(Dataset):
    """Holds its own RNG objects, built once in the constructor (copied into every worker)."""

    def __init__(self):
        self.py = random.Random(0)
        self.np = np.random.default_rng(0)
        self.nested = {"gen": torch.Generator().manual_seed(0)}

    def __len__(self):
        return 8

    def __getitem__(self, i):
        info = torch.utils.data.get_worker_info()
        return (
            i,
            info.id,
            self.py.random(),
            float(self.np.random()),
            float(torch.rand(1, generator=self.nested["gen"])),
            random.random(),
            float(np.random.rand()),
            float(torch.rand(1)),
        )


def _draws(worker_init_fn, generator=None):
    loader = DataLoader(
        _Augmented(),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="fork",
        worker_init_fn=worker_init_fn,
        generator=generator,
    )
    rows = list(loader)
    first = {}
    for row in rows:
        first.setdefault(row[1], row[2:])  # each worker's first draws
    return rows, first


def test_dataset_rngs_are_copied_into_workers_without_reseeding():
    _, first = _draws(None)
    assert first[0][:3] == first[1][:3]  # same "random" augmentations in both workers


def test_worker_seeder_differs_between_workers_and_repeats():
    seeder = WorkerSeeder(7)
    rows, first = _draws(seeder)
    for k in range(6):  # every generator, held or global, draws differently in each worker
        assert first[0][k] != first[1][k]
    assert _draws(WorkerSeeder(7))[0] == rows  # same seed: the same draws exactly
    assert _draws(WorkerSeeder(8))[0] != rows
    seeder.set_epoch(1)
    assert _draws(seeder)[0] != rows  # a new epoch: new draws


def test_seed_worker_follows_the_loader_generator():
    rows, first = _draws(seed_worker, torch.Generator().manual_seed(1))
    assert first[0][:3] != first[1][:3]
    assert _draws(seed_worker, torch.Generator().manual_seed(1))[0] == rows


def test_reseed_in_place_and_derive_seed():
    ds = _Augmented()
    gen = ds.np
    paths = reseed(ds, 5, globals_too=False)
    assert sorted(paths) == ["nested['gen']", "np", "py"]
    assert ds.np is gen  # same object, new stream
    a = ds.np.random()
    reseed(ds, 5, globals_too=False)
    assert ds.np.random() == a
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(2, 1)
    assert 0 <= derive_seed("x") < 2**63
