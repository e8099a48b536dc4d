"""The dense layer's MLP half (RMSNorm, gate and up, SwiGLU, down, residual) at bench-2b's widths, forward and
backward, compiled as train.compile_blocks compiles it: bf16 against rowwise FP8 on gate and up (what
`fp8.layers: auto` converts), and three ways to restructure the rowwise version:

- `norm apart`: the RMSNorm compiled apart from the MLP, so that Inductor cannot fuse the norm's backward (a
  reduction along each token's row) with the column-wise amax over tokens that the weight-gradient GEMMs' casts
  need (a reduction across rows);
- `gate+up fused`: one Float8Linear of twice the width over the concatenated weights, so the shared input is cast
  once, not twice (the upper bound of casting once: no concatenation is timed);
- `tiled reductions`: Inductor's 2-D tiling of reductions (`triton.tile_reductions`, `triton.prefer_nd_tiling`),
  for the casts that write an FP8 copy transposed (the weight-gradient GEMMs' operands) from a row-wise pass;

and tensorwise FP8 on gate and up, alone and fused.

--cached compares, as training runs them (weight gradients added into `.grad` in place, the step's FP8 weights
already cast), in alternating rounds: bf16; tensorwise on gate and up (`fp8.layers: auto`); that with the down
projection through fp8_linears' Fp8CachedLinear; all three projections through it. (fp8.shared_experts' path
cannot take this SwiGLU: its Triton casts read rows of at most 8192 values.)

    python bench/fp8_dense_block.py [--tokens 8192] [--fast-accum forward|all] [--kernels N] [--dump PATTERN]
    python bench/fp8_dense_block.py --cached [--rounds 3]

Prints per variant: median ms per forward + backward (back-to-back calls), GPU time per call from the profiler,
and the N heaviest kernels. --dump prints the Inductor source of every generated kernel whose name contains
PATTERN (e.g. `amax`).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn

from bench.fp8_gemm_probe import bench, kernel_table
from deepseek_pt.config import load_config
from deepseek_pt.engine.fp8 import convert_to_fp8, torchao_config
from deepseek_pt.model.layers import POINTWISE, SwiGLU, compile_pointwise
from deepseek_pt.model.transformer import Block


class FusedGateUp(nn.Module):
    """SwiGLU whose gate and up projections are one linear [2 * inter, dim] (gate rows first)."""

    def __init__(self, mlp: SwiGLU):
        super().__init__()
        inter, dim = mlp.gate_proj.weight.shape
        self.gate_up = nn.Linear(dim, 2 * inter, bias=False, device=mlp.gate_proj.weight.device,
                                 dtype=mlp.gate_proj.weight.dtype)
        with torch.no_grad():
            self.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        self.down_proj = mlp.down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(POINTWISE["swiglu"](gate, up))


def fuse_gate_up(block: Block, recipe: str, fast_accum: str) -> Block:
    """A copy of `block` whose MLP's gate and up are one Float8Linear in `recipe`."""
    from torchao.float8 import convert_to_float8_training

    fused = copy.deepcopy(block)
    fused.mlp = FusedGateUp(fused.mlp)
    convert_to_float8_training(fused, config=torchao_config(recipe, fast_accum),
                               module_filter_fn=lambda _, fqn: fqn.endswith("gate_up"))
    return fused


def variants(block: Block, fast_accum: str):
    """(name, module holding the parameters, forward function) for each variant."""
    bf16 = copy.deepcopy(block)
    yield "bf16", bf16, torch.compile(bf16.mlp_residual)
    for recipe in ("rowwise", "tensorwise"):
        fp8 = copy.deepcopy(block)
        convert_to_fp8(fp8, recipe, "auto", fast_accum)
        yield f"fp8 {recipe}", fp8, torch.compile(fp8.mlp_residual)
        fused = fuse_gate_up(block, recipe, fast_accum)
        yield f"fp8 {recipe}, gate+up fused", fused, torch.compile(fused.mlp_residual)
    apart = copy.deepcopy(block)
    convert_to_fp8(apart, "rowwise", "auto", fast_accum)
    tiled = copy.deepcopy(apart)
    norm, mlp = torch.compile(apart.post_attention_layernorm), torch.compile(apart.mlp)
    yield "fp8 rowwise, norm apart", apart, lambda x: x + mlp(norm(x))
    yield "fp8 rowwise, tiled reductions", tiled, torch.compile(
        tiled.mlp_residual, options={"triton.tile_reductions": True, "triton.prefer_nd_tiling": True})


