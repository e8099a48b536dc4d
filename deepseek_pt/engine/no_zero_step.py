"""The optimizer step without ZeRO (parallel.zero_stage 0, fp32), made to do what ZeRO's steps do.

DeepSpeed 0.19.8 runs fp32 without ZeRO through torch's optimizer alone: it clips by the mean over data-parallel ranks
of each rank's own gradient norm (under expert parallelism each rank holds other experts, so that is no rank's norm of
the whole model), never reports the norm, and applies a step whose gradients are not finite. Here the step first sums
the whole model's squared gradient norm (the replicated parameters' gradients once, every routed expert's from the
rank that holds it), clips by it, and skips a non-finite step as ZeRO does: the weights, moments and LR schedule stay
as they were and the engine counts it in skipped_steps."""
from __future__ import annotations

import torch
import torch.distributed as dist


def install(engine, max_norm: float) -> None:
    """Wrap `engine.optimizer.step` (torch's AdamW at stage 0 in fp32); DeepSpeed's own clip must be off
    (ds_config's gradient_clipping 0), as `max_norm` is applied here (0 = no clip)."""
    from deepspeed.utils import groups

    optimizer = engine.optimizer
    replicated, experts = [], {}  # AutoEP's routed experts: allreduce False, reduced over their group_name's ranks
    for param in engine.module.parameters():
        if param.requires_grad:
            if getattr(param, "allreduce", True):
                replicated.append(param)
            else:
                experts.setdefault(param.group_name, []).append(param)
    expert_groups = [(groups._get_expert_parallel_group(name), params) for name, params in experts.items()]
    clipped = replicated + [p for params in experts.values() for p in params]
    step = optimizer.step

    def squared_norm(params) -> torch.Tensor:
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=engine.device)
        return torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]).square().sum()

    def clipped_step(closure=None):
        square = squared_norm(replicated)
        for group, params in expert_groups:
            held = squared_norm(params)
            dist.all_reduce(held, group=group)  # each rank of the group holds other experts
            square = square + held
        norm = square.sqrt()
        optimizer._global_grad_norm = norm  # the engine reports it (get_global_grad_norm) after the step
        optimizer.overflow = not torch.isfinite(norm).item()  # the engine then skips the scheduler, counts the step
        if optimizer.overflow:
            return None
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_([p.grad for p in clipped if p.grad is not None], scale)
        return step(closure)

    optimizer.step = clipped_step
