"""HF transformers DeepseekV3 checkpoints <-> deepseek_pt models.

`load_hf(dir)` reads a directory that `DeepseekV3ForCausalLM.save_pretrained` (or DeepSeek's own
release, FP8 included) wrote; `save_hf(model, dir)` writes one that transformers loads. Only
config.json and the safetensors are read and written here: transformers is not needed to convert.

Names already match inside blocks; what differs:
- HF prefixes the decoder with `model.`; DeepSeek stores MTP depth k as decoder layer n_layers + k
  (`enorm, hnorm, eh_proj, shared_head.norm`, the block's own names, and copies of the embedding and
  head). Its eh_proj reads [embedding; hidden], ours [hidden; embedding]: the column halves swap.
- rope_interleave=false checkpoints rotate (i, i + d/2) pairs; we rotate (2i, 2i+1), so the rotary
  rows of the query and shared-key projections are permuted on the way in (we always write true).
- MLA-o has no HF equivalent: it is refused, or folded into o_proj = o_b_proj @ o_a_proj on request.
"""
from __future__ import annotations

import copy
import dataclasses
from contextlib import ExitStack
from pathlib import Path

import sentencepiece as spm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import Config, ConfigError, ModelConfig, config_from_dict
from ..data.format import DOC_BOUNDARIES
from ..export import DTYPES, FP32_TENSORS, cast_model, dtype_name, expected_shapes, expected_tensors
from ..fileio import atomic_path, atomic_write_bytes, atomic_write_json, loads_json, read_json
from ..model import MoE, Transformer

MAX_SHARD_BYTES = 5 * 1024**3


class HFConversionError(ValueError):
    """A checkpoint or model that cannot be converted; the message says what and why."""


def is_hf_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file()


def read_hf_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFConversionError(f"{file}: not found ({path} is not an HF model directory)")
    hf = read_json(file, HFConversionError)
    if not isinstance(hf, dict):
        raise HFConversionError(f"{file}: holds a JSON {type(hf).__name__}, expected an object")
    return hf


# --------------------------------------------------------------------------------------------
# Configs


