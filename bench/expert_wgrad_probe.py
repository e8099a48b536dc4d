"""What gradient accumulation costs the routed experts' weight gradients, and whether one kernel can fold the add
into the GEMM: bench-2b's expert shapes, uneven expert-sorted groups as AutoEP hands them over.

Under `parallel.coalesce_grad_reduction` every micro-step's expert weight gradients (1.66B of bench-2b's 2.0B
parameters) are written by a grouped GEMM and then added onto the parameter's gradient in a pass of their own.
For each weight-gradient GEMM (gate/up: dgate^T x, down: dy^T h, reduced over each expert's rows) this times:
    aten            torch._grouped_mm alone (CUTLASS), the GEMM floor
    aten + add_     what autograd does: the GEMM, then grad += result
    inductor        the GEMM compiled with max-autotune (Triton grouped template against aten)
    inductor add_   grad.add_(GEMM) compiled with max-autotune, Triton only: the add as the template's epilogue?
    inductor sum    grad + GEMM, the same out of place (a new gradient tensor)
    ours add        engine/grouped_wgrad.py: the Triton kernel that adds into grad in its epilogue (training's,
                    under parallel.expert_grads_in_place), at its default tile shape and others
with the kernels each compiled add ran as (one kernel: the add was fused into the GEMM). Then the whole expert
SwiGLU forward and backward, AutoEP's layer and ours adding in place, with no gradients yet (a step's first
micro-step) and accumulating (every later one).

    python bench/expert_wgrad_probe.py [--tokens 8192] [--no-inductor] [--layer-only]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.fp8_gemm_probe import bench, expert_rows, kernel_table, rel_err
from deepseek_pt.engine.grouped_wgrad import grouped_wgrad_

# Tile shapes swept for engine/grouped_wgrad.py: (BLOCK_K, BLOCK_N, BLOCK_R, warps, stages), loads through TMA?
SWEEP = [(None, None), ((128, 128, 32, 4, 4), False), ((128, 128, 32, 4, 3), True), ((128, 128, 32, 4, 5), True),
         ((128, 128, 64, 4, 3), True), ((128, 256, 32, 8, 4), True), ((128, 128, 32, 8, 4), True),
         ((64, 128, 32, 4, 4), True), ((128, 64, 32, 4, 4), True)]


def show(name: str, label: str, ms: float, flops: int, err: float | None = None) -> None:
    note = f" | rel err {err:.1e}" if err is not None else ""
    print(f"   wgrad {name:9} {label:37} {ms:6.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s{note}", flush=True)


def ours(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, flops: int, grad: torch.Tensor,
         sum_ref: torch.Tensor) -> None:
    """engine/grouped_wgrad.py's kernel adding into `grad`, at each tile shape of SWEEP (None: its default)."""
    for config, tma in SWEEP:
        g = grad.clone()
        grouped_wgrad_(g, a, b, offs, config=config, use_tma=tma)
        err = rel_err(g, sum_ref)
        ms = bench(lambda g=g, config=config, tma=tma: grouped_wgrad_(g, a, b, offs, config=config, use_tma=tma))
        show(name, "ours add " + ("default" if config is None else f"{config}{' tma' if tma else ''}"), ms, flops, err)


