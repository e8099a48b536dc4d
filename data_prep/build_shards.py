"""Tokenize a corpus into fixed-size token shards plus a manifest (format: docs/data-format.md).

Documents are read in input order (files sorted within directories and globs), tokenized in
--num-proc worker processes and written in that same order, so the output does not depend on
--num-proc. Every document is followed by the end-of-document token (--doc-boundary eos), or
wrapped in BOS ... EOS (bos_eos). A keyed hash of each document's text puts it in the val split
with probability --val-fraction. Blank documents are skipped and counted. --fim-rate R writes a share R of the
train split's documents in fill-in-the-middle form, as DeepSeek-V3 pretrained (R 0.1): cut at two places chosen
by a keyed hash of the text, BEGIN prefix HOLE suffix END middle, then the end-of-document token (--fim-symbols
names the three pieces, which the tokenizer must hold: train_tokenizer.py --fim).

Re-running the same command after an interruption resumes it (see data_prep/shard_writer.py);
re-running a finished build only checks it. manifest.json is written last, atomically.

    python data_prep/build_shards.py --input corpus/ --tokenizer tok/tokenizer.model \\
        --out data/shards --shard-tokens 100_000_000 --val-fraction 0.001
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import multiprocessing
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

if __package__ in (None, ""):  # run as a file: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm
from tqdm import tqdm

from data_prep import tokenize_worker
from data_prep.common import (
    disk_full_named, fraction, make_output_dir, non_negative_int, positive_int, probability, run_cli,
)
from data_prep.shard_writer import SPLITS, BuildLog, SplitWriter, restore, shard_files
from data_prep.sources import TXT_DOC_MODES, Input, iter_texts, resolve_inputs
from deepseek_pt.data.format import (
    BUILD_LOG_NAME, DOC_BOUNDARIES, FIM_SYMBOLS, FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, DataError, check_shard,
    dtype_for_vocab, fim_ids, open_manifest, open_tokenizer,
)
from deepseek_pt.fileio import atomic_write_bytes, atomic_write_json, sha256_file

TOKENIZER_COPY = "tokenizer.model"
_TASK_CHARS = 1 << 20  # ~0.2 s of tokenization per worker task
_TASK_DOCS = 4096


@dataclass
class Task:
    texts: list[str]
    end: tuple[int, int]
    """(input index, row) just past the task's last document: where a resumed build restarts."""
    empty: int
    """Blank documents skipped while reading this task."""


def read_tasks(inputs: list[Input], start: tuple[int, int], text_field: str, txt_doc: str,
               streaming: bool) -> Iterator[Task]:
    """Batches of non-blank documents from position `start` on, never spanning two inputs."""
    first, first_row = start
    for k in range(first, len(inputs)):
        row = first_row if k == first else 0
        texts, chars, empty = [], 0, 0
        for text in iter_texts(inputs[k], text_field, txt_doc, streaming, start_row=row):
            row += 1
            if not text or text.isspace():
                empty += 1
                continue
            texts.append(text)
            chars += len(text)
            if chars >= _TASK_CHARS or len(texts) >= _TASK_DOCS:
                yield Task(texts, (k, row), empty)
                texts, chars, empty = [], 0, 0
        yield Task(texts, (k + 1, 0), empty)


def tokenized(tasks: Iterator[Task], spec: tokenize_worker.TokenizeSpec, num_proc: int):
    """(task, tokens by split) in task order; at most 2 tasks per worker in flight bounds memory."""
    if num_proc == 1:
        tokenize_worker.init(spec)
        for task in tasks:
            yield task, tokenize_worker.tokenize(task.texts)
        return
    # spawn, not fork: the parent may already run datasets/pyarrow threads
    with multiprocessing.get_context("spawn").Pool(num_proc, tokenize_worker.init_process, (spec,)) as pool:
        pending = deque()
        for task in tasks:
            pending.append((task, pool.apply_async(tokenize_worker.tokenize, (task.texts,))))
            task.texts = None  # the worker has its copy
            if len(pending) >= 2 * num_proc:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


