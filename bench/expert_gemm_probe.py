"""The routed experts' forward and input-gradient GEMMs (bf16) on bench-2b's shapes: torch._grouped_mm (CUTLASS) in the
layouts the weights could take, over training's uneven expert groups and over even ones, against
engine/grouped_mm.py's Triton kernel at several tile shapes.

    python bench/expert_gemm_probe.py [--tokens 8192] [--rounds 3] [--fp8 | --swiglu]

Expert-sorted rows as AutoEP hands them over (bench/fp8_gemm_probe.py's expert_rows: multiples of 16, each expert
0.5-1.5x the mean load). Prints median ms and TFLOP/s per GEMM; the kernel's lines also its relative error against
CUTLASS's result (the two-product input gradient: against CUTLASS's two rounded products summed). The kernel and
CUTLASS alternate over `--rounds` rounds: back-to-back timings of one GEMM drift with the GPU's clocks.

`--fp8`: instead, the kernel's e4m3 path (fp8.experts) at several tile shapes on the four GEMMs fp8.experts runs
(weights K-major, row scales), each round beside the bf16 kernel's default on the same GEMM.

`--swiglu`: instead, the gate and up GEMMs with the SwiGLU in their epilogue (grouped_mm.gate_up_swiglu) at several
tile shapes, each round beside what training ran before: the two GEMMs, then DeepSpeed's Triton SwiGLU; and the
SwiGLU's backward, DeepSpeed's kernel against grouped_mm.swiglu_backward (training's).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.fp8_gemm_probe import bench, expert_rows, rel_err
from deepseek_pt.engine.fp8_experts import quantize_rows
from deepseek_pt.engine.grouped_mm import (
    CONFIG,
    CONFIG_FP8,
    CONFIG_GATE_UP,
    CONFIG_TWO_PRODUCTS,
    gate_up_swiglu,
    ragged_mm,
    swiglu_backward,
)

E, DIM, HIDDEN = 64, 2048, 1408  # configs/bench-2b.yaml's routed experts
CONFIGS = sorted({CONFIG, CONFIG_TWO_PRODUCTS, (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 128, 8, 3),
                  (64, 128, 64, 4, 5), (64, 256, 64, 8, 4)})
GATE_UP_CONFIGS = sorted({CONFIG_GATE_UP, (128, 128, 64, 8, 4), (128, 128, 32, 8, 4), (128, 128, 64, 8, 2),
                          (128, 64, 64, 8, 3), (128, 64, 128, 8, 3)})
FP8_CONFIGS = sorted({CONFIG_FP8, (128, 128, 128, 8, 4), (128, 128, 128, 4, 4), (128, 256, 128, 8, 3),
                      (128, 256, 128, 8, 4), (128, 128, 256, 8, 3), (64, 128, 128, 4, 4), (128, 256, 64, 8, 4)})


def show(label: str, ms: float, flops: int, note: str = "") -> None:
    print(f"{label:62} {ms:7.3f} ms {flops / ms / 1e9:6.0f} TFLOP/s{note}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step (bench-2b: 2048 x 4)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fp8", action="store_true", help="the e4m3 path's tile shapes instead")
    parser.add_argument("--swiglu", action="store_true", help="the gate and up GEMM with the SwiGLU in its epilogue instead")
    args = parser.parse_args()
    _, offs, M = expert_rows(args.tokens, E, 6, torch.Generator("cuda").manual_seed(0))
    n = int(offs[-1])
    if args.fp8:
        return fp8_tiles(offs, M, n, args.rounds)
    if args.swiglu:
        return gate_up_with_swiglu(offs, M, n, args.rounds)
    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
    x, h, dy, d_gate, d_up = r(M, DIM), r(M, HIDDEN), r(M, DIM), r(M, HIDDEN), r(M, HIDDEN)
    d_gate_up = torch.cat([d_gate, d_up], 1)
    w1, w3, w2 = r(E, HIDDEN, DIM), r(E, HIDDEN, DIM), r(E, DIM, HIDDEN)
    gm, flops = torch._grouped_mm, 2 * n * DIM * HIDDEN
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {n} routed rows over {E} experts "
          f"(+{M - n} padding rows)", flush=True)

    # CUTLASS: the weights' layouts, and what its tiles' padding of each expert's rows costs
    w13 = torch.cat([w1, w3], 1)
    w1_kn, w2_kn = w1.transpose(-2, -1).contiguous(), w2.transpose(-2, -1).contiguous()  # stored [E, K, N]
    even = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * (n // E // 128 * 128)
    layouts = [
        ("fwd gate+up, two GEMMs of N=1408", lambda: (gm(x, w1.mT, offs=offs), gm(x, w3.mT, offs=offs)), 2 * flops),
        ("fwd gate+up, one GEMM of N=2816 over [w1; w3]", lambda: gm(x, w13.mT, offs=offs), 2 * flops),
        ("fwd gate, w1 [E, N, K]", lambda: gm(x, w1.mT, offs=offs), flops),
        ("fwd gate, w1 stored [E, K, N]", lambda: gm(x, w1_kn, offs=offs), flops),
        ("fwd gate, even groups of 128-row multiples", lambda: gm(x, w1.mT, offs=even),
         2 * int(even[-1]) * DIM * HIDDEN),
        ("fwd down, w2 [E, N, K]", lambda: gm(h, w2.mT, offs=offs), flops),
        ("fwd down, w2 stored [E, K, N]", lambda: gm(h, w2_kn, offs=offs), flops),
        ("dgrad gate+up, two GEMMs and an add", lambda: gm(d_gate, w1, offs=offs) + gm(d_up, w3, offs=offs),
         2 * flops),
        ("dgrad gate+up, one GEMM of K=2816 over [w1; w3]",
         lambda: gm(d_gate_up, w13, offs=offs), 2 * flops),
        ("dgrad gate, w1 stored [E, K, N]", lambda: gm(d_gate, w1_kn.mT, offs=offs), flops),
        ("dgrad down", lambda: gm(dy, w2, offs=offs), flops),
    ]
    for label, fn, f in layouts:
        show(f"CUTLASS {label}", bench(fn), f)

    # the Triton kernel against CUTLASS, as training calls each
    cases = {
        "fwd gate": (lambda c: ragged_mm(x, w1, offs, True, config=c), lambda: gm(x, w1.mT, offs=offs), flops),
        "fwd down": (lambda c: ragged_mm(h, w2, offs, True, config=c), lambda: gm(h, w2.mT, offs=offs), flops),
        "dgrad down": (lambda c: ragged_mm(dy, w2, offs, False, config=c), lambda: gm(dy, w2, offs=offs), flops),
        "dgrad gate+up, two products": (lambda c: ragged_mm(d_gate, w1, offs, False, d_up, w3, config=c),
                                        lambda: gm(d_gate, w1, offs=offs) + gm(d_up, w3, offs=offs), 2 * flops),
    }
    errors = {}
    for name, (ours, cutlass, _) in cases.items():
        want = cutlass()[:n]
        for c in CONFIGS:
            errors[name, c] = rel_err(ours(c)[:n], want.float())
    for round_ in range(args.rounds):
        for name, (ours, cutlass, f) in cases.items():
            show(f"round {round_} CUTLASS {name}", bench(cutlass), f)
            for c in CONFIGS:
                default = " (default)" if c == (CONFIG_TWO_PRODUCTS if "two" in name else CONFIG) else ""
                show(f"round {round_} ours {name} {c}{default}", bench(lambda c=c, ours=ours: ours(c)), f,
                     f" | rel err {errors[name, c]:.1e}")


def gate_up_with_swiglu(offs: torch.Tensor, M: int, n: int, rounds: int) -> None:
    """The gate and up forward with the SwiGLU in its epilogue, at each tile shape, against the two GEMMs and then
    DeepSpeed's Triton SwiGLU, as training ran them before; the SwiGLU's backward, DeepSpeed's kernel against ours."""
    from deepspeed.moe.ep_experts import apply_expert_activation

    r = lambda *shape: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02
    x, dh, w1, w3 = r(M, DIM), r(M, HIDDEN), r(E, HIDDEN, DIM), r(E, HIDDEN, DIM)
    gate, up, _ = gate_up_swiglu(x, w1, w3, offs)
    gate, up = gate.requires_grad_(), up.requires_grad_()
    h = apply_expert_activation(gate, up)  # DeepSpeed's Triton SwiGLU, whose backward training ran
    flops = 2 * n * DIM * HIDDEN
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {n} routed rows over {E} experts, SwiGLU",
          flush=True)

    def two_gemms_then_swiglu() -> torch.Tensor:
        return apply_expert_activation(ragged_mm(x, w1, offs, True), ragged_mm(x, w3, offs, True))

    want = two_gemms_then_swiglu()[:n].float()
    for c in GATE_UP_CONFIGS:
        print(f"{c}: rel err of h {rel_err(gate_up_swiglu(x, w1, w3, offs, config=c)[2][:n], want):.1e} against the "
              "two GEMMs and DeepSpeed's SwiGLU", flush=True)
    for round_ in range(rounds):
        show(f"round {round_} fwd gate+up GEMMs, then SwiGLU", bench(two_gemms_then_swiglu), 2 * flops)
        for c in GATE_UP_CONFIGS:
            default = " (default)" if c == CONFIG_GATE_UP else ""
            show(f"round {round_} fwd gate+up with SwiGLU {c}{default}",
                 bench(lambda c=c: gate_up_swiglu(x, w1, w3, offs, config=c)), 2 * flops)
        ms = bench(lambda: torch.autograd.grad(h, (gate, up), dh, retain_graph=True))
        print(f"round {round_} SwiGLU backward, DeepSpeed's kernel {ms:.3f} ms; ours "
              f"{bench(lambda: swiglu_backward(gate.detach(), up.detach(), dh)):.3f} ms", flush=True)


