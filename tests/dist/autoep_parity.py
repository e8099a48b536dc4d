"""Run under the deepspeed launcher (or as one process with RANK/WORLD_SIZE set): our MoE block's forward and
backward vs the same weights after DeepSpeed AutoEP conversion (ZeRO-3, expert parallel = world size), on the
device the engine picks (GPU: AutoEP's fused Triton combine; CPU: its eager one); then the same with AutoEP's
layers made engine/moe_dispatch.py's where they qualify (expert parallel 1). Prints one JSON line on rank 0."""
import copy
import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from model_configs import tiny  # noqa: E402

from deepseek_pt.engine.accelerator import on_gpu  # noqa: E402
from deepseek_pt.engine.balance import add_sequence_balance_loss  # noqa: E402
from deepseek_pt.engine.ds_config import build_ds_config  # noqa: E402
from deepseek_pt.engine.moe_dispatch import fuse_moe_dispatch  # noqa: E402
from deepseek_pt.model import Transformer  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.train import exit_process  # noqa: E402


def max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device="cuda" if on_gpu() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def main():
    cfg = tiny(mtp_depth=1, moe__seq_aux_loss_alpha=0.1)
    _, world, device = init_distributed(cfg)
    cfg.parallel.expert_parallel_size = world
    cfg.train.micro_batch_size = 2
    cfg.precision = "fp32"
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    for moe in model.moe_layers():  # a nonzero bias must reach AutoEP's router
        moe.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, moe.n_experts))
    n_params_before = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model).to(device)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(dist.get_rank()))
    ids = ids.to(device)
    probe = torch.randn(2, 24, cfg.model.vocab_size, generator=torch.Generator().manual_seed(1)).to(device)
    ref_out = reference(ids)
    (ref_out * probe).sum().backward()
    ref_grad = reference.embed_tokens.weight.grad
    dist.all_reduce(ref_grad)  # DeepSpeed averages the data-parallel gradients
    ref_grad /= world

    ds_config = build_ds_config(cfg, world, has_moe=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    converted = [m for m in engine.module.modules() if getattr(m, "_is_autoep_layer", False)]
    n_params_after = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    out = engine(ids)
    engine.backward((out * probe).sum())
    grad = safe_get_full_grad(engine.module.embed_tokens.weight)
    engine.optimizer.zero_grad()
    fused, _ = fuse_moe_dispatch(engine.module)
    fused_out = engine(ids)
    engine.backward((fused_out * probe).sum())
    fused_grad = safe_get_full_grad(engine.module.embed_tokens.weight)
    engine.optimizer.zero_grad()

    # The sequence-wise balance loss, which our block computes and AutoEP's layers compute through engine/balance.py's
    # hooks: the same loss per layer, and its gradient alone the same in every router. (The whole loss, times 0,
    # joins it: ZeRO-3's backward hooks expect every layer's output to get a gradient before its input does.)
    targets = ids.roll(-1, dims=1)
    reference.zero_grad()
    ref_total = reference(ids, targets)
    ref_aux = [m.aux_loss for m in reference.moe_layers()]
    (torch.stack(ref_aux).sum() + 0.0 * ref_total).backward()
    hooked = add_sequence_balance_loss(engine.module, cfg.model.moe.seq_aux_loss_alpha)
    total = engine(ids, targets)
    aux = [m.aux_loss for m in converted]
    engine.backward(torch.stack(aux).sum() + 0.0 * total)
    router_grad_diff, router_grad_max = 0.0, 0.0
    for ours, theirs in zip(reference.moe_layers(), converted, strict=True):
        ref_router_grad = ours.gate.weight.grad
        dist.all_reduce(ref_router_grad)
        ref_router_grad /= world
        router_grad = safe_get_full_grad(theirs.router.gate.weight)
        router_grad_diff = max(router_grad_diff, (router_grad - ref_router_grad).abs().max().item())
        router_grad_max = max(router_grad_max, ref_router_grad.abs().max().item())
    result = {
        "max_abs_diff": max_over_ranks((out - ref_out).abs().max().item()),
        "grad_max_abs_diff": max_over_ranks((grad - ref_grad).abs().max().item()),
        "grad_max_abs": ref_grad.abs().max().item(),
        "converted": len(converted),
        "fused_dispatch": fused,
        "fused_max_abs_diff": max_over_ranks((fused_out - out).abs().max().item()),
        "fused_grad_max_abs_diff": max_over_ranks((fused_grad - grad).abs().max().item()),
        "balance_loss_layers": hooked,
        "balance_loss": torch.stack(ref_aux).sum().item(),
        "balance_loss_max_abs_diff": max_over_ranks(max(abs(a.item() - b.item()) for a, b in zip(aux, ref_aux))),
        "router_grad_max_abs": max_over_ranks(router_grad_max),
        "router_grad_max_abs_diff": max_over_ranks(router_grad_diff),
        "shared_kept": all(m.shared_experts is not None for m in converted),
        "combine_impl": sorted({m.combine_impl for m in converted}),
        "device": device.type,
        "params_before": n_params_before,
        "params_after_per_rank": n_params_after,
    }
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # as training leaves: not through the interpreter's finalization
