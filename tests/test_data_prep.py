"""data_prep: tokenizer training, shard building (round trip, determinism, resume), verification."""
from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import importlib.util
import io
import json
import lzma
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from data_prep import (
    build_shards, pydoc_corpus, safe_cuts, shard_writer, tokenize_worker, train_tokenizer, verify_shards,
)
from data_prep.common import run_cli
from data_prep.tokenize_worker import is_val
from deepseek_pt.data import DataError, open_manifest

REPO = Path(__file__).resolve().parents[1]
DOCS = [text for _, text in pydoc_corpus.documents()]


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> None:
    """datasets' cache (where streaming=False copies its inputs) in the test's tmp_path, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def split_tokens(shards_dir: Path, split: str) -> np.ndarray:
    m = open_manifest(shards_dir)
    parts = [np.fromfile(m.shard_file(s), dtype=m.np_dtype) for s in m.shards(split)]
    return np.concatenate(parts) if parts else np.zeros(0, m.np_dtype)


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Token stream -> documents (without their EOS); the stream must end with an EOS."""
    assert len(tokens) == 0 or tokens[-1] == eos
    ends = np.flatnonzero(tokens == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokens[a:b].tolist() for a, b in zip(starts, ends)]


def shard_bytes(shards_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shards_dir.glob("*.bin"))}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


# ------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_metadata_and_lossless_encoding(pydoc_data_dir):
    info = json.loads((pydoc_data_dir.tokenizer_model.parent / "tokenizer.json").read_text())
    assert info["vocab_size"] == pydoc_data_dir.vocab_size == 1024
    assert (info["pad_id"], info["unk_id"], info["bos_id"], info["eos_id"]) == (0, 1, 2, 3)
    assert info["sha256"] == open_manifest(pydoc_data_dir.shards_dir).tokenizer_sha256
    assert info["training"]["documents"] == len(DOCS)
    vocab_lines = (pydoc_data_dir.tokenizer_model.parent / "tokenizer.vocab").read_text().splitlines()
    assert len(vocab_lines) == 1024 and vocab_lines[3].startswith("</s>\t")

    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    text = "  Ünïcödé 😀 ∑ x\ty\n\n  trailing  "  # unseen characters, tabs, newlines, runs of spaces
    ids = sp.encode(text)
    assert sp.decode(ids) == text and sp.unk_id() not in ids  # byte fallback, no normalisation
    assert sp.encode("2024", out_type=str) == ["2", "0", "2", "4"]  # digits split


def test_tokenizer_progress_counts_documents_without_the_cap_as_total(tmp_path, capsys):
    """The bar's total was --sample-docs (1,000,000 by default): a 40-document corpus showed an ETA of hours."""
    from data_prep.sources import resolve_inputs

    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:40])
    texts = list(train_tokenizer.sample_texts(resolve_inputs([str(corpus)]), 1_000_000, "text", "document", False))
    assert len(texts) == 40
    bar = capsys.readouterr().err.rstrip().rsplit("\r", 1)[-1]
    assert bar.startswith("reading documents (at most 1,000,000): 40doc "), bar


def test_tokenizer_custom_ids_and_sampling(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:40])
    info = train_tokenizer.train([str(corpus)], 400, tmp_path / "tok", sample_docs=10, pad_id=-1, unk_id=0,
                                 bos_id=-1, eos_id=1, num_threads=2, progress=False)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model"))
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (-1, 0, -1, 1)
    assert (info["pad_id"], info["bos_id"], info["eos_id"]) == (None, None, 1)
    assert info["training"]["documents"] == 10
    lines = [line for text in DOCS[:40] for line in train_tokenizer.sentences(text, 8192)]
    sample, docs = train_tokenizer.sample_lines(iter(DOCS[:40]), 50, 8192)
    assert docs == 40 and len(sample) == 50 and set(sample) <= set(lines)
    assert sample != lines[:50] and sample == train_tokenizer.sample_lines(iter(DOCS[:40]), 50, 8192)[0]
    # a build that needs the ids this tokenizer lacks is refused before it reads any input
    with pytest.raises(DataError, match=r"tokenizer .*tokenizer.model: --doc-boundary bos_eos needs a bos_id, the "
                                        r"model has none$"):
        build_shards.build([str(corpus)], tmp_path / "tok" / "tokenizer.model", tmp_path / "o", 100,
                           doc_boundary="bos_eos", progress=False)
    no_eos = tmp_path / "no_eos.model"
    with open(no_eos, "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS[:20]), model_writer=f, vocab_size=300, eos_id=-1,
                                       minloglevel=2, num_threads=1)
    with pytest.raises(DataError, match=r"tokenizer .*no_eos.model: has no end-of-document token \(eos_id\)$"):
        build_shards.build([str(corpus)], no_eos, tmp_path / "o", 100, progress=False)
    with pytest.raises(DataError, match="exists; pass --overwrite"):
        train_tokenizer.train([str(corpus)], 400, tmp_path / "tok", progress=False)
    # An --overwrite cut short after the new model: no tokenizer.json naming the old model's sha256 is left
    real_write = train_tokenizer.atomic_write_bytes

    def write_model_then_die(path, data):
        real_write(path, data)
        raise KeyboardInterrupt

    with mock.patch.object(train_tokenizer, "atomic_write_bytes", write_model_then_die), \
            pytest.raises(KeyboardInterrupt):
        train_tokenizer.train([str(corpus)], 420, tmp_path / "tok", overwrite=True, progress=False)
    assert not (tmp_path / "tok" / "tokenizer.json").exists()
    assert spm.SentencePieceProcessor(model_file=str(tmp_path / "tok" / "tokenizer.model")).get_piece_size() == 420
    with pytest.raises(DataError, match="--eos-id 3: same id as --bos-id"):
        train_tokenizer.train([str(corpus)], 400, tmp_path / "t2", bos_id=3, eos_id=3, progress=False)
    # a user symbol spelled like a special token would silently take over its piece (eos_id() == -1)
    for symbols, message in ((["</s>"], "'</s>': is the piece of --eos-id"), (["a", "a"], "'a': given twice"),
                             ([""], "'': an empty string is not a symbol")):
        with pytest.raises(DataError, match=f"--user-defined-symbols {message}"):
            train_tokenizer.train([str(corpus)], 400, tmp_path / "t3", user_defined_symbols=symbols, progress=False)


def test_build_arguments_out_of_range_are_named(tmp_path):
    """build(), which the CLI calls, refuses an argument out of range by name before it reads the tokenizer or any
    input, and creates nothing."""
    for kwargs, message in (({"shard_tokens": 0}, r"shard_tokens must be positive, got 0"),
                            ({"val_fraction": 1.0}, r"val_fraction 1.0 is not in \[0, 1\)"),
                            ({"doc_boundary": "bos"}, r"doc_boundary 'bos' is not one of eos, bos_eos"),
                            ({"txt_doc": "page"}, r"txt_doc 'page' is not one of document, paragraph, line"),
                            ({"split_seed": -1}, r"split_seed -1 is not in \[0, 2\^64\)")):
        with pytest.raises(DataError, match=f"^{message}$"):
            build_shards.build(["missing.jsonl"], "missing.model", tmp_path / "o", **{"shard_tokens": 100, **kwargs})
    assert not (tmp_path / "o").exists()


def test_a_build_whose_val_split_came_out_empty_warns(tmp_path, pydoc_data_dir, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:3])
    argv = ["--input", str(corpus), "--tokenizer", str(pydoc_data_dir.tokenizer_model), "--out", str(tmp_path / "o"),
            "--shard-tokens", "1000", "--val-fraction", "0.001", "--num-proc", "1", "--quiet"]
    assert build_shards.main(argv) == 0
    assert capsys.readouterr().err == "warning: the val split is empty (--val-fraction 0.001 of 3 documents)\n"


