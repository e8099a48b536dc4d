"""Consolidated export of training checkpoints (deepseek_pt.engine.export), against real runs:
2 CPU processes, ZeRO-3, AutoEP with expert-parallel size 2 (and 1)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from jobs import ranks_cmd, run_job
from safetensors.torch import load_file

from deepseek_pt.config import load_config
from deepseek_pt.engine import export as ckpt_export
from deepseek_pt.engine.checkpoint import UNIVERSAL_SIZES, CheckpointError, keep_universal
from deepseek_pt.engine.export import export_checkpoint, read_model_states

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"


class Data(NamedTuple):
    shards_dir: Path
    vocab_size: int


@pytest.fixture(scope="module")
def data(pydoc_data_dir) -> Data:
    return Data(Path(pydoc_data_dir.shards_dir), pydoc_data_dir.vocab_size)


def _train(run_dir: Path, data: Data, *overrides: str) -> Path:
    """2 ranks of `deepseek_pt.train` (as `deepspeed --num_gpus 2` starts them) on the smoke config; returns run_dir."""
    proc = run_job(ranks_cmd(2, "--module", "deepseek_pt.train", "--config", SMOKE, f"data.path={data.shards_dir}",
                             f"run.dir={run_dir}", f"model.vocab_size={max(1024, data.vocab_size)}",
                             "train.save_every=0", *overrides), timeout=300)
    assert proc.returncode == 0, f"training failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return run_dir


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """4 real steps with EP 2, evaluated at step 4 (eval_loss in metrics.jsonl), checkpoint step 4."""
    return _train(tmp_path_factory.mktemp("trained") / "run", data, "parallel.expert_parallel_size=2",
                  "train.max_steps=4", "train.warmup_steps=4", "train.eval_every=4", "train.eval_sequences=13")


@pytest.fixture(scope="module")
def trained_export(trained, tmp_path_factory) -> Path:
    return export_checkpoint(trained, tmp_path_factory.mktemp("exports") / "fp32")


@pytest.fixture(scope="module")
def fresh(data, tmp_path_factory) -> dict[int, Path]:
    """One step at lr 1e-20 (the fp32 masters stay bit-equal to the seeded init), EP 1 and EP 2."""
    root = tmp_path_factory.mktemp("fresh")
    return {ep: _train(root / f"ep{ep}", data, f"parallel.expert_parallel_size={ep}", "train.max_steps=1",
                       "train.warmup_steps=1", "train.lr=1e-20", "train.min_lr=0", "train.eval_every=0")
            for ep in (1, 2)}


def _eval_loss(model, cfg) -> float:
    """train.py's evaluate() in one process: the mean loss per token over the val split's first
    train.eval_sequences sequences, which the engine's ranks shared out."""
    from deepseek_pt.data import val_batches

    total, tokens = 0.0, 0
    with torch.no_grad():
        for inputs, targets in val_batches(cfg.data.path, split=cfg.data.val_split, seq_len=cfg.data.seq_len,
                                           micro_batch_size=cfg.train.micro_batch_size,
                                           max_sequences=cfg.train.eval_sequences):
            model(inputs, targets)
            count = int((targets != -100).sum())
            total += model.last_losses["lm_loss"].item() * count if count else 0.0
            tokens += count
    return total / tokens


def test_export_reproduces_the_engine_eval_loss(trained, trained_export, data):
    from deepseek_pt.export import load_export, read_export_info

    info = read_export_info(trained_export)
    tag_dir = trained / "checkpoints" / "step_00000004"
    assert info["step"] == 4 and info["source"] == str(tag_dir) and info["dtype"] == "float32"
    assert not list(trained_export.parent.glob(".universal-*")), "scratch conversion left behind"
    assert not (tag_dir.parent / "step_00000004_universal").exists(), "export must not write into the run"
    from deepseek_pt.data import open_manifest
    manifest = open_manifest(data.shards_dir)
    assert (trained_export / "tokenizer.model").exists() == (manifest.tokenizer_path is not None)
    assert (info["tokenizer_sha256"], info["doc_boundary"]) == (manifest.tokenizer_sha256, manifest.doc_boundary)

    model, cfg = load_export(trained_export)
    engine_eval = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()][-1]
    assert engine_eval["step"] == 4
    assert _eval_loss(model, cfg) == pytest.approx(engine_eval["eval_loss"], abs=1e-5)

    # The balancing bias is the one the run kept (client_state), and the run did move it.
    client = read_model_states(tag_dir)
    biases = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert len(biases) == len(client["balance_bias"]) >= 1
    for got, want in zip(biases, client["balance_bias"]):
        assert torch.equal(got, want)
    assert any(b.abs().sum() > 0 for b in biases)


def test_ep1_and_ep2_exports_equal_the_seeded_init(fresh, tmp_path):
    from deepseek_pt.model import Transformer

    exported = {ep: load_file(export_checkpoint(run / "checkpoints", tmp_path / f"ep{ep}") / "model.safetensors")
                for ep, run in fresh.items()}
    cfg = load_config(fresh[2] / "config.yaml")
    torch.manual_seed(cfg.train.seed)  # what train.py does before building the model
    init = Transformer(cfg.model).state_dict()
    assert set(exported[1]) == set(exported[2]) == set(init)
    for name, want in init.items():
        if name.endswith("e_score_correction_bias"):
            continue  # moved by bias balancing, not by the optimizer
        for ep in (1, 2):
            assert torch.equal(exported[ep][name], want), f"EP {ep}: {name} differs from the seeded init"
    for name in (n for n in init if n.endswith("e_score_correction_bias")):
        assert torch.equal(exported[1][name], exported[2][name]), name


