"""Data-parallel batches: the resumable shuffled training stream and the validation iterator.

Global order: epoch e is the permutation Permutation(len(ds), seed, e) of the sample indices, and
the epochs are concatenated into one infinite sequence. Each global micro-step takes the next
B * W positions of it and rank r reads positions [r*B, (r+1)*B) of those. The only state is the
number of positions consumed, so a run resumed with another world size W continues the same
global sequence, and each rank's batch depends only on (seed, consumed_samples, B, W, r).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .dataset import PretrainDataset
from .format import DataError
from .shuffle import Permutation

_STATE_VERSION = 1


def _check_dp(micro_batch_size: int, dp_rank: int, dp_world: int) -> None:
    if micro_batch_size <= 0:
        raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if dp_world <= 0 or not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")


def _to_batch(ds: PretrainDataset, samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.empty((len(samples), ds.seq_len + 1), dtype=ds.manifest.np_dtype)
    for row, i in enumerate(samples):
        ds.read(int(i), out=buf[row])
    x = torch.from_numpy(buf.astype(np.int64))
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


class TrainLoader:
    """Infinite iterator of (inputs [B, T], targets [B, T]) int64 batches for one data-parallel rank."""

    def __init__(self, dataset: PretrainDataset, micro_batch_size: int, dp_rank: int = 0,
                 dp_world: int = 1, seed: int = 0, consumed_samples: int = 0):
        _check_dp(micro_batch_size, dp_rank, dp_world)
        self.dataset, self.seed = dataset, seed
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        self.num_samples = len(dataset)
        if consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.consumed_samples = consumed_samples
        self._perm, self._perm_epoch = None, -1

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read."""
        return self.consumed_samples // self.num_samples

    def _permutation(self, epoch: int) -> Permutation:
        if self._perm_epoch != epoch:
            self._perm, self._perm_epoch = Permutation(self.num_samples, self.seed, epoch), epoch
        return self._perm

    def global_indices(self, start: int, count: int) -> np.ndarray:
        """Sample indices at global positions [start, start + count) of the shuffled sequence."""
        positions = np.arange(start, start + count, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_samples)
        out = np.empty(count, dtype=np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._permutation(int(e))(offsets[sel])
        return out

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.micro_batch_size
        samples = self.global_indices(self.consumed_samples + self.dp_rank * b, b)
        self.consumed_samples += b * self.dp_world
        return _to_batch(self.dataset, samples)

    def state_dict(self) -> dict:
        ds = self.dataset
        return {"version": _STATE_VERSION, "consumed_samples": self.consumed_samples, "epoch": self.epoch,
                "seed": self.seed, "num_samples": self.num_samples, "seq_len": ds.seq_len,
                "split": ds.split, "data_fingerprint": ds.fingerprint}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at state["consumed_samples"]. With strict (the default), refuse a state saved on
        other data, sequence length or seed: its consumed_samples would point into another order."""
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"loader state: consumed_samples must be a non-negative int, got {consumed!r}")
        if strict:
            mine = self.state_dict()
            diffs = [f"{k}: checkpoint {state.get(k)!r}, now {mine[k]!r}"
                     for k in ("seed", "seq_len", "num_samples", "data_fingerprint") if state.get(k) != mine[k]]
            if diffs:
                raise DataError(f"loader state does not match this data ({self.dataset.manifest.path}, split "
                                f"{self.dataset.split!r}): {'; '.join(diffs)}; pass strict=False to "
                                "continue at the same consumed_samples on the new data anyway")
        self.consumed_samples = consumed


def val_batches(path: str | Path, split: str = "val", seq_len: int = 2048, micro_batch_size: int = 1,
                dp_rank: int = 0, dp_world: int = 1, max_batches: int | None = None,
                verify_checksums: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's samples in order, B * W per global step, rank r taking [r*B, (r+1)*B) of each.

    Every rank yields the same number of batches (min(steps, max_batches), incomplete final
    global steps dropped), so collective ops in evaluation never wait on a rank that stopped early.
    """
    _check_dp(micro_batch_size, dp_rank, dp_world)
    ds = PretrainDataset(path, split=split, seq_len=seq_len, verify_checksums=verify_checksums)
    per_step = micro_batch_size * dp_world
    steps = len(ds) // per_step
    if steps == 0:
        raise DataError(f"{ds.manifest.path}: split {split!r} has {len(ds)} samples of {seq_len + 1} tokens, "
                        f"fewer than one global batch (micro_batch_size {micro_batch_size} x dp_world {dp_world})")
    if max_batches is not None:
        steps = min(steps, max_batches)

    def batches():
        for step in range(steps):
            start = step * per_step + dp_rank * micro_batch_size
            yield _to_batch(ds, np.arange(start, start + micro_batch_size))

    return batches()


def to_device(batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`batches`, each tensor moved to `device`. To a GPU through pinned memory, without the host waiting: a copy
    from pageable memory synchronizes the stream, so every micro-step would let the GPU drain its queue and then
    wait for the host to launch the next forward. The caching host allocator keeps each pinned buffer until its
    copy is done."""
    pinned = device.type == "cuda"
    for batch in batches:
        yield tuple(t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device) for t in batch)
