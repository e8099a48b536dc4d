"""DeepSeek-V3 mixture of experts: sigmoid router with group-limited top-k and a selection-only
correction bias, SwiGLU routed experts, and always-on shared experts.

Module names follow HF DeepseekV3 so that DeepSpeed AutoEP can convert the block (`mlp.gate`,
`mlp.experts[i].{gate_proj,up_proj,down_proj}`, `mlp.shared_experts`, `gate.e_score_correction_bias`)
and the converted block computes the same function (`tests/test_autoep.py` pins that).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, MoEConfig
from .layers import SwiGLU


class Gate(nn.Module):
    """Router: affinities, group-limited top-k on (affinity + bias), weights from the unbiased affinities."""

    def __init__(self, dim: int, moe: MoEConfig, init_std: float = 0.006):
        super().__init__()
        self.top_k, self.n_groups, self.n_limited_groups = moe.top_k, moe.n_expert_groups, moe.n_limited_groups
        self.score_func, self.norm_topk_prob, self.route_scale = moe.score_func, moe.norm_topk_prob, moe.route_scale
        self.weight = nn.Parameter(torch.empty(moe.n_routed_experts, dim))
        if not self.weight.is_meta:
            nn.init.normal_(self.weight, std=init_std)
        # Auxiliary-loss-free balancing bias: selection only, updated by the engine, kept in fp32.
        self.register_buffer("e_score_correction_bias", torch.zeros(moe.n_routed_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor):
        """x [N, dim] -> (weights [N, k] fp32, expert indices [N, k], affinities [N, E] fp32)."""
        scores = self.scores(x)
        choice = scores + self.e_score_correction_bias
        if self.n_groups > 1:
            # A group's score is the sum of its two best experts (DeepSeek-V3); keep the best groups.
            grouped = choice.view(x.shape[0], self.n_groups, -1)
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(dim=-1)
            keep = group_scores.topk(self.n_limited_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view_as(scores)
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.route_scale, indices, scores


class MoE(nn.Module):
    """Shared experts + routed experts over x [B, T, dim]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        moe = config.moe
        self.n_experts, self.top_k, self.seq_aux_loss_alpha = moe.n_routed_experts, moe.top_k, moe.seq_aux_loss_alpha
        self.gate = Gate(config.dim, moe, config.init_std)
        self.experts = nn.ModuleList(SwiGLU(config.dim, moe.expert_inter_dim) for _ in range(moe.n_routed_experts))
        self.shared_experts = (SwiGLU(config.dim, moe.n_shared_experts * moe.expert_inter_dim)
                               if moe.n_shared_experts else None)
        # Tokens routed to each expert since the engine last reset it (same name as in AutoEP's layer).
        self.register_buffer("tokens_per_expert", torch.zeros(moe.n_routed_experts), persistent=False)
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        counts = torch.bincount(indices.flatten(), minlength=self.n_experts)
        with torch.no_grad():
            self.tokens_per_expert.add_(counts.to(self.tokens_per_expert.dtype))
        # Sort (token, slot) pairs by expert so each expert sees one contiguous slice.
        order = indices.flatten().argsort(stable=True)
        token_of = order // self.top_k
        routed_in = flat.index_select(0, token_of)
        # Every expert runs, even on zero rows: under ZeRO-3 each rank must gather the same parameters.
        outs = [expert(chunk) for expert, chunk in zip(self.experts, routed_in.split(counts.tolist()))]
        routed_out = torch.cat(outs) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(flat).index_add_(0, token_of, routed_out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        self.aux_loss = (sequence_balance_loss(scores, indices, B, T, self.seq_aux_loss_alpha)
                         if self.training and self.seq_aux_loss_alpha else None)
        return y.view(B, T, D)


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, batch: int, seq_len: int,
                          alpha: float) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise loss, alpha * sum_i f_i P_i per sequence, averaged over the batch:
    scores [batch * seq_len, E] every expert's affinity to each token (fp32), indices [batch * seq_len, top_k] the
    experts each token was routed to."""
    n_experts, top_k = scores.shape[-1], indices.shape[-1]
    probs = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, seq_len, -1)
    chosen = torch.zeros(batch, seq_len, n_experts, device=scores.device).scatter_(
        2, indices.view(batch, seq_len, -1), 1.0)
    f = chosen.sum(dim=1) * n_experts / (top_k * seq_len)  # [batch, E]
    p = probs.mean(dim=1)  # [batch, E]
    return alpha * (f * p).sum(dim=-1).mean()
