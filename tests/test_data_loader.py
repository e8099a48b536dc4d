"""deepseek_pt.data: manifest validation, samples, shuffled resumable loader, validation batches."""
from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from deepseek_pt.data import DataError, PretrainDataset, TrainLoader, open_manifest, to_device, val_batches
from deepseek_pt.data.shuffle import Permutation

T = 32


def stream(d, split="train") -> np.ndarray:
    m = open_manifest(d)
    return np.concatenate([np.fromfile(m.shard_file(s), dtype=m.np_dtype) for s in m.shards(split)]).astype(np.int64)


@pytest.fixture
def shards(tmp_path, pydoc_data_dir):
    """A private copy of the pydoc shards, for tests that damage them."""
    return shutil.copytree(pydoc_data_dir.shards_dir, tmp_path / "shards")


def edit_manifest(d, edit) -> None:
    m = json.loads((d / "manifest.json").read_text())
    edit(m)
    (d / "manifest.json").write_text(json.dumps(m))


# ------------------------------------------------------------------------------------------------
# Manifest and dataset


def test_open_manifest(pydoc_data_dir):
    m = open_manifest(pydoc_data_dir.shards_dir)
    assert (m.vocab_size, m.dtype, m.bos_id, m.eos_id, m.pad_id) == (pydoc_data_dir.vocab_size, "uint16", 2, 3, 0)
    assert m.tokenizer_path == pydoc_data_dir.shards_dir / "tokenizer.model" and m.tokenizer_path.is_absolute()
    assert set(m.splits) == {"train", "val"} and len(m.splits["train"]) > 1
    assert open_manifest(pydoc_data_dir.shards_dir / "manifest.json").splits == m.splits


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(dtype="int8"), "dtype 'int8' is not one of uint16, uint32"),
    (lambda m: m.update(format_version=99), "format_version 99 is newer"),
    (lambda m: m.update(format_version=0), r"format_version 0 is not a version \(1 to 1\)"),
    (lambda m: m.update(vocab_size=70000), "vocab_size 70000 does not fit dtype uint16"),
    (lambda m: m["splits"]["train"][0].update(path="../x.bin"), r"splits.train\[0\]: path '../x.bin' must be relative"),
    (lambda m: m["splits"]["train"][1].update(num_tokens="7"), r"splits.train\[1\]: field 'num_tokens' has the wrong type"),
    (lambda m: m["splits"]["val"][0].update(dtype="uint32"), "differs from the manifest dtype"),
    (lambda m: m["splits"]["val"].append(m["splits"]["train"][0]), "listed twice"),
    (lambda m: m["tokenizer"].update(eos_id=5000), "eos_id 5000 is outside the vocabulary"),
    (lambda m: m.pop("splits"), "missing field 'splits'"),
    (lambda m: m.update(format="other"), "format is 'other', expected 'deepseek_pt.token_shards'"),
    (lambda m: m.update(vocab_size=0), "vocab_size must be positive, got 0"),
    (lambda m: m.update(vocab_size=True), "field 'vocab_size' has the wrong type: True"),
    (lambda m: m.update(doc_boundary="none"), "doc_boundary 'none' is not one of eos, bos_eos"),
    (lambda m: m["tokenizer"].pop("eos_id"), r"tokenizer: eos_id is required \(it marks document boundaries\)"),
    (lambda m: m["tokenizer"].update(eos_id=None), "tokenizer: eos_id is required"),
    (lambda m: m["splits"].update(val={}), "splits.val must be a list of shards"),
    (lambda m: m["splits"]["train"].__setitem__(0, "a.bin"), r"splits.train\[0\]: expected an object, got 'a.bin'"),
    (lambda m: m["splits"]["train"][0].update(num_docs=-1), r"splits.train\[0\]: negative num_tokens/num_docs"),
    (lambda m: m["splits"]["train"][0].update(sha256="ABC"), "sha256 'ABC' is not 64 lowercase hex digits"),
])
def test_bad_manifest_is_named(shards, edit, message):
    edit_manifest(shards, edit)
    with pytest.raises(DataError, match=message) as e:
        open_manifest(shards)
    assert str(shards / "manifest.json") in str(e.value)


def test_a_manifest_nested_too_deeply_is_named(shards):
    """Thousands of nested arrays in manifest.json were a RecursionError from inside json.loads."""
    (shards / "manifest.json").write_text('{"inputs": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(DataError, match=f"^{shards / 'manifest.json'}: nested too deeply"):
        open_manifest(shards)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["tokenizer"].update(eos_id=1024), "eos_id 1024 is outside the vocabulary"),
    (lambda m: m.update(vocab_size=65537), "vocab_size 65537 does not fit dtype uint16"),
])
def test_manifest_bounds_are_exact(shards, edit, message):
    """The bounds at their edge (pydoc's vocab_size is 1024): ids run 0 .. vocab_size - 1, so eos_id 1024 names no
    piece; uint16 holds ids 0 .. 65535, a vocabulary of 65536 at most, so 65537 pieces would wrap the last id to 0.
    The far-off values of test_bad_manifest_is_named pass a bound that is off by one."""
    edit_manifest(shards, edit)
    with pytest.raises(DataError, match=message):
        open_manifest(shards)


