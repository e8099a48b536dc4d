"""What the generate / evaluate / convert command lines share: user errors become `error: ...` on
stderr and exit status 2, never a traceback."""
from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

from ..config import ConfigError
from ..data import DataError
from ..engine.model_states import allocation_failure
from ..export import DTYPES, ExportError
from ..fileio import describe_os_error, stdout_reader_gone
from .hf import HFConversionError

DTYPE_CHOICES = {**DTYPES, "bf16": torch.bfloat16, "fp32": torch.float32}
"""--dtype's values: torch's names, and the short ones the config's `precision` and `engine.export` use."""


class UsageError(ValueError):
    """Arguments that do not fit the checkpoint or data (caught by run_cli)."""


USER_ERRORS = (UsageError, ExportError, HFConversionError, ConfigError, DataError, OSError)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_arg(name: str) -> str:
    """argparse type of --device: a device this torch can allocate on (checked before any model loads)."""
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as e:  # a malformed name, or a backend this build or host lacks
        raise argparse.ArgumentTypeError(f"{name!r} is not a usable device here: {e}") from None
    return name


def out_of_memory_line(error: torch.OutOfMemoryError, fixes: str) -> str:
    """`error: CUDA out of memory. Tried to allocate ...: <fixes>`, for a command line's stderr."""
    return f"error: {allocation_failure(str(error))}: {fixes}"


def run_cli(fn: Callable[[], None], memory_fixes: str = "or --device cpu") -> int:
    """Runs a command line's body: its user errors, and a CUDA out-of-memory error (with `memory_fixes`, the
    arguments that need less), become one `error:` line and exit status 2."""
    try:
        fn()
    except BrokenPipeError:  # `generate ... | head`: not an error of the user's
        return stdout_reader_gone()
    except USER_ERRORS as e:
        print(f"error: {describe_os_error(e) if isinstance(e, OSError) else e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError as e:
        print(out_of_memory_line(e, memory_fixes), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
