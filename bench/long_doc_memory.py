"""Peak memory of tokenizing one long document, per document size: the tokenizer worker's step alone
(tokenize_worker.tokenize on the text in memory), and build_shards.py end to end, with --num-proc 1
(reading, tokenizing and writing in one process) and --num-proc 2 (the main process, and the worker
that gets the document).

Corpus: CPython's pydoc topics repeated into a single document of each --mb size, one JSON line.
Each figure comes from a fresh process. Peak RSS is the kernel's high-water mark (VmHWM), reset
just before the measured step: ru_maxrss would carry over the RSS of the process that started
this one (Linux keeps it across exec). "grown" is that peak less the RSS just before the step.

    python bench/long_doc_memory.py --mb 5 20 40 --vocab-size 8192
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep import build_shards, pydoc_corpus, tokenize_worker, train_tokenizer

STEPS = ("tokenize", "build1", "build2")


def status_kb(field: str, pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def document(mb: float) -> str:
    text = "\n\n".join(t for _, t in pydoc_corpus.documents())
    return text * max(1, round(mb * 1e6 / len(text)))


class WorkerPeaks(threading.Thread):
    """Polls the VmHWM of this process's children (the build's workers) until stopped: a worker's high-water mark
    only rises, and it idles after its last task until the pool ends, so the last reading is its peak."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for pid in {int(p) for f in Path("/proc/self/task").glob("*/children") for p in f.read_text().split()}:
                try:
                    self.peaks[pid] = status_kb("VmHWM", pid)
                except (FileNotFoundError, ProcessLookupError, KeyError):  # it ended meanwhile
                    pass


def measure(step: str, mb: float, model: str, tmp: Path) -> dict:
    """One step in this (fresh) process: figures in MB."""
    text, corpus = document(mb), tmp / f"doc{mb}.jsonl"
    chars = len(text)
    if step != "tokenize":
        import datasets  # noqa: F401  (imported now: its ~80 MB are not the document's)

        corpus.write_text(json.dumps({"text": text}) + "\n")
        del text
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, t = status_kb("VmRSS"), time.perf_counter()
    workers = WorkerPeaks()
    workers.start()
    if step == "tokenize":
        tokenize_worker.init(tokenize_worker.TokenizeSpec(model, "uint16", 3, None, 0.0, 0))
        tokens = len(tokenize_worker.tokenize([text])["train"].tokens)
    else:
        m = build_shards.build([str(corpus)], model, tmp / f"out{mb}", shard_tokens=1 << 24, num_proc=int(step[-1]),
                               progress=False, overwrite=True)
        tokens = m["stats"]["tokens"]["train"]
    seconds = time.perf_counter() - t
    workers.done.set()
    workers.join()
    return {"chars": chars, "tokens": tokens, "seconds": seconds, "peak": status_kb("VmHWM") / 1024,
            "grown": (status_kb("VmHWM") - before) / 1024, "worker": max(workers.peaks.values(), default=0) / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, nargs="+", default=[5, 20, 40], help="document sizes, millions of characters")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    p.add_argument("--child", nargs=4, metavar=("STEP", "MB", "MODEL", "TMP"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        step, mb, model, tmp = a.child
        print(json.dumps(measure(step, float(mb), model, Path(tmp))))
        return

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pydoc_corpus.write_corpus(tmp / "pydoc.jsonl")
        train_tokenizer.train([str(tmp / "pydoc.jsonl")], a.vocab_size, tmp / "tok", progress=False)
        model = str(tmp / "tok" / "tokenizer.model")
        print(f"one document of pydoc topics repeated; tokenizer: bpe, {a.vocab_size} pieces; peak RSS (VmHWM)\n\n"
              "| document | tokens | step | peak MB | grown MB | worker peak MB | seconds |\n"
              "|---:|---:|---|---:|---:|---:|---:|")
        for mb in a.mb:
            for step in a.steps:
                proc = subprocess.run([sys.executable, __file__, "--child", step, str(mb), model, str(tmp)],
                                      capture_output=True, text=True, check=True)
                r = json.loads(proc.stdout.splitlines()[-1])
                worker = f"{r['worker']:,.0f}" if step == "build2" else ""
                print(f"| {r['chars'] / 1e6:.1f}M chars | {r['tokens']:,} | {step} | {r['peak']:,.0f} | "
                      f"{r['grown']:,.0f} | {worker} | {r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
