"""FP8 conversion: the DeepSeek-V3 blockwise recipe (emulated, and as real GEMMs on a Hopper GPU), block scales, tile
orientation per GEMM, which linears convert, and what a machine without FP8 GEMMs is told."""
import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from deepseek_pt.config import ConfigError, load_config
from deepseek_pt.engine import fp8
from deepseek_pt.engine.fp8 import (BlockwiseFp8GemmLinear, BlockwiseFp8Linear, Fp8Conversion, convert_to_fp8,
                                    fp8_round, fp8_targets, fp8_unavailable, taken_elsewhere)
from deepseek_pt.model import Transformer
from model_configs import tiny


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_block_scales_confine_an_outlier_to_its_block():
    torch.manual_seed(0)
    t = torch.randn(256, 384)
    t[3, 5] = 1e6
    blockwise, tensorwise = fp8_round(t, 128, 128), fp8_round(t, 256, 384)
    assert blockwise[3, 5] == 1e6 and blockwise.shape == t.shape  # a block's amax is exact
    others = (slice(128, 256), slice(128, 384))  # blocks without the outlier
    assert rel_err(blockwise[others], t[others]) < 0.04  # e4m3: 3 mantissa bits
    assert rel_err(tensorwise[others], t[others]) > 0.5  # one scale for all: they sink below e4m3's range
    assert torch.equal(fp8_round(torch.zeros(3, 200), 1, 128), torch.zeros(3, 200))


@pytest.fixture
def layer():
    torch.manual_seed(0)
    lin = nn.Linear(256, 384, bias=False)
    lin.__class__ = BlockwiseFp8Linear
    return lin


def _grads(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, exact: bool):
    x = x.clone().requires_grad_()
    w = layer.weight
    y = x @ w.T if exact else layer(x)
    gx, gw = torch.autograd.grad(y, (x, w), grad_out)
    return y.detach(), gx, gw


def test_tiles_run_along_each_gemms_reduction_dimension(layer):
    """An outlier token must not cost the other tokens precision in fprop and dgrad (1x128 tiles per token),
    nor an outlier channel the other channels' weight gradients (128x1 tiles along tokens in wgrad)."""
    torch.manual_seed(1)
    x, grad_out = torch.randn(512, 256), torch.randn(512, 384)
    x[7] *= 1e5  # outlier token
    grad_out[9] *= 1e5  # outlier token gradient
    (y, gx, _), (y_ref, gx_ref, _) = _grads(layer, x, grad_out, False), _grads(layer, x, grad_out, True)
    rest = torch.arange(512) != 7
    assert rel_err(y[rest], y_ref[rest]) < 0.05
    rest = torch.arange(512) != 9
    assert rel_err(gx[rest], gx_ref[rest]) < 0.05

    x, grad_out = torch.randn(512, 256), torch.randn(512, 384)
    x[:, 11] *= 1e5  # outlier channel
    (_, _, gw), (_, _, gw_ref) = _grads(layer, x, grad_out, False), _grads(layer, x, grad_out, True)
    rest = torch.arange(256) != 11
    assert rel_err(gw[:, rest], gw_ref[:, rest]) < 0.05
    assert rel_err(gw, gw_ref) < 0.05


def test_bf16_inputs_keep_their_dtype(layer):
    layer = layer.to(torch.bfloat16)
    x = torch.randn(2, 5, 256, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == (2, 5, 384) and y.dtype == x.grad.dtype == layer.weight.grad.dtype == torch.bfloat16


def test_conversion_rules_and_state_dict(monkeypatch):
    # The emulated recipe on every machine: this model lives on the CPU even where a GPU could run real GEMMs
    # (test_blockwise_as_real_gemms_takes_the_linears_a_block_divides pins the conversion that a Hopper GPU gets).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    torch.manual_seed(0)
    cfg = tiny(attention__q_lora_rank=32)
    model = Transformer(cfg.model)
    keys = set(model.state_dict())
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(ids, ids)
    conversion = convert_to_fp8(model, "blockwise", "all")
    assert conversion.too_narrow == 0  # DeepSeek-V3's recipe: every eligible linear, however narrow
    assert "this machine has none" in conversion.emulated  # emulated, and the run is told why
    converted = {name for name, m in model.named_modules() if isinstance(m, BlockwiseFp8Linear)}
    assert conversion.converted == len(converted) > 0
    assert not any(name.endswith(("lm_head", "mlp.gate")) for name in converted)
    assert any("attn" in name for name in converted) and any("shared" in name for name in converted)
    assert not any(".experts." in name for name in converted)  # AutoEP's grouped GEMM owns the routed experts
    # Besides those, only linears whose dimensions FP8 GEMMs cannot take (not multiples of 16) stay as they are.
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            assert name.endswith("lm_head") or ".experts." in name or m.in_features % 16 or m.out_features % 16, name
    assert set(model.state_dict()) == keys
    after = model(ids, ids)
    assert after.item() == pytest.approx(before.item(), rel=0.02)
    after.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() == 2 and p.numel() > 0)


CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def bench_model(config: str) -> nn.Module:
    with torch.device("meta"):
        return Transformer(load_config(CONFIGS / f"{config}.yaml", []).model)


def test_auto_keeps_linears_too_narrow_to_gain_in_bf16():
    bench = bench_model("bench-2b")
    everything, none_left = fp8_targets(bench, "all")
    assert len(everything) == 28 and none_left == 0  # 4 x 4 attention, 3 dense, 3 x 3 shared-expert linears
    without_shared, _ = fp8_targets(bench, "all", taken_elsewhere(True, False, False))  # fp8.shared_experts: those 9
    assert without_shared == {n for n in everything if ".shared_experts." not in n} and len(without_shared) == 19
    neither, _ = fp8_targets(bench, "all", taken_elsewhere(True, True, False))  # and fp8.attention the 16 projections
    assert neither == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj", "layers.0.mlp.down_proj"}
    # fp8.dense_mlp takes the dense SwiGLU's three, not the MoE layers' shared experts (also under an `mlp`)
    not_dense, _ = fp8_targets(bench, "all", taken_elsewhere(False, False, True))
    assert not_dense == everything - neither and len(not_dense) == 25
    assert fp8_targets(bench, "all", taken_elsewhere(True, True, True))[0] == set()
    wide_enough, narrow = fp8_targets(bench, "auto")  # dim 2048: only the dense SwiGLU's 2048 -> 10944
    assert wide_enough == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"} and narrow == 26
    # DeepSeek-V3's dense-layer widths: the wide projections gain, the down-projections into the latents do not.
    wide = bench_model("bench-v3-dense")
    wide_enough, narrow = fp8_targets(wide, "auto")
    assert {n.split(".")[-1] for n in wide_enough} == {"q_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(wide_enough) == 3 * 5 and narrow == 3 * 3  # q_a (N 1536), kv_a (N 576), kv_b (K 512) in each layer
    # Every recipe goes by that rule, blockwise too (emulated here; as real GEMMs it would also need multiples of 128,
    # which these 15 are).
    assert convert_to_fp8(wide, "blockwise") == Fp8Conversion(15, 9, emulated=fp8.blockwise_gemms_unavailable())


def test_a_model_too_narrow_for_fp8_converts_nothing():
    model = Transformer(tiny().model)  # dim 48: no GEMM wide enough; torchao is not even imported
    eligible = len(fp8_targets(model, "all")[0])
    assert eligible > 0 and convert_to_fp8(model, "rowwise") == Fp8Conversion(0, eligible)
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))


def pretend_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda reports one GPU of this name and compute capability."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: capability)


def test_fp8_refusals_name_what_the_machine_lacks(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fp8_unavailable("blockwise") is None  # the emulation runs anywhere
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object())
    assert fp8_unavailable("rowwise") is None  # torch's CPU FP8 GEMMs run torchao's Float8Linear
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None)
    assert fp8_unavailable("tensorwise").startswith("needs torchao, which is not installed: pip install")
    pretend_gpu(monkeypatch, "NVIDIA A100-SXM4-80GB", (8, 0))
    assert fp8_unavailable("tensorwise").endswith("NVIDIA A100-SXM4-80GB has 8.0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None if name == "torchao" else object())
    assert "torchao" in fp8_unavailable("rowwise") and "pip install" in fp8_unavailable("rowwise")
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object())
    assert fp8_unavailable("rowwise") is None


def test_fp8_refusals_say_why_blockwise_is_emulated(monkeypatch):
    pretend_gpu(monkeypatch, "NVIDIA L4", (8, 9))  # FP8 tensor cores, not Hopper's
    assert fp8.blockwise_gemms_unavailable() == "needs a Hopper GPU (compute capability >= 9.0); NVIDIA L4 has 8.9"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (9, 0))
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: None if name == "triton" else object())
    assert fp8.blockwise_gemms_unavailable() == "needs triton, which is not installed: pip install triton"
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object())
    assert fp8.blockwise_gemms_unavailable() is None


