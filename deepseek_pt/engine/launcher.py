"""The launcher a rank was started by, recorded at the process's start, and whether it is gone.

A launcher killed outright (SIGKILL, the kernel's OOM killer) cannot stop the ranks it started: they are reparented
(to init, or to a subreaper) and train on, holding their GPUs and writing checkpoints with nobody watching. So a
rank records its launcher here, at import (train.py imports this before torch, whose import takes seconds, so that a
launcher lost meanwhile is still the one recorded), and the peer-failure watch (engine/peer_failure.py) asks at each
poll whether it is gone, and ends the run if so.

What is watched is the rank's parent, whatever it is: DeepSpeed's per-node deepspeed.launcher.launch (launch/
train.sh, node.sh, slurm.sbatch and hostfile.sh all start the ranks through it), torchrun's agent, slurmstepd for
ranks that srun starts directly, multiprocessing's parent. Where the parent is deepspeed.launcher.launch, whatever
started it is watched too: launch.py does nothing when its own parent goes, so the `deepspeed` runner SIGKILLed above
it would leave it, and the ranks, running. That is the runner (train.sh, node.sh, slurm.sbatch: the runner
starts launch.py on its own node); under hostfile.sh's pdsh, on each host, the process that ssh started it in (sshd's
session process, or the remote shell), which may go with the connection (not tested here: no second host). Nothing
above that (train.sh's supervisor, a shell, nohup) is watched: those may end by design while the job runs on.

A process started without a launcher (`python -m deepseek_pt.train` from a shell, one process; every launcher sets
LOCAL_RANK in its ranks' environment, a shell does not) watches nothing: its parent is a shell or a job script, which
may end by design while the run goes on (`nohup python -m deepseek_pt.train ... &`, then logging out). A parent of
pid 1 (init, or a container's own entrypoint) or 0 (outside this process's pid namespace) is not watched either: it
goes only with the machine or the container, and the ranks with it.

A rank already stopping on SIGTERM/SIGINT (train.py's checkpoint at the end of the step) is not ended: a scheduler's
SIGTERM reaches every process of the job, and the runner, which has no handler, dies of it at once
(PeerFailureWatch's `stopping`).

Not the kernel's PR_SET_PDEATHSIG: it fires when the parent *thread* that forked the rank ends, not the process; it
sees only the parent, not the runner above launch.py; and it can only send a signal, which Python handles in the
main thread, between bytecodes (a rank blocked in a collective would not see it), and where SIGTERM already means
"checkpoint at the end of the step" here. Polling from the watch's thread costs a getppid() and, under
deepspeed.launcher.launch, one read of its /proc stat every 5 s.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

LAUNCH_MODULE = "deepspeed.launcher.launch"


class Launcher(NamedTuple):
    pid: int
    name: str
    """What it runs, for the message: a module run with -m, a script, or a program."""
    child: int
    """The process whose parent it is: this one, or deepspeed.launcher.launch above it."""


def launchers() -> list[Launcher]:
    """This process's launcher(s) now: its parent, and, where that is deepspeed.launcher.launch, the parent of that;
    none where no launcher started it (no LOCAL_RANK) or the parent is init or outside this pid namespace."""
    parent = os.getppid()
    if parent <= 1 or "LOCAL_RANK" not in os.environ:
        return []
    found = [Launcher(parent, _name(parent), os.getpid())]
    if found[0].name == LAUNCH_MODULE and (above := _parent(parent) or 0) > 1:
        found.append(Launcher(above, _name(above), parent))
    return found


def gone(watched: list[Launcher]) -> str | None:
    """A message for the first of `watched` that is gone (its child reparented: a pid reused since cannot fool it),
    None while all run."""
    for launcher in watched:
        parent = os.getppid() if launcher.child == os.getpid() else _parent(launcher.child)
        if parent == launcher.pid:
            continue
        above = "" if launcher.child == os.getpid() else f", above {LAUNCH_MODULE} pid {launcher.child}"
        return (f"its launcher (pid {launcher.pid}) is gone ({launcher.name}{above}: killed, or it ended without "
                "stopping its ranks)")
    return None


def proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name ([0] state, [1] parent pid, [19] start time in clock ticks since
    boot); None if there is no such process (or no /proc: off Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces


def _parent(pid: int) -> int | None:
    """The parent pid of process pid, None if it is gone (or no /proc: off Linux, only the parent is watched)."""
    fields = proc_stat(pid)
    return None if fields is None or fields[0] in "ZX" else int(fields[1])


def _name(pid: int) -> str:
    """What process pid runs: the module a Python runs with -m, or its script, or the program."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        argv = []
    if not argv or not argv[0]:
        return "its parent process"
    if Path(argv[0]).name.startswith("python"):
        for i, arg in enumerate(argv[1:], 1):
            if arg in ("-m", "-c"):
                return argv[i + 1] if arg == "-m" and i + 1 < len(argv) else f"{Path(argv[0]).name} {arg}"
            if not arg.startswith("-"):
                return Path(arg).name
    return Path(argv[0]).name


def started_under() -> list[Launcher]:
    """This process's launchers as it started (this module's import); in a process forked since, its own now."""
    return STARTED_UNDER if _RECORDED_IN == os.getpid() else launchers()


STARTED_UNDER, _RECORDED_IN = launchers(), os.getpid()
"""This process's launchers as it started (this module's import), and its pid."""
