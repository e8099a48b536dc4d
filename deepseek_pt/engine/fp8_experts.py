"""Routed experts' grouped GEMMs in FP8 (`fp8.experts`), on DeepSpeed AutoEP's expert layer; the shared experts'
(`fp8.shared_experts`) as one expert that every token visits.

The expert SwiGLU runs as one autograd function over AutoEP's expert-sorted token rows:
    gate_up = x @ [w1; w3][e].T      h = silu(gate) * up      y = h @ w2[e].T
- Forward and input-gradient GEMMs are FP8 (e4m3, rowwise scaled, fast accumulation) on
  `torch._scaled_grouped_mm`, or with `parallel.expert_triton_gemms` on grouped_mm.py's Triton kernel, whose tiles
  pad each expert's rows less. Gate and up run as one grouped GEMM.
- The weight-gradient GEMMs reduce over each expert's tokens and stay bf16 (expert_grads.py; `torch._grouped_mm`,
  or the kernel that adds into `.grad` under `parallel.expert_grads_in_place`):
  rowwise scales cannot follow that axis, and scales per expert and column would need casts of their
  own (torchao's `rowwise_with_gw_hp` keeps this GEMM in bf16 for the linears too). The shared experts' weights
  are plain [N, K] matrices over every row: one cuBLAS GEMM each, adding into `.grad` as linear_grads.py's do.
- Every scale is a power of two, one per token row and one per weight row along the GEMM's reduction
  dimension. Scaling is then exact, and e4m3's rounding is the only error.
- Weights are cast once per optimizer step, not once per micro-step: the two FP8 layouts of each
  expert weight (forward, and transposed for the input gradient) are kept until the engine's step
  counter moves, as TransformerEngine does across micro-batches. That costs 2 bytes per local
  routed-expert parameter.
- On a GPU the activations' casts (with SwiGLU and its derivative fused in) are Triton kernels
  (fp8_expert_casts.py); the torch functions here are their reference and run on a CPU.

Where `torch._scaled_grouped_mm` cannot run (no Hopper GPU), the same quantization is emulated: the
operands are rounded through e4m3 with their scales, and the GEMM runs in fp32. That reproduces the
numerics for CPU runs and tests, not the speed.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from deepspeed.moe import ep_kernels
from deepspeed.moe.ep_experts import GroupedExperts

from ..model.layers import SwiGLU
from .expert_grads import expert_weight_grad, swiglu, swiglu_backward
from .fp8 import E4M3_MAX
from .linear_grads import add_linear_weight_grad_, grad_to_add_into

ALIGN = 16  # FP8 grouped GEMMs need every expert's rows to start on a 16-row boundary, and K, N multiples of 16


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t [..., K] -> (e4m3 [..., K], fp32 dequantization scales [...]): per row, the largest power of two that keeps
    the row's amax within e4m3's 448. An all-zero row stays zero."""
    amax = t.abs().amax(dim=-1).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    return (t.float() * scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale.reciprocal()


def swiglu_quantized(gate_up: torch.Tensor):
    """h = silu(gate) * up from gate_up [M, 2H] (bf16), and h quantized for the down projection."""
    h = swiglu(*gate_up.chunk(2, dim=-1))
    return (h, *quantize_rows(h))


def swiglu_backward_quantized(gate_up: torch.Tensor, grad_h: torch.Tensor):
    """d(gate_up) [M, 2H] from dh [M, H] (bf16), and it quantized for the input-gradient GEMM."""
    grad = torch.cat(swiglu_backward(*gate_up.chunk(2, dim=-1), grad_h), dim=-1)
    return (grad, *quantize_rows(grad))


def _cast_weights(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
    """The four FP8 layouts of Fp8ExpertWeights, flattened: gate_up, down, gate_up_t, down_t."""
    gate_up = torch.cat([w1, w3], dim=1)  # [E, 2H, dim]
    return (*quantize_rows(gate_up), *quantize_rows(w2),
            *quantize_rows(gate_up.transpose(-2, -1).contiguous()), *quantize_rows(w2.transpose(-2, -1).contiguous()))


def _activation_casts(t: torch.Tensor):
    """The activation casts for t's device: on a GPU fp8_expert_casts' Triton kernels, which read each row once (the
    same functions through torch.compile read it twice); elsewhere the torch functions above, which the kernels
    are tested against."""
    if t.device.type != "cuda":
        return quantize_rows, swiglu_quantized, swiglu_backward_quantized
    from . import fp8_expert_casts as kernels
    return kernels.quantize_rows, kernels.swiglu_quantized, kernels.swiglu_backward_quantized


def _triton_cast_weights(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor):
    """_cast_weights through fp8_weight_casts' kernels: each weight read twice, each layout written once."""
    from .fp8_weight_casts import cast_weight_layouts
    gate_up, down = cast_weight_layouts([w1, w3]), cast_weight_layouts([w2])
    return (*gate_up[:2], *down[:2], *gate_up[2:], *down[2:])


@functools.cache
def _compiled_weight_cast() -> Callable:
    # One graph with static shapes: the weights keep theirs, and the cast runs once per optimizer step.
    return torch.compile(_cast_weights, fullgraph=True, dynamic=False)


def weight_cast(device: torch.device, emulate: bool) -> Callable:
    """The cast of the weights' FP8 layouts for `device`: where the FP8 GEMMs run, fp8_weight_casts' Triton kernels
    (6 bytes of traffic per value; the reference through torch.compile moved ~12, docs/benchmarks.md); on another GPU
    the reference compiled, elsewhere the reference."""
    if device.type != "cuda":
        return _cast_weights
    return _compiled_weight_cast() if emulate else _triton_cast_weights


def scaled_grouped_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                      offs: torch.Tensor, emulate: bool, use_triton: bool = False) -> torch.Tensor:
    """Per expert e, rows offs[e-1]:offs[e] of a [M, K] (e4m3, row scales [M]) times b[e].T, b [E, N, K] (e4m3, row
    scales [E, N]): [M, N] bf16. Rows past offs[-1] are padding, left unset as in torch._grouped_mm. On
    grouped_mm.py's Triton kernel where `use_triton` and it can read the operands, else torch._scaled_grouped_mm.
    Emulated: the same operands dequantized, an fp32 GEMM per expert."""
    if not emulate:
        if use_triton:
            from . import grouped_mm
            if grouped_mm.takes(a, b, transpose_w=True):
                return grouped_mm.ragged_mm(a, b, offs, True, scales=(a_scale, b_scale))
        return torch._scaled_grouped_mm(a, b.transpose(-2, -1), a_scale, b_scale, offs=offs,
                                        out_dtype=torch.bfloat16, use_fast_accum=True)
    out = torch.empty(a.shape[0], b.shape[1], dtype=torch.bfloat16, device=a.device)
    for e, (start, end) in enumerate(zip([0, *offs.tolist()], offs.tolist())):
        rows = a[start:end].float() * a_scale[start:end, None]
        out[start:end] = rows @ (b[e].float() * b_scale[e, :, None]).T
    return out


class Fp8ExpertWeights:
    """The FP8 layouts of one expert layer's weights, each an (e4m3 [E, N, K], scales [E, N]) pair scaled along the
    GEMM's reduction dimension K: gate_up (w1 and w3 stacked, for the forward), down (w2), and their transposes
    for the input gradient, down_t and gate_up_t; on a GPU cast as weight_cast says (`emulate`: the GEMMs are
    emulated there)."""

    def __init__(self, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, emulate: bool = False):
        layouts = weight_cast(w1.device, emulate)(w1.detach(), w3.detach(), w2.detach())
        self.gate_up, self.down, self.gate_up_t, self.down_t = (layouts[i:i + 2] for i in range(0, 8, 2))


def _weight_grad(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor,
                 in_place: bool) -> torch.Tensor | None:
    """expert_weight_grad for the routed experts' weight [E, N, K]; for a shared expert's [N, K], whose one group is
    every row, a^T b as one GEMM (cuBLAS: the grouped GEMM with one group ran at ~555 TFLOP/s on bench-2b's shared
    experts, docs/benchmarks.md), added into weight.grad in place as expert_weight_grad adds."""
    if weight.dim() == 3:
        return expert_weight_grad(weight, a, b, offs, in_place)
    grad = grad_to_add_into(weight, a.dtype) if in_place else None
    if grad is None:
        return a.t() @ b
    add_linear_weight_grad_(grad, a, b)
    return None


class _Fp8ExpertSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w3, w2, offs, weights: Fp8ExpertWeights, emulate: bool, in_place: bool, triton: bool):
        quantize, swiglu, _ = _activation_casts(x)
        x_q, x_s = quantize(x)
        gate_up = scaled_grouped_mm(x_q, x_s, *weights.gate_up, offs, emulate, triton)
        h, h_q, h_s = swiglu(gate_up)
        ctx.save_for_backward(x, gate_up, h, offs, w1, w3, w2)
        ctx.weights, ctx.emulate, ctx.in_place, ctx.triton = weights, emulate, in_place, triton
        return scaled_grouped_mm(h_q, h_s, *weights.down, offs, emulate, triton).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, gate_up, h, offs, w1, w3, w2 = ctx.saved_tensors
        weights, emulate = ctx.weights, ctx.emulate
        grad_y = grad_y.to(h.dtype).contiguous()
        quantize, _, swiglu_backward = _activation_casts(grad_y)
        g_q, g_s = quantize(grad_y)
        grad_h = scaled_grouped_mm(g_q, g_s, *weights.down_t, offs, emulate, ctx.triton)
        grad_w2 = _weight_grad(w2, grad_y, h, offs, ctx.in_place)  # [E, dim, H], reduced over each expert's rows
        grad_gate_up, gu_q, gu_s = swiglu_backward(gate_up, grad_h)
        grad_x = scaled_grouped_mm(gu_q, gu_s, *weights.gate_up_t, offs, emulate, ctx.triton).to(x.dtype)
        # One GEMM per weight, each writing its own contiguous [E, H, dim]. With strided views of one [E, 2H, dim]
        # product instead, a bench-2b profile showed non-vectorized gradient adds costing 3.2 ms per micro-step
        # (docs/benchmarks.md).
        grad_w1, grad_w3 = (_weight_grad(w, half, x, offs, ctx.in_place)
                            for w, half in zip((w1, w3), grad_gate_up.chunk(2, dim=1)))
        return grad_x, grad_w1, grad_w3, grad_w2, None, None, None, None, None


