"""The random directions of zeroth-order steps, regenerated from seeds instead of stored.

Each step of :class:`gradkit.ZerothOrder` draws one seed per sample; a sample's direction ``z`` is
one N(0, I) vector over every optimised tensor, and any parameter's slice of it can be rebuilt at
any time, in any order, from ``(seed, parameter index)`` (MeZO's seed trick, arXiv 2305.17333),
with generators private to this object (the global torch RNG is never read).

Distributions (``distribution=``). ``"gaussian"``: z ~ N(0, I), as in MeZO. ``"rademacher"``: every
coordinate is ±1 with probability ½ each, independently: Spall's (1992) original simultaneous
perturbation ("Multivariate stochastic approximation using a simultaneous perturbation gradient
approximation", IEEE TAC 37(3)). Both have E[z] = 0 and E[zzᵀ] = I, so the two-sided estimate
``(f(θ+εz) − f(θ−εz))/(2ε) · z`` has the same mean ``∇f + O(ε²)`` with either; Rademacher's
|z|² is exactly n, the Gaussian's fluctuates around it. Its bits come 64 at a time from one 64-bit
draw and are turned into ±1 by a 256-entry table lookup per byte, several times cheaper than a
Gaussian draw on a CPU.

Plain parameters: the slice of parameter ``i`` is drawn from ``mix(seed, i)``; a parameter over
``CHUNK`` elements is drawn chunk by chunk, chunk ``c`` from ``mix(mix(seed, i), c)``, so no buffer
is ever larger than a chunk.

Embedding matrices on the sparse path. A step's first lookup of an embedding fixes its row set
``R`` (sorted, unique). The direction on those rows is one ``(|R|, dim)`` draw from
``mix(seed, i)``; every other row takes its value from a second stream, drawn like a plain
parameter from ``mix(mix(seed, i), REST)``. This is still one well-defined Gaussian vector per
sample, so every use of the matrix sees the same ``z``:

- a lookup of rows in ``R`` needs the small draw alone (no embedding-sized work);
- a lookup of other rows (a second batch, a decoder sharing the encoder's embedding) reads the
  second stream for those rows;
- a use of the whole matrix (a tied LM head, a penalty on it) reads the composed dense vector.

The update then follows what ran in the step: only the rows looked up when every use was a lookup
(the others have gradient exactly 0), every row when anything read the whole matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

__all__ = ["DISTRIBUTIONS", "Directions", "mix", "work_dtype"]

CHUNK = 1 << 20  # elements of z generated at once (4 MiB in fp32): bounds every temporary buffer
_MASK64 = (1 << 64) - 1
_REST = 0x5DEECE66D  # salt of the stream that fills an embedding's z outside the step's row set
DISTRIBUTIONS = ("gaussian", "rademacher")


def mix(seed: int, index: int) -> int:
    """SplitMix64 of (seed, index): well-separated per-parameter seeds from one per-sample seed."""
    x = (seed + 0x9E3779B97F4A7C15 * (index + 1)) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic precision for a parameter: at least fp32 (bf16/fp16 are computed in fp32)."""
    return torch.promote_types(dtype, torch.float32)


