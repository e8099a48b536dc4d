"""HF transformers DeepseekV3 <-> deepseek_pt: logits parity both ways on tiny random models (fp32)."""
import dataclasses
import hashlib
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

from deepseek_pt.config import load_config  # noqa: E402
from deepseek_pt.convert import main as convert_main  # noqa: E402
from deepseek_pt.data.format import FIM_SYMBOLS  # noqa: E402
from deepseek_pt.export import load_export, read_export_info, save_export  # noqa: E402
from deepseek_pt.interop.checkpoints import load_checkpoint  # noqa: E402
from deepseek_pt.interop.hf import HFConversionError, load_hf, model_dict_from_hf, save_hf  # noqa: E402
from deepseek_pt.model import Transformer, to_output_subspace  # noqa: E402
from model_configs import tiny  # noqa: E402

YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def hf_config(**overrides) -> DeepseekV3Config:
    kw = dict(vocab_size=97, hidden_size=48, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
              routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=4, v_head_dim=12,
              qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
              max_position_embeddings=64, rope_parameters=YARN)
    return DeepseekV3Config(**{**kw, **overrides})


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights far from init (norm gains != 1, nonzero routing bias) so that any mapping slip shows."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "norm" in name:
            t.copy_(torch.rand(t.shape, generator=g) + 0.5)
        elif name.endswith("e_score_correction_bias"):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        elif t.is_floating_point() and "inv_freq" not in name and "tokens_per_expert" not in name:
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)


def ids(T=48):
    return torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(1))


def assert_logits_close(ours, theirs):
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


HF_VARIANTS = {
    "q_lora+yarn+groups+dense_first": {},
    "no_q_lora+half_split_rope+eps+all_moe": dict(
        q_lora_rank=None, rope_interleave=False, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rms_norm_eps=1e-2, first_k_dense_replace=0, n_group=1, topk_group=1, norm_topk_prob=False,
        n_shared_experts=2),
    "tied+all_dense": dict(tie_word_embeddings=True, first_k_dense_replace=3),
}


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_load_hf_gives_transformers_logits(tmp_path, variant):
    hf = DeepseekV3ForCausalLM(hf_config(**HF_VARIANTS[variant])).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    with torch.no_grad():
        assert_logits_close(ours(ids()), hf(ids()).logits)
    if hf.config.first_k_dense_replace < 3:
        assert ours.moe_layers()[0].gate.e_score_correction_bias.abs().sum() > 0


def random_model(cfg, seed=0) -> Transformer:
    model = Transformer(cfg.model).eval()
    randomize(model, seed)
    return model


OUR_VARIANTS = {
    "q_lora+yarn+mtp": dict(mtp_depth=1),
    "no_q_lora+plain_rope+tied+no_shared_experts": dict(
        attention__q_lora_rank=0, attention__rope={"theta": 500.0}, tie_embeddings=True, moe__n_dense_layers=0,
        moe__n_expert_groups=1, moe__n_limited_groups=1, moe__n_shared_experts=0),
}


@pytest.mark.parametrize("variant", OUR_VARIANTS)
def test_save_hf_loads_in_transformers_with_the_same_logits(tmp_path, variant):
    model = random_model(tiny(**OUR_VARIANTS[variant]))
    assert save_hf(model, tmp_path, max_shard_bytes=100_000) == []  # sharded, with an index
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(model(ids()), hf(ids()).logits)
    back = load_hf(tmp_path)  # and the way back is exact, MTP and routing bias included
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    hf.save_pretrained(tmp_path / "resaved")  # transformers' own layout of the same model reads back too
    with torch.no_grad():
        assert_logits_close(load_hf(tmp_path / "resaved")(ids()), hf(ids()).logits)


def test_transformers_generate_equals_our_compressed_cache_decoding(tmp_path):
    from deepseek_pt.generate import generate_tokens

    model = random_model(tiny())
    save_hf(model, tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    prompt = ids(6)[0].tolist()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                         pad_token_id=0)[0, len(prompt):].tolist()
    ours = list(generate_tokens(model, prompt, 40, temperature=0.0))
    assert ours == theirs and len(set(ours)) > 5


