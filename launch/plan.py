"""Facts that launch/*.sh cannot get cheaply from the shell; not a user command.

    plan.py devices                          -> "cuda N" (N GPUs visible to this process) or "cpu 0"
    plan.py run-dir CONFIG [key.path=value]  -> run.dir of the resolved config (prints nothing if
                                                the config is invalid: --check-only reports that)
    plan.py value KEY CONFIG [key.path=value] -> one value (dotted KEY) of the resolved config
    plan.py free-port                        -> a TCP port that is free on this host right now
    plan.py exec-group PROGRAM [ARGS ...]    -> exec PROGRAM in a process group of its own, so that
                                                the supervisor can find and signal every process of
                                                the job, and a terminal's Ctrl-C reaches only the
                                                supervisor (which forwards it)
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def devices() -> str:
    if os.environ.get("DS_ACCELERATOR", "cuda") == "cpu":
        return "cpu 0"
    if not (Path("/dev/nvidiactl").exists() or Path("/proc/driver/nvidia").exists()):
        return "cpu 0"  # no NVIDIA driver: skip the (slow) torch import
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return f"cuda {torch.cuda.device_count()}"
    return "cpu 0"


def value(key: str, config: str, overrides: list[str]) -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from deepseek_pt.config import ConfigError, load_config

    try:
        node = load_config(config, overrides)
    except ConfigError:
        return ""
    for part in key.split("."):
        node = getattr(node, part)
    return "" if node is None else str(node)


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("", 0))
        return str(s.getsockname()[1])


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "devices" and not args:
        print(devices())
    elif cmd == "run-dir" and args:
        print(value("run.dir", args[0], args[1:]))
    elif cmd == "value" and len(args) >= 2:
        print(value(args[0], args[1], args[2:]))
    elif cmd == "free-port" and not args:
        print(free_port())
    elif cmd == "exec-group" and args:
        os.setpgid(0, 0)
        os.execvp(args[0], args)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
