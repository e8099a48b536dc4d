"""What FP8 GEMMs buy on this GPU at the bench-2b shapes and at DeepSeek-V3's dense widths (bench-v3-dense):
bf16 against FP8 (tensorwise, rowwise, DeepSeek-style blockwise 1x128 x 128x128) for the dense linears, and
bf16 against rowwise FP8 grouped GEMM (with and without fast accumulation) for bench-2b's routed experts. The
forward GEMM alone (weights pre-quantized) and with the compiled quantization of its activation. Then
fp8.experts' activation casts (Triton against torch.compile), and the routed experts' whole SwiGLU, forward and
backward: AutoEP's bf16, torchao's FP8, and fp8.experts' own. --shared-only: the shared experts' SwiGLU, forward
and backward, in bf16 and through fp8.shared_experts, in alternating rounds. --attention-only: the same for the
attention half and fp8.attention.

    python bench/fp8_gemm_probe.py [--tokens 8192] [--experts-only | --shared-only | --attention-only [--rounds N]]

Prints one line per (shape, variant): median ms, TFLOP/s, relative error against an fp32 product of
the dequantized operands (blockwise layouts that the library rejects are reported, not fatal).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def bench(fn, calls: int = 20, reps: int = 7) -> float:
    """Median ms per call over `reps` runs of `calls` back-to-back calls: the GPU never waits for the host to
    launch the next call, as in training, so a compiled cast's Python overhead does not count as GPU time."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def kernel_table(fn, top: int, calls: int = 5) -> tuple[float, list[tuple[str, float, int]]]:
    """GPU ms per call, and the `top` heaviest kernels (name, ms per call, launches per call) over `calls` profiled
    calls. Only kernels count: the profiler's aten:: rows repeat the time of the kernels they launch."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [(e.key, e.device_time_total / 1e3 / calls, e.count // calls) for e in prof.key_averages()
               if e.device_time_total > 0 and not e.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))]
    kernels.sort(key=lambda k: -k[1])
    return sum(ms for _, ms, _ in kernels), kernels[:top]


def quant_rows(x: torch.Tensor, block: int | None):
    """e4m3 with one scale per row (block None) or per 1 x block tile; returns (fp8, dequant scales)."""
    xs = x.float() if block is None else x.float().unflatten(-1, (-1, block))
    amax = xs.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)
    q = (xs * (E4M3_MAX / amax)).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), (amax / E4M3_MAX).squeeze(-1)


def quant_blocks(w: torch.Tensor, block: int = 128):
    """e4m3 with one scale per block x block tile of w [N, K]; returns (fp8 [N, K], scales [N/b, K/b])."""
    N, K = w.shape
    t = w.float().view(N // block, block, K // block, block)
    amax = t.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-12)
    q = (t * (E4M3_MAX / amax)).to(torch.float8_e4m3fn).view(N, K)
    return q, (amax / E4M3_MAX).view(N // block, K // block)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def dense(M: int, K: int, N: int, name: str) -> None:
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    flops = 2 * M * K * N
    ref = x.float() @ w.float().t()
    rows = []
    ms = bench(lambda: x @ w.t())
    rows.append(("bf16", ms, ms, rel_err(x @ w.t(), ref)))
    # tensorwise
    sx, sw = x.abs().amax().float() / E4M3_MAX, w.abs().amax().float() / E4M3_MAX
    xq, wq = (x / sx).to(torch.float8_e4m3fn), (w / sw).to(torch.float8_e4m3fn)
    gemm = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    full = lambda: torch._scaled_mm((x / (x.abs().amax().float() / E4M3_MAX)).to(torch.float8_e4m3fn), wq.t(),
                                    scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
    rows.append(("fp8 tensorwise", bench(gemm), bench(full), rel_err(gemm(), ref)))
    # rowwise
    xq, sxr = quant_rows(x, None)
    wq, swr = quant_rows(w, None)
    gemm = lambda: torch._scaled_mm(xq, wq.t(), scale_a=sxr[:, None], scale_b=swr[None, :], out_dtype=torch.bfloat16)
    full = lambda: torch._scaled_mm(quant_rows(x, None)[0], wq.t(), scale_a=sxr[:, None], scale_b=swr[None, :],
                                    out_dtype=torch.bfloat16)
    rows.append(("fp8 rowwise", bench(gemm), bench(full), rel_err(gemm(), ref)))
    # blockwise (DeepSeek-V3): activations in 1x128 tiles, weights in 128x128 blocks. cuBLAS wants both scale
    # tensors outer-dim-major: A's [M, K/128] with strides (1, M), B's [K/128, N/128] with strides (1, K/128).
    if K % 128 == 0 and N % 128 == 0:
        wq, swb = quant_blocks(w)  # scales [N/128, K/128]

        def blockwise(q_x: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
            return F.scaled_mm(q_x, wq.t(), s_x.t().contiguous().t(), F.ScalingType.BlockWise1x128, swb.t(),
                               F.ScalingType.BlockWise128x128, output_dtype=torch.bfloat16)
        xq, sxb = quant_rows(x, 128)
        try:
            err = rel_err(blockwise(xq, sxb), ref)
            rows.append(("fp8 blockwise 1x128 x 128x128", bench(lambda: blockwise(xq, sxb)),
                         bench(lambda: blockwise(*quant_rows(x, 128))), err))
        except (RuntimeError, ValueError) as e:  # a layout or size cuBLAS refuses: say which, go on
            rows.append((f"fp8 blockwise: {type(e).__name__}: {str(e).splitlines()[0][:90]}", None, None, None))
    for label, ms, ms_full, err in rows:
        if ms is None:
            print(f"{name:>10} {M}x{K}x{N}  {label}")
            continue
        print(f"{name:>10} {M}x{K}x{N}  {label:38} gemm {ms:6.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s | "
              f"with quant {ms_full:6.3f} ms | rel err {err:.1e}", flush=True)


def grouped(tokens: int, E: int, top_k: int, K: int, N: int) -> None:
    rows_per_expert = tokens * top_k // E
    M = rows_per_expert * E
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * rows_per_expert
    flops = 2 * M * K * N
    bf = lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    ref = bf().float()
    ms = bench(bf)
    print(f"   experts {E}x[{rows_per_expert}x{K}x{N}]  bf16 grouped_mm {'':22} gemm {ms:6.3f} ms "
          f"{flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
    xq, sx = quant_rows(x, None)
    wq, sw = quant_rows(w, None)  # [E, N, K], scales [E, N]
    # use_fast_accum=False promotes CUTLASS's FP8 partial sums to fp32 every few K-steps (slower, more exact);
    # torchao's MoE training passes True.
    for fast in (False, True):
        try:
            fn = lambda: torch._scaled_grouped_mm(xq, wq.transpose(-2, -1), sx, sw, offs=offs,
                                                  out_dtype=torch.bfloat16, use_fast_accum=fast)
            err = rel_err(fn(), ref)
            ms = bench(fn)
            full = lambda: torch._scaled_grouped_mm(quant_rows(x, None)[0], wq.transpose(-2, -1), sx, sw, offs=offs,
                                                    out_dtype=torch.bfloat16, use_fast_accum=fast)
            print(f"   experts {E}x[{rows_per_expert}x{K}x{N}]  fp8 rowwise scaled_grouped_mm fast_accum={fast!s:5} "
                  f"gemm {ms:6.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s | with quant {bench(full):6.3f} ms | "
                  f"rel err vs bf16 {err:.1e}", flush=True)
        except (RuntimeError, ValueError) as e:
            print(f"   experts: fp8 rowwise scaled_grouped_mm: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


def expert_rows(tokens: int, E: int, top_k: int, generator: torch.Generator | None = None):
    """Expert-sorted rows as AutoEP hands them over: per-expert row counts (multiples of 16, each expert 0.5-1.5x the
    mean load), their offsets, and the row count of AutoEP's permuted buffer (every group padded, the rest zero
    rows)."""
    rows = tokens * top_k
    load = torch.rand(E, device="cuda", generator=generator) + 0.5
    counts = (load / load.sum() * rows / 16).round().int() * 16
    offs = counts.cumsum(0, dtype=torch.int32)
    return counts, offs, int(offs[-1]) + 16 * E


def expert_mlp(tokens: int, E: int, top_k: int, dim: int, hidden: int) -> None:
    """The routed experts' SwiGLU, forward and backward, over expert-sorted rows as AutoEP hands them over (uneven
    groups of multiples of 16 rows, zero padding after): AutoEP's bf16 grouped GEMMs, torchao's FP8 rowwise grouped
    GEMM, and ours (engine/fp8_experts.py) with the step's FP8 weights already cast (every micro-step after an
    optimizer step's first) and with the cast. Then where ours and bf16 spend the GPU's time, per kernel."""
    from deepspeed.moe.ep_experts import _run_experts_grouped_mm
    from torchao.prototype.moe_training.fp8_grouped_mm import _to_fp8_rowwise_then_scaled_grouped_mm as fp8_gmm

    from deepseek_pt.engine.fp8_experts import Fp8ExpertWeights, fp8_expert_swiglu

    counts, offs, M = expert_rows(tokens, E, top_k)
    x = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
    x[int(offs[-1]):] = 0
    w1, w3, w2 = [torch.randn(E, *s, device="cuda", dtype=torch.bfloat16).mul_(0.02).requires_grad_()
                  for s in ((hidden, dim), (hidden, dim), (dim, hidden))]
    dy = torch.randn(M, dim, device="cuda", dtype=torch.bfloat16)
    dy[int(offs[-1]):] = 0
    cast = Fp8ExpertWeights(w1, w3, w2)
    gmm_fp8 = lambda a, w: fp8_gmm(a, w.transpose(-2, -1), offs, pad_token_groups_for_grouped_mm=False)
    variants = {
        "bf16 (AutoEP grouped_mm)": lambda xi: _run_experts_grouped_mm(w1, w2, w3, xi, counts),
        "fp8 torchao rowwise": lambda xi: gmm_fp8(F.silu(gmm_fp8(xi, w1)) * gmm_fp8(xi, w3), w2),
        "fp8 ours, weights cast": lambda xi: fp8_expert_swiglu(xi, w1, w3, w2, offs, cast, False),
        "fp8 ours, + weight cast": lambda xi: fp8_expert_swiglu(xi, w1, w3, w2, offs, Fp8ExpertWeights(w1, w3, w2),
                                                                False),
    }

    def step(run):
        xi = x.detach().requires_grad_()
        y = run(xi)
        return y, torch.autograd.grad(y, [xi, w1, w3, w2], dy)

    n = int(offs[-1])
    ref_y, ref_g = step(variants["bf16 (AutoEP grouped_mm)"])
    flops = 3 * 2 * n * dim * hidden * 3  # three GEMMs, each forward + two backward
    for label, run in variants.items():
        y, g = step(run)
        errs = " ".join(f"{name} {rel_err(a[:n] if i < 2 else a, b[:n] if i < 2 else b):.1e}" for i, (name, a, b) in
                        enumerate(zip(("y", "dx", "dw1", "dw3", "dw2"), (y, *g), (ref_y, *ref_g))))
        ms = bench(lambda: step(run), calls=5)
        print(f"   expert MLP {E}x[~{n // E}x{dim}x{hidden}] fwd+bwd {label:24} {ms:6.3f} ms "
              f"{flops / ms / 1e9:6.0f} TFLOP/s | rel err vs bf16: {errs}", flush=True)
    for label in ("bf16 (AutoEP grouped_mm)", "fp8 ours, weights cast"):
        gpu_ms, top = kernel_table(lambda: step(variants[label]), 14)
        print(f"   -- {label}: {gpu_ms:.3f} ms of GPU time per fwd+bwd, by kernel", flush=True)
        for kernel, ms, launches in top:
            print(f"   {ms:7.3f} ms {launches:3d}x  {kernel[:110]}", flush=True)


def expert_casts(tokens: int, top_k: int, dim: int, hidden: int) -> None:
    """fp8.experts' three activation casts on a step's worth of rows: its Triton kernels (fp8_expert_casts.py)
    against their torch references compiled as the first version ran them, with the bandwidth each reaches."""
    from deepseek_pt.engine import fp8_expert_casts as kernels
    from deepseek_pt.engine import fp8_experts as reference

    M = tokens * top_k
    x, dy = (torch.randn(M, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    gate_up = torch.randn(M, 2 * hidden, device="cuda", dtype=torch.bfloat16)
    grad_h = torch.randn(M, hidden, device="cuda", dtype=torch.bfloat16)
    cases = [  # name, args, bytes read and written
        ("quantize x", "quantize_rows", (x,), M * dim * 3),
        ("swiglu + quantize h", "swiglu_quantized", (gate_up,), M * hidden * (4 + 2 + 1)),
        ("swiglu backward + quantize", "swiglu_backward_quantized", (gate_up, grad_h), M * hidden * (4 + 2 + 4 + 2)),
    ]
    for name, fn, args, nbytes in cases:
        compiled = torch.compile(getattr(reference, fn), fullgraph=True, dynamic=False)
        for label, run in (("torch.compile", compiled), ("triton", getattr(kernels, fn))):
            ms = bench(lambda: run(*args))
            print(f"   cast {name:28} {label:13} {ms:6.3f} ms {nbytes / ms / 1e6:6.0f} GB/s", flush=True)


def alternating_rounds(steps: dict, rounds: int, top: int) -> None:
    """Time each of `steps` (name -> one forward and backward) in turn, `rounds` times over, since the GPU's clocks
    move between calls: wall ms per call, GPU ms per call and the `top` heaviest kernels."""
    for r in range(rounds):
        for name, fn in steps.items():
            ms = bench(fn, calls=10)
            gpu_ms, kernels = kernel_table(fn, top)
            print(f"  round {r} {name}: {ms:.3f} ms, {gpu_ms:.3f} ms GPU: "
                  + "; ".join(f"{k[:40]} {t:.3f} ms {c}x" for k, t, c in kernels), flush=True)


def shared_mlp(tokens: int, dim: int, width: int, rounds: int) -> None:
    """The shared experts' SwiGLU (bench-2b: dim 2048, 2 x 1408), forward and backward with accumulating weight
    gradients: bf16 as training runs it (cuBLAS linears, the compiled SwiGLU) and fp8.shared_experts' (FP8 forward and
    input gradients on the Triton kernel, the step's FP8 weights already cast), in alternating rounds."""
    from deepseek_pt.engine.fp8_experts import convert_shared_experts_to_fp8
    from deepseek_pt.model.layers import SwiGLU, compile_pointwise

    compile_pointwise()
    torch.manual_seed(0)
    layers = {}
    for name in ("bf16", "fp8"):
        layers[name] = torch.nn.Module()
        layers[name].shared_experts = SwiGLU(dim, width).cuda().bfloat16()
    layers["fp8"].load_state_dict(layers["bf16"].state_dict())
    convert_shared_experts_to_fp8(layers["fp8"], lambda: 0, emulate=False, triton_gemms=True)
    x = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    step = {name: (lambda m=m: m.shared_experts(x).backward(dy)) for name, m in layers.items()}
    ys = {name: m.shared_experts(x) for name, m in layers.items()}
    print(f"shared experts {tokens} x {dim} -> {width}: FP8 output rel err {rel_err(ys['fp8'], ys['bf16']):.1e}",
          flush=True)
    alternating_rounds(step, rounds, top=5)


