"""Check a shard directory against its manifest.

For every shard: the file exists and has num_tokens x itemsize bytes; unless --quick, its sha256
matches, every token id is below vocab_size, and it holds exactly num_docs end-of-document
tokens. Also checks the tokenizer copy's sha256, that every shard file in the directory is listed,
and that the manifest's stats (tokens, docs per split) match the sums over the shards.

Exit status: 0 all good; 1 some shard is bad (each named, with what is wrong); 2 the manifest
itself is missing or invalid.

    python data_prep/verify_shards.py data/shards
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a file: put the repository root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from data_prep.common import positive_int, run_cli
from data_prep.shard_writer import shard_files
from deepseek_pt.data.format import BUILD_LOG_NAME, DataError, Manifest, ShardInfo, check_shard, open_manifest
from deepseek_pt.fileio import sha256_file

_BLOCK = 8 << 20  # a multiple of every itemsize, so blocks split on token boundaries


def check_contents(m: Manifest, shard: ShardInfo) -> list[str]:
    """Problems with one shard's bytes (empty when it is intact): one pass for hash, ids and docs."""
    file = m.shard_file(shard)
    h, eos, max_id, first_bad = hashlib.sha256(), 0, -1, None
    with open(file, "rb") as f:
        offset = 0
        while block := f.read(_BLOCK):
            h.update(block)
            ids = np.frombuffer(block, dtype=m.np_dtype)
            eos += int(np.count_nonzero(ids == m.eos_id))
            max_id = max(max_id, int(ids.max()))
            if first_bad is None and max_id >= m.vocab_size:
                first_bad = offset + int(np.argmax(ids >= m.vocab_size))
            offset += len(ids)
    problems = []
    if h.hexdigest() != shard.sha256:
        problems.append(f"corrupt: sha256 {h.hexdigest()} != manifest {shard.sha256}")
    if first_bad is not None:
        problems.append(f"token {first_bad} has an id >= vocab_size {m.vocab_size} (largest id {max_id})")
    if eos != shard.num_docs:
        problems.append(f"{eos} end-of-document tokens (id {m.eos_id}) but manifest num_docs is {shard.num_docs}")
    return [f"shard {file}: {p}" for p in problems]


def _check(m: Manifest, shard: ShardInfo, quick: bool) -> list[str]:
    try:
        check_shard(m, shard)
    except DataError as e:
        return [str(e)]
    return [] if quick else check_contents(m, shard)


def _check_listing(m: Manifest) -> list[str]:
    """Shard files of this tool's naming that the manifest does not list (a dropped entry loses its tokens
    from training), and split totals in `stats` that differ from the sums over the listed shards or
    name a split the manifest does not list."""
    listed = {m.shard_file(s).resolve() for split in m.splits.values() for s in split}
    problems = [f"shard {path}: not listed in {m.path} (its tokens are not read)"
                for _split, _index, partial, path in sorted(shard_files(m.dir), key=lambda f: f[3].name)
                if not partial and path.resolve() not in listed]
    stats = m.raw.get("stats")
    for key, field in (("tokens", "num_tokens"), ("docs", "num_docs")):
        totals = stats.get(key) if isinstance(stats, dict) else None
        if not isinstance(totals, dict):
            continue
        for split, want in totals.items():
            if split not in m.splits:  # a split's entry dropped with its files: nothing else would notice
                problems.append(f"{m.path}: stats.{key}.{split} is {want} but the manifest lists no {split!r} split")
                continue
            have = sum(getattr(s, field) for s in m.splits[split])
            if isinstance(want, int) and want != have:
                problems.append(f"{m.path}: stats.{key}.{split} is {want} but the sum of its shards' {field} is {have}")
    return problems


def verify(path: str | Path, quick: bool = False, num_proc: int | None = None, progress: bool = True) -> list[str]:
    """Every problem found in the shard directory, each naming its file; empty when all is well.
    DataError if the manifest itself cannot be read."""
    m = open_manifest(path)
    problems = []
    if m.tokenizer_path is None:
        problems.append(f"tokenizer copy {m.dir / m.raw['tokenizer']['path']}: missing")
    elif not quick and sha256_file(m.tokenizer_path) != m.tokenizer_sha256:
        problems.append(f"tokenizer copy {m.tokenizer_path}: sha256 differs from the manifest")
    problems += _check_listing(m)
    shards = [s for split in m.splits.values() for s in split]
    with ThreadPoolExecutor(num_proc or os.cpu_count() or 1) as pool:  # hashing releases the GIL
        results = pool.map(lambda s: _check(m, s, quick), shards)
        for found in tqdm(results, total=len(shards), unit="shard", desc="verifying", disable=not progress):
            problems += found
    return problems


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="verify_shards.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="shard directory (holding manifest.json)")
    p.add_argument("--quick", action="store_true", help="check file sizes only, not contents")
    p.add_argument("--num-proc", type=positive_int, default=None, help="shards checked in parallel (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _main(argv: list[str] | None) -> int:
    a = _parser().parse_args(argv)
    problems = verify(a.dir, quick=a.quick, num_proc=a.num_proc, progress=not a.quiet)
    if (Path(a.dir) / BUILD_LOG_NAME).exists():
        print(f"warning: {Path(a.dir) / BUILD_LOG_NAME} exists: a build into this directory is unfinished",
              file=sys.stderr)
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        print(f"error: {a.dir}: {len(problems)} problem(s) found", file=sys.stderr)
        return 1
    m = open_manifest(a.dir)
    n = sum(len(s) for s in m.splits.values())
    tokens = {k: m.num_tokens(k) for k in m.splits}
    print(f"{a.dir}: OK: {n} shards ({', '.join(f'{k} {v} tokens' for k, v in tokens.items())})"
          + (", sizes only" if a.quick else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
