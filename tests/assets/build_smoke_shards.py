"""Rebuild tests/assets/smoke_shards: the token shards that the engine tests train on, committed so that their
losses (tests/assets/smoke_losses.json) do not depend on the Python version whose pydoc topics they come from.

    python tests/assets/build_smoke_shards.py   # then: UPDATE_LOSS_REFERENCE=1 pytest tests/test_train.py -k reference

The first 40 pydoc topics (by name), a 1,024-piece BPE tokenizer trained on them, shards of 8,192 tokens (several
per split, so samples cross shard boundaries) and a 10% validation split. The shards written here differ from the
committed ones only if this Python's pydoc topics differ; the committed ones were built from CPython 3.11.7's.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from data_prep import build_shards, pydoc_corpus, train_tokenizer  # noqa: E402

OUT = Path(__file__).resolve().parent / "smoke_shards"
TOPICS = 40


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "pydoc.jsonl"
        docs = pydoc_corpus.documents()[:TOPICS]
        corpus.write_text("".join(json.dumps({"topic": name, "text": text}) + "\n" for name, text in docs))
        info = train_tokenizer.train([str(corpus)], 1024, Path(tmp) / "tokenizer", num_threads=1, progress=False)
        shutil.rmtree(OUT, ignore_errors=True)
        manifest = build_shards.build([str(corpus)], Path(tmp) / "tokenizer" / info["model"], OUT, shard_tokens=8192,
                                      val_fraction=0.1, num_proc=1, progress=False)
    print(f"{OUT}: {manifest['stats']['tokens']}")


if __name__ == "__main__":
    main()
