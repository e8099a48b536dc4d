"""python -m deepseek_pt.params CONFIG [--gpus N] [--schedule] [key.path=value ...]: parameter, cache and FLOP report
as JSON; with --gpus, also the model states each of N GPUs holds at least under the config's ZeRO stage and expert
parallelism; with --schedule, the run's batch and learning rate at the schedule's turning points on N GPUs (1 if
--gpus is not given)."""
from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config
from .engine.lr_schedule import schedule_milestones
from .model.counting import count_params, kv_cache_bytes_per_token, meta_model, train_flops_per_token


def states_report(config, gpus: int, model) -> dict:
    """engine/model_states.py's lower bound on each GPU's model states, in bytes."""
    from .engine.model_states import expert_and_other_params, model_state_bytes
    states = model_state_bytes(config, gpus, counts=expert_and_other_params(config, model))
    return {"gpus": gpus, "zero_stage": config.parallel.zero_stage,
            "expert_parallel_size": config.parallel.expert_parallel_size, "precision": config.precision,
            **states, "total": sum(states.values())}


def report(config, gpus: int | None = None, schedule: bool = False) -> dict:
    m = config.model
    model = meta_model(m)
    counts = count_params(model)
    a = m.attention
    return {
        **counts,
        **({"model_states_per_gpu": states_report(config, gpus, model)} if gpus else {}),
        **({"schedule": schedule_milestones(config, gpus or 1)} if schedule else {}),
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
    parser.add_argument("--gpus", type=int, help="also the model states per GPU on this many GPUs (a lower bound)")
    parser.add_argument("--schedule", action="store_true",
                        help="also the batch and learning rate at the schedule's turning points (on --gpus GPUs)")
    args = parser.parse_intermixed_args(argv)  # --gpus before or after the overrides
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ep = config.parallel.expert_parallel_size
    if args.gpus is not None and (args.gpus < 1 or args.gpus % ep):
        print(f"error: --gpus {args.gpus}: must be a positive multiple of parallel.expert_parallel_size ({ep})",
              file=sys.stderr)
        return 2
    print(json.dumps(report(config, args.gpus, args.schedule), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
