"""What a MoE layer's routed rows cost outside the experts, AutoEP's way and ours (`parallel.fused_moe_dispatch`):
bench-2b's shape (8,192 tokens of dim 2048, 64 experts, top-6), routing from random router scores, the experts
replaced by the identity so that only the token movement is timed. Forward, and forward + backward, of:
    autoep   x[pair // top_k], permute into padded expert groups, unpermute, AutoEP's fused top-k sum
             (auto_ep_layer.AutoEPMoELayer._forward at expert parallelism 1, as training ran it)
    ours     engine/moe_dispatch.py: the tokens gathered straight into the padded groups, the sum read straight
             from them
each with the routing plan it builds (argsorts, permutation indices). Checks that both give the same output. Then
ours kernel by kernel (dispatch and combine, forward and backward), in GB/s of the bytes each must move, at
moe_dispatch.py's tile settings and others, and the plan alone.

    python bench/moe_dispatch_probe.py [--tokens 8192] [--dim 2048] [--experts 64] [--top-k 6]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from deepspeed.module_inject.auto_ep_layer import (
    permute_by_local_expert,
    unpermute_by_local_expert,
)
from deepspeed.moe import ep_kernels
from deepspeed.ops.triton_ops.autoep_fused_token_ops import fused_weighted_restore

from bench.fp8_gemm_probe import bench
from deepseek_pt.engine import moe_dispatch
from deepseek_pt.engine.moe_dispatch import combine, dispatch, plan_dispatch

# (MAX_BLOCK, NUM_WARPS) of engine/moe_dispatch.py swept; the first is its default.
SWEEP = [(moe_dispatch.MAX_BLOCK, moe_dispatch.NUM_WARPS), (2048, 4), (2048, 8), (512, 4), (1024, 8), (512, 2)]


def autoeps(x, scores, selected, counts):
    order = torch.argsort(selected.reshape(-1), stable=True)
    rows, permuted, _, n = permute_by_local_expert(x[order // selected.shape[1]], counts)
    y = unpermute_by_local_expert(rows, permuted, n)
    return fused_weighted_restore(y, scores, order, selected.shape[1], (1, *x.shape)).reshape(x.shape)


def ours(x, scores, selected, counts):
    plan = plan_dispatch(selected, counts, ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M)
    return combine(dispatch(x, plan), scores, plan)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=6)
    args = p.parse_args()
    torch.manual_seed(0)
    scores, selected = torch.rand(args.tokens, args.experts, device="cuda").sigmoid().topk(args.top_k, dim=-1)
    counts = torch.bincount(selected.reshape(-1), minlength=args.experts)
    x = torch.randn(args.tokens, args.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    scores.requires_grad_()
    grad_out = torch.randn_like(x)
    outputs = {}
    print(f"dispatch + combine, {args.tokens} tokens x top-{args.top_k} of {args.experts} experts, dim {args.dim}, "
          "identity experts (ms per MoE layer)", flush=True)
    for name, path in (("autoep", autoeps), ("ours", ours)):
        outputs[name] = path(x, scores, selected, counts)
        with torch.no_grad():
            forward = bench(lambda path=path: path(x, scores, selected, counts))
        both = bench(lambda path=path: path(x, scores, selected, counts).backward(grad_out))
        print(f"   {name:7} forward {forward:6.3f}   forward + backward {both:6.3f}", flush=True)
    print(f"   outputs equal: {torch.equal(outputs['autoep'], outputs['ours'])}", flush=True)
    kernels(x.detach(), scores.detach(), selected, counts)


def kernels(x, scores, selected, counts):
    """Each of moe_dispatch.py's four kernel calls alone, GB/s of the rows it must read and write."""
    plan = plan_dispatch(selected, counts, ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M)
    rows = moe_dispatch._rows_from_tokens(x, plan.row_pair, plan.top_k)[0]
    n_rows, n_pairs, row_bytes = plan.row_pair.numel(), plan.pair_row.numel(), x.shape[1] * x.element_size()
    calls = {  # name: (call, bytes read + written)
        "dispatch": (lambda: moe_dispatch._rows_from_tokens(x, plan.row_pair, plan.top_k),
                     (n_pairs + n_rows) * row_bytes),
        "dispatch backward": (lambda: moe_dispatch._tokens_from_rows(rows, plan.pair_row, plan.top_k),
                              (n_pairs + x.shape[0]) * row_bytes),
        "combine": (lambda: moe_dispatch._tokens_from_rows(rows, plan.pair_row, plan.top_k, scores),
                    (n_pairs + x.shape[0]) * row_bytes),
        "combine backward": (lambda: moe_dispatch._rows_from_tokens(x, plan.row_pair, plan.top_k, scores, rows),
                             (n_pairs * 2 + n_rows) * row_bytes),
    }
    ms = bench(lambda: plan_dispatch(selected, counts, ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M))
    print(f"   plan_dispatch {ms:6.3f} ms", flush=True)
    default = SWEEP[0]
    for block, warps in SWEEP:
        moe_dispatch.MAX_BLOCK, moe_dispatch.NUM_WARPS = block, warps
        line = []
        for name, (call, nbytes) in calls.items():
            ms = bench(call)
            line.append(f"{name} {ms:6.3f} ms {nbytes / ms / 1e6:5.0f} GB/s")
        print(f"   block {block:4} warps {warps}: " + " | ".join(line), flush=True)
    moe_dispatch.MAX_BLOCK, moe_dispatch.NUM_WARPS = default


if __name__ == "__main__":
    main()
