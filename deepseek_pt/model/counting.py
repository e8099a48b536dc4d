"""Parameter and FLOP counts from a model's real modules (built on the meta device: no memory)."""
from __future__ import annotations

import torch

from ..config import ModelConfig
from .moe import MoE
from .transformer import Transformer


def meta_model(config: ModelConfig) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _inactive_expert_params(module: torch.nn.Module) -> int:
    return sum((m.n_experts - m.top_k) * _numel(m.experts[0]) for m in module.modules() if isinstance(m, MoE))


def count_params(model: Transformer) -> dict:
    """Total parameters, and those one token activates: routed experts count top_k of n, and the input
    embedding (a table lookup) is in the total but not active, as DeepSeek reports 671B / 37B.
    MTP modules are reported apart (DeepSeek's 671B excludes its 14B MTP module)."""
    mtp = _numel(model.mtp)
    total = _numel(model) - mtp
    embedding = 0 if model.config.tie_embeddings else model.embed_tokens.weight.numel()
    active = total - embedding - _inactive_expert_params(model.layers)
    return {
        "total_params": total,
        "active_params": active,
        "embedding_params": model.embed_tokens.weight.numel(),
        "routed_expert_params": sum(_numel(m.experts) for m in model.layers.modules() if isinstance(m, MoE)),
        "mtp_params": mtp,
        "mtp_active_params": mtp - _inactive_expert_params(model.mtp),
    }


def kv_cache_bytes_per_token(config: ModelConfig, bytes_per_value: int = 2) -> dict:
    """The compressed MLA cache (latent + rotary key) against full per-head K/V, all layers."""
    a = config.attention
    mla = config.n_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * bytes_per_value
    mha = config.n_layers * a.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim) * bytes_per_value
    return {"kv_cache_bytes_per_token": mla, "mha_kv_cache_bytes_per_token": mha}


def train_flops_per_token(config: ModelConfig, seq_len: int, counts: dict | None = None) -> float:
    """Training FLOPs per token: 6 x active matmul parameters (everything active but the embedding
    lookup; the output head included; with MTP, each depth's module and its pass through the shared head
    too) + 6 x attention's QK^T and AV over the full sequence length, in every block the MTP ones included
    (the PaLM / torchtitan convention, causal half not subtracted; the peer figures use it too).
    `counts` is count_params' answer for this config, if the caller has it."""
    if counts is None:
        counts = count_params(meta_model(config))
    a = config.attention
    matmul = counts["active_params"] + counts["mtp_active_params"] + config.mtp_depth * config.vocab_size * config.dim
    layers = config.n_layers + config.mtp_depth
    attention = 2 * layers * a.n_heads * seq_len * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    return 6 * matmul + 3 * attention
