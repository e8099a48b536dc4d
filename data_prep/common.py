"""What every data_prep command line shares: argument types and the error-to-exit-code wrapper."""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable

from deepseek_pt.data import DataError
from deepseek_pt.fileio import describe_os_error, free_space, is_disk_full


def positive_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text.replace("_", ""))
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def make_output_dir(path: Path) -> None:
    """Create the output directory (and its parents); DataError naming it if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, read-only file system...
        raise DataError(f"output directory {path}: cannot create it: {e.strerror}") from None


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None,
            interrupted: str = "interrupted") -> int:
    """Run `main`; bad data becomes `error: ...` and exit status 2, a failed system call (a full disk, a lost
    mount, no permission) `error: ...` and exit status 1, rather than a traceback."""
    try:
        return main(argv)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


@contextlib.contextmanager
def disk_full_named(out: Path, resume: str):
    """A full disk or quota while writing into `out` becomes a DataError naming it, the space left and `resume`:
    the writes themselves (file objects, numpy) raise OSError without a file name."""
    try:
        yield
    except OSError as e:
        if not is_disk_full(e):
            raise
        raise DataError(f"{out}: {e.strerror} ({free_space(out)}); {resume}") from None
