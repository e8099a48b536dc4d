"""What gradient accumulation costs the routed experts' weight gradients, and whether one kernel can fold the add
into the GEMM: bench-2b's expert shapes, uneven expert-sorted groups as AutoEP hands them over.

Under `parallel.coalesce_grad_reduction` every micro-step's expert weight gradients (1.66B of bench-2b's 2.0B
parameters) are written by a grouped GEMM and then added onto the parameter's gradient in a pass of their own.
For each weight-gradient GEMM (gate/up: dgate^T x, down: dy^T h, reduced over each expert's rows) this times:
    aten            torch._grouped_mm alone (CUTLASS), the GEMM floor
    aten + add_     what autograd does now: the GEMM, then grad += result
    inductor        the GEMM compiled with max-autotune (Triton grouped template against aten)
    inductor add_   grad.add_(GEMM) compiled with max-autotune, Triton only: the add as the template's epilogue?
    inductor sum    grad + GEMM, the same out of place (a new gradient tensor)
with the kernels each compiled add ran as (one kernel: the add was fused into the GEMM). Then the whole expert
SwiGLU forward and backward (AutoEP's bf16 grouped GEMMs) with no gradients yet (a step's first micro-step) and
accumulating (every later one).

    python bench/expert_wgrad_probe.py [--tokens 8192]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.fp8_gemm_probe import bench, expert_rows, kernel_table, rel_err


def wgrad(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, E: int) -> None:
    """Weight gradient [E, a.cols, b.cols] = a[e]^T b[e] over each expert's rows, five ways."""
    n = int(offs[-1])
    flops = 2 * n * a.shape[1] * b.shape[1]
    gemm = lambda: torch._grouped_mm(a.t(), b, offs=offs)
    ref = gemm().float()
    grad = torch.randn(E, a.shape[1], b.shape[1], device="cuda", dtype=torch.bfloat16)
    sum_ref = grad.float() + ref

    def accumulate(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
        g.add_(torch._grouped_mm(a.t(), b, offs=offs))

    compiled_gemm = torch.compile(lambda a, b, o: torch._grouped_mm(a.t(), b, offs=o),
                                  mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
    with torch._inductor.config.patch(max_autotune_gemm_backends="TRITON"):
        compiled_add = torch.compile(accumulate, mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
        g = grad.clone()
        compiled_add(g, a, b, offs)
        compiled_sum = torch.compile(lambda g, a, b, o: g + torch._grouped_mm(a.t(), b, offs=o),
                                     mode="max-autotune-no-cudagraphs", fullgraph=True, dynamic=False)
        sum_err = rel_err(compiled_sum(grad, a, b, offs), sum_ref)  # compiles under the patch
    variants = {
        "aten": (gemm, None),
        "aten + add_": (lambda: accumulate(g, a, b, offs), None),
        "inductor": (lambda: compiled_gemm(a, b, offs), rel_err(compiled_gemm(a, b, offs), ref)),
        "inductor add_": (lambda: compiled_add(g, a, b, offs), rel_err(g, sum_ref)),
        "inductor sum": (lambda: compiled_sum(grad, a, b, offs), sum_err),
    }
    for label, (fn, err) in variants.items():
        ms = bench(fn)
        note = f"| rel err {err:.1e}" if err is not None else ""
        print(f"   wgrad {name:9} {E}x[~{n // E} rows]->[{a.shape[1]}x{b.shape[1]}] {label:15} {ms:6.3f} ms "
              f"{flops / ms / 1e9:6.0f} TFLOP/s {note}", flush=True)
    for label, fn in (("add_", lambda: compiled_add(g, a, b, offs)), ("sum", lambda: compiled_sum(grad, a, b, offs))):
        gpu_ms, top = kernel_table(fn, 3)
        print(f"   -- inductor {label}: {gpu_ms:.3f} ms of GPU time, kernels: "
              + "; ".join(f"{k[:60]} {ms:.3f} ms {c}x" for k, ms, c in top), flush=True)


def expert_swiglu(counts: torch.Tensor, M: int, E: int, dim: int, hidden: int) -> None:
    """AutoEP's bf16 expert SwiGLU, forward and backward, without and with gradients already on the weights."""
    from deepspeed.moe.ep_experts import _run_experts_grouped_mm

    x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
    w1, w3, w2 = [torch.randn(E, *s, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_()
                  for s in ((hidden, dim), (hidden, dim), (dim, hidden))]

    def step(accumulate: bool):
        if not accumulate:
            for w in (w1, w3, w2):
                w.grad = None
        _run_experts_grouped_mm(w1, w2, w3, x, counts).backward(dy)

    for accumulate in (False, True):
        step(True)
        ms = bench(lambda: step(accumulate), calls=5)
        gpu_ms, top = kernel_table(lambda: step(accumulate), 4)
        print(f"   expert SwiGLU fwd+bwd, weight grads {'accumulating' if accumulate else 'new         '} {ms:6.3f} ms "
              f"({gpu_ms:.3f} ms GPU): " + "; ".join(f"{k[:50]} {t:.3f} ms {c}x" for k, t, c in top), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step (bench-2b: 2048 x 4)")
    args = parser.parse_args()
    E, top_k, dim, hidden = 64, 6, 2048, 1408  # configs/bench-2b.yaml's routed experts
    counts, offs, M = expert_rows(args.tokens, E, top_k, torch.Generator("cuda").manual_seed(0))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.tokens} tokens x top-{top_k} over {E} "
          f"experts: {int(offs[-1])} rows, {M} with AutoEP's padding", flush=True)
    rows = lambda cols: torch.randn(M, cols, device="cuda", dtype=torch.bfloat16)
    wgrad("gate, up", rows(hidden), rows(dim), offs, E)
    wgrad("down", rows(dim), rows(hidden), offs, E)
    expert_swiglu(counts, M, E, dim, hidden)


if __name__ == "__main__":
    main()
