"""Which source each position of a blended sample order reads, in O(1) per position whatever the run's length.

Weights become integer `counts` in their proportions, summing to `period` (exact for ratios of small integers,
else to 1/RESOLUTION). Every period of the global order holds exactly counts[j] samples of source j, laid
out by smooth weighted round robin, so the sources interleave evenly inside each micro-batch rather than in runs.
Source j's k-th sample of the whole run is then a closed form of the position, which is what makes the loader's
only state, the number of positions consumed, enough to resume (Megatron's blended datasets instead build an
index array per run length).
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

RESOLUTION = 1 << 16
"""Weights that are not ratios of small integers are honoured to 1/RESOLUTION of the total."""


class BlendWeightError(ValueError):
    """A weight that cannot be honoured: `source` is its index, `reason` what is wrong with it."""

    def __init__(self, source: int, reason: str):
        super().__init__(f"source {source}: {reason}")
        self.source, self.reason = source, reason


def blend_counts(weights: Sequence[float]) -> list[int]:
    """Integer counts in the weights' proportions, reduced by their gcd: exact where the weights are ratios of small
    integers (2:1, 0.7:0.3, 1/3:2/3), else each weight's share of RESOLUTION positions by largest remainders."""
    for j, w in enumerate(weights):
        if not (math.isfinite(w) and w > 0):
            raise BlendWeightError(j, f"weight must be positive and finite, got {w}")
    ratios = [Fraction(w).limit_denominator(1000) for w in weights]
    if all(abs(r - w) <= 1e-12 * w for r, w in zip(ratios, weights, strict=True)):
        scale = math.lcm(*(r.denominator for r in ratios))
        counts = [int(r * scale) for r in ratios]
        g = math.gcd(*counts)
        if sum(counts) // g <= RESOLUTION:
            return [c // g for c in counts]
    total = math.fsum(weights)
    exact = [w / total * RESOLUTION for w in weights]
    counts = [math.floor(e) for e in exact]
    by_remainder = sorted(range(len(weights)), key=lambda j: (counts[j] - exact[j], j))
    for j in by_remainder[:RESOLUTION - sum(counts)]:
        counts[j] += 1
    for j, c in enumerate(counts):
        if c == 0:
            raise BlendWeightError(j, f"weight {weights[j]} is below 1/{RESOLUTION} of the total ({total}) and "
                                      "would never be read")
    g = math.gcd(*counts)
    return [c // g for c in counts]


class BlendSchedule:
    """`locate(positions)` -> (source of each position, its position in that source's own order)."""

    def __init__(self, weights: Sequence[float]):
        self.counts = blend_counts(weights)
        self.period = sum(self.counts)
        source = np.empty(self.period, dtype=np.int64)
        index = np.empty(self.period, dtype=np.int64)
        credit, taken = [0] * len(self.counts), [0] * len(self.counts)
        for p in range(self.period):  # smooth weighted round robin: exactly counts[j] picks of j per period
            for j, c in enumerate(self.counts):
                credit[j] += c
            j = max(range(len(credit)), key=credit.__getitem__)
            credit[j] -= self.period
            source[p], index[p] = j, taken[j]
            taken[j] += 1
        self._source, self._index = source, index
        self._counts = np.asarray(self.counts, dtype=np.int64)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cycles, offsets = np.divmod(np.asarray(positions, dtype=np.int64), self.period)
        source = self._source[offsets]
        return source, cycles * self._counts[source] + self._index[offsets]

    def consumed(self, positions: int) -> list[int]:
        """How many samples of each source the first `positions` positions read."""
        cycles, offset = divmod(positions, self.period)
        head = np.bincount(self._source[:offset], minlength=len(self.counts))
        return [cycles * c + int(h) for c, h in zip(self.counts, head, strict=True)]
