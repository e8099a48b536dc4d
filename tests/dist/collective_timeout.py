"""Run under the deepspeed launcher with 2 processes: rank 1 stalls; rank 0's barrier must give up after
parallel.timeout_minutes and say so. Prints one JSON line on rank 0."""
import json
import os
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from model_configs import tiny  # noqa: E402

from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.train import exit_process  # noqa: E402


def main():
    cfg = tiny()
    cfg.parallel.timeout_minutes = float(sys.argv[-1])
    rank, _, _ = init_distributed(cfg)
    if rank == 1:
        time.sleep(15)  # a hung rank
        return
    started = time.monotonic()
    try:
        dist.barrier()
        error = None
    except Exception as e:  # gloo raises on timeout
        error = str(e)[:300]
    print(json.dumps({"waited_s": time.monotonic() - started, "error": error}), flush=True)
    exit_process(0)  # the peer is still asleep; do not wait for it at exit


if __name__ == "__main__":
    main()
