"""The attention projections' and the dense MLPs' GEMMs in FP8 (`fp8.attention`, `fp8.dense_mlp`), weights cast once
per optimizer step.

At bench-2b's widths (K and N of 512-3072) torchao's Float8Linear loses to bf16: it casts each weight again at every
micro-step and its activations in passes of their own (engine/fp8.py's fp8_gemm_pays); on the dense MLP (2048 <->
10944), where its tensorwise GEMMs gain, its casts still cost more than these (docs/benchmarks.md). Here, as
fp8.experts does for the experts (fp8_experts.py):
- Forward and input-gradient GEMMs are FP8 (e4m3, `torch._scaled_mm`, fast accumulation), every scale a power of two,
  one per row along the GEMM's reduction dimension: exact scaling, e4m3's rounding the only error.
- The weight gradient reduces over tokens, which the other GEMMs' row scales cannot follow. By default it stays
  bf16, added into `.grad` by its GEMM where parallel.linear_grads_in_place does that for the bf16 linears
  (linear_grads.py). With `fp8.linear_weight_grads: fp8` it is an FP8 GEMM too, each operand with one power-of-two
  scale for the whole tensor as torchao's tensorwise recipe scales it (the input e4m3, the output gradient e5m2),
  both cast transposed to tokens-last; the scales come from the row scales the other two GEMMs' casts find, so these
  casts read no tensor for its amax again. With `fp8_rowwise` each operand has a scale per channel (per input
  feature of the input, per output feature of the output gradient) along the tokens, both e4m3, as torchao's
  rowwise recipe scales it: finer, for a pass over each operand to find its channels' amaxes. Either way the forward
  saves the input in FP8 rather than bf16.
- Each weight's two FP8 layouts (forward, and transposed for the input gradient) are cast once per optimizer step,
  in a forward pre-hook on the block, into buffers the linear reads. The linears run inside the compiled attention
  and dense-MLP halves (train.compile_blocks), so the cache cannot be Python state the traced forward consults: the
  hook runs eagerly before the block, and the compiled graphs see only the buffers, which keep their storage.
- The activations' casts are torch ops, which Inductor compiles with the half and fuses where it can (on an H200
  the first one went into the kernel of the RMSNorm before q and kv_a, and the down projection's input cast into
  the SwiGLU's: docs/benchmarks.md).

Without a Hopper GPU the GEMMs are emulated: an fp32 GEMM of the same FP8 operands, scaled after (numerics, not speed).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import SwiGLU
from ..model.transformer import Block
from .fp8 import E4M3_MAX
from .fp8_experts import ALIGN, quantize_rows
from .linear_grads import add_linear_weight_grad_, grad_for_forward


def scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, fast_accum: bool,
              emulate: bool) -> torch.Tensor:
    """a [M, K] times b.T, b [N, K], both FP8 with power-of-two dequantization scales, per row ([M] and [N]) or one
    per tensor (0-d each): [M, N] bf16. Emulated: an fp32 GEMM scaled after, which power-of-two scales keep exact."""
    if a_scale.dim():  # row scales as _scaled_mm takes them: a column for a, a row for b
        a_scale, b_scale = a_scale[:, None], b_scale[None, :]
    if emulate:
        return ((a.float() @ b.float().T) * a_scale * b_scale).to(torch.bfloat16)
    return torch._scaled_mm(a, b.T, a_scale, b_scale, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)


def pad_tokens(t: torch.Tensor) -> torch.Tensor:
    """t [T, K] with zero rows to T' (a multiple of 16), as FP8 GEMMs reducing over T need; zero rows leave every
    amax as it was."""
    if pad := -t.shape[0] % ALIGN:
        t = F.pad(t, (0, 0, 0, pad))  # only where needed: in eager mode a pad of 0 is still a copy
    return t


def quantize_transposed(t: torch.Tensor, row_scales: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """t [T, K] as `dtype` [K, T'] (pad_tokens) with one power-of-two dequantization scale for the whole tensor,
    found from quantize_rows(t)'s e4m3 `row_scales`: each row's amax is at most 448 x its scale, so 448 x the
    largest bounds the tensor's. For e4m3 that is the scale a pass over t would find; for e5m2 at worst one power of
    two below it, which its range affords."""
    scale = row_scales.max() * (E4M3_MAX / torch.finfo(dtype).max)
    # A power of two still: the row scales are, and the ratio is 1 for e4m3, 448 / 57344 = 2^-7 for e5m2.
    q = (pad_tokens(t).float() / scale).to(dtype)
    return q.T.contiguous(), scale


def quantize_channels(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, K] as e4m3 [K, T'] (pad_tokens) with a power-of-two dequantization scale per channel [K], each from its
    column's amax over the tokens (quantize_rows on the transpose)."""
    q, scale = quantize_rows(pad_tokens(t).T)
    return q.contiguous(), scale


def quantize_for_weight_grad(t: torch.Tensor, row_scales: torch.Tensor, weight_grads: str,
                             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t [T, K] for an FP8 weight-gradient GEMM as fp8.linear_weight_grads scales it: `fp8`, one scale for the tensor
    (as `dtype`, from t's e4m3 `row_scales`); `fp8_rowwise`, one per channel, e4m3."""
    return quantize_transposed(t, row_scales, dtype) if weight_grads == "fp8" else quantize_channels(t)


@torch.library.custom_op("deepseek_pt::add_fp8_weight_grad_", mutates_args=("grad",))
def add_fp8_weight_grad_(grad: torch.Tensor, grad_y_t: torch.Tensor, grad_y_scale: torch.Tensor, x_t: torch.Tensor,
                         x_scale: torch.Tensor, fast_accum: bool, emulate: bool) -> None:
    """grad [out, in] += grad_y_t [out, T] x_t [in, T]^T, an FP8 GEMM: a custom op so that the compiled halves keep
    the add in place (linear_grads.py says why)."""
    grad.add_(scaled_mm(grad_y_t, grad_y_scale, x_t, x_scale, fast_accum, emulate))


def cast_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] as (e4m3 [N, K], scales [N]) for the forward and (e4m3 [K, N], scales [K]) for the input
    gradient, each scaled along its GEMM's reduction dimension."""
    return (*quantize_rows(weight), *quantize_rows(weight.T.contiguous()))


def _triton_cast_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """cast_weight through fp8_weight_casts' kernels (weight read twice, each layout written once)."""
    from .fp8_weight_casts import cast_weight_layouts
    return tuple(t.squeeze(0) for t in cast_weight_layouts([weight.unsqueeze(0)]))


class _Fp8Linear(torch.autograd.Function):
    """y = x @ weight.T through the FP8 layouts of weight; weight's gradient as `weight_grads` says (bf16, or FP8
    scaled as fp8.linear_weight_grads names it, with fast accumulation if `fast_accum`), added into `grad` if given."""

    @staticmethod
    def forward(ctx, x, weight, w_fp8, w_scale, wt_fp8, wt_scale, grad, emulate: bool, weight_grads: str,
                fast_accum: bool):
        rows = x.reshape(-1, x.shape[-1])
        x_fp8, x_scale = quantize_rows(rows)
        y = scaled_mm(x_fp8, x_scale, w_fp8, w_scale, fast_accum=True, emulate=emulate)
        saved = ((rows,) if weight_grads == "bf16"
                 else quantize_for_weight_grad(rows, x_scale, weight_grads, torch.float8_e4m3fn))
        ctx.save_for_backward(wt_fp8, wt_scale, *saved)
        # Off save_for_backward, as in linear_grads.py: the version check would refuse a `.grad` another use of the
        # same weight changed first.
        ctx.grad, ctx.emulate, ctx.weight_dtype, ctx.x_dtype = grad, emulate, weight.dtype, x.dtype
        ctx.weight_grads, ctx.fast_accum = weight_grads, fast_accum
        return y.to(x.dtype).view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        wt_fp8, wt_scale, *saved = ctx.saved_tensors
        grad_rows = grad_y.reshape(-1, grad_y.shape[-1]).to(ctx.x_dtype)
        g_fp8, g_scale = quantize_rows(grad_rows)
        grad_x = scaled_mm(g_fp8, g_scale, wt_fp8, wt_scale, fast_accum=True, emulate=ctx.emulate).to(ctx.x_dtype)
        grad_w = None
        if ctx.weight_grads != "bf16":
            wgrad = (*quantize_for_weight_grad(grad_rows, g_scale, ctx.weight_grads, torch.float8_e5m2), *saved,
                     ctx.fast_accum, ctx.emulate)
            if ctx.grad is not None:
                add_fp8_weight_grad_(ctx.grad, *wgrad)
            elif ctx.needs_input_grad[1]:
                grad_w = scaled_mm(*wgrad).to(ctx.weight_dtype)
        elif ctx.grad is not None:
            add_linear_weight_grad_(ctx.grad, grad_rows, saved[0])
        elif ctx.needs_input_grad[1]:
            grad_w = (grad_rows.T @ saved[0]).to(ctx.weight_dtype)
        grad_x = grad_x.view(*grad_y.shape[:-1], grad_x.shape[-1])
        return grad_x, grad_w, None, None, None, None, None, None, None, None


class Fp8CachedLinear(nn.Linear):
    """nn.Linear without bias (same parameter, same state dict) whose forward and input-gradient GEMMs read FP8
    copies of its weight, which `cast_weight_once(step)` refreshes when the optimizer step moves."""

    emulate: bool
    grads_in_place: bool
    weight_grads: str
    fast_accum: bool
    cast_key: tuple[int, int] | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = grad_for_forward(self.weight, x.dtype) if self.grads_in_place else None
        return _Fp8Linear.apply(x, self.weight, self.weight_fp8, self.weight_scale, self.weight_t_fp8,
                                self.weight_t_scale, grad, self.emulate, self.weight_grads, self.fast_accum)

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

    def to_fp8(self, emulate: bool, grads_in_place: bool, weight_grads: str = "bf16", fast_accum: bool = False) -> None:
        N, K = self.out_features, self.in_features
        device = self.weight.device
        # Not persistent: checkpoints and exports hold the bf16/fp32 weight only.
        for name, shape, dtype in (("weight_fp8", (N, K), torch.float8_e4m3fn), ("weight_scale", (N,), torch.float32),
                                   ("weight_t_fp8", (K, N), torch.float8_e4m3fn),
                                   ("weight_t_scale", (K,), torch.float32)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.emulate, self.grads_in_place, self.cast_key = emulate, grads_in_place, None
        self.weight_grads, self.fast_accum = weight_grads, fast_accum


def _eligible(linear: nn.Module) -> bool:
    return (type(linear) is nn.Linear and linear.bias is None
            and linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0)


def convert_linears_to_fp8(model: nn.Module, optimizer_steps: Callable[[], int], emulate: bool, grads_in_place: bool,
                           attention: bool, dense_mlp: bool, weight_grads: str = "bf16",
                           fast_accum: bool = False) -> dict[str, tuple[int, int]]:
    """Run the attention projections (`attention`) and the dense SwiGLUs' gate, up and down projections (`dense_mlp`)
    of `model`'s blocks, the MTP modules' included, through Fp8CachedLinear, their FP8 weights cast in a forward
    pre-hook on each block when `optimizer_steps()` (the engine's step counter) moves. Must run before compile_blocks
    and after DeepSpeed's own hooks are on the blocks (deepspeed.initialize), so that under ZeRO-3 the block's gather
    comes first. `weight_grads`: fp8.linear_weight_grads, their weight gradients in bf16 or FP8 (`fast_accum`: with
    fast accumulation). Returns, for each part asked for, (linears converted, linears in all); the others, with a
    dimension not a multiple of 16, stay bf16."""
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
        for linear in fp8:
            linear.__class__ = Fp8CachedLinear
            linear.to_fp8(emulate, grads_in_place, weight_grads, fast_accum)
        if fp8:
            block.register_forward_pre_hook(functools.partial(_cast_weights, fp8, optimizer_steps))
    return counts


def _cast_weights(linears: list[Fp8CachedLinear], optimizer_steps: Callable[[], int], block, args) -> None:
    step = optimizer_steps()
    for linear in linears:
        linear.cast_weight_once(step)
