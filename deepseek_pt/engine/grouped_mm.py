"""The routed experts' forward and input-gradient GEMMs over expert-sorted rows (`parallel.expert_triton_gemms`).

out[rows of e] = a[rows of e] @ w[e]^T (or @ w[e]), plus a second such product where two GEMMs share their output
rows: the gate's and the up projection's input gradients, which torch._grouped_mm computes apart and autograd then
adds (a pass over the routed rows, 0.14 ms per bench-2b MoE layer), are summed here in the kernel's fp32 registers.

torch._grouped_mm (CUTLASS, torch 2.11's GroupMM.cu on Hopper) computes 128 x 256 tiles in clusters of two along the
rows, so each expert's last rows are padded far: on bench-2b's experts (~770 rows each, in multiples of 16) the same
GEMM over even groups of 128-row multiples ran 18-22% faster than over training's uneven ones
(bench/expert_gemm_probe.py, H200). Here one program computes one BLOCK_M x BLOCK_N tile of one expert's rows. In
four rounds of the probe (CUTLASS's own figures moving up to 18% between rounds with the GPU's clocks) the forward
GEMMs ran between 6% slower and 13% faster than CUTLASS's, the down projection's input gradient 1-11% faster, the
gate's and up's input gradient in one kernel 11-15% faster than CUTLASS's two GEMMs and their add. In training, per
bench-2b micro-step, 8.26 ms of kernel time against CUTLASS's 8.59 and 0.41 ms of adds gone: +1.2% tokens/s over
four interleaved pairs at 16 micro-steps per step, +1.0% at one. The FP8 experts (fp8_experts.py) take the same
kernel with e4m3 operands and their row scales applied in the epilogue: +1.6-1.7% tokens/s in two pairs
(docs/benchmarks.md).

The bf16 experts' gate and up projections run as one kernel (gate_up_swiglu): each tile of the rows is loaded once
for both products, and the SwiGLU is computed in the epilogue, where a pass of its own read gate and up back
(bench-2b on an H100: 1.13 ms against 1.29 for the two GEMMs and DeepSpeed's Triton SwiGLU; docs/benchmarks.md).
The SwiGLU's derivative in the down projection's input-gradient epilogue was measured too, and was slower than that
GEMM and a pass of its own (0.89-1.03 ms against 0.80): its epilogue reads gate and up and writes two outputs while
no other tile's loads overlap it.

Hopper and later, bf16 or e4m3 (TMA loads): `takes` says whether the kernel can read a pair of operands;
expert_grads.py and fp8_experts.py run torch's grouped GEMMs for those it cannot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

# Tile shape (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): the fastest on bench-2b's experts on an H200 of those the
# probe swept (128 x 256 tiles only for the two-product input gradient; BLOCK_M 64, BLOCK_K 128, 4 warps, 4 stages
# and Triton's warp specialization were slower).
CONFIG = (128, 128, 64, 8, 3)
CONFIG_TWO_PRODUCTS = (128, 256, 64, 8, 3)
CONFIG_FP8 = (128, 128, 128, 8, 3)  # e4m3: 128 bytes of K per row per load, as bf16's 64
CONFIG_GATE_UP = (128, 128, 64, 8, 3)  # gate_up_swiglu's: two 128 x 128 accumulators (128 x 64 ones were slower)


@triton.jit
def _accumulate(acc, a, b, m0, row0, n0, K, B_KMAJOR: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += a[m0 rows, :K] @ the expert's block of b, whose rows (b as a 2-D descriptor) start at row0."""
    for k0 in range(0, K, BLOCK_K):
        a_tile = a.load([m0, k0])
        if B_KMAJOR:  # b holds w[e] as [N, K]: out = a @ w[e]^T
            acc = tl.dot(a_tile, tl.trans(b.load([row0 + n0, k0])), acc)
        else:  # b holds w[e] as [K, N]: out = a @ w[e]
            acc = tl.dot(a_tile, b.load([row0 + k0, n0]), acc)
    return acc


@triton.jit
def _expert_tile(offs_ptr, m_tile, E: tl.constexpr, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile m_tile of the experts' tiles, which follow each other in expert order: its expert (E for a spare
    tile: the grid counts one per expert), its first row, and the end of the expert's rows."""
    es = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + es, mask=es < E, other=0)
    starts = tl.load(offs_ptr + es - 1, mask=(es > 0) & (es < E), other=0)
    tiles = tl.where(es < E, tl.cdiv(ends - starts, BLOCK_M), 0)
    tile_ends = tl.cumsum(tiles, 0)
    expert = tl.sum((tile_ends <= m_tile).to(tl.int32), 0)
    mine = es == expert
    start, end = tl.sum(tl.where(mine, starts, 0), 0), tl.sum(tl.where(mine, ends, 0), 0)
    return expert, start + (m_tile - tl.sum(tl.where(mine, tile_ends - tiles, 0), 0)) * BLOCK_M, end


