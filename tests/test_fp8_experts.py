"""Routed experts' grouped GEMMs in FP8 (fp8.experts): the rowwise power-of-two scales, the expert SwiGLU's
forward and gradients against AutoEP's bf16 experts, the FP8 weights cast once per optimizer step, the conversion
of AutoEP's expert layers, and the real GEMMs against the emulation on a Hopper GPU."""
import pytest
import torch
from deepspeed.moe import ep_kernels
from deepspeed.moe.ep_experts import GroupedExperts, _run_experts_grouped_mm

from deepseek_pt.config import ConfigError, load_config
from deepseek_pt.engine import fp8
from deepseek_pt.engine.fp8_experts import (ALIGN, Fp8ExpertWeights, Fp8GroupedExperts, Fp8SharedExperts,
                                            convert_experts_to_fp8, convert_shared_experts_to_fp8, fp8_expert_swiglu,
                                            quantize_rows, scaled_grouped_mm)
from deepseek_pt.model.layers import SwiGLU
from test_fp8 import CONFIGS, assert_preflight_refuses, pretend_gpu, rel_err

# The emulation's tests run where AutoEP's bf16 experts run: on a GPU machine DeepSpeed takes its Triton SwiGLU,
# which refuses CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_row_scales_are_powers_of_two_that_fit_each_row_in_e4m3():
    torch.manual_seed(0)
    t = torch.randn(6, 256) * torch.tensor([1e-6, 1e-2, 1.0, 3.0, 1e4, 0.0])[:, None]
    q, scale = quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6,)
    assert torch.equal(scale.log2(), scale.log2().round())  # exact scaling: only e4m3's rounding is lost
    amax = q.float().abs().amax(dim=-1)
    assert (amax[:5] <= 448).all() and (amax[:5] >= 224).all()  # each row uses the top binade of e4m3
    assert torch.equal(q[5].float(), torch.zeros(256))  # an all-zero row (AutoEP's padding) stays zero
    back = q.float() * scale[:, None]
    assert rel_err(back[:5], t[:5]) < 2**-4  # 3 mantissa bits


def _routed_rows(dim: int, counts: list[int]):
    """Expert-sorted rows as AutoEP hands them over: groups of ALIGN-multiple sizes, some empty, zero padding after."""
    offs = torch.tensor(counts, device=DEVICE).cumsum(0).to(torch.int32)
    x = torch.randn(int(offs[-1]) + ALIGN, dim, dtype=torch.bfloat16, device=DEVICE)
    x[int(offs[-1]):] = 0
    return x, offs


def _expert_weights(E: int, dim: int, H: int):
    w1, w3 = (torch.randn(E, H, dim, device=DEVICE).mul(dim**-0.5).bfloat16().requires_grad_() for _ in range(2))
    return w1, w3, torch.randn(E, dim, H, device=DEVICE).mul(H**-0.5).bfloat16().requires_grad_()


@pytest.fixture
def experts():
    torch.manual_seed(0)
    x, offs = _routed_rows(128, [32, 0, 80, 48])
    return x, offs, *_expert_weights(4, 128, 64)


def _forward_backward(run, x, offs, w1, w3, w2):
    """Output rows and gradients (input, w1, w3, w2) of one expert-SwiGLU implementation."""
    torch.manual_seed(1)
    n = int(offs[-1])
    x = x.clone().requires_grad_()
    y = run(x, w1, w3, w2)
    grad_y = torch.randn_like(y)
    grad_y[n:] = 0  # AutoEP's unpermute reads only the routed rows
    grads = torch.autograd.grad(y, (x, w1, w3, w2), grad_y)
    return y[:n], grads[0][:n], *grads[1:]


def test_fp8_expert_swiglu_computes_autoeps_experts_within_e4m3_error(experts):
    x, offs, w1, w3, w2 = experts
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    bf16 = _forward_backward(lambda x, w1, w3, w2: _run_experts_grouped_mm(w1, w2, w3, x, counts), *experts)
    weights = Fp8ExpertWeights(w1, w3, w2)
    got = _forward_backward(lambda x, w1, w3, w2: fp8_expert_swiglu(x, w1, w3, w2, offs, weights, True), *experts)
    for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), got, bf16):
        assert a.dtype == b.dtype == torch.bfloat16 and a.shape == b.shape, name
        # e4m3 rounds each operand by up to 2^-4; the products' errors average out to a few percent. A scale on the
        # wrong axis, a transposed weight or a gradient routed to the wrong expert is off by far more.
        assert 0.01 < rel_err(a, b) < 0.09, (name, rel_err(a, b))
    assert all(g.is_contiguous() for g in got[2:])  # .grad accumulates them at full bandwidth
    empty = slice(1, 2)  # expert 1 received no tokens: its weights get zero gradients
    assert all(g[empty].abs().max() == 0 for g in got[2:])


