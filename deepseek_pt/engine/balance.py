"""Load balancing (DeepSeek-V3). Auxiliary-loss-free: after each optimizer step, nudge every MoE
layer's selection bias towards the under-loaded experts, from token counts summed over all ranks.
And the complementary sequence-wise loss (`model.moe.seq_aux_loss_alpha`) on AutoEP's layers.

Works on both forms of the block: ours (`MoE`: gate.e_score_correction_bias) and DeepSpeed AutoEP's
(`AutoEPMoELayer`: router.e_score_correction_bias); both count routed tokens in `tokens_per_expert`.
Activation checkpointing counts every token twice; the sign update and the load ratios don't care.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..model.moe import MoE, sequence_balance_loss


def autoep_layers(model: nn.Module) -> list[nn.Module]:
    """DeepSpeed AutoEP's MoE layers in `model` (each in place of one of our MoE blocks), in module order."""
    return [m for m in model.modules() if getattr(m, "_is_autoep_layer", False)]


def add_sequence_balance_loss(model: nn.Module, alpha: float) -> int:
    """Have AutoEP's MoE layers of `model` compute DeepSeek-V3's sequence-wise balance loss, as our MoE block does:
    AutoEP's forward, which replaces the block's, has no such loss. Hooks capture each layer's router gate logits
    (every expert's affinity, with their autograd graph) and its choice of experts, global ids under expert
    parallelism; after the layer's forward, while training, the loss goes to `layer.aux_loss`, which
    Transformer.forward adds to the training loss. Returns how many layers."""
    layers = autoep_layers(model)
    for layer in layers:
        layer.aux_loss, captured = None, {}
        router = layer.router

        def keep_logits(gate, args, logits, captured=captured):
            captured["logits"] = logits

        def keep_choice(router, args, out, captured=captured):
            captured["selected"] = out[1]  # (top scores, selected experts, tokens per expert)

        def set_loss(layer, args, out, captured=captured):
            batch, seq_len = args[0].shape[:2]
            logits, selected = captured.pop("logits"), captured.pop("selected")
            if not layer.training:
                layer.aux_loss = None
                return
            logits = logits.float()  # AutoEP's router scores in fp32 as well
            scores = logits.sigmoid() if layer.router.score_func == "sigmoid" else logits.softmax(dim=-1)
            layer.aux_loss = sequence_balance_loss(scores, selected, batch, seq_len, alpha)

        router.gate.register_forward_hook(keep_logits)
        router.register_forward_hook(keep_choice)
        layer.register_forward_hook(set_loss)
    return len(layers)


def _moe_layers(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, token counts, correction bias) of every MoE layer, in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            out.append((name, m.tokens_per_expert, m.gate.e_score_correction_bias))
        elif getattr(m, "_is_autoep_layer", False):
            out.append((name, m.tokens_per_expert, m.router.e_score_correction_bias))
    return out


def moe_routers(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(token counts, correction bias) of every MoE layer, in module order."""
    return [(counts, bias) for _, counts, bias in _moe_layers(model)]


def load_key(module_name: str) -> str:
    """metrics.jsonl's key for an MoE layer's load: `layers.3.mlp` -> expert_load/layer_3, `mtp.0.block.mlp` ->
    expert_load/mtp_0."""
    kind, index = module_name.split(".")[:2]
    return f"expert_load/{'layer' if kind == 'layers' else kind}_{index}"


@torch.no_grad()
def update_balance(model: nn.Module, rate: float, applied: bool = True) -> dict[str, float] | None:
    """Sum counts over ranks, update biases by rate * sign(mean - load), reset counts.
    Returns each MoE layer's load violation, the busiest expert's load over the mean load, less 1 (MaxVio, the
    aux-loss-free paper's), by load_key; None where a layer routed no token. After a step the optimizer skipped
    (`applied` false: non-finite gradients, on every rank alike) the counts of its NaN routing are dropped, and
    nothing moves or is returned: they would count in the next step's update."""
    layers = _moe_layers(model)
    if not layers or not applied:
        reset_counts(model)
        return None
    counts = torch.stack([c.float() for _, c, _ in layers])  # [layers, experts]
    if dist.is_initialized():
        dist.all_reduce(counts)
    mean = counts.mean(dim=-1, keepdim=True)
    if rate:
        step = rate * torch.sign(mean - counts)
        for (_, _, bias), delta in zip(layers, step):
            bias.add_(delta.to(bias.device, bias.dtype))
    for _, c, _ in layers:
        c.zero_()
    if mean.min() == 0:
        return None
    violations = (counts.max(dim=-1).values / mean.squeeze(-1) - 1).tolist()
    return {load_key(name): v for (name, _, _), v in zip(layers, violations, strict=True)}


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
