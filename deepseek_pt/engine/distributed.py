"""The ranks' process group: its rendezvous (a launcher's environment, or one process alone), the checks that every
rank runs the same config, and the small collectives the loop agrees through."""
from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import Config, differences
from ..fileio import first_line
from .accelerator import no_gpu_here, on_gpu
from .preflight import PreflightError

RENDEZVOUS_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def rendezvous_env() -> str | None:
    """Started without a launcher (no variable of RENDEZVOUS_ENV set): one process, with a rendezvous of its own on
    this host, where DeepSpeed would look for MPI (a traceback without mpi4py); returns a line saying so. With some
    of them set but not all, or by SLURM's srun with several tasks and none set, refuses, naming what is missing."""
    given = [k for k in RENDEZVOUS_ENV if k in os.environ]
    if given:
        missing = [k for k in RENDEZVOUS_ENV if k not in os.environ]
        if missing:
            raise PreflightError(f"the environment sets {', '.join(given)} but not {', '.join(missing)}: start the "
                                 "ranks with a launcher (launch/train.sh, deepspeed, torchrun), or set none of them "
                                 "to run one process")
        return None
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return None  # an MPI launch: DeepSpeed's own discovery (mpi4py) sets them
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        raise PreflightError(f"SLURM started {os.environ['SLURM_NTASKS']} tasks without {', '.join(RENDEZVOUS_ENV)}: "
                             "submit launch/slurm.sbatch (one deepspeed launcher per node), not srun python")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return f"one process (no launcher's {', '.join(RENDEZVOUS_ENV)} in the environment): rendezvous on 127.0.0.1:{port}"


def _skip_cpu_shm_allreduce() -> None:
    """A CPU process group makes DeepSpeed JIT-build its shared-memory all-reduce (meant for tensor-parallel
    inference) and give every rank a 69 MB /dev/shm segment that is never unlinked: runs leak them until /dev/shm
    is full, and where /dev/shm is small (64 MB in a default container) the ranks block at start. Training never
    uses that op, so it is marked incompatible, which DeepSpeed reads as "skip it"."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    import deepspeed

    # Here, not in preflight: --check-only may run on a launch host without the ranks' GPUs (launch/hostfile.sh).
    if cfg.parallel.backend == "nccl" and not (on_gpu() and dist.is_nccl_available()):
        raise PreflightError("parallel.backend: nccl needs CUDA GPUs and a torch built with NCCL, and "
                             f"{'this torch has no NCCL' if on_gpu() else no_gpu_here()}: "
                             "use parallel.backend=auto (gloo on CPU) or gloo")
    if alone := rendezvous_env():
        print(alone, flush=True)

    backend = cfg.parallel.backend if cfg.parallel.backend != "auto" else ("nccl" if on_gpu() else "gloo")
    if backend == "gloo":
        _skip_cpu_shm_allreduce()
    timeout = cfg.parallel.timeout_minutes
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    waited = f"{timeout:g} minutes, parallel.timeout_minutes" if timeout else "DeepSpeed's default timeout"
    if world > 1 and int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print(f"rendezvous: waiting for {world} processes at {where} (at most {waited})", flush=True)
    try:
        deepspeed.init_distributed(dist_backend=backend, **({"timeout": timedelta(minutes=timeout)} if timeout else {}))
    except dist.DistError as e:  # DistStoreError (timed out), DistNetworkError (the store's host left first)
        reason = first_line(str(e), type(e).__name__)
        raise PreflightError(f"rendezvous at {where} failed (at most {waited}): not every one of the {world} "
                             f"processes joined ({reason}). Start node.sh on every node, each with its own NODE_RANK and "
                             "the same NNODES, NPROC_PER_NODE, MASTER_ADDR and MASTER_PORT") from None
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def check_same_config(cfg: Config, world: int) -> None:
    """Refuse, on every rank, a job whose ranks resolved different configurations (node.sh run with another CONFIG or
    other overrides on some node): a different model fails deep inside a collective, a different train.max_steps
    hangs at the next one, and a different train.lr or seed trains on silently."""
    if world == 1:
        return
    everyone: list = [None] * world
    dist.all_gather_object(everyone, cfg)
    for r, other in enumerate(everyone[1:], start=1):
        if differ := differences(everyone[0], other):
            shown = "; ".join(f"{k}: {x!r} on rank 0, {y!r} on rank {r}" for k, x, y in differ[:5])
            more = f" (and {len(differ) - 5} more)" if len(differ) > 5 else ""
            raise PreflightError(f"the ranks were started with different configurations: {shown}{more}. Every node "
                                 "must get the same CONFIG and overrides")


def agree(flags: list[bool], device) -> list[bool]:
    """Each flag true on every rank if it is true on any (ranks see signals and clocks at different moments)."""
    t = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """The mean over the ranks of each named scalar, in float64: one all-reduce and one host sync for all."""
    t = torch.stack([v.detach().double().reshape(()) for v in values.values()])
    dist.all_reduce(t)
    return dict(zip(values, (t / dist.get_world_size()).tolist(), strict=True))
