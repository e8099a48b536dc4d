"""A rank's failure told to every other rank through the rendezvous store, so that none waits for it.

A rank that fails alone (a corrupt shard on its node's copy of the data, CUDA out of memory, a bug) leaves the others in
their next collective. The launcher on its node stops that node's ranks, but nothing reaches the other nodes of a job
started per node (launch/node.sh, a hostfile): under NCCL they wait until parallel.timeout_minutes, holding their
GPUs; under gloo they fail at once on a closed connection, in a traceback that does not say which rank failed or why.

So the failing rank writes its error line into the store that the ranks met at (rank 0 holds it) before it exits,
and every rank, which a collective may be blocking, watches for such a line in a thread of its own: on one, it prints
it and ends the process. A rank whose collective failed first (gloo) looks for the line instead of showing a
traceback. When rank 0 itself is gone, so is the store: the others say so (rank 0's own log has its error).
"""
from __future__ import annotations

import os
import socket
import sys
import threading
from datetime import timedelta

import torch.distributed as dist

from ..fileio import first_line

KEY = "deepseek_pt/failed"
POLL_SECONDS = 5.0
STORE_LOST_POLLS = 3
"""Polls in a row that cannot reach the store before the watcher takes rank 0 for gone (~15 s, up to 45 s where
requests time out): not one failed request, which a busy store host can cause."""
EXIT_CODE = 2


def _store() -> dist.Store:
    """A connection of its own to the default process group's store (one per thread: a Store is not shared between
    threads), each request bounded so that a store that is gone fails fast. Made at start: connecting once the store
    is gone would retry for the process group's whole timeout."""
    store = dist.distributed_c10d._get_default_store().clone()
    store.set_timeout(timedelta(seconds=10))
    return store


class PeerFailureWatch:
    """Tells the other ranks of this rank's failure (`publish`), and ends this process on another's (`start`)."""

    def __init__(self, rank: int, world: int, poll_seconds: float = POLL_SECONDS):
        self.rank, self.world, self.poll_seconds = rank, world, poll_seconds
        self._stopped = threading.Event()
        self._store: dist.Store | None = None  # the main thread's connection; None alone

    def start(self) -> None:
        """Before the ranks' next collective: a rank still connecting when rank 0 ends would retry for the process
        group's timeout (train.py's check_same_config follows at once)."""
        if self.world > 1:
            self._store = _store()
            threading.Thread(target=self._watch, args=(_store(),), name="peer-failure-watch", daemon=True).start()

    def stop(self) -> None:
        """From here on this rank's own ending is under way (finished, or failing with the others): no watching."""
        self._stopped.set()

    def publish(self, error: str) -> None:
        """Write this rank's error line for the others; the first rank's to fail is kept."""
        self.stop()
        if self._store is None:
            return
        try:
            self._store.compare_set(KEY, "", f"rank {self.rank} ({socket.gethostname()}) failed: "
                                             f"{first_line(error, error)}")
        except (dist.DistError, RuntimeError):  # the store went with rank 0: nobody is left to tell
            pass

    def peer_failure(self) -> str | None:
        """Another rank's published failure, or the store's loss (rank 0's end), if either: what a collective that
        failed here is about."""
        if self._store is None:
            return None
        try:
            return self._store.get(KEY).decode() if self._store.check([KEY]) else None
        except (dist.DistError, RuntimeError) as e:
            return _store_lost(e)

    def _watch(self, store: dist.Store) -> None:
        lost = 0
        while not self._stopped.wait(self.poll_seconds):
            try:
                failed = store.check([KEY])
                line = store.get(KEY).decode() if failed else None
                lost = 0
            except (dist.DistError, RuntimeError) as e:
                lost += 1
                if lost < STORE_LOST_POLLS:
                    continue
                line = _store_lost(e)
            if line is None or self._stopped.is_set():
                continue
            print(f"error: {line}; rank {self.rank} stops too (it would wait for that rank in its next collective)",
                  file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)


def _store_lost(e: Exception) -> str:
    return (f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, which rank 0 "
            f"holds, stopped answering ({first_line(str(e), type(e).__name__)}): rank 0 failed or was stopped (see its "
            "log)")
