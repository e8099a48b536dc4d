"""Triton kernels for fp8.experts' activation casts, on a GPU: each reads its rows once.

Each computes what its reference in fp8_experts.py computes (quantize_rows, swiglu_quantized,
swiglu_backward_quantized), one program per few rows, the whole row in registers: its amax, its power-of-two
scale, the cast. torch.compile made the same functions looped reductions that read every row twice, at 2x the
bytes' time on an H200 (docs/benchmarks.md). Rows are at most MAX_ROW wide (bench-2b's 2 x 1408; V3's 2 x 2048).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8 import E4M3_MAX

ELEMENTS_PER_PROGRAM = 8192  # values a program loads: ~32 per thread at 8 warps
MAX_ROW = 8192


@triton.jit
def _pow2_scale(amax, fp8_max: tl.constexpr):
    """The largest power of two s with amax * s <= fp8_max, as quantize_rows. Read off the exponent bits of
    fp8_max / amax rather than through log2, whose fast approximation can round up just below a power of two."""
    ratio = fp8_max / tl.maximum(amax, 1e-12)
    exponent = (ratio.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return (exponent << 23).to(tl.float32, bitcast=True)


@triton.jit
def _tile(M, width, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's ROWS rows of an [M, width] operand: their ids, as a column, the columns, the mask."""
    row_ids = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rows, cols = row_ids[:, None], tl.arange(0, BLOCK)[None, :]
    return row_ids, rows, cols, (rows < M) & (cols < width)


@triton.jit
def _load_gate_up(gate_up_ptr, rows, cols, mask, H):
    """The gate and up halves of gate_up [M, 2H] rows, in fp32."""
    gate = tl.load(gate_up_ptr + rows * 2 * H + cols, mask=mask, other=0.0).to(tl.float32)
    return gate, tl.load(gate_up_ptr + rows * 2 * H + H + cols, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, inv_scale_ptr, M, K, fp8_max: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK: tl.constexpr):
    row_ids, rows, cols, mask = _tile(M, K, ROWS, BLOCK)
    x = tl.load(x_ptr + rows * K + cols, mask=mask, other=0.0).to(tl.float32)
    scale = _pow2_scale(tl.max(tl.abs(x), axis=1), fp8_max)
    tl.store(q_ptr + rows * K + cols, (x * scale[:, None]).to(tl.float8e4nv), mask=mask)
    tl.store(inv_scale_ptr + row_ids, 1.0 / scale, mask=row_ids < M)


@triton.jit
def _swiglu_quantized_kernel(gate_up_ptr, h_ptr, q_ptr, inv_scale_ptr, M, H, fp8_max: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row_ids, rows, cols, mask = _tile(M, H, ROWS, BLOCK)
    gate, up = _load_gate_up(gate_up_ptr, rows, cols, mask, H)
    h = (gate * tl.sigmoid(gate) * up).to(tl.bfloat16)
    tl.store(h_ptr + rows * H + cols, h, mask=mask)
    h = h.to(tl.float32)  # quantized as rounded to bf16, as the reference quantizes its bf16 h
    scale = _pow2_scale(tl.max(tl.abs(h), axis=1), fp8_max)
    tl.store(q_ptr + rows * H + cols, (h * scale[:, None]).to(tl.float8e4nv), mask=mask)
    tl.store(inv_scale_ptr + row_ids, 1.0 / scale, mask=row_ids < M)


@triton.jit
def _swiglu_backward_quantized_kernel(gate_up_ptr, grad_h_ptr, grad_ptr, q_ptr, inv_scale_ptr, M, H,
                                      fp8_max: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row_ids, rows, cols, mask = _tile(M, H, ROWS, BLOCK)
    gate, up = _load_gate_up(gate_up_ptr, rows, cols, mask, H)
    dh = tl.load(grad_h_ptr + rows * H + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = (dh * up * sig * (1 + gate * (1 - sig))).to(tl.bfloat16)
    d_up = (dh * gate * sig).to(tl.bfloat16)
    tl.store(grad_ptr + rows * 2 * H + cols, d_gate, mask=mask)
    tl.store(grad_ptr + rows * 2 * H + H + cols, d_up, mask=mask)
    d_gate, d_up = d_gate.to(tl.float32), d_up.to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(d_gate), axis=1), tl.max(tl.abs(d_up), axis=1))
    scale = _pow2_scale(amax, fp8_max)
    tl.store(q_ptr + rows * 2 * H + cols, (d_gate * scale[:, None]).to(tl.float8e4nv), mask=mask)
    tl.store(q_ptr + rows * 2 * H + H + cols, (d_up * scale[:, None]).to(tl.float8e4nv), mask=mask)
    tl.store(inv_scale_ptr + row_ids, 1.0 / scale, mask=row_ids < M)


def _launch(kernel, rows: int, width: int, segments: int, *args) -> None:
    """One program per ROWS rows; each row `segments` loads of `width` values (padded to a power of two)."""
    if width > MAX_ROW:
        raise ValueError(f"fp8.experts' casts take rows of at most {MAX_ROW} values, not {width}")
    block = triton.next_power_of_2(width)
    per_program = triton.next_power_of_2(max(1, ELEMENTS_PER_PROGRAM // (block * segments)) + 1) // 2  # a power of 2
    kernel[(triton.cdiv(rows, per_program),)](*args, fp8_max=E4M3_MAX, ROWS=per_program, BLOCK=block, num_warps=8)


def _outputs(rows: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, width, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(rows, dtype=torch.float32, device=device))


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8_experts.quantize_rows for a 2-D bf16 CUDA tensor."""
    x = x.contiguous()
    M, K = x.shape
    q, inv_scale = _outputs(M, K, x.device)
    _launch(_quantize_rows_kernel, M, K, 1, x, q, inv_scale, M, K)
    return q, inv_scale


def swiglu_quantized(gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp8_experts.swiglu_quantized for a bf16 CUDA gate_up [M, 2H]."""
    gate_up = gate_up.contiguous()
    M, H = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty(M, H, dtype=gate_up.dtype, device=gate_up.device)
    q, inv_scale = _outputs(M, H, gate_up.device)
    _launch(_swiglu_quantized_kernel, M, H, 2, gate_up, h, q, inv_scale, M, H)
    return h, q, inv_scale


def swiglu_backward_quantized(gate_up: torch.Tensor, grad_h: torch.Tensor) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp8_experts.swiglu_backward_quantized for bf16 CUDA gate_up [M, 2H] and grad_h [M, H]."""
    gate_up, grad_h = gate_up.contiguous(), grad_h.contiguous()
    M, H = grad_h.shape
    grad = torch.empty_like(gate_up)
    q, inv_scale = _outputs(M, 2 * H, gate_up.device)
    _launch(_swiglu_backward_quantized_kernel, M, H, 3, gate_up, grad_h, grad, q, inv_scale, M, H)
    return grad, q, inv_scale
