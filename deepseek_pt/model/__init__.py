"""The DeepSeek-V3 model: MLA (+ MLA-o), MoE, MTP."""
from .layers import RMSNorm, SwiGLU
from .mla import MLA, MLACache
from .moe import MoE, Gate
from .transformer import Block, MTPModule, Transformer, to_output_subspace, to_plain_output, writable

__all__ = ["RMSNorm", "SwiGLU", "MLA", "MLACache", "MoE", "Gate", "Block", "MTPModule", "Transformer",
           "to_output_subspace", "to_plain_output", "writable"]
