"""engine/peer_failure.py: a rank's failure reaches ranks that a collective holds (NCCL's wait, played here by a rank
that never joins the barrier or sleeps), rank 0's end reaches the others through the store's loss, and a rank killed
outright is seen by the rank beside it on its machine and published for the others. Two or three gloo processes of a
few seconds each; the launch test of two nodes (tests/test_launch.py) runs the whole path through training."""
from __future__ import annotations

import signal
import sys
import time

from jobs import finish_job, free_port, job_env, kill_job, start_job

# Rank ROLE_RANK plays its role; the other waits in a barrier (or, for "gone", sleeps) with the watch on.
SCRIPT = """
import os, signal, sys, time
import torch.distributed as dist
from deepseek_pt.engine import peer_failure
rank, world, role = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
if role.startswith("killed") and rank == 0:
    peer_failure.machine_identity = lambda: "another machine"  # only rank 1 can see rank 2 go
if role == "silent":
    peer_failure.machine_identity = lambda: f"machine {rank}"  # each rank alone on its machine
dist.init_process_group("gloo", rank=rank, world_size=world)
# rank 0's watch asleep where its failed collective is to find the line itself
slow = role == "killed_in_barrier" and rank == 0
heartbeat = 1.5 if role in ("silent", "leaves") else None
watch = peer_failure.PeerFailureWatch(rank, world, poll_seconds=60 if slow else 0.2,
                                      heartbeat_timeout_seconds=heartbeat)
watch.start()
dist.barrier()  # as train.py's check_same_config: every rank holds its store connections before any can end
print("ready", flush=True)
if role in ("killed", "killed_in_barrier", "silent") and rank == 2:
    os.kill(os.getpid(), signal.SIGKILL)
elif role in ("killed", "silent"):
    time.sleep(60)
elif role == "killed_in_barrier":
    try:
        dist.barrier()
    except Exception:
        print("collective failed:", watch.peer_failure(), flush=True)
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


def _ranks(role: str, world: int = 2) -> list[tuple[int, str, float]]:
    """Each rank's (exit status, output, seconds from the first end to its own); a rank still running 8 s after
    the first ended (the one that failed, sleeping on) is killed."""
    env = job_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    started = time.monotonic()
    procs = [start_job([sys.executable, "-c", SCRIPT, str(r), str(world), role], env) for r in range(world)]
    ended = {}
    while len(ended) < world and time.monotonic() - started < 90:
        for r, p in enumerate(procs):
            if r not in ended and p.poll() is not None:
                ended[r] = time.monotonic() - started
        if ended and time.monotonic() - started > min(ended.values()) + 8:
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
