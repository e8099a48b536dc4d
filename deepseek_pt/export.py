"""Consolidated model exports: one directory that generation, evaluation, HF conversion and
`train.init_from` read, whatever world size and parallel layout trained the model.

    EXPORT_DIR/config.yaml        the full resolved deepseek_pt Config (save_config)
    EXPORT_DIR/model.safetensors  the Transformer's state_dict names, fp32 or bf16 (router bias always fp32)
    EXPORT_DIR/tokenizer.model    optional: the sentencepiece model the data was tokenized with
    EXPORT_DIR/export.json        written last: format_version, step, source, sha256 of model.safetensors,
                                  dtype, doc_boundary (how documents were framed, when known), tokenizer_sha256
                                  (the identity of the tokenizer the model was trained with, when known)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import Config, ConfigError, ModelConfig, load_config, save_config
from .fileio import atomic_path, atomic_write_bytes, atomic_write_text, read_json, sha256_file
from .model import Transformer
from .model.counting import meta_model

FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SHA256 = re.compile(r"[0-9a-f]{64}")
FP32_TENSORS = ("e_score_correction_bias",)
"""Kept fp32 in any export: the balancing bias moves in steps far below bf16 resolution."""


class ExportError(ValueError):
    """A missing, corrupt or mismatching export; the message names the file and what is wrong."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ExportError(f"dtype {dtype} is not one of {', '.join(DTYPES)}")


