"""Tiny model configs shared by the tests (the real shapes live in configs/)."""
from deepseek_pt.config import Config, config_from_dict


def tiny(**model_overrides) -> Config:
    """A small model exercising every feature: q-LoRA, YaRN, group-limited routing, dense-first, MTP off."""
    model = {
        "vocab_size": 97, "dim": 48, "inter_dim": 96, "n_layers": 3, "max_seq_len": 64, "init_std": 0.05,
        "attention": {"n_heads": 4, "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
                      "qk_rope_head_dim": 4, "v_head_dim": 12,
                      "rope": {"scaling": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                               "mscale": 1.0, "mscale_all_dim": 1.0}},
        "moe": {"n_routed_experts": 8, "n_shared_experts": 1, "top_k": 2, "expert_inter_dim": 16,
                "n_expert_groups": 4, "n_limited_groups": 2, "route_scale": 2.5, "n_dense_layers": 1},
    }
    for dotted, value in model_overrides.items():
        node = model
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict({"model": model, "data": {"seq_len": 32}}, "<tiny>")
