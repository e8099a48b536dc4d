"""Linear layers' weight gradients added into `.grad` by their GEMM (`parallel.linear_grads_in_place`).

Under `parallel.coalesce_grad_reduction` each micro-step's weight gradient is a new tensor that autograd then adds
onto `.grad` in a pass of its own. Here the weight-gradient GEMM itself adds into `.grad`, cuBLAS reading the old
sum in its epilogue (beta = 1, Megatron's gradient-accumulation fusion), and autograd gets no gradient for the
weight. The routed experts do the same in expert_grads.py. On bench-2b on an H200 that is 30 adds per micro-step
(the attention, dense-MLP, shared-expert, router and head weights), 0.27 of their 0.44 ms saved, +0.6% tokens/s
(docs/benchmarks.md).

A step's first micro-step finds no `.grad` and runs torch's linear, whose gradient autograd accumulates as before;
only later ones add in place. As in expert_grads.py, that is only right while nothing watches autograd's
accumulation, so the engine turns it on only inside coalesced reduction (train.py).

The add is a custom op that mutates `.grad` so that the attention and dense-MLP halves, which the engine compiles,
keep it in place: traced as a plain `addmm_`, AOTAutograd makes it an out-of-place GEMM and a copy back, two passes
where autograd's add was one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def grad_to_add_into(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """weight.grad where a GEMM of `dtype` can add its gradient into it in place: this step's sum so far, of the
    weight's shape, that dtype and a plain layout. None where autograd must take the gradient (a step's first
    micro-step, or a `.grad` of another kind)."""
    grad = weight.grad
    if grad is None or grad.shape != weight.shape or grad.dtype != dtype or not grad.is_contiguous():
        return None
    return grad


def grad_for_forward(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """grad_to_add_into, asked by a forward on behalf of its backward: also None where autograd records no backward
    for the weight (grad mode off, a frozen weight)."""
    if not torch.is_grad_enabled() or not weight.requires_grad:
        return None
    return grad_to_add_into(weight, dtype)


@torch.library.custom_op("deepseek_pt::add_linear_weight_grad_", mutates_args=("grad",))
def add_linear_weight_grad_(grad: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor) -> None:
    """grad [out, in] += grad_y[..., out]^T x[..., in], summed over every leading dimension, in one GEMM."""
    grad.addmm_(grad_y.reshape(-1, grad_y.shape[-1]).t(), x.reshape(-1, x.shape[-1]))


class _LinearGradInPlace(torch.autograd.Function):
    """y = x @ weight^T; backward adds weight's gradient into `grad` and hands autograd none for it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        # Kept off save_for_backward: a weight used twice in one forward (a tied head, the MTP depths) sees its
        # gradient changed by the other use's backward first, which the saved-tensor version check would refuse.
        ctx.grad = grad
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        add_linear_weight_grad_(ctx.grad, grad_y, x)
        return (grad_y @ weight if ctx.needs_input_grad[0] else None), None, None


class InPlaceGradLinear(nn.Linear):
    """nn.Linear without bias whose weight gradient goes into `.grad` in place once `.grad` holds one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = grad_for_forward(self.weight, x.dtype)
        if grad is None:
            return F.linear(x, self.weight)
        return _LinearGradInPlace.apply(x, self.weight, grad)


def linear_grads_in_place(model: nn.Module) -> tuple[int, int]:
    """Have the plain bias-free nn.Linear layers of `model` add their weight gradients into `.grad` in place: they
    become InPlaceGradLinear. Subclasses (torchao's Float8Linear, say) and layers with a bias stay as they are.
    Returns (layers converted, linear layers)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    converted = 0
    for layer in linears:
        if type(layer) is nn.Linear and layer.bias is None:
            layer.__class__ = InPlaceGradLinear
            converted += 1
    return converted, len(linears)
