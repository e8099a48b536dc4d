"""The routed experts' weight gradients added into `.grad` by the GEMM itself, on a GPU.

A routed expert's weight gradient reduces over that expert's token rows: grad[e] += a[rows_e]^T b[rows_e]. Under
gradient accumulation, autograd computes it with torch._grouped_mm (CUTLASS) and then adds it onto `.grad` in a
pass of its own, which reads and writes the whole gradient again: on bench-2b's experts 0.53 ms of GEMM plus
0.28 ms of add per weight (bench/expert_wgrad_probe.py). This kernel adds in its epilogue, where the product is
still in fp32 registers; the sum is rounded to bf16 once instead of twice.

One program per (output tile, expert) walks the expert's rows; the grid runs an expert's tiles next to each other,
so its rows stay in L2 while every tile reads them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tile shape and pipeline depth: the fastest of those bench/expert_wgrad_probe.py swept on an H200 (bench-2b's
# experts, TMA loads): 0.59-0.65 ms per weight over three calls, where torch._grouped_mm and then autograd's add
# take 0.79-0.83.
BLOCK_K, BLOCK_N, BLOCK_R, NUM_WARPS, NUM_STAGES = 128, 128, 32, 4, 4


@triton.jit
def _load_rows(a, b, r0, end, k0, n0, K, N, stride_a, stride_b, USE_TMA: tl.constexpr, MASK_ROWS: tl.constexpr,
               EVEN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows r0 : r0 + BLOCK_R of a's columns k0 : k0 + BLOCK_K and of b's columns n0 : n0 + BLOCK_N, rows from `end`
    on zero when MASK_ROWS. Through TMA descriptors (columns past K or N, rows past the tensor, read as zero) or
    pointers (columns masked unless EVEN: every tile whole)."""
    rows = r0 + tl.arange(0, BLOCK_R)
    if USE_TMA:
        a_rows, b_rows = a.load([r0, k0]), b.load([r0, n0])
        if MASK_ROWS:
            mine = (rows < end)[:, None]
            a_rows, b_rows = tl.where(mine, a_rows, 0.0), tl.where(mine, b_rows, 0.0)
    else:
        ks, ns = k0 + tl.arange(0, BLOCK_K), n0 + tl.arange(0, BLOCK_N)
        a_ptrs = a + rows.to(tl.int64)[:, None] * stride_a + ks[None, :]
        b_ptrs = b + rows.to(tl.int64)[:, None] * stride_b + ns[None, :]
        if EVEN and not MASK_ROWS:
            a_rows, b_rows = tl.load(a_ptrs), tl.load(b_ptrs)
        else:
            mine = (rows < end)[:, None] if MASK_ROWS else (rows >= 0)[:, None]
            a_rows = tl.load(a_ptrs, mask=mine & (ks < K)[None, :], other=0.0)
            b_rows = tl.load(b_ptrs, mask=mine & (ns < N)[None, :], other=0.0)
    return a_rows, b_rows


@triton.jit
def _grouped_wgrad_kernel(a, b, out_ptr, offs_ptr, K, N, stride_a, stride_b, USE_TMA: tl.constexpr,
                          EVEN: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    expert, tile = tl.program_id(1), tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    k0, n0 = (tile // tiles_n) * BLOCK_K, (tile % tiles_n) * BLOCK_N
    start = tl.load(offs_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(offs_ptr + expert)
    whole_end = start + (end - start) // BLOCK_R * BLOCK_R
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, whole_end, BLOCK_R):  # whole row blocks of this expert: no row mask
        a_rows, b_rows = _load_rows(a, b, r0, end, k0, n0, K, N, stride_a, stride_b, USE_TMA, False, EVEN, BLOCK_R,
                                    BLOCK_K, BLOCK_N)
        acc = tl.dot(tl.trans(a_rows), b_rows, acc)
    if whole_end < end:  # the last, partial block: rows from `end` on are the next expert's
        a_rows, b_rows = _load_rows(a, b, whole_end, end, k0, n0, K, N, stride_a, stride_b, USE_TMA, True, EVEN,
                                    BLOCK_R, BLOCK_K, BLOCK_N)
        acc = tl.dot(tl.trans(a_rows), b_rows, acc)
    ks, ns = k0 + tl.arange(0, BLOCK_K), n0 + tl.arange(0, BLOCK_N)
    out = out_ptr + expert.to(tl.int64) * K * N + ks[:, None] * N + ns[None, :]
    mask = (ks[:, None] < K) & (ns[None, :] < N)
    acc += tl.load(out, mask=mask, other=0.0).to(tl.float32)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _readable(t: torch.Tensor, use_tma: bool) -> torch.Tensor:
    """t, or a contiguous copy where the kernel's loads cannot read it: they need unit column stride, and TMA also
    16-byte aligned rows and base."""
    aligned = t.stride(0) * t.element_size() % 16 == 0 and t.data_ptr() % 16 == 0
    return t if t.stride(1) == 1 and (aligned or not use_tma) else t.contiguous()


def grouped_wgrad_(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                   config: tuple[int, int, int, int, int] | None = None, use_tma: bool | None = None) -> None:
    """out[e] += a[rows of e]^T b[rows of e], in place, for out [E, K, N] (contiguous) and a [M, K], b [M, N] (bf16)
    whose expert e owns rows offs[e-1]:offs[e] (int32 [E]); rows past offs[-1] are left out. Loads go through TMA
    on Hopper and later, through pointers before; an operand laid out so that they cannot read it is copied first.
    `config` overrides the tile shape (BLOCK_K, BLOCK_N, BLOCK_R, warps, stages) and `use_tma` the load path, for
    the probe."""
    (M, K), N, E = a.shape, b.shape[1], offs.shape[0]
    if b.shape[0] != M:
        raise ValueError(f"grouped_wgrad_: a {tuple(a.shape)} and b {tuple(b.shape)} must share their rows")
    if out.shape != (E, K, N) or not out.is_contiguous():
        raise ValueError(f"grouped_wgrad_: out {tuple(out.shape)} must be a contiguous [{E}, {K}, {N}]")
    if not M:  # no rows (a rank that received no tokens): nothing to add, and TMA descriptors need rows
        return
    if use_tma is None:
        use_tma = torch.cuda.get_device_capability(a.device) >= (9, 0)
    a, b = _readable(a, use_tma), _readable(b, use_tma)
    block_k, block_n, block_r, warps, stages = config or (BLOCK_K, BLOCK_N, BLOCK_R, NUM_WARPS, NUM_STAGES)
    strides = a.stride(0), b.stride(0)
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor
        a, b = TensorDescriptor.from_tensor(a, [block_r, block_k]), TensorDescriptor.from_tensor(b, [block_r, block_n])
    grid = (triton.cdiv(K, block_k) * triton.cdiv(N, block_n), E)
    _grouped_wgrad_kernel[grid](a, b, out, offs, K, N, *strides, USE_TMA=use_tma,
                                EVEN=K % block_k == 0 and N % block_n == 0, BLOCK_K=block_k, BLOCK_N=block_n,
                                BLOCK_R=block_r, num_warps=warps, num_stages=stages)