def test_fp8_weights_are_cast_once_per_optimizer_step(monkeypatch):
    torch.manual_seed(0)
    layer = GroupedExperts(dim=64, hidden_dim=32, num_experts=4).to(DEVICE, torch.bfloat16)
    for w in layer.parameters():
        torch.nn.init.normal_(w, std=0.1)
    steps = [0]
    monkeypatch.setattr(ep_kernels, "TOKEN_GROUP_ALIGN_SIZE_M", 8)
    keys = set(layer.state_dict())
    x, offs = _routed_rows(64, [16, 32, 0, 16])
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    reference = layer(x, counts)
    assert convert_experts_to_fp8(torch.nn.Sequential(layer), lambda: steps[0], emulate=True) == 1
    assert isinstance(layer, Fp8GroupedExperts) and set(layer.state_dict()) == keys
    assert ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M == ALIGN  # AutoEP now pads each expert's rows for FP8 GEMMs
    n = int(offs[-1])
    y = layer(x, counts)
    assert 0.005 < rel_err(y[:n], reference[:n]) < 0.09
    first = layer.current_fp8_weights()
    layer(x, counts).sum().backward()  # the step's other micro-steps reuse the cast
    assert layer.current_fp8_weights() is first
    with torch.no_grad():
        layer.w2.mul_(2)  # the optimizer steps
    steps[0] += 1
    recast = layer.current_fp8_weights()
    assert recast is not first and torch.equal(recast.down[1], first.down[1] * 2)  # e4m3 values kept, scales doubled
    assert rel_err(layer(x, counts)[:n], y[:n] * 2) < 0.01  # w2 enters linearly: the output doubles
    layer.w1.data = layer.w1.data.clone()  # ZeRO-3 gathered the weights into new memory
    assert layer.current_fp8_weights() is not recast


def _moe_with_shared_experts(dim: int, width: int) -> torch.nn.Module:
    """A MoE layer's shared experts, and a dense SwiGLU that is no one's shared expert."""
    torch.manual_seed(0)
    moe = torch.nn.Module()
    moe.shared_experts, moe.mlp = SwiGLU(dim, width), SwiGLU(dim, width)
    return moe.to(DEVICE, torch.bfloat16)


