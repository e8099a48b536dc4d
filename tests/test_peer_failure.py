"""engine/peer_failure.py: a rank's failure reaches ranks that a collective holds (NCCL's wait, played here by a rank
that never joins the barrier or sleeps), rank 0's end reaches the others through the store's loss, and a rank killed
outright is seen by the rank beside it on its machine and published for the others. Two or three gloo processes of a
few seconds each; the launch test of two nodes (tests/test_launch.py) runs the whole path through training. A rank
whose launcher is killed outright stops too: under a stand-in launcher in seconds, and through DeepSpeed's own
(slow: a DeepSpeed start-up on 2 CPU ranks)."""
from __future__ import annotations

import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from jobs import ROOT, deepspeed_cmd, finish_job, free_port, job_env, kill_job, start_job, wait_until

LAUNCH_MODULE = "deepspeed.launcher.launch"  # DeepSpeed's per-node launcher, which starts the ranks

# Rank ROLE_RANK plays its role; the other waits in a barrier (or, for "gone", sleeps) with the watch on.
SCRIPT = """
import os, signal, sys, threading, time
import torch.distributed as dist
from deepseek_pt.engine import peer_failure
rank, world, role = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if role.startswith("killed") and rank == 0:
    peer_failure.machine_identity = lambda: "another machine"  # only rank 1 can see rank 2 go
if role in ("silent", "lost_in_barrier"):
    peer_failure.machine_identity = lambda: f"machine {rank}"  # each rank alone on its machine
dist.init_process_group("gloo", rank=rank, world_size=world)
# rank 0's watch asleep where its failed collective is to find the line itself
slow = role == "killed_in_barrier" and rank == 0
heartbeat = 1.5 if role in ("silent", "leaves") else None
stopping = lambda: False
if role in ("orphaned_stopping", "orphaned_then_signalled"):
    from deepseek_pt.train import StopSignal
    stopping = StopSignal().arrived  # as train.py: SIGTERM, a checkpoint at the end of the step
watch = peer_failure.PeerFailureWatch(rank, world, poll_seconds=60 if slow else 0.2,
                                      heartbeat_timeout_seconds=heartbeat, stopping=stopping)
watch.start()
dist.barrier()  # as train.py's check_same_config: every rank holds its store connections before any can end
print("ready", flush=True)
if role in ("killed", "killed_in_barrier", "silent", "lost_in_barrier") and rank == 2:
    os.kill(os.getpid(), signal.SIGKILL)
elif role == "orphaned" and rank == world - 1:
    os.kill(os.getppid(), signal.SIGKILL)  # its launcher killed outright (LAUNCHER): this rank an orphan
    time.sleep(60)
elif role in ("killed", "silent", "orphaned"):
    time.sleep(60)
elif role in ("orphaned_stopping", "orphaned_then_signalled"):
    def preempt():
        os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's stop signal reaches every process of the job...
        os.kill(os.getppid(), signal.SIGKILL)  # ...and its launcher dies of it at once
    def supervised():
        os.kill(os.getppid(), signal.SIGKILL)  # its launcher killed outright; the launch script's supervisor sees it
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # and signals the rank, after a poll
    if rank == 1:
        threading.Timer(0.5, preempt if role == "orphaned_stopping" else supervised).start()
    else:
        time.sleep(2.5)
    dist.barrier()  # rank 1's main thread in it (a C call: Python runs no handler there) for 2 s after the signal
    if rank == 1:
        time.sleep(1)  # the checkpoint at the end of the step
        watch.stop()
        print("finished", flush=True)
        os._exit(0)
    time.sleep(3)
    print("finished", flush=True)
    os._exit(0)
elif role == "killed_in_barrier":
    try:
        dist.barrier()
    except Exception:
        print("collective failed:", watch.peer_failure(), flush=True)
        sys.exit(0)
elif role == "lost_in_barrier":
    try:
        dist.barrier()
    except Exception as e:  # as train.py: what another rank published, else the broken connection as such
        print("collective failed:", watch.peer_failure() or watch.publish_lost_connection(e), flush=True)
        sys.exit(0)
elif role == "leaves":
    if rank == 1:
        watch.stop()
        os._exit(0)  # a deliberate end: rank 0, beside it, must not take it for a kill
    time.sleep(3)  # twice the heartbeat timeout: rank 1's beats stop, but it said it was leaving
    print("finished", flush=True)
    os._exit(0)  # as train.py ends (exit_process): no interpreter finalization beside the watch's thread
elif role == "publish" and rank == 1:
    watch.publish("shard x.bin: corrupt\\nsecond line")
    time.sleep(60)  # alive, never joining: rank 0 would wait for it in any collective
elif role.startswith("gone") and rank == 0:
    os._exit(3)  # rank 0, and with it the store, gone without a word
elif role == "finish":
    watch.stop()
    dist.barrier()
    if rank == 0:
        os._exit(0)  # the store goes at once: the other, past its stop, must not take that for a failure
    time.sleep(2)
    print("finished", flush=True)
    os._exit(0)  # as train.py ends (exit_process): no interpreter finalization beside the watch's thread
elif role == "gone":
    time.sleep(60)
elif role == "gone_in_barrier":
    try:
        dist.barrier()  # gloo fails at once on rank 0's closed connection; train.py then asks the store
    except Exception:
        print("collective failed:", watch.peer_failure(), flush=True)
        sys.exit(0)
else:
    dist.barrier()
print("not stopped", flush=True)
"""