def test_a_shard_longer_than_its_manifest_entry_is_refused(shards):
    """A shard file with bytes past num_tokens x itemsize is not the file the manifest describes (another build's,
    or appended to): refused by size like a truncated one, not read as its first num_tokens tokens."""
    m = open_manifest(shards)
    victim = m.shard_file(m.shards("train")[2])
    with open(victim, "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(DataError, match=f"shard {victim}: too long: 32770 bytes, manifest says 16384 tokens"):
        PretrainDataset(shards, seq_len=T)


def test_missing_or_unfinished_manifest(tmp_path, shards):
    with pytest.raises(DataError, match=r"manifest.json: manifest not found$"):
        open_manifest(tmp_path / "nothing")
    (shards / "manifest.json").unlink()
    (shards / "build_log.jsonl").write_text("")
    with pytest.raises(DataError, match="build is incomplete: re-run build_shards.py"):
        PretrainDataset(shards, seq_len=T)


def test_samples_are_stride_t_windows_across_shards(pydoc_data_dir):
    ds = PretrainDataset(pydoc_data_dir.shards_dir, split="train", seq_len=T)
    tokens = stream(pydoc_data_dir.shards_dir)
    assert len(ds) == (len(tokens) - 1) // T and ds.num_tokens == len(tokens)
    boundary = open_manifest(pydoc_data_dir.shards_dir).shards("train")[0].num_tokens
    crossing = (boundary - 1) // T  # this window starts in shard 0 and ends in shard 1
    assert crossing * T < boundary < crossing * T + T + 1
    for i in (0, 1, crossing, len(ds) - 1):
        x = ds[i]
        assert x.dtype == torch.int64 and x.shape == (T + 1,)
        assert torch.equal(x, torch.from_numpy(tokens[i * T:i * T + T + 1]))
    with pytest.raises(IndexError):
        ds[len(ds)]
    ds2 = pickle.loads(pickle.dumps(ds))  # DataLoader workers receive a pickled copy
    assert torch.equal(ds2[crossing], ds[crossing])


def test_truncated_missing_and_corrupt_shards_are_named(shards):
    m = open_manifest(shards)
    victim = m.shard_file(m.shards("train")[2])
    os.truncate(victim, victim.stat().st_size - 2)
    with pytest.raises(DataError, match=f"shard {victim}: truncated: 32766 bytes, manifest says 16384 tokens"):
        PretrainDataset(shards, seq_len=T)
    victim.unlink()
    with pytest.raises(DataError, match=f"shard {victim}: missing"):
        PretrainDataset(shards, seq_len=T)
    victim.mkdir()  # its size, a directory's, read as "truncated: 4096 bytes"
    with pytest.raises(DataError, match=f"shard {victim}: not a file \\(listed in {m.path}\\)"):
        PretrainDataset(shards, seq_len=T)
    PretrainDataset(shards, split="val", seq_len=T)  # other split unaffected

    flipped = m.shard_file(m.shards("val")[1])
    data = bytearray(flipped.read_bytes())
    data[2 * 7 + 1] ^= 0x40  # token 7 gets id >= 16384
    flipped.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"shard {flipped}: corrupt: sha256"):
        PretrainDataset(shards, split="val", seq_len=T, verify_checksums=True)
    ds = PretrainDataset(shards, split="val", seq_len=T)  # sizes are fine: reading catches the bad id
    first = m.shards("val")[0].num_tokens // T
    with pytest.raises(DataError, match=f"shard {flipped}: token 7 has id \\d+ >= vocab_size 1024"):
        for i in range(first, first + 2):
            ds[i]


