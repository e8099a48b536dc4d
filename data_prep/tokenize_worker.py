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

from deepseek_pt.data.format import DTYPES


@dataclass(frozen=True)
class TokenizeSpec:
    model_path: str
    dtype: str
    eos_id: int
    bos_id: int | None
    """Prepended to every document when set (doc_boundary bos_eos)."""
    val_fraction: float
    split_seed: int


@dataclass
class SplitTokens:
    tokens: np.ndarray
    """All documents of the split in this batch, boundary tokens included, concatenated."""
    doc_lengths: np.ndarray


_state: tuple[spm.SentencePieceProcessor, TokenizeSpec] | None = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init(spec: TokenizeSpec) -> None:
    global _state
    _state = (spm.SentencePieceProcessor(model_file=spec.model_path), spec)


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


def tokenize(texts: list[str]) -> dict[str, SplitTokens]:
    """Tokens of the batch's documents, boundary tokens added, grouped by split in input order."""
    sp, spec = _state
    key = spec.split_seed.to_bytes(8, "little")
    val = [spec.val_fraction > 0 and is_val(t.encode(), spec.val_fraction, key) for t in texts]
    docs = sp.encode(texts, num_threads=1)  # parallelism comes from the worker processes
    for d in docs:  # in place: a copy per document costs ~2% of the tokenization time
        d.append(spec.eos_id)
        if spec.bos_id is not None:
            d.insert(0, spec.bos_id)
    splits = {}
    for name, want in (("train", False), ("val", True)):
        chosen = [d for d, v in zip(docs, val) if v == want]
        lengths = np.fromiter(map(len, chosen), dtype=np.int64, count=len(chosen))
        tokens = np.fromiter(itertools.chain.from_iterable(chosen), dtype=DTYPES[spec.dtype],
                             count=int(lengths.sum()))
        splits[name] = SplitTokens(tokens, lengths)
    return splits
