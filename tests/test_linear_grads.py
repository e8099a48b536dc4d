"""Linear layers' weight gradients added into .grad by their GEMM (parallel.linear_grads_in_place): the same forward
and gradients as torch's linear with autograd accumulating, autograd left out from the second micro-step on, eager
and compiled. Through DeepSpeed with coalesced reduction: tests/test_train.py's reduced-per-step runs."""
import pytest
import torch
from torch import nn

from deepseek_pt.engine.linear_grads import InPlaceGradLinear, linear_grads_in_place
from test_expert_grads import accumulations
from test_fp8 import rel_err


class TwoLayers(nn.Module):
    """Two linears, the second used twice in one forward as a tied head is."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(32, 64, bias=False), nn.Linear(64, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x))) + self.down(self.up(x).square())


def _pair(dtype: torch.dtype) -> tuple[TwoLayers, TwoLayers]:
    torch.manual_seed(0)
    reference = TwoLayers().to(dtype)
    ours = TwoLayers().to(dtype)
    ours.load_state_dict(reference.state_dict())
    assert linear_grads_in_place(ours) == (2, 2) and type(ours.up) is InPlaceGradLinear
    return reference, ours


def _micro_steps(model, batches, compiled: bool) -> list[torch.Tensor]:
    forward = torch.compile(model) if compiled else model
    outputs = []
    for x, grad_y in batches:
        y = forward(x)
        y.backward(grad_y)
        outputs.append(y.detach())
    return outputs


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_linears_train_as_torchs_leaving_autograd_out_after_the_first_micro_step(dtype, compiled):
    reference, ours = _pair(dtype)
    batches = [(torch.randn(2, 8, 32, dtype=dtype), torch.randn(2, 8, 32, dtype=dtype)) for _ in range(3)]
    counts = {id(m): accumulations(m.parameters()) for m in (reference, ours)}
    for y_ref, y_ours in zip(_micro_steps(reference, batches, compiled), _micro_steps(ours, batches, compiled)):
        assert torch.equal(y_ours, y_ref)  # torch's linear forward
    assert counts[id(reference)] == [3, 3]
    assert counts[id(ours)] == [1, 1]  # the first micro-step's gradient is autograd's; then in place
    exact = TwoLayers()
    exact.load_state_dict({k: v.float() for k, v in reference.state_dict().items()})
    for x, grad_y in batches:
        exact(x.float()).backward(grad_y.float())
    for name in ("up", "down"):
        grad_ref, grad_ours, grad_exact = (getattr(m, name).weight.grad for m in (reference, ours, exact))
        if dtype == torch.float32:  # a GEMM with beta = 1 instead of a GEMM and an add: the same sum, reordered
            torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)
        else:  # one bf16 rounding of each micro-step's sum instead of two: no further from the fp32 sum
            assert rel_err(grad_ours, grad_exact) <= rel_err(grad_ref, grad_exact) * 1.05 + 1e-4, name


def test_recomputed_in_backward_alike():
    """Under activation checkpointing the forward runs again in backward: it must take the same path as the first
    time (the checkpoint refuses other saved tensors), and the gradients come out the same."""
    from torch.utils.checkpoint import checkpoint

    reference, ours = _pair(torch.float32)
    for x, grad_y in [(torch.randn(2, 8, 32), torch.randn(2, 8, 32)) for _ in range(3)]:
        reference(x).backward(grad_y)
        checkpoint(ours, x, use_reentrant=False).backward(grad_y)
    for name in ("up", "down"):
        torch.testing.assert_close(getattr(ours, name).weight.grad, getattr(reference, name).weight.grad,
                                   rtol=1e-5, atol=1e-5)


def test_compiled_backward_adds_into_grad_in_place():
    """Traced as torch's addmm_, AOTAutograd would make the add an out-of-place GEMM and a copy back into .grad:
    the custom op keeps it one GEMM on .grad itself."""
    from torch._inductor.utils import run_and_get_code

    _, ours = _pair(torch.float32)
    x = torch.randn(4, 32)
    ours(x).sum().backward()  # .grad exists from here on
    before = ours.up.weight.grad.clone()

    def micro_step():
        torch.compile(ours)(x).sum().backward()

    _, (_, backward) = run_and_get_code(micro_step)  # the forward's code, then the backward's
    assert "deepseek_pt.add_linear_weight_grad_" in backward
    assert "addmm" not in backward.replace("add_linear_weight_grad_", "") and "copy_" not in backward
    torch.testing.assert_close(ours.up.weight.grad, 2 * before)


def test_no_gradient_tracking_leaves_grad_alone():
    _, ours = _pair(torch.float32)
    x = torch.randn(4, 32)
    ours(x).sum().backward()
    before = ours.up.weight.grad.clone()
    with torch.no_grad():
        ours(x)
    ours.up.weight.requires_grad_(False)
    ours(x.requires_grad_()).sum().backward()  # a frozen weight's gradient stays as it was
    assert torch.equal(ours.up.weight.grad, before)


def test_only_plain_bias_free_linears_are_converted():
    class Custom(nn.Linear):  # stands for torchao's Float8Linear
        pass

    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4), Custom(4, 4, bias=False))
    assert linear_grads_in_place(model) == (1, 3)
    assert [type(m) for m in model] == [InPlaceGradLinear, nn.Linear, Custom]
