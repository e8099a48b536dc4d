"""Consolidated weights from a training checkpoint, in one process, without torch.distributed:

    python -m deepseek_pt.engine.export CHECKPOINT OUT_DIR [--dtype bf16|fp32] [--force]

CHECKPOINT is a run directory (its `checkpoints/latest`), a `checkpoints/` directory (its `latest`)
or one `step_*` checkpoint. The steps:

1. verify every file of the checkpoint against its meta.json (sizes, then sha256), in this process;
2. convert it with DeepSpeed's `ds_to_universal` (a subprocess) into a scratch directory beside
   OUT_DIR, or reuse `step_*_universal` when training already made it for this very checkpoint;
3. map the universal tensors back to our Transformer's state_dict names:
       <universal>/zero/<name>/fp32.pt      one fp32 master per parameter; non-expert ones are flat
                                            (reshaped with the checkpoint's `param_shapes`), AutoEP's
                                            grouped experts a dict {param: [E, out, in], is_expert_param}
       P.experts.w1 / w3 / w2 [E, out, in]  -> P.experts.i.gate_proj / up_proj / down_proj.weight
                                            (nn.Linear [out, in] stacked as-is: no transposes)
       P.router.gate.weight                 -> P.gate.weight
       P.gate.e_score_correction_bias       <- client_state `balance_bias` (universal conversion
                                            drops buffers), in MoE-layer module order
   for every AutoEP layer P (`ds_autoep_layers` of the checkpoint); other names are ours already;
4. load them into `Transformer(cfg.model)` (cfg = the run's config.yaml) with strict checking, and
   write a deepseek_pt.export directory (step from meta.json, source = the checkpoint, the tokenizer, its
   identity and the doc boundary that the run directory keeps: engine/run_tokenizer.py).

The weights are the fp32 masters; `dtype=bf16` casts them (the balancing bias stays fp32).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

from ..config import Config, ConfigError, load_config
from ..fileio import describe_os_error
from ..model.moe import MoE
from . import run_tokenizer
from .checkpoint import CheckpointError, checkpoints_dir, convert_to_universal, kept_universal, resolve, verify

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
EXPERT_WEIGHTS = ("w1", "w2", "w3")
"""AutoEP's grouped expert tensors; the checkpoint's ds_config names their source (expert_w1 ...)."""


# --------------------------------------------------------------------------------------------
# Finding and verifying the checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """The `step_*` directory that `path` (run dir, checkpoints/ dir or step dir) designates."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a run directory, a checkpoints/ directory "
                              "or a step_* checkpoint)")
    if path.name.endswith("_universal"):  # made from a step_* dir; export from (and verify) that one
        tag_dir = path.with_name(path.name[: -len("_universal")])
        if not tag_dir.is_dir():
            raise CheckpointError(f"{path}: a universal checkpoint without its source {tag_dir}; "
                                  "pass a step_* checkpoint")
        path = tag_dir
    if (path / "meta.json").exists():
        return path
    if path.name.startswith("step_"):
        raise CheckpointError(f"{path}: incomplete checkpoint (no meta.json: its save did not finish)")
    run_dir = path.parent if path.name == "checkpoints" else path
    if not checkpoints_dir(run_dir).is_dir():
        if (run_dir / "config.yaml").is_file():  # train writes it first thing: a run that saved nothing yet, or ever
            raise CheckpointError(f"{path}: a run directory without checkpoints/ (train.checkpoints false, or the run "
                                  "stopped before its first save)")
        raise CheckpointError(f"{path}: not a run directory, a checkpoints/ directory or a step_* checkpoint")
    tag_dir = resolve("auto", run_dir)  # the checkpoint a resume would take
    if tag_dir is None:
        raise CheckpointError(f"{checkpoints_dir(run_dir)}: no complete checkpoint")
    return tag_dir


def _model_states_file(tag_dir: Path) -> Path:
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise CheckpointError(f"{tag_dir}: no DeepSpeed model states file (zero_pp_rank_0_mp_rank_00_model_states.pt)")