def expected_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    """The tensors an export of `model` stores: state_dict without tied aliases (lm_head = embedding)."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def expected_shapes(m: ModelConfig) -> dict[str, list[int]]:
    """The name and shape of each tensor a model of `m` stores (expected_tensors), from a model without memory: a
    checkpoint's config is checked against its weights with this before the model is built, as a corrupt config may
    describe one too large to allocate."""
    return {name: list(t.shape) for name, t in expected_tensors(meta_model(m)).items()}


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """`model.to(dtype)` keeping the routers in fp32, as HF DeepseekV3 does (`gate` computes in fp32), and the RoPE
    frequencies as training used them (fp32)."""
    model.to(dtype)
    for moe in model.moe_layers():
        moe.gate.float()
    model.reset_rope()
    return model


def save_export(model: Transformer, config: Config, out_dir: str | Path, step: int | None = None,
                source: str | None = None, tokenizer: str | Path | bytes | None = None,
                dtype: torch.dtype | None = None, doc_boundary: str | None = None,
                tokenizer_sha256: str | None = None) -> Path:
    """Write `model` as an export. The config's model section is taken from `model.config` (it changes
    under MLA-o conversion); dtype defaults to the model's; `tokenizer` is a sentencepiece model file
    or its bytes; tokenizer_sha256 the identity of the tokenizer the model was trained with (default: the
    stored tokenizer's; given with one, they must agree). Returns the directory."""
    out = Path(out_dir)
    if tokenizer is not None:
        what = "tokenizer" if isinstance(tokenizer, bytes) else f"tokenizer {tokenizer}"
        tokenizer = tokenizer if isinstance(tokenizer, bytes) else Path(tokenizer).read_bytes()
        stored = hashlib.sha256(tokenizer).hexdigest()
        if tokenizer_sha256 is not None and stored != tokenizer_sha256:
            raise ExportError(f"{what} (sha256 {stored[:12]}...) is not the one the model was trained with "
                              f"(sha256 {tokenizer_sha256[:12]}...)")
        tokenizer_sha256 = stored
    out.mkdir(parents=True, exist_ok=True)
    # Overwriting an export: it counts as incomplete until the new export.json is in place.
    (out / "export.json").unlink(missing_ok=True)
    config = dataclasses.replace(config, model=model.config)
    dtype = dtype or model.embed_tokens.weight.dtype
    tensors = {name: t.detach().to("cpu", torch.float32 if name.endswith(FP32_TENSORS) else dtype).contiguous()
               for name, t in expected_tensors(model).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
        digest = sha256_file(tmp)
    save_config(config, out / "config.yaml")
    if tokenizer is not None:
        atomic_write_bytes(out / "tokenizer.model", tokenizer)
    else:
        (out / "tokenizer.model").unlink(missing_ok=True)
    info = {"format_version": FORMAT_VERSION, "step": step, "source": None if source is None else str(source),
            "sha256": digest, "dtype": dtype_name(dtype), "doc_boundary": doc_boundary,
            "tokenizer_sha256": tokenizer_sha256}
    atomic_write_text(out / "export.json", json.dumps(info, indent=2) + "\n")
    return out


def is_export(path: str | Path) -> bool:
    return (Path(path) / "export.json").is_file()


def read_export_info(path: str | Path) -> dict:
    file = Path(path) / "export.json"
    if not file.is_file():
        raise ExportError(f"{file}: not found ({path} is not a complete export)")
    info = read_json(file, ExportError)
    if not isinstance(info, dict) or not isinstance(info.get("format_version"), int):
        raise ExportError(f"{file}: missing format_version")
    if info["format_version"] > FORMAT_VERSION:
        raise ExportError(f"{file}: format_version {info['format_version']} is newer than this reader "
                          f"({FORMAT_VERSION}); update deepseek_pt")
    if info.get("dtype") not in DTYPES or not isinstance(info.get("sha256"), str):
        raise ExportError(f"{file}: dtype must be one of {', '.join(DTYPES)} and sha256 a string")
    tok = info.get("tokenizer_sha256")  # absent from exports written before it was recorded
    if tok is not None and not (isinstance(tok, str) and SHA256.fullmatch(tok)):
        raise ExportError(f"{file}: tokenizer_sha256 {tok!r} is not 64 lowercase hex digits")
    return info


def trained_tokenizer_sha256(path: str | Path, info: dict, stored: bytes | None = None) -> str | None:
    """The identity of the tokenizer the model of the export at `path` (export.json: `info`) was trained with: the
    recorded tokenizer_sha256, else (an export written before it was recorded) the sha256 of the tokenizer.model it
    stores (`stored`: its bytes, where the caller has read them); None with neither."""
    if recorded := info.get("tokenizer_sha256"):
        return recorded
    if stored is not None:
        return hashlib.sha256(stored).hexdigest()
    file = Path(path) / "tokenizer.model"
    return sha256_file(file) if file.is_file() else None


def load_export(path: str | Path, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None) -> tuple[Transformer, Config]:
    """Read an export: checksum, then every tensor's name and shape against the config, then the
    weights. dtype=None keeps the stored dtype. ExportError names the file and tensor on a mismatch."""
    path = Path(path)
    info = read_export_info(path)
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ExportError(f"{weights}: not found")
    if (digest := sha256_file(weights)) != info["sha256"]:
        raise ExportError(f"{weights}: corrupt: sha256 {digest} != {info['sha256']} recorded in export.json")
    try:
        config = load_config(path / "config.yaml", saved=True)
    except ConfigError as e:
        raise ExportError(str(e)) from None
    with safe_open(weights, framework="pt", device=str(device)) as f:
        stored = {name: f.get_slice(name).get_shape() for name in f.keys()}
        # Before the model is built (expected_shapes): config.yaml is not checksummed
        check_tensor_names(stored, expected_shapes(config.model), weights, path / "config.yaml")
        with torch.device(device):
            model = cast_model(Transformer(config.model), dtype or DTYPES[info["dtype"]])
        expected = expected_tensors(model)
        with torch.no_grad():  # tensor by tensor, into the model's dtypes: no second copy of the weights
            for name, t in expected.items():
                t.copy_(f.get_tensor(name))
    return model.eval(), config


def check_tensor_names(stored: dict[str, list[int]], expected: dict[str, list[int]], file: Path, config_file) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        raise ExportError(f"{file}: tensor {missing[0]} is missing ({len(missing)} missing in all), "
                          f"but {config_file} needs it")
    if unexpected:
        raise ExportError(f"{file}: tensor {unexpected[0]} is not part of the model that {config_file} "
                          f"describes ({len(unexpected)} such tensors)")
    for name, shape in expected.items():
        if list(stored[name]) != shape:
            raise ExportError(f"{file}: tensor {name} has shape {list(stored[name])}, but {config_file} "
                              f"gives {shape}")
