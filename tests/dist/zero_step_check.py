"""Run under the deepspeed launcher: three optimizer steps of the smoke config (overrides from argv, data.path
among them), the second on a NaN loss, and report on rank 0 what ZeRO-3's step did with each: the loss and
gradient norm, whether the non-finite step left the fp32 master weights, Adam's moments and step count and the
learning rate as they were, how many steps the engine counts as skipped, how many times the steps released every
parameter, how many times the host waited on a CUDA stream (DeepSpeed's backward epilogue waits on its reduction
stream), and how many parameters are views of their ZeRO-3 partitions at the end. One JSON line."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.data import PretrainDataset, TrainLoader, to_device  # noqa: E402
from deepseek_pt.engine import zero3_step  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.train import build_engine, exit_process, train_step  # noqa: E402


def optimizer_state(engine) -> list[torch.Tensor]:
    zero = engine.optimizer
    state = [t.detach().clone() for t in zero.fp32_partitioned_groups_flat]
    for per_param in zero.optimizer.state.values():
        state += [per_param[k].detach().clone() for k in ("exp_avg", "exp_avg_sq", "step")]
    return state


def main():
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [a for a in sys.argv[1:] if not a.startswith("--local_rank")])
    rank, world, device = init_distributed(cfg)
    engine = build_engine(cfg, world)
    loader = TrainLoader(PretrainDataset(cfg.data.path, cfg.data.train_split, cfg.data.seq_len),
                         cfg.train.micro_batch_size, dp_rank=rank, dp_world=world, seed=cfg.data.seed)
    batches = to_device(loader, device)
    nan_loss = lambda engine, inputs, targets: engine(inputs, targets) * float("nan")  # noqa: E731

    releases = []
    release_all = engine.optimizer._partition_all_parameters
    engine.optimizer._partition_all_parameters = lambda: (releases.append(1), release_all())

    stream_waits = []
    if device.type == "cuda":
        stream_wait = torch.cuda.Stream.synchronize
        torch.cuda.Stream.synchronize = lambda stream: (stream_waits.append(1), stream_wait(stream))[1]

    steps = []
    for forward in (None, nan_loss, None):
        before, lr = optimizer_state(engine), engine.get_lr()[0]
        loss = train_step(engine, cfg, batches, forward).item() / cfg.train.grad_accum_steps
        after = optimizer_state(engine)
        steps.append({"loss": loss, "grad_norm": float(engine.get_global_grad_norm()),
                      "state_unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                      "lr_unchanged": engine.get_lr()[0] == lr})
    params = list(engine.module.parameters())
    views = sum(p.data.data_ptr() == p.ds_tensor.data_ptr() and p.data.numel() == p.ds_numel for p in params)
    if rank == 0:
        print(json.dumps({"fused_step": zero3_step.installed(engine.optimizer), "steps": steps,
                          "skipped_steps": engine.skipped_steps, "releases": len(releases),
                          "device": device.type, "stream_waits": len(stream_waits),
                          "parameters": len(params), "partition_views": views}), flush=True)


if __name__ == "__main__":
    main()
    exit_process(0)
