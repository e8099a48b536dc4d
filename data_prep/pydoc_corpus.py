"""Write CPython's own English as a small real-text corpus (no download needed).

By default one JSON line per pydoc help topic (`pydoc_data.topics`), sorted by topic name: about 80
documents and 465K characters, enough for tests and smoke runs of the whole pipeline. With
`--stdlib-docstrings`, one more line per standard-library module (read from its source, not imported):
the docstrings of the module and of its classes and functions, in source order; about 500 documents
and 1.8M characters more (CPython 3.11), so that a few hundred training steps of a benchmark's loss check
read each token about once instead of memorising a corpus they repeat. Each line is
{"topic": ..., "text": ...}; the corpus depends on the Python version that writes it.

    python data_prep/pydoc_corpus.py --out data/pydoc.jsonl [--stdlib-docstrings]
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.common import make_output_dir, run_cli
from deepseek_pt.fileio import atomic_write_bytes

# Standard-library folders that are not the library's own prose: tests, the IDLE and turtle demo apps,
# lib2to3's grammar fixtures, and installed third-party packages.
_NOT_LIBRARY = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages"}
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def documents(stdlib_docstrings: bool = False) -> list[tuple[str, str]]:
    """(topic, text) pairs in a fixed order: the pydoc topics, then (optionally) one per stdlib module."""
    from pydoc_data.topics import topics

    docs = sorted(topics.items())
    if stdlib_docstrings:
        docs += module_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    return docs


def module_docstrings(root: Path) -> list[tuple[str, str]]:
    """("module:NAME", text) for each module under `root` with docstrings, sorted by name: each docstring under
    the qualified name of what it documents, in source order (functions nested in functions left out)."""
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _NOT_LIBRARY.intersection(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # a file of another Python's syntax, or not Python
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        pieces = []

        def visit(node: ast.AST, name: str) -> None:
            doc = ast.get_docstring(node)
            if doc:
                pieces.append(f"{name}\n\n{doc}")
            in_function = isinstance(node, _FUNCTIONS)
            for child in node.body:
                if isinstance(child, ast.ClassDef) or (isinstance(child, _FUNCTIONS) and not in_function):
                    visit(child, f"{name}.{child.name}")

        visit(tree, module)
        if pieces:
            docs.append((module, "\n\n".join(pieces)))
    return [(f"module:{module}", text) for module, text in sorted(docs, key=lambda d: d[0].split("."))]


def write_corpus(out: str | Path, stdlib_docstrings: bool = False) -> int:
    """Write the corpus as JSON lines; returns the number of documents."""
    docs = documents(stdlib_docstrings)
    lines = "".join(json.dumps({"topic": name, "text": text}) + "\n" for name, text in docs)
    make_output_dir(Path(out).parent)
    atomic_write_bytes(out, lines.encode())
    return len(docs)


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="pydoc_corpus.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="output file")
    p.add_argument("--stdlib-docstrings", action="store_true",
                   help="add one document per standard-library module: its docstrings (about 4x the text)")
    a = p.parse_args(argv)
    print(f"wrote {write_corpus(a.out, a.stdlib_docstrings)} documents to {a.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
