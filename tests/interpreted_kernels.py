"""Checks of the engine's Triton kernels against torch on CPU tensors, run by tests/test_triton_interpreted.py in a
process whose TRITON_INTERPRET=1 makes Triton execute them with numpy: their index arithmetic (which expert a tile
belongs to, the rows and columns each mask keeps, TMA's zero fill past a tensor) without a GPU. fp32 operands; the
compiled kernels and their bf16/FP8 numerics are tested on a GPU (tests/test_expert_grads.py, test_fp8_experts.py,
test_moe_dispatch.py).

    TRITON_INTERPRET=1 python tests/interpreted_kernels.py CHECK
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_fp8 import rel_err  # this script's own folder is on the path, as pytest puts it

COUNTS = [272, 0, 48, 160, 16]  # rows per expert: more than two 128-row tiles, fewer than one, none


def _expert_rows(n_cols: int, padding: int = 40, stride_cols: int | None = None) -> torch.Tensor:
    """Rows for COUNTS, then `padding` rows of NaN (past the last expert: no output row may read them); a strided
    view (every row `stride_cols` wide) when asked."""
    rows = torch.randn(sum(COUNTS) + padding, stride_cols or n_cols)[:, -n_cols:]
    rows[sum(COUNTS):] = float("nan")
    return rows


def _bounds():
    offs = torch.tensor(COUNTS).cumsum(0)
    return offs.to(torch.int32), list(zip([0, *offs.tolist()], offs.tolist()))


def ragged_mm() -> None:
    """grouped_mm.ragged_mm: out[rows of e] = a @ w[e]^T or a @ w[e], one product or two, and the FP8 form's
    epilogue (row scales), with K and N off the tiles and a strided operand."""
    from deepseek_pt.engine.grouped_mm import ragged_mm

    offs, bounds = _bounds()
    n, E = sum(COUNTS), len(COUNTS)
    for transpose_w in (True, False):
        K, N = (200, 72) if transpose_w else (128, 72)  # w [E, K, N] needs whole K tiles
        pairs = [(_expert_rows(K, stride_cols=2 * K), torch.randn(E, *((N, K) if transpose_w else (K, N))))
                 for _ in range(2)]
        for two in (False, True):
            out = ragged_mm(*pairs[0], offs, transpose_w, *(pairs[1] if two else (None, None)))
            want = torch.zeros(n, N)
            for e, (start, end) in enumerate(bounds):
                for a, w in pairs[:1 + two]:
                    want[start:end] += a[start:end] @ (w[e].t() if transpose_w else w[e])
            assert torch.isfinite(out[:n]).all(), (transpose_w, two)
            assert rel_err(out[:n], want) < 1e-5, (transpose_w, two, rel_err(out[:n], want))
    a, w = _expert_rows(128), torch.randn(E, 72, 128)
    a_scale, w_scale = torch.rand(a.shape[0]) + 0.5, torch.rand(E, 72) + 0.5
    out = ragged_mm(a, w, offs, True, scales=(a_scale, w_scale))
    want = torch.cat([(a[s:t] * a_scale[s:t, None]) @ (w[e] * w_scale[e, :, None]).t() for e, (s, t) in
                      enumerate(bounds)])
    assert out.dtype == torch.bfloat16 and rel_err(out[:n], want) < 1e-2, rel_err(out[:n], want)  # one bf16 rounding
    empty = ragged_mm(torch.randn(0, 128), w, torch.zeros(E, dtype=torch.int32), True)  # a rank given no tokens
    assert empty.shape == (0, 72)


def gate_up_swiglu() -> None:
    """grouped_mm.gate_up_swiglu: gate and up over the same rows, h = silu(gate) * up in the epilogue, against torch;
    N off the tiles, NaN rows past the last expert left unread. Then grouped_mm.swiglu_backward against torch's."""
    from deepseek_pt.engine import grouped_mm
    from deepseek_pt.engine.expert_grads import swiglu, swiglu_backward

    offs, bounds = _bounds()
    n, E, K, N = sum(COUNTS), len(COUNTS), 128, 72
    x, w1, w3 = _expert_rows(K), torch.randn(E, N, K), torch.randn(E, N, K)
    gate, up, h = grouped_mm.gate_up_swiglu(x, w1, w3, offs)
    for got, w in ((gate, w1), (up, w3)):
        want = torch.cat([x[s:t] @ w[e].t() for e, (s, t) in enumerate(bounds)])
        assert rel_err(got[:n], want) < 1e-5, rel_err(got[:n], want)
    assert rel_err(h[:n], swiglu(gate[:n], up[:n])) < 1e-5, rel_err(h[:n], swiglu(gate[:n], up[:n]))
    grad_h = torch.randn(n + 40, N)  # past the experts' rows too: the backward's pass is elementwise over all
    got, want = grouped_mm.swiglu_backward(gate, up, grad_h), swiglu_backward(gate, up, grad_h)
    for a, b in zip(got, want):
        assert rel_err(a[:n], b[:n]) < 1e-5, rel_err(a[:n], b[:n])
    empty = torch.zeros(0, N)  # a rank given no tokens
    assert [t.shape for t in grouped_mm.swiglu_backward(empty, empty, empty)] == [(0, N), (0, N)]