def test_tokenizer_special_ids_are_distinct_and_inside_the_vocabulary(tmp_path):
    """Each special id names its own piece (id 0 too: two specials on id 0 would leave sentencepiece to fail, or one
    silently replace the other) and lies in [0, vocab_size): id vocab_size is one past the last piece. Both are
    refused before any training, naming the flags."""
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    with pytest.raises(DataError, match="--unk-id 0: same id as --pad-id"):
        train_tokenizer.train([str(corpus)], 400, tmp_path / "t1", pad_id=0, unk_id=0, progress=False)
    with pytest.raises(DataError, match=r"--eos-id 400: must be in \[0, 400\) or -1"):
        train_tokenizer.train([str(corpus)], 400, tmp_path / "t2", eos_id=400, progress=False)
    assert not (tmp_path / "t1").exists() and not (tmp_path / "t2").exists()


def test_tokenizer_cli_reports_bad_vocab_size(tmp_path, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    rc = train_tokenizer.main(["--input", str(corpus), "--vocab-size", "50", "--out", str(tmp_path / "t"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "error: --vocab-size 50" in err and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--shard-tokens", "0", "must be a positive integer, got 0"),
    ("--split-seed", "-1", "must be >= 0, got -1"),
    ("--val-fraction", "1", r"must be in \[0, 1\), got 1"),
    ("--num-proc", "two", "invalid positive_int value: 'two'"),
    ("--fim-rate", "1.5", r"must be in \[0, 1\], got 1.5"),
])
def test_build_cli_names_a_flag_out_of_range(tmp_path, flag, value, message, capsys):
    argv = {"--input": "c.jsonl", "--tokenizer": "t.model", "--out": str(tmp_path / "o"), "--shard-tokens": "1_000",
            flag: value}
    with pytest.raises(SystemExit) as exit_:
        build_shards.main([a for kv in argv.items() for a in kv])
    assert exit_.value.code == 2
    assert re.search(rf"error: argument {flag}: {message}$", capsys.readouterr().err.strip())


def test_an_interrupted_build_says_how_to_resume(tmp_path, pydoc_data_dir, monkeypatch, capsys):
    """Ctrl-C: exit 130 and one line, no traceback; the same command then finishes the build."""
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:5])
    argv = ["--input", str(corpus), "--tokenizer", str(pydoc_data_dir.tokenizer_model), "--out", str(tmp_path / "o"),
            "--shard-tokens", "1000", "--num-proc", "1", "--quiet"]
    with monkeypatch.context() as m:
        m.setattr(shard_writer.BuildLog, "append", mock.Mock(side_effect=KeyboardInterrupt))
        assert build_shards.main(argv) == 130
    assert capsys.readouterr().err == "interrupted: re-run the same command to resume\n"
    assert build_shards.main(argv) == 0 and open_manifest(tmp_path / "o").raw["stats"]["docs"]["train"] == 5


# ------------------------------------------------------------------------------------------------
# Building shards


def test_round_trip(pydoc_data_dir):
    m = open_manifest(pydoc_data_dir.shards_dir)
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    key = (0).to_bytes(8, "little")
    expected = {"train": [], "val": []}
    for text in DOCS:
        expected["val" if is_val(text.encode(), 0.1, key) else "train"].append(text)
    assert expected["val"] and expected["train"]

    assert m.dtype == "uint16" and m.vocab_size == 1024 and m.doc_boundary == "eos"
    for split, texts in expected.items():
        tokens = split_tokens(pydoc_data_dir.shards_dir, split)
        # token count = per-document encodings + one EOS per document
        assert len(tokens) == sum(len(ids) + 1 for ids in sp.encode(texts)) == m.num_tokens(split)
        docs = split_docs(tokens, m.eos_id)
        assert [sp.decode(d) for d in docs] == texts  # documents come back exactly, in input order
        shards = m.shards(split)
        assert all(s.num_tokens == 16384 for s in shards[:-1]) and 0 < shards[-1].num_tokens <= 16384
        assert sum(s.num_docs for s in shards) == len(texts) == m.raw["stats"]["docs"][split]
        for s in shards:  # num_docs counts the documents whose EOS lies in the shard
            assert s.num_docs == int((np.fromfile(m.shard_file(s), m.np_dtype) == m.eos_id).sum())
    assert not list(pydoc_data_dir.shards_dir.glob("*.partial"))
    assert not (pydoc_data_dir.shards_dir / "build_log.jsonl").exists()


def test_bos_eos_boundaries_and_blank_docs(tmp_path, pydoc_data_dir):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in [DOCS[0], "", "   \n", DOCS[1]])
                      + '{"text": null}\n{"body": "a row without the field reads as null"}\n')
    m = build_shards.build([str(corpus)], pydoc_data_dir.tokenizer_model, tmp_path / "out", shard_tokens=1000,
                           doc_boundary="bos_eos", num_proc=1, progress=False)
    assert m["stats"]["empty_docs"] == 4 and m["stats"]["docs"]["train"] == 2
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    tokens = split_tokens(tmp_path / "out", "train").tolist()
    assert tokens == [t for ids in sp.encode(DOCS[:2]) for t in [sp.bos_id(), *ids, sp.eos_id()]]
    assert open_manifest(tmp_path / "out").doc_boundary == "bos_eos"


FIM = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")


def test_fill_in_the_middle_writes_a_share_of_the_train_documents_in_psm_order(tmp_path, pydoc_data_dir):
    """--fim-rate, DeepSeek-V3's fill-in-the-middle: the train documents it picks come out as BEGIN prefix HOLE
    suffix END middle EOS, each part encoded alone, the parts together the document's text; the others, and every
    val document, as a build without it writes them. The same shards from any number of processes; --fim-seed
    picks others; the manifest records the settings and the count."""
    corpus = str(pydoc_data_dir.corpus)
    assert train_tokenizer.main(["--input", corpus, "--vocab-size", "1024", "--out", str(tmp_path / "tok"), "--fim",
                                 "--num-threads", "2", "--quiet"]) == 0
    model = tmp_path / "tok" / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    begin, hole, end = (sp.piece_to_id(s) for s in FIM)

    def build(out: str, **kwargs) -> dict:
        return build_shards.build([corpus], model, tmp_path / out, 16384, val_fraction=0.1, progress=False, **kwargs)

    plain = build("plain", num_proc=1)
    m = build("fim", fim_rate=0.5, num_proc=1)
    build("fim2", fim_rate=0.5, num_proc=2)
    assert shard_bytes(tmp_path / "fim") == shard_bytes(tmp_path / "fim2")
    assert m["build"]["fim"] == {"rate": 0.5, "seed": 0, "order": "psm", "symbols": list(FIM), "ids": [begin, hole, end]}
    assert "fim" not in plain["build"] and "fim_docs" not in plain["stats"]
    assert np.array_equal(split_tokens(tmp_path / "fim", "val"), split_tokens(tmp_path / "plain", "val"))
    docs = split_docs(split_tokens(tmp_path / "fim", "train"), sp.eos_id())
    plain_docs = split_docs(split_tokens(tmp_path / "plain", "train"), sp.eos_id())
    texts = [sp.decode(d) for d in plain_docs]
    picked = set()
    for i, (doc, text) in enumerate(zip(docs, texts, strict=True)):
        if doc == plain_docs[i]:
            continue
        assert doc[0] == begin and doc.count(begin) == doc.count(hole) == doc.count(end) == 1, text[:60]
        h, e = doc.index(hole), doc.index(end)
        prefix, suffix, middle = doc[1:h], doc[h + 1:e], doc[e + 1:]
        assert (prefix, suffix, middle) == (sp.encode(sp.decode(prefix)), sp.encode(sp.decode(suffix)),
                                            sp.encode(sp.decode(middle)))  # each part encoded alone
        assert sp.decode(prefix) + sp.decode(middle) + sp.decode(suffix) == text
        picked.add(i)
    assert m["stats"]["fim_docs"] == len(picked) and 0.3 * len(docs) < len(picked) < 0.7 * len(docs)
    fim = tokenize_worker.FimSpec(0.5, 0, (begin, hole, end))
    assert picked == {i for i, t in enumerate(texts) if tokenize_worker.fim_cuts(t.encode(), len(t), fim)}
    other_seed = build("seed1", fim_rate=0.5, fim_seed=1, num_proc=1)
    assert split_docs(split_tokens(tmp_path / "seed1", "train"), sp.eos_id()) != docs
    assert other_seed["stats"]["fim_docs"] > 0
    with pytest.raises(DataError, match="holds another build"):  # a rerun with another rate is not this build
        build("fim", fim_rate=0.2, num_proc=1)