def _number(value, key: str, where: str, kind: type = float):
    """A config.json value that is computed with (float(), min, range, a division) before deepseek_pt's config checks
    its type: a wrong one is named here, not left to a TypeError or ValueError traceback."""
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise HFConversionError(f"{where}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _rope_from_hf(hf: dict, where: str) -> dict:
    # transformers 5 writes rope_parameters; 4.x and DeepSeek's release write rope_theta + rope_scaling.
    section = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = hf.get(section) or {}
    if not isinstance(rope, dict):
        raise HFConversionError(f"{where}: {section} must be an object, got {rope!r}")
    theta = _number(rope.get("rope_theta", hf.get("rope_theta", 10000.0)), "rope_theta", where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return {"theta": theta}
    if kind != "yarn":
        raise HFConversionError(f"{where}: rope type {kind!r} is not supported (deepseek_pt has default and yarn)")
    if rope.get("attention_factor") is not None or rope.get("truncate", True) is False:
        raise HFConversionError(f"{where}: yarn with attention_factor or truncate=false is not supported")
    max_pos = _number(hf["max_position_embeddings"], "max_position_embeddings", where, int)
    original = _number(rope.get("original_max_position_embeddings", max_pos),
                       f"{section}.original_max_position_embeddings", where, int)
    if original < 1:  # the default factor divides by it
        raise HFConversionError(f"{where}: {section}.original_max_position_embeddings must be positive, got {original}")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    if mscale_all_dim and not mscale:
        # transformers then scales cos/sin by mscale(factor) alone; we always divide by mscale_all_dim's.
        raise HFConversionError(f"{where}: yarn with mscale_all_dim but no mscale is not supported")
    return {"theta": theta, "scaling": "yarn",
            "factor": _number(rope.get("factor") or max_pos / original, f"{section}.factor", where),
            "original_max_position_embeddings": original,
            "beta_fast": _number(rope.get("beta_fast") or 32, f"{section}.beta_fast", where),
            "beta_slow": _number(rope.get("beta_slow") or 1, f"{section}.beta_slow", where),
            "mscale": _number(mscale or 1.0, f"{section}.mscale", where),
            "mscale_all_dim": _number(mscale_all_dim or 0.0, f"{section}.mscale_all_dim", where)}


def model_dict_from_hf(hf: dict, mtp_depth: int, where: str) -> dict:
    """deepseek_pt's `model` section for an HF DeepseekV3 config.json."""
    def refuse_unless(ok: bool, msg: str) -> None:
        if not ok:
            raise HFConversionError(f"{where}: {msg}")

    refuse_unless(hf.get("model_type") == "deepseek_v3",
                  f"model_type is {hf.get('model_type')!r}; only 'deepseek_v3' (DeepseekV3ForCausalLM) converts")
    refuse_unless(not hf.get("attention_bias"), "attention_bias: true is not supported (our projections have no bias)")
    refuse_unless(hf.get("hidden_act", "silu") == "silu", f"hidden_act {hf.get('hidden_act')!r} is not supported")
    refuse_unless(hf.get("scoring_func", "sigmoid") == "sigmoid",
                  f"scoring_func {hf.get('scoring_func')!r}: transformers' DeepseekV3 routes with sigmoid")
    try:
        heads = hf["num_attention_heads"]
        refuse_unless(hf.get("num_key_value_heads") in (None, heads),
                      "num_key_value_heads must equal num_attention_heads (MLA expands keys per head)")
        return {
            "vocab_size": hf["vocab_size"], "dim": hf["hidden_size"], "inter_dim": hf["intermediate_size"],
            "n_layers": hf["num_hidden_layers"], "max_seq_len": hf["max_position_embeddings"],
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "init_std": hf.get("initializer_range", 0.02),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "mtp_depth": mtp_depth,
            "attention": {
                "n_heads": heads, "q_lora_rank": hf["q_lora_rank"] or 0, "kv_lora_rank": hf["kv_lora_rank"],
                "qk_nope_head_dim": hf["qk_nope_head_dim"], "qk_rope_head_dim": hf["qk_rope_head_dim"],
                "v_head_dim": hf["v_head_dim"], "rope": _rope_from_hf(hf, where),
            },
            "moe": {
                "n_routed_experts": hf["n_routed_experts"], "n_shared_experts": hf["n_shared_experts"],
                "top_k": hf["num_experts_per_tok"], "expert_inter_dim": hf["moe_intermediate_size"],
                "n_expert_groups": hf["n_group"], "n_limited_groups": hf["topk_group"], "score_func": "sigmoid",
                "norm_topk_prob": bool(hf["norm_topk_prob"]),
                "route_scale": _number(hf["routed_scaling_factor"], "routed_scaling_factor", where),
                "n_dense_layers": min(_number(hf["first_k_dense_replace"], "first_k_dense_replace", where, int),
                                      _number(hf["num_hidden_layers"], "num_hidden_layers", where, int)),
            },
        }
    except KeyError as e:
        raise HFConversionError(f"{where}: missing key {e.args[0]!r}") from None


TRAINING_KNOBS = (("mtp_loss_weight",), ("moe", "bias_update_rate"), ("moe", "seq_aux_loss_alpha"))
"""Model keys that shape no weight and that config.json does not carry: a run's own settings, which a base config
keeps (converting an HF model for continued pretraining must not reset the run's balancing rate)."""


def full_config(model: ModelConfig | dict, base: Config | None = None, where: str = "<hf>",
                overrides: list[str] = (), seq_len: int | None = None) -> Config:
    """A complete run Config around a model section: `base`'s other sections and TRAINING_KNOBS, or the defaults
    with data.seq_len the training `seq_len` where known (hf_seq_len), else the default capped at the model's
    max_seq_len; then `key.path=value` overrides."""
    model = copy.deepcopy(model) if isinstance(model, dict) else dataclasses.asdict(model)
    seq_len = seq_len or min(Config().data.seq_len, model["max_seq_len"])
    rest = base.to_dict() if base is not None else {"data": {"seq_len": seq_len}}
    for *section, key in TRAINING_KNOBS if base is not None else ():
        into, source = model, rest["model"]
        for name in section:
            into, source = into[name], source[name]
        into[key] = source[key]
    rest.pop("model", None)
    try:
        return config_from_dict({**rest, "model": model}, where, overrides)
    except ConfigError as e:
        raise HFConversionError(str(e)) from None


def hf_config_dict(m: ModelConfig, dtype: torch.dtype, bos_id: int | None = None, eos_id: int | None = None) -> dict:
    """config.json for `m`, in the layout of DeepSeek's release (rope_theta + rope_scaling), which
    transformers 4.x and 5.x both read."""
    a, moe, r = m.attention, m.moe, m.attention.rope
    problems = []
    if moe.score_func != "sigmoid" and moe.n_dense_layers < m.n_layers:
        problems.append("model.moe.score_func softmax: transformers' DeepseekV3 routes with sigmoid only")
    if moe.n_routed_experts // moe.n_expert_groups < 2 and moe.n_dense_layers < m.n_layers:
        problems.append("model.moe: transformers' DeepseekV3 scores a group by its best 2 experts; groups hold fewer")
    if r.scaling == "yarn" and r.mscale_all_dim and not r.mscale:
        problems.append("model.attention.rope.mscale 0 with mscale_all_dim: transformers would read it as mscale 1")
    if r.scaling == "yarn" and (not r.beta_fast or not r.beta_slow):
        problems.append("model.attention.rope.beta_fast/beta_slow 0: transformers would read them as 32/1")
    if problems:
        raise HFConversionError("cannot express this model as HF DeepseekV3: " + "; ".join(problems))
    rope_scaling = None if r.scaling == "none" else {
        "type": "yarn", "rope_type": "yarn", "factor": r.factor,
        "original_max_position_embeddings": r.original_max_position_embeddings, "beta_fast": r.beta_fast,
        "beta_slow": r.beta_slow, "mscale": r.mscale, "mscale_all_dim": r.mscale_all_dim}
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size, "hidden_size": m.dim, "intermediate_size": m.inter_dim,
        "num_hidden_layers": m.n_layers, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
        "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings, "hidden_act": "silu",
        "num_attention_heads": a.n_heads, "num_key_value_heads": a.n_heads, "q_lora_rank": a.q_lora_rank or None,
        "kv_lora_rank": a.kv_lora_rank, "qk_nope_head_dim": a.qk_nope_head_dim,
        "qk_rope_head_dim": a.qk_rope_head_dim, "v_head_dim": a.v_head_dim, "attention_bias": False,
        "attention_dropout": 0.0, "rope_theta": r.theta, "rope_scaling": rope_scaling, "rope_interleave": True,
        "n_routed_experts": moe.n_routed_experts, "n_shared_experts": moe.n_shared_experts,
        "num_experts_per_tok": moe.top_k, "moe_intermediate_size": moe.expert_inter_dim, "n_group": moe.n_expert_groups,
        "topk_group": moe.n_limited_groups, "norm_topk_prob": moe.norm_topk_prob,
        "routed_scaling_factor": moe.route_scale, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "first_k_dense_replace": moe.n_dense_layers, "num_nextn_predict_layers": m.mtp_depth,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True, "dtype": dtype_name(dtype),
    }


# --------------------------------------------------------------------------------------------
# Tensor names and layouts


def hf_name(name: str, n_layers: int) -> str:
    """The HF checkpoint key of one of our state_dict names."""
    if name.startswith("mtp."):
        k, rest = name[len("mtp."):].split(".", 1)
        layer = f"model.layers.{n_layers + int(k)}."
        if rest.startswith("block."):
            return layer + rest[len("block."):]
        return layer + ("shared_head.norm.weight" if rest == "norm.weight" else rest)
    return name if name.startswith("lm_head.") else "model." + name


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    return torch.cat(w.chunk(2, dim=1)[::-1], dim=1)


def _interleave_rope_rows(w: torch.Tensor, row_groups: int, rope_dim: int) -> torch.Tensor:
    """Rows of each group's trailing rope_dim block reordered from half-split pairs (i, i + d/2) to
    interleaved pairs (2i, 2i + 1)."""
    half = rope_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    groups = w.reshape(row_groups, -1, w.shape[-1])
    rope = groups[:, -rope_dim:][:, perm]
    return torch.cat([groups[:, :-rope_dim], rope], dim=1).reshape(w.shape)


def _fp8_block(hf: dict, where: str) -> list[int]:
    """quantization_config.weight_block_size: the [rows, cols] tile that each FP8 scale covers."""
    block = (hf.get("quantization_config") or {}).get("weight_block_size", [128, 128])
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise HFConversionError(f"{where}: quantization_config.weight_block_size must be two positive integers, "
                                f"got {block!r}")
    return block


def _dequantize_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: list[int]) -> torch.Tensor:
    """DeepSeek's block-scaled FP8: each [block[0], block[1]] tile of w is multiplied by its scale."""
    rows, cols = w.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return w.float() * scale


