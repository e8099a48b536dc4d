"""The token-shard format: manifest schema, validation and per-shard checks (docs/data-format.md).

Shared by the writer (data_prep/build_shards.py), the checker (data_prep/verify_shards.py) and the
loader, so that all three agree on what a valid shard directory is.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..fileio import read_json, sha256_file

FORMAT_NAME = "deepseek_pt.token_shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
BUILD_LOG_NAME = "build_log.jsonl"
"""Present while a build is unfinished; build_shards.py resumes from it."""
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DOC_BOUNDARIES = ("eos", "bos_eos")
FIM_SYMBOLS = ("<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>")
"""Fill-in-the-middle's pieces BEGIN, HOLE and END unless named otherwise (build_shards.py --fim-rate)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


class DataError(ValueError):
    """Bad or missing data; the message names the file or shard and what is wrong with it."""


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest shard dtype that holds every id of a vocabulary of this size."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


@dataclass(frozen=True)
class ShardInfo:
    path: str
    """Path relative to the shard directory (POSIX separators)."""
    num_tokens: int
    num_docs: int
    """Documents whose boundary (end-of-document) token lies in this shard."""
    sha256: str
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.num_tokens * DTYPES[self.dtype].itemsize

    def to_json(self) -> dict:
        return {"path": self.path, "num_tokens": self.num_tokens, "num_docs": self.num_docs,
                "sha256": self.sha256, "dtype": self.dtype}


@dataclass(frozen=True)
class Manifest:
    dir: Path
    """Absolute shard directory; shard paths are relative to it."""
    vocab_size: int
    dtype: str
    tokenizer_path: Path | None
    """Absolute path of the tokenizer copy in the directory; None when that file is absent."""
    tokenizer_sha256: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    doc_boundary: str
    splits: dict[str, tuple[ShardInfo, ...]]
    raw: dict
    """The manifest as parsed, for fields this class does not model (inputs, build, stats)."""

    @property
    def path(self) -> Path:
        return self.dir / MANIFEST_NAME

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    def shards(self, split: str) -> tuple[ShardInfo, ...]:
        if split not in self.splits:
            raise DataError(f"{self.path}: no split {split!r} (has: {', '.join(sorted(self.splits)) or 'none'})")
        return self.splits[split]

    def num_tokens(self, split: str) -> int:
        return sum(s.num_tokens for s in self.shards(split))

    def num_samples(self, split: str, seq_len: int) -> int:
        """Samples of seq_len + 1 tokens the split holds (PretrainDataset's len), from the manifest alone."""
        return max(self.num_tokens(split) - 1, 0) // seq_len

    def shard_file(self, shard: ShardInfo) -> Path:
        return self.dir / shard.path


