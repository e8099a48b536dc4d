"""Durable file writes and checksums shared by shards, checkpoints, exports and configs, and the limit on how deeply
the JSON and YAML they read may nest.

Every write lands under a temporary name, is fsynced, renamed over the target, and the directory is
synced: a reader sees the old content or the complete new one, never a torn file, even after a crash.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def sha256_file(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


DISK_FULL_SIGNS = ("No space left on device", "Disk quota exceeded", "unexpected pos")
"""A full disk in an error's text, where no errno comes with it: the OS's words (also in safetensors' errors and a
subprocess's output), and torch.save's when a write came up short."""


def is_disk_full(error: BaseException | str) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(sign in str(error) for sign in DISK_FULL_SIGNS)


def first_line(text: str, otherwise: str) -> str:
    """The first line of an error's text, for a one-line message (torch's and DeepSpeed's errors carry C++ frames or
    a traceback below it); `otherwise` when the text is blank."""
    return text.strip().splitlines()[0] if text.strip() else otherwise


def size_text(n: int) -> str:
    """n bytes for a message: GiB from one GiB up, else MiB."""
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def free_space(path: str | Path) -> str:
    """`N GiB free` (or MiB) on the filesystem that holds `path` (or its nearest existing parent), for a full disk's
    message; `free space unknown` where that cannot be read."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{size_text(shutil.disk_usage(path).free)} free"
    except OSError:
        return "free space unknown"


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a tool whose reader went away (`yes | head`)


def stdout_reader_gone() -> int:
    """For a command line whose stdout's reader closed the pipe (`... | head`): stop quietly, as Unix tools do. Points
    stdout at /dev/null, so that the interpreter's last flush does not print a traceback, and returns the exit status
    SIGPIPE would have given."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return SIGPIPE_EXIT


def describe_os_error(e: OSError) -> str:
    """`FILE: reason` for a user's error line, where str(e) reads `[Errno 28] No space left on device: 'FILE'`."""
    if e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` for a writer (torch.save, safetensors...) to fill; on a
    clean exit it is fsynced and renamed over `path`, on an error removed. The temporary name ends in `path`'s
    suffix, for writers that choose a format by it (torch's chrome trace gzips a `.gz`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        # the mode a plain open() gives: some writers create their file private (safetensors: 0600), which would
        # hide a run's exports and checkpoints from the rest of a team
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a failed write names no file, a failed open the temporary one: name the file written
        if e.errno is not None:
            e.filename, e.filename2 = str(path), None
        raise
    except Exception as e:  # a writer's own error type (torch.save's, safetensors'): a full disk as the OS says it
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


MAX_NESTING = 100
"""How many levels of lists and mappings inside each other a config or JSON file we read may hold: ours nest five at
most, an HF config.json a few more. Python's JSON and YAML parsers, copy.deepcopy and repr recurse once per level, so
a file nested thousands deep failed with a RecursionError from deep inside one of them, at whichever ran out first."""


class NestedTooDeeply(ValueError):
    """Input nested deeper than MAX_NESTING (or than the parser could recurse); the caller names the file."""

    def __init__(self):
        super().__init__(f"nested too deeply: lists or mappings more than {MAX_NESTING} levels inside each other")


def check_nesting(value: Any) -> Any:
    """`value` (parsed JSON or YAML) if it nests at most MAX_NESTING levels deep, else NestedTooDeeply. Walks level by
    level, not recursing: the check must not fail the way it guards against."""
    seen: set[int] = set()  # YAML aliases share a node: walked once (a chain of them would multiply the walk)
    level = [value]
    for _ in range(MAX_NESTING):
        below = []  # the lists and mappings one level down
        for node in level:
            if isinstance(node, (list, dict)) and id(node) not in seen:
                seen.add(id(node))
                below += [v for v in (node.values() if isinstance(node, dict) else node) if isinstance(v, (list, dict))]
        if not below:
            return value
        level = below
    raise NestedTooDeeply


def loads_json(text: str) -> Any:
    """json.loads, refusing input nested deeper than MAX_NESTING with NestedTooDeeply (a ValueError, as the parser's
    own JSONDecodeError is), not a RecursionError from inside the parser or from whatever walks the value later."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise NestedTooDeeply from None
    return check_nesting(value)


def read_json(file: Path, error: type[Exception]) -> Any:
    """The JSON value in `file`, or `error` (the reader's own exception class) naming the file where it is not UTF-8
    text, not JSON, or nested too deeply. A missing or unreadable file stays an OSError: each reader says what a
    missing file means."""
    try:
        return loads_json(file.read_text())
    except NestedTooDeeply as e:
        raise error(f"{file}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:  # not text: a corrupt file, named
        raise error(f"{file}: not valid JSON: {e}") from None
