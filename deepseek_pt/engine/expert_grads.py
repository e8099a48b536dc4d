"""Routed experts' weight gradients added into `.grad` where they are computed (`parallel.expert_grads_in_place`).

Under `parallel.coalesce_grad_reduction` a parameter's gradient sums every micro-step of the optimizer step in
`.grad`, and ZeRO's per-parameter hooks stand aside until the step's one reduction, which reads `.grad`. Autograd
then adds each micro-step's weight gradient onto `.grad` in a pass of its own: for bench-2b's routed experts that
is 0.3 ms per weight and micro-step after a 0.5 ms GEMM (bench/expert_wgrad_probe.py). Here the expert GEMMs'
backward adds into `.grad` itself and hands autograd no gradient for the weight: on a GPU in the GEMM's epilogue
(grouped_wgrad.py), elsewhere as the same add autograd would do, so that CPU runs take this code path too.

A step's first micro-step finds no `.grad` and returns its gradient to autograd as before; only later ones add in
place. That is only right while nothing watches autograd's accumulation, so the engine turns it on only inside
coalesced reduction (train.py).
"""
from __future__ import annotations

import torch
from deepspeed.moe.ep_experts import GroupedExperts, apply_expert_activation

from .linear_grads import grad_to_add_into


def expert_weight_grad(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                       in_place: bool) -> torch.Tensor | None:
    """The gradient of weight [E, N, K], a[rows of e]^T b[rows of e] for a [M, N] and b [M, K] with expert e owning
    rows offs[e-1]:offs[e]. Returned for autograd to accumulate, or, when `in_place` and weight.grad already holds
    this step's sum, added into weight.grad and None returned."""
    grad = grad_to_add_into(weight, a.dtype) if in_place else None
    if grad is None:
        return torch._grouped_mm(a.t(), b, offs=offs)
    if grad.is_cuda:
        from .grouped_wgrad import grouped_wgrad_
        grouped_wgrad_(grad, a, b, offs)
    else:
        grad.add_(torch._grouped_mm(a.t(), b, offs=offs))
    return None


class _GroupedLinear(torch.autograd.Function):
    """y = x @ w[e]^T over expert-sorted rows x [M, K], w [E, N, K], as torch._grouped_mm, with its weight gradient
    from expert_weight_grad."""

    @staticmethod
    def forward(ctx, x, w, offs, in_place: bool):
        ctx.save_for_backward(x, w, offs)
        ctx.in_place = in_place
        return torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, grad_y):
        x, w, offs = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad_y, w, offs=offs) if ctx.needs_input_grad[0] else None
        return grad_x, expert_weight_grad(w, grad_y, x, offs, ctx.in_place), None, None


class InPlaceGradExperts(GroupedExperts):
    """AutoEP's GroupedExperts (same parameters, same forward as its torch._grouped_mm path), whose weight gradients
    go through expert_weight_grad."""

    grads_in_place = True

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        gate, up = (_GroupedLinear.apply(x, w, offs, self.grads_in_place) for w in (self.w1, self.w3))
        h = apply_expert_activation(gate, up, self.activation, self.activation_alpha, self.activation_limit)
        return _GroupedLinear.apply(h, self.w2, offs, self.grads_in_place).type_as(x)


def expert_grads_in_place(model: torch.nn.Module) -> tuple[int, int]:
    """Have AutoEP's expert layers of `model` add their weight gradients into `.grad` in place: FP8 layers
    (fp8_experts.py) take the flag, layers on AutoEP's torch._grouped_mm path with separate gate and up weights
    become InPlaceGradExperts; others (AutoEP's Triton or per-expert paths, on GPUs before Hopper) stay as they are.
    Returns (layers converted, expert layers)."""
    from .fp8_experts import Fp8GroupedExperts, expert_layers

    layers = expert_layers(model)
    converted = 0
    for layer in layers:
        if isinstance(layer, Fp8GroupedExperts):
            layer.grads_in_place = True
        elif layer.use_grouped_mm and not layer.use_triton_grouped_mm and layer.gate_up_impl == "separate":
            layer.__class__ = InPlaceGradExperts
        else:
            continue
        converted += 1
    return converted, len(layers)
