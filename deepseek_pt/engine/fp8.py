"""FP8 mixed precision: which linears go FP8, and how they are scaled.

By rule, only nn.Linear layers with both dimensions divisible by 16 (what FP8 GEMMs need) are
eligible: attention projections, dense SwiGLUs and shared experts. The embedding, the output head
(its logits feed the loss directly), the router (Gate: not a Linear; its scores pick experts) and the
norms stay in bf16. Master weights and optimizer state stay fp32 in ZeRO-3. Routed experts run in
AutoEP's grouped GEMMs, bf16 unless `fp8.experts` (fp8_experts.py). Of the eligible linears,
`fp8.layers: auto` converts only those wide enough to gain (`fp8_gemm_pays`); `all` converts every one.

Recipes:
- `tensorwise`, `rowwise`: torchao float8 training (Float8Linear), real FP8 GEMMs on a GPU. A CPU runs the same
  Float8Linear through torch's CPU FP8 GEMMs: the recipe's numerics (for tests and loss comparisons), not its speed.
- `rowwise_with_gw_hp`: torchao's rowwise with the weight-gradient GEMM (the one that reduces over tokens) left
  in bf16, and output gradients cast to e4m3 rather than e5m2: two FP8 GEMMs of three, torchao's most accurate.
- `blockwise`: DeepSeek-V3's fine-grained scaling (one scale per 1x128 activation tile and per 128x128
  weight block; 128x1 tiles where the GEMM reduces over tokens). On a GPU of compute capability 9.0 with
  torchao and Triton, real FP8 GEMMs: torchao's blockwise kernels (Triton casts, cuBLAS block-scaled
  GEMMs), for the linears whose dimensions are multiples of 128 (the others stay bf16). Elsewhere emulated:
  every GEMM operand is rounded through float8 e4m3 with its block scales and the GEMM runs in fp32. The
  emulation reproduces the recipe's numerics (up to summation order and the output's rounding) on any
  device, so its loss can be compared with bf16's, but it is slower than bf16: it measures quality, not speed.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .accelerator import on_gpu

HIGH_PRECISION = ("lm_head",)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
BLOCK = 128


def _fp8_eligible(module: nn.Module, fqn: str, taken: tuple[str, ...]) -> bool:
    parts = fqn.split(".")
    return (isinstance(module, nn.Linear) and parts[-1] not in HIGH_PRECISION
            and "experts" not in parts  # routed experts: AutoEP's grouped GEMM (fp8.experts: fp8_experts.py)
            and not any(f".{path}." in f".{fqn}." for path in taken)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def taken_elsewhere(shared_experts: bool, attention: bool, dense_mlp: bool) -> tuple[str, ...]:
    """Dotted paths (within a module's name) of the linears our own FP8 paths take, so that torchao's recipes leave
    them: the shared experts under fp8.shared_experts (fp8_experts.py), the attention projections under
    fp8.attention and the dense SwiGLUs' projections (a MoE layer's `mlp` holds none) under fp8.dense_mlp
    (fp8_linears.py)."""
    dense = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    return ("shared_experts",) * shared_experts + ("self_attn",) * attention + dense * dense_mlp


_INSTALL = {"torchao": "pip install 'torchao>=0.18' (the project's fp8 extra)", "triton": "pip install triton"}


def _machine_lacks(hardware: str, capability: tuple[int, int], packages: tuple[str, ...]) -> str | None:
    """What this machine lacks of `hardware` (a GPU of at least `capability`) and `packages`, as "needs ..."; None
    if nothing."""
    need = f"needs {hardware} (compute capability >= {capability[0]}.{capability[1]})"
    if not on_gpu():
        return f"{need}; this machine has none"
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < capability:
        return f"{need}; {torch.cuda.get_device_name()} has {major}.{minor}"
    return _packages_lacking(packages)


def _packages_lacking(packages: tuple[str, ...]) -> str | None:
    for package in packages:
        if importlib.util.find_spec(package) is None:
            return f"needs {package}, which is not installed: {_INSTALL[package]}"
    return None


def fp8_unavailable(recipe: str) -> str | None:
    """Why this machine cannot run `recipe` (None if it can): the blockwise recipe runs anywhere, emulated where its
    real GEMMs cannot (blockwise_gemms_unavailable); tensorwise and rowwise need torchao's float8 training, and on a
    GPU FP8 tensor cores (Ada, Hopper and later). Without a GPU, torch's CPU FP8 GEMMs run torchao's Float8Linear:
    the recipe's numerics, not its speed."""
    if recipe == "blockwise":
        return None
    if not on_gpu():
        return _packages_lacking(("torchao",))
    return _machine_lacks("a GPU with FP8 tensor cores", (8, 9), ("torchao",))


def blockwise_gemms_unavailable() -> str | None:
    """Why the blockwise recipe runs emulated here rather than as real FP8 GEMMs (None if it need not): torchao's
    blockwise kernels need a Hopper GPU and Triton."""
    return _machine_lacks("a Hopper GPU", (9, 0), ("torchao", "triton"))


def expert_gemms_unavailable() -> str | None:
    """Why the routed experts' FP8 grouped GEMMs (fp8.experts) run emulated here (None if they need not):
    torch._scaled_grouped_mm's rowwise kernels are Hopper's, and their operands' casts are Triton kernels."""
    return _machine_lacks("a Hopper GPU", (9, 0), ("triton",))