def read_model_states(tag_dir: Path) -> dict:
    """Rank 0's DeepSpeed model states: module buffers, param_shapes, ds_config, ds_autoep_layers and
    our client_state (step, balance_bias, ...)."""
    file = _model_states_file(tag_dir)
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means an unreadable file
        raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------
# Universal conversion


@contextmanager
def universal_checkpoint(tag_dir: Path, scratch_parent: Path):
    """Yields a universal checkpoint of tag_dir: the one kept beside it (checkpoint.kept_universal), or a fresh conversion in a
    scratch directory under scratch_parent (same filesystem as the export; removed afterwards)."""
    existing = kept_universal(tag_dir)
    if existing is not None:
        yield existing
        return
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".universal-", dir=scratch_parent))
    try:
        yield convert_to_universal(tag_dir, scratch / "universal")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def read_universal(universal_dir: Path) -> dict[str, tuple[torch.Tensor, dict]]:
    """name -> (fp32 tensor, info) for every `<universal>/zero/<name>/fp32.pt`; info holds the
    expert metadata (is_expert_param, ep_num_experts, cat_dim) when the file is a dict."""
    zero = universal_dir / "zero"
    out = {}
    for d in sorted(p for p in zero.iterdir() if p.is_dir()):
        file = d / "fp32.pt"
        if not file.is_file():
            raise CheckpointError(f"{d}: no fp32.pt (incomplete universal checkpoint)")
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - truncated, corrupt, or removed meanwhile (pruned)
            raise CheckpointError(f"{file}: unreadable ({type(e).__name__}: {e})") from None
        if isinstance(obj, dict):
            if not torch.is_tensor(obj.get("param")):
                raise CheckpointError(f"{file}: a dict without a 'param' tensor (keys {sorted(obj)})")
            out[d.name] = (obj["param"], {k: v for k, v in obj.items() if k != "param"})
        elif torch.is_tensor(obj):
            out[d.name] = (obj, {})
        else:
            raise CheckpointError(f"{file}: holds a {type(obj).__name__}, expected a tensor")
    if not out:
        raise CheckpointError(f"{zero}: no parameters")
    return out


# --------------------------------------------------------------------------------------------
# Universal names -> our Transformer's state_dict


def _autoep_names(states: dict) -> tuple[dict[str, int], dict[str, str], str, str]:
    """(AutoEP layer path -> n experts, {w1: gate_proj, w2: down_proj, w3: up_proj}, router name,
    experts name), from the checkpoint's own ds_config."""
    layers = {entry["module_path"]: int(entry["num_experts"]) for entry in states.get("ds_autoep_layers") or []}
    ep = (states.get("ds_config") or {}).get("expert_parallel") or {}
    weights = {"w1": ep.get("expert_w1", "gate_proj"), "w2": ep.get("expert_w2", "down_proj"),
               "w3": ep.get("expert_w3", "up_proj")}
    return layers, weights, ep.get("router_pattern", "gate"), ep.get("expert_pattern", "experts")


def _flat_shapes(states: dict) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for group in states.get("param_shapes") or []:
        for name, shape in group.items():
            shapes[name] = tuple(shape)
    return shapes


def _our_name(name: str, layers: dict[str, int], router: str) -> str:
    """Non-expert renames: P.router.gate.X -> P.<router>.X, P.router.X -> P.<router>.X."""
    for path in layers:
        if name.startswith(path + ".router."):
            rest = name[len(path) + len(".router."):]
            return f"{path}.{router}.{rest[len('gate.'):] if rest.startswith('gate.') else rest}"
    return name