def fp8_expert_swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor,
                      weights: Fp8ExpertWeights, emulate: bool, in_place: bool = False,
                      triton_gemms: bool = False) -> torch.Tensor:
    """The routed experts' SwiGLU over expert-sorted rows x [M, dim] (group e ends at offs[e], each group a multiple
    of ALIGN rows), with `weights` the FP8 layouts of w1, w3 [E, H, dim] and w2 [E, dim, H]; gradients reach the
    bf16 weights (added into their `.grad` when `in_place`: expert_grads.py); `triton_gemms`: scaled_grouped_mm's.
    A shared expert passes its weights as [H, dim] and [dim, H], one group of every row."""
    return _Fp8ExpertSwiGLU.apply(x, w1, w3, w2, offs, weights, emulate, in_place, triton_gemms)


def expert_layers(model: torch.nn.Module) -> list[GroupedExperts]:
    """AutoEP's expert modules in `model`."""
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


def convert_experts_to_fp8(model: torch.nn.Module, optimizer_steps: Callable[[], int], emulate: bool) -> int:
    """Run every AutoEP expert layer of `model` through fp8_expert_swiglu; `optimizer_steps()` counts the engine's
    optimizer steps (the FP8 weights are recast when it moves). Returns how many layers were converted."""
    layers = expert_layers(model)
    for layer in layers:
        if layer.activation != "swiglu" or layer.use_triton_grouped_mm or layer.gate_up_impl != "separate":
            raise ValueError(f"fp8.experts: AutoEP's expert layer runs activation={layer.activation!r}, "
                             f"triton={layer.use_triton_grouped_mm}, gate_up_impl={layer.gate_up_impl!r}; "
                             "FP8 experts take swiglu on torch._grouped_mm with separate gate and up weights")
        layer.__class__ = Fp8GroupedExperts
        layer.optimizer_steps, layer.emulate, layer.fp8_weights = optimizer_steps, emulate, None
    if layers:
        # AutoEP pads each expert's rows to this many when it sorts tokens by expert; read at every forward.
        ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M = max(ep_kernels.TOKEN_GROUP_ALIGN_SIZE_M, ALIGN)
    return len(layers)


