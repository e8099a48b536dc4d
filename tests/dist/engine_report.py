"""Run under the deepspeed launcher: build the training engine (smoke config + overrides from argv) and report, on
rank 0, how it is wired: which modules ZeRO-3 fetches as a unit (leaf modules), whether its per-module hooks are on
(engine/zero3_hooks.py) and how many linears it hooks one by one, which block methods were compiled and whether in
Inductor's deterministic mode, whether torch's deterministic algorithms are on and under which cuBLAS workspace
setting, whether DeepSpeed's throughput timer (a GPU sync per forward) runs, whether
torch.nn.functional.linear is still torch's, whether ZeRO-3 steps through engine/zero3_step.py; and the dtypes it
computes in: parameters, and the buffers that must keep fp32 (RoPE frequencies equal to a fresh computation, the
balancing bias). One JSON line."""
import json
import os
import sys
from pathlib import Path

import torch
import torch._inductor.config
from torch import nn

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from deepspeed.utils import z3_leaf_module  # noqa: E402

from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.engine import balance, zero3_hooks, zero3_step  # noqa: E402
from deepseek_pt.model.rope import inv_frequencies  # noqa: E402
from deepseek_pt.model.transformer import Block  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.train import build_engine, exit_process  # noqa: E402


def main():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    rank, world, _ = init_distributed(cfg)
    engine = build_engine(cfg, world)
    modules = dict(engine.module.named_modules())
    blocks = [name for name, m in modules.items() if isinstance(m, Block)]
    exact, _ = inv_frequencies(cfg.model.attention)
    rope = [b for name, b in engine.module.named_buffers() if name.endswith("inv_freq")]
    if rank == 0:
        print(json.dumps({
            "blocks": blocks,
            "leaf": [name for name, m in modules.items() if z3_leaf_module(m)],
            "hooked_linears": sum(1 for m in modules.values() if isinstance(m, nn.Linear) and m._forward_pre_hooks),
            "compiled": sorted({f"{name}.{method}".lstrip(".") for name in ["", *blocks]
                                for method in ("attention_residual", "mlp_residual", "token_loss")
                                if hasattr(getattr(modules[name], method, None), "_torchdynamo_orig_callable")}),
            "throughput_timer": engine.tput_timer.config.enabled,
            "torch_linear": torch.nn.functional.linear is torch._C._nn.linear,
            "fused_zero_step": zero3_step.installed(engine.optimizer),
            "zero3_module_hooks": zero3_hooks.present(engine),
            "inductor_deterministic": torch._inductor.config.deterministic,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "cublas_workspace": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "rope_dtypes": sorted({str(b.dtype) for b in rope}),
            "rope_exact": len(rope) == cfg.model.n_layers and all(torch.equal(b.cpu(), exact) for b in rope),
            "bias_dtypes": sorted({str(b.dtype) for _, b in balance.moe_routers(engine.module)}),
        }), flush=True)


if __name__ == "__main__":
    main()
    exit_process(0)  # as training leaves: not through the interpreter's finalization
