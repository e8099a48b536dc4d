"""Fixed-length training samples over the memory-mapped token shards of one split.

A split's shards, in manifest order, form one token stream of N tokens. Sample i is the window
tokens[i*T : i*T + T + 1] (stride T, consecutive windows share one token), so every token but the
first is a prediction target exactly once per epoch and len = (N - 1) // T. Windows run across
document and shard boundaries; documents are separated by the end-of-document token.
"""
from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from .format import DataError, Manifest, check_shard, open_manifest


def fingerprint(manifest: Manifest, split: str) -> str:
    """Identifies the exact token stream of the split (its non-empty shards' sha256s, in order), so that a checkpoint
    cannot silently resume on other data; from the manifest alone, for a check before the shards are opened."""
    return hashlib.sha256("".join(s.sha256 for s in manifest.shards(split) if s.num_tokens).encode()).hexdigest()[:16]


class PretrainDataset:
    """`len(ds)` samples of seq_len + 1 tokens; `ds[i]` is a LongTensor [seq_len + 1]."""

    def __init__(self, path: str | Path, split: str = "train", seq_len: int = 2048,
                 verify_checksums: bool = False, max_open_shards: int = 256):
        if seq_len <= 0:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.manifest: Manifest = open_manifest(path)
        self.split, self.seq_len = split, seq_len
        shards = self.manifest.shards(split)
        for shard in shards:  # sizes always: a truncated shard must never be read as data
            check_shard(self.manifest, shard, checksum=verify_checksums)
        self.shards = [s for s in shards if s.num_tokens]  # an empty file cannot be memory-mapped
        self.starts = np.cumsum([0] + [s.num_tokens for s in self.shards]).tolist()
        self.num_tokens = self.starts[-1]
        if self.num_tokens < seq_len + 1:
            raise DataError(f"{self.manifest.path}: split {split!r} has {self.num_tokens} tokens, "
                            f"fewer than one sample of seq_len + 1 = {seq_len + 1}")
        self._len = (self.num_tokens - 1) // seq_len
        self._max_open = max_open_shards
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()
        self.fingerprint = fingerprint(self.manifest, split)

    def __len__(self) -> int:
        return self._len

    def __getstate__(self):  # memory maps are reopened lazily after pickling (DataLoader workers)
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _map(self, k: int) -> np.memmap:
        """Shard k's memory map, keeping at most max_open_shards open (least recently used closes)."""
        m = self._maps.get(k)
        if m is None:
            # Checked at start, but a shard may go (deleted, moved, a mount lost) or shrink while a run reads it:
            # named here, not a FileNotFoundError traceback or a shape error (or a SIGBUS reading past its end).
            file, want = self.manifest.shard_file(self.shards[k]), self.shards[k].num_tokens
            try:
                m = np.memmap(file, dtype=self.manifest.np_dtype, mode="r")
            except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
                raise DataError(f"shard {file}: cannot be read ({getattr(e, 'strerror', None) or e}); it was "
                                "there when the run started: deleted, moved or unmounted since?") from None
            if len(m) != want:
                raise DataError(f"shard {file}: {len(m)} tokens, the manifest says {want} (truncated or replaced "
                                "since the run started)")
            self._maps[k] = m
            if len(self._maps) > self._max_open:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(k)
        return m

    def read(self, i: int, out: np.ndarray | None = None) -> np.ndarray:
        """Sample i as a numpy array in the shard dtype (written into `out` if given)."""
        if not 0 <= i < self._len:
            raise IndexError(f"sample {i} out of range [0, {self._len})")
        n = self.seq_len + 1
        if out is None:
            out = np.empty(n, dtype=self.manifest.np_dtype)
        pos, filled = i * self.seq_len, 0
        k = bisect.bisect_right(self.starts, pos) - 1
        while filled < n:
            lo = pos + filled - self.starts[k]
            take = min(n - filled, self.shards[k].num_tokens - lo)
            out[filled:filled + take] = self._map(k)[lo:lo + take]
            filled += take
            k += 1
        if out.max() >= self.manifest.vocab_size:
            self._raise_bad_id(i, out)
        return out

    def _raise_bad_id(self, i: int, sample: np.ndarray) -> None:
        j = int(np.argmax(sample >= self.manifest.vocab_size))
        pos = i * self.seq_len + j
        k = bisect.bisect_right(self.starts, pos) - 1
        raise DataError(f"shard {self.manifest.shard_file(self.shards[k])}: token {pos - self.starts[k]} "
                        f"has id {int(sample[j])} >= vocab_size {self.manifest.vocab_size} (corrupt shard)")

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.read(int(i)).astype(np.int64))
