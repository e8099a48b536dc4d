"""deepseek_pt.fileio: atomic writes leave the old content or the whole new one, with the mode open() gives."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors.torch import save_file

from deepseek_pt.fileio import (MAX_NESTING, NestedTooDeeply, atomic_path, atomic_write_text, check_nesting, loads_json,
                                read_json)


def test_a_private_writer_still_leaves_a_file_the_umask_allows(tmp_path):
    umask = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0600
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    finally:
        os.umask(umask)
    for name in ("model.safetensors", "config.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "meta.json"
    atomic_write_text(target, "old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A full disk's OSError from a write names no file (train printed 'error: No space left on device')."""
    import errno
    from pathlib import Path

    def full(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OSError) as failed:
        atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert failed.value.filename == str(tmp_path / "config.yaml") and failed.value.errno == errno.ENOSPC
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("writer_error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save
    Exception("Error while serializing: I/O error: No space left on device (os error 28)"),  # safetensors
])
def test_a_writers_own_disk_full_error_becomes_one_naming_the_file(tmp_path, writer_error):
    """convert ds-to-hf on a full disk ended in safetensors' traceback: the writers' errors carry no errno."""
    import errno

    from deepseek_pt.fileio import describe_os_error

    with pytest.raises(OSError) as failed, atomic_path(tmp_path / "model.safetensors"):
        raise writer_error
    assert failed.value.errno == errno.ENOSPC
    assert describe_os_error(failed.value) == f"{tmp_path / 'model.safetensors'}: No space left on device"
    with pytest.raises(ValueError, match="another failure"), atomic_path(tmp_path / "model.safetensors"):
        raise ValueError("another failure")  # anything else passes through as it is


def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


def test_json_nested_too_deeply_is_refused_as_such():
    """JSON of thousands of nested arrays was a RecursionError from inside json.loads; a few hundred parsed, and failed
    later in whatever walked the value (copy.deepcopy, repr). Both are now NestedTooDeeply, past MAX_NESTING."""
    for text in (_nested(5000), _nested(MAX_NESTING + 1), '{"a": ' + _nested(MAX_NESTING) + "}"):
        with pytest.raises(NestedTooDeeply, match=f"^nested too deeply: lists or mappings more than {MAX_NESTING} "):
            loads_json(text)
    for text in (_nested(MAX_NESTING), '{"a": ' + _nested(MAX_NESTING - 1) + "}", '{"a": [1, {"b": 2}]}'):
        assert loads_json(text) == json.loads(text)


class _ReaderError(ValueError):
    """A reader's own exception, as ExportError or DataError are."""


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe not text", "not valid JSON: 'utf-8' codec can't decode"),
    (b'{"a": 1', "not valid JSON: Expecting ',' delimiter"),
    (_nested(MAX_NESTING + 1).encode(), "nested too deeply"),
], ids=["not-text", "not-json", "too-deep"])
def test_a_bad_json_file_is_the_readers_error_naming_the_file(tmp_path, content, message):
    file = tmp_path / "meta.json"
    file.write_bytes(content)
    with pytest.raises(_ReaderError, match=f"^{re.escape(str(file))}: {message}"):
        read_json(file, _ReaderError)
    file.write_text('{"a": [1, 2]}')
    assert read_json(file, _ReaderError) == {"a": [1, 2]}


def test_the_nesting_check_walks_a_shared_node_once():
    """YAML aliases make one node the child of many: a chain of them (each level ten references to the one below)
    has 10^40 paths, which a walk of every path would never finish."""
    node: list = [1]
    for _ in range(40):
        node = [node] * 10
    assert check_nesting(node) is node


@pytest.mark.parametrize("handled", [True, False])
def test_a_command_whose_reader_closes_the_pipe_stops_quietly(handled):
    # `python -m deepseek_pt.generate ... | head`: without the handling, "error: Broken pipe" and exit 2 (run_cli's
    # user error), or a traceback.
    import subprocess
    import sys

    body = ("import sys\n"
            "from deepseek_pt.interop.cli import run_cli\n"
            "def write():\n"
            "    for _ in range(100000):\n"
            "        print('x' * 100, flush=True)\n"
            + ("sys.exit(run_cli(write))\n" if handled else "write()\n"))
    proc = subprocess.run(f"{sys.executable} -c \"{body}\" | head -c 10 > /dev/null; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120,
                          check=False)
    stderr = "\n".join(line for line in proc.stderr.splitlines() if "WARN" not in line)
    if handled:
        assert proc.returncode == 141 and stderr == "", (proc.returncode, proc.stderr[-2000:])
    else:  # the control: Python's own behaviour, which the handling replaces
        assert proc.returncode != 141 and "BrokenPipeError" in stderr, (proc.returncode, proc.stderr[-2000:])
