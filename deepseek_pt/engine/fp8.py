"""FP8 mixed precision: which linears go FP8, and how they are scaled.

By rule, only nn.Linear layers with both dimensions divisible by 16 (what FP8 GEMMs need) are
converted: attention projections, dense SwiGLUs and shared experts. The embedding, the output head
(its logits feed the loss directly), the router (Gate: not a Linear; its scores pick experts) and the
norms stay in bf16. Master weights and optimizer state stay fp32 in ZeRO-3. Routed experts run in
AutoEP's bf16 grouped GEMMs: torch 2.11's rowwise FP8 grouped GEMM ran at half their speed on an H100
at the bench shape (docs/benchmarks.md), so it is not used.

Recipes:
- `tensorwise`, `rowwise`: torchao float8 training (Float8Linear), real FP8 GEMMs; GPU only.
- `blockwise`: DeepSeek-V3's fine-grained scaling (one scale per 1x128 activation tile and per 128x128
  weight block; 128x1 tiles where the GEMM reduces over tokens), emulated: every GEMM operand is rounded
  through float8 e4m3 with its block scales and the GEMM runs in fp32. It reproduces the recipe's
  numerics exactly (up to summation order) on any device, so its loss can be compared with bf16's, but it
  is slower than bf16: it measures quality, not speed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HIGH_PRECISION = ("lm_head",)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK = 128


def _fp8_eligible(module: nn.Module, fqn: str) -> bool:
    parts = fqn.split(".")
    return (isinstance(module, nn.Linear) and parts[-1] not in HIGH_PRECISION
            and "experts" not in parts  # routed experts: AutoEP takes their weights into its own grouped GEMM
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8(model: nn.Module, recipe: str) -> int:
    """Swap eligible linears for FP8 ones in place; returns how many were converted."""
    if recipe == "blockwise":
        return _convert_blockwise(model)
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=_fp8_eligible)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules())


def fp8_round(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """`t` (2-D) rounded through float8 e4m3 with one scale per `rows` x `cols` block (amax -> 448), back in
    fp32. Edge blocks are partial; an all-zero block stays zero."""
    R, C = t.shape
    pad = (0, -C % cols, 0, -R % rows)
    x = F.pad(t.float(), pad).unflatten(1, (-1, cols)).unflatten(0, (-1, rows))  # [R/r, r, C/c, c]
    scale = x.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12) / E4M3_MAX
    x = (x / scale).to(torch.float8_e4m3fn).float() * scale
    return x.flatten(2).flatten(0, 1)[:R, :C]


class _BlockwiseFp8Matmul(torch.autograd.Function):
    """y = x @ w.T with DeepSeek-V3's quantization of each GEMM's operands along its reduction dimension."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        y = fp8_round(x, 1, BLOCK) @ fp8_round(weight, BLOCK, BLOCK).T  # fprop: reduce over in_features
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = fp8_round(grad_out, 1, BLOCK) @ fp8_round(weight, BLOCK, BLOCK)  # dgrad: over out_features
        grad_w = fp8_round(grad_out, BLOCK, 1).T @ fp8_round(x, BLOCK, 1)  # wgrad: over tokens
        return grad_x.to(x.dtype), grad_w.to(weight.dtype)


class BlockwiseFp8Linear(nn.Linear):
    """nn.Linear (no bias) whose GEMMs follow the DeepSeek-V3 blockwise FP8 recipe, emulated."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _BlockwiseFp8Matmul.apply(x.flatten(0, -2), self.weight.to(x.dtype)).unflatten(0, x.shape[:-1])


def _convert_blockwise(model: nn.Module) -> int:
    converted = 0
    for fqn, module in list(model.named_modules()):
        if _fp8_eligible(module, fqn) and module.bias is None and type(module) is nn.Linear:
            module.__class__ = BlockwiseFp8Linear  # same parameters, same state-dict keys
            converted += 1
    return converted
