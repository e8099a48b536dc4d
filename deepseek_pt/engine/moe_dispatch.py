"""AutoEP's MoE layer with its token dispatch and combine fused (`parallel.fused_moe_dispatch`).

Without expert parallelism, AutoEP's layer moves every routed (token, slot) pair's row through four passes: a
gather from the tokens, `x[pair // top_k]`, whose backward is a sort-based `index_put_` with accumulation; a
permute into expert groups padded to the grouped GEMM's alignment; after the experts, the inverse permute; then
the score-weighted sum over each token's top-k. Here the tokens are gathered once, straight into the padded expert
groups, and the experts' padded output is summed straight back into tokens. Each backward is the other direction's
gather: a token's gradient sums its top-k rows, a row's gradient is its token's scaled by the score. No atomics, no
sorts beyond routing's own, no host syncs.

The padded layout is AutoEP's (each expert's rows in routing's stable sort order, groups padded to
`ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M` rows, an idle expert to one alignment), so the experts compute on the same
rows; the top-k sum adds the same fp32 products in the same slot order as AutoEP's fused combine. On CPUs, and
where Triton is missing, the same plan runs through torch's indexing, op for op AutoEP's eager combine.

With expert parallelism the rows cross an all-to-all between gather and permute, which this layer does not own:
layers with expert_parallel_size > 1 (or AutoTP folding, or scores applied before the experts) keep AutoEP's
forward.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer, RouterOutput
from deepspeed.moe import ep_kernels

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch path below
    triton = None


class DispatchPlan(NamedTuple):
    """Where each routed (token, slot) pair sits in the experts' padded rows, and back."""
    row_pair: torch.Tensor
    """[rows] int64: the pair token * top_k + slot each padded row holds, -1 for padding."""
    pair_row: torch.Tensor
    """[tokens * top_k] int64: the padded row of each pair."""
    group_sizes: torch.Tensor
    """[experts] int32: each expert's rows, padding included (what the experts take as tokens per expert)."""
    top_k: int


