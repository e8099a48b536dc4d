"""Multi-process jobs started by tests: a free port, a quiet single-threaded environment, and a timeout that
kills the whole job (launcher and ranks), then fails every later job at once instead of letting each one hang
for its own timeout."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_hung: str | None = None  # the first job that ran past its timeout, if any


FIRST_PORT, EPHEMERAL_PORTS, PORTS_PER_WORKER = 20000, 32768, 1000
PORT_RANGES = (EPHEMERAL_PORTS - FIRST_PORT) // PORTS_PER_WORKER  # 12: workers past the twelfth share them
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A port free on this host now, from a range of this xdist worker's own below the kernel's ephemeral range
    (32768 up), and never the same one twice in a session. Binding port 0 instead let the kernel hand two workers
    the same port in the moment between one's probe and its job's bind, and their ranks joined one rendezvous."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    start = FIRST_PORT + PORTS_PER_WORKER * (int(worker.removeprefix("gw")) % PORT_RANGES)
    for port in range(start, start + PORTS_PER_WORKER):
        if port in _ports_handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # in use, or still in TIME_WAIT
                continue
        _ports_handed_out.add(port)
        return port
    raise RuntimeError(f"no free port left in {start}..{start + PORTS_PER_WORKER - 1} (xdist worker {worker})")


def deepspeed_cmd(nproc: int, *args, port: int | None = None) -> list:
    """`deepspeed --num_gpus N --master_port P ARGS...` with this interpreter's launcher (N CPU ranks here): for the
    tests of what DeepSpeed's launcher does."""
    return [Path(sys.executable).parent / "deepspeed", "--num_gpus", nproc, "--master_port", port or free_port(), *args]


def ranks_cmd(nproc: int, *args, port: int | None = None) -> list:
    """deepspeed_cmd's ranks, as its launcher starts them, by tests/ranks.py: ~5 s sooner, for every other test."""
    return [sys.executable, ROOT / "tests" / "ranks.py", nproc, port or free_port(), *args]


def last_json(stdout: str) -> dict:
    """The last line of `stdout` that is a JSON object (what rank 0 of a test script prints)."""
    return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def job_env(*, gpu: bool = False, **extra: str) -> dict:
    """One thread per rank (2 cores, up to 4 ranks) and a 3-minute collective timeout (DeepSpeed reads
    DEEPSPEED_TIMEOUT, in minutes), so that a stuck rank ends its job with an error rather than sleeping. The ranks
    run on CPU, as in CI, on a GPU host too, unless `gpu` leaves them the host's devices: DS_ACCELERATOR=cpu, which
    the engine honours (DeepSpeed's launcher sets the ranks' CUDA_VISIBLE_DEVICES itself), and no visible device
    for a process started alone."""
    cpu_only = {} if gpu else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DEEPSPEED_TIMEOUT": "3",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])), **cpu_only,
            **extra}


def gpu_host_env(tmp_path: Path, **extra: str) -> dict:
    """job_env's CPU ranks on a host where torch sees a GPU, on any host: a sitecustomize in every process of the job
    makes torch.cuda report one GPU unless CUDA_VISIBLE_DEVICES hides it, as torch does on a one-GPU host. DeepSpeed's
    launcher hands the ranks CUDA_VISIBLE_DEVICES=0..N-1 all the same."""
    site = tmp_path / "gpu_host_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import os\nimport torch\n"
        "torch.cuda.device_count = lambda: 0 if os.environ.get('CUDA_VISIBLE_DEVICES') == '' else 1\n"
        "torch.cuda.is_available = lambda: torch.cuda.device_count() > 0\n")
    env = job_env(**extra)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def start_job(cmd: list, env: dict, merge_stderr: bool = True, cwd: Path = ROOT) -> subprocess.Popen:
    """The job in a session of its own, so that `finish_job` can kill every process it started."""
    if _hung:
        pytest.fail(f"not started: an earlier job hung ({_hung})")
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE, text=True,
                            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE, start_new_session=True)


def finish_job(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """(stdout, stderr) once `proc` exits; past `timeout` seconds its whole session is killed and the test fails."""
    global _hung
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        _hung = f"{' '.join(map(str, proc.args[:6]))} ... after {timeout:.0f} s"
        pytest.fail(f"job killed after {timeout:.0f} s: {proc.args}\n{(out or '')[-4000:]}\n{(err or '')[-4000:]}")
    return out or "", err or ""


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL every process of the job's session, as a machine's time limit kills them all."""
    signal_session(proc, signal.SIGKILL)


def session_pids(proc: subprocess.Popen) -> Iterator[int]:
    """The processes of the job's session (start_job starts each job in a session of its own), also those in process
    groups of their own (`timeout` makes one for the command it runs)."""
    for pid in [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            if os.getsid(pid) == proc.pid:
                yield pid
        except (ProcessLookupError, PermissionError):
            pass


def session_pid(proc: subprocess.Popen, pattern: str) -> int:
    """The pid of the process of the job's session whose command line (words joined by spaces) matches `pattern`."""
    for pid in session_pids(proc):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            continue
        if re.search(pattern, cmdline):
            return pid
    raise AssertionError(f"no process of the job matches {pattern!r}")


def signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Send `sig` to every process of the job's session, as a scheduler signals a whole job."""
    for pid in session_pids(proc):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_job(cmd: list, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`subprocess.run(cmd, capture_output=True, text=True)` from the repo root, with `finish_job`'s timeout."""
    proc = start_job(cmd, job_env() if env is None else env, merge_stderr=False)
    out, err = finish_job(proc, timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_until(proc: subprocess.Popen, ready, timeout: float, what: str) -> None:
    """Poll `ready()` while `proc` runs; kill the job and fail if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_job(proc)
            pytest.fail(f"{what}: not within {timeout:.0f} s (exit {proc.poll()})\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.25)
