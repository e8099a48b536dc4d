"""Multi-head Latent Attention (DeepSeek-V2/V3), with the optional MLA-o output subspace.

Training uses the plain computation: K and V are expanded from the compressed latent per head and fed
to SDPA (q/k head dim nope+rope, v head dim v_head_dim). Decoding uses the absorbed computation: kv_b
is folded into the query (W_uk) and the output (W_uv), so attention runs against a cache holding only
the normalised latent c_kv [kv_lora_rank] and the shared rotary key k_pe [qk_rope_head_dim] per token.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..config import ModelConfig
from .layers import POINTWISE, RMSNorm
from .rope import apply_rope, inv_frequencies, rope_cos_sin, softmax_scale

# Flash attention refuses q/k head dim 192 with v 128; cuDNN takes it (fastest on Hopper), then the
# memory-efficient kernel; math is the CPU path.
SDPA_PRIORITY = [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]


def padded_flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           scale: float | None = None) -> torch.Tensor:
    """Causal attention for torch's deterministic algorithms ([B, H, T, width] each). SDPA refuses cuDNN under them,
    and the efficient kernel's backward, its sums over the keys unsplit, took 7 ms a layer on bench-2b (H100).
    FlashAttention-2's deterministic backward takes q, k and v of one width only: the narrower are padded with zeros
    (which change no dot product), the output's padding columns dropped (docs/benchmarks.md). Math where flash refuses
    (widths over 256)."""
    v_dim = v.shape[-1]
    width = max(q.shape[-1], v_dim)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :v_dim]


@dataclass
class MLACache:
    """Compressed decode cache of one MLA layer: latent + rotary key per token."""

    kv: torch.Tensor  # [B, max_len, kv_lora_rank], normalised latent
    pe: torch.Tensor  # [B, max_len, qk_rope_head_dim], rotated shared key

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, max_len: int, dtype=torch.float32, device=None) -> "MLACache":
        a = config.attention
        return cls(torch.zeros(batch, max_len, a.kv_lora_rank, dtype=dtype, device=device),
                   torch.zeros(batch, max_len, a.qk_rope_head_dim, dtype=dtype, device=device))


class MLA(nn.Module):
    """MLA over x [B, T, dim]. `MLA(model_config)` works on its own, outside our Transformer."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        a = config.attention
        self.n_heads, self.nope_dim, self.rope_dim, self.v_dim = a.n_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.kv_lora_rank = a.kv_lora_rank
        qk_dim = a.qk_nope_head_dim + a.qk_rope_head_dim
        if a.q_lora_rank:
            self.q_a_proj = nn.Linear(config.dim, a.q_lora_rank, bias=False)
            # The latent norms use eps 1e-6 whatever norm_eps is, as DeepSeek's reference and HF do.
            self.q_a_layernorm = RMSNorm(a.q_lora_rank)
            self.q_b_proj = nn.Linear(a.q_lora_rank, a.n_heads * qk_dim, bias=False)
        else:
            self.q_proj = nn.Linear(config.dim, a.n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.dim, a.kv_lora_rank + a.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(a.kv_lora_rank)
        self.kv_b_proj = nn.Linear(a.kv_lora_rank, a.n_heads * (a.qk_nope_head_dim + a.v_head_dim), bias=False)
        if a.use_output_subspace:
            self.o_a_proj = nn.Linear(a.n_heads * a.v_head_dim, a.o_latent_dim, bias=False)
            self.o_b_proj = nn.Linear(a.o_latent_dim, config.dim, bias=False)
        else:
            self.o_proj = nn.Linear(a.n_heads * a.v_head_dim, config.dim, bias=False)
        self.softmax_scale = softmax_scale(a)
        inv_freq, self.rope_magnitude = inv_frequencies(a)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def output(self, o: torch.Tensor) -> torch.Tensor:
        return self.o_b_proj(self.o_a_proj(o)) if hasattr(self, "o_a_proj") else self.o_proj(o)

    def _project(self, x: torch.Tensor, positions: torch.Tensor):
        """Queries split into (nope, rotated rope) parts, normalised latent, rotated shared key."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if hasattr(self, "q_a_proj") else self.q_proj(x)
        q_nope, q_pe = q.view(B, T, self.n_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        cos, sin = rope_cos_sin(self.inv_freq, positions, self.rope_magnitude)
        rope = POINTWISE.get("apply_rope", apply_rope)
        q_pe = rope(q_pe, cos, sin)
        k_pe = rope(k_pe.unsqueeze(2), cos, sin).squeeze(2)
        return q_nope, q_pe, self.kv_a_layernorm(c_kv), k_pe

    def forward(self, x: torch.Tensor, cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        positions = torch.arange(start_pos, start_pos + T, device=x.device).unsqueeze(0)
        q_nope, q_pe, c_kv, k_pe = self._project(x, positions)
        if cache is None:
            return self._plain(q_nope, q_pe, c_kv, k_pe, start_pos)
        end = start_pos + T
        cache.kv[:B, start_pos:end] = c_kv.to(cache.kv.dtype)
        cache.pe[:B, start_pos:end] = k_pe.to(cache.pe.dtype)
        return self._absorbed(q_nope, q_pe, cache.kv[:B, :end], cache.pe[:B, :end], start_pos)

    def _plain(self, q_nope, q_pe, c_kv, k_pe, start_pos: int) -> torch.Tensor:
        assert start_pos == 0, "the plain path attends within one chunk; decode with a cache"
        B, T, H, _ = q_nope.shape
        k_nope, v = self.kv_b_proj(c_kv).view(B, T, H, -1).split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(B, T, H, self.rope_dim)], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if torch.are_deterministic_algorithms_enabled():  # train.deterministic
            o = padded_flash_attention(q, k, v, self.softmax_scale)
        else:
            with sdpa_kernel(SDPA_PRIORITY, set_priority=True):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale)
        return self.output(o.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def _absorbed(self, q_nope, q_pe, kv, pe, start_pos: int) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, kv.to(q_latent.dtype))
                  + torch.einsum("bthr,bsr->bhts", q_pe, pe.to(q_pe.dtype))).float() * self.softmax_scale
        S = kv.shape[1]
        if T > 1:  # query t (absolute start_pos + t) sees keys s <= start_pos + t
            allowed = torch.arange(S, device=kv.device)[None, :] <= torch.arange(start_pos, start_pos + T, device=kv.device)[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = scores.softmax(dim=-1).to(kv.dtype)
        o_latent = torch.einsum("bhts,bsc->bthc", probs, kv)
        o = torch.einsum("bthc,hdc->bthd", o_latent.to(w_uv.dtype), w_uv)
        return self.output(o.reshape(B, T, H * self.v_dim).to(q_nope.dtype))


# --------------------------------------------------------------------------------------------
# MLA <-> MLA-o conversion


@torch.no_grad()
def split_output_projection(attn: MLA, o_latent_dim: int, init: str = "svd") -> float:
    """Replace attn.o_proj by o_a_proj -> o_b_proj of width o_latent_dim; returns the relative
    Frobenius error of the new product against o_proj (0 for svd at full rank).

    `svd` takes the best rank-o approximation U_r S_r V_r^T, split as (U_r sqrt S_r)(sqrt S_r V_r^T);
    `xavier` starts both factors from xavier-uniform, as the MLA-o prototype did.
    """
    w = attn.o_proj.weight  # [dim, heads*v]
    out_dim, in_dim = w.shape
    o_a = nn.Linear(in_dim, o_latent_dim, bias=False, device=w.device, dtype=w.dtype)
    o_b = nn.Linear(o_latent_dim, out_dim, bias=False, device=w.device, dtype=w.dtype)
    if init == "svd":
        U, S, Vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = min(o_latent_dim, S.numel())
        root = S[:r].sqrt()
        o_a.weight.zero_()
        o_b.weight.zero_()
        o_a.weight[:r] = (root[:, None] * Vh[:r]).to(w.dtype)
        o_b.weight[:, :r] = (U[:, :r] * root[None, :]).to(w.dtype)
    elif init == "xavier":
        nn.init.xavier_uniform_(o_a.weight)
        nn.init.xavier_uniform_(o_b.weight)
    else:
        raise ValueError(f"init: {init!r} is not one of 'svd', 'xavier'")
    error = ((o_b.weight.double() @ o_a.weight.double() - w.double()).norm() / w.double().norm()).item()
    del attn.o_proj
    attn.o_a_proj, attn.o_b_proj = o_a, o_b
    return error


@torch.no_grad()
def fold_output_projection(attn: MLA) -> None:
    """Replace o_a_proj -> o_b_proj by the single o_proj equal to their product (exact)."""
    w = attn.o_b_proj.weight.double() @ attn.o_a_proj.weight.double()
    o = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=attn.o_a_proj.weight.dtype)
    o.weight.copy_(w)
    del attn.o_a_proj, attn.o_b_proj
    attn.o_proj = o
