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

import itertools
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


class NewDataError(DataError):
    """A loader state saved on other training data, which TrainLoader.load_state_dict(new_data=True) would accept."""


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
        # Where this data took over from other data, at a resume that changed it (load_state_dict), and how many
        # samples of each source were read before then: the schedule runs from phase_start, each source from its
        # offset in its own order.
        self.phase_start, self.offsets = 0, [0] * len(self.datasets)
        # What each source's order mixes into the seed: its index, kept across a data change so that a source moved
        # to another place in the list (or behind a removed one) goes on in the order it was reading.
        self.source_ids = list(range(len(self.datasets)))
        # Sources an earlier change removed, as [fingerprint, seed index, samples read]: one listed again later goes
        # on where it stopped rather than re-reading what it read.
        self.retired: list[list] = []
        self._perms: dict[tuple[int, int], Permutation] = {}

    @property
    def source_consumed(self) -> list[int]:
        """How many samples of each source the run has read."""
        return self.source_reads_at(self.consumed_samples)

    def source_reads_at(self, consumed_samples: int) -> list[int]:
        """How many samples of each source the run will have read once `consumed_samples` global positions are."""
        return _samples_read(self.schedule, self.offsets, self.phase_start, consumed_samples)

    @property
    def epochs(self) -> list[int]:
        """Each source's epoch of its next sample."""
        return [n // len(ds) for n, ds in zip(self.source_consumed, self.datasets, strict=True)]

    def _permutation(self, source: int, epoch: int) -> Permutation:
        perm = self._perms.get((source, epoch))
        if perm is None:  # an epoch boundary inside a batch needs two at once; older ones are done with
            self._perms = {k: v for k, v in self._perms.items() if k[0] != source or k[1] >= epoch - 1}
            seed = source_seed(self.seed, self.source_ids[source])
            perm = self._perms[source, epoch] = Permutation(len(self.datasets[source]), seed, epoch)
        return perm

    def global_indices(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, sample index) at global positions [start, start + count) of the shuffled sequence."""
        sources, positions = self.schedule.locate(np.arange(start, start + count, dtype=np.int64) - self.phase_start)
        positions += np.asarray(self.offsets, dtype=np.int64)[sources]
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
        """One dataset read from the start keeps the scalar keys of a one-dataset run (data_fingerprint: its
        shards'); otherwise num_samples, epoch, split and source_fingerprints are lists, one per source, beside the
        blend's counts, the phase (phase_start, source_offsets), the sources' seed indices (source_ids) and the sources
        removed at earlier changes (retired_sources)."""
        ds = self.datasets
        state = {"version": _STATE_VERSION, "consumed_samples": self.consumed_samples, "seed": self.seed,
                 "seq_len": ds[0].seq_len}
        if len(ds) == 1 and self.phase_start == 0 and self.source_ids == [0] and not self.retired:
            return {**state, "epoch": self.epochs[0], "num_samples": len(ds[0]), "split": ds[0].split,
                    "data_fingerprint": ds[0].fingerprint}
        return {**state, "epoch": self.epochs, "num_samples": [len(d) for d in ds], "split": [d.split for d in ds],
                "source_fingerprints": [d.fingerprint for d in ds], "blend_counts": self.schedule.counts,
                "phase_start": self.phase_start, "source_offsets": self.offsets, "source_ids": self.source_ids,
                "retired_sources": self.retired}

    def load_state_dict(self, state: dict, new_data: bool = False) -> bool:
        """Resume at state["consumed_samples"]. A state saved on other data (other sources, shards or weights) is
        refused, naming the difference, unless new_data: then from that sample count on this data takes over, each
        source found in the state (same shards, also one an earlier change removed) continuing its own order where
        it stopped, a new one from its start; True says it did. Another seed or seq_len is always refused: every
        source's order would change under it."""
        consumed = state.get("consumed_samples")
        if not isinstance(consumed, int) or isinstance(consumed, bool) or consumed < 0:
            raise DataError(f"loader state: consumed_samples must be a non-negative int, got {consumed!r}")
        where = ", ".join(f"{d.manifest.path} split {d.split!r}" for d in self.datasets)
        diffs = [f"{k}: checkpoint {state.get(k)!r}, now {v!r}" for k, v in (("seed", self.seed),
                 ("seq_len", self.datasets[0].seq_len)) if state.get(k) != v]
        if diffs:
            raise DataError(f"loader state does not match this data ({where}): {'; '.join(diffs)}")
        saved = _saved_sources(state)
        mine = [d.fingerprint for d in self.datasets]
        change = _data_change(saved, mine, self.schedule.counts, where)
        if change is None:
            self.phase_start, self.offsets, self.source_ids = saved["phase_start"], saved["offsets"], saved["ids"]
            self.retired = saved["retired"]
        elif not new_data:
            raise NewDataError(change)
        else:
            read: dict[str, list[tuple[int, int]]] = {}  # a source listed twice (the same shards) pairs up in order
            for fp, n, i in zip(saved["fingerprints"], saved["consumed_at"](consumed), saved["ids"], strict=True):
                read.setdefault(fp, []).append((n, i))
            for fp, i, n in saved["retired"]:
                read.setdefault(fp, []).append((n, i))
            kept = [read[fp].pop(0) if read.get(fp) else None for fp in mine]
            self.retired = [[fp, i, n] for fp, left in read.items() for n, i in left]
            taken = {k[1] for k in kept if k} | {i for _, i, _ in self.retired}
            free = (i for i in itertools.count() if i not in taken)
            self.phase_start, self.offsets = consumed, [k[0] if k else 0 for k in kept]
            self.source_ids = [k[1] if k else next(free) for k in kept]
        self.consumed_samples, self._perms = consumed, {}  # the source_ids may have changed
        return change is not None


def _samples_read(schedule: BlendSchedule, offsets: list[int], phase_start: int, samples: int) -> list[int]:
    """How many samples of each source a run has read after `samples` positions: those read before its phase
    began, and the phase's share since."""
    in_phase = schedule.consumed(samples - phase_start)
    return [o + n for o, n in zip(offsets, in_phase, strict=True)]


def _saved_sources(state: dict) -> dict:
    """A loader state's sources: fingerprints, blend counts, phase, seed indices, those retired, and a function
    giving how many samples of each the run had read at a sample count. States of one dataset read from the start
    (and of older versions) have only data_fingerprint."""
    fingerprints = state.get("source_fingerprints") or [state.get("data_fingerprint")]
    counts = state.get("blend_counts") or [1]
    phase_start = state.get("phase_start", 0)
    offsets = state.get("source_offsets") or [0] * len(fingerprints)
    ids = state.get("source_ids") or list(range(len(fingerprints)))
    retired = state.get("retired_sources") or []
    if not len(fingerprints) == len(counts) == len(offsets) == len(ids):
        raise DataError(f"loader state: sources {fingerprints}, blend_counts {counts}, source_offsets {offsets} and "
                        f"source_ids {ids} do not describe one blend")

    def consumed_at(samples: int) -> list[int]:
        return _samples_read(BlendSchedule(counts), offsets, phase_start, samples)

    return {"fingerprints": fingerprints, "counts": counts, "phase_start": phase_start, "offsets": offsets, "ids": ids,
            "retired": retired, "consumed_at": consumed_at}


def data_change(state: dict, fingerprints: list[str], counts: list[int], where: str) -> str | None:
    """Why a loader state was saved on other training data than the sources of these shard fingerprints (in order)
    and blend counts, described as `where`: what TrainLoader.load_state_dict refuses without new_data; None if it
    was not. For a check before any dataset is opened (a resume's, from the checkpoint's meta.json)."""
    return _data_change(_saved_sources(state), fingerprints, counts, where)


def _data_change(saved: dict, fingerprints: list[str], counts: list[int], where: str) -> str | None:
    if saved["fingerprints"] == fingerprints and saved["counts"] == counts:
        return None
    return (f"loader state was saved on other training data than this ({where}): "
            f"{_describe_change(saved, fingerprints, counts)}")


def _describe_change(saved: dict, fingerprints: list[str], counts: list[int]) -> str:
    gone = [fp for fp in saved["fingerprints"] if fp not in fingerprints]
    new = [fp for fp in fingerprints if fp not in saved["fingerprints"]]
    parts = [f"sources no longer trained on (shard fingerprints) {gone}"] if gone else []
    parts += [f"new sources {new}"] if new else []
    if not parts:
        parts = [(f"blend counts: checkpoint {saved['counts']} for sources {saved['fingerprints']}, now {counts} "
                  f"for {fingerprints}")]
    return "; ".join(parts)


def val_batches(path: str | Path, split: str = "val", seq_len: int = 2048, micro_batch_size: int = 1,
                dp_rank: int = 0, dp_world: int = 1,
                max_sequences: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split's first max_sequences samples (every one if None) in order, B * W per global step, rank r taking
    [r*B, (r+1)*B) of each: the same samples on any number of ranks, each read once.

    Every batch is [B, seq_len] and every rank yields ceil(n / (B * W)) of them, so that collective ops in evaluation
    never wait on a rank that ran out and compiled forwards see one shape. Rows past the n samples repeat the split's
    first sample with every target -100, which the loss skips: count tokens by the targets, not by the rows.
    """
    _check_dp(micro_batch_size, dp_rank, dp_world)
    if max_sequences is not None and max_sequences <= 0:
        raise DataError(f"max_sequences must be positive, got {max_sequences}")
    ds = PretrainDataset(path, split=split, seq_len=seq_len)
    if len(ds) == 0:
        raise DataError(f"{ds.manifest.path}: split {split!r} holds no sample of {seq_len + 1} tokens")
    n = len(ds) if max_sequences is None else min(len(ds), max_sequences)
    per_step = micro_batch_size * dp_world

    def batches():
        for step in range(-(-n // per_step)):
            start = step * per_step + dp_rank * micro_batch_size
            samples = np.arange(start, start + micro_batch_size)
            real = samples < n
            inputs, targets = _to_batch([ds], np.zeros(micro_batch_size, dtype=np.int64), np.where(real, samples, 0))
            targets[torch.from_numpy(~real)] = -100
            yield inputs, targets

    return batches()


def to_device(batches: Iterable[tuple[torch.Tensor, ...]], device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`batches`, each tensor moved to `device`. To a GPU through pinned memory, without the host waiting: a copy
    from pageable memory synchronizes the stream, so every micro-step would let the GPU drain its queue and then
    wait for the host to launch the next forward. The caching host allocator keeps each pinned buffer until its
    copy is done."""
    pinned = device.type == "cuda"
    for batch in batches:
        yield tuple(t.pin_memory().to(device, non_blocking=True) if pinned else t.to(device) for t in batch)