def plan_dispatch(selected_experts: torch.Tensor, tokens_per_expert: torch.Tensor, align: int) -> DispatchPlan:
    """The padded expert-major layout of `selected_experts` [tokens, top_k] (the router's choice; its counts per
    expert in `tokens_per_expert`), each expert's group a multiple of `align` rows and at least `align`."""
    pairs = selected_experts.reshape(-1)
    n, n_experts = pairs.numel(), tokens_per_expert.numel()
    counts = tokens_per_expert.to(torch.int64)
    group_sizes = (counts.clamp_min(align) + align - 1) // align * align
    # A pair's padded row: its rank in the stable sort by expert, shifted by the padding of the groups before it.
    shift = (torch.cumsum(group_sizes, 0) - group_sizes) - (torch.cumsum(counts, 0) - counts)
    order = torch.argsort(pairs, stable=True)
    positions = torch.arange(n, device=pairs.device)
    rank = torch.empty_like(positions).scatter_(0, order, positions)
    pair_row = rank + shift[pairs]
    # AutoEP's bound on the padded rows: no host sync to learn the exact sum of group_sizes.
    n_rows = -(-(n + n_experts * align) // align) * align
    row_pair = torch.full((n_rows,), -1, dtype=torch.int64, device=pairs.device).scatter_(0, pair_row, positions)
    return DispatchPlan(row_pair, pair_row, group_sizes.to(torch.int32), selected_experts.shape[1])


def dispatch(x: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The tokens x [tokens, dim] as the experts' padded rows [rows, dim] (zero at padding)."""
    if _use_triton(x):
        return _Dispatch.apply(x, plan.row_pair, plan.pair_row, plan.top_k)
    padded = torch.cat([x, x.new_zeros(1, x.shape[1])])  # the padding rows read this zero row
    return padded[torch.where(plan.row_pair >= 0, plan.row_pair // plan.top_k, x.shape[0])]


def combine(y: torch.Tensor, scores: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Each token's score-weighted sum [tokens, dim] of its top-k rows of the experts' output y [rows, dim], with
    scores [tokens, top_k]: fp32 products added in slot order, rounded to y's dtype once."""
    if _use_triton(y):
        return _Combine.apply(y, scores.contiguous(), plan.row_pair, plan.pair_row)
    n_tokens, top_k = scores.shape
    return (y[plan.pair_row].view(n_tokens, top_k, -1) * scores.unsqueeze(-1).float()).sum(dim=1).to(y.dtype)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, row_pair, pair_row, top_k):
        ctx.save_for_backward(pair_row)
        ctx.top_k = top_k
        return _rows_from_tokens(x, row_pair, top_k)[0]

    @staticmethod
    def backward(ctx, grad_rows):
        (pair_row,) = ctx.saved_tensors
        return _tokens_from_rows(grad_rows, pair_row, ctx.top_k), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, scores, row_pair, pair_row):
        ctx.save_for_backward(y, scores, row_pair)
        return _tokens_from_rows(y, pair_row, scores.shape[1], scores)

    @staticmethod
    def backward(ctx, grad_out):
        y, scores, row_pair = ctx.saved_tensors
        grad_y, grad_scores = _rows_from_tokens(grad_out, row_pair, scores.shape[1], scores, y)
        return grad_y, grad_scores, None, None


def _rows_from_tokens(tokens: torch.Tensor, row_pair: torch.Tensor, top_k: int, scores: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row r of the result is its pair's token row (times the pair's score, with `scores`), zero at padding; with
    `rows` also each pair's dot product of its token row with its row of `rows` (the scores' gradient)."""
    tokens, rows = tokens.contiguous(), rows.contiguous() if rows is not None else None
    out = torch.empty(row_pair.numel(), tokens.shape[1], dtype=tokens.dtype, device=tokens.device)
    dots = torch.empty_like(scores) if rows is not None else None
    if out.numel():
        _rows_from_tokens_kernel[(row_pair.numel(),)](
            tokens, row_pair, scores, rows, dots, out, tokens.shape[1], TOP_K=top_k, SCALE=scores is not None,
            DOT=rows is not None, BLOCK=_block(tokens.shape[1]), num_warps=NUM_WARPS)
    return out, dots


def _tokens_from_rows(rows: torch.Tensor, pair_row: torch.Tensor, top_k: int,
                      scores: torch.Tensor | None = None) -> torch.Tensor:
    """Token t of the result sums the rows of its top-k pairs (each times its score, with `scores`) in fp32."""
    rows = rows.contiguous()
    n_tokens = pair_row.numel() // top_k
    out = torch.empty(n_tokens, rows.shape[1], dtype=rows.dtype, device=rows.device)
    if out.numel():
        # No fused multiply-add: each product rounds to fp32 before the sum, as in AutoEP's combine.
        _tokens_from_rows_kernel[(n_tokens,)](rows, pair_row, scores, out, rows.shape[1], TOP_K=top_k,
                                              SCALE=scores is not None, BLOCK=_block(rows.shape[1]),
                                              num_warps=NUM_WARPS, enable_fp_fusion=False)
    return out


# Columns per loop iteration (at most) and warps per program, shared by both kernels: the fastest of the six settings
# bench/moe_dispatch_probe.py swept on an H200 (bench-2b's shape), where every call moves its rows at 4.0-4.6 TB/s.
MAX_BLOCK, NUM_WARPS = 1024, 4


def _block(dim: int) -> int:
    return min(MAX_BLOCK, triton.next_power_of_2(dim))


if triton is not None:
    @triton.jit
    def _rows_from_tokens_kernel(tokens, row_pair, scores, rows, dots, out, dim, TOP_K: tl.constexpr,
                                 SCALE: tl.constexpr, DOT: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pair = tl.load(row_pair + row)
        token = tl.where(pair >= 0, pair // TOP_K, 0)
        # A block, not the scalar: Triton's interpreter (TRITON_INTERPRET=1) refuses a scalar inside a block's mask.
        mine = tl.full([BLOCK], 0, tl.int64) + pair >= 0
        if SCALE:
            score = tl.load(scores + tl.maximum(pair, 0)).to(tl.float32)  # padding rows store zeros anyway
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, dim, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_dim = cols < dim
            values = tl.load(tokens + token * dim + cols, mask=in_dim & mine, other=0.0)
            if DOT:
                dot += values.to(tl.float32) * tl.load(rows + row * dim + cols, mask=in_dim & mine,
                                                       other=0.0).to(tl.float32)
            if SCALE:
                values = values.to(tl.float32) * score
            tl.store(out + row * dim + cols, values.to(out.dtype.element_ty), mask=in_dim)
        if DOT:
            tl.store(dots + tl.maximum(pair, 0), tl.sum(dot, axis=0), mask=pair >= 0)

    @triton.jit
    def _tokens_from_rows_kernel(rows, pair_row, scores, out, dim, TOP_K: tl.constexpr, SCALE: tl.constexpr,
                                 BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        for start in range(0, dim, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            in_dim = cols < dim
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for slot in tl.static_range(TOP_K):
                row = tl.load(pair_row + token * TOP_K + slot)
                values = tl.load(rows + row * dim + cols, mask=in_dim, other=0.0).to(tl.float32)
                if SCALE:
                    values = values * tl.load(scores + token * TOP_K + slot).to(tl.float32)
                total += values
            tl.store(out + token * dim + cols, total.to(out.dtype.element_ty), mask=in_dim)


class FusedDispatchMoELayer(AutoEPMoELayer):
    """AutoEP's MoE layer (same parameters, router, experts and output tail) whose routed rows go through
    dispatch and combine."""

    def _forward(self, hidden_states: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        bsz, seqlen, dim = hidden_states.shape
        x = hidden_states.reshape(-1, dim)
        routed = RouterOutput(*self.router(x, self.expert_bias))
        with torch.no_grad():
            self.tokens_per_expert.add_(routed.num_tokens_per_expert)
            plan = plan_dispatch(routed.selected_experts, routed.num_tokens_per_expert,
                                 ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M)  # read here: FP8 experts raise it
        y = self.experts(dispatch(x, plan), plan.group_sizes)
        output = combine(y, routed.top_scores, plan).reshape(bsz, seqlen, dim)
        return self._finalize_output(output, x, hidden_states, dim)


def fuse_moe_dispatch(model: torch.nn.Module) -> tuple[int, int]:
    """Make AutoEP's MoE layers of `model` FusedDispatchMoELayer where they run without expert parallelism, AutoTP
    folding or scores applied before the experts. Returns (layers converted, AutoEP MoE layers)."""
    layers = [m for m in model.modules() if isinstance(m, AutoEPMoELayer)]
    converted = 0
    for layer in layers:
        folded = layer.folding_group_handles is not None and layer.folding_group_handles.spec.tp_size > 1
        if (layer.ep_size == 1 and not folded and layer.score_apply == "post"
                and layer.combine_impl in ("weighted_sum", "fused_weighted_sum")):
            layer.__class__ = FusedDispatchMoELayer
            converted += 1
    return converted, len(layers)
