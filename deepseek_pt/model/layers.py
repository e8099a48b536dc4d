"""Small shared layers: RMSNorm and the SwiGLU feed-forward used by dense layers and experts."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32: bf16 sums of squares lose too much over wide hidden sizes.
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


# Pointwise pieces that torch.compile fuses (casts included) when the engine asks: see compile_pointwise.
POINTWISE = {"rms_norm": rms_norm, "swiglu": swiglu}


def compile_pointwise() -> None:
    """Swap the pointwise functions for compiled ones (fused kernels, no fp32 round trips in memory).
    Done per function, not per module, so it composes with DeepSpeed ZeRO-3's parameter hooks."""
    from .rope import apply_rope
    POINTWISE.setdefault("apply_rope", apply_rope)
    for name, fn in list(POINTWISE.items()):
        if not hasattr(fn, "_torchdynamo_orig_callable"):
            POINTWISE[name] = torch.compile(fn, fullgraph=True)  # sizes that vary become dynamic


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return POINTWISE["rms_norm"](x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); names match HF DeepseekV3 and DeepSpeed AutoEP's expert_w1/w3/w2."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(POINTWISE["swiglu"](self.gate_proj(x), self.up_proj(x)))