def grouped_wgrad() -> None:
    """grouped_wgrad.grouped_wgrad_: out[e] += a[rows of e]^T b[rows of e], through TMA descriptors and pointers."""
    from deepseek_pt.engine.grouped_wgrad import grouped_wgrad_

    offs, bounds = _bounds()
    K, N = 200, 72
    a, b = _expert_rows(K, stride_cols=2 * K), _expert_rows(N)
    for use_tma in (True, False):
        out = torch.randn(len(COUNTS), K, N)
        want = out.clone()
        for e, (start, end) in enumerate(bounds):
            want[e] += a[start:end].t() @ b[start:end]
        grouped_wgrad_(out, a, b, offs, use_tma=use_tma)
        assert rel_err(out, want) < 1e-5, (use_tma, rel_err(out, want))
        before = out.clone()
        grouped_wgrad_(out, a[:0], b[:0], torch.zeros_like(offs), use_tma=use_tma)  # a rank given no tokens
        assert torch.equal(out, before)


def moe_dispatch() -> None:
    """moe_dispatch's two kernels: each padded row its pair's token row (times the score; the score's gradient as
    a dot product), and each token the sum of its top-k rows (times the scores)."""
    from deepseek_pt.engine.moe_dispatch import _rows_from_tokens, _tokens_from_rows

    tokens, top_k, dim = 7, 3, 1100  # dim past one 1024-column block
    x, scores = torch.randn(tokens, dim), torch.rand(tokens, top_k)
    pairs = torch.randperm(tokens * top_k)
    row_pair = torch.cat([pairs, torch.full((5,), -1)])[torch.randperm(tokens * top_k + 5)]  # padding rows: -1
    pair_row = torch.empty(tokens * top_k, dtype=torch.long)
    pair_row[row_pair[row_pair >= 0]] = (row_pair >= 0).nonzero().squeeze(1)
    token_of = torch.where(row_pair >= 0, row_pair // top_k, 0)
    padding = (row_pair < 0)[:, None]
    rows, _ = _rows_from_tokens(x, row_pair, top_k)
    assert torch.equal(rows, torch.where(padding, 0.0, x[token_of]))
    grad_rows = torch.randn(row_pair.numel(), dim)
    scaled, dots = _rows_from_tokens(x, row_pair, top_k, scores, grad_rows)
    score_of = torch.where(row_pair >= 0, scores.flatten()[row_pair.clamp(min=0)], 0.0)
    torch.testing.assert_close(scaled, torch.where(padding, 0.0, x[token_of] * score_of[:, None]))
    want_dots = (x[token_of] * grad_rows).sum(1)[pair_row].view(tokens, top_k)
    torch.testing.assert_close(dots, want_dots, rtol=1e-5, atol=1e-4)
    summed = _tokens_from_rows(grad_rows, pair_row, top_k, scores)
    want = (grad_rows[pair_row].view(tokens, top_k, dim) * scores[..., None]).sum(1)
    torch.testing.assert_close(summed, want, rtol=1e-5, atol=1e-5)


def weight_casts() -> None:
    """fp8_weight_casts.cast_weight_layouts: two weights stacked along N, rows and columns off the tiles, an all-zero
    row, an outlier column shared by both sources' rows; the scales and both layouts as quantize_rows gives them.
    The values are e4m3's already, so every cast is exact: the interpreter's own e4m3 rounding (numpy's) carries
    wrongly into the next power of two, which the compiled kernels' does not (their GPU test is bit for bit)."""
    from deepseek_pt.engine.fp8_experts import quantize_rows
    from deepseek_pt.engine.fp8_weight_casts import cast_weight_layouts

    w1, w3 = (torch.randn(3, n, 200).to(torch.float8_e4m3fn).float() for n in (70, 50))
    w1[1, 5] = 0
    w3[2, :, 7] *= 32
    w = torch.cat([w1, w3], dim=1)
    got = cast_weight_layouts([w1, w3])
    want = (*quantize_rows(w), *quantize_rows(w.mT.contiguous()))
    for name, a, b in zip(("q", "scale", "q_t", "t_scale"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, (name, a.shape, b.shape)
        assert torch.equal(a.float(), b.float()), name


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1: the kernels are CPU tensors here"
    torch.manual_seed(0)
    globals()[sys.argv[1]]()
    print(f"{sys.argv[1]}: ok")
