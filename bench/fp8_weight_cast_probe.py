"""What casting the FP8 weights costs per optimizer step: every weight `fp8.experts`, `fp8.shared_experts`,
`fp8.attention` and `fp8.dense_mlp` cast (bench-2b by default), through the reference casts compiled (what
training ran before engine/fp8_weight_casts.py) and through fp8_weight_casts' Triton kernels. Per weight shape, ms
per cast (back-to-back calls: the host's launches count where they are slower than the GPU, as for small weights)
and its kernels' GPU time (profiler), with the bytes' rate over that (the bf16 weight read once, its two e4m3
layouts written once: 4 bytes a value), the two paths checked bit for bit; then the sum over the model, each shape times how often it has it.

    python bench/fp8_weight_cast_probe.py [--config configs/bench-2b.yaml] [--tiles 64x128,32x128,...]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.fp8_gemm_probe import bench, kernel_table
from deepseek_pt.config import load_config
from deepseek_pt.engine import fp8_experts, fp8_linears, fp8_weight_casts
from deepseek_pt.model.transformer import Transformer


def weight_shapes(config_path: str) -> Counter:
    """("experts", E, H, dim) for the routed and shared experts' SwiGLUs, ("linear", N, K) for the attention
    projections and dense MLPs that fp8_linears converts, with how many the model has."""
    cfg = load_config(config_path)
    moe, moe_layers = cfg.model.moe, cfg.model.n_layers - cfg.model.moe.n_dense_layers
    shapes = Counter({("experts", moe.n_routed_experts, moe.expert_inter_dim, cfg.model.dim): moe_layers})
    if moe.n_shared_experts:
        shapes[("experts", 1, moe.n_shared_experts * moe.expert_inter_dim, cfg.model.dim)] += moe_layers
    with torch.device("meta"):
        model = Transformer(cfg.model)
    for name, m in model.named_modules():
        dense_mlp = ".mlp." in name and ".experts." not in name and ".shared_experts." not in name
        if type(m) is torch.nn.Linear and (".self_attn." in name or dense_mlp) and fp8_linears._eligible(m):
            shapes[("linear", *m.weight.shape)] += 1
    return shapes


def casts(shape: tuple) -> tuple[list[torch.Tensor], dict]:
    """The weights of `shape` and its two casts: the reference compiled, and the Triton kernels."""
    if shape[0] == "experts":
        _, E, H, dim = shape
        weights = [torch.randn(E, *s, device="cuda").mul(0.02).bfloat16() for s in ((H, dim), (H, dim), (dim, H))]
        return weights, {"compiled reference": fp8_experts._compiled_weight_cast(),
                         "triton": fp8_experts._triton_cast_weights}
    weights = [torch.randn(*shape[1:], device="cuda").mul(0.02).bfloat16()]
    return weights, {"compiled reference": torch.compile(fp8_linears.cast_weight, fullgraph=True, dynamic=False),
                     "triton": fp8_linears._triton_cast_weight}


def same(a: tuple, b: tuple) -> bool:
    as_bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t
    return all(torch.equal(as_bits(x), as_bits(y)) for x, y in zip(a, b, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench-2b.yaml")
    ap.add_argument("--tiles", default="", help="BLOCK_NxBLOCK_K tile shapes to time the Triton casts at, too")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    tiles = [tuple(int(v) for v in t.split("x")) for t in args.tiles.split(",") if t]
    totals, default_tiles = Counter(), (fp8_weight_casts.BLOCK_N, fp8_weight_casts.BLOCK_K)
    for shape, count in sorted(weight_shapes(args.config).items()):
        weights, fns = casts(shape)
        values = sum(w.numel() for w in weights)
        outputs = {name: fn(*weights) for name, fn in fns.items()}
        assert same(*outputs.values()), f"{shape}: the Triton casts differ from the reference"
        line = []
        for name, fn in fns.items():
            ms = bench(lambda fn=fn, weights=weights: fn(*weights))
            gpu_ms, _ = kernel_table(lambda fn=fn, weights=weights: fn(*weights), top=0)
            totals[name] += ms * count
            totals[f"{name}, GPU time"] += gpu_ms * count
            line.append(f"{name} {ms:.3f} ms, GPU {gpu_ms:.3f} ms ({4 * values / gpu_ms / 1e9:.2f} TB/s)")
        for block_n, block_k in tiles:
            fp8_weight_casts.BLOCK_N, fp8_weight_casts.BLOCK_K = block_n, block_k
            ms = bench(lambda: fns["triton"](*weights))  # noqa: B023 (bench calls it here)
            line.append(f"{block_n}x{block_k} {ms:.3f}")
        fp8_weight_casts.BLOCK_N, fp8_weight_casts.BLOCK_K = default_tiles
        print(f"{shape} x{count}: " + "; ".join(line), flush=True)
    print("per optimizer step: " + "; ".join(f"{name} {ms:.2f} ms" for name, ms in totals.items()), flush=True)


if __name__ == "__main__":
    main()