def test_a_shard_removed_or_cut_short_while_training_reads_it_is_named(shards):
    """Shards are checked when the dataset opens; one deleted (or a mount lost) afterwards was a FileNotFoundError
    traceback from numpy's memmap on the rank that read it, one truncated a shape error."""
    m = open_manifest(shards)
    ds = PretrainDataset(shards, seq_len=T)
    per_shard = m.shards("train")[0].num_tokens // T
    gone, short = (m.shard_file(s) for s in m.shards("train")[1:3])
    gone.unlink()
    with pytest.raises(DataError, match=f"shard {gone}: cannot be read \\(No such file or directory\\); it was there"):
        ds[per_shard + 1]
    os.truncate(short, short.stat().st_size // 2)
    with pytest.raises(DataError, match=f"shard {short}: 8192 tokens, the manifest says 16384 \\(truncated"):
        ds[2 * per_shard + 1]
    ds[0]  # the others still read


def test_missing_split_and_too_few_tokens(pydoc_data_dir):
    with pytest.raises(DataError, match=r"no split 'test' \(has: train, val\)"):
        PretrainDataset(pydoc_data_dir.shards_dir, split="test", seq_len=T)
    n = open_manifest(pydoc_data_dir.shards_dir).num_tokens("val")
    with pytest.raises(DataError, match=f"split 'val' has {n} tokens, fewer than one sample of seq_len \\+ 1 = {n + 1}"):
        PretrainDataset(pydoc_data_dir.shards_dir, split="val", seq_len=n)
    assert len(PretrainDataset(pydoc_data_dir.shards_dir, split="val", seq_len=n - 1)) == 1


# ------------------------------------------------------------------------------------------------
# Shuffle


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 4099])
def test_permutation_is_a_bijection(n):
    p = Permutation(n, seed=5, epoch=3)(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))


def test_permutation_depends_on_seed_and_epoch():
    idx = np.arange(10_000)
    base = Permutation(10_000, 1, 0)(idx)
    assert not np.array_equal(base, idx)
    assert np.array_equal(base, Permutation(10_000, 1, 0)(idx))
    for other in (Permutation(10_000, 2, 0), Permutation(10_000, 1, 1)):
        assert (other(idx) == base).mean() < 0.01
    big = Permutation(3 * 10**12, 1, 0)(np.array([0, 1, 3 * 10**12 - 1]))  # no memory cost for huge n
    assert len(set(big.tolist())) == 3 and big.max() < 3 * 10**12


# ------------------------------------------------------------------------------------------------
# Training loader


def global_batches(ds, b, w, seed, steps, start=0):
    """The concatenation over ranks of each global step's micro-batches."""
    loaders = [TrainLoader(ds, b, r, w, seed=seed, consumed_samples=start) for r in range(w)]
    out = []
    for _ in range(steps):
        parts = [next(lo) for lo in loaders]
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


@pytest.fixture(scope="module")
def train_ds(pydoc_data_dir):
    return PretrainDataset(pydoc_data_dir.shards_dir, split="train", seq_len=T)


def test_batches_are_shifted_windows_and_epochs_cover_every_sample(train_ds):
    n = len(train_ds)
    loader = TrainLoader(train_ds, micro_batch_size=n, seed=7)
    for epoch in range(2):
        x, y = next(loader)
        assert x.shape == y.shape == (n, T) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        rows = sorted(tuple(r) for r in torch.cat([x, y[:, -1:]], 1).tolist())
        assert rows == sorted(tuple(train_ds[i].tolist()) for i in range(n))  # each sample once per epoch
        if epoch == 0:
            first = x
    assert not torch.equal(first, x)  # epoch 1 is reshuffled
    assert loader.epochs == [2] and loader.state_dict()["consumed_samples"] == 2 * n


def test_order_depends_only_on_seed(train_ds):
    a, b, c = (TrainLoader(train_ds, 4, seed=s) for s in (1, 1, 2))
    for _ in range(5):
        xa, xb, xc = next(a)[0], next(b)[0], next(c)[0]
        assert torch.equal(xa, xb) and not torch.equal(xa, xc)


def test_world_size_does_not_change_the_global_order(train_ds):
    n = len(train_ds)
    steps = (2 * n) // 8 + 3  # runs into the third epoch
    reference = global_batches(train_ds, 8, 1, seed=3, steps=steps)
    for b, w in ((4, 2), (2, 4), (1, 8)):
        got = global_batches(train_ds, b, w, seed=3, steps=steps)
        assert all(torch.equal(g[0], r[0]) and torch.equal(g[1], r[1]) for g, r in zip(got, reference))
    # ranks read disjoint samples within a step
    loaders = [TrainLoader(train_ds, 4, r, 2, seed=3) for r in range(2)]
    assert not set(map(tuple, next(loaders[0])[0].tolist())) & set(map(tuple, next(loaders[1])[0].tolist()))


def test_resume_sees_the_same_batches_even_with_another_world_size(train_ds):
    reference = global_batches(train_ds, 4, 1, seed=9, steps=40)
    # 5 steps on 2 ranks (B=2), checkpoint, resume on 4 ranks (B=1) and on 1 rank (B=4)
    before = [TrainLoader(train_ds, 2, r, 2, seed=9) for r in range(2)]
    for _ in range(5):
        for lo in before:
            next(lo)
    state = json.loads(json.dumps(before[0].state_dict()))  # goes through a JSON checkpoint
    assert state["consumed_samples"] == 20 == before[1].state_dict()["consumed_samples"]
    for b, w in ((1, 4), (4, 1)):
        after = [TrainLoader(train_ds, b, r, w, seed=9) for r in range(w)]
        for lo in after:
            lo.load_state_dict(state)
        for step in range(5, 40):
            x = torch.cat([next(lo)[0] for lo in after])
            assert torch.equal(x, reference[step][0])


