"""data.blend: the blend schedule's counts and closed form, and the training loader over several datasets."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepseek_pt.data import DataError, PretrainDataset, TrainLoader
from deepseek_pt.data.blend import RESOLUTION, BlendSchedule, BlendWeightError, blend_counts

T = 32


@pytest.mark.parametrize("weights, counts", [
    ([1.0], [1]), ([1, 1], [1, 1]), ([3, 1], [3, 1]), ([0.5, 0.25, 0.25], [2, 1, 1]), ([0.7, 0.3], [7, 3]),
    ([1 / 3, 2 / 3], [1, 2]), ([2, 1], [2, 1]), ([60000, 1], [60000, 1]),
    ([1, 2 ** 0.5], [13573, 19195]),  # irrational: 65536ths by largest remainders (27146, 38390), halved
    ([1, 2000, 4000], [1, 2000, 4000]), ([1, 40000, 40000], [1, 32768, 32767]),  # 1:40000:40000 needs > 65536
])
def test_counts_are_the_weights_proportions(weights, counts):
    assert blend_counts(weights) == counts


@pytest.mark.parametrize("weights, source, reason", [
    ([1, 0], 1, "must be positive"), ([-1, 1], 0, "must be positive"), ([1, float("nan")], 1, "must be positive"),
    ([1, float("inf")], 1, "must be positive"), ([1, 1e-6], 1, "below 1/65536 of the total"),
    ([200000, 1], 1, "below 1/65536"),
])
def test_unusable_weights_name_their_source(weights, source, reason):
    with pytest.raises(BlendWeightError, match=reason) as err:
        blend_counts(weights)
    assert err.value.source == source


@pytest.mark.parametrize("weights", [[0.7, 0.3], [5, 3, 2], [1, 1, 1, 1, 3]])
def test_schedule_closed_form_matches_enumeration_and_stays_even(weights):
    sched = BlendSchedule(weights)
    n = 3 * sched.period + 17 if sched.period < 100 else 2 * RESOLUTION + 5
    sources, positions = sched.locate(np.arange(n))
    for j in range(len(weights)):  # source j's k-th position in the global order reads its k-th sample
        assert positions[sources == j].tolist() == list(range(int((sources == j).sum())))
    share = np.asarray(sched.counts) / sched.period
    taken = np.stack([np.cumsum(sources == j) for j in range(len(weights))], 1)
    assert np.abs(taken - np.arange(1, n + 1)[:, None] * share).max() < 1  # never a full sample off its share
    for stop in (0, 1, sched.period - 1, sched.period, n):
        assert sched.consumed(stop) == np.bincount(sources[:stop], minlength=len(weights)).tolist()


# ------------------------------------------------------------------------------------------------
# The loader over a blend of two corpora: the smoke shards' train split and their mirrored copy's val split


@pytest.fixture(scope="module")
def two(smoke_shards, mirrored_smoke_shards):
    return [PretrainDataset(smoke_shards, "train", T), PretrainDataset(mirrored_smoke_shards, "val", T, True)]


def rows_of(ds) -> dict[tuple, int]:
    return {tuple(ds[i][:-1].tolist()): i for i in range(len(ds))}


def test_blend_reads_each_source_at_its_share_in_its_own_order(two):
    train, val = two
    blend = TrainLoader(two, micro_batch_size=8, seed=5, weights=[0.75, 0.25])
    x = torch.cat([next(blend)[0] for _ in range(3 * len(val))])  # the small source runs through 6 epochs
    known = [rows_of(train), rows_of(val)]
    assert not known[0].keys() & known[1].keys()
    source = [0 if tuple(r) in known[0] else 1 for r in x.tolist()]
    assert all(tuple(r) in known[s] for r, s in zip(x.tolist(), source, strict=True))
    assert source[:8] == [0, 0, 1, 0, 0, 0, 1, 0] and source.count(1) == len(x) // 4
    # each source's samples, in order, are what a loader over it alone (its seed for source 1) reads
    for j, ds in enumerate(two):
        got = [known[j][tuple(r)] for r, s in zip(x.tolist(), source, strict=True) if s == j]
        alone = TrainLoader(ds, 1, seed=5 ^ (j * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        assert got == [known[j][tuple(next(alone)[0][0].tolist())] for _ in got]
    assert blend.epochs == [len(x) * 3 // 4 // len(train), len(x) // 4 // len(val)]


def test_blend_resumes_on_another_world_size(two):
    def global_rows(b, w, steps, state=None):
        loaders = [TrainLoader(two, b, r, w, seed=1, weights=[2, 1]) for r in range(w)]
        for lo in loaders:
            if state:
                lo.load_state_dict(state)
        return [torch.cat([next(lo)[0] for lo in loaders]) for _ in range(steps)], loaders[0].state_dict()

    reference, _ = global_rows(6, 1, 20)
    _, state = global_rows(3, 2, 7)
    state = json.loads(json.dumps(state))  # as a checkpoint stores it
    assert state["consumed_samples"] == 42 and state["num_samples"] == [len(d) for d in two]
    after, _ = global_rows(2, 3, 13, state)
    assert all(torch.equal(a, r) for a, r in zip(after, reference[7:], strict=True))


def test_blend_state_refuses_other_weights_or_sources(two):
    state = TrainLoader(two, 2, weights=[2, 1]).state_dict()
    with pytest.raises(DataError, match=r"blend counts: checkpoint \[2, 1\] for sources .*, now \[1, 1\]"):
        TrainLoader(two, 2, weights=[1, 1]).load_state_dict(state)
    with pytest.raises(DataError, match=rf"sources no longer trained on \(shard fingerprints\) \['{two[1].fingerprint}'\]"):
        TrainLoader(two[:1], 2).load_state_dict(state)  # a one-dataset run from a blend's checkpoint
    with pytest.raises(DataError, match=rf"new sources \['{two[1].fingerprint}'\]"):
        TrainLoader(two, 2, weights=[2, 1]).load_state_dict(TrainLoader(two[0], 2).state_dict())


def read_rows(loader, steps: int) -> list[tuple]:
    return [tuple(r) for _ in range(steps) for r in next(loader)[0].tolist()]


def test_new_data_at_a_resume_continues_each_sources_order(two):
    """One dataset for 10 steps; then a 1:1 blend with a second one (new_data); then back to the first alone. The
    first source's samples over the three phases are its own order without a gap or a repeat, the second starts
    at its beginning, and a plain resume inside a phase, on another world size, changes nothing."""
    web = two[0]
    alone = {j: TrainLoader(ds, 1, seed=3 ^ (j * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) for j, ds in enumerate(two)}
    orders = {j: read_rows(lo, 400) for j, lo in alone.items()}  # each source's own order, one sample per step

    first = TrainLoader(web, 4, seed=3)
    rows = read_rows(first, 10)
    second = TrainLoader(two, 4, seed=3)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())), new_data=True)
    assert (second.phase_start, second.offsets) == (40, [40, 0])
    rows += read_rows(second, 5)
    state = json.loads(json.dumps(second.state_dict()))  # a checkpoint inside the blend's phase
    assert (state["phase_start"], state["source_offsets"], state["epoch"]) == (40, [40, 0], [0, 0])
    resumed = [TrainLoader(two, 2, r, 2, seed=3) for r in range(2)]
    for lo in resumed:
        lo.load_state_dict(state)  # the same data: no new_data needed
    rows_after = [r for _ in range(5) for lo in resumed for r in next(lo)[0].tolist()]
    rows += [tuple(r) for r in rows_after]
    assert resumed[0].source_consumed == [60, 20]
    third = TrainLoader(web, 4, seed=3)
    third.load_state_dict(json.loads(json.dumps(resumed[0].state_dict())), new_data=True)
    rows += read_rows(third, 5)
    assert third.state_dict()["source_offsets"] == [60] and third.epochs == [0]

    known = [set(orders[0]), set(orders[1])]
    from_web = [r for r in rows if r in known[0]]
    from_code = [r for r in rows if r in known[1]]
    assert len(from_web) + len(from_code) == len(rows) == 100
    assert from_web == orders[0][:80] and from_code == orders[1][:20]
    assert [r in known[1] for r in rows[40:48]] == [False, True] * 4  # 1:1 from step 11 on
def test_blend_loader_arguments(two, smoke_shards):
    with pytest.raises(DataError, match="3 weights for 2 datasets"):
        TrainLoader(two, 2, weights=[1, 1, 1])
    with pytest.raises(DataError, match="blend weights: source 1: weight must be positive"):
        TrainLoader(two, 2, weights=[1, 0])
    longer = PretrainDataset(smoke_shards, split="val", seq_len=T + 1)
    with pytest.raises(DataError, match=r"differ in seq_len: \[32, 33\]"):
        TrainLoader([two[0], longer], 2)


def test_new_data_follows_each_source_wherever_the_list_puts_it(two):
    """A source's order is seeded by an index the state keeps, not by its place in the list: swapped, or behind a
    removed source, each source goes on in its own order, through a later plain resume too, and reads its whole
    epoch without a repeat."""
    known, val = [set(rows_of(ds)) for ds in two], len(two[1])

    def resumed(state, datasets, new_data=True):
        loader = TrainLoader(datasets, 8, seed=4)
        loader.load_state_dict(json.loads(json.dumps(state)), new_data=new_data)
        return loader

    first = TrainLoader(two, 8, seed=4)
    head = read_rows(first, 5)  # 20 samples of each
    swapped = resumed(first.state_dict(), two[::-1])
    rows = head + read_rows(swapped, 3)
    rows += read_rows(resumed(swapped.state_dict(), two[::-1], new_data=False), (2 * val - len(rows)) // 8)
    for j in range(2):  # 2 * val samples at 1:1: val of each
        got = [r for r in rows if r in known[j]]
        assert len(got) == len(set(got)) == val

    alone = resumed(first.state_dict(), two[1:])
    got = [r for r in head + read_rows(alone, (val - 20) // 8) if r in known[1]]
    assert len(got) == len(set(got)) == 20 + (val - 20) // 8 * 8

    at_zero = resumed(TrainLoader(two, 8, seed=4).state_dict(), two[1:])  # changed before anything was read
    rows = read_rows(at_zero, 3) + read_rows(resumed(at_zero.state_dict(), two[1:], new_data=False), val // 8 - 3)
    assert len(rows) == len(set(rows)) == val


def test_a_source_removed_and_listed_again_goes_on_where_it_stopped(two):
    """A 1:1 blend, then the first source alone (the second retired), then the blend again: the second source's
    samples over the three phases are one stretch of its epoch, none read twice."""
    known, val = set(rows_of(two[1])), len(two[1])
    blend = TrainLoader(two, 8, seed=6)
    rows = read_rows(blend, 10)  # 40 of the second source
    alone = TrainLoader(two[:1], 8, seed=6)
    alone.load_state_dict(json.loads(json.dumps(blend.state_dict())), new_data=True)
    rows += read_rows(alone, 5)
    state = json.loads(json.dumps(alone.state_dict()))
    assert state["retired_sources"] == [[two[1].fingerprint, 1, 40]]
    again = TrainLoader(two, 8, seed=6)
    again.load_state_dict(state, new_data=True)
    assert again.offsets[1] == 40 and again.state_dict()["retired_sources"] == []
    rows += read_rows(again, (val - 40) // 4)
    got = [r for r in rows if r in known]
    assert len(got) == len(set(got)) == val