def _sign_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds the ±1 values of the 8 bits of byte b (bit k set -> +1), least bit first."""
    bits = (torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def _flat_rows(rows: torch.Tensor, width: int) -> torch.Tensor:
    """Flat (row-major) positions of every element of the given sorted rows, ascending."""
    return (rows[:, None] * width + torch.arange(width, device=rows.device)).reshape(-1)


class Directions:
    """Regenerates the step's directions; holds the per-step record of how embeddings were used."""

    def __init__(self, distribution: str = "gaussian") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(
                f"unknown distribution {distribution!r}; choose one of: {', '.join(DISTRIBUTIONS)}"
            )
        self.distribution = distribution
        self._generators: dict[torch.device, torch.Generator] = {}
        self._tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self.new_step()

    def new_step(self) -> None:
        """Forget the previous step's row sets and uses."""
        self.rows: dict[int, torch.Tensor] = {}  # index -> R, the rows of the step's first lookup
        self.looked_up: dict[int, torch.Tensor] = {}  # index -> every row a lookup read this step
        self.plain: set[int] = set()  # first use was not a lookup: the plain dense z all step
        self.read_whole: set[int] = set()  # has a row set, and something also read the whole matrix

    # -- bookkeeping of what ran ---------------------------------------------------------------
    def note_lookup(self, index: int, used: torch.Tensor) -> None:
        """A lookup of rows ``used`` (sorted, unique); the step's first one fixes ``R``."""
        if index not in self.rows:
            self.rows[index] = self.looked_up[index] = used
        elif not bool(torch.isin(used, self.looked_up[index]).all()):
            self.looked_up[index] = torch.unique(torch.cat([self.looked_up[index], used]))

    def note_whole_use(self, index: int) -> None:
        """Something read the whole tensor (a module holding it, or any read outside a module)."""
        if index in self.rows:
            self.read_whole.add(index)
        else:
            self.plain.add(index)

    def sparse_rows(self, index: int) -> torch.Tensor | None:
        """The rows to update when every use of parameter ``index`` this step was a lookup, else None."""
        if index in self.rows and index not in self.read_whole:
            return self.looked_up[index]
        return None

    # -- z ---------------------------------------------------------------------------------------
    def generator(self, device: torch.device) -> torch.Generator:
        """A private generator for ``device`` (reseeded before every use, never the global one)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen

    def draw(
        self,
        shape: tuple[int, ...],
        gen: torch.Generator,
        device: torch.device,
        dtype: torch.dtype,
        scale: float = 1.0,
    ) -> torch.Tensor:
        """``scale·z`` of ``shape`` from ``gen`` (already seeded), in ``dtype``: z ~ N(0, I) or ±1
        (for ±1 the scale is folded into the table: no pass over z for it)."""
        if self.distribution == "gaussian":
            z = torch.randn(shape, generator=gen, device=device, dtype=dtype)
            return z if scale == 1.0 else z.mul_(scale)
        n = math.prod(shape)
        # 64 random bits per int64 (the full range: random_() alone leaves the sign bit 0), then each
        # byte indexes the ±1 table: one gather writes z, no per-element random number
        words = torch.empty((n + 63) // 64, dtype=torch.int64, device=device)
        words.random_(-(2**63), None, generator=gen)
        table = self._tables.get((device, dtype))
        if table is None:
            table = self._tables[(device, dtype)] = _sign_table(device, dtype)
        if scale != 1.0:
            table = table * scale  # ±scale, exactly scale·z
        return table.index_select(0, words.view(torch.uint8).long()).view(-1)[:n].view(shape)

    def _stream(
        self, data: torch.Tensor, base: int, scale: float = 1.0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, view, z)`` covering ``data``: N(0, I) in the work dtype from seed ``base``, in
        chunks of ``CHUNK`` elements (chunk c from ``mix(base, c)``) when ``data`` is larger."""
        gen = self.generator(data.device)
        dtype = work_dtype(data.dtype)
        if data.numel() <= CHUNK or not data.is_contiguous():
            gen.manual_seed(base)
            yield 0, data, self.draw(data.shape, gen, data.device, dtype, scale)
            return
        flat = data.view(-1)
        for c, start in enumerate(range(0, flat.numel(), CHUNK)):
            part = flat[start : start + CHUNK]
            gen.manual_seed(mix(base, c))
            yield start, part, self.draw(part.shape, gen, data.device, dtype, scale)

    def _row_draw(self, data: torch.Tensor, seed: int, index: int) -> torch.Tensor:
        """z on the row set R: one ``(|R|, dim)`` draw from ``mix(seed, index)``."""
        gen = self.generator(data.device)
        gen.manual_seed(mix(seed, index))
        shape = (len(self.rows[index]), *data.shape[1:])
        return self.draw(shape, gen, data.device, work_dtype(data.dtype))

    def chunks(
        self, data: torch.Tensor, seed: int, index: int, scale: float = 1.0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, view, scale·z)`` chunks of parameter ``index``'s whole direction for ``seed``."""
        base = mix(seed, index)
        rows = self.rows.get(index)
        if rows is None:
            yield from self._stream(data, base, scale)
            return
        positions = _flat_rows(rows, math.prod(data.shape[1:]))
        on_rows = self._row_draw(data, seed, index).reshape(-1)
        for start, part, z in self._stream(data, mix(base, _REST)):
            lo, hi = torch.searchsorted(
                positions, positions.new_tensor([start, start + part.numel()])
            ).tolist()
            if hi > lo:
                z.view(-1)[positions[lo:hi] - start] = on_rows[lo:hi]
            yield start, part, z if scale == 1.0 else z.mul_(scale)

    def range_chunks(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
        index: int,
        lo: int,
        hi: int,
        scale: float = 1.0,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """``(offset, scale·z)`` pieces of flat positions ``[lo, hi)`` of the plain (dense) direction of
        a parameter of ``shape`` (offset counted from ``lo``): exactly the values :meth:`chunks` gives
        the whole parameter there. A rank holding rows of an FSDP2-sharded parameter draws only the
        chunks that overlap its rows (a parameter up to ``CHUNK`` elements is one draw, sliced), so
        every rank sees its part of the same z and the temporary buffer never exceeds one chunk."""
        numel = math.prod(shape)
        if hi <= lo:
            return
        gen = self.generator(device)
        dtype = work_dtype(dtype)
        base = mix(seed, index)
        if numel <= CHUNK:
            gen.manual_seed(base)
            yield 0, self.draw(tuple(shape), gen, device, dtype, scale).view(-1)[lo:hi]
            return
        for c in range(lo // CHUNK, (hi - 1) // CHUNK + 1):
            start = c * CHUNK
            size = min(CHUNK, numel - start)
            gen.manual_seed(mix(base, c))
            z = self.draw((size,), gen, device, dtype, scale)
            a, b = max(lo, start), min(hi, start + size)
            yield a - lo, z[a - start : b - start]

    def on_rows(self, data: torch.Tensor, seed: int, index: int, rows: torch.Tensor) -> torch.Tensor:
        """z of an embedding (with a row set this step) on the given sorted, unique rows."""
        R = self.rows[index]
        if rows.shape == R.shape and torch.equal(rows, R):
            return self._row_draw(data, seed, index)
        pos = torch.searchsorted(R, rows).clamp_max(len(R) - 1)
        in_R = R[pos] == rows
        out = torch.empty((len(rows), *data.shape[1:]), device=data.device, dtype=work_dtype(data.dtype))
        if bool(in_R.any()):
            out[in_R] = self._row_draw(data, seed, index)[pos[in_R]]
        if not bool(in_R.all()):  # rows outside R: the second stream (one pass over its chunks)
            others = rows[~in_R]
            positions = _flat_rows(others, math.prod(data.shape[1:]))
            values = torch.empty(positions.numel(), device=data.device, dtype=out.dtype)
            for start, part, z in self._stream(data, mix(mix(seed, index), _REST)):
                lo, hi = torch.searchsorted(
                    positions, positions.new_tensor([start, start + part.numel()])
                ).tolist()
                if hi > lo:
                    values[lo:hi] = z.reshape(-1)[positions[lo:hi] - start]
            out[~in_R] = values.view(len(others), *data.shape[1:])
        return out

    def perturbed(self, data: torch.Tensor, seed: int, index: int, scale: float) -> torch.Tensor:
        """A new tensor ``θ + scale z`` (arithmetic in the work dtype, cast to the parameter's dtype)."""
        if data.numel() <= CHUNK or not data.is_contiguous():
            # z's buffer is reused for the result: one parameter-sized allocation (two for bf16/fp16)
            ((_, _, z),) = self.chunks(data, seed, index, scale)
            return z.add_(data).to(data.dtype)
        out = torch.empty_like(data)
        flat = out.view(-1)
        for start, part, z in self.chunks(data, seed, index, scale):
            flat[start : start + part.numel()].copy_(z.add_(part))
        return out
