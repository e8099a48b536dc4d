"""The tokenizer a run trains with, kept in its run directory, so that the tools used after training (export,
generate, evaluate, convert) find it from any working directory and whatever became of the data since:

    RUN_DIR/tokenizer.model   a copy of the training data's tokenizer (absent when the shard directory has none)
    RUN_DIR/data.json         {"tokenizer_sha256": ..., "doc_boundary": "eos" | "bos_eos"}, from the data's manifest

Rank 0 writes both at every start, the copy first, each atomically; a run directory without data.json was
started before runs recorded it (its config's data.path is then all there is).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..data.format import DOC_BOUNDARIES, DataError, Manifest, read_tokenizer_copy
from ..export import SHA256
from ..fileio import atomic_write_bytes, atomic_write_json, read_json, sha256_file
from .checkpoint import CheckpointError

RECORD_NAME = "data.json"
COPY_NAME = "tokenizer.model"


@dataclass(frozen=True)
class RunTokenizer:
    sha256: str
    """The identity of the tokenizer the run trains with (the sha256 of its tokenizer.model)."""
    doc_boundary: str
    model: bytes | None
    """Its copy; None when the data had none."""


def data_tokenizer(manifest: Manifest) -> bytes | None:
    """The tokenizer copy of a shard directory (None without one). DataError if it is not the tokenizer its manifest
    names."""
    return read_tokenizer_copy(manifest.tokenizer_path, manifest.tokenizer_sha256, DataError,
                               f"{manifest.path} was built with", fix="put that one back, or remove the copy")


def record(manifest: Manifest, run_dir: Path) -> None:
    """Keep the tokenizer of `manifest` (the run's first data source; a blend's share it) in run_dir. DataError as
    data_tokenizer's."""
    copy = run_dir / COPY_NAME
    data = data_tokenizer(manifest)
    (run_dir / RECORD_NAME).unlink(missing_ok=True)  # until the copy below is in place, it could name another
    if data is not None:
        atomic_write_bytes(copy, data)
    elif copy.is_file() and sha256_file(copy) != manifest.tokenizer_sha256:  # kept if the data's was removed since
        copy.unlink()
    atomic_write_json(run_dir / RECORD_NAME, {"tokenizer_sha256": manifest.tokenizer_sha256,
                                              "doc_boundary": manifest.doc_boundary})


def read(run_dir: Path) -> RunTokenizer | None:
    """The tokenizer run_dir records, its copy verified; None for a run started before runs recorded it.
    CheckpointError names a malformed record, or a copy that is not the recorded tokenizer."""
    file = run_dir / RECORD_NAME
    if not file.is_file():
        return None
    raw = read_json(file, CheckpointError)
    sha = raw.get("tokenizer_sha256") if isinstance(raw, dict) else None
    boundary = raw.get("doc_boundary") if isinstance(raw, dict) else None
    if not (isinstance(sha, str) and SHA256.fullmatch(sha)) or boundary not in DOC_BOUNDARIES:
        raise CheckpointError(f"{file}: needs tokenizer_sha256 (64 lowercase hex digits) and doc_boundary (one of "
                              f"{', '.join(DOC_BOUNDARIES)})")
    data = read_tokenizer_copy(run_dir / COPY_NAME, sha, CheckpointError, "the run trained with", recorded_in=file)
    return RunTokenizer(sha, boundary, data)