def test_fill_in_the_middle_cuts_follow_a_keyed_hash_of_the_text():
    """fim_cuts, pinned as is_val is: BLAKE2b-192 of the document keyed with --fim-seed and personalized "fim"; its
    first 8 bytes (little-endian) pick the document where below rate * 2^64, the next two, each modulo length + 1,
    are the cuts. A later version must cut the same corpus the same way, or its rebuilt shards differ."""
    fim = tokenize_worker.FimSpec(0.25, 7, (4, 5, 6))
    docs = [f"document {i}\n" * (i % 5 + 1) for i in range(400)]

    def reference(doc: str) -> tuple[int, int] | None:
        d = hashlib.blake2b(doc.encode(), digest_size=24, key=(7).to_bytes(8, "little"), person=b"fim").digest()
        words = [int.from_bytes(d[i:i + 8], "little") for i in (0, 8, 16)]
        return tuple(sorted(w % (len(doc) + 1) for w in words[1:])) if words[0] < 0.25 * 2**64 else None

    cuts = [tokenize_worker.fim_cuts(d.encode(), len(d), fim) for d in docs]
    assert cuts == [reference(d) for d in docs]
    assert 60 <= sum(c is not None for c in cuts) <= 140  # ~100 of 400 (binomial sd 8.7)
    assert tokenize_worker.fim_cuts(b"x", 1, tokenize_worker.FimSpec(1.0, 0, (4, 5, 6))) is not None
    assert tokenize_worker.fim_cuts(b"x", 1, tokenize_worker.FimSpec(0.0, 0, (4, 5, 6))) is None


def test_fill_in_the_middle_needs_its_pieces_in_the_tokenizer(tmp_path, pydoc_data_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:3])
    with pytest.raises(DataError, match=r"tokenizer .*tokenizer.model: has no piece '<\|fim_begin\|>' for "
                                        r"fill-in-the-middle; train the tokenizer with train_tokenizer.py --fim$"):
        build_shards.build([str(corpus)], pydoc_data_dir.tokenizer_model, tmp_path / "o", 100, fim_rate=0.1,
                           progress=False)
    with pytest.raises(DataError, match=r"fim_symbols \['a', 'a', 'b'\]: need three different pieces"):
        build_shards.build([str(corpus)], pydoc_data_dir.tokenizer_model, tmp_path / "o", 100, fim_rate=0.1,
                           fim_symbols=("a", "a", "b"), progress=False)
    with pytest.raises(DataError, match=r"fim_rate 1.5 is not in \[0, 1\]"):
        build_shards.build([str(corpus)], pydoc_data_dir.tokenizer_model, tmp_path / "o", 100, fim_rate=1.5,
                           progress=False)


@pytest.fixture(scope="module")
def mixed_inputs(tmp_path_factory) -> list[str]:
    """The pydoc corpus spread over a jsonl file, a parquet file and a directory of .txt files."""
    root = tmp_path_factory.mktemp("mixed")
    write_jsonl(root / "a.jsonl", DOCS[:40])
    pq.write_table(pa.table({"id": list(range(35)), "text": DOCS[40:75]}), root / "b.parquet", row_group_size=8)
    (root / "c").mkdir()
    for i, text in enumerate(DOCS[75:]):
        (root / "c" / f"{i:03d}.txt").write_text(text)
    (root / "c" / ".notes.txt").write_text("hidden files are not inputs")
    return [str(root / "a.jsonl"), str(root / "b.parquet"), str(root / "c")]


def test_mixed_formats_and_identical_across_num_proc(tmp_path, mixed_inputs, pydoc_data_dir, monkeypatch, hf_cache):
    monkeypatch.setattr(build_shards, "_TASK_CHARS", 20_000)  # many tasks, so workers interleave
    runs = {}
    for name, p, streaming in (("p1", 1, True), ("p2", 2, True), ("cached", 1, False)):
        build_shards.build(mixed_inputs, pydoc_data_dir.tokenizer_model, tmp_path / name, shard_tokens=7000,
                           val_fraction=0.1, num_proc=p, streaming=streaming, progress=False)
        runs[name] = shard_bytes(tmp_path / name)
    assert len(runs["p1"]) > 20 and runs["p1"] == runs["p2"] == runs["cached"]
    m1, m2 = open_manifest(tmp_path / "p1"), open_manifest(tmp_path / "p2")
    assert m1.splits == m2.splits
    # same documents, same order as the single-file fixture build
    assert [len(m1.raw["inputs"]), m1.raw["inputs"][1]["format"]] == [2 + len(DOCS[75:]), "parquet"]
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(tmp_path / "p1", split), split_tokens(pydoc_data_dir.shards_dir, split))


def test_compressed_inputs_and_globs_give_the_plain_corpus_tokens(tmp_path, pydoc_data_dir, hf_cache):
    """The corpus as gzip JSON lines, xz JSON lines named by a glob and a directory of bz2 text files: the tokens of
    the plain build, streamed or through datasets' cache."""
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS[:40])
    with lzma.open(tmp_path / "b.jsonl.xz", "wt") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in DOCS[40:75])
    (tmp_path / "c").mkdir()
    for i, text in enumerate(DOCS[75:]):
        with bz2.open(tmp_path / "c" / f"{i:03d}.txt.bz2", "wt") as f:
            f.write(text)
    inputs = [str(tmp_path / "a.jsonl.gz"), str(tmp_path / "b*.xz"), str(tmp_path / "c")]
    for streaming in (True, False):
        out = tmp_path / f"out-{streaming}"
        build_shards.build(inputs, pydoc_data_dir.tokenizer_model, out, shard_tokens=7000, val_fraction=0.1,
                           num_proc=1, streaming=streaming, progress=False)
        assert [i["format"] for i in open_manifest(out).raw["inputs"][:2]] == ["json", "json"]
        for split in ("train", "val"):
            assert np.array_equal(split_tokens(out, split), split_tokens(pydoc_data_dir.shards_dir, split))


def test_compressed_and_named_input_errors(tmp_path, pydoc_data_dir, hf_cache):
    """A bad line inside a compressed file is named by its line; a truncated file, a glob matching nothing, a
    directory without a corpus file and an `hf:` without a name each get their own line."""
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as f:
        f.write('{"text": "a"}\n{"text": "b"}\n{"text": \n')
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n{"text": "b"}\n')[:-12])
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "x.csv").write_text("a,b\n")
    cases = {"bad.jsonl.gz": r"bad.jsonl.gz: line 3: malformed JSON \(Expecting value at column 10\)$",
             "cut.jsonl.gz": r"cut.jsonl.gz: cannot open as json: EOFError: Compressed file ended",
             "none*.jsonl": r"none\*.jsonl: the pattern matches no file$",
             "csv": r"csv: directory has no .txt, .jsonl, .json, .parquet files$"}
    for streaming in (True, False):
        for name, message in cases.items():
            with pytest.raises(DataError, match=message):
                build_shards.build([str(tmp_path / name)], pydoc_data_dir.tokenizer_model, tmp_path / "out", 100,
                                   num_proc=1, streaming=streaming, progress=False)
    for spec in ("hf:", "hf:@train", "hf::config"):
        with pytest.raises(DataError, match=rf"^input {spec}: expected hf:NAME\[:CONFIG\]\[@SPLIT\]$"):
            build_shards.build([spec], pydoc_data_dir.tokenizer_model, tmp_path / "out", 100, progress=False)


