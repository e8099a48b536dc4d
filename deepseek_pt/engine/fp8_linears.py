"""The attention projections' and the dense MLPs' GEMMs in FP8 (`fp8.attention`, `fp8.dense_mlp`), weights cast once
per optimizer step.

At bench-2b's widths (K and N of 512-3072) torchao's Float8Linear loses to bf16: it casts each weight again at every
micro-step and its activations in passes of their own (engine/fp8.py's fp8_gemm_pays); on the dense MLP (2048 <->
10944), where its tensorwise GEMMs gain, its casts still cost more than these (docs/benchmarks.md). Here, as
fp8.experts does for the experts (fp8_experts.py):
- Forward and input-gradient GEMMs are FP8 (e4m3, `torch._scaled_mm`, fast accumulation), every scale a power of two,
  one per row along the GEMM's reduction dimension: exact scaling, e4m3's rounding the only error.
- The weight gradient stays bf16 (it reduces over tokens, which row scales cannot follow), added into `.grad` by its
  GEMM where parallel.linear_grads_in_place does that for the bf16 linears (linear_grads.py).
- Each weight's two FP8 layouts (forward, and transposed for the input gradient) are cast once per optimizer step,
  in a forward pre-hook on the block, into buffers the linear reads. The linears run inside the compiled attention
  and dense-MLP halves (train.compile_blocks), so the cache cannot be Python state the traced forward consults: the
  hook runs eagerly before the block, and the compiled graphs see only the buffers, which keep their storage.
- The activations' casts are torch ops, which Inductor compiles with the half and fuses where it can (on an H200
  the first one went into the kernel of the RMSNorm before q and kv_a, and the down projection's input cast into
  the SwiGLU's: docs/benchmarks.md).

Without a Hopper GPU the GEMMs are emulated: the same operands dequantized, an fp32 GEMM (numerics, not speed).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from ..model.layers import SwiGLU
from ..model.transformer import Block
from .fp8_experts import ALIGN, quantize_rows
from .linear_grads import add_linear_weight_grad_, grad_for_forward


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
              emulate: bool) -> torch.Tensor:
    """a [M, K] (e4m3, row scales [M]) times b.T, b [N, K] (e4m3, row scales [N]): [M, N] bf16. Emulated: the
    operands dequantized, an fp32 GEMM."""
    if emulate:
        return ((a.float() * a_scale[:, None]) @ (b.float() * b_scale[:, None]).T).to(torch.bfloat16)
    return torch._scaled_mm(a, b.T, a_scale[:, None], b_scale[None, :], out_dtype=torch.bfloat16,
                            use_fast_accum=True)


def cast_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] as (e4m3 [N, K], scales [N]) for the forward and (e4m3 [K, N], scales [K]) for the input
    gradient, each scaled along its GEMM's reduction dimension."""
    return (*quantize_rows(weight), *quantize_rows(weight.T.contiguous()))


def _triton_cast_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cast_weight through fp8_weight_casts' kernels (weight read twice, each layout written once)."""
    from .fp8_weight_casts import cast_weight_layouts
    return tuple(t.squeeze(0) for t in cast_weight_layouts([weight.unsqueeze(0)]))


class _Fp8Linear(torch.autograd.Function):
    """y = x @ weight.T through the FP8 layouts of weight; weight's gradient in bf16, added into `grad` if given."""

    @staticmethod
    def forward(ctx, x, weight, w_fp8, w_scale, wt_fp8, wt_scale, grad, emulate: bool):
        rows = x.reshape(-1, x.shape[-1])
        y = scaled_mm(*quantize_rows(rows), w_fp8, w_scale, emulate)
        ctx.save_for_backward(rows, wt_fp8, wt_scale)
        # Off save_for_backward, as in linear_grads.py: the version check would refuse a `.grad` another use of the
        # same weight changed first.
        ctx.grad, ctx.emulate, ctx.weight_dtype = grad, emulate, weight.dtype
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        rows, wt_fp8, wt_scale = ctx.saved_tensors
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1]).to(rows.dtype)
        grad_x = scaled_mm(*quantize_rows(grad_rows), wt_fp8, wt_scale, ctx.emulate).to(rows.dtype)
        grad_w = None
        if ctx.grad is not None:
            add_linear_weight_grad_(ctx.grad, grad_rows, rows)
        elif ctx.needs_input_grad[1]:
            grad_w = (grad_rows.T @ rows).to(ctx.weight_dtype)
        return grad_x.view(*grad_y.shape[:-1], rows.shape[-1]), grad_w, None, None, None, None, None, None


