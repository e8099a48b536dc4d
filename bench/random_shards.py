"""Write a shard directory of uniformly random tokens (manifest and all): throughput and parallelism
checks on machines without a corpus. Not for anything whose loss must mean something.

    python bench/random_shards.py OUT_DIR --vocab-size 32000 --train-tokens 4000000 --val-tokens 200000
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deepseek_pt.data.format import FORMAT_NAME, FORMAT_VERSION  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--vocab-size", type=int, default=32000)
    parser.add_argument("--train-tokens", type=int, default=4_000_000)
    parser.add_argument("--val-tokens", type=int, default=200_000)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", args.train_tokens), ("val", args.val_tokens)):
        tokens = rng.integers(1, args.vocab_size, n, dtype=np.uint16)
        name = f"{split}-00000.bin"
        (out / name).write_bytes(tokens.tobytes())
        splits[split] = [{"path": name, "num_tokens": n, "num_docs": 0, "dtype": "uint16",
                          "sha256": hashlib.sha256(tokens.tobytes()).hexdigest()}]
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "vocab_size": args.vocab_size, "dtype": "uint16",
                "doc_boundary": "eos", "tokenizer": {"path": "tokenizer.model", "sha256": "0" * 64, "eos_id": 0},
                "splits": splits}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
