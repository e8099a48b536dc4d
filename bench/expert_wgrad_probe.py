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
    fp8 cast        engine/fp8_wgrad.py's cast of each operand per column and 128-row tile (fp8.expert_weight_grads)
    fp8 add         its FP8 GEMM adding into grad, at its default tile shape and others (relative error against the
                    bf16 sum)
with the kernels each compiled add ran as (one kernel: the add was fused into the GEMM). Then the whole expert
SwiGLU forward and backward, AutoEP's layer and ours adding in place, with no gradients yet (a step's first
micro-step) and accumulating (every later one), and the FP8 experts (fp8.experts) with their weight gradients in
bf16 and in FP8.

    python bench/expert_wgrad_probe.py [--tokens 8192] [--no-inductor] [--fp8-only]
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
         sum_ref: torch.Tensor, sweep: bool = True) -> None:
    """engine/grouped_wgrad.py's kernel adding into `grad`, at each tile shape of SWEEP (None: its default) or only
    at its default."""
    for config, tma in SWEEP if sweep else SWEEP[:1]:
        g = grad.clone()
        grouped_wgrad_(g, a, b, offs, config=config, use_tma=tma)
        err = rel_err(g, sum_ref)
        ms = bench(lambda g=g, config=config, tma=tma: grouped_wgrad_(g, a, b, offs, config=config, use_tma=tma))
        show(name, "ours add " + ("default" if config is None else f"{config}{' tma' if tma else ''}"), ms, flops, err)


# (BLOCK_R, BLOCK_C, warps, stages) swept for engine/fp8_wgrad_kernels.py's GEMM (None: its default)
FP8_SWEEP = [None, (64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 256, 4, 3),
             (128, 256, 8, 3)]


