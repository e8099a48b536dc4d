"""Tokenization of one batch of documents, run in the --num-proc worker processes (or inline).

Kept free of datasets/torch imports so that spawned workers start in a fraction of a second.
"""
from __future__ import annotations

import ctypes
import hashlib
import itertools
import multiprocessing
import os
import signal
import sys
from dataclasses import dataclass

import numpy as np
import sentencepiece as spm

from data_prep import safe_cuts
from deepseek_pt.data.format import DTYPES

# Longer documents are encoded a piece at a time (data_prep/safe_cuts.py): sentencepiece holds ~45 bytes per
# character of what it encodes, ~50 MB for a piece as for a task of short documents (build_shards._TASK_CHARS),
# and a piece's token list (~40 bytes per token) becomes an array (2 or 4 bytes per token) at once.
_PIECE_CHARS = 1 << 20


@dataclass(frozen=True)
class FimSpec:
    """Fill-in-the-middle, as DeepSeek-V3 pretrained (rate 0.1, the PSM order): a share of the training documents is
    cut at two character positions into prefix, middle and suffix and written
    BEGIN prefix HOLE suffix END middle, before the document's end token."""
    rate: float
    seed: int
    ids: tuple[int, int, int]
    """The tokenizer's pieces BEGIN, HOLE and END."""


@dataclass(frozen=True)
class TokenizeSpec:
    model_path: str
    dtype: str
    eos_id: int
    bos_id: int | None
    """Prepended to every document when set (doc_boundary bos_eos)."""
    val_fraction: float
    split_seed: int
    fim: FimSpec | None = None
    """Fill-in-the-middle for the train split's documents; None: none."""


@dataclass
class SplitTokens:
    tokens: np.ndarray
    """All documents of the split in this batch, boundary tokens included, concatenated."""
    doc_lengths: np.ndarray
    fim_docs: int = 0
    """Documents among them that fill-in-the-middle cut."""


_state: tuple[spm.SentencePieceProcessor, TokenizeSpec, frozenset[str] | None] | None = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init(spec: TokenizeSpec) -> None:
    global _state
    sp = spm.SentencePieceProcessor(model_file=spec.model_path)
    _state = (sp, spec, safe_cuts.joinable_pairs(sp))


def init_process(spec: TokenizeSpec) -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it terminates the pool)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    init(spec)


def _die_with_parent() -> None:
    """On Linux, end this worker when the build process dies (kill -9, OOM killer): an orphan would
    finish its task and die on the closed result pipe, printing a BrokenPipeError traceback."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(0)


def is_val(utf8: bytes, val_fraction: float, key: bytes) -> bool:
    """Split of a document from a keyed hash of its content: stable under any reordering of the
    inputs, and exact duplicates always land in the same split (no train/val leakage)."""
    h = int.from_bytes(hashlib.blake2b(utf8, digest_size=8, key=key).digest(), "little")
    return h < val_fraction * 2.0**64


def fim_cuts(utf8: bytes, length: int, fim: FimSpec) -> tuple[int, int] | None:
    """Where fill-in-the-middle cuts a document of `length` characters (its middle is [a, b)), or None where it
    stays whole: from a keyed hash of its content, as the split is, so any order of the inputs and any number of
    processes cut the same documents at the same places."""
    digest = hashlib.blake2b(utf8, digest_size=24, key=fim.seed.to_bytes(8, "little"), person=b"fim").digest()
    chosen, a, b = (int.from_bytes(digest[i:i + 8], "little") for i in (0, 8, 16))
    if chosen >= fim.rate * 2.0**64:
        return None
    a, b = sorted((a % (length + 1), b % (length + 1)))
    return a, b


def tokenize(texts: list[str]) -> dict[str, SplitTokens]:
    """Tokens of the batch's documents, boundary tokens added, grouped by split in input order."""
    _, spec, _ = _state
    key = spec.split_seed.to_bytes(8, "little")
    utf8 = [t.encode() for t in texts]
    val = [spec.val_fraction > 0 and is_val(u, spec.val_fraction, key) for u in utf8]
    cuts = [None if v or spec.fim is None else fim_cuts(u, len(t), spec.fim) for t, u, v in zip(texts, utf8, val)]
    del utf8
    docs = _encode(texts, cuts)
    splits = {}
    for name, want in (("train", False), ("val", True)):
        chosen = [d for d, v in zip(docs, val) if v == want]
        lengths = np.fromiter(map(len, chosen), dtype=np.int64, count=len(chosen))
        fim_docs = sum(c is not None for c, v in zip(cuts, val) if v == want)
        splits[name] = SplitTokens(_concatenate(chosen, DTYPES[spec.dtype]), lengths, fim_docs)
    return splits


def _encode(texts: list[str], cuts: list[tuple[int, int] | None]) -> list[list[int] | np.ndarray]:
    """Each document's tokens, boundary tokens included: a list, or an array for a long document or one that
    fill-in-the-middle cuts (cuts[i])."""
    sp, spec, _ = _state
    batched = [len(t) <= _PIECE_CHARS and c is None for t, c in zip(texts, cuts)]
    # one thread: parallelism comes from the worker processes
    short = sp.encode([t for t, b in zip(texts, batched) if b], num_threads=1)
    for d in short:  # in place: a copy per document costs ~2% of the tokenization time
        d.append(spec.eos_id)
        if spec.bos_id is not None:
            d.insert(0, spec.bos_id)
    short = iter(short)
    return [next(short) if b else _encode_parts(_fim_parts(t, c) if c else [t])
            for t, c, b in zip(texts, cuts, batched)]


def _fim_parts(text: str, cut: tuple[int, int]) -> list[str | int]:
    """BEGIN prefix HOLE suffix END middle (DeepSeek-V3's PSM order)."""
    a, b = cut
    begin, hole, end = _state[1].fim.ids
    return [begin, text[:a], hole, text[b:], end, text[a:b]]


def _encode_parts(parts: list[str | int]) -> np.ndarray:
    """Texts encoded and token ids as they are, between the boundary tokens; a long text encoded a piece at a time,
    each piece's list made an array as soon as it is encoded."""
    sp, spec, joinable = _state
    dtype = DTYPES[spec.dtype]
    arrays = [] if spec.bos_id is None else [np.array([spec.bos_id], dtype)]
    for part in parts:
        if isinstance(part, int):
            arrays.append(np.array([part], dtype))
        else:
            arrays += [np.array(sp.encode(p), dtype) for p in safe_cuts.pieces(part, joinable, _PIECE_CHARS)]
    return np.concatenate([*arrays, np.array([spec.eos_id], dtype)])


def _concatenate(docs: list[list[int] | np.ndarray], dtype: np.dtype) -> np.ndarray:
    """The documents' tokens in one array: each run of lists in one pass, arrays copied in."""
    parts = []
    for is_array, run in itertools.groupby(docs, key=lambda d: isinstance(d, np.ndarray)):
        run = list(run)
        parts += run if is_array else [np.fromiter(itertools.chain.from_iterable(run), dtype=dtype,
                                                   count=sum(map(len, run)))]
    if len(parts) == 1:
        return parts[0]  # no copy: the usual batch of short documents, or a long one alone in its split
    return np.concatenate(parts) if parts else np.empty(0, dtype)
