"""Rotary position embedding with optional YaRN scaling (DeepSeek-V2/V3).

Rotation acts on interleaved pairs (x[2i], x[2i+1]), as DeepSeek's reference does with complex
numbers. Tables are computed from positions on the fly: a 160k-token table per layer would cost GBs.
"""
from __future__ import annotations

import math

import torch

from ..config import AttentionConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _correction_dim(rotations: float, dim: int, base: float, max_pos: int) -> float:
    # The rotary dimension whose wavelength fits `rotations` times into max_pos.
    return dim * math.log(max_pos / (rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(att: AttentionConfig) -> tuple[torch.Tensor, float]:
    """Per-pair inverse frequencies [rope_dim/2] and the cos/sin magnitude factor."""
    r, dim = att.rope, att.qk_rope_head_dim
    inv_freq = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if r.scaling == "none":
        return inv_freq.float(), 1.0
    low = max(math.floor(_correction_dim(r.beta_fast, dim, r.theta, r.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(r.beta_slow, dim, r.theta, r.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = high frequency, kept; 0 = low frequency, interpolated by `factor`
    inv_freq = inv_freq / r.factor * (1 - keep) + inv_freq * keep
    magnitude = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim) if r.mscale_all_dim \
        else yarn_mscale(r.factor)
    return inv_freq.float(), magnitude


def softmax_scale(att: AttentionConfig) -> float:
    """1/sqrt(qk head dim), times YaRN's mscale(factor, mscale_all_dim)^2 correction."""
    scale = (att.qk_nope_head_dim + att.qk_rope_head_dim) ** -0.5
    if att.rope.scaling == "yarn" and att.rope.mscale_all_dim:
        scale *= yarn_mscale(att.rope.factor, att.rope.mscale_all_dim) ** 2
    return scale


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, magnitude: float = 1.0):
    """cos, sin of shape [..., T, rope_dim/2] for integer positions [..., T]."""
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device)
    return torch.cos(angles) * magnitude, torch.sin(angles) * magnitude


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, T, H, D] by cos/sin [B or 1, T, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
