"""Every checkpoint that generation, evaluation and conversion accept, behind one call:

- an export directory (export.json; see deepseek_pt.export),
- an HF DeepseekV3 directory (config.json + safetensors),
- a training run directory or one of its DeepSpeed checkpoints, any world size: the engine's
  `export_checkpoint` consolidates it into a temporary export first.

`checkpoint_tokenizer` gives the sentencepiece model to run one with, refusing a tokenizer other than the one the
model was trained with.
"""
from __future__ import annotations

import hashlib
import importlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Config
from ..data.format import open_tokenizer, read_tokenizer_copy, tokenizer_from_bytes
from ..export import ExportError, is_export, load_export, read_export_info, trained_tokenizer_sha256
from ..fileio import sha256_file
from ..model import Transformer
from .cli import UsageError
from .hf import full_config, hf_doc_boundary, hf_seq_len, is_hf_dir, load_hf, read_hf_config


@dataclass
class Checkpoint:
    model: Transformer
    config: Config
    tokenizer: bytes | None
    """The sentencepiece model stored with the checkpoint, if any."""
    tokenizer_sha256: str | None
    """The identity of the tokenizer the model was trained with: recorded in export.json, else the stored
    tokenizer's; None when unknown."""
    doc_boundary: str | None
    """How training documents were framed (`eos` or `bos_eos`), when the export records it."""
    step: int | None
    """The training step of the weights, when known (an export's, a training checkpoint's; not an HF directory's)."""


def _from_export(path: Path, device, dtype) -> Checkpoint:
    info = read_export_info(path)
    data = read_tokenizer_copy(path / "tokenizer.model", info.get("tokenizer_sha256"), ExportError,
                               "the model was trained with", recorded_in=path / "export.json")  # before the (slow) load
    trained_with = trained_tokenizer_sha256(path, info, data)
    model, config = load_export(path, device, dtype)
    return Checkpoint(model, config, data, trained_with, info.get("doc_boundary"), info.get("step"))


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
        hf_config = read_hf_config(path)  # for the model and its doc boundary alike
        model = load_hf(path, device, dtype, hf_config)
        tok = path / "tokenizer.model"
        data = tok.read_bytes() if tok.is_file() else None
        return Checkpoint(model, full_config(model.config, where=str(path), seq_len=hf_seq_len(hf_config)), data,
                          None if data is None else hashlib.sha256(data).hexdigest(), hf_doc_boundary(hf_config), None)
    return _from_training_run(path, device, dtype)


def check_tokenizer(file: str | Path, trained_with: str | None, model: str, stored: bool) -> None:
    """UsageError unless the tokenizer in `file` (a user's --tokenizer) is the one `model` was trained with
    (sha256 `trained_with`; None: unknown, anything goes). `stored`: the model holds that tokenizer itself."""
    if trained_with is None or (sha := sha256_file(file)) == trained_with:
        return
    fix = ("leave out --tokenizer to use the one stored with it" if stored else
           "pass that one (the tokenizer.model of the shard directory it was trained on)")
    raise UsageError(f"--tokenizer {file} (sha256 {sha[:12]}...) is not the tokenizer {model} was trained with "
                     f"(sha256 {trained_with[:12]}...): its ids would name other pieces; {fix}")


def checkpoint_tokenizer(ckpt: Checkpoint, where: str, tokenizer: str | Path | None = None):
    """The sentencepiece model to run `ckpt` (loaded from `where`) with: the file `tokenizer` (--tokenizer) if it is
    the one the model was trained with, as far as that is known, else the one stored with the checkpoint."""
    if tokenizer is not None:
        sp = open_tokenizer(tokenizer, "--tokenizer")
        check_tokenizer(tokenizer, ckpt.tokenizer_sha256, where, ckpt.tokenizer is not None)
        return sp
    if ckpt.tokenizer is None:
        known = ckpt.tokenizer_sha256
        which = f" (the one it was trained with has sha256 {known[:12]}...)" if known else ""
        raise UsageError(f"{where}: holds no tokenizer.model; pass --tokenizer{which}")
    return tokenizer_from_bytes(ckpt.tokenizer, f"{where}: its tokenizer.model")