def test_reuses_a_complete_universal_checkpoint_and_casts_to_bf16(trained, trained_export, tmp_path, monkeypatch):
    from deepseek_pt.export import load_export

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    tag_dir = run / "checkpoints" / "step_00000004"
    universal = keep_universal(tag_dir)  # as a resume on another topology leaves it
    config = (run / "config.yaml").read_text()  # as an earlier version wrote it: a key since replaced, dropped here
    assert "  eval_sequences: 13\n" in config
    (run / "config.yaml").write_text(config.replace("  eval_sequences: 13\n", "  eval_batches: 4\n"))

    def no_conversion(*args):
        raise AssertionError("converted again although a complete universal checkpoint was there")
    monkeypatch.setattr(ckpt_export, "convert_to_universal", no_conversion)
    out = export_checkpoint(run / "checkpoints", tmp_path / "bf16", dtype="bf16")
    stored, ref = load_file(out / "model.safetensors"), load_file(trained_export / "model.safetensors")
    assert set(stored) == set(ref)
    for name, t in stored.items():  # the balancing bias stays fp32
        want = ref[name] if name.endswith("e_score_correction_bias") else ref[name].to(torch.bfloat16)
        assert t.dtype == want.dtype and torch.equal(t, want), name
    model, _ = load_export(out)
    assert model.embed_tokens.weight.dtype == torch.bfloat16

    # A universal copy of a different save of this step (meta.json differs) is not trusted ...
    meta = json.loads((universal / "meta.json").read_text())
    (universal / "meta.json").write_text(json.dumps({**meta, "step": 99}))
    with pytest.raises(AssertionError, match="converted again"):
        export_checkpoint(tag_dir, tmp_path / "stale")
    # ... a tensor a conversion left out of a trusted one is named ...
    shutil.copy2(tag_dir / "meta.json", universal / "meta.json")
    shutil.rmtree(universal / "zero" / "layers.1.mlp.experts.w3")
    (universal / UNIVERSAL_SIZES).write_text(json.dumps({str(p.relative_to(universal)): p.stat().st_size
                                                         for p in (universal / "zero").rglob("*") if p.is_file()}))
    with pytest.raises(CheckpointError, match=r"missing tensor.*layers\.1\.mlp\.experts\.0\.up_proj\.weight"):
        export_checkpoint(universal, tmp_path / "broken")  # a *_universal path exports its step_* source
    # ... and one with a file cut short since it was kept is not trusted (a torch.load traceback before).
    os.truncate(next((universal / "zero").glob("*/fp32.pt")), 10)
    with pytest.raises(AssertionError, match="converted again"):
        export_checkpoint(tag_dir, tmp_path / "cut")


def test_bad_checkpoints_are_named(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    tag_dir = run / "checkpoints" / "step_00000004"

    optim = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = bytearray(optim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    optim.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=rf"{optim}: sha256 mismatch \(corrupt\)"):
        export_checkpoint(run, tmp_path / "out")

    rng = tag_dir / "rng" / "rank_0.pt"
    rng.write_bytes(rng.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=rf"{rng}: \d+ bytes, meta.json says \d+ \(truncated"):
        export_checkpoint(tag_dir, tmp_path / "out")

    (tag_dir / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"points to .*step_00000004, which is missing or incomplete"):
        export_checkpoint(run, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"step_00000004: incomplete checkpoint \(no meta.json"):
        export_checkpoint(tag_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    assert ckpt_export.main([str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'nowhere'}: does not exist")
    assert ckpt_export.main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a run directory, a checkpoints/ directory or a step_* checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        ckpt_export.main([str(run), str(tmp_path / "out"), "--dtype", "fp8"])
    assert exit_info.value.code == 2


def test_cli_takes_the_dtype_names_the_other_tools_take(tmp_path, monkeypatch):
    """`--dtype bfloat16`, as convert, generate and evaluate spell it, was refused here (bf16 | fp32 only)."""
    asked = []

    def export_checkpoint(ckpt, out, dtype):
        asked.append(ckpt_export._dtype(dtype))
        raise CheckpointError("stop here")

    monkeypatch.setattr(ckpt_export, "export_checkpoint", export_checkpoint)
    for name in ("bf16", "bfloat16", "fp32", "float32"):
        assert ckpt_export.main([str(tmp_path / "run"), str(tmp_path / "out"), "--dtype", name]) == 2
    assert asked == [torch.bfloat16] * 2 + [torch.float32] * 2


def test_cli_refuses_a_non_empty_output_directory(tmp_path, capsys):
    hf = tmp_path / "hf"  # e.g. an HF copy, whose model.safetensors the export would replace
    hf.mkdir()
    (hf / "model.safetensors").write_bytes(b"weights")
    assert ckpt_export.main([str(tmp_path / "nowhere"), str(hf)]) == 2  # refused before the checkpoint is read
    assert capsys.readouterr().err == f"error: {hf}: exists and is not empty (pass --force to write into it)\n"
    assert (hf / "model.safetensors").read_bytes() == b"weights"
    assert ckpt_export.main([str(tmp_path / "nowhere"), str(hf), "--force"]) == 2
    assert "does not exist" in capsys.readouterr().err
    weights = hf / "model.safetensors"
    for force in ([], ["--force"]):  # a file: --force, which the message told to pass, then failed after the conversion
        assert ckpt_export.main([str(tmp_path / "nowhere"), str(weights), *force]) == 2
        assert capsys.readouterr().err == f"error: {weights}: not a directory (name the export directory to write)\n"