class Fp8CachedLinear(nn.Linear):
    """nn.Linear without bias (same parameter, same state dict) whose forward and input-gradient GEMMs read FP8
    copies of its weight, which `cast_weight_once(step)` refreshes when the optimizer step moves."""

    emulate: bool
    grads_in_place: bool
    cast_key: tuple[int, int] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = grad_for_forward(self.weight, x.dtype) if self.grads_in_place else None
        return _Fp8Linear.apply(x, self.weight, self.weight_fp8, self.weight_scale, self.weight_t_fp8,
                                self.weight_t_scale, grad, self.emulate)

    @torch.no_grad()
    def cast_weight_once(self, step: int) -> bool:
        """Cast the weight into the FP8 buffers unless this step's weight already is; returns whether it cast. The key
        holds the weight's address too, so that a weight ZeRO-3 gathers into new memory is cast again."""
        key = (step, self.weight.data_ptr())
        if self.cast_key == key:
            return False
        cast = _triton_cast_weight if self.weight.is_cuda and not self.emulate else cast_weight
        for buffer, value in zip((self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale),
                                 cast(self.weight)):
            buffer.copy_(value)  # in place: the same tensors each step, so no compiled half's guard on them fails
        self.cast_key = key
        return True

    def to_fp8(self, emulate: bool, grads_in_place: bool) -> None:
        N, K = self.out_features, self.in_features
        device = self.weight.device
        # Not persistent: checkpoints and exports hold the bf16/fp32 weight only.
        for name, shape, dtype in (("weight_fp8", (N, K), torch.float8_e4m3fn), ("weight_scale", (N,), torch.float32),
                                   ("weight_t_fp8", (K, N), torch.float8_e4m3fn),
                                   ("weight_t_scale", (K,), torch.float32)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.emulate, self.grads_in_place, self.cast_key = emulate, grads_in_place, None


def _eligible(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and linear.bias is None
            and linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0)


def convert_linears_to_fp8(model: nn.Module, optimizer_steps: Callable[[], int], emulate: bool, grads_in_place: bool,
                           attention: bool, dense_mlp: bool) -> dict[str, tuple[int, int]]:
    """Run the attention projections (`attention`) and the dense SwiGLUs' gate, up and down projections (`dense_mlp`)
    of `model`'s blocks, the MTP modules' included, through Fp8CachedLinear, their FP8 weights cast in a forward
    pre-hook on each block when `optimizer_steps()` (the engine's step counter) moves. Must run before compile_blocks
    and after DeepSpeed's own hooks are on the blocks (deepspeed.initialize), so that under ZeRO-3 the block's gather
    comes first. Returns, for each part asked for, (linears converted, linears in all); the others, with a dimension
    not a multiple of 16, stay bf16."""
    counts = {part: (0, 0) for part, on in (("attention", attention), ("dense_mlp", dense_mlp)) if on}
    for block in model.modules():
        if not isinstance(block, Block):
            continue
        parts = {"attention": block.self_attn, "dense_mlp": block.mlp if isinstance(block.mlp, SwiGLU) else None}
        fp8 = []
        for part, (converted, total) in counts.items():
            module = parts[part]
            linears = [] if module is None else [m for m in module.modules() if isinstance(m, nn.Linear)]
            eligible = [m for m in linears if _eligible(m)]
            counts[part] = converted + len(eligible), total + len(linears)
            fp8 += eligible
        cache_fp8_linears(block, fp8, optimizer_steps, emulate, grads_in_place)
    return counts


def cache_fp8_linears(block: nn.Module, linears: list[nn.Linear], optimizer_steps: Callable[[], int], emulate: bool,
                      grads_in_place: bool) -> None:
    """Make `linears` (of `block`) Fp8CachedLinear, their FP8 weights cast in a forward pre-hook on `block`."""
    for linear in linears:
        linear.__class__ = Fp8CachedLinear
        linear.to_fp8(emulate, grads_in_place)
    if linears:
        block.register_forward_pre_hook(functools.partial(_cast_weights, linears, optimizer_steps))


def _cast_weights(linears: list[Fp8CachedLinear], optimizer_steps: Callable[[], int], block, args) -> None:
    step = optimizer_steps()
    for linear in linears:
        linear.cast_weight_once(step)
