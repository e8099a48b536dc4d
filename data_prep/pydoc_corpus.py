"""Write CPython's pydoc_data.topics as a small real-English corpus (no download needed).

One JSON line per help topic, sorted by topic name: {"topic": ..., "text": ...}. About 80
documents and 465K characters: enough for tests and smoke runs of the whole pipeline.

    python data_prep/pydoc_corpus.py --out data/pydoc.jsonl
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.common import run_cli
from deepseek_pt.fileio import atomic_write_bytes


def documents() -> list[tuple[str, str]]:
    """(topic, text) pairs in a fixed order."""
    from pydoc_data.topics import topics

    return sorted(topics.items())


def write_corpus(out: str | Path) -> int:
    """Write the corpus as JSON lines; returns the number of documents."""
    docs = documents()
    lines = "".join(json.dumps({"topic": name, "text": text}) + "\n" for name, text in docs)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, lines.encode())
    return len(docs)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="pydoc_corpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    a = p.parse_args(argv)
    print(f"wrote {write_corpus(a.out)} documents to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
