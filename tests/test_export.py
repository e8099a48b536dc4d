"""Consolidated exports: exact round trips, dtype handling, and clear errors on bad input."""
import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_pt.config import ConfigError, load_config
from deepseek_pt.export import ExportError, cast_model, load_export, read_export_info, save_export
from deepseek_pt.fileio import sha256_file
from deepseek_pt.interop.checkpoints import load_checkpoint
from deepseek_pt.model import Transformer, to_output_subspace
from model_configs import tiny


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg.model).eval()
    with torch.no_grad():
        for moe in model.moe_layers():  # a trained model's balancing bias is not zero
            moe.gate.e_score_correction_bias.normal_(0, 1e-3)
    return model


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "mtp_depth": 1}])
def test_round_trip_is_exact(tmp_path, overrides):
    cfg = tiny(**overrides)
    model = _model(cfg)
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"sentencepiece bytes")
    save_export(model, cfg, tmp_path / "exp", step=12, source="runs/x/checkpoints/step_00000012", tokenizer=tok,
                doc_boundary="eos")
    loaded, loaded_cfg = load_export(tmp_path / "exp")
    _assert_same_state(model, loaded)
    assert loaded_cfg == cfg
    info = read_export_info(tmp_path / "exp")
    assert (info["step"], info["dtype"], info["doc_boundary"]) == (12, "float32", "eos")
    assert info["tokenizer_sha256"] == sha256_file(tok)
    assert (tmp_path / "exp" / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    if cfg.model.tie_embeddings:  # stored once, still shared after loading
        assert "lm_head.weight" not in load_file(tmp_path / "exp" / "model.safetensors")
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_the_tokenizers_identity_is_recorded_and_checked(tmp_path):
    cfg = tiny()
    model = _model(cfg)
    save_export(model, cfg, tmp_path / "id_only", tokenizer_sha256="ab" * 32)  # known, but no copy at hand
    assert read_export_info(tmp_path / "id_only")["tokenizer_sha256"] == "ab" * 32
    assert not (tmp_path / "id_only" / "tokenizer.model").exists()
    with pytest.raises(ExportError, match=r"tokenizer \(sha256 [0-9a-f]{12}\.\.\.\) is not the one the model was "
                                          r"trained with \(sha256 abababababab\.\.\.\)"):
        save_export(model, cfg, tmp_path / "refused", tokenizer=b"other bytes", tokenizer_sha256="ab" * 32)
    info = json.loads((tmp_path / "id_only" / "export.json").read_text())
    (tmp_path / "id_only" / "export.json").write_text(json.dumps({**info, "tokenizer_sha256": "abc"}))
    with pytest.raises(ExportError, match="tokenizer_sha256 'abc' is not 64 lowercase hex digits"):
        read_export_info(tmp_path / "id_only")


def test_mla_o_model_exports_its_own_config(tmp_path):
    cfg = tiny()
    model = _model(cfg)
    to_output_subspace(model, 8)
    save_export(model, cfg, tmp_path / "exp")
    loaded, loaded_cfg = load_export(tmp_path / "exp")
    assert loaded_cfg.model.attention.use_output_subspace and loaded_cfg.model.attention.o_latent_dim == 8
    _assert_same_state(model, loaded)


def test_mla_o_conversion_keeps_the_step_and_what_else_the_export_records(tmp_path, capsys):
    """convert mla-o wrote step: null; the step, tokenizer, dtype and document framing carry over, the source is the
    converted checkpoint."""
    from deepseek_pt.convert import main as convert_main

    cfg = tiny()
    save_export(_model(cfg), cfg, tmp_path / "exp", step=12, source="runs/x/checkpoints/step_00000012",
                tokenizer=b"sentencepiece bytes", dtype=torch.bfloat16, doc_boundary="bos_eos")
    assert convert_main(["mla-o", str(tmp_path / "exp"), str(tmp_path / "o"), "--o-latent-dim", "8"]) == 0
    info = read_export_info(tmp_path / "o")
    assert (info["step"], info["dtype"], info["doc_boundary"], info["source"]) == (
        12, "bfloat16", "bos_eos", str((tmp_path / "exp").absolute()))
    assert (tmp_path / "o" / "tokenizer.model").read_bytes() == b"sentencepiece bytes"
    assert load_checkpoint(tmp_path / "o").step == 12
    capsys.readouterr()


def test_bf16_export_keeps_router_bias_fp32(tmp_path):
    cfg = tiny()
    model = _model(cfg)
    save_export(model, cfg, tmp_path / "exp", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "exp" / "model.safetensors")
    assert stored["embed_tokens.weight"].dtype == torch.bfloat16
    bias = "layers.1.mlp.gate.e_score_correction_bias"
    assert stored[bias].dtype == torch.float32
    loaded, _ = load_export(tmp_path / "exp")
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.state_dict()[bias], model.state_dict()[bias])
    assert torch.equal(loaded.layers[1].mlp.gate.weight, model.layers[1].mlp.gate.weight.bfloat16().float())
    as_fp32, _ = load_export(tmp_path / "exp", dtype=torch.float32)
    assert as_fp32.embed_tokens.weight.dtype == torch.float32


