"""DeepSpeed's `deepspeed` runner (deepspeed.launcher.runner) with its child's death by a signal passed on.

The runner waits for the process it starts (deepspeed.launcher.launch on this node, or pdsh) and exits with its status
only if that is positive: a child killed by a signal (SIGKILL, the OOM killer) has a negative returncode, and the
runner then exits 0, so the job reports success while its ranks were stopped (they stop when their launcher goes:
deepseek_pt/engine/launcher.py; under launch/lib.sh's supervisor they checkpoint the step first). Here the runner's own main runs unchanged, its Popen recorded, and a child that died
of signal N makes this process exit 128+N, as a shell reports it. Not a user command: launch/*.sh run the runner so.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from deepspeed.launcher import runner

STARTED: list[subprocess.Popen] = []


class _RecordedPopen(subprocess.Popen):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        STARTED.append(self)


def main(argv: list[str]) -> int:
    subprocess.Popen = _RecordedPopen  # runner.main calls subprocess.Popen; nothing else runs in this process
    runner.main(argv)  # exits itself (SystemExit) on its child's positive status
    # Its last Popen is the launcher it waited for (earlier ones are short checks, ssh reachability and the like).
    launched = STARTED[-1] if STARTED else None
    if launched is None or launched.returncode is None or launched.returncode >= 0:
        return 0  # nothing launched (the runner's early exits), or the launcher succeeded
    number = -launched.returncode
    name = signal.Signals(number).name if number in signal.valid_signals() else f"signal {number}"
    args = [str(arg) for arg in launched.args] if isinstance(launched.args, list) else [str(launched.args)]
    what = "deepspeed.launcher.launch" if "deepspeed.launcher.launch" in args else Path(args[0]).name
    print(f"[launch] error: {what} (pid {launched.pid}) was killed by {name}: the job failed", file=sys.stderr)
    return 128 + number


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