def cached_variants(block: Block):
    """(name, module holding the parameters, forward function) for --cached: every weight gradient added into
    `.grad` in place, the FP8 copies of Fp8CachedLinear's weights cast before the rounds (once per optimizer step in
    training)."""
    from deepseek_pt.engine.fp8_linears import cache_fp8_linears
    from deepseek_pt.engine.linear_grads import linear_grads_in_place

    def cached(module: Block, linears: list[nn.Linear]) -> Block:
        cache_fp8_linears(module, linears, lambda: 0, emulate=False, grads_in_place=True)
        for linear in linears:
            linear.cast_weight_once(0)
        linear_grads_in_place(module)
        return module

    bf16 = copy.deepcopy(block)
    linear_grads_in_place(bf16)
    yield "bf16", bf16, torch.compile(bf16.mlp_residual)
    auto = copy.deepcopy(block)
    convert_to_fp8(auto, "tensorwise", "auto")
    linear_grads_in_place(auto)
    yield "fp8 tensorwise (auto)", auto, torch.compile(auto.mlp_residual)
    down = copy.deepcopy(block)
    convert_to_fp8(down, "tensorwise", "auto")
    cached(down, [down.mlp.down_proj])
    yield "fp8 tensorwise, down cached", down, torch.compile(down.mlp_residual)
    every = copy.deepcopy(block)
    cached(every, [every.mlp.gate_proj, every.mlp.up_proj, every.mlp.down_proj])
    yield "fp8 gate, up, down cached", every, torch.compile(every.mlp_residual)


def dump_kernels(pattern: str) -> None:
    """Print the source of each generated kernel whose name contains `pattern`, once per name."""
    seen = set()
    for path in sorted(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).rglob("*.py")):
        text = path.read_text(errors="replace")
        for chunk in text.split("@triton.jit")[1:]:
            name = chunk.split("def ", 1)[1].split("(", 1)[0] if "def " in chunk else ""
            if pattern in name and name not in seen:
                seen.add(name)
                source = chunk.split("\n\n\n")[0]  # the kernel's body ends at the blank lines before the next one
                print(f"\n# --- {name} ({path.name})\n@triton.jit{source}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--fast-accum", choices=("forward", "all"), default="forward")
    p.add_argument("--kernels", type=int, default=8, help="heaviest kernels to list per variant")
    p.add_argument("--dump", metavar="PATTERN", help="print generated kernels whose names contain PATTERN")
    p.add_argument("--cached", action="store_true", help="the cached-weight FP8 variants, as training runs them")
    p.add_argument("--rounds", type=int, default=1, help="time every variant this many times, in turn")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/fp8_dense_block.py times GPU kernels: this machine has no CUDA GPU")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_dense_"))  # for --dump
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    model = load_config("configs/bench-2b.yaml").model
    compile_pointwise()
    block = Block(model, moe=False).cuda().to(torch.bfloat16)
    x = torch.randn(args.tokens // 2048, 2048, model.dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn_like(x)
    reference, steps = None, {}
    chosen = cached_variants(block) if args.cached else variants(block, args.fast_accum)
    for name, module, forward in chosen:
        def step(module=module, forward=forward):
            x.grad = None
            if not args.cached:  # --cached: gradients accumulate, added in place from the second step on
                for param in module.parameters():
                    param.grad = None
            forward(x).backward(dy)
        step()
        step()
        out = forward(x).detach().float()
        if reference is None:
            reference = out
        err = ((out - reference).norm() / (reference - x.detach().float()).norm()).item()
        print(f"{name:32} rel err of the MLP's output {err:.1e}", flush=True)
        steps[name] = step
    for r in range(args.rounds):
        for name, step in steps.items():
            ms = bench(step)
            gpu_ms, top = kernel_table(step, args.kernels)
            print(f"round {r} {name:32} fwd+bwd {ms:6.3f} ms | GPU {gpu_ms:6.3f} ms", flush=True)
            for kernel, kernel_ms, launches in top:
                print(f"    {kernel_ms:6.3f} ms {launches:3d}x  {kernel[:150]}")
    if args.dump:
        dump_kernels(args.dump)


if __name__ == "__main__":
    main()