@pytest.fixture
def export_dir(tmp_path):
    cfg = tiny()
    return save_export(_model(cfg), cfg, tmp_path / "exp")


def test_corrupt_weights_are_refused(export_dir):
    data = bytearray((export_dir / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (export_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors: corrupt: sha256"):
        load_export(export_dir)


def _rewrite_weights(export_dir, edit):
    """Change the stored tensors and re-record the checksum, so that only the name/shape check can object."""
    file = export_dir / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file)
    info = json.loads((export_dir / "export.json").read_text())
    info["sha256"] = sha256_file(file)
    (export_dir / "export.json").write_text(json.dumps(info))


def test_shape_mismatch_names_file_and_tensor(export_dir):
    _rewrite_weights(export_dir, lambda t: t.update({"layers.0.self_attn.kv_b_proj.weight": torch.zeros(3, 3)}))
    with pytest.raises(ExportError, match=r"model\.safetensors: tensor layers\.0\.self_attn\.kv_b_proj\.weight "
                                          r"has shape \[3, 3\], but .*config\.yaml gives \[80, 16\]"):
        load_export(export_dir)


def test_an_export_written_by_an_earlier_version_loads(export_dir):
    """Its config.yaml may hold a key since replaced (train.eval_batches): dropped here, refused in a user's config."""
    config = (export_dir / "config.yaml").read_text()
    assert "  eval_sequences: 256\n" in config
    (export_dir / "config.yaml").write_text(config.replace("  eval_sequences: 256\n", "  eval_batches: 8\n", 1))
    model, cfg = load_export(export_dir)
    assert cfg.train.eval_sequences == 256 and model is not None
    with pytest.raises(ConfigError, match="train.eval_batches: replaced by train.eval_sequences"):
        load_config(export_dir / "config.yaml")


def test_a_config_yaml_too_large_to_allocate_is_named(export_dir):
    """config.yaml has no checksum: the model it describes was allocated before the weights' shapes were checked
    (a RuntimeError of the allocator, or a host out of memory)."""
    config = (export_dir / "config.yaml").read_text()
    (export_dir / "config.yaml").write_text(config.replace("vocab_size: 97\n", "vocab_size: 97000000000000\n", 1))
    with pytest.raises(ExportError, match=r"tensor embed_tokens.weight has shape \[97, 48\], but .*config.yaml gives "
                                          r"\[97000000000000, 48\]"):
        load_export(export_dir)


def test_missing_and_unexpected_tensors_are_named(export_dir):
    _rewrite_weights(export_dir, lambda t: t.pop("norm.weight"))
    with pytest.raises(ExportError, match=r"tensor norm\.weight is missing"):
        load_export(export_dir)
    _rewrite_weights(export_dir, lambda t: t.update({"norm.weight": torch.ones(48), "extra.weight": torch.ones(1)}))
    with pytest.raises(ExportError, match=r"tensor extra\.weight is not part of the model"):
        load_export(export_dir)


def test_incomplete_or_newer_exports_are_refused(export_dir):
    info = json.loads((export_dir / "export.json").read_text())
    (export_dir / "export.json").write_text(json.dumps({**info, "format_version": 99}))
    with pytest.raises(ExportError, match="format_version 99 is newer"):
        load_export(export_dir)
    (export_dir / "export.json").unlink()
    with pytest.raises(ExportError, match="export.json: not found"):
        load_export(export_dir)


def test_training_run_dirs_go_through_the_engines_export(tmp_path, monkeypatch, export_dir):
    """A run dir is handed to the engine's export_checkpoint, imported only then."""
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    calls = []

    def export_checkpoint(src, out):
        calls.append(src)
        model, cfg = load_export(export_dir)
        save_export(model, cfg, out, step=7, source=str(src))

    class CheckpointError(RuntimeError):
        pass

    engine_export = types.SimpleNamespace(export_checkpoint=export_checkpoint)
    monkeypatch.setitem(sys.modules, "deepseek_pt.engine.export", engine_export)
    monkeypatch.setitem(sys.modules, "deepseek_pt.engine.checkpoint", types.SimpleNamespace(CheckpointError=CheckpointError))
    ckpt = load_checkpoint(run_dir)
    assert calls == [run_dir] and ckpt.step == 7  # the checkpoint's, through its temporary export
    _assert_same_state(ckpt.model, load_export(export_dir)[0])

    def broken(src, out):
        raise CheckpointError(f"{src}: no complete checkpoint")

    engine_export.export_checkpoint = broken
    with pytest.raises(ExportError, match="no complete checkpoint"):
        load_checkpoint(run_dir)
    del engine_export.export_checkpoint
    with pytest.raises(ExportError, match="cannot read training checkpoints"):
        load_checkpoint(run_dir)


def test_a_bf16_model_rotates_positions_with_fp32_frequencies():
    from deepseek_pt.model.rope import inv_frequencies

    cfg = tiny(mtp_depth=1)
    model = cast_model(Transformer(cfg.model), torch.bfloat16)
    exact, _ = inv_frequencies(cfg.model.attention)
    layers = model.attention_layers()
    assert len(layers) == cfg.model.n_layers + 1 and all(torch.equal(layer.inv_freq, exact) for layer in layers)
    assert model.lm_head.weight.dtype == torch.bfloat16


def test_an_export_json_that_is_not_text_is_named(export_dir):
    """A corrupt export.json (bytes that are not UTF-8) was a UnicodeDecodeError traceback."""
    (export_dir / "export.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ExportError, match="export.json: not valid JSON"):
        load_export(export_dir)


def test_an_export_json_nested_too_deeply_is_named(export_dir):
    """Thousands of nested arrays in export.json were a RecursionError from inside json.loads."""
    (export_dir / "export.json").write_text('{"source": ' + "[" * 5000 + "]" * 5000 + "}")
    with pytest.raises(ExportError, match=f"^{export_dir / 'export.json'}: nested too deeply"):
        read_export_info(export_dir)


def test_a_run_that_saved_no_checkpoint_is_named_as_such(tmp_path, export_dir):
    """A run directory without checkpoints/ (train.checkpoints: false, or stopped before its first save) was called
    "not a run directory"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes((export_dir / "config.yaml").read_bytes())
    with pytest.raises(ExportError) as e:
        load_checkpoint(run_dir)
    assert str(e.value) == (f"{run_dir}: a run directory without checkpoints/ (train.checkpoints false, or the run "
                            "stopped before its first save)")
    with pytest.raises(ExportError, match="not a run directory, a checkpoints/ directory or a step_"):
        load_checkpoint(tmp_path)  # no config.yaml: not a run's