def universal_to_state_dict(universal: dict[str, tuple[torch.Tensor, dict]], states: dict,
                            model: torch.nn.Module, where: str) -> dict[str, torch.Tensor]:
    """Our state_dict from the universal tensors + the checkpoint's buffers and client_state.
    CheckpointError names every missing, unexpected or mis-shaped tensor (`where` = the source)."""
    layers, wnames, router, experts_name = _autoep_names(states)
    flat_shapes = _flat_shapes(states)
    state, problems = {}, []
    for name, (t, info) in universal.items():
        layer = next((p for p in layers if name.startswith(p + f".{experts_name}.")), None)
        if layer is not None and name[len(layer) + len(experts_name) + 2:] in EXPERT_WEIGHTS:
            w = name.rsplit(".", 1)[1]
            n = layers[layer]
            if t.ndim != 3 or t.shape[0] != n or info.get("ep_num_experts", n) != n or info.get("cat_dim", 0) != 0:
                problems.append(f"{name}: expert tensor of shape {list(t.shape)}, expected [{n}, out, in]")
                continue
            for i in range(n):  # nn.Linear weights stacked as-is by AutoEP's repack (no transpose)
                state[f"{layer}.{experts_name}.{i}.{wnames[w]}.weight"] = t[i]
            continue
        shape = flat_shapes.get(name)
        if shape is not None and tuple(t.shape) != shape:
            if t.numel() != torch.Size(shape).numel():
                problems.append(f"{name}: {t.numel()} values, param_shapes says {list(shape)}")
                continue
            t = t.view(shape)
        state[_our_name(name, layers, router)] = t

    # Buffers: DeepSpeed's module state holds the persistent ones (rank 0's copy); the balancing bias
    # comes from our client_state, which survives universal loads that reset the buffers.
    buffers = set(states.get("buffer_names") or [])
    for name, t in (states.get("module") or {}).items():
        if name in buffers:
            state.setdefault(_our_name(name, layers, router), t)
    moe_paths = [n for n, m in model.named_modules() if isinstance(m, MoE)]  # = balance.moe_routers order
    biases = states.get("balance_bias")
    if biases is not None:
        if len(biases) != len(moe_paths):
            problems.append(f"client_state balance_bias holds {len(biases)} biases, the model has "
                            f"{len(moe_paths)} MoE layers ({', '.join(moe_paths)})")
        else:
            for path, bias in zip(moe_paths, biases):
                state[f"{path}.gate.e_score_correction_bias"] = bias.float()

    # Tied aliases (lm_head = embedding): the checkpoint holds one of the names.
    expected = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, t in expected.items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present and len(names) > 1:
            for n in names:
                state.setdefault(n, state[present[0]])

    missing = [n for n in expected if n not in state]
    unexpected = [n for n in state if n not in expected]
    misshaped = [f"{n}: checkpoint {list(state[n].shape)}, model {list(expected[n].shape)}"
                 for n in expected if n in state and state[n].shape != expected[n].shape]
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        if items:
            more = " ..." if len(items) > 6 else ""
            problems.append(f"{len(items)} {label} tensor(s): " + "; ".join(items[:6]) + more)
    if problems:
        raise CheckpointError(f"{where} does not match the model of its config.yaml: " + " | ".join(problems))
    return state


# --------------------------------------------------------------------------------------------
# The export


def _dtype(dtype) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype {dtype}: expected torch.float32 or torch.bfloat16")
        return dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r}: expected one of bf16, fp32")
    return DTYPE_NAMES[dtype]


def _tokenizer(cfg: Config, run_dir: Path) -> tuple[bytes | Path | None, str | None, str | None]:
    """The tokenizer the run trained with (its copy, its identity) and the doc boundary: recorded in the run
    directory, else (a run started before runs recorded it) the data's, when the data directory is reachable from
    here (a blend's sources share one tokenizer: the first's)."""
    from ..data import DataError, open_manifest

    recorded = run_tokenizer.read(run_dir)
    if recorded is not None:
        return recorded.model, recorded.sha256, recorded.doc_boundary
    sources = cfg.data.sources()
    if not sources:
        print("note: no tokenizer in the export: the config names no data", file=sys.stderr)
        return None, None, None
    try:
        manifest = open_manifest(sources[0].path)
    except DataError as e:
        relative = "" if Path(sources[0].path).is_absolute() else (
            f" ({cfg.data.source_key(0)} {sources[0].path} is relative to the directory the run was started from, "
            f"and {run_dir} keeps no tokenizer of its own: run this from that directory)")
        print(f"note: no tokenizer in the export: {e}{relative}", file=sys.stderr)
        return None, None, None
    return manifest.tokenizer_path, manifest.tokenizer_sha256, manifest.doc_boundary