def wgrad(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, E: int, inductor: bool) -> None:
    """Weight gradient [E, a.cols, b.cols] = a[e]^T b[e] over each expert's rows, five ways and ours."""
    n = int(offs[-1])
    flops = 2 * n * a.shape[1] * b.shape[1]
    gemm = lambda: torch._grouped_mm(a.t(), b, offs=offs)
    ref = gemm().float()
    grad = torch.randn(E, a.shape[1], b.shape[1], device="cuda", dtype=torch.bfloat16)
    sum_ref = grad.float() + ref

    def accumulate(g: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> None:
        g.add_(torch._grouped_mm(a.t(), b, offs=offs))

    print(f"   wgrad {name}: {E} experts x ~{n // E} rows -> [{a.shape[1]} x {b.shape[1]}] each", flush=True)
    g = grad.clone()
    for label, fn in (("aten", gemm), ("aten + add_", lambda: accumulate(g, a, b, offs))):
        show(name, label, bench(fn), flops)
    ours(name, a, b, offs, flops, grad, sum_ref)
    if not inductor:
        return

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
        "inductor": (lambda: compiled_gemm(a, b, offs), rel_err(compiled_gemm(a, b, offs), ref)),
        "inductor add_": (lambda: compiled_add(g, a, b, offs), rel_err(g, sum_ref)),
        "inductor sum": (lambda: compiled_sum(grad, a, b, offs), sum_err),
    }
    for label, (fn, err) in variants.items():
        show(name, label, bench(fn), flops, err)
    for label, fn in (("add_", lambda: compiled_add(g, a, b, offs)), ("sum", lambda: compiled_sum(grad, a, b, offs))):
        gpu_ms, top = kernel_table(fn, 3)
        print(f"   -- inductor {label}: {gpu_ms:.3f} ms of GPU time, kernels: "
              + "; ".join(f"{k[:60]} {ms:.3f} ms {c}x" for k, ms, c in top), flush=True)


def expert_swiglu(counts: torch.Tensor, M: int, E: int, dim: int, hidden: int) -> None:
    """The bf16 expert SwiGLU, forward and backward, without gradients on the weights yet (a step's first
    micro-step) and accumulating (every later one): AutoEP's layer, and engine/expert_grads.py's RoutedExperts
    (the same parameters) adding its weight gradients in place, then also with its forward and input gradients
    through engine/grouped_mm.py's Triton kernels (the SwiGLU in the gate and up GEMM's epilogue)."""
    from deepspeed.moe.ep_experts import GroupedExperts

    from deepseek_pt.engine.expert_grads import convert_routed_experts

    x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
    layer = GroupedExperts(dim, hidden, E, disable_triton_grouped_mm=True).cuda().bfloat16()
    for w in layer.parameters():
        torch.nn.init.normal_(w, std=0.02)
    model = torch.nn.Sequential(layer)

    def step(accumulate: bool):
        if not accumulate:
            layer.zero_grad(set_to_none=True)
        layer(x, counts).backward(dy)

    for label in ("AutoEP", "in place", "+ Triton"):
        if label == "in place":
            convert_routed_experts(model, grads_in_place=True, triton_gemms=False)
        layer.triton_gemms = label == "+ Triton"
        for accumulate in (False, True):
            step(True)
            ms = bench(lambda accumulate=accumulate: step(accumulate), calls=5)
            gpu_ms, top = kernel_table(lambda accumulate=accumulate: step(accumulate), 4)
            print(f"   expert SwiGLU fwd+bwd, {label:8}, weight grads {'accumulating' if accumulate else 'new         '} "
                  f"{ms:6.3f} ms ({gpu_ms:.3f} ms GPU): " + "; ".join(f"{k[:40]} {t:.3f} ms {c}x" for k, t, c in top),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step (bench-2b: 2048 x 4)")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help="skip the max-autotune variants (about a minute of autotuning)")
    parser.add_argument("--layer-only", action="store_true", help="only the whole expert SwiGLU, not each GEMM")
    args = parser.parse_args()
    E, top_k, dim, hidden = 64, 6, 2048, 1408  # configs/bench-2b.yaml's routed experts
    counts, offs, M = expert_rows(args.tokens, E, top_k, torch.Generator("cuda").manual_seed(0))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.tokens} tokens x top-{top_k} over {E} "
          f"experts: {int(offs[-1])} rows, {M} with AutoEP's padding", flush=True)
    rows = lambda cols: torch.randn(M, cols, device="cuda", dtype=torch.bfloat16)
    if args.layer_only:
        return expert_swiglu(counts, M, E, dim, hidden)
    wgrad("gate, up", rows(2 * hidden)[:, :hidden], rows(dim), offs, E, args.inductor)  # a half of d(gate_up)
    wgrad("down", rows(dim), rows(hidden), offs, E, args.inductor)
    expert_swiglu(counts, M, E, dim, hidden)


if __name__ == "__main__":
    main()