def _field(obj: dict, key: str, types: type | tuple, where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise DataError(f"{where}: missing field {key!r}")
    value = obj[key]
    if value is None and optional:
        return None
    if not isinstance(value, types) or (isinstance(value, bool) and types is int):
        raise DataError(f"{where}: field {key!r} has the wrong type: {value!r}")
    return value


def _relative_path(value: str, where: str) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts or "\\" in value:
        raise DataError(f"{where}: path {value!r} must be relative to the shard directory, without '..'")
    return value


def parse_shard(entry: Any, dtype: str, where: str) -> ShardInfo:
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object, got {entry!r}")
    shard = ShardInfo(
        path=_relative_path(_field(entry, "path", str, where), where),
        num_tokens=_field(entry, "num_tokens", int, where),
        num_docs=_field(entry, "num_docs", int, where),
        sha256=_field(entry, "sha256", str, where),
        dtype=_field(entry, "dtype", str, where),
    )
    if shard.num_tokens < 0 or shard.num_docs < 0:
        raise DataError(f"{where}: negative num_tokens/num_docs in {entry!r}")
    if not _SHA256.fullmatch(shard.sha256):
        raise DataError(f"{where}: sha256 {shard.sha256!r} is not 64 lowercase hex digits")
    if shard.dtype != dtype:
        raise DataError(f"{where}: shard dtype {shard.dtype!r} differs from the manifest dtype {dtype!r}")
    return shard


def parse_manifest(raw: Any, directory: Path, where: str) -> Manifest:
    """Validate a parsed manifest.json; DataError names the first bad field."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: top level must be an object")
    if raw.get("format") != FORMAT_NAME:
        raise DataError(f"{where}: format is {raw.get('format')!r}, expected {FORMAT_NAME!r}")
    version = _field(raw, "format_version", int, where)
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: format_version {version} is newer than this reader ({FORMAT_VERSION}); update deepseek_pt")
    if version < 1:  # versions count from 1: no writer made this one
        raise DataError(f"{where}: format_version {version} is not a version (1 to {FORMAT_VERSION})")
    vocab_size = _field(raw, "vocab_size", int, where)
    dtype = _field(raw, "dtype", str, where)
    if vocab_size <= 0:
        raise DataError(f"{where}: vocab_size must be positive, got {vocab_size}")
    if dtype not in DTYPES:
        raise DataError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise DataError(f"{where}: vocab_size {vocab_size} does not fit dtype {dtype}")
    boundary = _field(raw, "doc_boundary", str, where)
    if boundary not in DOC_BOUNDARIES:
        raise DataError(f"{where}: doc_boundary {boundary!r} is not one of {', '.join(DOC_BOUNDARIES)}")

    tok = _field(raw, "tokenizer", dict, where)
    tok_where = f"{where}: tokenizer"
    ids = {}
    for name in ("bos_id", "eos_id", "pad_id", "unk_id"):
        value = _field(tok, name, int, tok_where, optional=True)
        if value is not None and not 0 <= value < vocab_size:
            raise DataError(f"{tok_where}: {name} {value} is outside the vocabulary [0, {vocab_size})")
        ids[name] = value
    if ids["eos_id"] is None:
        raise DataError(f"{tok_where}: eos_id is required (it marks document boundaries)")
    tok_file = directory / _relative_path(_field(tok, "path", str, tok_where), tok_where)

    splits_raw = _field(raw, "splits", dict, where)
    splits, seen = {}, set()
    for split, entries in splits_raw.items():
        if not isinstance(entries, list):
            raise DataError(f"{where}: splits.{split} must be a list of shards")
        shards = tuple(parse_shard(e, dtype, f"{where}: splits.{split}[{i}]") for i, e in enumerate(entries))
        for s in shards:
            if s.path in seen:
                raise DataError(f"{where}: shard {s.path} is listed twice")
            seen.add(s.path)
        splits[split] = shards
    return Manifest(
        dir=directory, vocab_size=vocab_size, dtype=dtype,
        tokenizer_path=tok_file if tok_file.is_file() else None,
        tokenizer_sha256=_field(tok, "sha256", str, tok_where), doc_boundary=boundary,
        splits=splits, raw=raw, **ids,
    )


def open_manifest(path: str | Path) -> Manifest:
    """Read and validate DIR/manifest.json (`path` is the directory or the manifest file itself)."""
    path = Path(path).expanduser().absolute()
    file = path / MANIFEST_NAME if path.is_dir() or path.suffix != ".json" else path
    if not file.is_file():
        hint = " (the build is incomplete: re-run build_shards.py to finish it)" if (file.parent / BUILD_LOG_NAME).exists() else ""
        raise DataError(f"{file}: manifest not found{hint}")
    raw = read_json(file, DataError)
    return parse_manifest(raw, file.parent, str(file))


def check_shard(manifest: Manifest, shard: ShardInfo, checksum: bool = False) -> None:
    """Size (and optionally sha256) of one shard file against the manifest; DataError if they differ."""
    file = manifest.shard_file(shard)
    try:
        size = file.stat().st_size
    except FileNotFoundError:
        raise DataError(f"shard {file}: missing (listed in {manifest.path})") from None
    if not file.is_file():  # a directory's size would read as "truncated"
        raise DataError(f"shard {file}: not a file (listed in {manifest.path})")
    if size != shard.nbytes:
        what = "truncated" if size < shard.nbytes else "too long"
        raise DataError(f"shard {file}: {what}: {size} bytes, manifest says {shard.num_tokens} tokens "
                        f"x {DTYPES[shard.dtype].itemsize} = {shard.nbytes} bytes")
    if checksum:
        digest = sha256_file(file)
        if digest != shard.sha256:
            raise DataError(f"shard {file}: corrupt: sha256 {digest} != manifest {shard.sha256}")


def open_tokenizer(path: str | Path, what: str = "tokenizer"):
    """The sentencepiece model in file `path`; DataError naming it (as `what`) if it is missing or not one.
    sentencepiece is imported here, not with the module, which the loaders import without it."""
    import sentencepiece as spm

    if Path(path).is_dir():
        hint = f" ({Path(path) / 'tokenizer.model'}?)" if (Path(path) / "tokenizer.model").is_file() else ""
        raise DataError(f"{what} {path}: a directory, not a sentencepiece model file{hint}")
    if not Path(path).is_file():
        raise DataError(f"{what} {path}: no such file")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise DataError(f"{what} {path}: not a sentencepiece model: {e}") from None


def read_tokenizer_copy(file: Path | None, sha256: str | None, error: type[Exception], whose: str,
                        recorded_in: str | Path | None = None, fix: str = "put that one back") -> bytes | None:
    """The bytes of the tokenizer copy `file` (None where there is none), if its sha256 is `sha256` (None: nothing
    recorded, any copy goes). Else `error` (the caller's class) names the file and the tokenizer it should be: the one
    `whose` ("the run trained with"), recorded in file `recorded_in` (its tokenizer_sha256), with `fix`."""
    if file is None or not file.is_file():
        return None
    data = file.read_bytes()
    if sha256 is not None and (got := hashlib.sha256(data).hexdigest()) != sha256:
        recorded = f"{recorded_in}: tokenizer_sha256 " if recorded_in is not None else ""
        raise error(f"{file}: sha256 {got[:12]}... is not the tokenizer {whose} ({recorded}{sha256[:12]}...): {fix}")
    return data


def tokenizer_from_bytes(data: bytes, what: str):
    """The sentencepiece model serialized in `data` (a checkpoint's stored tokenizer.model); DataError
    naming it (as `what`) if it is not one."""
    import sentencepiece as spm

    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
    except RuntimeError as e:
        raise DataError(f"{what}: not a sentencepiece model: {e}") from None
    if not sp.vocab_size():  # empty bytes load as an uninitialised processor
        raise DataError(f"{what}: not a sentencepiece model: empty")
    return sp


def fim_ids(sp, symbols: tuple[str, ...], what: str) -> tuple[int, int, int]:
    """The ids of fill-in-the-middle's three pieces in the sentencepiece model `sp` (named `what` in errors);
    DataError naming the first it lacks, and how to add them, or symbols that are not three different pieces."""
    if len(symbols) != 3 or len(set(symbols)) != 3:
        raise DataError(f"fim_symbols {list(symbols)}: need three different pieces (BEGIN, HOLE, END)")
    ids = tuple(sp.piece_to_id(s) for s in symbols)
    for symbol, i in zip(symbols, ids):
        if sp.id_to_piece(i) != symbol or sp.is_unknown(i) or sp.is_control(i):
            how = "--fim" if tuple(symbols) == FIM_SYMBOLS else \
                f"--user-defined-symbols {' '.join(repr(s) for s in symbols)}"
            raise DataError(f"{what}: has no piece {symbol!r} for fill-in-the-middle; train the tokenizer with "
                            f"train_tokenizer.py {how}")
    return ids