# A stand-in launcher: starts its command as a child and waits for it.
LAUNCHER = [sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])"]


def _ranks(role: str, world: int = 2, launched: tuple[int, ...] = (), linger: float = 8) -> list[tuple[int, str, float]]:
    """Each rank's (exit status, output, seconds from the first end to its own); a rank still running `linger` s after
    the first ended (the one that failed, sleeping on) is killed. The ranks in `launched` start under LAUNCHER, whose
    status and end are what is returned for them (the rank's output is in its)."""
    # LOCAL_RANK, as every launcher sets it: a process without it was started directly and watches no parent
    env = job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), LOCAL_RANK="0")
    started = time.monotonic()
    procs = [start_job([*(LAUNCHER if r in launched else []), sys.executable, "-c", SCRIPT, str(r), str(world), role],
                       env) for r in range(world)]
    ended = {}
    while len(ended) < world and time.monotonic() - started < 90:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic() - started
        if ended and time.monotonic() - started > min(ended.values()) + linger:
            break
        time.sleep(0.1)
    first = min(ended.values(), default=0.0)
    ended = {r: t - first for r, t in ended.items()}
    results = []
    for r, p in enumerate(procs):
        if r not in ended:
            kill_job(p)
        out, _ = finish_job(p, timeout=30)
        results.append((p.returncode, out, ended.get(r, float("inf"))))
    return results


def test_a_rank_waiting_in_a_collective_stops_on_another_ranks_failure():
    (code, out, seconds), _ = _ranks("publish")
    assert code == 2, out
    assert ("error: rank 1 (" in out and ") failed: shard x.bin: corrupt; rank 0 stops too (it would wait for that "
            "rank in its next collective)" in out), out
    assert "second line" not in out and "not stopped" not in out and seconds < 30, (out, seconds)


def test_ranks_stop_when_rank_0_and_its_store_are_gone():
    _, (code, out, seconds) = _ranks("gone")
    assert code == 2, out
    assert "error: the rendezvous store at 127.0.0.1:" in out and "rank 0 failed or was stopped (see its log)" in out
    assert "not stopped" not in out and seconds < 30, (out, seconds)


def test_a_failed_collective_learns_of_rank_0s_end_at_once():
    """After rank 0's end, asking the store must not wait to connect anew (a new connection retries for the process
    group's whole timeout): the main thread's connection is made at start."""
    _, (code, out, seconds) = _ranks("gone_in_barrier")
    assert code == 0 and "collective failed: the rendezvous store at 127.0.0.1:" in out, out
    assert seconds < 30, (out, seconds)


