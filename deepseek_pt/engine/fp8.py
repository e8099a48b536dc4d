"""FP8 mixed precision through torchao float8 training: which modules go FP8, and how.

By rule, only nn.Linear layers with both dimensions divisible by 16 (what FP8 GEMMs need) are
converted: attention projections, dense SwiGLUs and shared experts. The embedding, the output head
(its logits feed the loss directly), the router (Gate: not a Linear; its scores pick experts) and the
norms stay in bf16. Master weights and optimizer state stay fp32 in ZeRO-3. Routed experts run in
AutoEP's bf16 grouped GEMMs (FP8 grouped GEMM is not wired in yet).
"""
from __future__ import annotations

from torch import nn

HIGH_PRECISION = ("lm_head",)


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    return (isinstance(module, nn.Linear) and fqn.split(".")[-1] not in HIGH_PRECISION
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(model: nn.Module, recipe: str) -> int:
    """Swap eligible linears for torchao Float8Linear in place; returns how many were converted."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=_fp8_eligible)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())