class _Weights:
    """The tensors of an HF checkpoint directory: one safetensors file or an index of shards."""

    def __init__(self, path: Path, stack: ExitStack):
        index = path / "model.safetensors.index.json"
        self._stack, self._handles = stack, {}
        if index.is_file():
            try:
                weight_map = loads_json(index.read_text())["weight_map"]
                self.file_of = {k: path / v for k, v in weight_map.items()}
            except (ValueError, TypeError, KeyError, AttributeError) as e:  # ValueError: not text, not JSON, too deep
                raise HFConversionError(f"{index}: not a safetensors index with a weight_map "
                                        f"({type(e).__name__}: {e})") from None
        else:
            self.file_of = {}
            for file in sorted(path.glob("*.safetensors")):
                self.file_of.update(dict.fromkeys(self._open(file).keys(), file))
        if not self.file_of:
            raise HFConversionError(f"{path}: no *.safetensors weights found")

    def _open(self, file: Path):
        if file not in self._handles:
            try:
                self._handles[file] = self._stack.enter_context(safe_open(file, framework="pt"))
            except (SafetensorError, OSError) as e:  # truncated, not safetensors, or a shard the index invents
                raise HFConversionError(f"{file}: unreadable safetensors file: {e}") from None
        return self._handles[file]

    def __contains__(self, key: str) -> bool:
        return key in self.file_of

    def get(self, key: str) -> torch.Tensor:
        return self._read(key, lambda f: f.get_tensor(key))

    def shape(self, key: str) -> list[int]:
        return self._read(key, lambda f: list(f.get_slice(key).get_shape()))

    def _read(self, key: str, how):
        file = self.file_of[key]
        try:
            return how(self._open(file))
        except SafetensorError as e:  # the index named the wrong shard (without one, file_of is the files' own keys)
            index = file.parent / "model.safetensors.index.json"
            raise HFConversionError(f"{file}: cannot read tensor {key}, which {index} places there: {e}") from None