# ------------------------------------------------------------------------------------------------
# Resume


class Crash(BaseException):
    """Stands in for the process dying (not an Exception: nothing may catch it)."""


@pytest.fixture(scope="module")
def small_build(tmp_path_factory, pydoc_data_dir):
    """Corpus of 40 documents and the bytes of its uninterrupted build (many small shards)."""
    root = tmp_path_factory.mktemp("small")
    corpus = write_jsonl(root / "c.jsonl", DOCS[:40])
    args = dict(inputs=[str(corpus)], tokenizer=pydoc_data_dir.tokenizer_model, shard_tokens=3000,
                val_fraction=0.2, num_proc=1, progress=False)
    build_shards._TASK_CHARS, saved = 15_000, build_shards._TASK_CHARS
    try:
        manifest = build_shards.build(out=root / "ref", **args)
    finally:
        build_shards._TASK_CHARS = saved
    return args, shard_bytes(root / "ref"), manifest


def crash_on_log_append(monkeypatch, n: int, after_write: bool) -> None:
    """Die at the n-th log append: just before it (a shard renamed but unlogged, or a checkpoint
    missing) or just after it."""
    original, count = shard_writer.BuildLog.append, [0]

    def append(self, record):
        count[0] += 1
        if count[0] == n and not after_write:
            raise Crash
        original(self, record)
        if count[0] == n:
            raise Crash

    monkeypatch.setattr(shard_writer.BuildLog, "append", append)


def test_val_fraction_sets_the_split(small_build, pydoc_data_dir):
    """--val-fraction reaches the split of each document: small_build's 0.2, not the conftest shards' 0.1."""
    args, _, manifest = small_build
    key = (0).to_bytes(8, "little")
    val = [text for text in DOCS[:40] if is_val(text.encode(), args["val_fraction"], key)]
    assert args["val_fraction"] == 0.2 and len(val) != sum(is_val(t.encode(), 0.1, key) for t in DOCS[:40])
    assert manifest["build"]["val_fraction"] == 0.2
    assert manifest["stats"]["docs"] == {"train": 40 - len(val), "val": len(val)}
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    assert sum(s["num_tokens"] for s in manifest["splits"]["val"]) == sum(len(ids) + 1 for ids in sp.encode(val))


def test_the_split_seed_keys_the_split_hash():
    """is_val draws the val split from BLAKE2b-64 of the document keyed with --split-seed (8 bytes, little-endian),
    val where the hash, read little-endian, is below val_fraction * 2^64. The seed must move documents: a rebuild
    with another seed is how a user draws another held-out set. And the rule must stay put: a rebuild of the same
    corpus by a later version must hold out the same documents, or the old val set leaks into training."""
    import hashlib

    docs = [f"document {i}\n".encode() for i in range(400)]

    def reference(doc: bytes, seed: int) -> bool:
        digest = hashlib.blake2b(doc, digest_size=8, key=seed.to_bytes(8, "little")).digest()
        return int.from_bytes(digest, "little") < 0.25 * 2**64

    for seed in (0, 1, 2**64 - 1):
        key = seed.to_bytes(8, "little")
        assert [is_val(d, 0.25, key) for d in docs] == [reference(d, seed) for d in docs], seed
    by_seed = [{i for i, d in enumerate(docs) if is_val(d, 0.25, seed.to_bytes(8, "little"))} for seed in (0, 1)]
    assert by_seed[0] != by_seed[1]
    assert all(60 <= len(v) <= 140 for v in by_seed)  # ~100 of 400 each (binomial sd 8.7)


@pytest.mark.parametrize("n, after_write", [(1, False), (4, True), (9, False), (14, True)])
def test_resume_after_crash_is_byte_identical(tmp_path, small_build, monkeypatch, n, after_write):
    args, reference, ref_manifest = small_build
    monkeypatch.setattr(build_shards, "_TASK_CHARS", 15_000)
    with monkeypatch.context() as patch:
        crash_on_log_append(patch, n, after_write)
        with pytest.raises(Crash):
            build_shards.build(out=tmp_path / "out", **args)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with open(tmp_path / "out" / "build_log.jsonl", "ab") as f:
        f.write(b'{"type": "checkpoint", "posi')  # a record torn by the crash
    for p in (tmp_path / "out").glob("*.partial"):  # tokens written after the last checkpoint
        with open(p, "ab") as f:
            f.write(b"\x07\x00" * 50)
    manifest = build_shards.build(out=tmp_path / "out", **args)
    assert shard_bytes(tmp_path / "out") == reference
    assert manifest["splits"] == ref_manifest["splits"] and manifest["stats"] == ref_manifest["stats"]
    assert not (tmp_path / "out" / "build_log.jsonl").exists()


@pytest.mark.parametrize("n, victim", [(16, "finished"), (6, "partial")])
def test_resume_rebuilds_corrupted_shard_files(tmp_path, small_build, monkeypatch, n, victim):
    """A shard damaged after it was written is not kept: the build goes back to a checkpoint
    before it. `finished`: the last shard finished before the last checkpoint; `partial`: the
    shard that was partial at the last checkpoint and was renamed before the crash."""
    args, reference, _ = small_build
    monkeypatch.setattr(build_shards, "_TASK_CHARS", 15_000)
    with monkeypatch.context() as patch:
        crash_on_log_append(patch, n, after_write=True)
        with pytest.raises(Crash):
            build_shards.build(out=tmp_path / "out", **args)
    records = [json.loads(line) for line in (tmp_path / "out" / "build_log.jsonl").read_text().splitlines()]
    finished = [r for r in records if r["type"] == "checkpoint"][-1]["splits"]["train"]["shards"]
    path = tmp_path / "out" / shard_writer.shard_name("train", finished - 1 if victim == "finished" else finished)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    build_shards.build(out=tmp_path / "out", **args)
    assert shard_bytes(tmp_path / "out") == reference


