"""`python tests/ranks.py N PORT [--module] PROGRAM [ARGS ...]`: N ranks on this host, started as
`deepspeed --num_gpus N --master_port PORT [--module] PROGRAM ARGS` starts them, for the tests that train through
DeepSpeed rather than test its launcher (those use `deepspeed` itself: tests/jobs.py's deepspeed_cmd).

DeepSpeed's runner and its per-node launch.py each import torch and DeepSpeed before a rank starts: ~3 CPU-seconds
and ~5 s of a job's time on CI's two cores, and the tests start ~100 jobs. What the ranks see is launch.py's: its
environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_SIZE, CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT, and
CUDA_VISIBLE_DEVICES=0..N-1, which it sets on a CPU host too) and argv (`python -u [-m] PROGRAM --local_rank=R ARGS`).
So are its rules: a rank that fails stops the others and its exit status is the job's; SIGTERM or SIGINT here stops
the ranks and the job exits 1. Stopping is launch.py's too: SIGTERM to each rank and its children, SIGKILL to those
still running 30 s later."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import suppress

import psutil

STOP_GRACE_SECONDS = 30  # launch.py's terminate_process_tree


def stop(ranks: list[subprocess.Popen], status: int) -> None:
    procs = []
    for rank in ranks:
        with suppress(psutil.NoSuchProcess):  # any of them may end meanwhile
            parent = psutil.Process(rank.pid)
            procs += [*parent.children(recursive=True), parent]
    for proc in procs:
        with suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(procs, timeout=STOP_GRACE_SECONDS)
    for proc in alive:
        with suppress(psutil.NoSuchProcess):
            proc.kill()
    sys.exit(status)


def main(argv: list[str]) -> None:
    nproc, port, *program = argv
    module = program[:1] == ["--module"]
    script, *args = program[module:]
    world = int(nproc)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": nproc, "CROSS_RANK": "0",
           "CROSS_SIZE": "1", "LOCAL_SIZE": nproc, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(world)))}
    python = [sys.executable, "-u", *(["-m"] if module else [])]
    ranks = [subprocess.Popen([*python, script, f"--local_rank={rank}", *args],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(world)]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop(ranks, 1))
    while running := [r for r in ranks if r.poll() is None]:
        failed = [r.returncode for r in ranks if r.returncode not in (None, 0)]
        if failed:
            stop(running, failed[0])
        time.sleep(0.1)
    sys.exit(next((r.returncode for r in ranks if r.returncode), 0))


if __name__ == "__main__":
    main(sys.argv[1:])