def unscaled_ceiling(a_tiles, b_tiles, offs: torch.Tensor, out: torch.Tensor, config) -> None:
    """The same FP8 tiles through the same loop, without the per-tile scaling: what the GEMM costs when its sum
    never leaves the tensor cores' accumulator (a wrong gradient; the promotion's price)."""
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    from deepseek_pt.engine.grouped_mm import expert_tiles

    @triton.jit
    def kernel(a, b, out_ptr, offs_ptr, R, C, E: tl.constexpr, E_POW2: tl.constexpr, TILE: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        expert, tile = tl.program_id(1), tl.program_id(0)
        tiles_c = tl.cdiv(C, BLOCK_C)
        r0, c0 = (tile // tiles_c) * BLOCK_R, (tile % tiles_c) * BLOCK_C
        _, _, tiles, first_tiles = expert_tiles(offs_ptr, E, E_POW2, TILE)
        mine = tl.arange(0, E_POW2) == expert
        first, count = tl.sum(tl.where(mine, first_tiles, 0), 0), tl.sum(tl.where(mine, tiles, 0), 0)
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for p in range(first, first + count):
            acc = tl.dot(a.load([r0, p * TILE]), tl.trans(b.load([c0, p * TILE])), acc)
        rs, cs = r0 + tl.arange(0, BLOCK_R), c0 + tl.arange(0, BLOCK_C)
        out = out_ptr + expert.to(tl.int64) * R * C + rs[:, None] * C + cs[None, :]
        tl.store(out, acc.to(tl.bfloat16), mask=(rs[:, None] < R) & (cs[None, :] < C))

    E, R, C = out.shape
    block_r, block_c, warps, stages = config
    a_q, b_q = TensorDescriptor.from_tensor(a_tiles.q, [block_r, 128]), TensorDescriptor.from_tensor(b_tiles.q, [block_c, 128])
    kernel[(triton.cdiv(R, block_r) * triton.cdiv(C, block_c), E)](
        a_q, b_q, out, offs, R, C, E=E, E_POW2=triton.next_power_of_2(E), TILE=128, BLOCK_R=block_r,
        BLOCK_C=block_c, num_warps=warps, num_stages=stages)


def fp8(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, flops: int, grad: torch.Tensor,
        sum_ref: torch.Tensor) -> None:
    """engine/fp8_wgrad.py: the casts of both operands, then the FP8 GEMM adding into `grad` at each FP8_SWEEP shape."""
    from deepseek_pt.engine import fp8_wgrad

    for label, t in (("a", a), ("b", b)):
        ms = bench(lambda t=t: fp8_wgrad.cast_tiles(t, offs, False))
        moved = t[:int(offs[-1])].numel() * 3  # bf16 in, e4m3 out
        print(f"   wgrad {name:9} fp8 cast of {label} [{t.shape[1]} columns]      {ms:6.3f} ms "
              f"{moved / ms / 1e6:6.0f} GB/s", flush=True)
    a_tiles, b_tiles = fp8_wgrad.cast_tiles(a, offs, False), fp8_wgrad.cast_tiles(b, offs, False)
    weight = torch.zeros_like(grad, requires_grad=True)
    for config in FP8_SWEEP:
        weight.grad = grad.clone()
        fp8_wgrad.weight_grad(weight, a_tiles, b_tiles, offs, True, False, config)
        err = rel_err(weight.grad, sum_ref)
        ms = bench(lambda config=config: fp8_wgrad.weight_grad(weight, a_tiles, b_tiles, offs, True, False, config))
        show(name, f"fp8 add {'default' if config is None else config}", ms, flops, err)
    out = torch.empty_like(grad)
    for config in ((64, 128, 4, 4), (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3)):
        ms = bench(lambda config=config: unscaled_ceiling(a_tiles, b_tiles, offs, out, config))
        show(name, f"fp8 unscaled ceiling {config}", ms, flops)


def wgrad(name: str, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor, E: int, inductor: bool,
          fp8_only: bool) -> None:
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
    fp8(name, a, b, offs, flops, grad, sum_ref)
    if fp8_only:
        ours(name, a, b, offs, flops, grad, sum_ref, sweep=False)
        return
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


def expert_swiglu(counts: torch.Tensor, M: int, E: int, dim: int, hidden: int, fp8_only: bool) -> None:
    """The expert SwiGLU, forward and backward, without gradients on the weights yet (a step's first micro-step) and
    accumulating (every later one): in bf16 AutoEP's layer, and engine/expert_grads.py's RoutedExperts (the same
    parameters) adding its weight gradients in place, then also with its forward and input gradients through
    engine/grouped_mm.py's Triton kernel; in FP8 (fp8.experts, on that kernel, in place) with the weight gradients in
    bf16 and in FP8 (fp8.expert_weight_grads)."""
    from deepspeed.moe.ep_experts import GroupedExperts

    from deepseek_pt.engine.expert_grads import convert_routed_experts
    from deepseek_pt.engine.fp8_experts import convert_experts_to_fp8

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

    labels = ("AutoEP", "in place", "+ Triton", "FP8", "FP8 wgrad")
    for label in labels[3 if fp8_only else 0:]:
        if label == "in place":
            convert_routed_experts(model, grads_in_place=True, triton_gemms=False)
        if label == "FP8":
            convert_experts_to_fp8(model, lambda: 0, emulate=False)
            convert_routed_experts(model, grads_in_place=True, triton_gemms=True)
        layer.triton_gemms = label != "in place"
        layer.fp8_weight_grads = label == "FP8 wgrad"
        for accumulate in (False, True):
            step(True)
            ms = bench(lambda accumulate=accumulate: step(accumulate), calls=5)
            gpu_ms, top = kernel_table(lambda accumulate=accumulate: step(accumulate), 6)
            print(f"   expert SwiGLU fwd+bwd, {label:9}, weight grads {'accumulating' if accumulate else 'new         '} "
                  f"{ms:6.3f} ms ({gpu_ms:.3f} ms GPU): " + "; ".join(f"{k[:40]} {t:.3f} ms {c}x" for k, t, c in top),
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step (bench-2b: 2048 x 4)")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help="skip the max-autotune variants (about a minute of autotuning)")
    parser.add_argument("--fp8-only", action="store_true", help="only the FP8 weight gradients and FP8 experts")
    args = parser.parse_args()
    E, top_k, dim, hidden = 64, 6, 2048, 1408  # configs/bench-2b.yaml's routed experts
    counts, offs, M = expert_rows(args.tokens, E, top_k, torch.Generator("cuda").manual_seed(0))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {args.tokens} tokens x top-{top_k} over {E} "
          f"experts: {int(offs[-1])} rows, {M} with AutoEP's padding", flush=True)
    rows = lambda cols: torch.randn(M, cols, device="cuda", dtype=torch.bfloat16)
    wgrad("gate, up", rows(2 * hidden)[:, :hidden], rows(dim), offs, E, args.inductor, args.fp8_only)  # half d(gate_up)
    wgrad("down", rows(dim), rows(hidden), offs, E, args.inductor, args.fp8_only)
    expert_swiglu(counts, M, E, dim, hidden, args.fp8_only)


if __name__ == "__main__":
    main()
