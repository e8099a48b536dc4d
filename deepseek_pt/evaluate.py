"""python -m deepseek_pt.evaluate --checkpoint CKPT --data SHARDS: loss, perplexity and tokens/s on a split.

CKPT is a training run directory (any world size), one of its checkpoints, an export or an HF
DeepseekV3 directory; SHARDS a token-shard directory (manifest.json) built with the model's tokenizer.
Sequences and batch size default to the checkpoint's data.seq_len and train.micro_batch_size.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Iterable

import torch
import torch.nn.functional as F

from .data import open_manifest, val_batches
from .interop.checkpoints import load_checkpoint
from .interop.cli import DTYPE_CHOICES, UsageError, default_device, device_arg, run_cli
from .model import Transformer


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Mean next-token loss over every target (targets of -100 are skipped), perplexity, and the
    forward passes' throughput."""
    device = model.embed_tokens.weight.device
    loss_sum, tokens, n_batches, sequences, seconds = 0.0, 0, 0, 0, 0.0
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        start = time.perf_counter()
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        loss_sum += loss.item()  # .item() waits for the device, so the timing is honest
        seconds += time.perf_counter() - start
        tokens += int((targets != -100).sum())
        n_batches += 1
        sequences += int((targets != -100).any(dim=1).sum())
    if tokens == 0:
        raise UsageError("no tokens to evaluate")
    mean = loss_sum / tokens
    return {"loss": mean, "perplexity": math.exp(min(mean, 700.0)), "tokens": tokens, "batches": n_batches,
            "sequences": sequences, "seconds": seconds, "tokens_per_s": tokens / seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_pt.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed checkpoint, export dir or HF dir")
    p.add_argument("--data", required=True, help="token-shard directory (manifest.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's data.seq_len")
    p.add_argument("--batch-size", type=int, default=None, help="default: the checkpoint's train.micro_batch_size")
    p.add_argument("--max-sequences", type=int, default=None,
                   help="the split's first this many (as training's train.eval_sequences); default: the whole split")
    p.add_argument("--max-batches", type=int, help=argparse.SUPPRESS)  # replaced: refused with its replacement named
    p.add_argument("--device", type=device_arg, default=default_device())
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: the checkpoint's")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_batches is not None:
        parser.error("--max-batches: replaced by --max-sequences N, the split's first N sequences (--max-batches M "
                     "read M x --batch-size)")
    if any(v is not None and v < 1 for v in (args.seq_len, args.batch_size, args.max_sequences)):
        parser.error("--seq-len, --batch-size and --max-sequences must be positive")

    def run() -> None:
        manifest = open_manifest(args.data)  # checked before the (slow) model load
        ckpt = load_checkpoint(args.checkpoint, args.device, DTYPE_CHOICES.get(args.dtype))
        m = ckpt.model.config
        if manifest.vocab_size > m.vocab_size:
            raise UsageError(f"{manifest.path}: vocab_size {manifest.vocab_size} > the model's {m.vocab_size}")
        # Same vocabulary size is not the same vocabulary: ids of another tokenizer name other pieces.
        ours = ckpt.tokenizer_sha256
        if ours is not None and ours != manifest.tokenizer_sha256:
            raise UsageError(f"{manifest.path}: built with another tokenizer than the one {args.checkpoint} was "
                             f"trained with (sha256 {manifest.tokenizer_sha256[:12]}... against {ours[:12]}...): its "
                             "token ids mean other pieces")
        seq_len = args.seq_len or min(ckpt.config.data.seq_len, m.max_seq_len)
        if seq_len > m.max_seq_len:
            raise UsageError(f"--seq-len {seq_len} > model.max_seq_len {m.max_seq_len}")
        batch_size = args.batch_size or ckpt.config.train.micro_batch_size
        # The last batch's rows past the split (or --max-sequences) have no targets: the loss is over those sequences,
        # whatever --batch-size (or the number of processes training's evaluation ran on).
        batches = val_batches(args.data, args.split, seq_len, batch_size, max_sequences=args.max_sequences)
        result = {"checkpoint": args.checkpoint, "data": args.data, "split": args.split, "seq_len": seq_len,
                  "batch_size": batch_size, **evaluate(ckpt.model, batches)}
        if args.json:
            print(json.dumps(result))
        else:
            print(f"{args.split}: loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}  "
                  f"({result['tokens']:,} tokens: {result['sequences']} sequences of {seq_len} in {result['batches']} "
                  f"batches of {batch_size}; "
                  f"{result['tokens_per_s']:,.0f} tokens/s)")

    return run_cli(run, "a smaller --batch-size or --seq-len; --dtype bfloat16 where the weights load in "
                        "float32; or --device cpu")


if __name__ == "__main__":
    sys.exit(main())