def _emulated_blockwise_mm(x, weight, block, out_dtype, use_triton):
    """Stands in for torchao's fp8_blockwise_mm.apply on a machine without it: the emulation, same arguments."""
    assert block == 128 and out_dtype == torch.bfloat16 and use_triton is False
    return BlockwiseFp8Linear.forward(types.SimpleNamespace(weight=weight), x).to(out_dtype)


def test_blockwise_as_real_gemms_takes_the_linears_a_block_divides(monkeypatch):
    monkeypatch.setattr(fp8, "blockwise_gemms_unavailable", lambda: None)
    fake = types.ModuleType("torchao.prototype.blockwise_fp8_training.linear")
    fake.fp8_blockwise_mm = types.SimpleNamespace(apply=_emulated_blockwise_mm)
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    model = Transformer(tiny(dim=256, inter_dim=384, attention__q_lora_rank=128, attention__kv_lora_rank=124,
                             moe__expert_inter_dim=128).model)
    chosen, _ = fp8_targets(model, "all")
    monkeypatch.setenv("TRITON_CACHE_AUTOTUNING", "")  # recorded, so that teardown restores what was there
    monkeypatch.delenv("TRITON_CACHE_AUTOTUNING")
    conversion = convert_to_fp8(model, "blockwise", "all")
    assert fp8.os.environ["TRITON_CACHE_AUTOTUNING"] == "1"  # the casts' autotuning is paid once per machine
    real = {name for name, m in model.named_modules() if isinstance(m, BlockwiseFp8GemmLinear)}
    unaligned = {name for name in chosen if name not in real}
    assert conversion == Fp8Conversion(len(real), 0, len(unaligned)) and real and unaligned
    for name, m in model.named_modules():  # only a dimension that is not a multiple of 128 keeps a linear in bf16
        if name in chosen:
            assert (name in real) == (m.in_features % 128 == 0 and m.out_features % 128 == 0), name
    assert not any(isinstance(m, BlockwiseFp8Linear) for m in model.modules())  # nothing emulated beside them
    lin = model.get_submodule("layers.0.mlp.up_proj")  # 256 -> 384: through torchao's entry point, as on a GPU
    assert isinstance(lin, BlockwiseFp8GemmLinear)
    assert lin(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


def assert_preflight_refuses(tmp_path, overrides: list[str], match: str) -> None:
    """Preflight, for 2 processes on this (possibly faked) machine, refuses the smoke config with these overrides."""
    from deepseek_pt.engine.preflight import PreflightError, preflight

    cfg = load_config(CONFIGS / "smoke.yaml", [*overrides, f"data.path={tmp_path}"])
    with pytest.raises(PreflightError, match=match):
        preflight(cfg, 2)


def test_blockwise_gemms_need_a_micro_step_of_whole_token_tiles(monkeypatch, tmp_path):
    monkeypatch.setattr(fp8, "blockwise_gemms_unavailable", lambda: None)
    assert_preflight_refuses(tmp_path, ["precision=fp8", "fp8.recipe=blockwise", "data.seq_len=100",
                                        "train.micro_batch_size=3"],
                             r"data.seq_len x train.micro_batch_size: 100 x 3 = 300 tokens per micro-step; .* must "
                             r"be a multiple of 128")


@pytest.mark.skipif(fp8.blockwise_gemms_unavailable() is not None,
                    reason=f"real blockwise FP8 GEMMs {fp8.blockwise_gemms_unavailable()}")
def test_real_blockwise_gemms_match_the_emulation_on_gpu():
    torch.manual_seed(0)
    emulated = nn.Linear(1024, 768, bias=False, device="cuda", dtype=torch.bfloat16)
    real = nn.Linear(1024, 768, bias=False, device="cuda", dtype=torch.bfloat16)
    real.weight = emulated.weight
    emulated.__class__, real.__class__ = BlockwiseFp8Linear, BlockwiseFp8GemmLinear
    x = torch.randn(2, 256, 1024, device="cuda", dtype=torch.bfloat16)
    x[..., 7] *= 50  # an outlier channel, which the 1x128 tiles confine
    grad_out = torch.randn(2, 256, 768, device="cuda", dtype=torch.bfloat16)
    (y, gx, gw), (y_ref, gx_ref, gw_ref) = _grads(real, x, grad_out, False), _grads(emulated, x, grad_out, False)
    exact = _grads(real, x, grad_out, True)
    for got, want, bf16 in zip((y, gx, gw), (y_ref, gx_ref, gw_ref), exact):
        assert got.dtype == torch.bfloat16
        assert rel_err(got, want) < 0.01  # the same quantization: only summation order and bf16 output differ
        assert 0.005 < rel_err(got, bf16) < 0.1  # and it is FP8: visibly off the bf16 GEMM, within the recipe's error


def test_fast_accum_is_for_torchaos_recipes_and_fp8_weight_gradients():
    def load(recipe, *more):
        return load_config(CONFIGS / "smoke.yaml", ["precision=fp8", f"fp8.recipe={recipe}", "fp8.fast_accum=all",
                                                    *more])
    assert load("rowwise").fp8.fast_accum == "all"
    assert load("blockwise", "fp8.attention=true", "fp8.linear_weight_grads=fp8").fp8.fast_accum == "all"
    assert load("blockwise", "fp8.dense_mlp=true", "fp8.linear_weight_grads=fp8_rowwise").fp8.fast_accum == "all"
    with pytest.raises(ConfigError, match=r"fp8.fast_accum: 'all' applies to torchao's tensorwise and rowwise "
                                          r"recipes and to the FP8 weight gradients of fp8.linear_weight_grads; with "
                                          r"fp8.recipe: blockwise and fp8.linear_weight_grads: bf16 it changes "
                                          r"nothing"):
        load("blockwise", "fp8.attention=true")


# torchao's Float8Linear also runs on a CPU (torch's CPU _scaled_mm): its numerics and our configuration of it are
# tested there, and again on the GPU.
TORCHAO = pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
DEVICE = "cuda" if torch.cuda.is_available() and fp8.fp8_unavailable("rowwise") is None else "cpu"
# The linear these tests convert, [tokens, IN] -> [tokens, OUT]: small, because torch's CPU FP8 GEMMs are slow (at
# 512 x 1024 -> 3072 these tests took 6 of CI's 19 minutes), but with every dimension a multiple of torchao's 16 and
# hundreds of products in every sum.
TOKENS, IN, OUT = (2, 128), 256, 768


@TORCHAO
@pytest.mark.parametrize("recipe, fp8_weight_grad", [("tensorwise", True), ("rowwise", True),
                                                     ("rowwise_with_gw_hp", False)])
def test_torchaos_recipes_compute_within_their_fp8_error(recipe, fp8_weight_grad):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, OUT, bias=False)).to(DEVICE, torch.bfloat16)
    exact = nn.Linear(IN, OUT, bias=False).to(DEVICE, torch.bfloat16)
    exact.weight = model[0].weight
    assert convert_to_fp8(model, recipe, "all").converted == 1 and type(model[0]).__name__ == "Float8Linear"
    x = torch.randn(*TOKENS, IN, device=DEVICE, dtype=torch.bfloat16)
    x[..., 7] *= 50  # an outlier channel
    grad_out = torch.randn(*TOKENS, OUT, device=DEVICE, dtype=torch.bfloat16)
    for name, got, want in zip(("y", "dx", "dw"), _grads(model[0], x, grad_out, False),
                               _grads(exact, x, grad_out, True)):
        assert got.dtype == torch.bfloat16, name
        if name == "dw" and not fp8_weight_grad:
            assert rel_err(got, want) < 0.005, name  # a bf16 GEMM
        else:  # FP8: e4m3, or e5m2 for tensorwise's output gradients
            assert 0.005 < rel_err(got, want) < 0.1, (name, rel_err(got, want))


@TORCHAO
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fast_accum_all_reaches_torchaos_backward_gemms(recipe):
    torch.manual_seed(0)
    x = torch.randn(*TOKENS, IN, device=DEVICE, dtype=torch.bfloat16)
    grad_out = torch.randn(*TOKENS, OUT, device=DEVICE, dtype=torch.bfloat16)
    runs = {}
    for fast_accum in ("forward", "all"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(IN, OUT, bias=False)).to(DEVICE, torch.bfloat16)
        assert convert_to_fp8(model, recipe, "all", fast_accum).converted == 1
        gemms = model[0].config
        assert gemms.gemm_config_output.use_fast_accum
        assert gemms.gemm_config_grad_input.use_fast_accum == gemms.gemm_config_grad_weight.use_fast_accum \
            == (fast_accum == "all")
        runs[fast_accum] = _grads(model[0], x, grad_out, False)
    for fast, promoted in zip(runs["all"], runs["forward"]):
        assert rel_err(fast, promoted) < 0.01  # the same FP8 operands; only the accumulation differs