def load_checkpoint_model(checkpoint: str | Path, scratch_parent: str | Path | None = None):
    """(model fp32 with the checkpoint's weights, config, meta.json, step dir), single-process.
    A conversion goes to a scratch directory under scratch_parent (default: the system temp dir)."""
    from ..model import Transformer

    tag_dir = resolve_checkpoint(checkpoint)
    meta = verify(tag_dir, collective=False)
    config_file = tag_dir.parent.parent / "config.yaml"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: not found (the run's resolved config; {tag_dir} must lie in "
                              "<run.dir>/checkpoints/)")
    cfg = load_config(config_file, saved=True)
    states = read_model_states(tag_dir)
    model = Transformer(cfg.model)
    scratch = Path(scratch_parent) if scratch_parent is not None else Path(tempfile.gettempdir())
    with universal_checkpoint(tag_dir, scratch) as universal_dir:
        universal = read_universal(universal_dir)
    state = universal_to_state_dict(universal, states, model, f"checkpoint {tag_dir}")
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, meta, tag_dir


def export_checkpoint(run_dir_or_ckpt: str | Path, out_dir: str | Path, dtype=None) -> Path:
    """Export one training checkpoint (run dir -> latest, checkpoints/ -> latest, or a step_* dir) as
    a deepseek_pt.export directory at out_dir; dtype None/fp32 keeps the fp32 masters, bf16 casts.
    Raises CheckpointError (missing, incomplete, corrupt or mismatching checkpoint), ConfigError."""
    from ..export import save_export

    dt = _dtype(dtype)
    out = Path(out_dir).absolute()
    # The universal copy (fp32 weights + Adam moments: ~3x the export) goes beside the export, on the
    # filesystem chosen for large files, not into a possibly small /tmp.
    model, cfg, meta, tag_dir = load_checkpoint_model(run_dir_or_ckpt, scratch_parent=out.parent)
    tokenizer, tokenizer_sha256, doc_boundary = _tokenizer(cfg, tag_dir.parent.parent)
    return save_export(model, cfg, out, step=meta["step"], source=str(tag_dir.absolute()), tokenizer=tokenizer,
                       dtype=dt, doc_boundary=doc_boundary, tokenizer_sha256=tokenizer_sha256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_pt.engine.export",
                                     description="Export consolidated weights from a training checkpoint.")
    parser.add_argument("checkpoint", help="run directory, its checkpoints/ directory, or a step_* checkpoint")
    parser.add_argument("out_dir", help="export directory to write (config.yaml, model.safetensors, the run's "
                        "tokenizer.model, export.json with its tokenizer_sha256)")
    parser.add_argument("--dtype", choices=list(DTYPE_NAMES), default="fp32",  # bfloat16 as the other tools spell it
                        help="weight dtype of the export (default fp32: the training masters as they are)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty output directory")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from ..export import ExportError

    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():  # --force would not help: found after the conversion (hours)
        print(f"error: {out_dir}: not a directory (name the export directory to write)", file=sys.stderr)
        return 2
    if out_dir.exists() and any(out_dir.iterdir()) and not args.force:
        # Its model.safetensors / config.yaml would be replaced: e.g. an HF copy's, or an earlier export.
        print(f"error: {out_dir}: exists and is not empty (pass --force to write into it)", file=sys.stderr)
        return 2
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, args.dtype)
    except (CheckpointError, ConfigError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # OUT_DIR's disk full or not writable: atomic writes name the file
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info['step']} of {info['source']} to {out} ({info['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
