"""Every checkpoint that generation, evaluation and conversion accept, behind one call:

- an export directory (export.json; see deepseek_pt.export),
- an HF DeepseekV3 directory (config.json + safetensors),
- a training run directory or one of its DeepSpeed checkpoints, any world size: the engine's
  `export_checkpoint` consolidates it into a temporary export first.
"""
from __future__ import annotations

import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..export import ExportError, is_export, load_export, read_export_info
from ..model import Transformer
from .hf import full_config, is_hf_dir, load_hf


@dataclass
class Checkpoint:
    model: Transformer
    config: Config
    tokenizer: bytes | None
    """The sentencepiece model stored with the checkpoint, if any."""
    doc_boundary: str | None
    """How training documents were framed (`eos` or `bos_eos`), when the export records it."""


def _from_export(path: Path, device, dtype) -> Checkpoint:
    model, config = load_export(path, device, dtype)
    tok = path / "tokenizer.model"
    return Checkpoint(model, config, tok.read_bytes() if tok.is_file() else None,
                      read_export_info(path).get("doc_boundary"))


ENGINE_EXPORTERS = ("deepseek_pt.engine.export", "deepseek_pt.engine.checkpoint")
"""Where the training engine's `export_checkpoint(run_dir_or_ckpt, out_dir)` may live, first found wins."""


def _engine_exporter(path: Path):
    for name in ENGINE_EXPORTERS:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "export_checkpoint"):
            return module.export_checkpoint, importlib.import_module("deepseek_pt.engine.checkpoint").CheckpointError
    raise ExportError(f"{path}: is neither an export (export.json) nor an HF directory (config.json), and this "
                      "installation cannot read training checkpoints (no export_checkpoint in "
                      f"{' or '.join(ENGINE_EXPORTERS)})")


def _from_training_run(path: Path, device, dtype) -> Checkpoint:
    export_checkpoint, checkpoint_error = _engine_exporter(path)
    with tempfile.TemporaryDirectory(prefix="deepseek_pt_export_") as tmp:
        try:
            export_checkpoint(path, Path(tmp) / "export")
        except checkpoint_error as e:
            raise ExportError(str(e)) from None
        return _from_export(Path(tmp) / "export", device, dtype)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Checkpoint:
    """Load any accepted checkpoint (see the module doc); ExportError / HFConversionError say why not."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory")
    if is_export(path):
        return _from_export(path, device, dtype)
    if is_hf_dir(path):
        model = load_hf(path, device, dtype)
        tok = path / "tokenizer.model"
        return Checkpoint(model, full_config(model.config, where=str(path)),
                          tok.read_bytes() if tok.is_file() else None, None)
    return _from_training_run(path, device, dtype)
