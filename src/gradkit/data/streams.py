"""Worker-safe data streams: shard an iterable across DataLoader workers and distributed ranks, and
reseed every random number generator a worker holds, reproducibly from one seed.

Two traps this removes. (1) An ``IterableDataset`` is copied into every DataLoader worker and every
rank, and each copy replays the whole stream: with 2 workers on 2 ranks every sample is seen 4 times
per epoch, with no error. (2) RNG objects built in a dataset's constructor (``random.Random``,
``numpy.random.Generator``, ``torch.Generator``) are copied into every worker with the same state, so
every worker draws the same "random" augmentations. PyTorch reseeds only the global generators.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from gradkit.errors import GradkitError

__all__ = ["ShardedIterable", "WorkerSeeder", "derive_seed", "reseed", "seed_worker", "shard_info"]


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from any tuple of ints/strings (BLAKE2b of their text): stable across runs,
    machines and Python versions (unlike ``hash``), and unrelated for neighbouring inputs, so
    ``derive_seed(seed, epoch, rank, worker)`` gives every worker of every rank its own stream."""
    digest = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(shard, num_shards)`` of the calling worker: ``shard = rank·W + worker_id`` with ``W`` DataLoader
    workers per rank, ``num_shards = world_size·W``. Rank and world size come from the arguments,
    else from ``torch.distributed`` when it is initialised, else ``(0, 1)``."""
    if rank is None or world_size is None:
        dist = torch.distributed
        initialised = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        world_size = world_size if world_size is not None else (dist.get_world_size() if initialised else 1)
    if not 0 <= rank < world_size:
        raise GradkitError(f"rank {rank} is outside world_size {world_size}; pass 0 <= rank < world_size")
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
    return rank * workers + worker, world_size * workers


class ShardedIterable(IterableDataset):
    """Yield each item of ``source`` exactly once per epoch across all DataLoader workers and ranks.

    Item ``i`` of the stream goes to shard ``i mod S`` (see :func:`shard_info`), so the shards partition
    the epoch: no duplicates, nothing dropped; shard sizes differ by at most one (under DDP, use
    ``model.join()`` or an equal step budget if that matters).

    ``source``: a sequence (``len`` and indexing: each shard reads only its own items), any re-iterable
    object, or a zero-argument callable returning a fresh iterable (a generator function): each shard
    then walks the whole stream and keeps its items. ``shuffle``: a sequence is permuted globally with
    a permutation drawn from ``derive_seed(seed, epoch)`` (the same on every shard, so it is still a
    partition); a stream is shuffled within each shard through a buffer of ``buffer_size`` items.
    Call :meth:`set_epoch` before each epoch for a new order (with ``persistent_workers=True`` the
    workers keep the epoch they started with).
    """

    def __init__(
        self,
        source: Iterable[Any] | Callable[[], Iterable[Any]],
        *,
        rank: int | None = None,
        world_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
    ) -> None:
        if not (callable(source) or isinstance(source, Iterable)):
            raise GradkitError(
                f"ShardedIterable needs an iterable or a callable returning one, got {type(source)}"
            )
        if isinstance(source, Iterator):
            raise GradkitError(
                "ShardedIterable got a one-shot iterator; pass a list, a re-iterable object "
                "or a function that returns a fresh iterator (e.g. a generator function)"
            )
        if buffer_size < 1:
            raise GradkitError(f"buffer_size must be >= 1, got {buffer_size}")
        self.source, self.rank, self.world_size = source, rank, world_size
        self.shuffle, self.seed, self.buffer_size, self.epoch = shuffle, seed, buffer_size, 0

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` (only matters with ``shuffle=True``)."""
        self.epoch = int(epoch)

    def _sequence(self) -> Sequence[Any] | None:
        s = self.source
        return s if (hasattr(s, "__len__") and hasattr(s, "__getitem__") and not callable(s)) else None

    def __len__(self) -> int:
        """Items this shard yields; only for sequence sources (used by DataLoader for ``len``)."""
        seq = self._sequence()
        if seq is None:
            raise TypeError("a streamed ShardedIterable has no length")
        shard, n = shard_info(self.rank, self.world_size)
        return len(range(shard, len(seq), n))

    def __iter__(self) -> Iterator[Any]:
        shard, n = shard_info(self.rank, self.world_size)
        seq = self._sequence()
        if seq is not None:
            order = range(len(seq))
            if self.shuffle:
                g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
                order = torch.randperm(len(seq), generator=g).tolist()
            for i in order[shard::n]:
                yield seq[i]
            return
        stream = self.source() if callable(self.source) else self.source
        mine = (x for i, x in enumerate(stream) if i % n == shard)
        if not self.shuffle:
            yield from mine
            return
        rng = random.Random(derive_seed(self.seed, self.epoch, shard))
        buffer: list[Any] = []
        for x in mine:
            if len(buffer) < self.buffer_size:
                buffer.append(x)
                continue
            k = rng.randrange(len(buffer))
            buffer[k], x = x, buffer[k]
            yield x
        rng.shuffle(buffer)
        yield from buffer