def test_a_stopped_watch_lets_rank_0_leave_first():
    (code0, out0, _), (code1, out1, _) = _ranks("finish")
    assert code0 == 0 and code1 == 0 and "finished" in out1 and "error" not in out1, (out0, out1)


def test_a_rank_killed_outright_is_told_by_its_neighbour_to_every_node():
    """Rank 2 SIGKILLed: rank 1, on its machine, sees its pid go and publishes it; rank 0, on "another machine",
    learns it from the store. Both stop within seconds, not at the process group's timeout."""
    results = _ranks("killed", world=3)
    assert results[2][0] == -signal.SIGKILL, results[2]
    for rank, (code, out, seconds) in enumerate(results[:2]):
        assert code == 2, out
        assert ("error: rank 2 (" in out and "ended without a word: killed outright (SIGKILL, the kernel's OOM killer"
                in out and f"; rank {rank} stops too" in out), out
        assert "not stopped" not in out and seconds < 6, (out, seconds)


def test_a_failed_collective_waits_for_the_killed_ranks_name():
    """gloo fails the barrier on the killed rank's closed connection: rank 0, which cannot see rank 2's machine and
    whose watch sleeps, names rank 2 from its failed collective (not the connection), as rank 1, beside rank 2,
    published it (waiting for that line up to 3 s)."""
    (code0, out0, _), (code1, out1, _), _ = _ranks("killed_in_barrier", world=3)
    assert code0 == 0 and "collective failed: rank 2 (" in out0 and "ended without a word" in out0, out0
    # rank 1 names it from its failed barrier, or its watch saw rank 2 go before gloo failed the barrier there
    assert (code1 == 0 and "collective failed: rank 2 (" in out1) or (code1 == 2 and "error: rank 2 (" in out1), out1
    assert "ended without a word" in out1, out1


def test_a_collective_that_loses_its_connection_to_a_rank_nobody_saw_go_says_so():
    """Each rank alone on its machine, no heartbeat: rank 2 SIGKILLed, gloo fails the others' barrier on its closed
    connection and no rank can say why. The first to find nothing within the grace publishes the broken connection
    as such (not as its own failure, which would name it as the rank that failed); the other reads that line. Rank
    0, which holds the store, waits for the others to have read it, which the unnamed dead rank never does: up to
    TOLD_WAIT_SECONDS."""
    results = _ranks("lost_in_barrier", world=3, linger=25)
    assert results[2][0] == -signal.SIGKILL, results[2]
    lines = []
    for code, out, _ in results[:2]:
        line = re.search(r"collective failed: (.*)", out)
        assert code == 0 and line and " failed: " not in line[1], out
        lines.append(line[1])
    assert lines[0] == lines[1], lines  # one line for the job: the first published
    # gloo says "closed by peer ADDR" when it reads the dead rank's end of the socket, "reset by peer" when it writes to it
    assert re.fullmatch(r"rank [01] \(.*\) lost its connection to another rank in a collective \(Connection "
                        r"(closed by peer \S+|reset by peer)\) and no rank said why: one ended without a word .*",
                        lines[0]), lines[0]


