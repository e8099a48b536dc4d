"""A rank's failure told to every other rank through the rendezvous store, so that none waits for it.

A rank that fails alone (a corrupt shard on its node's copy of the data, CUDA out of memory, a bug) leaves the others in
their next collective. The launcher on its node stops that node's ranks, but nothing reaches the other nodes of a job
started per node (launch/node.sh, a hostfile): under NCCL they wait until parallel.timeout_minutes, holding their
GPUs; under gloo they fail at once on a closed connection, in a traceback that does not say which rank failed or why.

So the failing rank writes its error line into the store that the ranks met at (rank 0 holds it) before it exits,
and every rank, which a collective may be blocking, watches for such a line in a thread of its own: on one, it prints
it and ends the process. A rank whose collective failed first (gloo) looks for the line instead of showing a
traceback. When rank 0 itself is gone, so is the store: the others say so (rank 0's own log has its error).

A rank killed outright (SIGKILL, the kernel's OOM killer, a crash in native code) writes nothing. The ranks beside it
on its machine see it go: each registers its pid with the store under its machine's identity, and every poll reads
whether the pids of its machine's other ranks still run; a rank that is gone without having said it was leaving is
published for it, for every node to read. A rank alone on its machine, or a whole machine lost (power, kernel,
network), has nobody beside it to see it go: every rank's watch also beats a counter in the store at each poll, and
rank 0's watch publishes a rank whose counter has not moved for the heartbeat timeout. That catches a process gone or
frozen, not one that hangs (its watch thread beats on): a hang is what the process group's timeout is for. A process
gone closes its connections at once, though, and the collectives of the ranks it talked to fail on them first: with
nobody to say why, such a rank publishes the broken connection as such (publish_lost_connection), not as a failure
of its own.

A launcher killed outright (the `deepspeed` runner, or DeepSpeed's per-node deepspeed.launcher.launch that starts the
ranks) cannot stop its ranks: they would train on as orphans, holding their GPUs and writing checkpoints with nobody
watching. Each poll also asks whether this rank's launcher, recorded as the process started (engine/launcher.py says
which processes that is, and why), is gone; if so, and no stop signal comes within ORPHAN_GRACE_SECONDS (the launch
scripts' supervisor sends one at once, so that the ranks checkpoint the step instead), the rank publishes that as its
failure line, for every node, and ends as on any other. A run of one process has no store, but its watch runs for
this alone.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist

from ..fileio import first_line
from . import launcher

KEY = "deepseek_pt/failed"
MACHINE_KEY = "deepseek_pt/ranks_on/{machine}"  # "rank pid start_time;" of each rank on the machine, appended
LEFT_KEY = "deepseek_pt/left/{rank}"  # set by a rank whose ending is deliberate, before its pid goes
BEAT_KEY = "deepseek_pt/beats/{rank}"  # a counter each rank's watch adds 1 to at every poll
HOST_KEY = "deepseek_pt/host/{rank}"  # the rank's hostname, for rank 0 to name a silent rank by
TOLD_KEY = "deepseek_pt/told"  # a counter: ranks other than 0 ending on a failure line, theirs or read
POLL_SECONDS = 5.0
GRACE_SECONDS = 3.0
"""How long a rank whose collective failed waits for the failure it is about to be published (the killed rank's
neighbour sees it go within a poll of its own) before it publishes its own error instead."""
STORE_LOST_POLLS = 3
"""Polls in a row that cannot reach the store before the watcher takes rank 0 for gone (~15 s, up to 45 s where
requests time out): not one failed request, which a busy store host can cause."""
TOLD_WAIT_SECONDS = 2 * POLL_SECONDS + 1
"""How long rank 0 waits for the others to read a failure line before its end takes the store: two of their polls."""
ORPHAN_GRACE_SECONDS = 3.0
"""How long a rank whose launcher is gone waits for a stop signal before it ends as an orphan: the launch scripts'
supervisor, seeing its runner killed, sends the ranks SIGTERM at once (launch/lib.sh), so that they checkpoint the
step; the watch's poll may come first."""
EXIT_CODE = 2
LOST_CONNECTION = ("Connection closed by peer", "Connection reset by peer", "remote process exit", "ncclRemoteError")
"""What gloo's and NCCL's collectives say when a connection to another rank broke: the rank that raises it saw a
failure; it did not fail."""


