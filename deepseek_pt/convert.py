"""python -m deepseek_pt.convert {hf-to-ds, ds-to-hf, mla-o} ...: move models between formats.

  hf-to-ds HF_DIR OUT [key.path=value ...]
                           an HF DeepseekV3 directory -> an export (config.yaml + model.safetensors);
                           train on from it with `train.init_from: OUT` (--base-config supplies the
                           data/train/parallel sections, the model section comes from the HF config;
                           overrides apply last)
  ds-to-hf CKPT OUT        a run dir, checkpoint or export -> a directory transformers loads
                           (MLA-o models need --fold: HF has no o_a_proj/o_b_proj)
  mla-o CKPT OUT --o-latent-dim N
                           any checkpoint (HF included) -> an MLA-o export whose o_a_proj/o_b_proj
                           start from the best rank-N approximation of o_proj (svd)
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from .config import MLA_O_TOO_WIDE, load_config, output_width_text
from .data.format import open_tokenizer, tokenizer_from_bytes
from .export import save_export
from .fileio import sha256_file
from .interop.checkpoints import check_tokenizer, load_checkpoint
from .interop.cli import DTYPE_CHOICES, UsageError, run_cli
from .interop.hf import (
    TRAINING_KNOBS,
    full_config,
    hf_config_dict,
    hf_doc_boundary,
    hf_seq_len,
    load_hf,
    read_hf_config,
    save_hf,
    save_hf_tokenizer,
)
from .model import to_output_subspace
from .model.counting import count_params


def _fresh_dir(path: str, force: bool) -> Path:
    out = Path(path)
    if out.exists() and any(out.iterdir()) and not force:
        raise UsageError(f"{out}: exists and is not empty (pass --force to write into it)")
    return out


def _describe(model) -> str:
    m, counts = model.config, count_params(model)
    return (f"{counts['total_params']:,} params ({counts['active_params']:,} active), "
            f"{m.n_layers} layers, dim {m.dim}, {m.moe.n_routed_experts} experts, MTP depth {m.mtp_depth}")


def hf_to_ds(args) -> None:
    out = _fresh_dir(args.out, args.force)
    hf_config = read_hf_config(args.hf_dir)  # a clear error for a non-HF directory before any weights load
    own = Path(args.hf_dir) / "tokenizer.model"
    tokenizer = Path(args.tokenizer) if args.tokenizer else own
    if args.tokenizer or tokenizer.is_file():  # checked before the (slow) load, and never stored unreadable
        open_tokenizer(tokenizer, "--tokenizer" if args.tokenizer else "tokenizer")
    if args.tokenizer and own.is_file():
        check_tokenizer(tokenizer, sha256_file(own), args.hf_dir, stored=True)
    knobs = {"model." + ".".join(knob) for knob in TRAINING_KNOBS}
    for item in args.overrides:  # before the (slow) load
        key = item.partition("=")[0]
        if key.startswith("model.") and key not in knobs:
            raise UsageError(f"override {item!r}: the model section comes from {args.hf_dir}/config.json; of it only "
                             f"the training knobs ({', '.join(sorted(knobs))}) may be set")
    model = load_hf(args.hf_dir, dtype=DTYPE_CHOICES.get(args.dtype), hf_config=hf_config)
    base = load_config(args.base_config) if args.base_config else None
    config = full_config(model.config, base, where=args.base_config or args.hf_dir, overrides=args.overrides,
                         seq_len=hf_seq_len(hf_config))
    model.config = config.model  # the base's TRAINING_KNOBS, which save_export takes from the model
    save_export(model, config, out, source=str(Path(args.hf_dir).absolute()),
                tokenizer=tokenizer if args.tokenizer or tokenizer.is_file() else None,
                doc_boundary=hf_doc_boundary(hf_config))
    print(f"{args.hf_dir} -> {out}: {_describe(model)}")


def ds_to_hf(args) -> None:
    out = _fresh_dir(args.out, args.force)
    ckpt = load_checkpoint(args.checkpoint, dtype=DTYPE_CHOICES.get(args.dtype))
    if ckpt.model.config.attention.use_output_subspace and not args.fold:
        raise UsageError(f"{args.checkpoint}: is an MLA-o model (o_a_proj -> o_b_proj), which HF DeepseekV3 "
                         "cannot represent; pass --fold to store o_proj = o_b_proj @ o_a_proj instead")
    # What HF cannot express (softmax scoring, ...) is refused before anything is written to OUT
    hf_config_dict(ckpt.model.config, ckpt.model.embed_tokens.weight.dtype)
    bos = eos = None
    if ckpt.tokenizer:  # HF generate() stops at eos_token_id: it must be the tokenizer's
        tokenizer_from_bytes(ckpt.tokenizer, f"{args.checkpoint}: its tokenizer.model")  # before anything is written
        bos, eos = save_hf_tokenizer(out, ckpt.tokenizer, ckpt.model.config.max_seq_len,
                                     add_bos=ckpt.doc_boundary == "bos_eos")
    errors = save_hf(ckpt.model, out, fold=args.fold, bos_id=bos, eos_id=eos,
                     max_shard_bytes=int(args.max_shard_gb * 1024**3), doc_boundary=ckpt.doc_boundary,
                     seq_len=ckpt.config.data.seq_len)
    if errors:
        print(f"folded MLA-o into o_proj: relative error of the stored o_proj against o_b_proj @ o_a_proj, "
              f"max over {len(errors)} layers: {max(errors):.2e} (rounding to the stored dtype)")
    print(f"{args.checkpoint} -> {out}: {_describe(ckpt.model)}")


def mla_o(args) -> None:
    out = _fresh_dir(args.out, args.force)
    ckpt = load_checkpoint(args.checkpoint, dtype=DTYPE_CHOICES.get(args.dtype))
    if ckpt.model.config.attention.use_output_subspace:
        raise UsageError(f"{args.checkpoint}: already uses MLA-o "
                         f"(o_latent_dim {ckpt.model.config.attention.o_latent_dim})")
    a = ckpt.model.config.attention
    if args.o_latent_dim >= a.n_heads * a.v_head_dim:  # its config would not load (config.validate)
        raise UsageError(f"--o-latent-dim {args.o_latent_dim} >= {args.checkpoint}'s {output_width_text(a)}: "
                         f"{MLA_O_TOO_WIDE}")
    errors = to_output_subspace(ckpt.model, args.o_latent_dim, init=args.init)
    save_export(ckpt.model, ckpt.config, out, step=ckpt.step, source=str(Path(args.checkpoint).absolute()),
                tokenizer=ckpt.tokenizer, doc_boundary=ckpt.doc_boundary, tokenizer_sha256=ckpt.tokenizer_sha256)
    print(f"o_proj -> o_a_proj/o_b_proj of width {args.o_latent_dim} ({args.init}): relative error of "
          f"o_b @ o_a against o_proj per layer: " + " ".join(f"{e:.3f}" for e in errors))
    print(f"{args.checkpoint} -> {out}: {_describe(ckpt.model)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m deepseek_pt.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hf-to-ds", help="HF DeepseekV3 directory -> export")
    h.add_argument("hf_dir")
    h.add_argument("out")
    h.add_argument("--base-config", help="YAML whose non-model sections (data, train, ...) and model training knobs "
                   "(mtp_loss_weight, moe.bias_update_rate, moe.seq_aux_loss_alpha) the export's config takes")
    h.add_argument("--tokenizer", help="sentencepiece model to store (default: HF_DIR/tokenizer.model if present, and "
                   "only that one then)")
    h.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="set on the export's config last (a base config's parallel.expert_parallel_size fitted to "
                        "this model's experts, say); of the model section only the training knobs")
    h.set_defaults(fn=hf_to_ds)
    d = sub.add_parser("ds-to-hf", help="run dir / checkpoint / export -> HF DeepseekV3 directory")
    d.add_argument("checkpoint")
    d.add_argument("out")
    d.add_argument("--fold", action="store_true", help="store an MLA-o model's o_b_proj @ o_a_proj as o_proj")
    d.add_argument("--max-shard-gb", type=float, default=5.0, help="split the safetensors above this size")
    d.set_defaults(fn=ds_to_hf)
    o = sub.add_parser("mla-o", help="any checkpoint -> MLA-o export")
    o.add_argument("checkpoint")
    o.add_argument("out")
    o.add_argument("--o-latent-dim", type=int, required=True)
    o.add_argument("--init", choices=["svd", "xavier"], default="svd")
    o.set_defaults(fn=mla_o)
    for s in (h, d, o):
        s.add_argument("--dtype", choices=DTYPE_CHOICES, default=None, help="default: the source's")
        s.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # hf-to-ds's overrides may follow its options too, which argparse leaves over once its positionals are taken
    args, extra = parser.parse_known_args(argv)
    if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    # not 0 < x < inf: nan and inf, which float() accepts, have no whole number of bytes
    if getattr(args, "o_latent_dim", 1) < 1 or not 0 < getattr(args, "max_shard_gb", 1) < math.inf:
        parser.error("--o-latent-dim and --max-shard-gb must be positive (--max-shard-gb a finite number)")
    return run_cli(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())
