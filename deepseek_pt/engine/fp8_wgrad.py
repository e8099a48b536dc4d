"""The routed experts' weight-gradient GEMMs in FP8 (`fp8.expert_weight_grads`), scaled as DeepSeek-V3 scales them.

grad w[e] = a[rows of e]^T b[rows of e] reduces over the expert's token rows, where the forward's row scales cannot
follow. Each operand is cast along that axis instead: per column, one power-of-two scale for each tile of TILE rows
of an expert (DeepSeek-V3's 128 x 1 tiles for this GEMM), written transposed, the rows contiguous, since Hopper's
FP8 MMA reads both operands along the reduction. Each expert's rows start on a tile of their own, its last tile
padded with zeros, so that no tile mixes two experts' rows (or scales). The GEMM multiplies tile by tile and adds
each tile's fp32 product into its accumulator times both operands' scales (DeepSeek-V3's promotion to fp32 every
128 products), then adds the sum into `.grad` in its epilogue (as grouped_wgrad.py does in bf16) or writes a new
gradient.

On a GPU the cast and the GEMM are Triton kernels (fp8_wgrad_kernels.py). A CPU runs the same quantization
through torch (`emulate`): the operands rounded through e4m3 with their scales, the GEMM in fp32. The kernels are
tested against it on a GPU, their index arithmetic under Triton's interpreter.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .fp8 import E4M3_MAX
from .linear_grads import grad_to_add_into

TILE = 128  # rows per scale, and per step of the GEMM's reduction


@dataclass
class ColumnTiles:
    """An [M, C] operand cast for the weight-gradient GEMM: q [C, P] (e4m3, tokens contiguous; P rows of padded
    tiles) and inv_scale [P / TILE, C] (fp32 dequantization scale per tile and column)."""
    q: torch.Tensor
    inv_scale: torch.Tensor

    def columns(self, start: int, stop: int) -> ColumnTiles:
        """Columns start:stop of the operand (views)."""
        return ColumnTiles(self.q[start:stop], self.inv_scale[:, start:stop])


def padded_tiles(rows: int, experts: int) -> int:
    """Tiles that any split of `rows` rows over `experts` experts can need, each expert's last tile padded."""
    return -(-rows // TILE) + experts


def _emulated_cast(t: torch.Tensor, offs: torch.Tensor, q: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """fp8_wgrad_kernels._cast_tiles_kernel in torch, expert by expert."""
    first = 0
    for start, end in zip([0, *offs.tolist()[:-1]], offs.tolist()):
        n = -(-(end - start) // TILE)
        tiles = torch.zeros(n * TILE, t.shape[1], dtype=torch.float32, device=t.device)
        tiles[:end - start] = t[start:end].float()
        tiles = tiles.view(n, TILE, t.shape[1])
        amax = tiles.abs().amax(dim=1).clamp(min=1e-12)
        scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
        q[:, first * TILE:(first + n) * TILE] = (tiles * scale[:, None]).to(q.dtype).flatten(0, 1).t()
        inv_scale[first:first + n] = scale.reciprocal()
        first += n


def cast_tiles(t: torch.Tensor, offs: torch.Tensor, emulate: bool, dtype: torch.dtype = torch.float8_e4m3fn) \
        -> ColumnTiles:
    """t [M, C] (expert e owning rows offs[e-1]:offs[e], int32 [E]; rows past offs[-1] left out) cast per column
    and TILE-row tile of each expert. Padded tiles hold zeros; tiles past the last expert's stay unwritten (the GEMM
    never reads them). `dtype`: e4m3, or fp32 for the interpreter's checks (scaled, not rounded)."""
    M, C = t.shape
    tiles = padded_tiles(M, offs.shape[0])
    q = torch.empty(C, tiles * TILE, dtype=dtype, device=t.device)
    inv_scale = torch.empty(tiles, C, dtype=torch.float32, device=t.device)
    if emulate:
        _emulated_cast(t, offs, q, inv_scale)
    elif M:
        from .fp8_wgrad_kernels import cast_tiles_
        cast_tiles_(t, offs, q, inv_scale)
    return ColumnTiles(q, inv_scale)


def _emulated_product(a: ColumnTiles, b: ColumnTiles, offs: torch.Tensor) -> torch.Tensor:
    """The GEMM in fp32 over the dequantized tiles, expert by expert."""
    dequantize = lambda c: c.q.float() * c.inv_scale.repeat_interleave(TILE, dim=0).t()
    a_rows, b_rows = dequantize(a), dequantize(b)
    out, first = [], 0
    for start, end in zip([0, *offs.tolist()[:-1]], offs.tolist()):
        tiles = slice(first * TILE, (first - (start - end) // TILE) * TILE)
        out.append(a_rows[:, tiles] @ b_rows[:, tiles].t())
        first = tiles.stop // TILE
    return torch.stack(out)


def weight_grad(weight: torch.Tensor, a: ColumnTiles, b: ColumnTiles, offs: torch.Tensor, in_place: bool,
                emulate: bool, config: tuple[int, int, int, int] | None = None) -> torch.Tensor | None:
    """The gradient of weight [E, R, C], a[rows of e]^T b[rows of e], from a's and b's casts (a: R columns, b: C),
    as expert_grads.expert_weight_grad returns it: for autograd to accumulate, or, when `in_place` and weight.grad
    already holds this step's sum, added into weight.grad and None returned. `config` overrides the kernel's tile
    shape, for the probe."""
    grad = grad_to_add_into(weight, weight.dtype) if in_place else None
    if emulate:
        product = _emulated_product(a, b, offs).to(weight.dtype)
        if grad is None:
            return product
        grad.add_(product)
        return None
    from .fp8_wgrad_kernels import weight_grad_
    out = grad if grad is not None else torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    weight_grad_(out, a, b, offs, add=grad is not None, config=config)
    return None if grad is not None else out
