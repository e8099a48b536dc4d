"""MLA's attention (q/k 192 wide, v 128, causal, bf16) through each SDPA kernel, with torch's deterministic algorithms
off and on (strict): GPU time of a forward and backward, and whether two backward passes over the same inputs give
the same gradients to the bit. What train.deterministic's attention should run on (docs/benchmarks.md).

    python3 bench/sdpa_backends.py [--batch 4] [--seq 2048] [--heads 16] [--iters 10]

Kernels: cudnn, efficient and math as SDPA runs them on q/k 192 with v 128, and flash-padded: the model's
`padded_flash_attention` (train.deterministic's), FlashAttention-2 on v zero-padded to q/k's width (it takes only
equal widths), the output's first 128 columns kept (the padding's gradient is dropped with them; math where flash
refuses, as in training). A kernel SDPA refuses in a mode (cuDNN under strict deterministic algorithms) is reported
as refused, with SDPA's reason. Last, one JSON line."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deepseek_pt.model.mla import padded_flash_attention  # noqa: E402

KERNELS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
           "flash-padded": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def attention(kernel: str, q, k, v) -> torch.Tensor:
    if kernel == "flash-padded":
        return padded_flash_attention(q, k, v)
    with sdpa_kernel([KERNELS[kernel]]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def gradients(kernel: str, q, k, v, grad_out) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(attention(kernel, q, k, v), (q, k, v), grad_out)


def measure(kernel: str, inputs: tuple[torch.Tensor, ...], iters: int) -> dict:
    try:
        first = gradients(kernel, *inputs)
    except RuntimeError as e:  # SDPA found no kernel it may run here
        return {"refused": str(e).splitlines()[0][:200]}
    second = gradients(kernel, *inputs)
    differ = {name: int((a != b).sum()) for name, a, b in zip(("dq", "dk", "dv"), first, second, strict=True)}
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        gradients(kernel, *inputs)
    end.record()
    end.synchronize()
    return {"ms": start.elapsed_time(end) / iters, "values_differing": differ,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--qk-dim", type=int, default=192)
    p.add_argument("--v-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(width: int) -> torch.Tensor:
        return torch.randn(args.batch, args.heads, args.seq, width, device="cuda", dtype=torch.bfloat16,
                           generator=gen).requires_grad_()

    q, k, v = randn(args.qk_dim), randn(args.qk_dim), randn(args.v_dim)
    inputs = (q, k, v, torch.randn_like(v, requires_grad=False))
    with torch.no_grad():
        reference = attention("math", q.float(), k.float(), v.float())
    results = {}
    for mode in ("off", "strict"):
        torch.use_deterministic_algorithms(mode == "strict")
        for kernel in KERNELS:
            torch.cuda.reset_peak_memory_stats()
            r = measure(kernel, inputs, args.iters)
            if "ms" in r:
                with torch.no_grad():
                    out = attention(kernel, q, k, v).float()
                r["rel_err_vs_fp32"] = ((out - reference).norm() / reference.norm()).item()
            results[f"{kernel}/{mode}"] = r
            shown = (f"{r['ms']:8.3f} ms  differing values between two backwards {r['values_differing']}  "
                     f"peak {r['peak_gib']:.1f} GiB  rel err {r['rel_err_vs_fp32']:.1e}"
                     if "ms" in r else f"refused: {r['refused']}")
            print(f"{kernel:13} deterministic {mode:6} {shown}", flush=True)
    print(json.dumps({"shape": vars(args), "results": results}))


if __name__ == "__main__":
    main()
