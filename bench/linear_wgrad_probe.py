"""What gradient accumulation costs the linear layers' weight gradients, and what adding in the GEMM saves: every
plain linear of a config's model (bench-2b by default), at its tokens per micro-step.

Under `parallel.coalesce_grad_reduction` autograd adds each micro-step's weight gradient onto `.grad` in a pass of
its own; under `parallel.linear_grads_in_place` the GEMM adds into `.grad` (engine/linear_grads.py). Per weight
shape, ms per call:
    GEMM            dy^T x alone, a new gradient tensor: the floor
    GEMM + add_     what autograd does: the GEMM, then grad += result
    in place        the custom op training calls: one GEMM with beta = 1 into grad
and the sum over the model's linears, each shape times how often the model has it.

    python bench/linear_wgrad_probe.py [--config configs/bench-2b.yaml] [--tokens 8192]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench.fp8_gemm_probe import bench, rel_err
from deepseek_pt.config import load_config
from deepseek_pt.engine.linear_grads import add_linear_weight_grad_
from deepseek_pt.model.transformer import Transformer


def linear_shapes(config_path: str) -> Counter:
    """(out, in) of every bias-free nn.Linear of the config's model, with how many it has (built on the meta
    device). The routed experts, which AutoEP turns into grouped weights, are left out."""
    cfg = load_config(config_path)
    with torch.device("meta"):
        model = Transformer(cfg.model)
    return Counter(tuple(m.weight.shape) for name, m in model.named_modules()
                   if type(m) is torch.nn.Linear and m.bias is None and ".experts." not in name)


def timings(dy: torch.Tensor, x: torch.Tensor, grad: torch.Tensor) -> dict[str, float]:
    """ms per call of the weight gradient dy^T x: alone, then added as autograd adds it, then in place."""
    return {"GEMM": bench(lambda: dy.t() @ x),
            "GEMM + add_": bench(lambda: grad.add_(dy.t() @ x)),
            "in place": bench(lambda: add_linear_weight_grad_(grad, dy, x))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/bench-2b.yaml")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens per micro-step (2048 x 4 on bench-2b)")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens", flush=True)
    totals = Counter()
    for (out_dim, in_dim), count in sorted(linear_shapes(args.config).items()):
        dy = torch.randn(args.tokens, out_dim, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(args.tokens, in_dim, device="cuda", dtype=torch.bfloat16)
        grad = torch.randn(out_dim, in_dim, device="cuda", dtype=torch.bfloat16)
        exact = grad.float() + dy.float().t() @ x.float()
        in_place = grad.clone()
        add_linear_weight_grad_(in_place, dy, x)
        added = grad + dy.t() @ x
        times = timings(dy, x, grad)
        flops = 2 * args.tokens * out_dim * in_dim
        cells = "  ".join(f"{k} {ms:6.3f} ms ({flops / ms / 1e9:4.0f} TFLOP/s)" for k, ms in times.items())
        print(f"[{out_dim:5} x {in_dim:5}] x{count:2}  {cells}  | rel err against fp32: GEMM + add "
              f"{rel_err(added, exact):.1e}, in place {rel_err(in_place, exact):.1e}", flush=True)
        totals.update({k: ms * count for k, ms in times.items()})
    print("per micro-step, all linears: " + ", ".join(f"{k} {ms:.3f} ms" for k, ms in totals.items()), flush=True)


if __name__ == "__main__":
    main()
