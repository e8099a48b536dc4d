"""The DeepSpeed config, generated from ours (never written by hand beside it)."""
from __future__ import annotations

from ..config import Config
from .accelerator import on_gpu

# Our MoE blocks: layers.N.mlp and mtp.K.block.mlp. Dense layers match too; AutoEP leaves blocks
# without an `experts` child alone.
MOE_LAYER_PATTERN = r"(layers\.\d+|mtp\.\d+\.block)\.mlp"


def autoep_section(cfg: Config) -> dict:
    """DeepSpeed AutoEP settings that reproduce our MoE block exactly. Every key is explicit: unset
    ones fall back to softmax scoring and fused gate_up names, and shared experts are dropped
    silently without both has_shared_experts and shared_experts_pattern."""
    moe = cfg.model.moe
    grouped = moe.n_expert_groups > 1
    return {
        "enabled": True,
        "autoep_size": cfg.parallel.expert_parallel_size,
        "moe_layer_pattern": MOE_LAYER_PATTERN,
        "router_pattern": "gate",
        "expert_pattern": "experts",
        "expert_w1": "gate_proj",
        "expert_w2": "down_proj",
        "expert_w3": "up_proj",
        "has_shared_experts": moe.n_shared_experts > 0,
        "shared_experts_pattern": "shared_experts" if moe.n_shared_experts > 0 else None,
        "score_func": moe.score_func,
        "score_apply": "post",
        "route_norm": moe.norm_topk_prob,
        "route_scale": moe.route_scale,
        "routed_scaling_factor": moe.route_scale,
        "top_k": moe.top_k,
        "num_expert_groups": moe.n_expert_groups if grouped else None,
        "num_limited_groups": moe.n_limited_groups if grouped else None,
        # torch._grouped_mm on every device: CPU runs (CI) take the GPU's expert path, and AutoEP's per-expert
        # loop slices the stacked weights, each slice costing a full-size zero fill in backward (12% slower here).
        "use_grouped_mm": True,
        # On GPU, the top-k combine as one Triton kernel (weights folded into the sum in fp32). The default scatters
        # the expert rows into a zeroed [tokens, k, dim] tensor and multiplies it in fp32: 6% slower on the bench shape.
        # The kernel is CUDA-only, so CPU runs keep the default.
        "combine_impl": "fused_weighted_sum" if on_gpu() else "weighted_sum",
    }


def deepspeed_micro_steps(cfg: Config) -> int:
    """Micro-steps per optimizer step as DeepSpeed counts them: coalesced, the engine sees one backward's worth of
    reduction per step, so it runs with 1 and the loop averages the micro-step losses itself (train_step)."""
    return 1 if cfg.parallel.coalesce_grad_reduction else cfg.train.grad_accum_steps


def build_ds_config(cfg: Config, world_size: int, has_moe: bool, load_universal: bool = False) -> dict:
    t, p, micro_steps = cfg.train, cfg.parallel, deepspeed_micro_steps(cfg)
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_steps,
        "train_batch_size": t.micro_batch_size * micro_steps * world_size,
        # Without ZeRO our step clips (engine/no_zero_step.py): DeepSpeed's own clip there is by a mean of norms
        "gradient_clipping": t.grad_clip if p.zero_stage > 0 else 0.0,
        "steps_per_print": 2**31 - 1,  # we log ourselves
        # DeepSpeed's throughput timer synchronizes the GPU at every forward: a host sync per micro-step that
        # stalls the CPU's queueing ahead (10 ms per micro-step on the bench shape). We time steps ourselves.
        "timers": {"throughput": {"enabled": False}},
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW (DeepSpeed's FusedAdam would JIT-build first), fused, for DeepSpeed's own step; under
            # parallel.zero_fused_step our step updates its state itself (engine/zero3_step.py).
            "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.adam_eps, "weight_decay": t.weight_decay,
                       "torch_adam": True, "fused": True},
        },
        "zero_optimization": {
            "stage": p.zero_stage,
            "overlap_comm": p.overlap_comm and on_gpu(),
            "contiguous_gradients": True,
            "stage3_param_persistence_threshold": p.zero_persistence_threshold,
            "memory_efficient_linear": p.zero_memory_efficient_linear,
        },
        "bf16": {"enabled": cfg.precision in ("bf16", "fp8")},
        "checkpoint": {"load_universal": load_universal},
    }
    if has_moe:
        ds["expert_parallel"] = autoep_section(cfg)
    return ds
