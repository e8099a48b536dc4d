"""The DeepSeek-V3 decoder: pre-norm blocks of MLA + (dense SwiGLU | MoE), optional MTP modules."""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .layers import RMSNorm, SwiGLU
from .mla import MLA, MLACache, fold_output_projection, split_output_projection
from .moe import MoE
from .rope import inv_frequencies


def writable(*params: nn.Parameter):
    """Context in which `params` can be overwritten in place. Parameters built partitioned (ZeRO-3's
    deepspeed.zero.Init, parallel.zero_init) are gathered for its duration, and rank 0's values become every rank's
    on the way out; plain ones need nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=0)


@contextlib.contextmanager
def _no_default_init():
    """nn.Linear's and nn.Embedding's own initialization skipped while the model is built: reset_parameters draws
    every weight again (none has a bias). Drawn for nothing, it took 40% of the build of DeepSeek-V3's shape-only
    model (preflight, `params`), whose meta tensors draw in Python: 4.7-6.0 s with it, 2.8-3.8 s without."""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


class _Draws:
    """Initial weights from generators of their own (one per device), seeded with the global seed: they do not depend
    on what construction drew before (nn.Linear's default init, run in bf16 when deepspeed.zero.Init builds the model
    in bf16), and they are drawn in fp32 whatever the weight's dtype (the generator yields other numbers for bf16)."""

    def __init__(self, seed: int):
        self.seed, self.generators = seed, {}

    def __call__(self, weight: torch.Tensor, init: Callable, **kwargs) -> None:
        if weight.device not in self.generators:
            self.generators[weight.device] = torch.Generator(weight.device).manual_seed(self.seed)
        kwargs["generator"] = self.generators[weight.device]
        if weight.dtype == torch.float32:
            init(weight, **kwargs)
        else:
            weight.copy_(init(torch.empty(weight.shape, dtype=torch.float32, device=weight.device), **kwargs))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = MLA(config)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MoE(config) if moe else SwiGLU(config.dim, config.inter_dim)

    def forward(self, x: torch.Tensor, cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        x = self.attention_residual(x, cache, start_pos)
        return self.mlp_residual(x)

    # The two halves are separate methods so that the engine can compile them apart (train.compile_blocks):
    # DeepSpeed AutoEP's MoE layer, with its host-side split plans and collectives, stays eager.
    def attention_residual(self, x: torch.Tensor, cache: MLACache | None = None, start_pos: int = 0) -> torch.Tensor:
        return x + self.self_attn(self.input_layernorm(x), cache, start_pos)

    def mlp_residual(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """DeepSeek-V3 multi-token prediction depth k: combines the previous depth's hidden state at i with
    the embedding of token i+k, runs one block, and predicts token i+k+1 through the shared head. The
    hidden states passed between depths are normed ones (the main model's after its final norm, depth k's
    after its own), as transformers, vLLM, SGLang and Megatron-Core run DeepSeek-V3's MTP weights: a model
    trained on the state before the norm would draft poorly there."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(config.dim, config.norm_eps)
        self.hnorm = RMSNorm(config.dim, config.norm_eps)
        self.eh_proj = nn.Linear(2 * config.dim, config.dim, bias=False)
        self.block = Block(config, moe=config.moe.n_dense_layers < config.n_layers)
        self.norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.block(self.eh_proj(torch.cat([self.hnorm(h_prev), self.enorm(emb)], dim=-1)))


class Transformer(nn.Module):
    """`model(input_ids)` -> logits [B, T, vocab]; `model(input_ids, targets)` -> scalar training loss
    (next-token CE + MTP + sequence balance terms; the parts are in `model.last_losses`)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = copy.deepcopy(config)
        with _no_default_init():
            self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config, moe=i >= config.moe.n_dense_layers)
                                        for i in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.mtp_depth))
        # Set by `recompute_in_backward` (activation checkpointing): the checkpoint function, and which blocks.
        self.checkpoint_fn: Callable | None = None
        self.recomputed: frozenset[int] = frozenset()
        self.last_losses: dict[str, float] = {}
        self.reset_parameters()
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.embed_tokens.weight.is_meta:  # shape-only model (parameter counting): nothing to fill
            return
        std = self.config.init_std
        draw = _Draws(torch.initial_seed())
        # One module at a time: a partitioned model (parallel.zero_init) is never whole on one rank.
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with writable(module.weight):
                    draw(module.weight, nn.init.normal_, mean=0.0, std=std)
        for moe in self.moe_layers():
            with writable(moe.gate.weight):
                draw(moe.gate.weight, nn.init.normal_, mean=0.0, std=std)
        if self.config.attention.use_output_subspace and self.config.attention.o_init == "xavier":
            for layer in self.attention_layers():
                with writable(layer.o_a_proj.weight, layer.o_b_proj.weight):
                    draw(layer.o_a_proj.weight, nn.init.xavier_uniform_)
                    draw(layer.o_b_proj.weight, nn.init.xavier_uniform_)

    @torch.no_grad()
    def reset_rope(self) -> None:
        """Set every attention layer's RoPE frequencies again, in fp32, as computed: `model.to(bf16)` rounds them, and
        deepspeed.zero.Init computes them in bf16 (off by up to 0.4%: at position 4096 an angle turns by radians)."""
        inv_freq, _ = inv_frequencies(self.config.attention)
        for layer in self.attention_layers():
            layer.inv_freq = inv_freq.to(layer.inv_freq.device, copy=True)  # one buffer per layer, as built

    def attention_layers(self) -> list[MLA]:
        return [m for m in self.modules() if isinstance(m, MLA)]

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def recompute_in_backward(self, checkpoint_fn: Callable, layers: Iterable[int] | None = None) -> None:
        """Run blocks `layers` (all if None) through `checkpoint_fn(block, h)` while training: their activations
        are recomputed in backward rather than kept."""
        self.checkpoint_fn = checkpoint_fn
        self.recomputed = frozenset(range(len(self.layers)) if layers is None else layers)

    def _run_block(self, i: int, h: torch.Tensor) -> torch.Tensor:
        block = self.layers[i]
        return self.checkpoint_fn(block, h) if i in self.recomputed and self.training else block(h)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None,
                caches: list[MLACache] | None = None, start_pos: int = 0) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for i, block in enumerate(self.layers):
            h = block(h, caches[i], start_pos) if caches is not None else self._run_block(i, h)
        h = self.norm(h)
        if targets is None:
            return self.lm_head(h)
        losses = {"lm_loss": self.token_loss(self.lm_head(h), targets)}
        total = losses["lm_loss"]
        if len(self.mtp):
            # Depth k sees positions [0, T-k): the previous depth's normed hidden state there, the embedding
            # of the input token k ahead, and predicts targets k ahead.
            T, mtp_losses = input_ids.shape[1], []
            for k, module in enumerate(self.mtp, start=1):
                h = module.norm(module(h[:, : T - k], self.embed_tokens(input_ids[:, k:])))
                mtp_losses.append(self.token_loss(self.lm_head(h), targets[:, k:]))
            losses["mtp_loss"] = torch.stack(mtp_losses).mean()
            total = total + self.config.mtp_loss_weight * losses["mtp_loss"]
        # The sequence-wise balance losses of our MoE blocks, or of AutoEP's layers in their place (engine/balance.py)
        aux = [m.aux_loss for m in self.modules() if getattr(m, "aux_loss", None) is not None]
        if aux:
            losses["balance_loss"] = torch.stack(aux).sum()
            total = total + losses["balance_loss"]
        self.last_losses = {k: v.detach() for k, v in losses.items()}
        return total

    def token_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy in fp32 over targets that are not -100. A method so that the engine can compile it
        (train.compile_blocks): fused, the fp32 copy of the logits is never written to memory."""
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)

    def new_caches(self, batch: int, max_len: int, dtype=torch.float32, device=None) -> list[MLACache]:
        return [MLACache.empty(self.config, batch, max_len, dtype, device) for _ in self.layers]


def to_output_subspace(model: Transformer, o_latent_dim: int, init: str = "svd") -> list[float]:
    """Convert every MLA of `model` to MLA-o of width o_latent_dim; returns each layer's relative error."""
    if model.config.attention.use_output_subspace:
        raise ValueError("model already uses MLA-o (model.attention.use_output_subspace is true)")
    errors = [split_output_projection(attn, o_latent_dim, init) for attn in model.attention_layers()]
    model.config.attention.use_output_subspace, model.config.attention.o_latent_dim = True, o_latent_dim
    return errors


def to_plain_output(model: Transformer) -> None:
    """Convert every MLA-o of `model` back to a single o_proj (their exact product)."""
    if not model.config.attention.use_output_subspace:
        raise ValueError("model does not use MLA-o (model.attention.use_output_subspace is false)")
    for attn in model.attention_layers():
        fold_output_projection(attn)
    model.config.attention.use_output_subspace, model.config.attention.o_latent_dim = False, None
