"""The routed experts on our GEMMs (engine/expert_grads.py's RoutedExperts): weight gradients added into .grad in place
(parallel.expert_grads_in_place), the same forward and gradients as AutoEP's layer with autograd accumulating,
autograd left out from the second micro-step on, the FP8 experts alike; the forward and input gradients through
engine/grouped_mm.py's Triton kernel (parallel.expert_triton_gemms). On a GPU both Triton kernels against fp32 sums.
Through DeepSpeed: tests/test_train.py's reduced-per-step runs."""
import pytest
import torch
from deepspeed.moe.ep_experts import GroupedExperts

from deepseek_pt.engine.expert_grads import RoutedExperts, convert_routed_experts, expert_mm
from deepseek_pt.engine.fp8_experts import Fp8ExpertWeights, fp8_expert_swiglu
from test_fp8 import rel_err

# Where AutoEP's layer runs: on a GPU machine DeepSpeed takes its Triton SwiGLU, which refuses CPU tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COUNTS = [32, 0, 80, 48]  # rows per expert, as AutoEP pads them (multiples of 16), one expert idle


def _rows(n_cols: int, device: str, dtype: torch.dtype, padding: int = 16) -> torch.Tensor:
    """Expert-sorted rows for COUNTS and `padding` zero rows after them, as AutoEP hands them over."""
    x = torch.randn(sum(COUNTS) + padding, n_cols, device=device, dtype=dtype)
    x[sum(COUNTS):] = 0
    return x


def accumulations(weights) -> list[int]:
    """How often autograd hands each of `weights` a gradient to accumulate (its tensor hooks see None otherwise), as
    the counts go on."""
    weights = list(weights)
    counts = [0] * len(weights)
    for i, w in enumerate(weights):
        w.register_hook(lambda grad, i=i: counts.__setitem__(i, counts[i] + (grad is not None)))
    return counts


@pytest.mark.parametrize("grads_in_place", [True, False], ids=["grads-in-place", "autograd-accumulates"])
@pytest.mark.parametrize("triton_gemms", [False, True], ids=["torch-grouped-mm", "triton-gemms"])
def test_routed_experts_train_as_autoeps_layer(grads_in_place, triton_gemms):
    """Three micro-steps of our layer against AutoEP's with autograd accumulating: the same outputs and gradients
    (on a CPU, where both run torch._grouped_mm, the forward bit for bit and the gradients to fp32's ulps; on a GPU
    the Triton kernels, the SwiGLU in the gate and up GEMM's epilogue, no further from fp32 sums than AutoEP's), and
    autograd handed the weight gradients only in the first micro-step when they go in place."""
    torch.manual_seed(0)
    device = DEVICE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the kernels run in bf16; CPU: torch's, exact
    autoep = GroupedExperts(64, 48, len(COUNTS), disable_triton_grouped_mm=True).to(device, dtype)
    for w in autoep.parameters():
        torch.nn.init.normal_(w, std=0.1)
    ours = GroupedExperts(64, 48, len(COUNTS), disable_triton_grouped_mm=True).to(device, dtype)
    ours.load_state_dict(autoep.state_dict())
    assert convert_routed_experts(torch.nn.Sequential(ours), grads_in_place, triton_gemms) == (1, 1)
    assert type(ours) is RoutedExperts and (ours.grads_in_place, ours.triton_gemms) == (grads_in_place, triton_gemms)
    counts = torch.tensor(COUNTS, device=device)
    micro_steps = [(_rows(64, device, dtype), _rows(64, device, dtype)) for _ in range(3)]
    accumulated = {id(layer): accumulations((layer.w1, layer.w3, layer.w2)) for layer in (autoep, ours)}
    outputs = {}
    for layer in (autoep, ours):
        for x, grad_y in micro_steps:
            x = x.clone().requires_grad_()
            y = layer(x, counts)
            y.backward(grad_y)
            outputs.setdefault(id(layer), []).append((y.detach(), x.grad))
    n = sum(COUNTS)  # rows past the groups are left unset by torch._grouped_mm
    exact = _fp32_layer(autoep, micro_steps, counts) if device == "cuda" else None
    for i, ((y_a, gx_a), (y_o, gx_o)) in enumerate(zip(outputs[id(autoep)], outputs[id(ours)])):
        if device == "cpu" or not triton_gemms:
            assert torch.equal(y_o[:n], y_a[:n])  # the same forward, op for op
            torch.testing.assert_close(gx_o[:n], gx_a[:n])
        else:  # one bf16 rounding of each fp32 sum, as CUTLASS's; x's gradient sums gate and up in fp32
            want_y, want_gx = exact["outputs"][i]
            assert rel_err(y_o[:n], want_y[:n]) <= rel_err(y_a[:n], want_y[:n]) * 1.05 + 1e-4
            assert rel_err(gx_o[:n], want_gx[:n]) <= rel_err(gx_a[:n], want_gx[:n]) * 1.05 + 1e-4
    assert accumulated[id(autoep)] == [3, 3, 3]
    assert accumulated[id(ours)] == ([1, 1, 1] if grads_in_place else [3, 3, 3])
    for name in ("w1", "w3", "w2"):
        grad_a, grad_o = getattr(autoep, name).grad, getattr(ours, name).grad
        if device == "cpu":  # SwiGLU's derivative by our formula (expert_grads.swiglu_backward): ulps from autograd's
            torch.testing.assert_close(grad_o, grad_a, rtol=1e-5, atol=1e-5, msg=name)
        else:  # in place the kernel rounds the sum to bf16 once, autograd twice: no further from the fp32 sum
            assert rel_err(grad_o, exact[name]) <= rel_err(grad_a, exact[name]) * 1.05 + 1e-4, name