def fp8_gemm_pays(in_features: int, out_features: int) -> bool:
    """Whether a linear this size trains faster with FP8 GEMMs than in bf16, counting the casts that feed its three
    GEMMs (forward, input and weight gradients). An FP8 GEMM is at most ~1.8x a bf16 one on an H100, while each
    cast reads a whole operand: narrow GEMMs lose. The thresholds are those of torchao's H100 table for rowwise
    Float8Linear forward + backward; they hold for tensorwise here too: with torchao's looser tensorwise rule
    (which converts 24 of bench-2b's 28 eligible linears, K and N of 512-3072) the step ran at 0.80x bf16, and
    with every eligible linear in rowwise at 0.81x (docs/benchmarks.md). At the edge, bench-2b's dense gate and up
    (2048 -> 10944), tensorwise took the block's GPU time to 0.87-0.92x bf16 and rowwise to 1.05-1.13x
    (bench/fp8_dense_block.py): rowwise's backward casts cost more there than its GEMMs save. Blockwise follows the
    same rule: at DeepSeek-V3's dense widths the 15 linears it keeps ran at 54,372 tokens/s, where all 21 aligned
    ones (DeepSeek-V3's recipe, `fp8.layers: all`) ran at 52,948 in an earlier call; their second-half losses were
    -0.57% and +1.71% of bf16's, one run each."""
    K, N = in_features, out_features
    return N > 2048 and K > 1024 and not (N <= 4096 and K <= 2048)


def fp8_targets(model: nn.Module, layers: str, taken: tuple[str, ...] = ()) -> tuple[set[str], int]:
    """Names of the linears to convert, and how many eligible ones `layers: auto` leaves in bf16 as too narrow. The
    linears under the dotted paths of `taken` (taken_elsewhere) are not eligible."""
    eligible = {fqn: m for fqn, m in model.named_modules() if _fp8_eligible(m, fqn, taken)}
    chosen = {fqn for fqn, m in eligible.items()
              if layers == "all" or fp8_gemm_pays(m.in_features, m.out_features)}
    return chosen, len(eligible) - len(chosen)


@dataclass(frozen=True)
class Fp8Conversion:
    converted: int
    """Linears that now run FP8 GEMMs (or, emulated, their numerics)."""
    too_narrow: int
    """Eligible linears that `fp8.layers: auto` left in bf16 as too narrow to gain."""
    unaligned: int = 0
    """Blockwise as real GEMMs: eligible linears left in bf16 because a dimension is not a multiple of 128."""
    emulated: str | None = None
    """Blockwise only: why this machine emulates its GEMMs (None: real FP8 GEMMs)."""


def torchao_config(recipe: str, fast_accum: str = "forward"):
    """torchao's Float8LinearConfig for `recipe`, with fast accumulation in its backward GEMMs too if
    `fast_accum` is "all" (torchao's recipes use it in the forward GEMM only)."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.config import Float8GemmConfig

    config = Float8LinearConfig.from_recipe_name(recipe)
    if fast_accum == "all":
        fast = Float8GemmConfig(use_fast_accum=True)
        config = dataclasses.replace(config, gemm_config_grad_input=fast, gemm_config_grad_weight=fast)
    return config


def convert_to_fp8(model: nn.Module, recipe: str, layers: str = "auto", fast_accum: str = "forward",
                   taken: tuple[str, ...] = ()) -> Fp8Conversion:
    """Swap the chosen linears (fp8_targets) for FP8 ones in place."""
    chosen, narrow = fp8_targets(model, layers, taken)
    if recipe == "blockwise":
        if why := blockwise_gemms_unavailable():
            return Fp8Conversion(_swap_class(model, chosen, BlockwiseFp8Linear), narrow, emulated=why)
        aligned = {fqn for fqn, m in model.named_modules()
                   if fqn in chosen and m.in_features % BLOCK == 0 and m.out_features % BLOCK == 0}
        # torchao's Triton casts autotune on first use, per shape: 5-7 minutes at DeepSeek-V3's widths on a fresh
        # H200 (docs/benchmarks.md). Triton keeps the results in its cache directory only when asked, and reads
        # the setting when the kernels are imported (first forward), so set it now, for later runs on the machine.
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        return Fp8Conversion(_swap_class(model, aligned, BlockwiseFp8GemmLinear), narrow, len(chosen) - len(aligned))
    if chosen:
        if not on_gpu():
            # torchao's compiled extensions are CUDA kernels that Float8Linear does not use; on a CPU their failed
            # loads would only print warnings on every rank.
            os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, config=torchao_config(recipe, fast_accum),
                                   module_filter_fn=lambda _, fqn: fqn in chosen)
    return Fp8Conversion(sum(type(m).__name__ == "Float8Linear" for m in model.modules()), narrow)


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


class BlockwiseFp8GemmLinear(nn.Linear):
    """nn.Linear (no bias, dimensions multiples of 128) whose GEMMs follow the blockwise recipe as real FP8 GEMMs,
    bf16 out: torchao's Triton casts and cuBLAS's block-scaled GEMMs. The tokens of a micro-step must be a multiple
    of 128 too: the weight-gradient GEMM reduces over them in 128-token tiles (engine/preflight.py checks it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.prototype.blockwise_fp8_training.linear import fp8_blockwise_mm  # imports Triton: GPU only

        return fp8_blockwise_mm.apply(x, self.weight, BLOCK, torch.bfloat16, False)  # False: cuBLAS, not Triton GEMMs


def _swap_class(model: nn.Module, chosen: set[str], cls: type[nn.Linear]) -> int:
    converted = 0
    for fqn, module in list(model.named_modules()):
        if fqn in chosen and module.bias is None and type(module) is nn.Linear:
            module.__class__ = cls  # same parameters, same state-dict keys
            converted += 1
    return converted