def test_resume_after_sigkill(tmp_path, small_build):
    args, reference, _ = small_build
    out = tmp_path / "out"
    argv = ["--input", *args["inputs"], "--tokenizer", str(args["tokenizer"]), "--out", str(out),
            "--shard-tokens", "3000", "--val-fraction", "0.2", "--num-proc", "2", "--quiet"]
    # a real kill -9 after the 6th log record: no finally blocks, no flushes, workers orphaned
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
from data_prep import build_shards, shard_writer
build_shards._TASK_CHARS = 15_000
original, count = shard_writer.BuildLog.append, [0]
def append(self, record):
    original(self, record)
    count[0] += 1
    if count[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
shard_writer.BuildLog.append = append
build_shards.main({argv!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / "build_log.jsonl").exists() and not (out / "manifest.json").exists()
    assert build_shards.main(argv) == 0
    assert shard_bytes(out) == reference


def test_a_full_disk_is_named_and_the_build_resumes(tmp_path, small_build, monkeypatch, capsys):
    """A full disk ended the build in an OSError traceback from a shard write (no file name in it): now one line
    names the output directory and the space left, and the same command run again resumes the build."""
    args, reference, _ = small_build
    out = tmp_path / "out"
    argv = ["--input", *args["inputs"], "--tokenizer", str(args["tokenizer"]), "--out", str(out),
            "--shard-tokens", "3000", "--val-fraction", "0.2", "--num-proc", "1", "--quiet"]
    monkeypatch.setattr(build_shards, "_TASK_CHARS", 15_000)
    original, count = shard_writer.SplitWriter.append, [0]

    def append(self, tokens, doc_lengths):  # the 5th write lands, then the disk is full (the log never hears of it)
        written = original(self, tokens, doc_lengths)
        count[0] += 1
        if count[0] == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return written

    with monkeypatch.context() as patch:
        patch.setattr(shard_writer.SplitWriter, "append", append)
        assert build_shards.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: {out}: No space left on device (" in err, err
    assert re.search(r"\(\d[\d,]*\.\d [MG]iB free\); free space and re-run the same command to resume", err), err
    assert build_shards.main(argv) == 0
    assert shard_bytes(out) == reference


def test_a_failed_system_call_is_one_line_naming_the_file(capsys):
    def main(argv):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/corpus.jsonl")

    assert run_cli(main) == 1
    assert capsys.readouterr().err == "error: /data/corpus.jsonl: Permission denied\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl's parent-death signal is Linux's")
def test_workers_die_with_a_killed_build(tmp_path):
    """After kill -9 of a --num-proc build, its workers finished their tasks as orphans and each printed
    a BrokenPipeError traceback on the closed result pipe: now they end with it."""
    script = tmp_path / "parent.py"
    script.write_text(f"""
import multiprocessing, os, sys, time
sys.path.insert(0, {str(REPO)!r})
from data_prep import tokenize_worker

def worker():
    tokenize_worker._die_with_parent()
    print(os.getpid(), flush=True)
    time.sleep(60)

if __name__ == "__main__":
    multiprocessing.get_context("spawn").Process(target=worker).start()
    time.sleep(60)
""")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(worker), "the worker outlived its killed parent"
    finally:
        parent.kill()
        parent.stdout.close()
        if "worker" in locals() and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie awaiting its new parent's reaping."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_rerun_of_finished_build_and_changed_flags(tmp_path, small_build, capsys):
    args, reference, _ = small_build
    out = tmp_path / "out"
    build_shards.build(out=out, **args)
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    build_shards.build(out=out, **args)  # finished: only checked
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    argv = [*args["inputs"], "--tokenizer", str(args["tokenizer"]), "--out", str(out), "--shard-tokens", "3000",
            "--val-fraction", "0.2", "--num-proc", "1", "--quiet"]
    capsys.readouterr()
    assert build_shards.main(["--input", *argv]) == 0  # the CLI does not claim to have written it
    assert f"{out / 'manifest.json'}: already built; nothing written" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    with pytest.raises(DataError, match=r"holds another build .*build.shard_tokens: 3000 -> 2000"):
        build_shards.build(out=out, **{**args, "shard_tokens": 2000})
    (out / "val-00000.bin").write_bytes(b"")
    with pytest.raises(DataError, match=r"finished build but shard .*val-00000.bin: truncated"):
        build_shards.build(out=out, **args)
    build_shards.build(out=out, **{**args, "shard_tokens": 2000}, overwrite=True)
    assert open_manifest(out).raw["build"]["shard_tokens"] == 2000
    assert all(s.num_tokens == 2000 for s in open_manifest(out).shards("train")[:-1])


def test_overwrite_with_the_tokenizer_copy_of_the_same_directory(tmp_path, small_build):
    """--overwrite clears the directory, tokenizer copy included: a build whose --tokenizer is that copy
    must not lose it."""
    args, _, _ = small_build
    out = tmp_path / "out"
    build_shards.build(out=out, **args)
    model = out / "tokenizer.model"
    m = build_shards.build(out=out, **{**args, "tokenizer": model, "shard_tokens": 2000}, overwrite=True)
    assert m["build"]["shard_tokens"] == 2000
    assert model.read_bytes() == Path(args["tokenizer"]).read_bytes()
    assert verify_shards.verify(out, progress=False) == []


# ------------------------------------------------------------------------------------------------
# Long documents (encoded a piece at a time: data_prep/safe_cuts.py)

# Where a cut could go wrong: spaces beside '▁' (one character once normalized), runs of whitespace, line ends,
# tabs, digits (one per token), characters outside the vocabulary (byte fallback), runs without any whitespace.
TRICKY = [
    "  leading and trailing whitespace  ", "\ttabs\tand\r\nCRLF line ends\r\n\r\n", "word" + " " * 300 + "word",
    "\u2581" * 40 + " " * 40 + "a\u2581 \u2581b \u2581\u2581 c\u2581", "x" * 3000, "1234567890" * 200 + " 3.14159 ",
    "".join(random.Random(1).choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/", k=3000)),
    "中文没有空格，也能切开吗？" * 60, "emoji 😀🚀 and café, cafe\u0301, naïve, ß " * 40, "\n" * 500 + "end",
    "nul\x00 and <0x41> spelled out, <s></s> " * 30,
]


def _fuzz_docs(n: int) -> list[str]:
    """Random strings of the characters around which a cut could go wrong, many pieces beside one another."""
    rng = random.Random(0)
    alphabet = [" ", "  ", "\u2581", "\n", "\r\n", "\t", "a", "b", "e", "q", "x", "y", "th", "the", "end", "0", "12", "é",
                "中文", "😀", ".", "="]
    return ["".join(rng.choices(alphabet, k=rng.randrange(1, 300))) for _ in range(n)]


# Pieces that span what the trainer's own pieces never do: a space inside, a line end, two digits
USER_SYMBOLS = ["a b", "x\ty", "\u2581\u2581q", "12", "end\n"]


@pytest.mark.parametrize("symbols", [False, True], ids=["project", "user-symbols"])
def test_cuts_give_the_tokens_of_the_whole_document(pydoc_data_dir, tmp_path, symbols):
    """safe_cuts' argument, checked on tokenizers trained by train_tokenizer.py (the pydoc one; one with user-defined
    symbols): cut at every place it allows (pieces of at least one character), the pieces encode to exactly the
    tokens of the whole document; on the pydoc corpus as one document, on the tricky cases and on random strings of
    the characters around which a cut could go wrong. And English text is cut close after each target size."""
    model = pydoc_data_dir.tokenizer_model
    if symbols:
        model = tmp_path / "tok" / train_tokenizer.train([str(pydoc_data_dir.corpus)], 600, tmp_path / "tok",
                                                         sample_docs=20, user_defined_symbols=USER_SYMBOLS,
                                                         num_threads=1, progress=False)["model"]
    sp = spm.SentencePieceProcessor(model_file=str(model))
    joinable = safe_cuts.joinable_pairs(sp)
    assert joinable is not None
    english = "\n\n".join(DOCS)
    cuts = 0
    for doc in [english, *TRICKY, *_fuzz_docs(300)]:
        pieces = list(safe_cuts.pieces(doc, joinable, 1))
        assert "".join(pieces) == doc
        assert [t for p in pieces for t in sp.encode(p)] == sp.encode(doc), doc[:60]
        cuts += len(pieces) - 1
    assert cuts > 100_000
    sizes = [len(p) for p in safe_cuts.pieces(english, joinable, 1000)]
    assert len(sizes) > 400 and max(sizes) <= 1000 + 40  # cut at the next word's space, or line end


@pytest.mark.parametrize("fim", [None, tokenize_worker.FimSpec(1.0, 3, (4, 5, 6))], ids=["plain", "fim"])
def test_tokenize_encodes_long_documents_in_pieces_to_the_same_tokens(pydoc_data_dir, monkeypatch, fim):
    """tokenize() with long documents (here: over 50 characters) among short ones, in both splits, BOS and EOS
    added: the tokens of whole-document encoding, byte for byte, and sentencepiece never saw a long string. So
    too for fill-in-the-middle's parts, every train document cut (rate 1), each part encoded as a whole."""
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    spec = tokenize_worker.TokenizeSpec(str(pydoc_data_dir.tokenizer_model), "uint16", sp.eos_id(), sp.bos_id(),
                                        0.3, 0, fim)
    tokenize_worker.init(spec)
    seen = []

    class Spy:
        def encode(self, texts, **kwargs):
            seen.extend(map(len, texts) if isinstance(texts, list) else [len(texts)])
            return sp.encode(texts, **kwargs)

    monkeypatch.setattr(tokenize_worker, "_PIECE_CHARS", 50)
    monkeypatch.setattr(tokenize_worker, "_state", (Spy(), *tokenize_worker._state[1:]))
    docs = [*TRICKY, *DOCS[:30], *_fuzz_docs(50)]
    out = tokenize_worker.tokenize(docs)
    key = (0).to_bytes(8, "little")

    def parts(doc: str, val: bool) -> list[str | int]:  # what the document is written as: texts and FIM's ids
        if fim is None or val:
            return [doc]
        a, b = tokenize_worker.fim_cuts(doc.encode(), len(doc), fim)
        return [4, doc[:a], 5, doc[b:], 6, doc[a:b]]

    written = [(parts(d, is_val(d.encode(), 0.3, key)), is_val(d.encode(), 0.3, key)) for d in docs]
    for split, want in (("train", False), ("val", True)):
        expected = [[sp.bos_id(), *(t for p in ps for t in ([p] if isinstance(p, int) else sp.encode(p))), sp.eos_id()]
                    for ps, val in written if val == want]
        assert out[split].doc_lengths.tolist() == [len(e) for e in expected]
        assert out[split].tokens.dtype == np.uint16
        assert out[split].tokens.tobytes() == np.array([t for e in expected for t in e], np.uint16).tobytes()
        assert out[split].fim_docs == (0 if fim is None or want else len(expected))
    joinable = tokenize_worker._state[2]

    def lengths_encoded(text: str, val: bool) -> list[int]:  # whole with the batch; else a piece at a time
        whole = len(text) <= 50 and (fim is None or val)  # a cut document's parts take the pieces' path
        return [len(text)] if whole else [len(p) for p in safe_cuts.pieces(text, joinable, 50)]

    assert sorted(seen) == sorted(n for ps, val in written for p in ps if isinstance(p, str)
                                  for n in lengths_encoded(p, val))
    assert max(seen) < max(map(len, docs)) // 100  # a run of 300 spaces, which BPE may merge, is the longest


def test_shards_do_not_change_when_every_document_is_cut(tmp_path, pydoc_data_dir, monkeypatch):
    """The pydoc build with every document over 16 characters encoded in pieces: the same shard files and checksums
    as the conftest build, which encoded each whole (the committed smoke shards rebuild identical the same way)."""
    monkeypatch.setattr(tokenize_worker, "_PIECE_CHARS", 16)
    ref = open_manifest(pydoc_data_dir.shards_dir).raw
    m = build_shards.build([str(pydoc_data_dir.corpus)], pydoc_data_dir.tokenizer_model, tmp_path / "out",
                           shard_tokens=ref["build"]["shard_tokens"], val_fraction=ref["build"]["val_fraction"],
                           num_proc=1, progress=False)
    assert m["splits"] == ref["splits"] and m["stats"] == ref["stats"]
    assert shard_bytes(tmp_path / "out") == shard_bytes(pydoc_data_dir.shards_dir)


def test_no_cuts_where_the_argument_does_not_hold(pydoc_data_dir):
    """A model that is not BPE, normalizes by a rule, adds a dummy prefix, removes extra whitespace, has no byte
    fallback or has UNUSED pieces is never cut (its long documents are encoded whole, as before). The options are
    read from the model by hand: the reader must agree with protobuf's."""
    pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2")
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    base = pb2.ModelProto.FromString(sp.serialized_model_proto())
    nfkc = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(DOCS[:20]), model_writer=nfkc, vocab_size=300,
                                   normalization_rule_name="nmt_nfkc", minloglevel=2, num_threads=1)
    charsmap = pb2.ModelProto.FromString(nfkc.getvalue()).normalizer_spec.precompiled_charsmap
    assert charsmap

    def without_byte_fallback(m):
        m.trainer_spec.byte_fallback = False
        kept = [p for p in m.pieces if p.type != p.BYTE]
        del m.pieces[:]
        m.pieces.extend(kept)

    edits = {
        "unigram": lambda m: setattr(m.trainer_spec, "model_type", m.trainer_spec.UNIGRAM),
        "normalization rule": lambda m: setattr(m.normalizer_spec, "precompiled_charsmap", charsmap),
        "dummy prefix": lambda m: setattr(m.normalizer_spec, "add_dummy_prefix", True),
        "extra whitespace removed": lambda m: setattr(m.normalizer_spec, "remove_extra_whitespaces", True),
        "no byte fallback": without_byte_fallback,
        "an UNUSED piece": lambda m: setattr(m.pieces[-1], "type", m.pieces[-1].UNUSED),
    }
    for name, edit in {"the project's options": lambda m: None, **edits}.items():
        m = pb2.ModelProto()
        m.CopyFrom(base)
        edit(m)
        joinable = safe_cuts.joinable_pairs(spm.SentencePieceProcessor(model_proto=m.SerializeToString()))
        assert (joinable is None) == (name != "the project's options"), name
    assert list(safe_cuts.pieces("a b " * 100, None, 1)) == ["a b " * 100]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_a_long_document_is_tokenized_in_bounded_memory(pydoc_data_dir):
    """sentencepiece holds ~45 bytes per character of the string it encodes: tokenizing a 6M-character document
    took ~250 MB over the text before (a 1 GB one would take ~45 GB); in pieces of 1M characters ~60 MB, the pieces'
    peak plus the tokens. The peak RSS of a fresh process (VmHWM: ru_maxrss would be pytest's, kept across exec);
    bench/long_doc_memory.py measures the whole build per document size."""
    script = f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from data_prep import pydoc_corpus, tokenize_worker
def kb(field):
    return int(Path("/proc/self/status").read_text().split(field + ":")[1].split()[0])
text = "\\n\\n".join(t for _, t in pydoc_corpus.documents())
text = text * round(6e6 / len(text))
tokenize_worker.init(tokenize_worker.TokenizeSpec({str(pydoc_data_dir.tokenizer_model)!r}, "uint16", 3, None, 0.0, 0))
Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
before = kb("VmRSS")
tokens = tokenize_worker.tokenize([text])["train"].tokens
print(len(text), len(tokens), kb("VmHWM") - before)
"""
    chars, tokens, grown_kb = map(int, subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                                                      check=True, timeout=300).stdout.split())
    assert chars > 5_900_000 and tokens > 2_000_000
    assert grown_kb < 120 << 10, f"{grown_kb >> 10} MB for one {chars / 1e6:.1f}M-character document"


# ------------------------------------------------------------------------------------------------
# Bad input


def test_input_errors_name_the_input(tmp_path, pydoc_data_dir, hf_cache):
    tok, runs = pydoc_data_dir.tokenizer_model, iter(range(100))

    def build(inputs):
        return build_shards.build([str(i) for i in inputs], tok, tmp_path / f"o{next(runs)}", shard_tokens=100,
                                  num_proc=1, progress=False)

    (tmp_path / "body.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match=r"body.jsonl: row 0 has no field 'text' \(fields: body\)"):
        build([tmp_path / "body.jsonl"])
    # that build failed before any shard: the corrected command may reuse its directory
    m = build_shards.build([str(tmp_path / "body.jsonl")], tok, tmp_path / "o0", shard_tokens=100,
                           text_field="body", num_proc=1, progress=False)
    assert m["stats"]["docs"]["train"] == 1 and m["build"]["text_field"] == "body"
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad.jsonl: .*JSON"):
        build([tmp_path / "bad.jsonl"])
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: malformed JSON \(Expecting value at column 10\)"):
        build_shards.build([str(tmp_path / "bad.jsonl")], tok, tmp_path / "o-cached", shard_tokens=100,
                           num_proc=1, streaming=False, progress=False)
    (tmp_path / "num.jsonl").write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"num.jsonl: row 0: field 'text' holds a value of type int, not a string"):
        build([tmp_path / "num.jsonl"])
    # an array of strings or numbers, which datasets reads as a column `text` of them: strings were documents (a
    # string per JSON line is refused), numbers "field 'text' holds a value of type int", a field the file lacks
    for name, text, what in (("strings.json", '["a", "b"]', "str"), ("numbers.json", "[1, 2]", "int"),
                             ("lines.jsonl", '"a"\n"b"\n', "str")):
        (tmp_path / name).write_text(text)
        where = "line 1" if name.endswith(".jsonl") else "element 0 of the array"
        with pytest.raises(DataError, match=rf"{name}: {where}: a JSON {what}, not an object$"):
            build([tmp_path / name])
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match=r"p.parquet: no column 'text' \(columns: body\)"):
        build([tmp_path / "p.parquet"])
    (tmp_path / "p.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"p.parquet.gz: a compressed parquet file cannot be read"):
        build([tmp_path / "p.parquet.gz"])
    with pytest.raises(DataError, match=r"input .*missing.jsonl: no such file"):
        build([tmp_path / "missing.jsonl"])
    if importlib.util.find_spec("zstandard") is None:  # checked before any input is read
        (tmp_path / "z.jsonl.zst").write_bytes(b"")
        with pytest.raises(DataError, match=r"z.jsonl.zst: reading .zst needs the zstandard package"):
            build([write_jsonl(tmp_path / "ok.jsonl", DOCS[:1]), tmp_path / "z.jsonl.zst"])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match=r"x.csv: unsupported file type"):
        build([tmp_path / "x.csv"])
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n{"text": " "}\n')
    with pytest.raises(DataError, match=r"blank.jsonl: no non-blank documents in field 'text'"):
        build([tmp_path / "blank.jsonl"])
    with pytest.raises(DataError, match=r"given twice"):
        build([tmp_path / "body.jsonl", tmp_path / "body.jsonl"])
    with pytest.raises(DataError, match=r"tokenizer .*nope.model: no such file"):
        build_shards.build([str(tmp_path / "body.jsonl")], tmp_path / "nope.model", tmp_path / "o", 100)
    shards = tmp_path / "shards"  # a shard directory, which holds its tokenizer.model
    shards.mkdir()
    (shards / "tokenizer.model").write_bytes(b"")
    with pytest.raises(DataError, match=r"tokenizer .*shards: a directory, not a sentencepiece model file "
                                        r"\(.*shards/tokenizer.model\?\)"):
        build_shards.build([str(tmp_path / "body.jsonl")], shards, tmp_path / "o", 100)


@pytest.mark.parametrize("streaming", [True, False])
def test_input_files_without_rows_have_no_documents(tmp_path, pydoc_data_dir, streaming, hf_cache):
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a-empty.jsonl").write_text("")
    (inputs / "b-blank-lines.jsonl").write_text("\n\n")
    (inputs / "c-no-objects.json").write_text("[]\n")
    write_jsonl(inputs / "d.jsonl", DOCS[:2])
    m = build_shards.build([str(inputs)], pydoc_data_dir.tokenizer_model, tmp_path / "out", shard_tokens=1000,
                           num_proc=1, streaming=streaming, progress=False)
    assert m["stats"]["docs"]["train"] == 2 and m["stats"]["empty_docs"] == 0


def test_output_dir_that_cannot_be_created_is_named(tmp_path, pydoc_data_dir, capsys):
    corpus = write_jsonl(tmp_path / "c.jsonl", DOCS[:3])  # a file where the output directory should be
    for script, argv in ((pydoc_corpus, ["--out", f"{corpus}/p.jsonl"]),
                         (train_tokenizer, ["--input", str(corpus), "--vocab-size", "300", "--out", str(corpus)]),
                         (build_shards, ["--input", str(corpus), "--tokenizer", str(pydoc_data_dir.tokenizer_model),
                                         "--out", str(corpus), "--shard-tokens", "100"])):
        assert script.main(argv) == 2, script
        assert capsys.readouterr().err.startswith(f"error: output directory {corpus}: cannot create it"), script


def test_scripts_run_as_files_and_modules(tmp_path):
    for cmd in ([sys.executable, "data_prep/build_shards.py", "--help"],
                [sys.executable, "-m", "data_prep.verify_shards", "--help"]):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "usage:" in proc.stdout
    proc = subprocess.run([sys.executable, "data_prep/build_shards.py", "--input", str(tmp_path / "none.jsonl"),
                           "--tokenizer", "x.model", "--out", str(tmp_path / "o"), "--shard-tokens", "10"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.startswith("error: tokenizer x.model: no such file")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "data_prep/pydoc_corpus.py", "--out", str(tmp_path / "p.jsonl")],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert proc.returncode == 0 and [json.loads(x)["text"] for x in lines] == DOCS


def test_stdlib_docstrings_corpus(tmp_path):
    """Each module's docstrings under their qualified names, in source order; tests, nested functions and files
    that do not parse left out; the real library's modules after the pydoc topics."""
    import inspect

    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module doc."""\nclass A:\n    """Class doc."""\n    def f(self):\n        """Method doc."""\n'
        '        def inner():\n            """Nested: left out."""\n\ndef g():\n    pass\n')
    (tmp_path / "pkg" / "bare.py").write_text("x = 1\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_a.py").write_text('"""A test."""\n')
    (tmp_path / "broken.py").write_text('"""Doc."""\ndef (:\n')
    assert pydoc_corpus.module_docstrings(tmp_path) == [
        ("module:pkg", "pkg\n\nThe package."),
        ("module:pkg.mod", "pkg.mod\n\nModule doc.\n\npkg.mod.A\n\nClass doc.\n\npkg.mod.A.f\n\nMethod doc."),
    ]
    docs = pydoc_corpus.documents(stdlib_docstrings=True)
    assert [text for _, text in docs[:len(DOCS)]] == DOCS
    modules = dict(docs[len(DOCS):])
    assert list(modules) == sorted(modules, key=lambda m: m.split(":")[1].split("."))  # by name, package first
    assert modules["module:json"].startswith("json\n\n" + inspect.cleandoc(json.__doc__))
    assert "json.decoder.JSONDecoder.decode\n\n" in modules["module:json.decoder"]
    assert not [m for m in modules if m.startswith(("module:test.", "module:idlelib"))]


# ------------------------------------------------------------------------------------------------
# Verification


def test_verify_names_each_bad_shard(tmp_path, pydoc_data_dir, capsys):
    d = tmp_path / "shards"
    shutil.copytree(pydoc_data_dir.shards_dir, d)
    assert verify_shards.verify(d, progress=False) == []
    assert verify_shards.main([str(d), "--quiet"]) == 0

    flipped = d / "train-00001.bin"
    data = bytearray(flipped.read_bytes())
    data[101] ^= 0x80  # the id becomes >= 32768, far outside the vocabulary
    flipped.write_bytes(bytes(data))
    os.truncate(d / "train-00002.bin", 1000)
    (d / "val-00000.bin").unlink()
    problems = verify_shards.verify(d, progress=False)
    assert any("train-00001.bin: corrupt: sha256" in p for p in problems)
    assert any("train-00001.bin: token 50 has an id >= vocab_size 1024" in p for p in problems)
    assert any("train-00002.bin: truncated: 1000 bytes" in p for p in problems)
    assert any("val-00000.bin: missing" in p for p in problems)
    assert len(problems) == 4
    assert verify_shards.verify(d, quick=True, progress=False) == [p for p in problems if "corrupt" not in p
                                                                     and "token 50" not in p]
    capsys.readouterr()
    assert verify_shards.main([str(d), "--quiet"]) == 1
    assert "error: shard " in capsys.readouterr().err

    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["val"][1]["num_docs"] += 1
    (d / "manifest.json").write_text(json.dumps(m))
    assert any("end-of-document tokens (id 3) but manifest num_docs" in p for p in verify_shards.verify(d, progress=False))
    (d / "manifest.json").write_text("{")
    assert verify_shards.main([str(d), "--quiet"]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_verify_refuses_the_first_id_past_the_vocabulary(tmp_path, pydoc_data_dir):
    """Ids run 0 .. vocab_size - 1: a token equal to vocab_size (one past the last id, an out-of-range embedding
    row) is as bad as any larger one. Pinned with the manifest's sha256 updated, so the bad id is the only fault;
    the largest valid id, vocab_size - 1, passes."""
    d = tmp_path / "shards"
    shutil.copytree(pydoc_data_dir.shards_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    shard = d / m["splits"]["train"][0]["path"]
    for token, ok in ((1023, True), (1024, False)):
        ids = np.fromfile(shard, np.uint16)
        ids[7] = token  # not the EOS id: num_docs stays right
        ids.tofile(shard)
        m["splits"]["train"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
        (d / "manifest.json").write_text(json.dumps(m))
        problems = verify_shards.verify(d, progress=False)
        if ok:
            assert problems == []
        else:
            assert len(problems) == 1, problems
            assert "token 7 has an id >= vocab_size 1024 (largest id 1024)" in problems[0], problems


@pytest.mark.parametrize("streaming", [True, False])
def test_bad_row_deep_in_a_json_file_is_an_error_naming_its_line(tmp_path, pydoc_data_dir, monkeypatch, streaming,
                                                                  hf_cache):
    """datasets reads JSON lines in 10 MB chunks; a non-string text in a later chunk used to turn every text of
    that chunk into its JSON encoding (quoted, escaped) without a word, and a malformed line was named by its
    row within the chunk. Small chunks stand in for a large file."""
    import datasets

    load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **kw: load(*a, **kw, **({"chunksize": 1 << 14}
                                                                                       if a[0] == "json" else {})))
    texts = [f'doc {i}: "quoted"\n' + "words " * 40 for i in range(300)]
    runs = iter(range(100))

    def build(lines: list[str], name: str = "c.jsonl"):
        path = tmp_path / name
        path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
        return build_shards.build([str(path)], pydoc_data_dir.tokenizer_model, tmp_path / f"o{next(runs)}",
                                  shard_tokens=1 << 20, num_proc=1, streaming=streaming, progress=False)

    lines = [json.dumps({"text": t}) for t in texts]
    for bad, what in (('{"text": 5}', r"line 251: field 'text' holds a value of type int, not a string"),
                      ('{"text": broken', r"line 251: malformed JSON"),
                      (b'{"text": "bad \xff byte"}', r"line 251: invalid UTF-8")):
        with pytest.raises(DataError, match=r"c.jsonl: " + what):
            build(lines[:250] + [bad] + lines[251:])
    rows = [{"text": t} for t in texts]
    rows[250] = {"text": 5}
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with pytest.raises(DataError, match=r"a.json: element 250 of the array: field 'text' holds a value of type int"):
        build_shards.build([str(tmp_path / "a.json")], pydoc_data_dir.tokenizer_model, tmp_path / "oa",
                           shard_tokens=1 << 20, num_proc=1, streaming=streaming, progress=False)
    # another field that changes type within a chunk is read as before (as JSON): the texts come through unchanged
    m = build([json.dumps({"meta": i if i < 10 else "x", "text": t}) for i, t in enumerate(texts[:20])], "meta.jsonl")
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    out = Path(m["inputs"][0]["path"]).parent / f"o{next(runs) - 1}"
    assert [sp.decode(d) for d in split_docs(split_tokens(out, "train"), 3)] == texts[:20]
    # ...and a non-string text after it is still an error (the re-encoding mode would quote every text)
    with pytest.raises(DataError, match=r"meta2.jsonl: line 15: field 'text' holds a value of type int"):
        build([json.dumps({"meta": i if i < 10 else "x", "text": t if i != 14 else 5})
               for i, t in enumerate(texts[:20])], "meta2.jsonl")

def test_verify_checks_the_tokenizer_copy(tmp_path, pydoc_data_dir):
    """The shards are ids of one tokenizer: a tokenizer.model swapped for another (same name, other model) decodes
    them into other text. verify compares its sha256 with the manifest's; --quick, sizes only, does not read it."""
    d = tmp_path / "shards"
    shutil.copytree(pydoc_data_dir.shards_dir, d)
    (d / "tokenizer.model").write_bytes((d / "tokenizer.model").read_bytes() + b"\0")
    problems = verify_shards.verify(d, progress=False)
    assert problems == [f"tokenizer copy {d.absolute() / 'tokenizer.model'}: sha256 differs from the manifest"]
    assert verify_shards.verify(d, quick=True, progress=False) == []



def test_verify_reports_a_shard_dropped_from_the_manifest(tmp_path, pydoc_data_dir):
    """A manifest edited to lose a shard's entry used to verify as OK: its tokens vanish from training."""
    d = tmp_path / "shards"
    shutil.copytree(pydoc_data_dir.shards_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    dropped = m["splits"]["train"].pop()
    (d / "manifest.json").write_text(json.dumps(m))
    problems = verify_shards.verify(d, progress=False)
    assert any(f"shard {d / dropped['path']}: not listed in" in p for p in problems), problems
    assert any("stats.tokens.train" in p and "sum of its shards" in p for p in problems), problems
    assert any("stats.docs.train" in p for p in problems), problems
    assert verify_shards.main([str(d), "--quiet"]) == 1


def test_verify_reports_a_split_dropped_with_its_files(tmp_path, pydoc_data_dir):
    """The val split's entry and files deleted together verified as OK: the stats still count it."""
    d = tmp_path / "shards"
    shutil.copytree(pydoc_data_dir.shards_dir, d)
    m = json.loads((d / "manifest.json").read_text())
    for shard in m["splits"].pop("val"):
        (d / shard["path"]).unlink()
    (d / "manifest.json").write_text(json.dumps(m))
    problems = verify_shards.verify(d, progress=False)
    assert any("stats.tokens.val" in p and "lists no 'val' split" in p for p in problems), problems
    assert any("stats.docs.val" in p for p in problems), problems
    assert verify_shards.main([str(d), "--quiet"]) == 1


def test_output_directory_inside_an_input_directory_is_not_an_input(tmp_path, pydoc_data_dir):
    """--input data --out data/shards: the re-run of the finished build was refused ('input
    data/shards/manifest.json added'), and the tokenizer's tokenizer.json became an input of its re-run."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "c.jsonl", DOCS[:5])
    argv = ["--input", str(data), "--tokenizer", str(pydoc_data_dir.tokenizer_model), "--out", str(data / "shards"),
            "--shard-tokens", "1000", "--num-proc", "1", "--quiet"]
    assert build_shards.main(argv) == 0
    first = (data / "shards" / "manifest.json").read_bytes()
    assert build_shards.main(argv) == 0  # already built: nothing to do
    assert build_shards.main(argv + ["--overwrite"]) == 0
    assert (data / "shards" / "manifest.json").read_bytes() == first
    (tmp_path / "t").mkdir()
    write_jsonl(tmp_path / "t" / "c.jsonl", DOCS[:5])
    tok = ["--input", str(tmp_path / "t"), "--vocab-size", "400", "--out", str(tmp_path / "t" / "tok"), "--quiet"]
    assert train_tokenizer.main(tok) == 0
    assert train_tokenizer.main(tok + ["--overwrite"]) == 0


@pytest.mark.parametrize("spec", ["{data}", "{data}/*.jsonl"])
def test_an_input_whose_files_all_lie_in_the_output_directory_is_named_so(tmp_path, pydoc_data_dir, spec, capsys):
    """--input data --out data: refused as "directory has no .txt, .jsonl, .json, .parquet files" (or "the pattern
    matches no file") beside the corpus' own files."""
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "c.jsonl", DOCS[:5])
    spec = spec.format(data=data)
    argv = ["--input", spec, "--tokenizer", str(pydoc_data_dir.tokenizer_model), "--out", str(data),
            "--shard-tokens", "1000", "--num-proc", "1", "--quiet"]
    assert build_shards.main(argv) == 2
    assert capsys.readouterr().err == (f"error: input {spec}: its files lie in the output directory {data}, which is "
                                       "never read as input: choose an --out outside it\n")
    assert sorted(p.name for p in data.iterdir()) == ["c.jsonl"]
