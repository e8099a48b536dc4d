"""Run under the deepspeed launcher: our MoE block's forward vs the same weights after DeepSpeed AutoEP
conversion (ZeRO-3, expert parallel = world size). Prints one JSON line on rank 0."""
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from model_configs import tiny  # noqa: E402

from deepseek_pt.engine.ds_config import build_ds_config  # noqa: E402
from deepseek_pt.model import Transformer  # noqa: E402
from deepseek_pt.train import init_distributed  # noqa: E402


def main():
    cfg = tiny(mtp_depth=1)
    _, world, _ = init_distributed(cfg)
    cfg.parallel.expert_parallel_size = world
    cfg.train.micro_batch_size = 2
    cfg.precision = "fp32"
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    for moe in model.moe_layers():  # a nonzero bias must reach AutoEP's router
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, moe.n_experts))
    n_params_before = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        reference = model(ids)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=build_ds_config(cfg, world, has_moe=True))
    converted = [type(m).__name__ for m in engine.module.modules() if getattr(m, "_is_autoep_layer", False)]
    shared_kept = all(m.shared_experts is not None for m in engine.module.modules() if getattr(m, "_is_autoep_layer", False))
    n_params_after = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    with torch.no_grad():
        out = engine(ids)
    diff = torch.tensor([(out - reference).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if dist.get_rank() == 0:
        print(json.dumps({"max_abs_diff": diff.item(), "converted": len(converted), "shared_kept": shared_kept,
                          "params_before": n_params_before, "params_after_per_rank": n_params_after}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
