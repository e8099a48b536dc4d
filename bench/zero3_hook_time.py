"""Host time in ZeRO-3's per-module hooks, unprofiled: DeepSpeed's fetch/release bookkeeping before and after each
(leaf) module's forward and backward, timed call by call over 10 optimizer steps of the training loop.

    deepspeed --num_gpus 1 bench/zero3_hook_time.py [--config configs/smoke.yaml] [key=value ...]
    python3 -m deepspeed.launcher.runner --num_gpus 1 bench/zero3_hook_time.py ...   # where DeepSpeed came from
                                                  # .whl/ (bench/device_env.sh): no `deepspeed` script on the PATH

torch's profiler with Python stacks slows exactly this kind of code severalfold; this wraps the four hook
methods of DeepSpeedZeRoOffload with a wall clock instead. The hooks are kept on
(parallel.zero_idle_hooks_off=false) even where every parameter is persistent and the engine would remove them.
Prints one JSON line on rank 0: the loop's ms per optimizer step, and per hook the calls per optimizer step and
microseconds per call."""
from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload  # noqa: E402

from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.data import PretrainDataset, TrainLoader, to_device  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.engine.preflight import preflight  # noqa: E402
from deepseek_pt.train import build_engine, exit_process, train_step  # noqa: E402

HOOKS = ("pre_sub_module_forward_function", "post_sub_module_forward_function",
         "pre_sub_module_backward_function", "post_sub_module_backward_function")


def time_hooks(spent: dict[str, list[float]]) -> None:
    for name in HOOKS:
        hook = getattr(DeepSpeedZeRoOffload, name)

        def timed(self, *args, _hook=hook, _name=name, **kwargs):
            start = time.perf_counter()
            result = _hook(self, *args, **kwargs)
            spent[_name].append(time.perf_counter() - start)
            return result
        setattr(DeepSpeedZeRoOffload, name, timed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args()
    spent: dict[str, list[float]] = collections.defaultdict(list)
    time_hooks(spent)
    # The probe neither resumes nor saves, so its run.dir is an empty one of its own: the config's (runs/smoke after
    # launch/smoke.sh) may hold a run whose checkpoints and tokenizer preflight would hold this data against
    with tempfile.TemporaryDirectory(prefix="zero3_hook_time.") as run_dir:
        cfg = load_config(args.config, ["parallel.zero_idle_hooks_off=false", f"run.dir={run_dir}", *args.overrides])
        rank, world, device = init_distributed(cfg)
        preflight(cfg, world)  # as training checks the shards against the model before building it
    engine = build_engine(cfg, world)
    loader = TrainLoader(PretrainDataset(cfg.data.path, cfg.data.train_split, cfg.data.seq_len),
                         cfg.train.micro_batch_size, dp_rank=rank, dp_world=world, seed=cfg.data.seed)
    batches = to_device(loader, device)
    for _ in range(3):  # compiles and ZeRO-3's first-step trace
        train_step(engine, cfg, batches)
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.steps):
        train_step(engine, cfg, batches)
    if device.type == "cuda":
        import torch
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"ms_per_step": round(1e3 * wall / args.steps, 2),
                          **{name: {"calls_per_step": len(ts) / args.steps, "us_per_call": round(1e6 * sum(ts) / len(ts), 1)}
                             for name, ts in spent.items()}}), flush=True)


if __name__ == "__main__":
    main()
    exit_process(0)