def _diff(old, new, key: str = "") -> list[str]:
    """Human-readable differences between two build headers."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(old.keys() | new.keys())
                for d in _diff(old.get(k), new.get(k), f"{key}.{k}" if key else k)]
    if key == "inputs" and isinstance(old, list) and isinstance(new, list):
        was, now = {i["path"]: i for i in old}, {i["path"]: i for i in new}
        out = [f"input {p} added" for p in now.keys() - was.keys()]
        out += [f"input {p} removed" for p in was.keys() - now.keys()]
        out += [f"input {p} changed (size or modification time)" for p in was.keys() & now.keys() if was[p] != now[p]]
        return out or (["inputs reordered"] if old != new else [])
    return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def _clear_shards(out: Path) -> None:
    for *_, path in shard_files(out):
        path.unlink()


def _clear(out: Path) -> None:
    """Remove everything this tool writes in `out` (and nothing else)."""
    _clear_shards(out)
    for name in (MANIFEST_NAME, BUILD_LOG_NAME, TOKENIZER_COPY):
        (out / name).unlink(missing_ok=True)


def _already_built(out: Path, header: dict, overwrite: bool) -> dict | None:
    """The finished manifest if `out` holds this very build; clears or refuses a different one."""
    manifest_file, log_file = out / MANIFEST_NAME, out / BUILD_LOG_NAME
    if not manifest_file.exists() and not log_file.exists():
        return None
    m, what = None, str(manifest_file)
    try:
        if manifest_file.exists():
            m = open_manifest(out)
            old = {k: m.raw.get(k) for k in header}
        else:
            what = f"unfinished build {log_file}"
            records = BuildLog(log_file).read()
            old = {k: v for k, v in records[0][0].items() if k != "type"} if records else {}
            if len(records) <= 1:  # it failed before finishing a shard: nothing to lose
                overwrite = True
        changes = _diff(old, header)
    except DataError as e:  # unreadable: certainly not this build
        m, changes = None, [str(e)]
    if changes and not overwrite:
        raise DataError(f"{out} holds another build ({what}): " + "; ".join(changes[:5])
                        + "; pass --overwrite to replace it, or choose another --out")
    if changes:
        _clear(out)
        return None
    if m is None:
        return None  # same build, unfinished: resume it
    for split in m.splits.values():
        for shard in split:
            try:
                check_shard(m, shard)
            except DataError as e:
                raise DataError(f"{out} is a finished build but {e}; run verify_shards.py, or pass "
                                "--overwrite to rebuild") from None
    log_file.unlink(missing_ok=True)  # left behind if the build died right after its manifest
    return m.raw


def _load_tokenizer(path: Path, doc_boundary: str) -> tuple[spm.SentencePieceProcessor, dict]:
    """The model and its special ids (None where it has none)."""
    sp = open_tokenizer(path)
    ids = {name: (getattr(sp, name)() if getattr(sp, name)() >= 0 else None)
           for name in ("bos_id", "eos_id", "pad_id", "unk_id")}
    if ids["eos_id"] is None:
        raise DataError(f"tokenizer {path}: has no end-of-document token (eos_id)")
    if doc_boundary == "bos_eos" and ids["bos_id"] is None:
        raise DataError(f"tokenizer {path}: --doc-boundary bos_eos needs a bos_id, the model has none")
    return sp, ids


def _fresh_stats(fim: bool) -> dict:
    return {"docs": {s: 0 for s in SPLITS}, "empty_docs": 0, **({"fim_docs": 0} if fim else {})}


def _start_or_resume(out: Path, log: BuildLog, writers: dict[str, SplitWriter], header: dict, num_proc: int,
                     progress: bool) -> tuple[tuple[int, int], dict]:
    """Input position and stats to continue from: the last intact checkpoint of an interrupted
    build (writers restored to it), or the very beginning."""
    records = log.read() if log.path.exists() else []
    fim = "fim" in header["build"]
    if not records:  # a fresh build: drop shard files a build without a log may have left
        _clear_shards(out)
        log.start(header)
        return (0, 0), _fresh_stats(fim)
    cp, kept = restore(out, log, records, header["dtype"], num_proc, progress)
    for s, w in writers.items():
        st = cp["splits"][s] if cp else {"partial_tokens": 0, "partial_docs": 0}
        w.resume(kept[s], st["partial_tokens"], st["partial_docs"])
    if progress:
        print(f"{out}: resuming an interrupted build ({sum(map(len, kept.values()))} finished shards kept)",
              file=sys.stderr)
    if cp is None:
        return (0, 0), _fresh_stats(fim)
    return (cp["position"]["input"], cp["position"]["row"]), cp["stats"]


def build(inputs: list[str], tokenizer: str | Path, out: str | Path, shard_tokens: int,
          val_fraction: float = 0.0, num_proc: int | None = None, text_field: str = "text",
          txt_doc: str = "document", doc_boundary: str = "eos", split_seed: int = 0, streaming: bool = True,
          overwrite: bool = False, progress: bool = True, fim_rate: float = 0.0, fim_seed: int = 0,
          fim_symbols: tuple[str, ...] = FIM_SYMBOLS) -> dict:
    """Build (or resume, or confirm) the shard directory `out`; returns its manifest."""
    if shard_tokens <= 0:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction {val_fraction} is not in [0, 1)")
    if doc_boundary not in DOC_BOUNDARIES:
        raise DataError(f"doc_boundary {doc_boundary!r} is not one of {', '.join(DOC_BOUNDARIES)}")
    if txt_doc not in TXT_DOC_MODES:
        raise DataError(f"txt_doc {txt_doc!r} is not one of {', '.join(TXT_DOC_MODES)}")
    if not 0 <= split_seed < 1 << 64:
        raise DataError(f"split_seed {split_seed} is not in [0, 2^64)")
    if not 0.0 <= fim_rate <= 1.0:
        raise DataError(f"fim_rate {fim_rate} is not in [0, 1]")
    if not 0 <= fim_seed < 1 << 64:
        raise DataError(f"fim_seed {fim_seed} is not in [0, 2^64)")
    num_proc = num_proc or os.cpu_count() or 1
    tokenizer, out = Path(tokenizer), Path(out)
    sp, ids = _load_tokenizer(tokenizer, doc_boundary)
    fim = None
    if fim_rate > 0:
        fim = tokenize_worker.FimSpec(fim_rate, fim_seed, fim_ids(sp, tuple(fim_symbols), f"tokenizer {tokenizer}"))
    # read once, now: --tokenizer may be the copy in `out`, which --overwrite deletes before it is copied
    tokenizer_bytes = tokenizer.read_bytes()
    resolved = resolve_inputs(list(inputs), exclude=out)
    dtype = dtype_for_vocab(sp.get_piece_size())
    header = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": sp.get_piece_size(),
        "dtype": dtype, "doc_boundary": doc_boundary,
        "tokenizer": {"path": TOKENIZER_COPY, "sha256": hashlib.sha256(tokenizer_bytes).hexdigest(), **ids},
        "inputs": [i.to_json() for i in resolved],
        "build": {"shard_tokens": shard_tokens, "val_fraction": val_fraction, "split_seed": split_seed,
                  "text_field": text_field, "txt_doc": txt_doc, "sentencepiece_version": spm.__version__,
                  "datasets_version": importlib.metadata.version("datasets")},
    }
    if fim is not None:  # absent otherwise: builds from before it still match their manifests
        header["build"]["fim"] = {"rate": fim_rate, "seed": fim_seed, "order": "psm", "symbols": list(fim_symbols),
                                  "ids": list(fim.ids)}
    make_output_dir(out)
    done = _already_built(out, header, overwrite)
    if done is not None:
        if progress:
            print(f"{out}: already built and complete; nothing to do", file=sys.stderr)
        return done

    # the build's checkpoints make a re-run resume it, after a full disk as after a kill
    with disk_full_named(out, "free space and re-run the same command to resume"):
        copy = out / TOKENIZER_COPY
        if not copy.is_file() or sha256_file(copy) != header["tokenizer"]["sha256"]:
            atomic_write_bytes(copy, tokenizer_bytes)
        log = BuildLog(out / BUILD_LOG_NAME)
        writers = {s: SplitWriter(out, s, dtype, shard_tokens, log) for s in SPLITS}
        start, stats = _start_or_resume(out, log, writers, header, num_proc, progress)
        spec = tokenize_worker.TokenizeSpec(str(copy), dtype, ids["eos_id"],
                                            ids["bos_id"] if doc_boundary == "bos_eos" else None,
                                            val_fraction, split_seed, fim)
        bar = tqdm(unit="tok", unit_scale=True, desc="tokenizing", disable=not progress)
        try:
            tasks = read_tasks(resolved, start, text_field, txt_doc, streaming)
            for task, result in tokenized(tasks, spec, num_proc):
                finished = 0
                for s, part in result.items():
                    finished += writers[s].append(part.tokens, part.doc_lengths)
                    stats["docs"][s] += len(part.doc_lengths)
                    if fim is not None:
                        stats["fim_docs"] += part.fim_docs
                    bar.update(len(part.tokens))
                stats["empty_docs"] += task.empty
                if finished:
                    log.append({"type": "checkpoint", "position": {"input": task.end[0], "row": task.end[1]},
                                "stats": stats, "splits": {s: w.checkpoint() for s, w in writers.items()}})
                bar.set_postfix(docs=sum(stats["docs"].values()), shards=sum(len(w.shards) for w in writers.values()),
                                input=f"{min(task.end[0] + 1, len(resolved))}/{len(resolved)}")
            if not any(stats["docs"].values()):
                raise DataError(f"inputs {', '.join(inputs)}: no non-blank documents in field {text_field!r}")
            for w in writers.values():
                w.finish()
        finally:
            bar.close()
            log.close()

        manifest = {
            **header,
            "stats": {**stats, "tokens": {s: sum(x.num_tokens for x in w.shards) for s, w in writers.items()}},
            "splits": {s: [x.to_json() for x in w.shards] for s, w in writers.items()},
        }
        atomic_write_json(out / MANIFEST_NAME, manifest)
        log.remove()
        return manifest


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files (.txt .jsonl .json .parquet, optionally .gz/.zst...), directories, globs, "
                        "or hf:NAME[:CONFIG][@SPLIT] Hub datasets; read in the order given")
    p.add_argument("--tokenizer", required=True, metavar="MODEL", help="sentencepiece .model file")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--shard-tokens", type=positive_int, required=True, metavar="N",
                   help="tokens per shard (every shard but the last of a split has exactly N)")
    p.add_argument("--val-fraction", type=fraction, default=0.0, metavar="F",
                   help="expected share of documents in the val split (default %(default)s)")
    p.add_argument("--split-seed", type=non_negative_int, default=0, metavar="S", help="key of the train/val hash")
    p.add_argument("--num-proc", type=positive_int, default=None, metavar="P",
                   help="tokenizer processes (default: all cores); does not change the output")
    p.add_argument("--text-field", default="text", help="field holding the text in json/parquet rows")
    p.add_argument("--txt-doc", choices=TXT_DOC_MODES, default="document",
                   help="what one document is in a .txt file (default: the whole file)")
    p.add_argument("--doc-boundary", choices=DOC_BOUNDARIES, default="eos",
                   help="eos: append EOS to each document (default); bos_eos: BOS + document + EOS")
    p.add_argument("--fim-rate", type=probability, default=0.0, metavar="R",
                   help="share of the train split's documents written fill-in-the-middle (DeepSeek-V3: 0.1; "
                        "default %(default)s)")
    p.add_argument("--fim-seed", type=non_negative_int, default=0, metavar="S",
                   help="key of the hash that picks those documents and their cuts")
    p.add_argument("--fim-symbols", nargs=3, default=list(FIM_SYMBOLS), metavar=("BEGIN", "HOLE", "END"),
                   help="the tokenizer's pieces around the parts (default: %(default)s)")
    p.add_argument("--no-streaming", dest="streaming", action="store_false",
                   help="load inputs through the datasets cache instead of streaming them")
    p.add_argument("--overwrite", action="store_true", help="replace a different build found in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:  # absent, or --out is not a directory (build() names that)
        return None
    return st.st_ino, st.st_mtime_ns


def _main(argv: list[str] | None) -> int:
    a = _parser().parse_args(argv)
    manifest = Path(a.out) / MANIFEST_NAME
    before = _stamp(manifest)  # a finished build re-run writes nothing: say so, also under --quiet
    m = build(a.input, a.tokenizer, a.out, a.shard_tokens, val_fraction=a.val_fraction, num_proc=a.num_proc,
              text_field=a.text_field, txt_doc=a.txt_doc, doc_boundary=a.doc_boundary, split_seed=a.split_seed,
              streaming=a.streaming, overwrite=a.overwrite, progress=not a.quiet, fim_rate=a.fim_rate,
              fim_seed=a.fim_seed, fim_symbols=tuple(a.fim_symbols))
    for s in SPLITS:
        fim = f" ({m['stats']['fim_docs']} fill-in-the-middle)" if s == "train" and "fim_docs" in m["stats"] else ""
        print(f"{s}: {len(m['splits'][s])} shards, {m['stats']['tokens'][s]} tokens, {m['stats']['docs'][s]} docs{fim}")
    if a.val_fraction > 0 and not m["splits"]["val"]:
        print(f"warning: the val split is empty (--val-fraction {a.val_fraction} of "
              f"{m['stats']['docs']['train']} documents)", file=sys.stderr)
    print(f"wrote {manifest}" if _stamp(manifest) != before else f"{manifest}: already built; nothing written")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv, interrupted="interrupted: re-run the same command to resume")


if __name__ == "__main__":
    sys.exit(main())