def _shared_forward_backward(moe: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The shared experts' output and gradients (input, gate, up, down weights)."""
    x = x.clone().requires_grad_()
    y = moe.shared_experts(x)
    weights = [m.weight for m in (moe.shared_experts.gate_proj, moe.shared_experts.up_proj,
                                  moe.shared_experts.down_proj)]
    return [y, *torch.autograd.grad(y, [x, *weights], torch.randn_like(y))]


def test_fp8_shared_experts_run_the_shared_swiglu_as_one_expert_within_e4m3_error():
    moe = _moe_with_shared_experts(128, 96)
    x = torch.randn(2, 40, 128, device=DEVICE, dtype=torch.bfloat16)  # 80 tokens: one expert of 80 rows
    keys = set(moe.state_dict())
    torch.manual_seed(1)
    bf16 = _shared_forward_backward(moe, x)
    steps = [0]
    assert convert_shared_experts_to_fp8(moe, lambda: steps[0], emulate=True, triton_gemms=False) == 1
    assert isinstance(moe.shared_experts, Fp8SharedExperts) and type(moe.mlp) is SwiGLU
    assert set(moe.state_dict()) == keys
    torch.manual_seed(1)
    got = _shared_forward_backward(moe, x)
    for name, a, b in zip(("y", "dx", "d_gate", "d_up", "d_down"), got, bf16):
        assert a.shape == b.shape and a.dtype == torch.bfloat16, name
        assert 0.01 < rel_err(a, b) < 0.09, (name, rel_err(a, b))  # FP8 forward and input gradients; wgrads via them
    first = moe.shared_experts.current_fp8_weights()
    assert first.gate_up[0].shape == (1, 2 * 96, 128)  # gate and up stacked, one expert
    moe.shared_experts(x)
    assert moe.shared_experts.current_fp8_weights() is first  # cast once per optimizer step
    steps[0] += 1
    assert moe.shared_experts.current_fp8_weights() is not first


def test_fp8_shared_experts_add_their_weight_gradients_into_grad_in_place():
    """In place (coalesced reduction), three micro-steps' weight gradients sum in `.grad` as autograd would sum them,
    autograd handed them only in the first; its adds round each product to bf16 first, the GEMM's add once."""
    from test_expert_grads import accumulations

    x = [torch.randn(2, 40, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    grad_y = [torch.randn(2, 40, 128, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    grads, counts = {}, {}
    for in_place in (False, True):
        moe = _moe_with_shared_experts(128, 96)
        convert_shared_experts_to_fp8(moe, lambda: 0, emulate=True, triton_gemms=False, grads_in_place=in_place)
        counts[in_place] = accumulations(moe.shared_experts.weights())
        for xs, gs in zip(x, grad_y):
            moe.shared_experts(xs).backward(gs)
        grads[in_place] = [w.grad for w in moe.shared_experts.weights()]
    assert counts == {False: [3, 3, 3], True: [1, 1, 1]}
    for name, a, b in zip(("gate", "up", "down"), grads[True], grads[False]):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 4e-3, (name, rel_err(a, b))


def test_fp8_experts_config_names_what_it_needs():
    def load(*overrides):
        return load_config(CONFIGS / "smoke.yaml", ["precision=fp8", "fp8.recipe=blockwise", "fp8.experts=true",
                                                    *overrides])
    assert load().fp8.experts
    with pytest.raises(ConfigError, match=r"model.moe.expert_inter_dim: 40 is not a multiple of 16"):
        load("model.moe.expert_inter_dim=40")
    assert load("model.moe.seq_aux_loss_alpha=0.001").fp8.experts  # AutoEP's layers compute that loss too
    with pytest.raises(ConfigError, match=r"fp8.experts: needs routed experts"):
        load("model.moe.n_dense_layers=2")
    assert load("fp8.shared_experts=true").fp8.shared_experts
    with pytest.raises(ConfigError, match=r"fp8.shared_experts: the model has none \(model.moe.n_shared_experts: 0\)"):
        load("fp8.shared_experts=true", "model.moe.n_shared_experts=0")
    with pytest.raises(ConfigError, match=r"model.moe.expert_inter_dim: the shared experts' width 40 "):
        load("fp8.shared_experts=true", "fp8.experts=false", "model.moe.expert_inter_dim=40")
    with pytest.raises(ConfigError, match=r"train.micro_batch_size: 66 tokens per micro-step \(this x data.seq_len\)"):
        load("fp8.shared_experts=true", "data.seq_len=33", "train.micro_batch_size=2")
    with pytest.raises(ConfigError, match=r"parallel.zero_leaf_blocks: fp8.shared_experts under ZeRO-3 needs it true"):
        load("fp8.shared_experts=true", "parallel.zero_leaf_blocks=false", "train.compile_blocks=false")


def test_fp8_experts_refuse_a_gpu_without_hoppers_kernels(monkeypatch, tmp_path):
    pretend_gpu(monkeypatch, "NVIDIA L40S", (8, 9))
    monkeypatch.setattr(fp8.importlib.util, "find_spec", lambda name: object())
    assert_preflight_refuses(tmp_path, ["precision=fp8", "fp8.recipe=tensorwise", "fp8.experts=true"],
                             r"fp8.experts: FP8 grouped GEMMs needs a Hopper GPU \(compute capability >= 9.0\); "
                             r"NVIDIA L40S has 8.9: set fp8.experts=false")


@pytest.mark.skipif(fp8.expert_gemms_unavailable() is not None,
                    reason=f"real FP8 grouped GEMMs {fp8.expert_gemms_unavailable()}")
@pytest.mark.parametrize("triton_gemms", [False, True], ids=["scaled-grouped-mm", "triton-kernel"])
def test_real_fp8_grouped_gemms_match_the_emulation_on_gpu(triton_gemms):
    """torch._scaled_grouped_mm, or grouped_mm.py's Triton kernel with FP8 operands, against the emulation."""
    from deepseek_pt.engine import grouped_mm

    torch.manual_seed(0)
    x, offs = _routed_rows(512, [64, 0, 128, 16, 256, 32, 48, 96])
    x[:, 7] *= 30  # an outlier channel: row scales take it, so the other rows keep their precision
    w1, w3, w2 = _expert_weights(8, 512, 256)
    weights = Fp8ExpertWeights(w1, w3, w2)
    n = int(offs[-1])
    x_q, x_s = quantize_rows(x)
    assert grouped_mm.takes(x_q, weights.gate_up[0], transpose_w=True)  # the kernel, not the fallback, runs
    real, emulated = (scaled_grouped_mm(x_q, x_s, *weights.gate_up, offs, emulate, triton_gemms)[:n]
                      for emulate in (False, True))
    assert rel_err(real, emulated) < 0.002  # one GEMM of the same operands: fast accumulation and bf16 rounding
    real, emulated = (_forward_backward(lambda x, w1, w3, w2: fp8_expert_swiglu(x, w1, w3, w2, offs, weights, emulate,
                                                                               triton_gemms=triton_gemms),
                                        x, offs, w1, w3, w2) for emulate in (False, True))
    for name, a, b in zip(("y", "dx", "dw1", "dw3", "dw2"), real, emulated):
        assert torch.isfinite(a).all() and a.dtype == torch.bfloat16, name
        # Through the block, an intermediate that differs in its last bits now and then rounds to the neighbouring
        # e4m3 value (6% apart) when it is quantized for the next GEMM: about 1% in all.
        assert rel_err(a, b) < 0.02, (name, rel_err(a, b))


@pytest.mark.skipif(fp8.expert_gemms_unavailable() is not None,
                    reason=f"real FP8 GEMMs {fp8.expert_gemms_unavailable()}")
@pytest.mark.parametrize("triton_gemms", [False, True], ids=["scaled-grouped-mm", "triton-kernel"])
def test_real_fp8_shared_experts_match_the_emulation_on_gpu(triton_gemms):
    moe = _moe_with_shared_experts(512, 384)
    x = torch.randn(4, 256, 512, device="cuda", dtype=torch.bfloat16)
    results = []
    for emulate in (False, True):
        convert_shared_experts_to_fp8(moe, lambda: 0, emulate=emulate, triton_gemms=triton_gemms)
        moe.shared_experts.emulate = emulate  # converted once: the flag is the layer's
        torch.manual_seed(1)
        results.append(_shared_forward_backward(moe, x))
    for name, a, b in zip(("y", "dx", "d_gate", "d_up", "d_down"), *results):
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) < 0.02, (name, rel_err(a, b))  # as the routed experts' test


@pytest.mark.skipif(fp8.expert_gemms_unavailable() is not None,
                    reason=f"the Triton casts {fp8.expert_gemms_unavailable()}")
def test_triton_casts_compute_their_torch_references_on_gpu():
    from deepseek_pt.engine import fp8_expert_casts as kernels
    from deepseek_pt.engine.fp8_experts import swiglu_backward_quantized, swiglu_quantized

    torch.manual_seed(0)
    M, H = 1001, 704  # rows not a multiple of a program's, width not a power of two
    gate_up, grad_h = torch.randn(M, 2 * H, device="cuda"), torch.randn(M, H, device="cuda")
    gate_up[:, 3] *= 40  # an outlier channel
    gate_up[7], grad_h[8] = 0, 0  # all-zero rows (AutoEP's padding) stay zero
    gate_up, grad_h = gate_up.bfloat16(), grad_h.bfloat16()

    def same(got, want, name):
        """Equal up to the last bit of a bf16 SwiGLU now and then (Triton's sigmoid is not torch's), which can move a
        value to its e4m3 neighbour or, at a row's amax, the row's scale by one power of two."""
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype, name
            a, b = a.float(), b.float()
            assert torch.isfinite(a).all(), name
            assert (a == b).float().mean() > 0.99, (name, (a == b).float().mean())
        (hq, hs), (rq, rs) = got[-2:], want[-2:]
        assert rel_err(hq.float() * hs[:, None], rq.float() * rs[:, None]) < 1e-3, name

    q, s = kernels.quantize_rows(gate_up)
    rq, rs = quantize_rows(gate_up)
    assert torch.equal(s, rs) and torch.equal(q.view(torch.uint8), rq.view(torch.uint8))  # no arithmetic to differ
    assert q[7].float().abs().max() == 0
    same(kernels.swiglu_quantized(gate_up), swiglu_quantized(gate_up), "swiglu")
    same(kernels.swiglu_backward_quantized(gate_up, grad_h), swiglu_backward_quantized(gate_up, grad_h), "backward")


@pytest.mark.skipif(fp8.expert_gemms_unavailable() is not None,
                    reason=f"the Triton casts {fp8.expert_gemms_unavailable()}")
def test_triton_weight_casts_compute_their_torch_references_on_gpu():
    """The FP8 weights' two layouts through fp8_weight_casts, bit for bit as the reference casts (no arithmetic but
    the scale's power of two and e4m3's rounding), for the experts' three weights and a plain linear's."""
    from deepseek_pt.engine import fp8_experts, fp8_linears

    torch.manual_seed(0)
    w1, w3, w2 = (w.detach() for w in _expert_weights(5, 200, 136))  # widths off the kernel's 64 x 128 tiles
    w1[2, 9] = 0  # an all-zero row stays zero
    w3[1, :, 5] *= 40  # an outlier column: its scale in the transposed layout covers both w1's and w3's rows
    got = fp8_experts.weight_cast(w1.device, emulate=False)(w1, w3, w2)
    want = fp8_experts._cast_weights(w1, w3, w2)
    linear = torch.randn(320, 208, device="cuda", dtype=torch.bfloat16)
    got += fp8_linears._triton_cast_weight(linear)
    want += fp8_linears.cast_weight(linear)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape)
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b), i
