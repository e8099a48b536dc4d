"""Data pipeline throughput: tokenization (build_shards end to end, per --num-proc) against plain
single-process sentencepiece on the same text, and the training loader.

Corpus: CPython's pydoc topics repeated --repeat times (real English, no download). Prints a
markdown table (the figures in docs/benchmarks.md come from it).

    python bench/bench_data.py --repeat 40 --num-proc 1 2
    python bench/bench_data.py --loader-only data/shards     # the loader alone, on shards at hand
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sentencepiece as spm

from data_prep import build_shards, pydoc_corpus, train_tokenizer
from deepseek_pt.data import open_manifest


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the build's worker processes)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def best(run, trials: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of the fastest of `trials` runs of
    run() -> tokens: the run least disturbed by other load on the machine."""
    results = []
    for _ in range(trials):
        t, c = time.perf_counter(), cpu_seconds()
        n = run()
        results.append((n / (time.perf_counter() - t), n / (cpu_seconds() - c)))
    return max(results)


def bench_sentencepiece(model: Path, texts: list[str]) -> int:
    """Sentencepiece alone: one process, one thread, text already in memory."""
    sp = spm.SentencePieceProcessor(model_file=str(model))
    return sum(len(ids) for ids in sp.encode(texts, num_threads=1))


def bench_build(corpus: Path, model: Path, out: Path, num_proc: int) -> int:
    """The whole build: read jsonl through datasets, tokenize, write and hash shards, manifest."""
    shutil.rmtree(out, ignore_errors=True)
    m = build_shards.build([str(corpus)], model, out, shard_tokens=1 << 22, val_fraction=0.001,
                           num_proc=num_proc, progress=False)
    return sum(m["stats"]["tokens"].values())


def bench_loader(shards: Path, seq_len: int, micro_batch_size: int, steps: int, blend: bool = False) -> float:
    """Tokens per second delivered by TrainLoader (shuffled random reads, page cache warm); with `blend`, over a
    70:30 blend of the shards with themselves (each source its own order)."""
    from deepseek_pt.data import PretrainDataset, TrainLoader  # not at the top: spawned build workers
    # re-import this module, and should not pay for importing torch
    sources = [PretrainDataset(shards, seq_len=seq_len) for _ in range(2 if blend else 1)]
    loader = TrainLoader(sources, micro_batch_size, seed=0, weights=[0.7, 0.3] if blend else None)
    next(loader)
    t = time.perf_counter()
    for _ in range(steps):
        next(loader)
    return steps * micro_batch_size * seq_len / (time.perf_counter() - t)


def print_loader_table(shards: Path, a) -> None:
    print("\n| loader | tokens/s | batches/s |\n|---|---:|---:|")
    for blend in (False, True):
        rate = max(bench_loader(shards, a.seq_len, a.micro_batch_size, a.loader_steps, blend) for _ in range(a.trials))
        what = "over a 70:30 blend of two sources" if blend else "over one dataset"
        print(f"| TrainLoader B={a.micro_batch_size} T={a.seq_len}, {what} | {rate:,.0f} | "
              f"{rate / (a.micro_batch_size * a.seq_len):,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=40, help="copies of the pydoc corpus (~465K chars each)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--loader-steps", type=int, default=500)
    p.add_argument("--trials", type=int, default=3, help="runs per figure; the fastest is reported")
    p.add_argument("--loader-only", type=Path, metavar="SHARDS", help="time the loader alone on this shard directory")
    a = p.parse_args()
    if a.loader_only:
        print_loader_table(a.loader_only, a)
        return

    texts = [text for _ in range(a.repeat) for _, text in pydoc_corpus.documents()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = tmp / "corpus.jsonl"
        corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        pydoc_corpus.write_corpus(tmp / "pydoc.jsonl")
        train_tokenizer.train([str(tmp / "pydoc.jsonl")], a.vocab_size, tmp / "tok", progress=False)
        model = tmp / "tok" / "tokenizer.model"

        chars = sum(map(len, texts))
        print(f"corpus: {len(texts)} documents, {chars / 1e6:.1f}M characters; tokenizer: bpe, "
              f"{a.vocab_size} pieces; machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}")
        base, base_cpu = best(lambda: bench_sentencepiece(model, texts), a.trials)
        print("\n| tokenizer | processes | tokens/s | tokens/s per process | speed-up | tokens per CPU-second |\n"
              "|---|---:|---:|---:|---:|---:|")
        print(f"| sentencepiece `encode` (in memory, 1 thread) | 1 | {base:,.0f} | {base:,.0f} | 1.00 | {base_cpu:,.0f} |")
        for proc in a.num_proc:
            rate, cpu = best(lambda: bench_build(corpus, model, tmp / f"shards{proc}", proc), a.trials)
            print(f"| build_shards.py end to end | {proc} | {rate:,.0f} | {rate / proc:,.0f} | "
                  f"{rate / base:.2f} | {cpu:,.0f} |")
        tokens = open_manifest(tmp / f"shards{a.num_proc[0]}").num_tokens("train")
        print(f"\n(about {tokens / 1e6:.1f}M tokens; end to end = reading jsonl through datasets, tokenizing, "
              "writing and hashing shards, manifest; process start-up included; best of "
              f"{a.trials} runs)")

        print_loader_table(tmp / f"shards{a.num_proc[0]}", a)


if __name__ == "__main__":
    main()
