"""A Triton cast of an FP8 weight's two layouts, once per optimizer step, on a GPU: 6 bytes of traffic per value.

A weight w [E, N, K] (E experts; a plain matrix is E = 1) feeds two FP8 GEMMs, each scaled along its reduction
dimension (fp8_experts.py's rule): the forward reads e4m3 [E, N, K] with a scale per row of w, the input gradient
e4m3 [E, K, N] with a scale per column of w. The reference, quantize_rows(w) and quantize_rows(w.mT.contiguous()),
through torch.compile wrote the transposed copy and read it back, ~12 bytes per value (docs/benchmarks.md); at one
micro-step per optimizer step that cost FP8 more than its GEMMs saved. Here a column's scale needs every row, so two
passes: the first reads each tile and folds its row and column amaxes into two vectors (atomic max of their bits:
amaxes are >= 0, so their int32 order is their float order), the second reads the tile again and writes it both
ways. The scales and the rounding are quantize_rows', bit for bit.

Several weights stacked along N (w1 and w3 as gate_up) cast into one output: each source writes its rows, and a
column's amax covers every source's rows before any is cast.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from .fp8 import E4M3_MAX
from .fp8_expert_casts import _pow2_scale

BLOCK_N, BLOCK_K = 64, 128


@triton.jit
def _tile(w_ptr, N, K, BN: tl.constexpr, BK: tl.constexpr):
    """This program's [BN, BK] tile of expert program_id(2)'s [N, K] matrix, in fp32: the tile, the expert, its row
    and column ids, the mask."""
    e = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    x = tl.load(w_ptr + e * N * K + rows[:, None].to(tl.int64) * K + cols[None, :], mask=mask, other=0.0)
    return x.to(tl.float32), e, rows, cols, mask


@triton.jit
def _amax_kernel(w_ptr, row_amax_ptr, col_amax_ptr, N, K, row_offset, total_rows,
                 BN: tl.constexpr, BK: tl.constexpr):
    x, e, rows, cols, _ = _tile(w_ptr, N, K, BN, BK)
    x = tl.abs(x)
    tl.atomic_max(row_amax_ptr + e * total_rows + row_offset + rows,
                  tl.max(x, axis=1).to(tl.int32, bitcast=True), mask=rows < N)
    tl.atomic_max(col_amax_ptr + e * K + cols, tl.max(x, axis=0).to(tl.int32, bitcast=True), mask=cols < K)


@triton.jit
def _cast_kernel(w_ptr, row_amax_ptr, col_amax_ptr, q_ptr, scale_ptr, qt_ptr, t_scale_ptr, N, K, row_offset,
                 total_rows, fp8_max: tl.constexpr, WRITE_T_SCALES: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr):
    x, e, rows, cols, mask = _tile(w_ptr, N, K, BN, BK)
    out_rows = row_offset + rows
    row_amax = tl.load(row_amax_ptr + e * total_rows + out_rows, mask=rows < N, other=0)
    col_amax = tl.load(col_amax_ptr + e * K + cols, mask=cols < K, other=0)
    row_scale = _pow2_scale(row_amax.to(tl.float32, bitcast=True), fp8_max)
    col_scale = _pow2_scale(col_amax.to(tl.float32, bitcast=True), fp8_max)
    tl.store(q_ptr + e * total_rows * K + out_rows[:, None].to(tl.int64) * K + cols[None, :],
             (x * row_scale[:, None]).to(tl.float8e4nv), mask=mask)
    t = tl.trans(x * col_scale[None, :]).to(tl.float8e4nv)  # [BK, BN]: rows of the transposed layout
    tl.store(qt_ptr + e * K * total_rows + cols[:, None].to(tl.int64) * total_rows + out_rows[None, :], t,
             mask=tl.trans(mask))
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + e * total_rows + out_rows, 1.0 / row_scale, mask=rows < N)
    if WRITE_T_SCALES and tl.program_id(0) == 0:
        tl.store(t_scale_ptr + e * K + cols, 1.0 / col_scale, mask=cols < K)


def cast_weight_layouts(weights: Sequence[torch.Tensor]) \
        -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weights`, each bf16 [E, N_i, K] on a GPU, stacked along N as w [E, N, K]: (e4m3 w [E, N, K], scales [E, N],
    e4m3 w^T [E, K, N], scales [E, K]), as quantize_rows(w) and quantize_rows(w.mT.contiguous()) give them."""
    weights = [w.contiguous() for w in weights]
    E, _, K = weights[0].shape
    if any(w.dim() != 3 or w.shape[0] != E or w.shape[2] != K for w in weights):
        raise ValueError(f"cast_weight_layouts stacks [E, N, K] weights of one E and K, not "
                         f"{[tuple(w.shape) for w in weights]}")
    total_rows, device = sum(w.shape[1] for w in weights), weights[0].device
    row_amax = torch.zeros(E, total_rows, dtype=torch.int32, device=device)
    col_amax = torch.zeros(E, K, dtype=torch.int32, device=device)
    q = torch.empty(E, total_rows, K, dtype=torch.float8_e4m3fn, device=device)
    qt = torch.empty(E, K, total_rows, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(E, total_rows, dtype=torch.float32, device=device)
    t_scale = torch.empty(E, K, dtype=torch.float32, device=device)
    offsets = [sum(w.shape[1] for w in weights[:i]) for i in range(len(weights))]
    grids = [(triton.cdiv(w.shape[1], BLOCK_N), triton.cdiv(K, BLOCK_K), E) for w in weights]
    for w, offset, grid in zip(weights, offsets, grids):
        _amax_kernel[grid](w, row_amax, col_amax, w.shape[1], K, offset, total_rows, BN=BLOCK_N, BK=BLOCK_K,
                           num_warps=4)
    for i, (w, offset, grid) in enumerate(zip(weights, offsets, grids)):
        _cast_kernel[grid](w, row_amax, col_amax, q, scale, qt, t_scale, w.shape[1], K, offset, total_rows,
                           fp8_max=E4M3_MAX, WRITE_T_SCALES=i == 0, BN=BLOCK_N, BK=BLOCK_K, num_warps=4)
    return q, scale, qt, t_scale