@triton.jit
def _ragged_mm_kernel(a, b, a2, b2, out, offs_ptr, a_scale, b_scale, N, K, K2, stride_out, E: tl.constexpr,
                      E_POW2: tl.constexpr, B_KMAJOR: tl.constexpr, TWO: tl.constexpr, SCALED: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m_tile, n0 = pid // tiles_n, (pid % tiles_n) * BLOCK_N  # neighbouring programs share their rows of a
    expert, m0, end = _expert_tile(offs_ptr, m_tile, E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    # Rows from `end` on are the next expert's (or zeros past the tensor): computed, never stored.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = _accumulate(acc, a, b, m0, expert * (N if B_KMAJOR else K), n0, K, B_KMAJOR, BLOCK_K)
    if TWO:
        acc = _accumulate(acc, a2, b2, m0, expert * (N if B_KMAJOR else K2), n0, K2, B_KMAJOR, BLOCK_K)
    rows, cols = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)
    if SCALED:  # FP8 operands: each row of a and each row of w[e] dequantized by its scale
        acc *= tl.load(a_scale + rows, mask=rows < end, other=0.0)[:, None]
        acc *= tl.load(b_scale + expert * N + cols, mask=cols < N, other=0.0)[None, :]
    ptrs = out + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
    tl.store(ptrs, acc.to(out.dtype.element_ty), mask=(rows < end)[:, None] & (cols < N)[None, :])


@triton.jit
def _gate_up_swiglu_kernel(a, w1, w3, gate, up, h, offs_ptr, N, K, E: tl.constexpr, E_POW2: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """gate, up = a @ w1[e]^T, a @ w3[e]^T for one tile of rows and columns, each tile of a loaded once for both;
    both stored (for the backward) and h = silu(gate) * up from their stored bf16 values."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m_tile, n0 = pid // tiles_n, (pid % tiles_n) * BLOCK_N
    expert, m0, end = _expert_tile(offs_ptr, m_tile, E, E_POW2, BLOCK_M)
    if expert >= E:
        return
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a_tile = a.load([m0, k0])
        acc_gate = tl.dot(a_tile, tl.trans(w1.load([expert * N + n0, k0])), acc_gate)
        acc_up = tl.dot(a_tile, tl.trans(w3.load([expert * N + n0, k0])), acc_up)
    rows, cols = m0 + tl.arange(0, BLOCK_M), n0 + tl.arange(0, BLOCK_N)
    mask = (rows < end)[:, None] & (cols < N)[None, :]
    at = rows.to(tl.int64)[:, None] * N + cols[None, :]  # gate, up and h: [M, N] each
    g, u = acc_gate.to(gate.dtype.element_ty), acc_up.to(up.dtype.element_ty)
    tl.store(gate + at, g, mask=mask)
    tl.store(up + at, u, mask=mask)
    g = g.to(tl.float32)
    tl.store(h + at, (g * tl.sigmoid(g) * u.to(tl.float32)).to(h.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward_kernel(gate, up, grad_h, grad_gate, grad_up, n, BLOCK: tl.constexpr):
    """d(gate), d(up) for h = silu(gate) * up, elementwise over n values, in fp32."""
    at = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = at < n
    g = tl.load(gate + at, mask=mask).to(tl.float32)
    u = tl.load(up + at, mask=mask).to(tl.float32)
    dh = tl.load(grad_h + at, mask=mask).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(grad_gate + at, (dh * u * sig * (1 + g * (1 - sig))).to(grad_gate.dtype.element_ty), mask=mask)
    tl.store(grad_up + at, (dh * g * sig).to(grad_up.dtype.element_ty), mask=mask)


def _config(fp8: bool, two_products: bool) -> tuple[int, int, int, int, int]:
    return CONFIG_FP8 if fp8 else CONFIG_TWO_PRODUCTS if two_products else CONFIG


def takes(a: torch.Tensor, w: torch.Tensor, transpose_w: bool, two_products: bool = False) -> bool:
    """Whether the kernel's TMA loads can read a [M, K] and w: bf16 (or e4m3 with w [E, N, K], whose Hopper MMA reads
    both operands along K) on a Hopper-or-later GPU, w contiguous, unit column stride, 16-byte aligned rows and
    bases; for w [E, K, N], K whole BLOCK_K tiles (a tile past an expert's rows of w would read the next expert's)."""
    fp8 = a.dtype == w.dtype == torch.float8_e4m3fn and transpose_w and not two_products
    if not (a.is_cuda and (a.dtype == w.dtype == torch.bfloat16 or fp8)
            and torch.cuda.get_device_capability(a.device) >= (9, 0)):
        return False
    block_k = _config(fp8, two_products)[2]
    aligned = all(t.data_ptr() % 16 == 0 for t in (a, w)) and a.stride(0) * a.element_size() % 16 == 0
    return w.is_contiguous() and a.stride(1) == 1 and aligned and (transpose_w or a.shape[1] % block_k == 0)


def ragged_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transpose_w: bool,
              a2: torch.Tensor | None = None, w2: torch.Tensor | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None,
              config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """For a [M, K] whose expert e owns rows offs[e-1]:offs[e] (int32 [E]) and w [E, N, K] (transpose_w: out =
    a @ w[e]^T) or [E, K, N] (out = a @ w[e]), the [M, N] product per expert in bf16, plus a2 @ w2[e] (^T) alike when
    a2 is given. FP8 operands come with `scales`, (a's per row [M], w's per row [E, N], fp32), which dequantize the
    product. Rows past offs[-1] are left unwritten, as torch._grouped_mm leaves them. Every pair must pass `takes`;
    `config` overrides the tile shape, for the probe."""
    pairs = [(a, w)] + ([(a2, w2)] if a2 is not None else [])
    block_m, block_n, block_k, warps, stages = config or _config(scales is not None, a2 is not None)
    E, N = offs.shape[0], w.shape[1] if transpose_w else w.shape[2]
    out = torch.empty(a.shape[0], N, device=a.device, dtype=torch.bfloat16 if scales is not None else a.dtype)
    if not a.shape[0]:  # no rows (a rank that received no tokens): TMA descriptors need a non-empty tensor
        return out
    descriptors = []
    for x, wx in pairs:
        descriptors += [TensorDescriptor.from_tensor(x, [block_m, block_k]),
                        TensorDescriptor.from_tensor(wx.view(-1, wx.shape[-1]),
                                                     [block_n, block_k] if transpose_w else [block_k, block_n])]
    ks = [x.shape[1] for x, _ in pairs]
    if a2 is None:  # the second pair's arguments, unused
        descriptors, ks = descriptors * 2, ks + [0]
    a_scale, b_scale = scales if scales is not None else (out, out)  # unread unless SCALED
    grid = ((triton.cdiv(a.shape[0], block_m) + E) * triton.cdiv(N, block_n),)
    _ragged_mm_kernel[grid](*descriptors, out, offs, a_scale, b_scale, N, ks[0], ks[1], out.stride(0), E=E,
                            E_POW2=triton.next_power_of_2(E), B_KMAJOR=transpose_w, TWO=a2 is not None,
                            SCALED=scales is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                            num_warps=warps, num_stages=stages)
    return out


def gate_up_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, offs: torch.Tensor,
                   config: tuple[int, int, int, int, int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For x [M, K] over expert-sorted rows and w1, w3 [E, N, K] (both passing `takes` with transpose_w): gate =
    x @ w1[e]^T, up = x @ w3[e]^T and h = silu(gate) * up, [M, N] each, in one kernel."""
    block_m, block_n, block_k, warps, stages = config or CONFIG_GATE_UP
    E, N = offs.shape[0], w1.shape[1]
    gate, up, h = (torch.empty(x.shape[0], N, device=x.device, dtype=x.dtype) for _ in range(3))
    if not x.shape[0]:
        return gate, up, h
    weights = [TensorDescriptor.from_tensor(w.view(-1, w.shape[-1]), [block_n, block_k]) for w in (w1, w3)]
    grid = ((triton.cdiv(x.shape[0], block_m) + E) * triton.cdiv(N, block_n),)
    _gate_up_swiglu_kernel[grid](TensorDescriptor.from_tensor(x, [block_m, block_k]), *weights, gate, up, h, offs, N,
                                 x.shape[1], E=E, E_POW2=triton.next_power_of_2(E), BLOCK_M=block_m,
                                 BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return gate, up, h


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(gate), d(up) from dh for h = silu(gate) * up (contiguous, one shape), one pass: expert_grads.swiglu_backward's
    math on a GPU."""
    grad_gate, grad_up = torch.empty_like(grad_h), torch.empty_like(grad_h)
    n, block = grad_h.numel(), 4096
    if n:  # an expert-parallel rank may receive no tokens
        _swiglu_backward_kernel[(triton.cdiv(n, block),)](gate, up, grad_h, grad_gate, grad_up, n, BLOCK=block,
                                                          num_warps=8)
    return grad_gate, grad_up