def test_lost_connection_reads_gloos_and_nccls_words():
    from deepseek_pt.engine.peer_failure import lost_connection
    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                        "[10.0.0.7]:35745. This is typically caused by a remote worker crashing.")
    assert lost_connection(gloo) == "Connection closed by peer [10.0.0.7]:35745"
    reset = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Read error [10.0.0.7]:35745: "
                         "Connection reset by peer")
    assert lost_connection(reset) == "Connection reset by peer"
    nccl = RuntimeError("NCCL error in: ProcessGroupNCCL.cpp:1970, remote process exited or there was a network "
                        "error, NCCL version 2.27.3\nncclRemoteError: A call failed possibly due to a network error")
    assert lost_connection(nccl) == "remote process exited or there was a network error, NCCL version 2.27.3"
    assert lost_connection(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")) is None


def test_a_neighbour_that_leaves_deliberately_is_not_taken_for_killed():
    (code0, out0, _), (code1, _, _) = _ranks("leaves")
    assert code1 == 0 and code0 == 0 and "finished" in out0 and "error" not in out0, out0


def test_a_rank_alone_on_its_machine_killed_is_published_by_rank_0_after_the_heartbeat_timeout():
    """Each rank on a machine of its own (a lost machine looks the same): rank 2's beats stop, rank 0 publishes it
    after 1.5 s of silence and rank 1 reads it from the store. Rank 1, alive with its main thread asleep, beats on:
    ranks are checked in order, so a silent-looking rank 1 would be the one named."""
    results = _ranks("silent", world=3)
    assert results[2][0] == -signal.SIGKILL, results[2]
    for rank, (code, out, seconds) in enumerate(results[:2]):
        assert code == 2, out
        assert ("error: rank 2 (" in out and "parallel.heartbeat_timeout_minutes): its machine was lost" in out
                and f"; rank {rank} stops too" in out), out
        assert "not stopped" not in out and 1.5 <= seconds + 0.5 and seconds < 6, (out, seconds)


def test_a_rank_whose_launcher_is_killed_stops_and_tells_the_others():
    """Rank 1's launcher SIGKILLed (rank 1 kills it, once the ranks have met): rank 1, an orphan, sees its parent gone
    at its next poll, says so and ends; rank 0, whose launcher lives, reads that line from the store and stops too.
    test_ranks_stop_when_their_deepspeed_launcher_is_killed runs it through DeepSpeed's own launcher."""
    (code0, out0, seconds), (code1, out1, _) = _ranks("orphaned", launched=(1,))
    assert code1 == -signal.SIGKILL, out1  # the stand-in launcher; rank 1's own output is in out1
    assert re.search(r"^error: rank 1 \(.+\): its launcher \(pid \d+\) is gone \(python\S* -c: killed, or it ended "
                     r"without stopping its ranks\); rank 1 stops rather than train on with nobody watching it; the "
                     r"other ranks are told$", out1, re.MULTILINE), out1
    assert "not stopped" not in out1, out1
    assert code0 == 2, out0
    assert re.search(r"^error: rank 1 \(.+\): its launcher \(pid \d+\) is gone .*; rank 0 stops too", out0,
                     re.MULTILINE), out0
    assert "not stopped" not in out0 and seconds < 6, (out0, seconds)


def test_a_rank_stopping_on_a_signal_is_not_ended_by_its_launchers_end():
    """SIGTERM (preemption) reaches the launcher too: the `deepspeed` runner dies of it at once, while the rank
    checkpoints at the end of its step as asked. Its watch lets it, though its main thread, in a collective, has not
    run train.py's handler yet."""
    (code0, out0, _), (code1, out1, _) = _ranks("orphaned_stopping", launched=(1,))
    assert code1 == -signal.SIGKILL and "finished" in out1 and "error" not in out1, out1
    assert code0 == 0 and "finished" in out0 and "error" not in out0, out0


def test_a_rank_whose_launcher_is_killed_waits_for_the_supervisors_signal():
    """The launch scripts' supervisor answers its runner's death by SIGTERM to the ranks, so that they checkpoint the
    step: a second after the launcher's end (five of the watch's polls here), within ORPHAN_GRACE_SECONDS, the rank
    is stopping, not ended as an orphan."""
    (code0, out0, _), (code1, out1, _) = _ranks("orphaned_then_signalled", launched=(1,))
    assert code1 == -signal.SIGKILL and "finished" in out1 and "error" not in out1, out1
    assert code0 == 0 and "finished" in out0 and "error" not in out0, out0


def test_a_process_alone_whose_launcher_is_killed_stops():
    """One process (no store, no other rank): its watch runs for its launcher alone."""
    ((code, out, _),) = _ranks("orphaned", world=1, launched=(0,))
    assert code == -signal.SIGKILL, out
    assert re.search(r"^error: rank 0 \(.+\): its launcher \(pid \d+\) is gone \(python\S* -c: killed, or it ended "
                     r"without stopping its ranks\); rank 0 stops rather than train on with nobody watching it$", out,
                     re.MULTILINE), out
    assert "not stopped" not in out, out


def _children(pid: int) -> list[int]:
    found = []
    for p in Path("/proc").iterdir():
        try:
            stat = (p / "stat").read_text()
        except (OSError, ValueError):
            continue
        if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
            found.append(int(p.name))
    return found


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].split()[0] not in "ZX"  # a zombie (init yet to reap it) has ended