def attention_half(tokens: int, rounds: int) -> None:
    """bench-2b's attention half (norm, MLA, residual), compiled as training compiles it, forward and backward with
    weight gradients added into `.grad`: the projections in bf16 and through fp8.attention (the step's FP8 weights
    already cast), in alternating rounds."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.fp8_linears import convert_linears_to_fp8
    from deepseek_pt.engine.linear_grads import linear_grads_in_place
    from deepseek_pt.model.layers import compile_pointwise
    from deepseek_pt.model.transformer import Block

    compile_pointwise()
    model = load_config(Path(__file__).resolve().parent.parent / "configs" / "bench-2b.yaml", []).model
    seq = 2048
    blocks = {}
    for name in ("bf16", "fp8"):
        torch.manual_seed(0)
        blocks[name] = torch.nn.Sequential(Block(model, moe=False)).cuda().bfloat16()
        if name != "bf16":
            convert_linears_to_fp8(blocks[name], lambda: 0, emulate=False, grads_in_place=True, attention=True,
                                   dense_mlp=False)
        linear_grads_in_place(blocks[name])  # what fp8 left in bf16, as training does
        for m in blocks[name].modules():  # what the block's pre-hook does at a step's start
            if hasattr(m, "cast_weight_once"):
                m.cast_weight_once(0)
    x = torch.randn(tokens // seq, seq, model.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    halves = {name: torch.compile(b[0].attention_residual) for name, b in blocks.items()}
    for half in halves.values():
        for _ in range(2):  # the first call creates .grad, later ones add into it: two graphs
            half(x).backward(dy)
    print(f"attention half {tokens} tokens: FP8 output rel err "
          f"{rel_err(halves['fp8'](x), halves['bf16'](x)):.1e}", flush=True)
    alternating_rounds({name: (lambda half=half: half(x).backward(dy)) for name, half in halves.items()}, rounds, top=6)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--experts-only", action="store_true", help="only the routed experts' grouped GEMMs")
    p.add_argument("--shared-only", action="store_true", help="only the shared experts' SwiGLU, bf16 and FP8")
    p.add_argument("--attention-only", action="store_true", help="only the attention half, bf16 and fp8.attention")
    p.add_argument("--rounds", type=int, default=3, help="--shared-only, --attention-only: alternating rounds")
    args = p.parse_args()
    M = args.tokens
    if args.shared_only:
        return shared_mlp(M, 2048, 2 * 1408, args.rounds)
    if args.attention_only:
        return attention_half(M, args.rounds)
    global quant_rows  # fused amax + scale + cast kernels: what a real recipe pays for quantization
    quant_rows = torch.compile(quant_rows)
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    dense_shapes = [("q_proj", 2048, 3072), ("kv_a", 2048, 640), ("kv_b", 512, 4096), ("o_proj", 2048, 2048),
                    ("dense_up", 2048, 10944), ("dense_down", 10944, 2048), ("shared_up", 2048, 2816),
                    ("lm_head", 2048, 32000),
                    # bench-v3-dense (dim 7168)
                    ("v3 q_b", 1536, 24576), ("v3 o_proj", 16384, 7168), ("v3 up", 7168, 18432),
                    ("v3 down", 18432, 7168)]
    for name, K, N in [] if args.experts_only else dense_shapes:
        dense(M, K, N, name)
    grouped(M, 64, 6, 2048, 1408)
    grouped(M, 64, 6, 1408, 2048)
    expert_casts(M, 6, 2048, 1408)
    expert_mlp(M, 64, 6, 2048, 1408)


if __name__ == "__main__":
    main()