class _StepCachedFp8Weights:
    """An expert layer whose FP8 weights are cast once per optimizer step (`optimizer_steps()` counts the engine's
    steps); `expert_weights()` gives its w1, w3 [E, H, dim] and w2 [E, dim, H]."""

    optimizer_steps: Callable[[], int]
    emulate: bool
    fp8_weights: tuple[tuple, Fp8ExpertWeights] | None = None
    triton_gemms = False  # expert_grads.convert_routed_experts or convert_shared_experts_to_fp8 sets it

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def current_fp8_weights(self) -> Fp8ExpertWeights:
        """The FP8 layouts of this optimizer step's weights: cast at the step's first forward, reused by its other
        micro-steps and recomputed forwards. The key also holds the weights' addresses, so that weights ZeRO-3
        gathers into new memory are cast again."""
        weights = self.expert_weights()
        key = (self.optimizer_steps(), *(w.data_ptr() for w in weights))
        if self.fp8_weights is None or self.fp8_weights[0] != key:
            self.fp8_weights = None  # free the old layouts before casting the new ones
            self.fp8_weights = (key, Fp8ExpertWeights(*weights, self.emulate))
        return self.fp8_weights[1]


class Fp8GroupedExperts(GroupedExperts, _StepCachedFp8Weights):
    """AutoEP's GroupedExperts (same parameters, same state dict) computing through fp8_expert_swiglu."""

    grads_in_place = False  # expert_grads.convert_routed_experts sets it

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.w1, self.w3, self.w2

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(num_tokens_per_expert, dim=0, dtype=torch.int32)
        return fp8_expert_swiglu(x, *self.expert_weights(), offs, self.current_fp8_weights(), self.emulate,
                                 self.grads_in_place, self.triton_gemms)


