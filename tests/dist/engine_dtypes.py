"""Run under the deepspeed launcher: build the training engine (smoke config + overrides from argv) and report, on
rank 0, the dtypes the engine computes in: parameters, and the buffers that must keep fp32 (RoPE frequencies equal
to a fresh computation, the balancing bias). One JSON line."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.engine import balance  # noqa: E402
from deepseek_pt.model.rope import inv_frequencies  # noqa: E402
from deepseek_pt.train import build_engine, init_distributed  # noqa: E402


def main():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    rank, world, _ = init_distributed(cfg)
    engine = build_engine(cfg, world)
    exact, _ = inv_frequencies(cfg.model.attention)
    rope = [b for name, b in engine.module.named_buffers() if name.endswith("inv_freq")]
    if rank == 0:
        print(json.dumps({
            "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
            "rope_dtypes": sorted({str(b.dtype) for b in rope}),
            "rope_exact": len(rope) == cfg.model.n_layers and all(torch.equal(b.cpu(), exact) for b in rope),
            "bias_dtypes": sorted({str(b.dtype) for _, b in balance.moe_routers(engine.module)}),
        }), flush=True)


if __name__ == "__main__":
    main()
