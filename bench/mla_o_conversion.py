r"""MLA -> MLA-o conversion of a trained model: validation loss before and after, per o_latent_dim.

Each MLA's o_proj [dim, heads*v] becomes o_b_proj @ o_a_proj through a latent of width o; `svd`
starts from the best rank-o approximation (the converted model's starting point for continued
training), `xavier` from the earlier prototype's random init. The table gives, per width, the
relative Frobenius error of o_b @ o_a against o_proj (mean over layers), the validation loss and
its change, and the output-projection parameters kept; for scale, a row with every o_proj zeroed
(attention removed from the residual stream).

    python bench/mla_o_conversion.py --checkpoint RUN_OR_EXPORT_OR_HF_DIR --data SHARDS \
        --o-latent-dims 8 16 32 48 64 --inits svd xavier
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deepseek_pt.data import val_batches
from deepseek_pt.evaluate import evaluate
from deepseek_pt.interop.checkpoints import load_checkpoint
from deepseek_pt.interop.cli import run_cli
from deepseek_pt.model import to_output_subspace


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/mla_o_conversion.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run dir, DeepSpeed checkpoint, export dir or HF dir")
    p.add_argument("--data", required=True, help="token-shard directory (manifest.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--o-latent-dims", type=int, nargs="+", required=True)
    p.add_argument("--inits", nargs="+", choices=["svd", "xavier"], default=["svd"])
    p.add_argument("--seq-len", type=int, default=None, help="default: the checkpoint's data.seq_len")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-sequences", type=int, default=None, help="the split's first this many; default: all")
    p.add_argument("--seed", type=int, default=0, help="seed of the xavier init")
    args = p.parse_args(argv)

    def run() -> None:
        import torch

        ckpt = load_checkpoint(args.checkpoint, dtype=torch.float32)
        seq_len = args.seq_len or min(ckpt.config.data.seq_len, ckpt.model.config.max_seq_len)

        def loss_of(model) -> float:
            batches = val_batches(args.data, args.split, seq_len, args.batch_size, max_sequences=args.max_sequences)
            return evaluate(model, batches)["loss"]

        a = ckpt.model.config.attention
        in_dim, out_dim = a.n_heads * a.v_head_dim, ckpt.model.config.dim
        base = loss_of(ckpt.model)
        print(f"checkpoint {args.checkpoint}: {ckpt.model.config.n_layers} layers, o_proj [{out_dim}, {in_dim}] "
              f"(full rank {min(in_dim, out_dim)}); {args.split} split, sequences of {seq_len}\n")
        print("| init | o_latent_dim | o_proj params kept | rel. error of o_b @ o_a | val loss | change | perplexity |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        print(f"| (MLA) | - | 100% | 0 | {base:.4f} | - | {math.exp(base):.2f} |")
        # For scale: the loss when attention contributes nothing to the residual stream at all.
        ablated = copy.deepcopy(ckpt.model)
        for attn in ablated.attention_layers():
            attn.o_proj.weight.data.zero_()
        loss = loss_of(ablated)
        print(f"| (o_proj = 0) | 0 | 0% | 1 | {loss:.4f} | {loss - base:+.4f} | {math.exp(min(loss, 700)):.2f} |")
        for init in args.inits:
            for o in args.o_latent_dims:
                model = copy.deepcopy(ckpt.model)
                torch.manual_seed(args.seed)
                errors = to_output_subspace(model, o, init=init)
                loss = loss_of(model)
                kept = o * (in_dim + out_dim) / (in_dim * out_dim)
                print(f"| {init} | {o} | {kept:.0%} | {sum(errors) / len(errors):.3f} | {loss:.4f} | "
                      f"{loss - base:+.4f} | {math.exp(min(loss, 700)):.2f} |")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
