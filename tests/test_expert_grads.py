"""Routed experts' weight gradients added into .grad in place (parallel.expert_grads_in_place): the same forward and
gradients as AutoEP's layer with autograd accumulating, autograd left out from the second micro-step on, the FP8
experts alike, and on a GPU the Triton kernel against torch's grouped GEMM. Through DeepSpeed with coalesced
reduction: tests/test_train.py's reduced-per-step runs."""
import pytest
import torch
from deepspeed.moe.ep_experts import GroupedExperts

from deepseek_pt.engine.expert_grads import InPlaceGradExperts, expert_grads_in_place
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


def test_in_place_experts_train_as_autoeps_layer_leaving_autograd_out_after_the_first_micro_step():
    torch.manual_seed(0)
    device = DEVICE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # the kernel runs in bf16; CPU: the add, exact
    autoep = GroupedExperts(64, 48, len(COUNTS), disable_triton_grouped_mm=True).to(device, dtype)
    for w in autoep.parameters():
        torch.nn.init.normal_(w, std=0.1)
    ours = GroupedExperts(64, 48, len(COUNTS), disable_triton_grouped_mm=True).to(device, dtype)
    ours.load_state_dict(autoep.state_dict())
    assert expert_grads_in_place(torch.nn.Sequential(ours)) == (1, 1) and type(ours) is InPlaceGradExperts
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
    for (y_a, gx_a), (y_o, gx_o) in zip(outputs[id(autoep)], outputs[id(ours)]):
        assert torch.equal(y_o[:n], y_a[:n])  # the same forward, op for op
        torch.testing.assert_close(gx_o[:n], gx_a[:n])
    assert accumulated[id(autoep)] == [3, 3, 3]
    assert accumulated[id(ours)] == [1, 1, 1]  # the first micro-step's gradient is autograd's; then in place
    exact = _fp32_weight_grads(autoep, micro_steps, counts) if device == "cuda" else None
    for name in ("w1", "w3", "w2"):
        grad_a, grad_o = getattr(autoep, name).grad, getattr(ours, name).grad
        if device == "cpu":
            assert torch.equal(grad_o, grad_a), name  # the same adds in the same order
        else:  # the kernel rounds the sum to bf16 once, autograd twice: no further from the fp32 sum
            assert rel_err(grad_o, exact[name]) <= rel_err(grad_a, exact[name]) * 1.05 + 1e-4, name


def _fp32_weight_grads(layer: GroupedExperts, micro_steps, counts) -> dict[str, torch.Tensor]:
    """The weight gradients summed over `micro_steps` in fp32: the same layer's weights, upcast."""
    ref = GroupedExperts(layer.w1.shape[2], layer.w1.shape[1], layer.num_experts,
                         disable_triton_grouped_mm=True).to(layer.w1.device)
    ref.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
    for x, grad_y in micro_steps:
        ref(x.float(), counts).backward(grad_y.float())
    return {name: getattr(ref, name).grad for name in ("w1", "w3", "w2")}


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