# -- seeding --------------------------------------------------------------------------------------
def _reseed_object(obj: Any, seed: int) -> bool:
    """Reseed one RNG object in place (identity kept: other holders see the new stream)."""
    if isinstance(obj, random.Random):
        obj.seed(seed)
    elif isinstance(obj, np.random.Generator):
        obj.bit_generator.state = type(obj.bit_generator)(seed).state
    elif isinstance(obj, np.random.RandomState):
        obj.seed(seed % 2**32)
    elif isinstance(obj, torch.Generator):
        obj.manual_seed(seed)
    else:
        return False
    return True


def reseed(dataset: Any, seed: int, *, globals_too: bool = True, _path: str = "", _seen=None) -> list[str]:
    """Reseed Python's ``random``, NumPy's and torch's global generators from ``seed``, and every RNG
    object that ``dataset`` holds as an attribute (also inside nested datasets, lists, tuples and dicts
    of them, e.g. ``Subset.dataset`` or ``ConcatDataset.datasets``). Each object gets its own seed
    ``derive_seed(seed, attribute_path)``. Returns the attribute paths reseeded."""
    if globals_too:
        random.seed(derive_seed(seed, "random"))
        np.random.seed(derive_seed(seed, "numpy") % 2**32)
        torch.manual_seed(derive_seed(seed, "torch"))
    seen = _seen if _seen is not None else set()
    if id(dataset) in seen:
        return []
    seen.add(id(dataset))
    done = []
    if isinstance(dataset, dict):
        children = [(f"{_path}[{k!r}]", v) for k, v in dataset.items()]
    elif isinstance(dataset, (list, tuple)):
        children = [(f"{_path}[{i}]", v) for i, v in enumerate(dataset)]
    else:
        children = (
            [(f"{_path}.{k}" if _path else k, v) for k, v in vars(dataset).items()]
            if hasattr(dataset, "__dict__")
            else []
        )
    for path, value in children:
        if _reseed_object(value, derive_seed(seed, path)):
            done.append(path)
        elif isinstance(value, (Dataset, list, tuple, dict)) and id(value) not in seen:
            if isinstance(value, (list, tuple, dict)) and len(value) > 64:
                continue  # data, not containers of datasets: do not walk them
            done += reseed(value, seed, globals_too=False, _path=path, _seen=seen)
    return done


class WorkerSeeder:
    """``worker_init_fn`` that gives every DataLoader worker on every rank its own reproducible RNGs.

    Worker ``w`` on rank ``r`` in epoch ``e`` calls :func:`reseed` on its copy of the dataset with
    ``derive_seed(seed, e, r, w)``: the global ``random`` / NumPy / torch generators and every RNG
    object the dataset holds. Same seed, same epoch: the same draws, run after run. Pass it as
    ``DataLoader(..., worker_init_fn=WorkerSeeder(seed))`` and call :meth:`set_epoch` before each
    epoch (workers are started per epoch unless ``persistent_workers=True``, which keeps epoch 0's seeds).
    """

    def __init__(self, seed: int, *, rank: int | None = None) -> None:
        self.seed, self.rank, self.epoch = int(seed), rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, worker_id: int) -> None:
        rank = self.rank
        if rank is None:
            dist = torch.distributed
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        info = get_worker_info()
        reseed(
            info.dataset if info is not None else None, derive_seed(self.seed, self.epoch, rank, worker_id)
        )


def seed_worker(worker_id: int) -> None:
    """Plain ``worker_init_fn``: reseed the worker's dataset RNG objects and global generators from
    ``torch.initial_seed()`` (which DataLoader sets to ``base_seed + worker_id``, ``base_seed`` drawn per
    epoch from its ``generator``: seed that for reproducibility) mixed with the distributed rank, so
    ranks that seed identically still draw differently. Prefer :class:`WorkerSeeder` for an explicit seed.
    """
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    info = get_worker_info()
    reseed(info.dataset if info is not None else None, derive_seed(torch.initial_seed(), rank, worker_id))
