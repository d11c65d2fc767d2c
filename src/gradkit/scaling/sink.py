"""What the noise-scale recorders feed: anything with :meth:`NoiseScale.update
<gradkit.scaling.noise_scale.NoiseScale.update>`'s signature. A protocol, so the recorders
(:mod:`gradkit.scaling.accumulation`, :mod:`gradkit.scaling.per_example`) need not import the
estimator that builds them."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["NoiseScaleSink"]


class NoiseScaleSink(Protocol):
    """Takes one two-batch-size measurement: ``|G_b|²`` at batch size ``b_small`` and ``|G_B|²`` at
    ``b_big``; returns the updated noise scale (None while not yet measurable)."""

    def update(self, small_sq_norm: Any, big_sq_norm: Any, b_small: float, b_big: float) -> float | None: ...
