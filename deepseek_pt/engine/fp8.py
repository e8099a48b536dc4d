"""FP8 mixed precision: which linears go FP8, and how they are scaled.

By rule, only nn.Linear layers with both dimensions divisible by 16 (what FP8 GEMMs need) are
eligible: attention projections, dense SwiGLUs and shared experts. The embedding, the output head
(its logits feed the loss directly), the router (Gate: not a Linear; its scores pick experts) and the
norms stay in bf16. Master weights and optimizer state stay fp32 in ZeRO-3. Routed experts run in
AutoEP's bf16 grouped GEMMs: torch 2.11's rowwise FP8 grouped GEMM ran at half their speed on an H100
at the bench shape (docs/benchmarks.md), so it is not used. Of the eligible linears, `fp8.layers: auto`
converts only those wide enough to gain (`fp8_gemm_pays`); `all` converts every one.

Recipes:
- `tensorwise`, `rowwise`: torchao float8 training (Float8Linear), real FP8 GEMMs; GPU only.
- `rowwise_with_gw_hp`: torchao's rowwise with the weight-gradient GEMM (the one that reduces over tokens) left
  in bf16, and output gradients cast to e4m3 rather than e5m2: two FP8 GEMMs of three, torchao's most accurate.
- `blockwise`: DeepSeek-V3's fine-grained scaling (one scale per 1x128 activation tile and per 128x128
  weight block; 128x1 tiles where the GEMM reduces over tokens), emulated: every GEMM operand is rounded
  through float8 e4m3 with its block scales and the GEMM runs in fp32. It reproduces the recipe's
  numerics exactly (up to summation order) on any device, so its loss can be compared with bf16's, but it
  is slower than bf16: it measures quality, not speed.
"""
from __future__ import annotations

import importlib.util

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


def fp8_unavailable(recipe: str) -> str | None:
    """Why this machine cannot run `recipe` as real FP8 GEMMs (None if it can): the emulated blockwise recipe runs
    anywhere; tensorwise and rowwise need FP8 tensor cores (compute capability 8.9: Ada, Hopper and later) and
    torchao's float8 training."""
    if recipe == "blockwise":
        return None
    if not torch.cuda.is_available():
        return "needs a GPU with FP8 tensor cores (compute capability >= 8.9); this machine has none"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        return (f"needs a GPU with FP8 tensor cores (compute capability >= 8.9); {torch.cuda.get_device_name()} "
                f"has {major}.{minor}")
    if importlib.util.find_spec("torchao") is None:
        return ("runs on torchao's float8 training, which is not installed: pip install 'torchao>=0.18' (the project's "
                "fp8 extra)")
    return None


def fp8_gemm_pays(in_features: int, out_features: int, recipe: str) -> bool:
    """Whether a linear this size trains faster with FP8 GEMMs than in bf16, counting the casts that feed its three
    GEMMs (forward, input and weight gradients). An FP8 GEMM is at most ~1.8x a bf16 one on an H100, while each
    cast reads a whole operand: narrow GEMMs lose. The thresholds are those of torchao's H100 table for rowwise
    Float8Linear forward + backward; they hold for tensorwise here too: with torchao's looser tensorwise rule
    (which converts 24 of bench-2b's 28 eligible linears, K and N of 512-3072) the step ran at 0.80x bf16, and
    with every eligible linear in rowwise at 0.81x (docs/benchmarks.md)."""
    if recipe == "blockwise":
        return True  # DeepSeek-V3's recipe quantizes every eligible linear, and the emulation has no speed to keep
    K, N = in_features, out_features
    return N > 2048 and K > 1024 and not (N <= 4096 and K <= 2048)


def fp8_targets(model: nn.Module, recipe: str, layers: str) -> tuple[set[str], int]:
    """Names of the linears to convert, and how many eligible ones `layers: auto` leaves in bf16 as too narrow."""
    eligible = {fqn: m for fqn, m in model.named_modules() if _fp8_eligible(m, fqn)}
    chosen = {fqn for fqn, m in eligible.items()
              if layers == "all" or fp8_gemm_pays(m.in_features, m.out_features, recipe)}
    return chosen, len(eligible) - len(chosen)


def convert_to_fp8(model: nn.Module, recipe: str, layers: str = "auto") -> tuple[int, int]:
    """Swap the chosen linears (fp8_targets) for FP8 ones in place; returns (converted, left in bf16 as too narrow)."""
    chosen, narrow = fp8_targets(model, recipe, layers)
    if recipe == "blockwise":
        return _convert_blockwise(model, chosen), narrow
    if chosen:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

        convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                                   module_filter_fn=lambda _, fqn: fqn in chosen)
    return sum(type(m).__name__ == "Float8Linear" for m in model.modules()), narrow


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


def _convert_blockwise(model: nn.Module, chosen: set[str]) -> int:
    converted = 0
    for fqn, module in list(model.named_modules()):
        if fqn in chosen and module.bias is None and type(module) is nn.Linear:
            module.__class__ = BlockwiseFp8Linear  # same parameters, same state-dict keys
            converted += 1
    return converted
