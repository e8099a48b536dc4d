"""The routed experts' bf16 GEMMs: AutoEP's GroupedExperts as RoutedExperts (same parameters, same SwiGLU), with
two changes of its own, each on its own flag.

Weight gradients added into `.grad` where they are computed (`parallel.expert_grads_in_place`). Under
`parallel.coalesce_grad_reduction` a parameter's gradient sums every micro-step of the optimizer step in `.grad`, and
ZeRO's per-parameter hooks stand aside until the step's one reduction, which reads `.grad`. Autograd then adds each
micro-step's weight gradient onto `.grad` in a pass of its own: for bench-2b's routed experts that is 0.3 ms per
weight and micro-step after a 0.5 ms GEMM (bench/expert_wgrad_probe.py). Here the expert GEMMs' backward adds into
`.grad` itself and hands autograd no gradient for the weight: on a GPU in the GEMM's epilogue (grouped_wgrad.py),
elsewhere as the same add autograd would do, so that CPU runs take this code path too. A step's first micro-step
finds no `.grad` and returns its gradient to autograd as before; only later ones add in place. That is only right
while nothing watches autograd's accumulation, so the engine turns it on only inside coalesced reduction (train.py).

The forward and input-gradient GEMMs through grouped_mm.py's Triton kernel (`parallel.expert_triton_gemms`), which
pads each expert's rows less than torch._grouped_mm's CUTLASS kernel, runs the gate and up projections as one
kernel with the SwiGLU in its epilogue, and sums the gate's and the up projection's input gradients in one kernel
where autograd added two GEMMs' outputs. CPU runs, and operands the kernel cannot read, take torch._grouped_mm and
DeepSpeed's SwiGLU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
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


def expert_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, transpose_w: bool, use_triton: bool,
              a2: torch.Tensor | None = None, w2: torch.Tensor | None = None) -> torch.Tensor:
    """a[rows of e] @ w[e]^T (transpose_w) or @ w[e] for every expert e, plus a2 @ w2 alike when given: through
    grouped_mm.py's Triton kernel where `use_triton` and it can read the operands (the sum in fp32), else
    torch._grouped_mm (the sum of the two rounded products)."""
    pairs = [(a, w)] + ([(a2, w2)] if a2 is not None else [])
    if use_triton and a.is_cuda:
        from . import grouped_mm
        if all(grouped_mm.takes(x, wx, transpose_w, a2 is not None) for x, wx in pairs):
            return grouped_mm.ragged_mm(a, w, offs, transpose_w, a2, w2)
    out = None
    for x, wx in pairs:
        product = torch._grouped_mm(x, wx.transpose(-2, -1) if transpose_w else wx, offs=offs)
        out = product if out is None else out + product
    return out


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up, in fp32, rounded to gate's dtype."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d(gate), d(up) from dh for h = silu(gate) * up, in fp32, rounded to dh's dtype."""
    gate, up, dh = gate.float(), up.float(), grad_h.float()
    sig = torch.sigmoid(gate)
    return (dh * up * sig * (1 + gate * (1 - sig))).to(grad_h.dtype), (dh * F.silu(gate)).to(grad_h.dtype)


def _gate_up_swiglu(x, w1, w3, offs, use_triton: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up and h = silu(gate) * up: grouped_mm.py's one kernel where it can read the operands, else two GEMMs
    and the SwiGLU."""
    if use_triton and x.is_cuda:
        from . import grouped_mm
        if all(grouped_mm.takes(x, w, True) for w in (w1, w3)):
            return grouped_mm.gate_up_swiglu(x, w1, w3, offs)
    gate, up = (expert_mm(x, w, offs, True, use_triton) for w in (w1, w3))
    return gate, up, apply_expert_activation(gate, up)  # DeepSpeed's Triton SwiGLU on a GPU


class _ExpertSwiGLU(torch.autograd.Function):
    """y = (silu(x @ w1[e]^T) * (x @ w3[e]^T)) @ w2[e]^T over expert-sorted rows x [M, dim], w1, w3 [E, H, dim], w2
    [E, dim, H], as one function: on grouped_mm.py's kernels the gate and up GEMMs run as one, reading each tile of
    x once for both, with the SwiGLU in their epilogue. (Its derivative in the down projection's input-gradient
    epilogue was slower than the GEMM and a pass of its own: docs/benchmarks.md.) Weight gradients from
    expert_weight_grad."""

    @staticmethod
    def forward(ctx, x, w1, w3, w2, offs, in_place: bool, use_triton: bool):
        gate, up, h = _gate_up_swiglu(x, w1, w3, offs, use_triton)
        ctx.save_for_backward(x, gate, up, h, w1, w3, w2, offs)
        ctx.in_place, ctx.use_triton = in_place, use_triton
        return expert_mm(h, w2, offs, True, use_triton)

    @staticmethod
    def backward(ctx, grad_y):
        x, gate, up, h, w1, w3, w2, offs = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_h = expert_mm(grad_y, w2, offs, False, ctx.use_triton)
        if grad_h.is_cuda:
            from . import grouped_mm
            grad_gate, grad_up = grouped_mm.swiglu_backward(gate, up, grad_h)
        else:
            grad_gate, grad_up = swiglu_backward(gate, up, grad_h)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = expert_mm(grad_gate, w1, offs, False, ctx.use_triton, grad_up, w3)
        grads_w = (expert_weight_grad(w, grad, a, offs, ctx.in_place)
                   for w, grad, a in ((w1, grad_gate, x), (w3, grad_up, x), (w2, grad_y, h)))
        return grad_x, *grads_w, None, None, None


class RoutedExperts(GroupedExperts):
    """AutoEP's GroupedExperts (same parameters, same SwiGLU) on our GEMMs: weight gradients through
    expert_weight_grad (added into `.grad` when `grads_in_place`), the forward and input gradients through
    expert_mm (grouped_mm.py's Triton kernels when `triton_gemms`, the SwiGLU in the gate and up GEMM's
    epilogue)."""

    grads_in_place = False
    triton_gemms = False

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        return _ExpertSwiGLU.apply(x, self.w1, self.w3, self.w2, offs, self.grads_in_place,
                                   self.triton_gemms).type_as(x)


def convert_routed_experts(model: torch.nn.Module, grads_in_place: bool, triton_gemms: bool) -> tuple[int, int]:
    """Put AutoEP's expert layers of `model` on our GEMMs: layers on AutoEP's torch._grouped_mm path with separate
    gate and up weights become RoutedExperts with the two flags, FP8 layers (fp8_experts.py) take them as they are;
    others (AutoEP's Triton or per-expert paths, on GPUs before Hopper) stay as they are. Returns (layers converted,
    expert layers)."""
    from .fp8_experts import Fp8GroupedExperts, expert_layers

    layers = expert_layers(model)
    converted = 0
    for layer in layers:
        if not isinstance(layer, Fp8GroupedExperts):
            if (not layer.use_grouped_mm or layer.use_triton_grouped_mm or layer.gate_up_impl != "separate"
                    or layer.activation != "swiglu"):
                continue
            layer.__class__ = RoutedExperts
        layer.grads_in_place, layer.triton_gemms = grads_in_place, triton_gemms
        converted += 1
    return converted, len(layers)
