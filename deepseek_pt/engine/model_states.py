"""What each GPU must hold of the model's states (weights, gradients, fp32 master weights, AdamW's two moments) under
the config's ZeRO stage and expert parallelism: a lower bound, so that a run that cannot fit is refused before
DeepSpeed starts (it would fail minutes later with a CUDA out-of-memory error from deep inside its optimizer) and
`python -m deepseek_pt.params CONFIG --gpus N` can say how a shape spreads over N GPUs.

Counted per rank: the routed experts are split over parallel.expert_parallel_size ranks, each expert held by
world / EP ranks; every other parameter by all of them. A state "partitioned" by ZeRO is 1/holders of each parameter
on each holder, (replicated + experts) / world in all; a whole one is replicated + experts / EP. Left out, so the
figure never exceeds what DeepSpeed allocates: activations, communication buckets and prefetch, the parameters kept
whole by ZeRO-3's persistence threshold or gathered for a layer's compute, the fp32 gradient copies of a step, and
the fp32 partition copy DeepSpeed makes of fp32 weights."""
from __future__ import annotations

import torch

from ..config import Config
from ..model.counting import meta_model
from ..model.moe import MoE

GiB = 2**30


def expert_and_other_params(cfg: Config, model: torch.nn.Module | None = None) -> tuple[int, int]:
    """(routed-expert parameters, all others) of the whole model, MTP modules included; `model`, if the caller has
    built it (on the meta device), saves building it again (seconds at DeepSeek-V3's shape)."""
    model = model or meta_model(cfg.model)
    experts = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    return experts, sum(p.numel() for p in model.parameters()) - experts


def model_state_bytes(cfg: Config, world: int, stage: int | None = None,
                      counts: tuple[int, int] | None = None) -> dict[str, int]:
    """Bytes per GPU of each model state on `world` GPUs (a lower bound; the module's docstring says what is out),
    under ZeRO `stage` (default the config's); `counts` is expert_and_other_params' answer, if the caller has it."""
    experts, others = counts or expert_and_other_params(cfg)
    ep = cfg.parallel.expert_parallel_size
    stage = cfg.parallel.zero_stage if stage is None else stage
    whole = others + experts // ep
    partitioned = -(-(others + experts) // world)  # rounded up: DeepSpeed pads partitions to equal sizes
    low = 4 if cfg.precision == "fp32" else 2  # the weights the model computes with; fp8's are bf16 between steps
    return {
        "weights": low * (partitioned if stage == 3 else whole),
        "gradients": low * (partitioned if stage >= 2 else whole),
        "master_weights": 0 if cfg.precision == "fp32" else 4 * partitioned,  # stage 0 is fp32 only (config)
        "optimizer_moments": 8 * (partitioned if stage >= 1 else whole),
    }


def describe(states: dict[str, int]) -> str:
    parts = ", ".join(f"{name.replace('_', ' ')} {n / GiB:,.1f}" for name, n in states.items())
    return f"{sum(states.values()) / GiB:,.1f} GiB ({parts})"


def allocation_failure(error: str) -> str:
    """torch's account of a failed CUDA allocation (what it tried, what the GPU had free), its advice on the caching
    allocator left out."""
    said = error.split(" Including non-PyTorch memory")[0].split(" If reserved but unallocated")[0].splitlines()[0]
    return said.rstrip(".")


def describe_out_of_memory(cfg: Config, world: int, error: str, gpu: tuple[str, int] | None) -> str:
    """A CUDA out-of-memory error during training, as the user's to fix: torch's own account of the allocation,
    what the model states take, and the keys that shrink the rest."""
    states = sum(model_state_bytes(cfg, world).values())
    of = f" of its {gpu[1] / GiB:,.1f} GiB {gpu[0]}" if gpu else ""
    t = cfg.train
    fixes = [f"a smaller train.micro_batch_size (now {t.micro_batch_size}; raise train.grad_accum_steps, now "
             f"{t.grad_accum_steps}, to keep the batch)"]
    if t.activation_checkpointing is not True:
        fixes.append("train.activation_checkpointing: true (recompute each block's activations in backward)")
    if cfg.parallel.zero_stage < 3:
        fixes.append("parallel.zero_stage: 3 (partitions weights and gradients too)")
    return (f"{allocation_failure(error)}. The model states take at least {states / GiB:,.1f} GiB{of} "
            f"(python -m deepseek_pt.params CONFIG --gpus {world}); the rest went to activations, for "
            f"train.micro_batch_size x data.seq_len = {t.micro_batch_size} x {cfg.data.seq_len} tokens per micro-step: "
            f"{'; or '.join(fixes)}")