# --------------------------------------------------------------------------------------------
# Load and save


def _mtp_depth(hf: dict, weights: _Weights, where: str) -> int:
    """MTP depths whose weights the checkpoint holds (config.json often announces one it lacks)."""
    n = hf["num_hidden_layers"]
    announced = _number(hf.get("num_nextn_predict_layers") or 0, "num_nextn_predict_layers", where, int)
    return next((k for k in range(announced) if f"model.layers.{n + k}.eh_proj.weight" not in weights), announced)


def load_hf(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            hf_config: dict | None = None) -> Transformer:
    """A deepseek_pt Transformer with the weights of an HF DeepseekV3 checkpoint directory.
    dtype=None keeps the checkpoint's (bf16 for FP8 releases); FP8 weights are dequantized. `hf_config`: its
    config.json as read_hf_config parsed it, for a caller that has read it already (the file is read once)."""
    path = Path(path)
    hf = read_hf_config(path) if hf_config is None else hf_config
    with ExitStack() as stack:
        weights = _Weights(path, stack)
        where = str(path / "config.json")
        model_dict_from_hf(hf, 0, where)  # a foreign or incomplete config.json named first: _mtp_depth reads its keys
        config = full_config(model_dict_from_hf(hf, _mtp_depth(hf, weights, where), where), where=where)
        m, a = config.model, config.model.attention
        dtype = dtype or DTYPES.get(hf.get("dtype") or hf.get("torch_dtype"), torch.float32)
        # Names and shapes before the model is built (expected_shapes). Dequantizing and the layout changes below
        # keep each tensor's shape.
        for name, expected in expected_shapes(m).items():
            key = hf_name(name, m.n_layers)
            if key not in weights:
                raise HFConversionError(f"{path}: tensor {key} is missing (deepseek_pt's {name})")
            if (shape := weights.shape(key)) != expected:
                raise HFConversionError(f"{path}: tensor {key} has shape {shape}, config.json gives {expected}")
        with torch.device(device):
            model = cast_model(Transformer(m), dtype)
        block = _fp8_block(hf, where)
        used = set()
        for name, param in expected_tensors(model).items():
            key = hf_name(name, m.n_layers)
            t = weights.get(key)
            used.add(key)
            if f"{key}_scale_inv" in weights:
                scale_inv = weights.get(f"{key}_scale_inv")
                tiles = [-(-n // b) for n, b in zip(t.shape, block)]
                if t.ndim != 2 or list(scale_inv.shape) != tiles:  # a corrupt scale would fail inside the product
                    raise HFConversionError(f"{path}: tensor {key}_scale_inv has shape {list(scale_inv.shape)}, but "
                                            f"{key} {list(t.shape)} in tiles of {block} needs {tiles}")
                t = _dequantize_fp8(t, scale_inv, block)
                used.add(f"{key}_scale_inv")
            if name.endswith("eh_proj.weight"):
                t = _swap_halves(t)
            if not hf.get("rope_interleave", True):
                if name.endswith(("q_proj.weight", "q_b_proj.weight")):
                    t = _interleave_rope_rows(t, a.n_heads, a.qk_rope_head_dim)
                elif name.endswith("kv_a_proj_with_mqa.weight"):
                    t = _interleave_rope_rows(t, 1, a.qk_rope_head_dim)
            with torch.no_grad():  # tensor by tensor: no second copy of the weights
                param.copy_(t)
        # DeepSeek's MTP layers carry copies of the shared embedding and head, tied models may carry
        # the head: ours share them.
        copies = {f"model.layers.{m.n_layers + k}.{n}" for k in range(m.mtp_depth)
                  for n in ("embed_tokens.weight", "shared_head.head.weight")}
        copies |= {"lm_head.weight"} if m.tie_embeddings else set()
        left = sorted(k for k in weights.file_of if k not in used | copies and not k.endswith("rotary_emb.inv_freq")
                      and weights.get(k).numel())  # zero-width shared experts: transformers' n_shared_experts 0
        if left:
            raise HFConversionError(f"{path}: tensor {left[0]} has no deepseek_pt counterpart ({len(left)} such)")
    return model.eval()


def hf_tensors(model: Transformer, dtype: torch.dtype,
               fold: bool = False) -> tuple[dict[str, torch.Tensor], list[float]]:
    """HF checkpoint tensors of `model`, and for a folded MLA-o model each layer's relative error of
    the stored o_proj against the exact product o_b_proj @ o_a_proj."""
    m = model.config
    if m.attention.use_output_subspace and not fold:
        raise HFConversionError(
            "this model uses MLA-o (model.attention.use_output_subspace: o_a_proj -> o_b_proj), which HF "
            "DeepseekV3 cannot represent; fold it into a single o_proj (--fold / fold=True) to export it")
    state = expected_tensors(model)
    out, fold_errors = {}, []
    for name, t in state.items():
        t = t.detach().cpu()
        if name.endswith("self_attn.o_a_proj.weight"):
            continue
        if name.endswith("self_attn.o_b_proj.weight"):
            exact = t.double() @ state[name.replace("o_b_proj", "o_a_proj")].detach().cpu().double()
            t = exact.to(dtype)
            fold_errors.append(((t.double() - exact).norm() / exact.norm()).item())
            name = name.replace("o_b_proj", "o_proj")
        if name.endswith("eh_proj.weight"):
            t = _swap_halves(t)
        out[hf_name(name, m.n_layers)] = t.to(torch.float32 if name.endswith(FP32_TENSORS) else dtype).contiguous()
    if not m.moe.n_shared_experts:  # transformers builds zero-width shared experts: store them so
        for name, module in model.named_modules():  # that it reports nothing missing
            if isinstance(module, MoE):
                for proj, shape in (("gate_proj", (0, m.dim)), ("up_proj", (0, m.dim)), ("down_proj", (m.dim, 0))):
                    out[hf_name(f"{name}.shared_experts.{proj}.weight", m.n_layers)] = torch.zeros(shape, dtype=dtype)
    for k in range(m.mtp_depth):
        layer = f"model.layers.{m.n_layers + k}."
        out[layer + "embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[layer + "shared_head.head.weight"] = out.get("lm_head.weight", out["model.embed_tokens.weight"]).clone()
    return out, fold_errors


DOC_BOUNDARY_KEY = "deepseek_pt_doc_boundary"
"""config.json's record of how the training documents were framed (an export's `doc_boundary`): transformers keeps
a key it does not know as a config attribute, and our tools prompt the HF copy as they prompt its run."""


SEQ_LEN_KEY = "deepseek_pt_seq_len"
"""config.json's record of the sequence length the model trained at (its run's data.seq_len): evaluate on the HF copy
defaults to it as on the run, where max_position_embeddings (what the model can take) may be longer."""


def hf_seq_len(hf_config: dict) -> int | None:
    """The training sequence length an HF directory's config.json records (save_hf's `seq_len`); None where it records
    none, or one the model cannot take."""
    seq_len = hf_config.get(SEQ_LEN_KEY)
    ok = type(seq_len) is int and 0 < seq_len <= hf_config.get("max_position_embeddings", seq_len)
    return seq_len if ok else None


def hf_doc_boundary(hf_config: dict) -> str | None:
    """The doc boundary an HF directory's config.json (read_hf_config) records (save_hf's `doc_boundary`); None
    where it records none."""
    boundary = hf_config.get(DOC_BOUNDARY_KEY)
    return boundary if boundary in DOC_BOUNDARIES else None


def save_hf(model: Transformer, path: str | Path, fold: bool = False, dtype: torch.dtype | None = None,
            bos_id: int | None = None, eos_id: int | None = None,
            max_shard_bytes: int = MAX_SHARD_BYTES, doc_boundary: str | None = None,
            seq_len: int | None = None) -> list[float]:
    """Write `model` as an HF DeepseekV3ForCausalLM directory (config.json, generation_config.json,
    safetensors, sharded with an index above max_shard_bytes), recording `doc_boundary` and the training `seq_len`
    where known. Returns the per-layer fold errors (empty unless an MLA-o model was folded)."""
    path = Path(path)
    dtype = dtype or model.embed_tokens.weight.dtype
    config = hf_config_dict(model.config, dtype, bos_id, eos_id)
    if doc_boundary is not None:
        config[DOC_BOUNDARY_KEY] = doc_boundary
    if seq_len is not None:
        config[SEQ_LEN_KEY] = seq_len
    tensors, fold_errors = hf_tensors(model, dtype, fold)
    path.mkdir(parents=True, exist_ok=True)
    # Writing over an earlier save (convert --force): incomplete until the new config.json is in place,
    # and none of its weight files may survive to shadow the new ones (load_hf and transformers
    # prefer different ones of model.safetensors and an index).
    (path / "config.json").unlink(missing_ok=True)
    (path / "model.safetensors.index.json").unlink(missing_ok=True)
    # An export's marker would have load_checkpoint read the directory as that export, corrupt once the new
    # model.safetensors replaces its own.
    (path / "export.json").unlink(missing_ok=True)
    shards, size = [{}], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for stale in {*path.glob("model-*-of-*.safetensors"), path / "model.safetensors"} - {path / n for n in names}:
        stale.unlink(missing_ok=True)
    for name, shard in zip(names, shards):
        with atomic_path(path / name) as tmp:  # never a torn weights file under its final name
            save_file(shard, tmp, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        atomic_write_json(path / "model.safetensors.index.json", index)
    atomic_write_json(path / "generation_config.json", {"bos_token_id": bos_id, "eos_token_id": eos_id})
    atomic_write_json(path / "config.json", config)
    return fold_errors


def save_hf_tokenizer(path: str | Path, sp_model: bytes, max_len: int, add_bos: bool) -> tuple[int | None, int | None]:
    """tokenizer.model + tokenizer_config.json, which transformers' AutoTokenizer reads as a
    LlamaTokenizer that encodes exactly as sentencepiece does. Returns the (bos, eos) ids."""
    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id(), "pad_token": sp.pad_id()}
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": add_bos, "add_eos_token": False,
              # A dummy prefix shows as a leading "▁" on the first piece of a text.
              "add_prefix_space": sp.encode("a", out_type=str)[0].startswith("\u2581"), "legacy": False,
              "model_max_length": max_len, **{name: sp.id_to_piece(i) for name, i in ids.items() if i >= 0}}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path / "tokenizer.model", sp_model)
    atomic_write_json(path / "tokenizer_config.json", config)
    return (ids["bos_token"] if ids["bos_token"] >= 0 else None, ids["eos_token"] if ids["eos_token"] >= 0 else None)
