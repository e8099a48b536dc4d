"""Shared fixtures: a real tokenizer and token shards built from CPython's pydoc topics, and the committed shards
(tests/assets) that the engine's loss reference was recorded on."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import pytest


class PydocData(NamedTuple):
    shards_dir: Path
    """Shard directory (manifest.json, train and val shards, tokenizer copy)."""
    tokenizer_model: Path
    vocab_size: int
    corpus: Path
    """The JSON-lines corpus the shards were built from (field `text`)."""


PYDOC_VOCAB = 1024
PYDOC_SHARD_TOKENS = 16384  # several shards per split, so that samples cross shard boundaries
PYDOC_VAL_FRACTION = 0.1


@pytest.fixture(scope="session")
def pydoc_data_dir(tmp_path_factory) -> PydocData:
    """Tokenizer (bpe, 1024 pieces) and shards (train + val, eos boundaries) of the pydoc corpus,
    built once per test session through the data_prep scripts' functions. Skipped where data_prep's dependencies
    are absent (the GPU machine's image carries neither; the project's install has both)."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("datasets")
    from data_prep import build_shards, pydoc_corpus, train_tokenizer

    root = tmp_path_factory.mktemp("pydoc_data")
    corpus = root / "pydoc.jsonl"
    pydoc_corpus.write_corpus(corpus)
    info = train_tokenizer.train([str(corpus)], PYDOC_VOCAB, root / "tokenizer", num_threads=2, progress=False)
    model = root / "tokenizer" / info["model"]
    build_shards.build([str(corpus)], model, root / "shards", shard_tokens=PYDOC_SHARD_TOKENS,
                       val_fraction=PYDOC_VAL_FRACTION, num_proc=1, progress=False)
    return PydocData(root / "shards", model, info["vocab_size"], corpus)


@pytest.fixture(scope="session")
def fim_tokenizer_model(pydoc_data_dir, tmp_path_factory) -> Path:
    """A tokenizer of the pydoc corpus (1024 pieces) holding fill-in-the-middle's three pieces (FIM_SYMBOLS), as
    train_tokenizer.py --fim trains it."""
    from data_prep import train_tokenizer
    from deepseek_pt.data.format import FIM_SYMBOLS

    out = tmp_path_factory.mktemp("fim_tokenizer")
    info = train_tokenizer.train([str(pydoc_data_dir.corpus)], PYDOC_VOCAB, out,
                                 user_defined_symbols=list(FIM_SYMBOLS), num_threads=2, progress=False)
    return out / info["model"]


@pytest.fixture(scope="session")
def smoke_shards(tmp_path_factory) -> Path:
    """A copy of tests/assets/smoke_shards (40 pydoc topics, vocabulary 1024, 55K train and 19K val tokens in
    8,192-token shards): the same tokens on every Python version, unlike pydoc_data_dir."""
    return shutil.copytree(Path(__file__).parent / "assets" / "smoke_shards", tmp_path_factory.mktemp("assets") / "shards")


@pytest.fixture(scope="session")
def mirrored_smoke_shards(smoke_shards, tmp_path_factory) -> Path:
    """smoke_shards with every token id mirrored (id -> vocab_size - 1 - id) and the checksums to match: a second
    corpus of the same tokenizer, none of whose samples can be taken for one of smoke_shards' (data.blend's tests)."""
    import hashlib
    import json

    import numpy as np

    mirrored = shutil.copytree(smoke_shards, tmp_path_factory.mktemp("mirrored") / "mirrored")
    manifest = json.loads((mirrored / "manifest.json").read_text())
    for shard in (s for split in manifest["splits"].values() for s in split):
        f = mirrored / shard["path"]
        tokens = manifest["vocab_size"] - 1 - np.fromfile(f, dtype=manifest["dtype"]).astype(np.int64)
        tokens.astype(manifest["dtype"]).tofile(f)
        shard["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (mirrored / "manifest.json").write_text(json.dumps(manifest))
    return mirrored