def _gpus_short_of(ranks: int) -> bool:
    """Whether this machine shows CUDA GPUs but fewer than `ranks`: DeepSpeed's launcher gives each rank a GPU where
    it sees any (on one GPU, the second rank's is cuda:1, out of range)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() < ranks


@pytest.mark.slow
@pytest.mark.skipif(_gpus_short_of(2), reason="2 ranks through deepspeed's launcher need 2 GPUs where it sees one")
@pytest.mark.parametrize("killed", ["deepspeed", LAUNCH_MODULE])
def test_ranks_stop_when_their_deepspeed_launcher_is_killed(tmp_path, smoke_shards, killed):
    """Two ranks (CPU ones in CI) training through the real `deepspeed` launcher; SIGKILL to the runner (`deepspeed`: the ranks'
    parent, DeepSpeed's per-node launch.py, lives on and does nothing) or to launch.py alone (the ranks reparented),
    not to their process group. Both ranks end within a poll or two of their watch, naming the launcher gone, and
    none goes on to a checkpoint."""
    run_dir = tmp_path / "run"
    proc = start_job(deepspeed_cmd(2, "--module", "deepseek_pt.train", "--config", ROOT / "configs" / "smoke.yaml",
                                   f"data.path={smoke_shards}", f"run.dir={run_dir}", "train.max_steps=100000",
                                   "train.eval_every=0", "train.save_every=0"), job_env())
    try:
        metrics = run_dir / "metrics.jsonl"
        wait_until(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 300, "a training step")
        (launch,) = _children(proc.pid)
        ranks = _children(launch)
        assert len(ranks) == 2 and LAUNCH_MODULE in Path(f"/proc/{launch}/cmdline").read_text(), ranks
        victim = proc.pid if killed == "deepspeed" else launch
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        while any(_running(r) for r in ranks) and time.monotonic() - killed_at < 30:
            time.sleep(0.1)
        seconds = time.monotonic() - killed_at
        if any(_running(r) for r in ranks):
            kill_job(proc)  # the orphans (still of the job's session), so that their output can be read
        out, _ = finish_job(proc, 60)  # its output pipe: open while any rank, or launch.py, runs
    finally:
        kill_job(proc)
    assert seconds < 20, (seconds, out[-4000:])
    name = f"deepspeed, above {LAUNCH_MODULE} pid {launch}" if killed == "deepspeed" else LAUNCH_MODULE
    gone = re.escape(f"its launcher (pid {victim}) is gone ({name}: killed, or it ended without stopping its ranks)")
    for rank in range(2):
        assert re.search(rf"^error: rank \d \(.+\): {gone}; rank {rank} stops", out, re.MULTILINE), out[-4000:]
    assert not (run_dir / "checkpoints" / "latest").exists(), out[-4000:]
    print(f"{killed} killed: both ranks gone {seconds:.1f} s later", *re.findall(r"^error: .*$", out, re.MULTILINE),
          sep="\n")


def test_a_process_started_directly_watches_no_launcher(monkeypatch):
    """Without LOCAL_RANK (no launcher started it: `python -m deepseek_pt.train` from a shell) the parent is a shell or
    a script that may end by design (`nohup ... &`): nothing is watched. With it, the parent is."""
    from deepseek_pt.engine import launcher

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert launcher.launchers() == []
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert [found.pid for found in launcher.launchers()][:1] == [os.getppid()]
