"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each optimizer step, nudge every MoE
layer's selection bias towards the under-loaded experts, from token counts summed over all ranks.

Works on both forms of the block: ours (`MoE`: gate.e_score_correction_bias) and DeepSpeed AutoEP's
(`AutoEPMoELayer`: router.e_score_correction_bias); both count routed tokens in `tokens_per_expert`.
Activation checkpointing counts every token twice; the sign update and the load ratios don't care.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE


def moe_routers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(token counts, correction bias) of every MoE layer, in module order."""
    out = []
    for m in model.modules():
        if isinstance(m, MoE):
            out.append((m.tokens_per_expert, m.gate.e_score_correction_bias))
        elif getattr(m, "_is_autoep_layer", False):
            out.append((m.tokens_per_expert, m.router.e_score_correction_bias))
    return out


@torch.no_grad()
def update_balance(model: nn.Module, rate: float) -> float | None:
    """Sum counts over ranks, update biases by rate * sign(mean - load), reset counts.
    Returns the expert load violation: max over layers of (max load / mean load - 1)."""
    routers = moe_routers(model)
    if not routers:
        return None
    counts = torch.stack([c.float() for c, _ in routers])  # [layers, experts]
    if dist.is_initialized():
        dist.all_reduce(counts)
    mean = counts.mean(dim=-1, keepdim=True)
    if rate:
        step = rate * torch.sign(mean - counts)
        for (_, bias), delta in zip(routers, step):
            bias.add_(delta.to(bias.device, bias.dtype))
    for c, _ in routers:
        c.zero_()
    if mean.min() == 0:
        return None
    return (counts.max(dim=-1).values / mean.squeeze(-1) - 1).max().item()


def reset_counts(model: nn.Module) -> None:
    for c, _ in moe_routers(model):
        c.zero_()


def balance_biases(model: nn.Module) -> list[torch.Tensor]:
    return [bias.detach().float().cpu().clone() for _, bias in moe_routers(model)]


@torch.no_grad()
def restore_balance_biases(model: nn.Module, biases: list[torch.Tensor]) -> None:
    routers = moe_routers(model)
    if len(routers) != len(biases):
        raise ValueError(f"checkpoint holds {len(biases)} balancing biases, the model has {len(routers)} MoE layers")
    for (_, bias), saved in zip(routers, biases):
        bias.copy_(saved.to(bias.device, bias.dtype))
