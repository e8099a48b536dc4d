"""fp8_wgrad.py's Triton kernels: the cast of an operand per column and tile of each expert's rows, and the weight
gradient's GEMM over those tiles."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .fp8 import E4M3_MAX
from .fp8_expert_casts import _pow2_scale
from .fp8_wgrad import TILE, ColumnTiles
from .grouped_mm import expert_of_tile, expert_tiles

CAST_COLUMNS, CAST_WARPS = 64, 4
# (BLOCK_R, BLOCK_C, warps, stages) of the GEMM's output tiles: the fastest over bench-2b's experts on an H200 of
# those bench/expert_wgrad_probe.py swept.
CONFIG = (128, 64, 4, 4)


@triton.jit
def _cast_tiles_kernel(t_ptr, q_ptr, inv_scale_ptr, offs_ptr, C, stride_t, padded_rows, E: tl.constexpr,
                       E_POW2: tl.constexpr, fp8_max: tl.constexpr, TILE: tl.constexpr, BLOCK_C: tl.constexpr):
    tile = tl.program_id(0)
    expert, row0, end = expert_of_tile(offs_ptr, tile, E, E_POW2, TILE)
    if expert >= E:  # the grid counts a spare tile per expert
        return
    rows, cols = row0 + tl.arange(0, TILE), tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    x = tl.load(t_ptr + rows.to(tl.int64)[:, None] * stride_t + cols[None, :],
                mask=(rows < end)[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)  # the next expert's: 0
    scale = _pow2_scale(tl.max(tl.abs(x), axis=0), fp8_max)
    dest = q_ptr + cols.to(tl.int64)[None, :] * padded_rows + tile * TILE + tl.arange(0, TILE)[:, None]
    tl.store(dest, (x * scale[None, :]).to(q_ptr.dtype.element_ty), mask=(cols < C)[None, :])
    tl.store(inv_scale_ptr + tile * C + cols, 1.0 / scale, mask=cols < C)


@triton.jit
def _fp8_wgrad_kernel(a, b, a_inv_scale, b_inv_scale, out_ptr, offs_ptr, R, C, stride_as, stride_bs,
                      E: tl.constexpr, E_POW2: tl.constexpr, ADD: tl.constexpr, TILE: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[e] (+)= a^T b over expert e's tiles, out [E, R, C]; a [R, padded rows] and b [C, padded rows] through TMA
    descriptors. One program per (output tile, expert)."""
    expert, tile = tl.program_id(1), tl.program_id(0)
    tiles_c = tl.cdiv(C, BLOCK_C)
    r0, c0 = (tile // tiles_c) * BLOCK_R, (tile % tiles_c) * BLOCK_C
    _, _, tiles, first_tiles = expert_tiles(offs_ptr, E, E_POW2, TILE)
    mine = tl.arange(0, E_POW2) == expert
    first, count = tl.sum(tl.where(mine, first_tiles, 0), 0), tl.sum(tl.where(mine, tiles, 0), 0)
    rs, cs = r0 + tl.arange(0, BLOCK_R), c0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for p in range(first, first + count):
        product = tl.dot(a.load([r0, p * TILE]), tl.trans(b.load([c0, p * TILE])))
        a_scale = tl.load(a_inv_scale + p * stride_as + rs, mask=rs < R, other=0.0)
        b_scale = tl.load(b_inv_scale + p * stride_bs + cs, mask=cs < C, other=0.0)
        acc += product * a_scale[:, None] * b_scale[None, :]
    out = out_ptr + expert.to(tl.int64) * R * C + rs[:, None] * C + cs[None, :]
    mask = (rs[:, None] < R) & (cs[None, :] < C)
    if ADD:
        acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def cast_tiles_(t: torch.Tensor, offs: torch.Tensor, q: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """fp8_wgrad.cast_tiles' kernel, into q [C, P] and inv_scale [P / TILE, C]."""
    if t.stride(1) != 1:
        t = t.contiguous()
    E, C = offs.shape[0], t.shape[1]
    _cast_tiles_kernel[(inv_scale.shape[0], triton.cdiv(C, CAST_COLUMNS))](
        t, q, inv_scale, offs, C, t.stride(0), q.shape[1], E=E, E_POW2=triton.next_power_of_2(E), fp8_max=E4M3_MAX,
        TILE=TILE, BLOCK_C=CAST_COLUMNS, num_warps=CAST_WARPS)


def weight_grad_(out: torch.Tensor, a: ColumnTiles, b: ColumnTiles, offs: torch.Tensor, add: bool,
                 config: tuple[int, int, int, int] | None = None) -> None:
    """out [E, R, C] = (or += where `add`) a^T b over each expert's tiles; `config` overrides CONFIG."""
    E, R, C = out.shape
    block_r, block_c, warps, stages = config or CONFIG
    a_q, b_q = TensorDescriptor.from_tensor(a.q, [block_r, TILE]), TensorDescriptor.from_tensor(b.q, [block_c, TILE])
    _fp8_wgrad_kernel[(triton.cdiv(R, block_r) * triton.cdiv(C, block_c), E)](
        a_q, b_q, a.inv_scale, b.inv_scale, out, offs, R, C, a.inv_scale.stride(0), b.inv_scale.stride(0), E=E,
        E_POW2=triton.next_power_of_2(E), ADD=add, TILE=TILE, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        num_stages=stages)