def _fp32_layer(layer: GroupedExperts, micro_steps, counts) -> dict:
    """The same layer's weights upcast to fp32 over `micro_steps`: each micro-step's output and input gradient
    ("outputs"), and the weight gradients summed over all of them (by name)."""
    ref = GroupedExperts(layer.w1.shape[2], layer.w1.shape[1], layer.num_experts,
                         disable_triton_grouped_mm=True).to(layer.w1.device)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    outputs = []
    for x, grad_y in micro_steps:
        x = x.float().requires_grad_()
        y = ref(x, counts)
        y.backward(grad_y.float())
        outputs.append((y.detach(), x.grad))
    return {"outputs": outputs, **{name: getattr(ref, name).grad for name in ("w1", "w3", "w2")}}


def test_fp8_experts_add_their_weight_gradients_in_place_alike():
    """FP8 experts (emulated on a CPU): in place, the same weight gradients as autograd accumulating, autograd left
    out after the first micro-step."""
    torch.manual_seed(0)
    E, dim, H = len(COUNTS), 64, 48
    offs = torch.tensor(COUNTS).cumsum(0).to(torch.int32)
    weights = [torch.randn(E, *shape).mul(0.1).bfloat16() for shape in ((H, dim), (H, dim), (dim, H))]
    micro_steps = [(_rows(dim, "cpu", torch.bfloat16), _rows(dim, "cpu", torch.bfloat16)) for _ in range(3)]
    grads, accumulated = {}, {}
    for in_place in (False, True):
        w1, w3, w2 = (w.clone().requires_grad_() for w in weights)
        accumulated[in_place] = accumulations((w1, w3, w2))
        fp8_weights = Fp8ExpertWeights(w1, w3, w2)
        for x, grad_y in micro_steps:
            fp8_expert_swiglu(x, w1, w3, w2, offs, fp8_weights, emulate=True, in_place=in_place).backward(grad_y)
        grads[in_place] = (w1.grad, w3.grad, w2.grad)
    assert accumulated == {False: [3, 3, 3], True: [1, 1, 1]}
    for in_place_grad, autograd_grad in zip(grads[True], grads[False]):
        assert torch.equal(in_place_grad, autograd_grad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernel: GPU only")
@pytest.mark.parametrize("use_tma", [True, False], ids=["tma", "pointers"])
def test_grouped_wgrad_adds_each_experts_rows_product_into_out(use_tma):
    from deepseek_pt.engine.grouped_wgrad import grouped_wgrad_

    if use_tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA loads need Hopper")
    torch.manual_seed(0)
    K, N = 200, 72  # not multiples of the tiles: the column masks and TMA's zero fill
    offs = torch.tensor(COUNTS, device="cuda").cumsum(0).to(torch.int32)
    a = torch.randn(sum(COUNTS) + 40, 2 * K, device="cuda", dtype=torch.bfloat16)[:, :K]  # a half of d(gate_up)
    b = torch.randn(sum(COUNTS) + 40, N, device="cuda", dtype=torch.bfloat16)
    a[sum(COUNTS):], b[sum(COUNTS):] = float("nan"), float("nan")  # rows past the last expert stay out
    out = torch.randn(len(COUNTS), K, N, device="cuda", dtype=torch.bfloat16)
    before, want = out.clone(), out.float()
    for e, (start, end) in enumerate(zip([0, *offs.tolist()], offs.tolist())):
        want[e] += a[start:end].float().t() @ b[start:end].float()
    grouped_wgrad_(out, a, b, offs, use_tma=use_tma)
    assert torch.isfinite(out).all()
    assert rel_err(out, want) < 4e-3  # one bf16 rounding of the fp32 sum
    assert torch.equal(out[1], before[1])  # the idle expert's gradient unchanged


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="Triton kernel with TMA loads: Hopper GPUs only")
@pytest.mark.parametrize("transpose_w", [True, False], ids=["a-w-transposed", "a-w"])
@pytest.mark.parametrize("two_products", [False, True], ids=["one-product", "two-products"])
def test_ragged_mm_multiplies_each_experts_rows_by_its_weight(transpose_w, two_products):
    """grouped_mm.py's kernel against fp32 products per expert: experts of more rows than a tile, fewer, none; K and
    N off the tiles (TMA's zero fill, the column mask); NaN rows past the last expert left out of every row before;
    a strided half as the second operand, as the SwiGLU's gradient hands it over."""
    from deepseek_pt.engine import grouped_mm

    torch.manual_seed(0)
    counts = [272, 0, 48, 160, 16]  # rows per expert: > 2 tiles, < 1 tile, none
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    n, E = sum(counts), len(counts)
    K, N = (200, 72) if transpose_w else (128, 72)  # for a @ w[e], K whole tiles of 64 (grouped_mm.takes)
    a = torch.randn(n + 40, 2 * K, device="cuda", dtype=torch.bfloat16)[:, K:]
    a[n:] = float("nan")
    w = torch.randn(E, *((N, K) if transpose_w else (K, N)), device="cuda", dtype=torch.bfloat16)
    pairs = [(a, w)]
    if two_products:
        pairs.append((torch.randn(n + 40, K, device="cuda", dtype=torch.bfloat16),
                      torch.randn_like(w)))
    assert all(grouped_mm.takes(x, wx, transpose_w, two_products) for x, wx in pairs)
    out = grouped_mm.ragged_mm(*pairs[0], offs, transpose_w, *(pairs[1] if two_products else (None, None)))
    want = torch.zeros(n, N, device="cuda")
    for e, (start, end) in enumerate(zip([0, *offs.tolist()], offs.tolist())):
        for x, wx in pairs:
            we = wx[e].float()
            want[start:end] += x[start:end].float() @ (we.t() if transpose_w else we)
    assert torch.isfinite(out[:n]).all()
    assert rel_err(out[:n], want) < 4e-3  # one bf16 rounding of the fp32 sum


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="Triton kernel with TMA loads: Hopper GPUs only")
def test_gate_up_swiglu_against_fp32():
    """grouped_mm.gate_up_swiglu in bf16 against fp32: gate and up one bf16 rounding from their fp32 products, h
    SwiGLU of them; bench-2b's expert width (1408, no whole number of 128-column tiles); NaN rows past the last
    expert unread. grouped_mm.swiglu_backward against expert_grads' fp32 reference."""
    from deepseek_pt.engine import grouped_mm
    from deepseek_pt.engine.expert_grads import swiglu, swiglu_backward

    torch.manual_seed(0)
    counts = [272, 0, 48, 160, 16]
    offs = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
    bounds = list(zip([0, *offs.tolist()], offs.tolist()))
    n, E, K, N = sum(counts), len(counts), 256, 1408
    x = torch.randn(n + 40, K, device="cuda", dtype=torch.bfloat16)
    x[n:] = float("nan")
    w1, w3 = (torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) / 16 for _ in range(2))
    gate, up, h = grouped_mm.gate_up_swiglu(x, w1, w3, offs)
    for got, w in ((gate, w1), (up, w3)):
        want = torch.cat([x[s:t].float() @ w[e].float().t() for e, (s, t) in enumerate(bounds)])
        assert torch.isfinite(got[:n]).all() and rel_err(got[:n], want) < 4e-3
    assert rel_err(h[:n], swiglu(gate[:n].float(), up[:n].float())) < 4e-3
    grad_h = torch.randn_like(h[:n])
    for got, want in zip(grouped_mm.swiglu_backward(gate[:n], up[:n], grad_h),
                         swiglu_backward(gate[:n].float(), up[:n].float(), grad_h.float())):
        assert rel_err(got, want) < 4e-3  # one bf16 rounding of the fp32 result


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the choice between kernels is a GPU's")
@pytest.mark.parametrize("dtype, K", [(torch.float32, 128), (torch.bfloat16, 72)], ids=["fp32", "K-off-the-tiles"])
def test_expert_mm_takes_torch_grouped_mm_for_operands_the_kernel_cannot_read(dtype, K):
    """fp32, or a @ w[e] whose K is no whole number of the kernel's K tiles: torch._grouped_mm's result exactly, the
    two products summed as autograd would sum them."""
    torch.manual_seed(0)
    offs = torch.tensor(COUNTS, device="cuda").cumsum(0).to(torch.int32)
    a, b = (torch.randn(sum(COUNTS), K, device="cuda", dtype=dtype) for _ in range(2))
    w1, w3 = (torch.randn(len(COUNTS), K, 64, device="cuda", dtype=dtype) for _ in range(2))
    want = torch._grouped_mm(a, w1, offs=offs) + torch._grouped_mm(b, w3, offs=offs)
    assert torch.equal(expert_mm(a, w1, offs, False, True, b, w3), want)