def test_mtp_layers_follow_deepseeks_layout(tmp_path):
    """Our MTP depth 0 is decoder layer n_layers in the checkpoint; transformers' own MTP layer (which
    reads [embedding; hidden]) computes what ours does from the converted weights."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    model = random_model(tiny(mtp_depth=1))
    save_hf(model, tmp_path)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    layer = MtpLayer(hf.config.get_mtp_config(), DeepseekV3DecoderLayer, DeepseekV3RMSNorm, 0).eval()
    prefix, E = "model.layers.3.", model.config.moe.n_routed_experts
    stored = {k[len(prefix):]: v for k, v in load_file(tmp_path / "model.safetensors").items() if k.startswith(prefix)}
    assert torch.equal(stored.pop("embed_tokens.weight"), model.embed_tokens.weight)
    assert torch.equal(stored.pop("shared_head.head.weight"), model.lm_head.weight)
    expert = [{w: stored.pop(f"mlp.experts.{i}.{w}.weight") for w in ("gate_proj", "up_proj", "down_proj")} for i in range(E)]
    state = {("post_norm.weight" if k == "shared_head.norm.weight" else k if k.split(".")[0] in ("enorm", "hnorm", "eh_proj")
              else "mtp_block." + k): v for k, v in stored.items()}
    state["mtp_block.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e["gate_proj"], e["up_proj"]]) for e in expert])
    state["mtp_block.mlp.experts.down_proj"] = torch.stack([e["down_proj"] for e in expert])
    layer.load_state_dict(state, strict=True)
    h, emb, pos = torch.randn(2, 10, 48), torch.randn(2, 10, 48), torch.arange(10)[None]
    mask = transformers.masking_utils.create_causal_mask(config=layer.config, inputs_embeds=h, attention_mask=None,
                                                         cache=None, position_ids=pos)
    with torch.no_grad():
        theirs = layer(emb, h, position_embeddings=hf.model.rotary_emb(h, pos), attention_mask=mask, position_ids=pos,
                       cache=None)
        mtp = model.mtp[0]
        torch.testing.assert_close(mtp.norm(mtp(h, emb)), theirs, rtol=1e-4, atol=1e-5)
        # The whole chain as transformers drafts with it: the main model's last hidden state after its final norm
        # (`hidden_states[-1]`, tied to `last_hidden_state`) feeds depth 1, whose logits are the shared head's.
        tokens = ids(12)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        main = hf.model(inputs, output_hidden_states=True).hidden_states[-1]
        T, pos = inputs.shape[1], torch.arange(inputs.shape[1] - 1)[None]
        emb = hf.model.embed_tokens(inputs[:, 1:])
        mask = transformers.masking_utils.create_causal_mask(config=layer.config, inputs_embeds=emb,
                                                             attention_mask=None, cache=None, position_ids=pos)
        drafted = layer(emb, main[:, : T - 1], position_embeddings=hf.model.rotary_emb(emb, pos), attention_mask=mask,
                        position_ids=pos, cache=None)
        theirs = torch.nn.functional.cross_entropy(hf.lm_head(drafted).flatten(0, 1), targets[:, 1:].flatten())
        model(inputs, targets)
        torch.testing.assert_close(model.last_losses["mtp_loss"], theirs, rtol=1e-5, atol=1e-6)


def test_mla_o_is_refused_unless_folded(tmp_path):
    model = random_model(tiny())
    to_output_subspace(model, 16)
    with pytest.raises(HFConversionError, match="MLA-o.*fold"):
        save_hf(model, tmp_path)
    errors = save_hf(model, tmp_path, fold=True)
    assert len(errors) == 3 and max(errors) < 1e-6  # fp32 rounding of the exact product
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert_logits_close(model(ids()), hf(ids()).logits)
    assert save_hf(model, tmp_path / "bf16", fold=True, dtype=torch.bfloat16) and \
        max(save_hf(model, tmp_path / "bf16", fold=True, dtype=torch.bfloat16)) > 1e-4


def quantize_fp8(w: torch.Tensor, block: int):
    """DeepSeek-style block FP8: per [block x block] tile, scale = amax / 448."""
    rows, cols = w.shape
    scale = torch.ones(-(-rows // block), -(-cols // block))
    q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            tile = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
            scale[i, j] = tile.abs().max() / 448
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (tile / scale[i, j]).to(torch.float8_e4m3fn)
    return q, scale


def test_fp8_release_checkpoints_are_dequantized(tmp_path):
    hf = DeepseekV3ForCausalLM(hf_config()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path / "src")
    tensors, block, expected = load_file(tmp_path / "src" / "model.safetensors"), 16, {}
    for name in [n for n in tensors if n.endswith("proj.weight") or n.endswith("proj_with_mqa.weight")]:
        q, scale = quantize_fp8(tensors[name], block)
        tensors[name], tensors[f"{name}_scale_inv"] = q, scale
        expected[name] = torch.cat([torch.cat([q[i:i + block, j:j + block].float() * scale[i // block, j // block]
                                               for j in range(0, q.shape[1], block)], 1)
                                    for i in range(0, q.shape[0], block)], 0)
    (tmp_path / "fp8").mkdir()
    save_file(tensors, tmp_path / "fp8" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [block, block]}
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    ours = load_hf(tmp_path / "fp8")
    state = ours.state_dict()
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in expected  # 20 rows: a partial tile
    for name, w in expected.items():
        assert torch.equal(state[name.removeprefix("model.")], w), name
    # A corrupt scale or block size was a RuntimeError / IndexError traceback from inside the dequantization
    key = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    save_file({**tensors, f"{key}_scale_inv": torch.ones(1, 1)}, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(HFConversionError) as e:
        load_hf(tmp_path / "fp8")
    assert str(e.value) == (f"{tmp_path / 'fp8'}: tensor {key}_scale_inv has shape [1, 1], but {key} [20, 48] in "
                            "tiles of [16, 16] needs [2, 3]")
    config["quantization_config"]["weight_block_size"] = [16]
    (tmp_path / "fp8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFConversionError, match=r"config.json: quantization_config.weight_block_size must be two "
                                                r"positive integers, got \[16\]"):
        load_hf(tmp_path / "fp8")


def test_half_split_rope_rows_are_interleaved_pair_by_pair():
    """rope_interleave=false checkpoints rotate row pairs (i, i + d/2), we rotate (2i, 2i + 1): pair i's rows i and
    i + d/2 must land on rows 2i and 2i + 1. With d = 8 that is the order 0 4 1 5 2 6 3 7 (written out by hand:
    at d = 4 the permutation and its inverse are both 0 2 1 3, so the logits tests' rope dim cannot tell them
    apart; DeepSeek's d is 64). Each group's leading (nope) rows stay in place."""
    from deepseek_pt.interop.hf import _interleave_rope_rows

    w = torch.arange(2 * 10, dtype=torch.float32)[:, None].repeat(1, 3)  # 2 groups of 2 nope + 8 rope rows
    got = _interleave_rope_rows(w, 2, 8)[:, 0].tolist()
    assert got == [0, 1, 2, 6, 3, 7, 4, 8, 5, 9, 10, 11, 12, 16, 13, 17, 14, 18, 15, 19]


def test_fp8_scales_cover_rectangular_blocks_rows_then_columns():
    """weight_block_size is [rows, cols]: scale_inv[i, j] covers rows i*rows .. and columns j*cols ... With a [2, 3]
    block, a 3 x 4 weight of ones and scales [[1, 2], [3, 4]] dequantize (by hand) to rows 0-1: 1 1 1 2, row 2:
    3 3 3 4; the released checkpoints' square 128 x 128 blocks (and the 16 x 16 of the FP8 test) cannot tell rows
    from columns."""
    from deepseek_pt.interop.hf import _dequantize_fp8

    got = _dequantize_fp8(torch.ones(3, 4).to(torch.float8_e4m3fn), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), [2, 3])
    assert got.tolist() == [[1, 1, 1, 2], [1, 1, 1, 2], [3, 3, 3, 4]]


def test_a_bf16_hf_save_keeps_the_router_bias_fp32(tmp_path):
    """The balancing bias moves in steps far below bf16's resolution (as in exports): a bf16 HF copy stores it fp32,
    and loads back bit for bit, while the weights are bf16."""
    model = Transformer(tiny().model)
    randomize(model)
    bias = "layers.1.mlp.gate.e_score_correction_bias"
    with torch.no_grad():
        model.state_dict()[bias].add_(1e-4)  # a step bf16 cannot hold next to values of ~0.5
    save_hf(model, tmp_path / "hf", dtype=torch.bfloat16)
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert stored[f"model.{bias}"].dtype == torch.float32
    assert torch.equal(stored[f"model.{bias}"], model.state_dict()[bias])
    assert torch.equal(load_hf(tmp_path / "hf").state_dict()[bias], model.state_dict()[bias])


def test_unsupported_hf_configs_are_refused(tmp_path):
    good = hf_config().to_dict()
    for change, message in [({"model_type": "llama"}, "model_type is 'llama'"),
                            ({"attention_bias": True}, "attention_bias"),
                            ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope type 'linear'"),
                            ({"num_key_value_heads": 2}, "num_key_value_heads")]:
        with pytest.raises(HFConversionError, match=message):
            model_dict_from_hf({**good, **change}, 0, "config.json")
    with pytest.raises(HFConversionError, match="softmax"):
        save_hf(random_model(tiny(moe__score_func="softmax")), tmp_path)


def test_hf_config_values_of_the_wrong_type_are_named(tmp_path):
    # Computed with (dict(), min, range, float(), a division) before deepseek_pt's config checks types: these were
    # TypeError, ValueError and ZeroDivisionError tracebacks
    import shutil

    save_hf(random_model(tiny()), tmp_path / "good")
    good = json.loads((tmp_path / "good" / "config.json").read_text())
    yarn = good["rope_scaling"]
    for i, (change, message) in enumerate([
            ({"rope_scaling": "yarn"}, "rope_scaling must be an object, got 'yarn'"),
            ({"rope_theta": None}, "rope_theta must be a number, got None"),
            ({"rope_scaling": {**yarn, "factor": None, "original_max_position_embeddings": 0}},
             "rope_scaling.original_max_position_embeddings must be positive, got 0"),
            ({"rope_scaling": {**yarn, "beta_fast": [32]}}, "rope_scaling.beta_fast must be a number, got [32]"),
            ({"routed_scaling_factor": "x"}, "routed_scaling_factor must be a number, got 'x'"),
            ({"first_k_dense_replace": None}, "first_k_dense_replace must be an integer, got None"),
            ({"num_nextn_predict_layers": "1"}, "num_nextn_predict_layers must be an integer, got '1'")]):
        bad = tmp_path / f"bad{i}"
        shutil.copytree(tmp_path / "good", bad)
        (bad / "config.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(HFConversionError) as e:
            load_hf(bad)
        assert str(e.value) == f"{bad / 'config.json'}: {message}"


def _saved_with_config(hf_dir, **changes) -> None:
    """A tiny random model saved in HF format, its config.json then changed."""
    save_hf(random_model(tiny()), hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **changes}))


def test_a_misshaped_tensor_of_a_half_split_rope_checkpoint_is_named(tmp_path):
    # Its rotary rows were permuted before the shape check: a reshape's RuntimeError traceback
    _saved_with_config(tmp_path, rope_interleave=False)
    tensors = load_file(tmp_path / "model.safetensors")
    key = "model.layers.0.self_attn.q_b_proj.weight"
    rows, cols = tensors[key].shape
    save_file({**tensors, key: torch.zeros(rows + 1, cols)}, tmp_path / "model.safetensors")
    with pytest.raises(HFConversionError) as e:
        load_hf(tmp_path)
    assert str(e.value) == f"{tmp_path}: tensor {key} has shape [{rows + 1}, {cols}], config.json gives [{rows}, {cols}]"


def test_a_config_json_too_large_to_allocate_is_named(tmp_path):
    # The model config.json describes was allocated before the weights' shapes were checked: the allocator's
    # RuntimeError traceback, or a host out of memory
    _saved_with_config(tmp_path, vocab_size=97 * 10**12)
    with pytest.raises(HFConversionError) as e:
        load_hf(tmp_path)
    assert str(e.value) == f"{tmp_path}: tensor model.embed_tokens.weight has shape [97, 48], config.json gives [{97 * 10**12}, 48]"


def _misplace_in_index(hf_dir, key):
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    index["weight_map"][key] = next(s for s in shards if s != index["weight_map"][key])
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_unreadable_hf_dirs_are_refused_naming_the_file(tmp_path):
    import shutil

    save_hf(random_model(tiny()), tmp_path / "good", max_shard_bytes=50_000)  # sharded: an index
    weights = next((tmp_path / "good").glob("model-00001-of-*.safetensors"))
    for name, damage, message in [
            ("truncated", lambda d: (d / weights.name).write_bytes(weights.read_bytes()[:-100]), "unreadable safetensors"),
            ("not_safetensors", lambda d: (d / weights.name).write_bytes(b"garbage"), "unreadable safetensors"),
            ("bad_index", lambda d: (d / "model.safetensors.index.json").write_text("[]"), "not a safetensors index"),
            ("deep_index", lambda d: (d / "model.safetensors.index.json").write_text("[" * 5000 + "]" * 5000),
             r"not a safetensors index with a weight_map \(NestedTooDeeply: nested too deeply"),  # a RecursionError
            ("wrong_shard", lambda d: _misplace_in_index(d, "model.embed_tokens.weight"),  # was a SafetensorError
             "cannot read tensor model.embed_tokens.weight, which .*index.json places there"),
            ("list_config", lambda d: (d / "config.json").write_text("[1]"), "config.json: holds a JSON list")]:
        shutil.copytree(tmp_path / "good", tmp_path / name)
        damage(tmp_path / name)
        with pytest.raises(HFConversionError, match=message) as e:
            load_hf(tmp_path / name)
        assert str(tmp_path / name) in str(e.value)


def test_saving_over_an_hf_dir_leaves_none_of_its_weights(tmp_path, capsys):
    old, new = random_model(tiny(), seed=1), random_model(tiny(), seed=2)
    save_hf(old, tmp_path / "hf", max_shard_bytes=50_000)  # sharded, with an index
    save_hf(new, tmp_path / "hf")  # one file: the old index and shards must not shadow it
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                                    "model.safetensors"]
    assert all(torch.equal(a, b) for a, b in zip(load_hf(tmp_path / "hf").state_dict().values(),
                                                 new.state_dict().values()))
    save_export(old, tiny(), tmp_path / "exp")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf"), "--force",
                         "--max-shard-gb", "0.00005"]) == 0
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_hf(tmp_path / "hf").state_dict().values(),
                                                 old.state_dict().values()))
    # Over an export: its export.json stayed, and load_checkpoint read the HF copy as that export, now "corrupt"
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "exp"), "--force"]) == 0
    assert not (tmp_path / "exp" / "export.json").exists()
    assert all(torch.equal(a, b) for a, b in zip(load_checkpoint(tmp_path / "exp").model.state_dict().values(),
                                                 old.state_dict().values()))
    capsys.readouterr()


def test_an_interrupted_save_hf_leaves_no_torn_weights(tmp_path, monkeypatch):
    def killed(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a safetensors file")
        raise KeyboardInterrupt

    monkeypatch.setattr("deepseek_pt.interop.hf.save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        save_hf(random_model(tiny()), tmp_path / "hf")
    assert list((tmp_path / "hf").iterdir()) == []


def test_convert_cli_both_ways(tmp_path, capsys):
    cfg = tiny()
    model = random_model(cfg)
    save_export(model, cfg, tmp_path / "exp")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf")]) == 0
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert_logits_close(model(ids()), hf(ids()).logits)
    # hf-to-ds for continued pretraining: model section from HF, the rest from the training config.
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "back"), "--base-config", "configs/smoke.yaml"]) == 0
    back, back_cfg = load_export(tmp_path / "back")
    smoke = load_config("configs/smoke.yaml")
    assert back_cfg.train == smoke.train
    # config.json's keys come from the HF model, the run's own knobs (which config.json lacks) from the base
    assert cfg.model.moe.bias_update_rate != smoke.model.moe.bias_update_rate
    moe = dataclasses.replace(cfg.model.moe, bias_update_rate=smoke.model.moe.bias_update_rate,
                              seq_aux_loss_alpha=smoke.model.moe.seq_aux_loss_alpha)
    assert back_cfg.model == dataclasses.replace(cfg.model, mtp_loss_weight=smoke.model.mtp_loss_weight, moe=moe)
    assert torch.equal(back.layers[1].mlp.gate.e_score_correction_bias, model.layers[1].mlp.gate.e_score_correction_bias)
    capsys.readouterr()


def test_hf_to_ds_overrides_fit_a_base_config_to_the_model(tmp_path, capsys):
    """DeepSeek-V3's base config runs EP 64 on sequences of 4096, which a model of 8 experts and 64 positions refuses;
    overrides fit it, after the options too. Of the model section, which config.json gives, only the training knobs
    may be set."""
    cfg = tiny()
    save_export(random_model(cfg), cfg, tmp_path / "exp")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf")]) == 0
    v3 = "configs/deepseek-v3-671b.yaml"
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "refused"), "--base-config", v3]) == 2
    assert "does not divide model.moe.n_routed_experts (8)" in capsys.readouterr().err
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "back"), "--base-config", v3,
                         "parallel.expert_parallel_size=8", "data.seq_len=32", "model.moe.bias_update_rate=0.002"]) == 0
    _, back_cfg = load_export(tmp_path / "back")
    assert back_cfg.parallel.expert_parallel_size == 8 and back_cfg.model.moe.bias_update_rate == 0.002
    assert back_cfg.train == load_config(v3).train
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "dim"), "model.dim=64"]) == 2
    assert "override 'model.dim=64': the model section comes from" in capsys.readouterr().err


def test_hf_copy_keeps_the_fill_in_the_middle_pieces_whole(tmp_path, fim_tokenizer_model):
    """A tokenizer trained with train_tokenizer.py --fim: its HF copy encodes a fill-in-the-middle prompt to the same
    ids, each of the three pieces one token, so the HF model is prompted for a middle as training wrote them."""
    import sentencepiece as spm

    model = fim_tokenizer_model
    cfg = tiny(vocab_size=1024)
    save_export(random_model(cfg), cfg, tmp_path / "exp", tokenizer=model, doc_boundary="eos")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf")]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(model))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = f"{FIM_SYMBOLS[0]}def f(x):{FIM_SYMBOLS[1]}\n    return y\n{FIM_SYMBOLS[2]}"
    ids = sp.encode(prompt)
    assert [ids.count(sp.piece_to_id(s)) for s in FIM_SYMBOLS] == [1, 1, 1]
    assert tok(prompt, add_special_tokens=False)["input_ids"] == ids


def test_hf_copy_carries_a_tokenizer_that_autotokenizer_reads(tmp_path, pydoc_data_dir, capsys):
    import sentencepiece as spm

    cfg = tiny(vocab_size=pydoc_data_dir.vocab_size)
    save_export(random_model(cfg), cfg, tmp_path / "exp", tokenizer=pydoc_data_dir.tokenizer_model, doc_boundary="eos")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf")]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(pydoc_data_dir.tokenizer_model))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    texts = [json.loads(line)["text"] for line in pydoc_data_dir.corpus.read_text().splitlines()[:10]]
    for text in texts + ["  two spaces, digits 12345, \u00fcn\u00efc\u00f8d\u00e9 and \U0001F600"]:
        ids_ = sp.encode(text)
        assert tok(text, add_special_tokens=False)["input_ids"] == ids_
        assert tok.decode(ids_) == text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (sp.bos_id(), sp.eos_id()) == (tok.bos_token_id, tok.eos_token_id)
    capsys.readouterr()
    # Back to an export: with the HF copy's tokenizer, and only with that one
    other = "tests/assets/smoke_shards/tokenizer.model"  # 1024 pieces too, another corpus
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "back"), "--tokenizer", other]) == 2
    err = capsys.readouterr().err
    assert f"error: --tokenizer {other} (sha256 " in err, err
    assert f"is not the tokenizer {tmp_path / 'hf'} was trained with" in err, err
    assert not (tmp_path / "back").exists()
    sha = hashlib.sha256(pydoc_data_dir.tokenizer_model.read_bytes()).hexdigest()
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert read_export_info(tmp_path / "back")["tokenizer_sha256"] == sha
    assert convert_main(["mla-o", str(tmp_path / "back"), str(tmp_path / "o"), "--o-latent-dim", "8"]) == 0
    assert read_export_info(tmp_path / "o")["tokenizer_sha256"] == sha
    capsys.readouterr()
    # The documents' framing goes with the copy (generate's --prefix auto reads it): the HF copy of an eos-framed
    # run was prompted after a BOS such training never put at a document's start, and lost it on the way back
    assert config["deepseek_pt_doc_boundary"] == "eos"
    assert load_checkpoint(tmp_path / "hf").doc_boundary == "eos"
    assert read_export_info(tmp_path / "back")["doc_boundary"] == "eos"
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").deepseek_pt_doc_boundary == "eos"
    # So does the sequence length it trained at (evaluate's default): not max_position_embeddings (64 here)
    assert config["deepseek_pt_seq_len"] == cfg.data.seq_len == 32
    assert load_checkpoint(tmp_path / "hf").config.data.seq_len == 32
    assert load_export(tmp_path / "back")[1].data.seq_len == 32


def test_an_hf_directory_is_loaded_reading_its_config_json_once(tmp_path, monkeypatch, capsys):
    """load_checkpoint (generate, evaluate, convert ds-to-hf and mla-o on an HF directory) read config.json for the
    model and again for its doc boundary; hf-to-ds for its early check and again in load_hf."""
    from pathlib import Path

    save_hf(random_model(tiny()), tmp_path / "hf", doc_boundary="eos")
    reads, read_text = [], Path.read_text

    def counted(self, *args, **kwargs):
        if self.name == "config.json":
            reads.append(self)
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counted)
    assert load_checkpoint(tmp_path / "hf").doc_boundary == "eos"
    assert reads == [tmp_path / "hf" / "config.json"]
    reads.clear()
    assert convert_main(["hf-to-ds", str(tmp_path / "hf"), str(tmp_path / "back")]) == 0
    assert reads == [tmp_path / "hf" / "config.json"] and read_export_info(tmp_path / "back")["doc_boundary"] == "eos"
    capsys.readouterr()


def test_convert_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tiny()
    model = random_model(cfg)
    to_output_subspace(model, 8)
    save_export(model, cfg, tmp_path / "mla_o")
    (tmp_path / "not_text").mkdir()
    (tmp_path / "not_text" / "config.json").write_bytes(b"\xff\xfe{}")  # was a UnicodeDecodeError traceback
    (tmp_path / "deep").mkdir()  # a RecursionError traceback from inside json.loads
    (tmp_path / "deep" / "config.json").write_text('{"hidden_size": ' + "[" * 5000 + "]" * 5000 + "}")
    for argv, message in [(["hf-to-ds", str(tmp_path / "missing"), str(tmp_path / "o1")], "config.json: not found"),
                          (["hf-to-ds", str(tmp_path / "not_text"), str(tmp_path / "o0")], "config.json: not valid JSON"),
                          (["hf-to-ds", str(tmp_path / "deep"), str(tmp_path / "o8")],
                           f"{tmp_path / 'deep' / 'config.json'}: nested too deeply"),
                          (["ds-to-hf", str(tmp_path / "mla_o"), str(tmp_path / "o2")], "pass --fold"),
                          (["ds-to-hf", str(tmp_path / "mla_o"), str(tmp_path / "mla_o")], "not empty")]:
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert convert_main(["ds-to-hf", str(tmp_path / "mla_o"), str(tmp_path / "o3"), "--fold"]) == 0
    assert "folded MLA-o into o_proj" in capsys.readouterr().out
    save_export(random_model(cfg), cfg, tmp_path / "bad_tok", tokenizer=b"garbage")
    # A config.json without num_hidden_layers was a KeyError traceback from the MTP-depth probe, before the check
    # that names missing keys
    (tmp_path / "keyless").mkdir()
    (tmp_path / "keyless" / "model.safetensors").write_bytes((tmp_path / "o3" / "model.safetensors").read_bytes())
    hf_config = json.loads((tmp_path / "o3" / "config.json").read_text())
    del hf_config["num_hidden_layers"]
    (tmp_path / "keyless" / "config.json").write_text(json.dumps(hf_config))
    for argv, message in [(["hf-to-ds", str(tmp_path / "keyless"), str(tmp_path / "o7")],
                           f"{tmp_path / 'keyless' / 'config.json'}: missing key 'num_hidden_layers'"),
                          (["mla-o", str(tmp_path / "o3"), str(tmp_path / "o9"), "--o-latent-dim", "48"],
                           (f"--o-latent-dim 48 >= {tmp_path / 'o3'}'s model.attention.n_heads x v_head_dim (4 x 12 "
                            "= 48): o_a_proj -> o_b_proj at least as wide")),
                          (["ds-to-hf", str(tmp_path / "bad_tok"), str(tmp_path / "o4")],
                           f"{tmp_path / 'bad_tok'}: its tokenizer.model: not a sentencepiece model"),
                          (["hf-to-ds", str(tmp_path / "o3"), str(tmp_path / "o5"), "--tokenizer", str(tmp_path / "nope")],
                           f"--tokenizer {tmp_path / 'nope'}: no such file"),
                          (["hf-to-ds", str(tmp_path / "o3"), str(tmp_path / "o6"), "--tokenizer",
                            str(tmp_path / "o3" / "config.json")], "not a sentencepiece model")]:
        assert convert_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err, err
        assert not (tmp_path / argv[2]).exists()  # refused before anything is written


def test_ds_to_hf_refusing_a_model_writes_nothing(tmp_path, capsys):
    # A model HF cannot express (softmax scoring: configs/deepseek-v2-lite.yaml) was refused only after
    # the tokenizer files were written, leaving OUT non-empty: a retry needed --force, and OUT read
    # as "not a run directory" to evaluate/generate.
    cfg = tiny(vocab_size=1024, moe__score_func="softmax")
    save_export(random_model(cfg), cfg, tmp_path / "exp", tokenizer="tests/assets/smoke_shards/tokenizer.model")
    assert convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.moe.score_func softmax" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


@pytest.mark.parametrize("size", ["nan", "inf", "0"])
def test_ds_to_hf_refuses_a_shard_size_that_is_no_number_of_bytes(tmp_path, capsys, size):
    # nan and inf passed the `<= 0` check and ended in int()'s ValueError / OverflowError traceback, after the
    # tokenizer files were written to OUT
    cfg = tiny()
    save_export(random_model(cfg), cfg, tmp_path / "exp")
    with pytest.raises(SystemExit) as e:
        convert_main(["ds-to-hf", str(tmp_path / "exp"), str(tmp_path / "hf"), "--max-shard-gb", size])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.splitlines()[-1].endswith(
        "error: --o-latent-dim and --max-shard-gb must be positive (--max-shard-gb a finite number)"), err
    assert not (tmp_path / "hf").exists()
