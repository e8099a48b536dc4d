"""python -m deepseek_pt.params CONFIG [key.path=value ...]: parameter, cache and FLOP report as JSON."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config
from .model.counting import count_params, kv_cache_bytes_per_token, meta_model, train_flops_per_token


def report(config) -> dict:
    m = config.model
    counts = count_params(meta_model(m))
    a = m.attention
    return {
        **counts,
        **kv_cache_bytes_per_token(m),
        "train_flops_per_token": train_flops_per_token(m, config.data.seq_len, counts),
        "shape": {
            "n_layers": m.n_layers, "dim": m.dim, "n_heads": a.n_heads, "q_lora_rank": a.q_lora_rank,
            "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
            "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim,
            "o_latent_dim": a.o_latent_dim if a.use_output_subspace else None,
            "n_dense_layers": m.moe.n_dense_layers, "n_routed_experts": m.moe.n_routed_experts,
            "n_shared_experts": m.moe.n_shared_experts, "top_k": m.moe.top_k,
            "vocab_size": m.vocab_size, "seq_len": config.data.seq_len, "mtp_depth": m.mtp_depth,
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_pt.params", description=__doc__)
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report(config), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