def fp8_tiles(offs: torch.Tensor, M: int, n: int, rounds: int) -> None:
    """fp8.experts' four GEMMs, (N, K) with w [E, N, K]: the gate and up forward over stacked weights, the down
    forward, and the two input gradients over the transposed weights fp8.experts casts."""
    shapes = {"fwd gate+up": (2 * HIDDEN, DIM), "fwd down": (DIM, HIDDEN), "dgrad down": (HIDDEN, DIM),
              "dgrad gate+up": (DIM, 2 * HIDDEN)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; {n} routed rows over {E} experts, e4m3",
          flush=True)
    cases = {}
    for name, (N, K) in shapes.items():
        a, w = torch.randn(M, K, device="cuda", dtype=torch.bfloat16), torch.randn(E, N, K, device="cuda") * 0.02
        w = w.to(torch.bfloat16)
        (a8, a_scale), (w8, w_scale) = quantize_rows(a), quantize_rows(w)
        ref = ragged_mm(a, w, offs, True)[:n].float()
        cases[name] = (a, w, a8, w8, (a_scale, w_scale), ref, 2 * n * N * K)
    for c in FP8_CONFIGS:
        for name, (_, _, a8, w8, scales, ref, _) in cases.items():
            err = rel_err(ragged_mm(a8, w8, offs, True, scales=scales, config=c)[:n], ref)
            print(f"{name} {c}: rel err {err:.1e} against the bf16 kernel", flush=True)
    for round_ in range(rounds):
        for name, (a, w, a8, w8, scales, _, f) in cases.items():
            show(f"round {round_} bf16 {name} {CONFIG}", bench(lambda a=a, w=w: ragged_mm(a, w, offs, True)), f)
            for c in FP8_CONFIGS:
                default = " (default)" if c == CONFIG_FP8 else ""
                show(f"round {round_} e4m3 {name} {c}{default}",
                     bench(lambda c=c, a8=a8, w8=w8, s=scales: ragged_mm(a8, w8, offs, True, scales=s, config=c)), f)


if __name__ == "__main__":
    main()
