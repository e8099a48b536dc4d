"""launch/: config refused before anything starts, two nodes of one job on this machine (node.sh
directly, and slurm.sbatch through stand-in srun/scontrol), and SIGTERM -> checkpoint + exit 0.

The multi-process tests train the smoke model on the pydoc shards (conftest) for a few steps on CPU
(gloo); each costs one DeepSpeed start-up (~10-20 s on 2 cores).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jobs import (finish_job, free_port, job_env, kill_job, run_job, session_pid, signal_session, start_job,
                  wait_until)

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
SMOKE = ROOT / "configs" / "smoke.yaml"
STEPS = 5
TIMEOUT = 400


def _env(**extra: str) -> dict:
    """The job environment without the host's launch variables, and a master port from this test worker's range
    (train.sh's own pick binds port 0, which can hand two workers one port; the README's smoke run covers it)."""
    if "MASTER_PORT" not in extra:
        extra["MASTER_PORT"] = str(free_port())
    env = {k: v for k, v in job_env(PYTHON=sys.executable, **extra).items()
           if k in extra or not (k.startswith("SLURM_") or k in {"NODE_RANK", "NNODES", "MASTER_ADDR", "MASTER_PORT",
                                                                 "NPROC", "NPROC_PER_NODE", "WORLD_SIZE", "RANK"})}
    return env


def _overrides(data: Path, run_dir: Path, *more: str) -> list[str]:
    return [f"data.path={data}", f"run.dir={run_dir}", f"train.max_steps={STEPS}", "train.eval_every=0",
            "train.save_every=0", *more]


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stopped_with_a_checkpoint(run_dir: Path, out: str) -> int:
    """The step the two ranks stopped at on a signal, checked: said so, and its checkpoint complete for both."""
    last = _metrics(run_dir)[-1]["step"]
    assert f"stopped at step {last}: signal" in out, out[-4000:]
    meta = json.loads((run_dir / "checkpoints" / f"step_{last:08d}" / "meta.json").read_text())
    assert meta["step"] == last and meta["world_size"] == 2
    return last


def _assert_trained_together(run_dir: Path, world: int, steps: int = STEPS) -> None:
    """One checkpoint holding every rank's files, and one finite loss per step, falling."""
    root = run_dir / "checkpoints"
    tag = f"step_{steps:08d}"
    assert (root / "latest").read_text().strip() == tag
    meta = json.loads((root / tag / "meta.json").read_text())
    assert meta["world_size"] == world and meta["step"] == steps
    for r in range(world):
        for kind in ("model", "optim"):
            assert (root / tag / f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt").is_file(), (r, kind)
        assert (root / tag / "rng" / f"rank_{r}.pt").is_file()
    assert not (root / tag / f"zero_pp_rank_{world}_mp_rank_00_model_states.pt").exists()
    metrics = _metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    losses = [m["loss"] for m in metrics]
    assert all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


def _run(cmd: list, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_job(cmd, env, timeout)


@pytest.fixture(scope="module")
def data(pydoc_data_dir) -> Path:
    return pydoc_data_dir.shards_dir


# ------------------------------------------------------------------------------------------------
# Refused before start: non-zero exit, the key named, no run directory


@pytest.mark.parametrize("script, env, args, message", [
    ("train.sh", {}, ["train.max_stepz=3"], "train.max_stepz: unknown key"),
    ("train.sh", {}, ["model.moe.top_k=9"], "model.moe.top_k: 9 > model.moe.n_routed_experts"),
    ("train.sh", {"NPROC": "3"}, [], "parallel.expert_parallel_size: 2 does not divide the world size (3 processes)"),
    ("node.sh", {"NNODES": "3", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, [],
     "parallel.expert_parallel_size: 2 does not divide the world size (3 processes)"),
    ("node.sh", {"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "127.0.0.1"}, [], "NODE_RANK=2: expected 0 .. 1"),
    # 2**64 wraps to 0 in bash arithmetic: refused, not taken for node 0
    ("node.sh", {"NNODES": "2", "NODE_RANK": "18446744073709551616", "MASTER_ADDR": "127.0.0.1"}, [],
     "NODE_RANK=18446744073709551616: expected 0 .. 1"),
    ("node.sh", {"NNODES": "2", "NODE_RANK": "0"}, [], "MASTER_ADDR is not set"),
    ("train.sh", {"MASTER_PORT": "abc"}, [], "MASTER_PORT=abc: not a port"),
    ("train.sh", {"DRAIN_TIMEOUT": "1m"}, [], "DRAIN_TIMEOUT=1m: expected seconds, a positive integer"),
    ("train.sh", {"DRAIN_TIMEOUT": "0"}, [], "DRAIN_TIMEOUT=0: expected seconds, a positive integer"),
    # the host-memory check counts this node's processes (1), not the job's (2): a ~7 TB model refused for 1
    ("node.sh", {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "NPROC_PER_NODE": "1"},
     ["parallel.zero_init=false", "model.inter_dim=10000000000"], "in fp32 in each of this node's 1 processes"),
])
def test_bad_config_is_refused_before_start(tmp_path, data, script, env, args, message):
    run_dir = tmp_path / "run"
    proc = _run([LAUNCH / script, SMOKE, *_overrides(data, run_dir, *args)], _env(**env))
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr, proc.stderr
    assert "running:" not in proc.stderr
    assert not run_dir.exists()


def test_missing_config_and_usage(tmp_path):
    proc = _run([LAUNCH / "train.sh", tmp_path / "nope.yaml"], _env())
    assert proc.returncode == 2 and "nope.yaml: config file not found" in proc.stderr
    for script in ("train.sh", "node.sh", "hostfile.sh"):
        proc = _run([LAUNCH / script], _env())
        assert proc.returncode == 2 and "CONFIG [key.path=value ...]" in proc.stderr, (script, proc.stderr)
        assert "set -euo pipefail" not in proc.stderr, (script, proc.stderr)  # the header comment only
    proc = _run([LAUNCH / "smoke.sh", "not-an-override"], _env())
    assert proc.returncode == 2 and "launch/smoke.sh [key.path=value ...]" in proc.stderr, proc.stderr
    assert "set -euo pipefail" not in proc.stderr, proc.stderr
    for script in ("train.sh", "node.sh", "hostfile.sh", "smoke.sh"):  # asked for: on stdout, and success
        for flag in ("-h", "--help"):
            proc = _run([LAUNCH / script, flag], _env())
            assert proc.returncode == 0 and "key.path=value" in proc.stdout and not proc.stderr, (script, flag, proc)


def test_train_sh_refuses_device_uuids(tmp_path, data):
    """The runner's --include takes numeric ids only: GPU-/MIG- UUIDs are refused up front, not by a traceback."""
    python = tmp_path / "python"  # stand-in: this host "has" 2 GPUs; anything else goes to the real interpreter
    python.write_text(f'#!/usr/bin/env bash\n[[ $1 == */plan.py && $2 == devices ]] && {{ echo "cuda 2"; exit 0; }}\n'
                      f'exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    proc = _run([LAUNCH / "train.sh", SMOKE, *_overrides(data, tmp_path / "run")],
                {**_env(CUDA_VISIBLE_DEVICES="GPU-0a1b,GPU-2c3d"), "PYTHON": str(python)})
    assert proc.returncode == 2, proc.stderr
    assert "CUDA_VISIBLE_DEVICES=GPU-0a1b,GPU-2c3d: train.sh needs numeric device ids" in proc.stderr, proc.stderr
    assert "running:" not in proc.stderr


def test_bad_hostfile_is_named(tmp_path, data):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# workers\nworker-0 slots=2\nworker-1 slot=2\n")
    proc = _run([LAUNCH / "hostfile.sh", hostfile, SMOKE, *_overrides(data, tmp_path / "run")], _env())
    assert proc.returncode == 2 and f"{hostfile}:3: expected 'HOST slots=N', got 'worker-1 slot=2'" in proc.stderr
    hostfile.write_text("worker-0 slots=2\n")
    proc = _run([LAUNCH / "hostfile.sh", hostfile, SMOKE, *_overrides(data, tmp_path / "run")], _env(MASTER_PORT="70000"))
    assert proc.returncode == 2 and "MASTER_PORT=70000: not a port" in proc.stderr, proc.stderr
    assert "running:" not in proc.stderr


def test_hostfile_hands_every_host_the_multicast_settings(tmp_path, data):
    """The runner forwards NCCL* variables to the other hosts only when the host it starts on has a GPU: the
    NVLink-multicast settings go into the environment file it hands them, whatever this host has."""
    (tmp_path / "hosts").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")
    python = bin_dir / "python"  # stand-in: the runner's call keeps the environment file; the rest runs for real
    python.write_text(f'#!/usr/bin/env bash\n[[ $1 == */deepspeed_runner.py ]] && '
                      f'{{ cp "$DS_ENV_FILE" {tmp_path}/handed_env; exit 0; }}\nexec {sys.executable} "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**_env(MASTER_ADDR="10.0.0.1"), "PYTHON": str(python), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = _run([LAUNCH / "hostfile.sh", tmp_path / "hosts", SMOKE, *_overrides(data, tmp_path / "run")], env)
    assert proc.returncode == 0, proc.stderr
    handed = (tmp_path / "handed_env").read_text().splitlines()
    for setting in ("NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"):
        assert setting in handed, handed


def test_hostfile_unreachable_host_is_named_before_start(tmp_path, data):
    """Several hosts, pdsh installed, no passwordless ssh to the first: one clear line and exit 2, nothing launched
    (it was the deepspeed runner's traceback, RuntimeError: ... not reachable via ssh)."""
    (tmp_path / "hosts").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "ssh").write_text("#!/bin/sh\necho 'worker-0: Permission denied (publickey).' >&2\nexit 255\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    env = {**_env(MASTER_ADDR="10.0.0.1"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = _run([LAUNCH / "hostfile.sh", tmp_path / "hosts", SMOKE, *_overrides(data, tmp_path / "run")], env)
    assert proc.returncode == 2, proc.stderr
    assert "worker-0: not reachable over passwordless ssh" in proc.stderr, proc.stderr
    assert "Permission denied (publickey)" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "running:" not in proc.stderr and not (tmp_path / "run").exists()


# pdsh as the runner calls it (`pdsh -S -f N -w HOST,HOST [launcher args] COMMAND WORDS`), every host on this
# machine: the words run through bash as ssh would run them, %n the host's index, the largest status returned (-S).
FAKE_PDSH = """#!/usr/bin/env bash
while [[ $1 == -* ]]; do case $1 in -w) hosts=$2; shift 2 ;; -f) shift 2 ;; *) shift ;; esac; done
IFS=, read -r -a names <<<"$hosts"
command="$*"
pids=()
for i in "${!names[@]}"; do bash -c "${command//%n/$i}" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || { s=$?; ((s > status)) && status=$s; }; done
exit "$status"
"""


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["sigterm", "runner-killed"])
def test_hostfile_sh_two_hosts_through_pdsh_and_sigterm(tmp_path, data, stop):
    """hostfile.sh's multi-host path for real but for the machines: two hosts of one slot, the runner's pdsh
    command run for both on this machine (a stand-in pdsh; ssh answers yes). They rendezvous and train as ranks 0
    and 1; SIGTERM to hostfile.sh reaches the ranks through its own pdsh command (remote_stop), both checkpoint the
    step, and everything exits 0. The runner SIGKILLed instead leaves pdsh, under which every host's launch.py and
    ranks would train on unwatched (the drain kills only this host's pdsh, after DRAIN_TIMEOUT): hostfile.sh stops
    them the same way at once, and exits 137 once they have checkpointed."""
    (tmp_path / "hosts").write_text("worker-0 slots=1\nworker-1 slots=1\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pdsh").write_text(FAKE_PDSH)
    (bin_dir / "ssh").write_text("#!/bin/sh\nexit 0\n")
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    run_dir = tmp_path / "run"
    env = {**_env(MASTER_ADDR="127.0.0.1", DRAIN_TIMEOUT=str(TIMEOUT)),
           "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = start_job([LAUNCH / "hostfile.sh", tmp_path / "hosts", SMOKE,
                      *_overrides(data, run_dir, "train.max_steps=100000")], env)
    try:
        wait_until(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= 2, TIMEOUT,
                   "2 training steps")
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        else:
            os.kill(session_pid(proc, r"deepspeed_runner[.]py --hostfile"), signal.SIGKILL)
        out, _ = finish_job(proc, TIMEOUT - 60)  # well before DRAIN_TIMEOUT
    finally:
        kill_job(proc)
    assert "2 hosts (worker-0 worker-1), 2 processes" in out, out[-4000:]
    if stop == "sigterm":
        assert proc.returncode == 0, out[-4000:]
        assert "SIGTERM: asking the ranks on every host to checkpoint" in out, out[-4000:]
    else:
        assert proc.returncode == 137, out[-4000:]
        assert ("the launcher was killed (exit 137) while processes of the job run on: asking the ranks on every "
                "host to checkpoint") in out, out[-4000:]
    last = _stopped_with_a_checkpoint(run_dir, out)
    if stop == "runner-killed":
        assert f"the ranks stopped: checkpoint step {last} completed after the launcher was killed" in out, out[-4000:]


@pytest.mark.parametrize("text, env, message", [
    # the runner reads these as 2 and 0 slots: a typo'd count, and a host that would get no process
    ("worker-0 slots=2x\n", {}, ":1: expected 'HOST slots=N', got 'worker-0 slots=2x'"),
    ("worker-0 slots=2\nworker-1 slots=0\n", {}, ":2: expected 'HOST slots=N', got 'worker-1 slots=0'"),
    # --num_gpus K starts K processes per host whatever its slots say (GPUs it does not have)
    ("worker-0 slots=2\n", {"NPROC_PER_NODE": "4"}, "NPROC_PER_NODE=4: more than the 2 slots of worker-0"),
])
def test_hostfile_slots_are_checked(tmp_path, data, text, env, message):
    (tmp_path / "hosts").write_text(text)
    proc = _run([LAUNCH / "hostfile.sh", tmp_path / "hosts", SMOKE, *_overrides(data, tmp_path / "run")], _env(**env))
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "running:" not in proc.stderr


# ------------------------------------------------------------------------------------------------
# Two nodes of one job on this machine


def _two_nodes(data, run_dir, *overrides_per_node, cwds=(ROOT, ROOT)):
    """node.sh as two nodes of one rank each on this machine, each with its own extra overrides (and working
    directory): the processes, and their output once both ended."""
    port = str(free_port())
    nodes = [start_job([LAUNCH / "node.sh", SMOKE, *_overrides(data, run_dir, *more)],
                       _env(NNODES="2", NODE_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port), cwd=cwd)
             for r, (more, cwd) in enumerate(zip(overrides_per_node, cwds, strict=True))]
    try:
        return nodes, [finish_job(p, TIMEOUT)[0] for p in nodes]
    finally:
        for p in nodes:
            kill_job(p)


@pytest.mark.slow
def test_node_sh_two_nodes_one_rank_each(tmp_path, data):
    run_dir = tmp_path / "run"
    nodes, outs = _two_nodes(data, run_dir, (), ())
    for p, out in zip(nodes, outs):
        assert p.returncode == 0, out[-4000:]
    assert "ranks 1..1 of 2" in outs[1] and "stopped at step 5" in outs[0]
    _assert_trained_together(run_dir, world=2)


@pytest.mark.slow
def test_node_sh_nodes_with_different_configs_are_refused(tmp_path, data):
    """node.sh on each node with other overrides: refused on every node, the key named (it trained on silently)."""
    run_dir = tmp_path / "run"
    nodes, outs = _two_nodes(data, run_dir, (), ("train.lr=0.01",))
    for p, out in zip(nodes, outs):
        assert p.returncode == 2, out[-4000:]
        assert "different configurations: train.lr: 0.003 on rank 0, 0.01 on rank 1" in out, out[-4000:]
    assert not (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_node_sh_a_rank_failing_alone_stops_the_other_node(tmp_path, data):
    """Each node reads its own copy of the data (data.path relative to its working directory), and node 1's is
    corrupt past the start: rank 1 fails mid-run, and rank 0, on the other node, stops at once with rank 1's error
    (under gloo it died in the next collective in a traceback; under NCCL it would wait for parallel.timeout_minutes)."""
    for node in ("node0", "node1"):
        shutil.copytree(data, tmp_path / node / "shards")
    for shard in sorted((tmp_path / "node1" / "shards").glob("train-*.bin")):
        tokens = np.fromfile(shard, dtype=np.uint16)
        tokens[len(tokens) // 4:] = 60000  # ids past the vocabulary: found as samples are read, not at start
        tokens.tofile(shard)
    run_dir = tmp_path / "run"
    nodes, outs = _two_nodes("shards", run_dir, ("train.max_steps=50",), ("train.max_steps=50",),
                             cwds=(tmp_path / "node0", tmp_path / "node1"))
    assert nodes[1].returncode == 2 and "(corrupt shard)" in outs[1], outs[1][-4000:]
    assert nodes[0].returncode == 2, outs[0][-4000:]
    assert re.search(r"^error: rank 1 \(.+\) failed: shard .*node1/shards/train-\d+\.bin: token \d+ has id 60000 >= "
                     r"vocab_size \d+ \(corrupt shard\); rank 0 stops too$", outs[0], re.MULTILINE), outs[0][-4000:]
    assert "Traceback" not in outs[0], outs[0][-4000:]
    assert len(_metrics(run_dir)) < 50


@pytest.mark.slow
def test_node_sh_alone_fails_the_rendezvous_clearly(tmp_path, data):
    """Node 0 of 2 started alone: a line saying what it waits for, then a clear error (it was a torch traceback)."""
    run_dir = tmp_path / "run"
    proc = _run([LAUNCH / "node.sh", SMOKE, *_overrides(data, run_dir, "parallel.timeout_minutes=0.1")],
                _env(NNODES="2", NODE_RANK="0", MASTER_ADDR="127.0.0.1"), timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-4000:]
    assert "rendezvous: waiting for 2 processes at 127.0.0.1:" in out, out[-4000:]
    assert "failed (at most 0.1 minutes, parallel.timeout_minutes): not every one of the 2 processes joined" in out
    assert "Traceback" not in out, out[-4000:]


STAND_INS = {
    # srun --ntasks-per-node=1 --nodes=N ... CMD: CMD once per "node", each with its SLURM_NODEID
    "srun": """#!/usr/bin/env bash
nodes=$SLURM_JOB_NUM_NODES
while [[ $1 == --* ]]; do [[ $1 == --nodes=* ]] && nodes=${1#--nodes=}; shift; done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
trap 'kill -USR1 "${pids[@]}"' USR1
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
""",
    "scontrol": """#!/usr/bin/env bash
[[ $1 == show && $2 == hostnames ]] && printf '127.0.0.1\\n127.0.0.2\\n'
""",
}


@pytest.mark.slow
def test_slurm_sbatch_two_nodes_two_ranks_each(tmp_path, data):
    """slurm.sbatch as SLURM would run it, with srun/scontrol stand-ins: two node.sh on this machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in STAND_INS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    run_dir = tmp_path / "run"
    env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="n[1-2]",
               SLURM_JOB_NUM_NODES="2", SLURM_SUBMIT_DIR=str(ROOT), NPROC_PER_NODE="2",
               NODE_RANK="7")  # a stray NODE_RANK must not leak into the nodes
    proc = _run(["bash", LAUNCH / "slurm.sbatch", SMOKE, *_overrides(data, run_dir)], env, timeout=TIMEOUT)
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-4000:])
    assert "2 nodes, master 127.0.0.1" in proc.stderr
    _assert_trained_together(run_dir, world=4)


# ------------------------------------------------------------------------------------------------
# Preemption


def test_signal_before_the_launcher_has_its_process_group(tmp_path, data):
    """A SIGTERM between the launcher's start and its setpgid (plan.py exec-group) must still stop it."""
    python = tmp_path / "python"  # stand-in: a slow exec-group start widens that window to seconds
    python.write_text(f'#!/usr/bin/env bash\n[[ $2 == exec-group ]] && sleep 5\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    run_dir = tmp_path / "run"
    proc = start_job([LAUNCH / "train.sh", SMOKE, *_overrides(data, run_dir, "train.max_steps=100000")],
                     {**_env(NPROC="2"), "PYTHON": str(python)})
    try:
        started = ["pgrep", "-f", f"exec-group .*run.dir={run_dir}"]
        wait_until(proc, lambda: subprocess.run(started, check=False).returncode == 0, 60, "the launcher's start")
        proc.send_signal(signal.SIGTERM)
        out, _ = finish_job(proc, 60)
    finally:
        kill_job(proc)
    assert proc.returncode != 0 and "stopped on SIGTERM without a new complete checkpoint" in out, out[-4000:]
    assert not run_dir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])  # SIGHUP: the terminal or ssh session went away
def test_train_sh_sigterm(tmp_path, data, sig):
    """SIGTERM to train.sh: the ranks checkpoint the step they are in and everything exits 0."""
    run_dir = tmp_path / "run"
    proc = start_job([LAUNCH / "train.sh", SMOKE, *_overrides(data, run_dir, "train.max_steps=100000")], _env(NPROC="2"))
    try:
        wait_until(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= 2, TIMEOUT,
                   "2 training steps")
        proc.send_signal(getattr(signal, sig))  # to train.sh alone, as a scheduler or `kill PID` would
        out, _ = finish_job(proc, TIMEOUT)
    finally:
        kill_job(proc)  # ranks the script left running would train on for 100000 steps
    assert proc.returncode == 0, out[-4000:]
    assert f"[launch] {sig}: asking the ranks" in out and "stopped at step" in out, out[-4000:]
    last = _stopped_with_a_checkpoint(run_dir, out)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    leftover = subprocess.run(["pgrep", "-f", f"run.dir={run_dir}"], capture_output=True, text=True, check=False).stdout
    assert not leftover.strip(), leftover


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["runner", "launch.py"])
def test_train_sh_checkpoints_when_its_launcher_is_killed(tmp_path, data, victim):
    """SIGKILL to the runner, or to DeepSpeed's launch.py under it (the OOM killer, a `kill -9`), leaves ranks that
    their watch would end as orphans without a checkpoint: train.sh's supervisor sends them SIGTERM at once, they
    checkpoint the step, and it exits 137 (the job failed) naming that checkpoint."""
    run_dir = tmp_path / "run"
    proc = start_job([LAUNCH / "train.sh", SMOKE, *_overrides(data, run_dir, "train.max_steps=100000")], _env(NPROC="2"))
    try:
        wait_until(proc, lambda: (run_dir / "metrics.jsonl").exists() and len(_metrics(run_dir)) >= 2, TIMEOUT,
                   "2 training steps")
        pattern = r"deepspeed_runner[.]py --hostfile" if victim == "runner" else r"-m deepspeed[.]launcher[.]launch "
        os.kill(session_pid(proc, pattern), signal.SIGKILL)
        out, _ = finish_job(proc, TIMEOUT - 60)  # well before DRAIN_TIMEOUT
    finally:
        kill_job(proc)
    assert proc.returncode == 137, out[-4000:]
    assert re.search(r"^\[launch\] the launcher was killed \(exit 137\) while processes of the job run on: asking the "
                     r"ranks \(\d+ \d+\) to checkpoint", out, re.MULTILINE), out[-4000:]
    assert "stops rather than train on" not in out, out[-4000:]
    last = _stopped_with_a_checkpoint(run_dir, out)
    assert f"the ranks stopped: checkpoint step {last} completed after the launcher was killed" in out, out[-4000:]


def test_smoke_refuses_a_smoke_dir_a_training_run_holds(tmp_path):
    """A second smoke.sh in the SMOKE_DIR of one still training removed the first's checkpoints under it."""
    import fcntl

    smoke_dir = tmp_path / "smoke"
    smoke_dir.mkdir()
    (smoke_dir / "checkpoints").mkdir()
    with open(smoke_dir / ".lock", "a+") as lock:  # as deepseek_pt.train holds its run.dir
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("pid 123 on host\n")
        lock.flush()
        proc = _run([LAUNCH / "smoke.sh"], _env(SMOKE_DIR=str(smoke_dir)), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{smoke_dir} is in use by a training run (pid 123 on host): wait for it to end" in proc.stderr
    assert (smoke_dir / "checkpoints").is_dir()


@pytest.mark.slow
def test_smoke_removes_only_its_own_outputs_from_smoke_dir(tmp_path, data):
    """smoke.sh started each training from scratch by deleting everything in SMOKE_DIR but data/ and prep/: a
    SMOKE_DIR naming a directory in use (a home, a project) lost all of it."""
    smoke_dir = tmp_path / "smoke"
    shutil.copytree(data, smoke_dir / "data")  # verified shards: reused
    (smoke_dir / "notes.txt").write_text("keep me")
    (smoke_dir / "project").mkdir()
    (smoke_dir / "metrics.jsonl").write_text('{"step": 99, "loss": 0.0}\n')  # an earlier smoke run's
    proc = _run([LAUNCH / "smoke.sh", "train.max_steps=6", "train.eval_every=0", "train.save_every=0"],
                _env(SMOKE_DIR=str(smoke_dir)), timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (smoke_dir / "notes.txt").read_text() == "keep me" and (smoke_dir / "project").is_dir()
    assert [m["step"] for m in _metrics(smoke_dir)] == list(range(1, 7))


# ------------------------------------------------------------------------------------------------
# The launch plan and the supervisor with a stand-in deepspeed runner: the scripts and their config check run for
# real, the runner's launcher and ranks are bash stand-ins (seconds, not a DeepSpeed start-up each)

MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}

STAND_IN_PYTHON = """#!/usr/bin/env bash
[[ $1 == */plan.py && $2 == devices && -n ${FAKE_DEVICES:-} ]] && { echo "$FAKE_DEVICES"; exit 0; }
if [[ $1 == */deepspeed_runner.py ]]; then
    printf '%s\\n' "${@:2}" >"$MARKS/runner_args"
    cp "$3" "$MARKS/hostfile"
    env >"$MARKS/runner_env"
    [[ -z ${FAKE_RUNNER_EXIT:-} ]] || exit "$FAKE_RUNNER_EXIT"
    exec bash "$MARKS/launcher.sh" deepspeed.launcher.launch "$@"  # named as pgrep finds a launcher
fi
exec PYTHON "$@"
"""

STAND_IN_LAUNCHER = """
run_dir=
for a in "$@"; do [[ $a == run.dir=* ]] && run_dir=${a#run.dir=}; done
[[ -z ${FAKE_ORPHAN:-} ]] || { sleep 300 & exit 0; }  # a process of the job outliving the launcher
pids=()
for ((r = 0; r < 2; r++)); do bash "$MARKS/rank.sh" "$run_dir" "$r" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit "$status"
"""

STAND_IN_RANK = """
run_dir=$1 rank=$2
save() {  # a checkpoint as rank 0 writes it (meta.json last), then `latest` naming it
    mkdir -p "$run_dir/checkpoints/$1"
    [[ ${2:-} == incomplete ]] || echo '{}' >"$run_dir/checkpoints/$1/meta.json"
    echo "$1" >"$run_dir/checkpoints/latest"
}
on_term() {
    echo "rank $rank: SIGTERM" >>"$MARKS/terms"
    case $FAKE_ON_TERM in
        save) ((rank)) || save step_00000009; exit 0 ;;
        save-then-fail) ((rank)) || save step_00000009; exit 1 ;;
        save-incomplete-then-fail) ((rank)) || save step_00000009 incomplete; exit 1 ;;
        fail) exit 1 ;;
        ignore) ;;
    esac
}
trap on_term TERM
touch "$MARKS/rank_$rank.started"
while :; do sleep 0.1; done
"""


def _stand_in(tmp_path: Path, script: str, args: list, **env: str) -> tuple[subprocess.Popen, Path]:
    """`script` started with the stand-in runner (MARKS: what it was handed, and its ranks' progress)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (marks / "launcher.sh").write_text(STAND_IN_LAUNCHER)
    (marks / "rank.sh").write_text(STAND_IN_RANK)
    python = marks / "python"
    python.write_text(STAND_IN_PYTHON.replace("PYTHON", sys.executable))
    python.chmod(0o755)
    environ = {k: v for k, v in _env(**env).items() if k not in MULTICAST}
    return start_job([LAUNCH / script, SMOKE, *args], {**environ, "PYTHON": str(python), "MARKS": str(marks)},
                     merge_stderr=False), marks


def _ranks_started(proc: subprocess.Popen, marks: Path) -> None:
    wait_until(proc, lambda: all((marks / f"rank_{r}.started").exists() for r in range(2)), 120, "the ranks' start")


def test_node_sh_plan(tmp_path, data):
    """Node 1 of 2 with 2 of 3 visible GPUs (ids 2,3): ranks 2..3 of 4, checked for 4 processes with 2 per node, a
    placeholder hostfile whose slots cover device id 3, --include naming ids 2,3 on every node, the NVLink-multicast
    settings in the ranks' environment, and the run.dir the overrides give."""
    run_dir = tmp_path / "run"
    proc, marks = _stand_in(tmp_path, "node.sh", _overrides(data, run_dir), NNODES="2", NODE_RANK="1",
                            MASTER_ADDR="10.0.0.1", MASTER_PORT="29999", NPROC_PER_NODE="2",
                            CUDA_VISIBLE_DEVICES="2,3,5", FAKE_DEVICES="cuda 3", FAKE_RUNNER_EXIT="0")
    _, err = finish_job(proc, 120)
    assert proc.returncode == 0, err[-4000:]
    assert "node 1 of 2: 2 processes (ranks 2..3 of 4), master 10.0.0.1:29999" in err, err
    assert f"config ok for 4 processes: {SMOKE} -> run.dir {run_dir}" in err, err
    assert (marks / "hostfile").read_text().splitlines() == ["node0 slots=4", "node1 slots=4"]
    args = (marks / "runner_args").read_text().splitlines()
    assert args[args.index("--include") + 1] == "node0:2,3@node1:2,3", args
    assert args[args.index("--node_rank") + 1] == "1" and "--no_ssh" in args, args
    handed = (marks / "runner_env").read_text().splitlines()
    for name, value in MULTICAST.items():
        assert f"{name}={value}" in handed, name


def test_train_sh_names_the_visible_devices(tmp_path, data):
    """CUDA_VISIBLE_DEVICES=3,5,6 and NPROC=2: the runner is given --include localhost:3,5 (with --num_gpus it would
    drop CUDA_VISIBLE_DEVICES and use devices 0,1), and the ranks the NVLink-multicast settings."""
    proc, marks = _stand_in(tmp_path, "train.sh", _overrides(data, tmp_path / "run"), NPROC="2",
                            CUDA_VISIBLE_DEVICES="3,5,6", FAKE_DEVICES="cuda 3", FAKE_RUNNER_EXIT="0")
    _, err = finish_job(proc, 120)
    assert proc.returncode == 0, err[-4000:]
    args = (marks / "runner_args").read_text().splitlines()
    assert args[args.index("--include") + 1] == "localhost:3,5" and "--num_gpus" not in args, args
    handed = (marks / "runner_env").read_text().splitlines()
    for name, value in MULTICAST.items():
        assert f"{name}={value}" in handed, name


@pytest.mark.parametrize("on_term, before, status, message", [
    # every rank exited 0
    ("save", "step_00000005", 0, "every rank exited cleanly; latest checkpoint step 9"),
    # the launcher fails (e.g. signalled too), but a checkpoint newer than the signal's `latest` completed
    ("save-then-fail", "step_00000005", 0, "checkpoint step 9 completed after the signal (launcher exit 1)"),
    ("save-then-fail", None, 0, "checkpoint step 9 completed after the signal (launcher exit 1)"),
    # no new checkpoint: the one `latest` named when the signal came is not one made after it
    ("fail", "step_00000009", 1, "without a new complete checkpoint (launcher exit 1); latest complete: step 9"),
    # `latest` names a checkpoint without its meta.json (incomplete): not a resume point
    ("save-incomplete-then-fail", "step_00000005", 1, "without a new complete checkpoint (launcher exit 1); latest complete: step -1"),
])
def test_exit_status_after_a_stop_signal(tmp_path, data, on_term, before, status, message):
    """The status after SIGTERM: 0 when every rank exited 0 or a checkpoint newer than the one `latest` named when the
    signal came is complete; else the launcher's."""
    run_dir = tmp_path / "run"
    proc, marks = _stand_in(tmp_path, "train.sh", _overrides(data, run_dir), FAKE_ON_TERM=on_term)
    try:
        _ranks_started(proc, marks)
        if before:  # saved while training (train.save_every), before the signal
            (run_dir / "checkpoints" / before).mkdir(parents=True)
            (run_dir / "checkpoints" / before / "meta.json").write_text("{}")
            (run_dir / "checkpoints" / "latest").write_text(before + "\n")
        proc.send_signal(signal.SIGTERM)
        _, err = finish_job(proc, 60)
    finally:
        kill_job(proc)
    assert proc.returncode == status, err[-4000:]
    assert f"stopped on SIGTERM: {message}" in err or f"stopped on SIGTERM {message}" in err, err[-4000:]


def test_sigusr1_to_every_process_of_the_job(tmp_path, data):
    """SLURM's --signal=USR1@T reaches every process of the step: only the supervisor acts on it (the launcher and
    ranks ignore it), so the ranks checkpoint and everything exits 0."""
    run_dir = tmp_path / "run"
    proc, marks = _stand_in(tmp_path, "train.sh", _overrides(data, run_dir), FAKE_ON_TERM="save")
    try:
        _ranks_started(proc, marks)
        signal_session(proc, signal.SIGUSR1)
        _, err = finish_job(proc, 60)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, err[-4000:]
    assert "[launch] SIGUSR1: asking the ranks" in err and "every rank exited cleanly" in err, err[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000009"


def test_a_second_signal_kills_the_job(tmp_path, data):
    """Ranks that do not stop on the first SIGTERM: a second one kills every process of the job at once."""
    run_dir = tmp_path / "run"
    proc, marks = _stand_in(tmp_path, "train.sh", _overrides(data, run_dir), FAKE_ON_TERM="ignore")
    try:
        _ranks_started(proc, marks)
        proc.send_signal(signal.SIGTERM)
        wait_until(proc, lambda: (marks / "terms").exists() and len((marks / "terms").read_text().splitlines()) == 2,
                   60, "the ranks' SIGTERM")
        proc.send_signal(signal.SIGTERM)
        _, err = finish_job(proc, 60)
    finally:
        kill_job(proc)
    assert proc.returncode != 0, err[-4000:]
    assert "SIGTERM again: killing the job now" in err, err[-4000:]
    leftover = subprocess.run(["pgrep", "-f", f"{marks}/rank.sh"], capture_output=True, text=True, check=False).stdout
    assert not leftover.strip(), leftover


@pytest.mark.parametrize("drain, seconds", [("2", 2), ("08", 8)])  # 08: decimal, as validated (octal: an error)
def test_processes_outliving_the_launcher_are_killed_after_drain_timeout(tmp_path, data, drain, seconds):
    """A process of the job still running when the launcher has exited is killed DRAIN_TIMEOUT seconds later."""
    proc, _ = _stand_in(tmp_path, "train.sh", _overrides(data, tmp_path / "run"), FAKE_ORPHAN="1", DRAIN_TIMEOUT=drain)
    try:
        _, err = finish_job(proc, 60)
    finally:
        kill_job(proc)
    assert proc.returncode == 0, err[-4000:]
    assert f"processes of the job still alive {seconds}s after the launcher exited: killing them" in err, err[-4000:]
    assert "value too great for base" not in err, err[-4000:]


@pytest.mark.parametrize("rank_does, status, message", [
    ("os.kill(os.getppid(), signal.SIGKILL)", 128 + signal.SIGKILL,
     r"\[launch\] error: deepspeed.launcher.launch \(pid \d+\) was killed by SIGKILL: the job failed$"),
    ("sys.exit(3)", 3, None),
    ("sys.exit(0)", 0, None),
])
def test_runner_passes_on_its_launchers_death_by_a_signal(tmp_path, rank_does, status, message):
    """DeepSpeed's runner exits 0 when launch.py dies of a signal (it passes on only a positive status): the job
    would report success. launch/deepspeed_runner.py, the real runner and launch.py under it, exits 128+N then, and a
    rank's own status as the runner does."""
    rank = tmp_path / "rank.py"
    rank.write_text(f"import os, signal, sys\n{rank_does}\n")
    env = job_env(PYTHONWARNINGS="ignore")
    proc = _run([sys.executable, LAUNCH / "deepspeed_runner.py", "--hostfile", "/dev/null", "--num_gpus", "1",
                 "--master_port", str(free_port()), rank], env, timeout=120)
    assert proc.returncode == status, proc.stderr[-3000:]
    if message:
        assert re.search(message, proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    else:
        assert "was killed by" not in proc.stderr, proc.stderr[-3000:]