def lost_connection(error: BaseException) -> str | None:
    """The part of `error` that says a connection to another rank broke (`Connection closed by peer [ADDR]:PORT`),
    or None for any other error."""
    text = str(error)
    for phrase in LOST_CONNECTION:
        if (at := text.find(phrase)) >= 0:
            return first_line(text[at:].split(". ")[0], phrase)
    return None


def _store() -> dist.Store:
    """A connection of its own to the default process group's store (one per thread: a Store is not shared between
    threads), each request bounded so that a store that is gone fails fast. Made at start: connecting once the store
    is gone would retry for the process group's whole timeout."""
    store = dist.distributed_c10d._get_default_store().clone()
    store.set_timeout(timedelta(seconds=10))
    return store


class PeerFailureWatch:
    """Tells the other ranks of this rank's failure (`publish`), and ends this process on another's (`start`)."""

    def __init__(self, rank: int, world: int, poll_seconds: float = POLL_SECONDS,
                 heartbeat_timeout_seconds: float | None = None, launchers: list[launcher.Launcher] | None = None,
                 stopping: Callable[[], bool] = lambda: False):
        """heartbeat_timeout_seconds: how long rank 0 hears nothing from a rank before it publishes it as gone;
        None = never (a rank alone on its machine then waits for the process group's timeout). launchers: the
        processes whose end ends this rank; default: its launcher as the process started. stopping: whether this
        rank is already stopping on a signal (train.py: SIGTERM/SIGINT, a checkpoint at the end of the step), when
        its launcher's end is no reason to end it: a scheduler's SIGTERM reaches every process of the job, and the
        `deepspeed` runner dies of it at once."""
        self.rank, self.world, self.poll_seconds = rank, world, poll_seconds
        self.launchers, self._stopping = launcher.started_under() if launchers is None else launchers, stopping
        self.heartbeat_timeout = heartbeat_timeout_seconds
        self._beats: dict[int, tuple[bytes, float]] = {}  # rank 0: each rank's counter, and when it last moved
        self._stopped = threading.Event()
        self._store: dist.Store | None = None  # the main thread's connection; None alone
        self._machine = machine_identity()
        self._gone: set[int] = set()  # ranks seen gone that had said they were leaving
        self._told_lock, self._counted_told = threading.Lock(), False  # _told counts this rank once, either thread
        # Set by the watch once it ends this process because its launcher is gone: the main thread, whose collective
        # that makes fail, leaves the saying to it (one line). _end_lock: that, or the main thread's stop(), first.
        self._orphaned_end, self._end_lock = threading.Event(), threading.Lock()

    def start(self) -> None:
        """Before the ranks' next collective: a rank still connecting when rank 0 ends would retry for the process
        group's timeout (train.py's check_same_config, engine/distributed.py, follows at once)."""
        if self.world > 1:
            self._store = _store()
            if self._machine is not None:
                start_time = _process(os.getpid())[1]
                self._store.append(MACHINE_KEY.format(machine=self._machine),
                                   f"{self.rank} {os.getpid()} {start_time};")
            self._store.set(HOST_KEY.format(rank=self.rank), socket.gethostname())
            if self.rank == 0 and self.heartbeat_timeout is not None:
                for rank in range(1, self.world):  # every counter exists from here on: multi_get never waits for one
                    self._store.add(BEAT_KEY.format(rank=rank), 0)
            threading.Thread(target=self._watch, args=(_store(),), name="peer-failure-watch", daemon=True).start()
        elif self.launchers:  # alone: nobody to tell, but an orphan all the same
            threading.Thread(target=self._watch, args=(None,), name="launcher-watch", daemon=True).start()

    def stop(self) -> None:
        """From here on this rank's own ending is under way (finished, or failing with the others): no watching, and
        its neighbours are told, before its pid goes, not to take its end for a kill."""
        with self._end_lock:
            if self._stopped.is_set():
                return
            self._stopped.set()
        if self._store is not None:
            try:
                self._store.set(LEFT_KEY.format(rank=self.rank), "")
            except (dist.DistError, RuntimeError):  # the store went with rank 0: nobody is left to mislead
                pass

    def publish(self, error: str) -> None:
        """Write this rank's error line for the others; the first rank's to fail is kept."""
        self._publish(f"rank {self.rank} ({socket.gethostname()}) failed: {first_line(error, error)}")

    def publish_lost_connection(self, error: BaseException) -> str | None:
        """For a collective that failed here on a broken connection (`lost_connection`) while no rank has said why
        (peer_failure found nothing): a line that says so, published for the others in place of this rank's own
        error, which would name it as the rank that failed. A rank alone on its machine that ended without a word
        (killed outright, or its machine lost) is seen first so, by the ranks it talks to, long before rank 0's
        heartbeat timeout names it. None, and nothing published, for any other error."""
        if (broken := lost_connection(error)) is None:
            return None
        line = (f"rank {self.rank} ({socket.gethostname()}) lost its connection to another rank in a collective "
                f"({broken}) and no rank said why: one ended without a word where no rank beside it saw it go "
                "(killed outright, crashed in native code, or its machine lost: see the other nodes' logs and dmesg)")
        return self._publish(line) or line

    def _publish(self, line: str) -> str | None:
        """Write `line` as the job's failure line unless one is there; returns the line that is there, None where
        the store is gone (or there is none: a run of one process)."""
        self.stop()
        if self._store is None:
            return None
        try:
            there = self._store.compare_set(KEY, "", line).decode()
        except (dist.DistError, RuntimeError):  # the store went with rank 0: nobody is left to tell
            return None
        self._told(self._store)
        return there

    def peer_failure(self, grace_seconds: float = GRACE_SECONDS) -> str | None:
        """Another rank's failure (published, or a neighbour's pid gone), or the store's loss (rank 0's end), if any
        within `grace_seconds`: what a collective that failed here is about."""
        if self._orphaned_end.is_set():  # the watch is ending this process, its line said: nothing to add
            threading.Event().wait()
        if self._store is None:
            return None
        deadline = time.monotonic() + grace_seconds
        while True:
            try:
                line = self._failure(self._store)
            except (dist.DistError, RuntimeError) as e:
                return _store_lost(e)
            if line is not None:
                self._told(self._store)
                return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.25)

    def _failure(self, store: dist.Store) -> str | None:
        """The first published failure; else a neighbour gone without a word, or (rank 0) a rank silent for the
        heartbeat timeout, published now for the other nodes."""
        if store.check([KEY]):
            return store.get(KEY).decode()
        if (gone := self._killed_neighbour(store) or self._silent_rank(store)) is None:
            return None
        line = store.compare_set(KEY, "", gone).decode()  # another's line, were it published meanwhile
        if line == gone:  # told for the rank that is gone, which cannot say it itself (_told)
            store.add(TOLD_KEY, 1)
        return line

    def _killed_neighbour(self, store: dist.Store) -> str | None:
        """A line for a rank on this machine whose process is gone while it never said it was leaving."""
        if self._machine is None:
            return None
        for entry in store.get(MACHINE_KEY.format(machine=self._machine)).decode().split(";")[:-1]:
            rank, pid, start_time = entry.split()
            rank = int(rank)
            if rank == self.rank or rank in self._gone:
                continue
            state = _process(int(pid))
            if state is not None and state[0] not in "ZX" and state[1] == start_time:
                continue
            if store.check([LEFT_KEY.format(rank=rank)]):
                self._gone.add(rank)
                continue
            return (f"rank {rank} ({socket.gethostname()}, pid {pid}) ended without a word: killed outright "
                    "(SIGKILL, the kernel's OOM killer: see `dmesg`) or crashed in native code (see its node's log)")
        return None

    def _silent_rank(self, store: dist.Store) -> str | None:
        """Rank 0's view: a line for a rank whose beat counter has not moved for the heartbeat timeout while it never
        said it was leaving. Timed by this process's clock between its own reads, so machines' clocks do not
        matter, and a pause of this watch (its host's) does not make the others look silent."""
        if self.rank != 0 or self.heartbeat_timeout is None:
            return None
        ranks = [r for r in range(1, self.world) if r not in self._gone]
        now = time.monotonic()
        for rank, beat in zip(ranks, store.multi_get([BEAT_KEY.format(rank=r) for r in ranks])):
            last = self._beats.get(rank)
            if last is None or last[0] != beat:
                self._beats[rank] = (beat, now)
                continue
            if now - last[1] < self.heartbeat_timeout:
                continue
            if store.check([LEFT_KEY.format(rank=rank)]):
                self._gone.add(rank)
                continue
            host_key = HOST_KEY.format(rank=rank)
            host = store.get(host_key).decode() if store.check([host_key]) else "host unknown"
            return (f"rank {rank} ({host}) silent for {now - last[1]:.0f} s (parallel.heartbeat_timeout_minutes): "
                    "its machine was lost (power, kernel, network) or its process was killed or frozen where no rank "
                    "beside it could see it")
        return None

    def _watch(self, store: dist.Store | None) -> None:
        lost = 0
        while not self._stopped.wait(self.poll_seconds):
            line = None
            if store is not None:
                try:
                    if self.rank != 0:
                        store.add(BEAT_KEY.format(rank=self.rank), 1)
                    line = self._failure(store)
                    lost = 0
                except (dist.DistError, RuntimeError) as e:
                    lost += 1
                    if lost >= STORE_LOST_POLLS:
                        line = _store_lost(e)
            if line is None and not self._stopping() and (gone := launcher.gone(self.launchers)) is not None \
                    and not self._stop_signal_within(ORPHAN_GRACE_SECONDS):
                self._orphaned(store if lost == 0 else None, gone)
            if line is None or self._stopped.is_set():
                continue
            print(f"error: {line}; rank {self.rank} stops too (it would wait for that rank in its next collective)",
                  file=sys.stderr, flush=True)
            if lost == 0:
                self._told(store)
            os._exit(EXIT_CODE)

    def _stop_signal_within(self, seconds: float) -> bool:
        """Whether this rank starts stopping on a signal (or ends on its own) within `seconds`."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            if time.monotonic() >= deadline:
                return False
            if self._stopped.wait(0.05):
                return True
        return True

    def _orphaned(self, store: dist.Store | None, gone: str) -> None:
        """This rank's launcher is gone: published as this rank's failure (a failure published first stays the
        line the others read), said, and the process ended, as on another rank's failure."""
        with self._end_lock:
            if self._stopped.is_set():  # ending already, on its own
                return
            self._orphaned_end.set()
        line = f"rank {self.rank} ({socket.gethostname()}): {gone}"
        if store is not None:
            try:
                store.compare_set(KEY, "", line)
            except (dist.DistError, RuntimeError):  # the store went with rank 0: nobody is left to tell
                store = None
        others = "; the other ranks are told" if store is not None else ""
        print(f"error: {line}; rank {self.rank} stops rather than train on with nobody watching it{others}",
              file=sys.stderr, flush=True)
        if store is not None:
            self._told(store)
        os._exit(EXIT_CODE)

    def _told(self, store: dist.Store) -> None:
        """This rank ends on a failure line, its own or another's: it says so in the store (for a rank gone, whoever
        published its end does); rank 0, whose process holds the store, instead waits until every other rank has (or,
        where more than one is gone, TOLD_WAIT_SECONDS), lest one find the store gone before the line and blame
        rank 0."""
        try:
            if self.rank != 0:
                with self._told_lock:
                    first, self._counted_told = not self._counted_told, True
                if first:
                    store.add(TOLD_KEY, 1)
                return
            deadline = time.monotonic() + TOLD_WAIT_SECONDS
            while store.add(TOLD_KEY, 0) < self.world - 1 and time.monotonic() < deadline:
                time.sleep(0.1)
        except (dist.DistError, RuntimeError):  # the store is gone: nobody is left to wait for
            pass


def _store_lost(e: Exception) -> str:
    return (f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, which rank 0 "
            f"holds, stopped answering ({first_line(str(e), type(e).__name__)}): rank 0 failed or was stopped (see its "
            "log)")


def machine_identity() -> str | None:
    """What tells ranks that they share a machine and a pid namespace, so that one may read the others' processes: the
    kernel's boot id and this process's pid namespace (hostnames repeat across containers). None off Linux."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot_id}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return None


def _process(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process pid, None if there is none: a state of Z (a zombie
    that its launcher has not reaped yet) is a process gone, and another start time a pid reused."""
    fields = launcher.proc_stat(pid)
    return None if fields is None else (fields[0], fields[19])
