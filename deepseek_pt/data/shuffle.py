"""Seeded permutation of [0, n) evaluated pointwise: O(1) memory whatever n.

A materialised permutation of a 10T-token corpus (billions of samples) would take tens of GB per
rank. Instead a balanced Feistel network over the smallest even-bit power-of-two domain >= n gives
a bijection; "cycle walking" (re-applying it until the value lands in [0, n)) restricts it to
[0, n) while staying a bijection. The domain is < 4n, so the expected walk is under 4 steps.
"""
from __future__ import annotations

import numpy as np

_ROUNDS = 6
_U64 = np.uint64


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a fast, well-avalanching bijection on uint64 (wraps on overflow)."""
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


class Permutation:
    """`perm(i)` for an array of positions i in [0, n): the seeded, epoch-specific permutation."""

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError(f"permutation size must be positive, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = _U64((1 << self.half) - 1)
        base = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        base = _mix64(base ^ np.array([epoch & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
        self.keys = [_mix64(base + _U64(r + 1))[0] for r in range(_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = _U64(self.half)
        left, right = x >> h, x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions must lie in [0, {self.n})")
        y = self._feistel(x.astype(np.uint64))
        out_of_range = y >= _U64(self.n)
        while out_of_range.any():
            y[out_of_range] = self._feistel(y[out_of_range])
            out_of_range = y >= _U64(self.n)
        return y.astype(np.int64)