def test_load_state_dict_refuses_other_data(train_ds, pydoc_data_dir):
    state = TrainLoader(train_ds, 2, seed=1).state_dict()
    with pytest.raises(DataError, match="seed: checkpoint 1, now 2"):
        TrainLoader(train_ds, 2, seed=2).load_state_dict(state, new_data=True)
    longer = PretrainDataset(pydoc_data_dir.shards_dir, split="train", seq_len=T + 1)
    with pytest.raises(DataError, match=r"seq_len: checkpoint 32, now 33"):
        TrainLoader(longer, 2, seed=1).load_state_dict(state, new_data=True)
    val = PretrainDataset(pydoc_data_dir.shards_dir, split="val", seq_len=T)
    with pytest.raises(DataError, match=r"saved on other training data than this \(.*split 'val'\): sources no longer "
                                        rf"trained on \(shard fingerprints\) \['{train_ds.fingerprint}'\]; new sources"):
        TrainLoader(val, 2, seed=1).load_state_dict(state)
    with pytest.raises(DataError, match="consumed_samples must be a non-negative int"):
        TrainLoader(train_ds, 2, seed=1).load_state_dict({"consumed_samples": -1})
    with pytest.raises(DataError, match=r"dp_rank 2 is not in \[0, dp_world=2\)"):
        TrainLoader(train_ds, 2, dp_rank=2, dp_world=2)


# ------------------------------------------------------------------------------------------------
# Validation batches


@pytest.mark.parametrize("world", [1, 2, 3])
def test_val_batches_read_the_first_sequences_once_whatever_the_number_of_ranks(pydoc_data_dir, world):
    """The same sequences, each once, in order, on any number of ranks: rank r takes [r*B, (r+1)*B) of each global
    step; every rank as many batches of [B, T], rows past the set padded with targets of -100."""
    d = pydoc_data_dir.shards_dir
    ds = PretrainDataset(d, split="val", seq_len=T)
    b, n = 3, 13  # 13 sequences: no whole number of global steps at 2 or 3 ranks, nor of micro-batches at 1
    assert len(ds) > n
    per_rank = [list(val_batches(d, "val", T, b, r, world, max_sequences=n)) for r in range(world)]
    steps = -(-n // (b * world))
    assert [len(p) for p in per_rank] == [steps] * world
    rows = [(x, y) for s in range(steps) for r in range(world) for x, y in zip(*per_rank[r][s])]
    assert all(x.shape == (T,) for x, _ in rows) and len(rows) == steps * b * world
    counted = [(x, y) for x, y in rows if (y != -100).any()]
    assert all((y != -100).all() for _, y in counted)  # a row counts whole or not at all
    assert torch.equal(torch.stack([x for x, _ in counted]), torch.stack([ds[i][:-1] for i in range(n)]))
    assert torch.equal(torch.stack([y for _, y in counted]), torch.stack([ds[i][1:] for i in range(n)]))
    everything = list(val_batches(d, "val", T, b))  # no max_sequences: the whole split
    assert sum(int((y != -100).any(dim=1).sum()) for _, y in everything) == len(ds)
    with pytest.raises(DataError, match="max_sequences must be positive, got 0"):
        val_batches(d, "val", T, b, max_sequences=0)


class _HostTensor:
    """Stands in for a host tensor on a machine without CUDA: records how it is moved."""
    def __init__(self, moves: list, pinned: bool = False):
        self.moves, self.pinned = moves, pinned

    def pin_memory(self):
        return _HostTensor(self.moves, pinned=True)

    def to(self, device, non_blocking=False):
        self.moves.append((str(device), self.pinned, non_blocking))
        return self


def test_batches_go_to_a_gpu_through_pinned_memory_without_a_host_wait():
    moves = []
    batch = next(to_device(iter([(_HostTensor(moves), _HostTensor(moves))]), torch.device("cuda", 0)))
    assert len(batch) == 2 and moves == [("cuda:0", True, True)] * 2
    x, y = torch.arange(6).view(2, 3), torch.arange(6, 12).view(2, 3)
    assert all(a is b for a, b in zip(next(to_device(iter([(x, y)]), torch.device("cpu"))), (x, y)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_moving_a_batch_to_the_gpu_does_not_synchronize():
    x = torch.randint(0, 100, (4, 2048))
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing CUDA call raises
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):
            x.to("cuda")  # from pageable memory: what training did before, a stream sync per copy
        (moved,) = next(to_device(iter([(x,)]), torch.device("cuda")))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(moved.cpu(), x)