class Fp8SharedExperts(SwiGLU, _StepCachedFp8Weights):
    """The shared experts' SwiGLU (same parameters, same state dict) through fp8_expert_swiglu, as one expert that
    every token visits; its weight gradients added into `.grad` in place when `grads_in_place`."""

    grads_in_place = False  # convert_shared_experts_to_fp8 sets it

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(w.unsqueeze(0) for w in self.weights())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        offs = torch.full((1,), rows.shape[0], dtype=torch.int32, device=x.device)  # no host-to-device copy
        return fp8_expert_swiglu(rows, *self.weights(), offs, self.current_fp8_weights(), self.emulate,
                                 self.grads_in_place, self.triton_gemms).view_as(x)


def convert_shared_experts_to_fp8(model: torch.nn.Module, optimizer_steps: Callable[[], int], emulate: bool,
                                  triton_gemms: bool, grads_in_place: bool = False) -> int:
    """Run the shared experts of `model`'s MoE layers through fp8_expert_swiglu (on grouped_mm.py's Triton kernel if
    `triton_gemms`, weight gradients added into `.grad` if `grads_in_place`); `optimizer_steps()` as
    convert_experts_to_fp8's. Returns how many were converted."""
    shared = [m for name, m in model.named_modules() if name.split(".")[-1] == "shared_experts"
              and type(m) is SwiGLU]
    for module in shared:
        module.__class__ = Fp8SharedExperts
        module.optimizer_steps, module.emulate, module.triton_gemms = optimizer_steps, emulate, triton_gemms
        module.grads_in_place = grads_in_place
    return len(shared)
