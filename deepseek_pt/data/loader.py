"""Data-parallel batches: the resumable shuffled training stream and the validation iterator.

Global order: epoch e is the permutation Permutation(len(ds), seed, e) of the sample indices, and
the epochs are concatenated into one infinite sequence. Each global micro-step takes the next
B * W positions of it and rank r reads positions [r*B, (r+1)*B) of those. The only state is the
number of positions consumed, so a run resumed with another world size W continues the same
global sequence, and each rank's batch depends only on (seed, consumed_samples, B, W, r).

A blend of several datasets (data.blend) gives each source an order of its own, built the same way with a seed of
its own, and a BlendSchedule says which source each global position reads and how far into that source's order:
still a function of the position alone.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from .blend import BlendSchedule
from .dataset import PretrainDataset
from .format import DataError
from .shuffle import Permutation

_STATE_VERSION = 1


def _check_dp(micro_batch_size: int, dp_rank: int, dp_world: int) -> None:
    if micro_batch_size <= 0:
        raise DataError(f"micro_batch_size must be positive, got {micro_batch_size}")
    if dp_world <= 0 or not 0 <= dp_rank < dp_world:
        raise DataError(f"dp_rank {dp_rank} is not in [0, dp_world={dp_world})")


def _to_batch(datasets: Sequence[PretrainDataset], sources: np.ndarray,
              samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    buf = np.empty((len(samples), datasets[0].seq_len + 1), dtype=np.int64)
    for row, (j, i) in enumerate(zip(sources.tolist(), samples.tolist(), strict=True)):
        datasets[j].read(i, out=buf[row])
    x = torch.from_numpy(buf)
    return x[:, :-1].contiguous(), x[:, 1:].contiguous()


def source_seed(seed: int, source: int) -> int:
    """Source j's order seed: the run's seed for the first (a one-dataset run's order is a blend's first source's)."""
    return seed ^ (source * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF


class TrainLoader:
    """Infinite iterator of (inputs [B, T], targets [B, T]) int64 batches for one data-parallel rank, over one
    dataset or a weighted blend of several (`weights`, one per dataset, normalised; default equal)."""

    def __init__(self, datasets: PretrainDataset | Sequence[PretrainDataset], micro_batch_size: int,
                 dp_rank: int = 0, dp_world: int = 1, seed: int = 0, consumed_samples: int = 0,
                 weights: Sequence[float] | None = None):
        _check_dp(micro_batch_size, dp_rank, dp_world)
        self.datasets = [datasets] if isinstance(datasets, PretrainDataset) else list(datasets)
        if not self.datasets:
            raise DataError("a training loader needs at least one dataset")
        if len({ds.seq_len for ds in self.datasets}) > 1:
            raise DataError(f"blended datasets differ in seq_len: {[ds.seq_len for ds in self.datasets]}")
        weights = [1.0] * len(self.datasets) if weights is None else list(weights)
        if len(weights) != len(self.datasets):
            raise DataError(f"{len(weights)} weights for {len(self.datasets)} datasets")
        try:
            self.schedule = BlendSchedule(weights)
        except ValueError as e:
            raise DataError(f"blend weights: {e}") from None
        self.seed = seed
        self.micro_batch_size, self.dp_rank, self.dp_world = micro_batch_size, dp_rank, dp_world
        if consumed_samples < 0:
            raise DataError(f"consumed_samples must be >= 0, got {consumed_samples}")
        self.consumed_samples = consumed_samples
        self._perms: dict[tuple[int, int], Permutation] = {}

    @property
    def epochs(self) -> list[int]:
        """Each source's epoch of its next sample."""
        return [n // len(ds) for n, ds in zip(self.schedule.consumed(self.consumed_samples), self.datasets,
                                               strict=True)]

    def _permutation(self, source: int, epoch: int) -> Permutation:
        perm = self._perms.get((source, epoch))
        if perm is None:  # an epoch boundary inside a batch needs two at once; older ones are done with
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source or k[1] >= epoch - 1}
            perm = self._perms[source, epoch] = Permutation(len(self.datasets[source]), source_seed(self.seed, source),
                                                            epoch)
        return perm

    def global_indices(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index) at global positions [start, start + count) of the shuffled sequence."""
        sources, positions = self.schedule.locate(np.arange(start, start + count, dtype=np.int64))
        out = np.empty(count, dtype=np.int64)
        for j in np.unique(sources).tolist():
            at = sources == j
            epochs, offsets = np.divmod(positions[at], len(self.datasets[j]))
            picked = np.empty(len(offsets), dtype=np.int64)
            for e in np.unique(epochs).tolist():
                sel = epochs == e
                picked[sel] = self._permutation(j, e)(offsets[sel])
            out[at] = picked
        return sources, out

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.micro_batch_size
        sources, samples = self.global_indices(self.consumed_samples + self.dp_rank * b, b)
        self.consumed_samples += b * self.dp_world
        return _to_batch(self.datasets, sources, samples)

    def state_dict(self) -> dict:
        """A one-dataset run's keys are scalars; a blend's num_samples, epoch and split are lists, one per source,
        and its fingerprint covers every source's data and the blend's counts."""
        ds = self.datasets
        state = {"version": _STATE_VERSION, "consumed_samples": self.consumed_samples, "seed": self.seed,
                 "seq_len": ds[0].seq_len}
        if len(ds) == 1:
            return {**state, "epoch": self.epochs[0], "num_samples": len(ds[0]), "split": ds[0].split,
                    "data_fingerprint": ds[0].fingerprint}
        blend = json.dumps([[d.fingerprint for d in ds], self.schedule.counts])
        return {**state, "epoch": self.epochs, "num_samples": [len(d) for d in ds], "split": [d.split for d in ds],
                "blend_counts": self.schedule.counts,
                "data_fingerprint": hashlib.sha256(blend.encode()).hexdigest()[:16]}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Resume at state["consumed_samples"]. With strict (the default), refuse a state saved on
        other data, sequence length, seed or blend: its consumed_samples would point into another order."""
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"loader state: consumed_samples must be a non-negative int, got {consumed!r}")
        if strict:
            mine = self.state_dict()
            diffs = [f"{k}: checkpoint {state.get(k)!r}, now {mine.get(k)!r}"
                     for k in ("seed", "seq_len", "num_samples", "blend_counts", "data_fingerprint")
                     if state.get(k) != mine.get(k)]
            if diffs:
                where = ", ".join(f"{d.manifest.path} split {d.split!r}" for d in self.datasets)
                raise DataError(f"loader state does not match this data ({where}): {'; '.join(diffs)}; pass "
                                "strict=False to continue at the same consumed_samples on the new data anyway")
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
            yield _to_batch([ds], np.zeros(micro_batch_size, dtype=np.int64),
                            np.arange(start, start + micro_batch_size))

    return batches()


def to_device(batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`batches`, each tensor moved to `device`. To a GPU through pinned memory, without the host waiting: a copy
    from pageable memory synchronizes the stream, so every micro-step would let the GPU drain its queue and then
    wait for the host to launch the next forward. The caching host allocator keeps each pinned buffer until its
    copy is done."""
    pinned = device.type == "cuda"
    for batch in batches:
        yield tuple(t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device) for t in batch)
