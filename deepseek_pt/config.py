"""Typed run configuration: YAML -> dataclasses, dotted overrides, validation with key paths.

Every field is documented where it is declared. `load_config(path, overrides)` is the one way in:
unknown keys, wrong types and impossible values raise `ConfigError` naming the file and the full
key path (e.g. `configs/smoke.yaml: model.moe.top_k: 9 > model.moe.n_routed_experts (8)`).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .fileio import NestedTooDeeply, atomic_write_text, check_nesting


class ConfigError(ValueError):
    """A bad configuration value; the message names the source and the key path."""


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class RopeConfig:
    theta: float = 10000.0
    """Base of the rotary frequencies."""
    scaling: Literal["none", "yarn"] = "none"
    """`yarn` stretches the low frequencies for long context (DeepSeek-V2/V3)."""
    factor: float = 1.0
    """YaRN: context extension factor."""
    original_max_position_embeddings: int = 4096
    """YaRN: context length the frequencies were trained for."""
    beta_fast: float = 32.0
    """YaRN: rotations above which a frequency is kept as is."""
    beta_slow: float = 1.0
    """YaRN: rotations below which a frequency is fully interpolated."""
    mscale: float = 1.0
    """YaRN: magnitude scale of the rotary embedding."""
    mscale_all_dim: float = 0.0
    """YaRN: softmax-scale correction; the attention scale is multiplied by mscale(factor, this)^2."""


@dataclass
class AttentionConfig:
    n_heads: int = 16
    """Number of attention heads."""
    q_lora_rank: int = 0
    """Rank of the low-rank query path (q_a_proj -> RMSNorm -> q_b_proj); 0 = full-rank q_proj."""
    kv_lora_rank: int = 512
    """Rank of the joint key/value compression: the latent that the decode cache stores."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dimension without rotary embedding."""
    qk_rope_head_dim: int = 64
    """Per-head query dimension with rotary embedding; the rotary key is shared across heads."""
    v_head_dim: int = 128
    """Per-head value dimension."""
    use_output_subspace: bool = False
    """MLA-o: split the output projection into o_a_proj (heads*v -> o_latent_dim) -> o_b_proj."""
    o_latent_dim: int | None = None
    """MLA-o latent width; required when use_output_subspace is on, positive and below n_heads x v_head_dim (the
    attention output o_proj projects: a latent that wide saves nothing and adds parameters)."""
    o_init: Literal["normal", "xavier"] = "normal"
    """MLA-o init of a fresh model: `normal` (std from model.init_std) or `xavier` (the prototype's)."""
    rope: RopeConfig = field(default_factory=RopeConfig)


@dataclass
class MoEConfig:
    n_routed_experts: int = 64
    """Routed experts per MoE layer; at most 131,072 over all MoE layers and MTP depths (MAX_ROUTED_EXPERTS)."""
    n_shared_experts: int = 2
    """Shared experts (always active), fused into one SwiGLU of width n_shared * expert_inter_dim."""
    top_k: int = 6
    """Routed experts per token."""
    expert_inter_dim: int = 1408
    """Hidden width of one expert's SwiGLU."""
    n_expert_groups: int = 1
    """Experts are split into this many groups for group-limited routing."""
    n_limited_groups: int = 1
    """Each token routes within its best this-many groups."""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """Affinity function: sigmoid (V3) or softmax (V2)."""
    norm_topk_prob: bool = True
    """Normalise the selected experts' weights to sum to one."""
    route_scale: float = 1.0
    """Routed scaling factor applied to the gating weights."""
    n_dense_layers: int = 1
    """The first this-many layers use a dense SwiGLU instead of MoE."""
    bias_update_rate: float = 0.001
    """Auxiliary-loss-free balancing step u: bias += u * sign(mean_load - load); 0 disables."""
    seq_aux_loss_alpha: float = 0.0
    """Weight of the complementary sequence-wise balance loss (DeepSeek-V3: 0.0001), computed on DeepSpeed AutoEP's
    layers too (engine/balance.py); 0 disables."""


@dataclass
class ModelConfig:
    vocab_size: int = 32000
    """Vocabulary size; the tokenizer's vocabulary must fit."""
    dim: int = 2048
    """Hidden size."""
    inter_dim: int = 10944
    """Hidden width of the dense SwiGLU layers."""
    n_layers: int = 4
    """Transformer blocks; at most 1024 (MAX_LAYERS)."""
    max_seq_len: int = 4096
    """Longest sequence the rotary tables are built for."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    init_std: float = 0.006
    """Std of the normal init of every weight matrix (DeepSeek-V3 uses 0.006)."""
    tie_embeddings: bool = False
    """Share the embedding and output head weights."""
    mtp_depth: int = 0
    """Multi-token prediction modules (DeepSeek-V3 MTP); 0 disables. Depth 1 reads the main model's hidden state
    after its final norm, depth k+1 depth k's after its own, as transformers, vLLM and Megatron-Core run them."""
    mtp_loss_weight: float = 0.3
    """Weight lambda of the averaged MTP losses."""
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)


# --------------------------------------------------------------------------------------------
# Run


@dataclass
class DataSource:
    """One dataset of a blend (data.blend)."""
    path: str
    """Directory holding manifest.json and the token shards."""
    weight: float = 1.0
    """This source's share of the training samples: weight / the sum of the blend's weights."""
    name: str | None = None
    """Label of its evaluation loss (eval_loss/NAME); default the directory's name."""

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


@dataclass
class DataConfig:
    path: str | None = None
    """Directory holding manifest.json and the token shards (built by data_prep/build_shards.py). Training needs it
    or data.blend."""
    blend: list[DataSource] = field(default_factory=list)
    """Train on several shard directories built with one tokenizer, each sample read from source j with share
    weight_j / sum(weights), interleaved evenly (a fixed pattern, not a draw). Each source keeps its own shuffled
    order (data.seed mixed with its index) and is re-read in a new order when exhausted. Evaluation reports each
    source's data.val_split loss (eval_loss/NAME) and their weighted mean (eval_loss). A checkpoint saved on another
    blend resumes only with data.resume_on_new_data."""
    seq_len: int = 2048
    """Training sequence length (each sample reads seq_len + 1 tokens)."""
    seed: int = 1234
    """Seed of the sample order."""
    verify_checksums: bool = False
    """Hash the shards against their manifest when training starts: data.train_split's, and data.val_split's when
    train.eval_every is set (file sizes are always checked). A node's processes share the hashing: each node reads
    its copy once."""
    train_split: str = "train"
    """Manifest split to train on."""
    val_split: str = "val"
    """Manifest split to evaluate on; not data.train_split while train.eval_every is set."""
    resume_on_new_data: bool = False
    """Resume a checkpoint saved on other training data (other sources, shards or blend weights; data.seed and
    data.seq_len must stay): from the checkpoint's sample count on, each source it trained on (the same shards)
    continues its own order where it stopped and a new one starts at its beginning. False refuses such a resume,
    naming what changed."""

    def sources(self) -> list[DataSource]:
        """What training reads: data.blend's sources, or data.path alone (weight 1); none when neither is set."""
        if self.blend:
            return list(self.blend)
        return [DataSource(self.path)] if self.path is not None else []

    def source_key(self, j: int) -> str:
        """Config key of source j's directory, for errors."""
        return f"data.blend[{j}].path" if self.blend else "data.path"


@dataclass
class TrainConfig:
    micro_batch_size: int = 4
    """Sequences per rank per micro-step."""
    grad_accum_steps: int = 1
    """Micro-steps per optimizer step (once a batch_rampup_tokens ramp is over)."""
    batch_rampup_tokens: int = 0
    """Ramp the global batch up over the run's first this many tokens (all ranks), as DeepSeek-V3 did (3072 to
    15360 sequences over 469B tokens): each optimizer step's micro-steps rise from batch_rampup_start to
    grad_accum_steps, one more each time an equal share of these tokens has been trained on
    (engine/batch_rampup.py); the learning-rate schedule goes by lr_schedule_unit. 0 = no ramp."""
    batch_rampup_start: int = 1
    """Micro-steps per optimizer step at the start of a batch_rampup_tokens ramp; below grad_accum_steps."""
    max_steps: int = 1000
    """Optimizer steps of the whole run (the LR schedule spans these)."""
    exit_at_step: int | None = None
    """Checkpoint and exit 0 at this step (for chained jobs); null = run to max_steps."""
    exit_after_minutes: float | None = None
    """Checkpoint and exit 0 once this much wall time has passed (a job near its time limit)."""
    resume: str = "auto"
    """`auto` = the newest complete checkpoint in run.dir if any; `none` = start fresh; or a checkpoint path. A start
    from step 0 is refused while run.dir holds complete checkpoints (its saves would overwrite and prune them)."""
    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate the decay ends at: that of step max_steps, the run's last."""
    warmup_steps: int = 100
    """Linear warmup steps: step k of them trains at lr x k / warmup_steps, the last at lr. At most max_steps (the
    rate would never reach lr)."""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """Decay after warmup: cosine, warmup-stable-decay, or constant."""
    wsd_decay_fraction: float = 0.1
    """WSD: fraction of max_steps spent in the final decay."""
    wsd_decay_shape: Literal["linear", "cosine"] = "linear"
    """WSD: the final decay's shape, a straight line to min_lr or a cosine half-period (DeepSeek-V3 held 2.2e-4 to
    10T tokens, then followed a cosine to 2.2e-5 over 4.3T)."""
    lr_schedule_unit: Literal["steps", "tokens"] = "steps"
    """The schedule's clock (engine/lr_schedule.py). `steps`: optimizer steps. `tokens`: tokens trained, in
    full batches' worth (grad_accum_steps micro-steps of every process): warmup_steps counts full batches of
    tokens, and the decay ends with the run's last step. The same schedule without a batch ramp; under one, the
    ramp's small steps move the rate less (Megatron's sample-based schedule). Skipped steps move neither clock."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases and embeddings)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    max_nonfinite_steps: int = 10
    """Optimizer steps in a row with a non-finite loss or gradient norm after which training stops with an error
    and no new checkpoint (a diverged run would otherwise go on to max_steps doing nothing); 0 never stops. ZeRO's
    step skips each such step: weights, moments, balancing biases and the LR schedule stay as they were."""
    seed: int = 42
    """Seed of the model init and every other RNG."""
    activation_checkpointing: bool | list[int] = False
    """Recompute blocks' activations in backward instead of keeping them: true for every block, or a list of
    block indices (e.g. only the MoE blocks, whose expert activations dominate memory)."""
    compile: bool = False
    """torch.compile the pointwise pieces (RMSNorm, RoPE, SwiGLU activation) into fused kernels."""
    compile_blocks: bool = False
    """torch.compile each transformer block's attention half (norm, MLA, residual), its MLP half where that is a
    dense SwiGLU, and the token loss (fp32 cross-entropy fused: no fp32 logits in memory); DeepSpeed AutoEP's MoE
    layer stays eager. Under ZeRO-3 this needs parallel.zero_leaf_blocks, so that no DeepSpeed hook runs inside a
    compiled half."""
    compile_deterministic: bool = False
    """Let torch.compile choose its kernels' launch configurations without timing candidates on the device
    (Inductor's deterministic mode). The timed choice, and with it the order of a reduction's sums, depends on what
    else the GPU is doing while the run compiles: on an H200 the same bf16 run, compiled beside different runs,
    ended 1.8% apart in mean train loss over the second half of 580 steps, and with this set it matched to the bit
    alone and beside another run. That holds on one machine: on two H100 machines the same bf16 runs parted within
    their first two steps (one in the seventh digit of its first loss) and ended 0.2-0.3% apart (docs/benchmarks.md).
    For comparisons between runs (ablations, loss checks); it costs whatever speed the timed choice would have found
    (bench-2b: -1.7% in one call, within the noise between identical cases)."""
    deterministic: bool = False
    """Runs that repeat to the bit on one GPU machine: torch.use_deterministic_algorithms(True), cuBLAS's fixed
    workspace (CUBLAS_WORKSPACE_CONFIG=:4096:8, set for the process unless the environment sets it) and Inductor's
    deterministic mode (train.compile_deterministic). Attention then runs FlashAttention-2's deterministic backward on
    v zero-padded to q/k's width, where cuDNN's backward sums the query's gradient in an order that varies between
    launches (on an H100, 34 of bench-2b's values differed between two backward passes). An op with no deterministic
    kernel raises, naming itself. On an H100, bench-2b bf16: a run, its stop-and-resume and a universal-load resume
    logged the same losses and gradient norms to the bit, at 0.82x the default's tokens/s (0.62x at seq 8192;
    docs/benchmarks.md)."""
    eval_every: int = 0
    """Evaluate on the val split every this many steps (and at the end); 0 disables."""
    eval_sequences: int = 256
    """Sequences in one evaluation: the val split's first eval_sequences (all of them if it holds fewer), the same
    set on any number of processes, which share it out in micro-batches (eval_loss is their mean per token)."""
    save_every: int = 0
    """Checkpoint every this many steps; 0 = only at exit points."""
    checkpoints: bool = True
    """Write checkpoints (every save_every steps, at exit points and at the end). false for runs nothing will resume,
    such as benchmarks and loss comparisons: no time or disk spent on them (a 2B-parameter model's is 22 GB)."""
    keep_last: int = 3
    """Checkpoints to keep; older ones are deleted once a newer one is complete (but for keep_every's)."""
    keep_every: int = 0
    """Also keep, whatever keep_last says, every checkpoint whose step is a multiple of this: milestones to evaluate
    or to restart from later. A multiple of save_every, which puts checkpoints on those steps; 0 = none."""
    log_every: int = 1
    """Console refresh interval in steps (metrics.jsonl gets every step)."""
    init_from: str | None = None
    """Export directory (deepseek_pt.export, e.g. from `convert hf-to-ds`) whose weights start a fresh
    run: continued pretraining. Ignored when resuming from a checkpoint."""
    profile_start_step: int = 0
    """First optimizer step to trace with torch.profiler (CPU ops, and CUDA kernels on a GPU); 0 = none. Every rank
    writes run.dir/profile/step_A-B/rank_R.json.gz (Perfetto, chrome://tracing) and rank_R.txt (its ops by time);
    the step before runs under the profiler untraced (engine/profiling.py). A trace is large: a few steps."""
    profile_steps: int = 1
    """Optimizer steps traced from profile_start_step."""
    peak_tflops: float | None = None
    """Per-device peak for MFU; null = the GPU's dense bf16 peak by name (none on CPU: MFU is null)."""

    @property
    def wsd_decay_start(self) -> int:
        """Schedule wsd's last step at lr: its decay to min_lr takes the steps after it (at least one)."""
        return self.max_steps - max(1, round(self.wsd_decay_fraction * self.max_steps))


@dataclass
class ParallelConfig:
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage: 1 partitions the optimizer state, 2 the gradients too, 3 the parameters too; all three
    train to the same losses. 0 (no ZeRO) is for fp32 only (engine/no_zero_step.py gives it ZeRO's clip and skip)."""
    expert_parallel_size: int = 1
    """Ranks one MoE layer's routed experts are split over (DeepSpeed AutoEP); must divide them."""
    overlap_comm: bool = True
    """Overlap ZeRO-3 gathers/reductions with compute."""
    zero_persistence_threshold: int = 100_000
    """ZeRO-3: parameters of fewer elements stay gathered between steps (DeepSpeed's
    stage3_param_persistence_threshold). On one or a few GPUs, a large value skips re-gathering."""
    zero_init: bool = False
    """ZeRO-3: build the model already partitioned (deepspeed.zero.Init), so that each rank holds 1/world of the
    parameters from the start instead of a full fp32 copy in host memory (4 bytes x parameters per process:
    DeepSeek-V3's 671B would need 2.7 TB on every rank). Needed once a node cannot hold a full model per process.
    Each module's parameters are drawn in turn, on rank 0, on the training device: on a GPU its random generator
    gives another (equally distributed) initialization than the same seed on the CPU."""
    zero_leaf_blocks: bool = True
    """ZeRO-3: fetch, release and reduce each transformer block's parameters as one unit (a DeepSpeed leaf
    module) instead of hooking every linear and norm inside it: far fewer Python hooks per step, one
    gather per block. Turn off only to measure the difference."""
    zero_memory_efficient_linear: bool = False
    """ZeRO-3: let DeepSpeed replace torch.nn.functional.linear, process-wide, with its autograd.Function
    (memory_efficient_linear), which binds every call's arguments through inspect.signature on the host. Off, the
    default: on bench-2b the step ran 0.8% and 1.9% faster in two interleaved pairs, with the same loss and peak
    memory (docs/benchmarks.md)."""
    zero_fused_step: bool = True
    """ZeRO-3: our optimizer step in place of DeepSpeed's (engine/zero3_step.py): the gradient norm in one pass per
    sub-group over ZeRO-3's flat gradient buffer, then the clip, the skip of a non-finite step and AdamW in one
    more, reading the bf16 gradients and writing the bf16 weights too; one host sync of its own per step
    (DeepSpeed's step had 15). Same update, same skipped steps, same optimizer state; false runs DeepSpeed's own."""
    zero_keep_params_gathered: bool = True
    """ZeRO-3 with zero_fused_step, where every parameter is persistent and partitioned over one rank (one GPU, or a
    CPU run of one process): the optimizer step leaves the parameters gathered, as views of their partitions that
    the update writes, instead of releasing every one and gathering them again as DeepSpeed's step does, a walk in
    Python over the parameters while the GPU idles (engine/zero3_step.py): +2.2-3.5% tokens/s at one micro-step per
    step, +0.3% at 16, on bench-2b on an H200 (docs/benchmarks.md). Where partitions span ranks nothing changes.
    false keeps DeepSpeed's release and re-gather, to measure the difference."""
    zero_idle_hooks_off: bool = True
    """ZeRO-3: when every parameter is persistent (none larger than zero_persistence_threshold), remove DeepSpeed's
    per-module fetch/release hooks, which then gather and release nothing but still cost host time on every
    module's forward and backward (engine/zero3_hooks.py). false keeps them, to measure the difference."""
    coalesce_grad_reduction: bool = False
    """With train.grad_accum_steps > 1: reduce gradients once per optimizer step (DeepSpeed's
    coalesce_grad_reduction) instead of after every micro-step's backward. Saves ZeRO's per-micro-step reduce
    work (9% faster at 4 micro-steps on the bench shape, docs/benchmarks.md), at two costs: micro-step
    gradients add up on the parameters' .grad in their compute dtype (bf16 under precision bf16/fp8, where the
    default adds them into fp32 partitions), and every rank holds a full unpartitioned gradient until the step."""
    expert_grads_in_place: bool = True
    """Under coalesce_grad_reduction, AutoEP's routed experts add each micro-step's weight gradients into .grad
    where their backward computes them (engine/expert_grads.py; on a GPU in the epilogue of a Triton grouped GEMM,
    engine/grouped_wgrad.py) instead of autograd adding them in a pass of its own: +2.3% bf16, +2.8% FP8 tokens/s on
    bench-2b on an H200 (docs/benchmarks.md). false keeps autograd's add, to measure the difference; without
    coalesced reduction it has no effect."""
    expert_triton_gemms: bool = True
    """AutoEP's routed experts run their forward and input-gradient GEMMs (Hopper or later GPUs) through a Triton
    kernel that tiles each expert's rows alone (engine/grouped_mm.py), the gate and up projections as one kernel
    with the SwiGLU in its epilogue, and sum the gate's and the up projection's input gradients inside it, instead
    of torch._grouped_mm, whose CUTLASS tiles pad each expert's rows far: on
    bench-2b on an H200 0.74 ms less GPU time per micro-step, +1.2% tokens/s at 16 micro-steps per step, +1.0% at
    one (docs/benchmarks.md). FP8 experts (fp8.experts) take the same kernel with e4m3 operands in place of
    torch._scaled_grouped_mm: +1.6-1.7%. false keeps torch's GEMMs, to measure the difference; CPU runs take them
    either way."""
    linear_grads_in_place: bool = True
    """Under coalesce_grad_reduction, the plain linear layers (attention, dense and shared-expert MLPs, router, output
    head; not torchao's FP8 ones) add each micro-step's weight gradient into .grad in their weight-gradient GEMM
    (cuBLAS with beta = 1, engine/linear_grads.py) instead of autograd adding a new gradient onto .grad in a pass of
    its own: +0.6% bf16, +0.4% FP8 tokens/s on bench-2b on an H200 (docs/benchmarks.md). false keeps autograd's
    add, to measure the difference; without coalesced reduction it has no effect."""
    fused_moe_dispatch: bool = True
    """Where a MoE layer's experts are all local (expert_parallel_size 1), gather its tokens straight into the
    experts' padded groups and sum their output straight back into tokens, each backward a gather of the other
    direction, instead of AutoEP's four passes over the routed rows (a gather whose backward sorts, a permute, its
    inverse, the top-k sum): engine/moe_dispatch.py. The same rows reach the experts and the same sums come back;
    +4% bf16 and FP8 tokens/s on bench-2b on an H200 (docs/benchmarks.md). false keeps AutoEP's forward, to measure
    the difference; layers with expert parallelism always keep it."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend; auto = nccl on GPU, gloo on CPU."""
    timeout_minutes: float | None = None
    """How long a collective waits for the slowest rank before the job fails, so that a dead or hung rank ends
    the run instead of stalling it; null = DeepSpeed's default ($DEEPSPEED_TIMEOUT, else 10 minutes). Raise it
    if a checkpoint save or an evaluation on some ranks can outlast it."""
    heartbeat_timeout_minutes: float | None = 3.0
    """How long rank 0 hears nothing from a rank (each rank's failure watch beats a counter in the rendezvous store
    every 5 s, from a thread of its own) before it stops every rank with a line naming it: a machine lost or a rank
    killed with no rank beside it to see it go (engine/peer_failure.py) ends the run in this long, not in
    timeout_minutes, which a slow save may need long. A rank that hangs still beats; null = no heartbeat."""


@dataclass
class Fp8Config:
    recipe: Literal["tensorwise", "rowwise", "rowwise_with_gw_hp", "blockwise"] = "tensorwise"
    """Scaling of the attention, dense and shared-expert linears: torchao float8 per tensor or per row (GPU
    FP8 GEMMs, or on a CPU torch's CPU FP8 GEMMs, for numerics; `rowwise_with_gw_hp` is rowwise with the
    weight-gradient GEMM kept in bf16), or DeepSeek-V3's
    1x128 / 128x128 blocks: real FP8 GEMMs on a Hopper GPU with torchao and Triton (for the linears whose
    dimensions are multiples of 128), emulated in fp32 elsewhere (numerics, not speed). Tensorwise is the
    fastest on an H200 at bench-2b's and DeepSeek-V3's widths. Its loss: within 1% of bf16's on bench-2b's layout;
    at DeepSeek-V3's widths +1.02%, -0.05% and +0.91% of the same seed's bf16 over three seeds on an H200 (mean
    +0.63%), where bf16 itself moved 0.8-1.7% between seeds; seed 2 on an H100, with later code, +2.02%
    (docs/benchmarks.md)."""
    layers: Literal["auto", "all"] = "auto"
    """Which of those linears go FP8: `auto` only the ones wide enough that FP8's faster GEMMs outweigh its casts
    (engine/fp8.py's fp8_gemm_pays), `all` every one (DeepSeek-V3's blockwise recipe quantizes all). On a
    narrow model `auto` may convert none: the run says so and trains in bf16."""
    fast_accum: Literal["forward", "all"] = "forward"
    """Which of torchao's FP8 GEMMs (tensorwise and rowwise recipes) accumulate with the tensor cores' fast
    accumulation: `forward` only, as torchao and TransformerEngine do by default (the two backward GEMMs then
    take a slower kernel that promotes partial sums to fp32), or `all` three; `all` also puts fast accumulation in
    the FP8 weight gradients of fp8.linear_weight_grads (at V3 widths there, the loss +1.54%, -0.28% and +1.21% of
    bf16's over three seeds, against -0.61%, +0.04% and +1.97% without it: docs/benchmarks.md). The forward and
    input-gradient GEMMs of fp8.experts, fp8.shared_experts, fp8.attention and fp8.dense_mlp always use it."""
    experts: bool = False
    """Also run the routed experts' grouped GEMMs in FP8 (engine/fp8_experts.py): forward and input-gradient GEMMs
    rowwise scaled e4m3 (on parallel.expert_triton_gemms's Triton kernel, or torch._scaled_grouped_mm), weight
    gradients in bf16, whatever `recipe` says for the linears. Needs the experts in DeepSpeed AutoEP, model.dim
    and model.moe.expert_inter_dim multiples of 16, and
    a Hopper GPU (emulated on a CPU); costs 2 bytes per local routed-expert parameter (the FP8 weights, cast once
    per optimizer step)."""
    shared_experts: bool = False
    """Also run the shared experts' GEMMs in FP8 as fp8.experts runs the routed ones, the shared SwiGLU one expert
    that every token visits (engine/fp8_experts.py): forward and input-gradient GEMMs rowwise scaled e4m3, weights
    cast once per optimizer step, weight gradients bf16. torchao's recipes then leave these linears out (at
    bench-2b's widths `fp8.layers: auto` finds them too narrow for its casts). On bench-2b on an H200: 0.14-0.26 ms
    less GPU time per MoE layer and micro-step, +1.8% and +1.9% tokens/s in two of three interleaved pairs (-0.6% in
    the third), the loss within 0.23% of bf16's (docs/benchmarks.md). Needs model.dim and the shared width
    (model.moe.n_shared_experts x expert_inter_dim) multiples of 16, tokens per micro-step too, and a Hopper GPU
    (emulated on a CPU); costs 2 bytes per shared-expert parameter."""
    attention: bool = False
    """Also run the attention projections' GEMMs in FP8 (engine/fp8_linears.py): forward and input-gradient GEMMs
    rowwise scaled e4m3 on `torch._scaled_mm`, weights cast once per optimizer step, weight gradients bf16 (or FP8:
    fp8.linear_weight_grads), inside the compiled attention halves. torchao's recipes then leave these linears out (at
    bench-2b's widths `fp8.layers: auto` finds them too narrow for its casts). Projections with a dimension not a
    multiple of 16 stay bf16. On bench-2b on an H200: the compiled attention half's GPU time 1.92-1.97 ms against bf16's
    2.11-2.18 per layer and micro-step, +0.2%, +0.7% and +1.6% tokens/s in three interleaved pairs (a fourth +5.4%, its
    baseline slow), the train loss within 0.36% of bf16's (docs/benchmarks.md). Under ZeRO-3 needs
    parallel.zero_leaf_blocks, and a Hopper GPU (emulated on a CPU); costs 2 bytes per projection parameter."""
    dense_mlp: bool = False
    """Also run the dense layers' SwiGLU projections (gate, up, down) in FP8 as fp8.attention runs the attention's
    (engine/fp8_linears.py): forward and input-gradient GEMMs rowwise scaled e4m3, weights cast once per optimizer step,
    weight gradients bf16 (or FP8: fp8.linear_weight_grads), inside the compiled dense-MLP halves; torchao's recipes
    then leave them out. On bench-2b's dense layer on an H200 (2048 -> 10944 -> 2048, 8,192 tokens): the compiled MLP
    half's GPU time 3.94-4.18 ms against 4.40-4.52 with `fp8.layers: auto`'s tensorwise gate and up, and bf16's
    5.17-5.34; +0.5%, +0.1% and +1.6% tokens/s in three interleaved pairs; the train loss over the second half of 580
    steps -0.45% of bf16's, held-out loss +0.35% (docs/benchmarks.md). Needs a dense layer
    (model.moe.n_dense_layers > 0), under ZeRO-3 parallel.zero_leaf_blocks, and a Hopper GPU (emulated on a CPU);
    costs 2 bytes per dense-MLP parameter."""
    linear_weight_grads: Literal["bf16", "fp8", "fp8_rowwise"] = "bf16"
    """The weight-gradient GEMM of fp8.attention's and fp8.dense_mlp's linears (engine/fp8_linears.py): `bf16`, or
    `fp8`: one power-of-two scale per operand for the whole tensor, as torchao's tensorwise recipe scales its weight
    gradient (input e4m3, output gradient e5m2), fast accumulation only with fp8.fast_accum: all. The forward then
    keeps its input for the backward in FP8 (1 byte per value rather than 2). At DeepSeek-V3's dense widths on an H100
    (bench-v3-dense, with fp8.attention and fp8.dense_mlp): 1.34x bf16's tokens/s against 1.23x with bf16 weight
    gradients and torchao tensorwise's 1.28x, the train loss over 580 steps of real text -0.61%, +0.04% and +1.97%
    of bf16's over three seeds (torchao's tensorwise +2.02% on the third); with fp8.fast_accum: all 1.36x, the loss
    +1.54%, -0.28% and +1.21% (docs/benchmarks.md). `fp8_rowwise`: a scale per channel along the tokens (per input
    feature of the input, per output feature of the output gradient), both e4m3, as torchao's rowwise recipe scales
    its weight gradient: finer than one per tensor, for a pass over each operand to find its channels' amaxes (built
    for the third seed's +1.97%, where torchao's tensorwise measured +2.02%; not yet measured on a GPU). Needs
    fp8.attention or fp8.dense_mlp."""


@dataclass
class RunConfig:
    dir: str = "runs/default"
    """Run directory: resolved config (config.yaml), metrics.jsonl, checkpoints/, and the data's tokenizer
    (tokenizer.model + data.json, engine/run_tokenizer.py) that exports and the tools after training take."""
    name: str | None = None
    """Run name for logs and wandb; defaults to the run directory's name."""
    wandb: Literal["disabled", "online", "offline"] = "disabled"
    """Weights & Biases mode."""
    wandb_project: str = "deepseek_pt"
    """Weights & Biases project."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: Literal["fp32", "bf16", "fp8"] = "bf16"
    """Compute precision; master weights and optimizer state stay fp32. The fp8 section applies at fp8 only (set at
    bf16 or fp32, the start's log says it is ignored)."""
    fp8: Fp8Config = field(default_factory=Fp8Config)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check `value` against annotation `tp`, building nested dataclasses; ints widen to floats."""
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key}: expected a mapping, got {value!r}")
        return _build(tp, value, key, where)
    origin = typing.get_origin(tp)
    if origin is Literal:
        # the type too: True == 1 and 3.0 == 3, but a bool or a float is not a ZeRO stage
        if not any(type(value) is type(a) and value == a for a in typing.get_args(tp)):
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key}: expected {type_name(tp)}, got {value!r}")
        return [_convert(v, typing.get_args(tp)[0], f"{key}[{i}]", where) for i, v in enumerate(value)]
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for option in typing.get_args(tp):
            if option is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, option, key, where)
            except ConfigError:
                pass  # the next option may fit; the error below names them all
        raise ConfigError(f"{where}: {key}: expected {type_name(tp)}, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:  # an integer literal past 1.8e308: YAML reads it as an int, no float holds it
            raise ConfigError(f"{where}: {key}: must be a finite number, got {value}") from None
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value)
        except ValueError:
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key}: must be a finite number, got {value!r}")
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{where}: {key}: expected {type_name(tp)}, got {value!r}")
    if tp is int and not -2**63 <= value < 2**63:  # torch, numpy and DeepSpeed take int64 (an extra digit or ten)
        raise ConfigError(f"{where}: {key}: {value} does not fit in 64 bits")
    return value


# Keys of earlier versions, each with what a config sets instead.
REPLACED_KEYS = {
    "train.eval_batches": "train.eval_sequences, the count of sequences over all processes (the old key counted "
                          "micro-batches per process: eval_batches x micro_batch_size x processes sequences)",
}


def key_paths(cls: type, prefix: str = "") -> list[str]:
    """Every key path of the config dataclass `cls`, down to its leaves (a list, data.blend's, is one leaf)."""
    hints, paths = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        paths += key_paths(hints[f.name], path) if dataclasses.is_dataclass(hints[f.name]) else [path]
    return paths


def _suggestion(key: str, names: set[str], prefix: str) -> str:
    """", did you mean ...?" for an unknown key: a close spelling in its own section, else the same name in another
    section of the config (a key put under the wrong section); "" when neither."""
    if close := difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.7):
        return f", did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    elsewhere = [p for p in key_paths(Config) if p.rsplit(".", 1)[-1] == key]
    return f", did you mean {' or '.join(elsewhere)}?" if elsewhere else ""


def _build(cls: type, data: dict, prefix: str, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            path = f"{prefix}.{k}" if prefix else str(k)
            if path in REPLACED_KEYS:
                raise ConfigError(f"{where}: {path}: replaced by {REPLACED_KEYS[path]}")
            raise ConfigError(f"{where}: {path}: unknown key{_suggestion(str(k), names, prefix)} "
                              f"(allowed: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in data.items():
        path = f"{prefix}.{k}" if prefix else k
        kwargs[k] = _convert(v, hints[k], path, where)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: {prefix}.{f.name}: required")
    return cls(**kwargs)


def model_from_dict(data: dict, where: str) -> ModelConfig:
    """A model section alone (as a checkpoint records it), typed like load_config's."""
    return _convert(data, ModelConfig, "model", where)


def _set_dotted(tree: dict, dotted: str, value: Any, where: str) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {'.'.join(keys[: i + 1])}: is a value, not a section")
        node = child
    node[keys[-1]] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader refusing a mapping that holds a key twice, where PyYAML keeps the last silently (a second
    `model:` section would drop the first)."""


def _unique_key_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, Hashable):  # `? [a, b]`: construct_mapping names it ("found unhashable key")
            break
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_key_mapping)


def _load_yaml(text: str) -> Any:
    """The YAML value of `text`; NestedTooDeeply past fileio.MAX_NESTING levels, where PyYAML's parser (a few hundred
    levels) or the copy and error messages of config_from_dict would fail with a RecursionError."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except RecursionError:
        raise NestedTooDeeply from None
    return check_nesting(value)


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` strings -> (key, YAML-parsed value)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected key.path=value")
        try:
            parsed.append((key, _load_yaml(raw) if raw != "" else None))
        except NestedTooDeeply as e:  # named by its key: the value itself is thousands of brackets
            raise ConfigError(f"override {key}=...: the value is {e}") from None
        except yaml.YAMLError as e:  # `run.name=@x`, `model.dim={`: YAML refuses the value itself
            why = getattr(e, "problem", None) or e
            hint = "" if isinstance(e, yaml.constructor.ConstructorError) else \
                f"; for a string, quote it: {key}='\"{raw}\"'"
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({why}){hint}") from None
    return parsed


def config_from_dict(data: dict, where: str = "<dict>", overrides: list[str] = ()) -> Config:
    """Keys and types are checked after each step, so that an error names what brought the bad value: the file, or
    the override (`model.dim=abc` is not the file's fault). validate() then checks the whole."""
    data = copy.deepcopy(data or {})
    _build(Config, data, "", where)
    set_by = {}  # key -> the override that set it last
    for key, value in parse_overrides(list(overrides)):
        set_by = {k: v for k, v in set_by.items() if not k.startswith((f"{key}.", f"{key}["))}  # replaced with it
        set_by[key] = blame = f"{where} (override {key}={value!r})"
        _set_dotted(data, key, value, blame)
        _build(Config, data, "", blame)
    cfg = _build(Config, data, "", where)

    def set_by_section(key: str) -> str:
        """What set `key`: an override of it or of a section holding it (data.blend for data.blend[1].weight)."""
        while key not in set_by:
            section = re.sub(r"(\.\w+|\[\d+\])$", "", key)
            if section == key:
                return where
            key = section
        return set_by[key]

    validate(cfg, set_by_section)
    return cfg


def load_config(path: str | Path, overrides: list[str] = (), saved: bool = False) -> Config:
    """Load a YAML config, apply `key.path=value` overrides, validate; ConfigError on bad input. `saved`: a
    config.yaml that save_config wrote (a run's, an export's), which may outlive the version that wrote it: keys of
    earlier versions (REPLACED_KEYS) are dropped, where a config a user writes has them refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _load_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except NestedTooDeeply as e:
        raise ConfigError(f"{path}: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # unreadable, or not text (a checkpoint passed as --config)
        raise ConfigError(f"{path}: cannot read the config file ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    if saved and data:
        for key_path in REPLACED_KEYS:
            *sections, key = key_path.split(".")
            section = data
            for name in sections:
                section = section.get(name) if isinstance(section, dict) else None
            if isinstance(section, dict):
                section.pop(key, None)
    return config_from_dict(data or {}, str(path), overrides)


def save_config(cfg: Config, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# --------------------------------------------------------------------------------------------
# Validation: impossible values, named by key path


def uses_autoep(cfg: Config) -> bool:
    """Routed experts go through DeepSpeed AutoEP: every model with MoE layers."""
    return cfg.model.moe.n_dense_layers < cfg.model.n_layers


def _validate_blend(data: DataConfig, check) -> None:
    from .data.blend import BlendWeightError, blend_counts

    if not data.blend:
        return
    n = len(data.blend)
    check(data.path is None, "data.path", f"{data.path!r} is set and data.blend lists {n} source{'s' * (n > 1)}: "
          "set data.path: null to train on the blend")
    seen: dict[str, int] = {}
    for j, source in enumerate(data.blend):
        label = source.label
        check(re.fullmatch(r"[A-Za-z0-9_.-]+", label) is not None, f"data.blend[{j}].name",
              f"{label!r} names a metric (eval_loss/NAME): use letters, digits, '_', '.' or '-'")
        check(label not in seen, f"data.blend[{j}].name",
              f"{label!r} is data.blend[{seen.get(label)}]'s too: give each source its own name")
        seen[label] = j
    try:
        blend_counts([s.weight for s in data.blend])
    except BlendWeightError as e:
        check(False, f"data.blend[{e.source}].weight", e.reason)


def output_width_text(a: AttentionConfig) -> str:
    """The attention output's width, as MLA-o's refusals name it."""
    return f"model.attention.n_heads x v_head_dim ({a.n_heads} x {a.v_head_dim} = {a.n_heads * a.v_head_dim})"


MLA_O_TOO_WIDE = ("o_a_proj -> o_b_proj at least as wide as the attention output that o_proj projects saves nothing "
                  "over o_proj and adds parameters; MLA-o needs a narrower latent")
"""Why MLA-o's latent must be narrower than n_heads x v_head_dim (config validation and `convert mla-o`)."""


MAX_LAYERS = 1024
"""model.n_layers' and model.mtp_depth's ceiling, 8x the deepest published LLMs (DeepSeek-V3 61, Llama 3.1 405B 126):
each block is a module of its own, built one at a time (preflight's parameter count on the meta device, the model
itself), so a mistyped 10^11 would hang there instead of failing here."""
MAX_ROUTED_EXPERTS = 131_072
"""Ceiling on the routed experts of all MoE blocks together (model.moe.n_routed_experts x the MoE layers and MTP
depths), each a module of its own, built one at a time as the blocks are: DeepSeek-V3 holds 256 x 59 = 15,104."""

MAX_TIMEOUT_MINUTES = 525_600
"""parallel.timeout_minutes' ceiling, a year: torch keeps a process group's timeout in int64 nanoseconds (292 years),
and a timedelta beyond that overflows there (a negative timeout) or in Python."""

MIN_HEARTBEAT_TIMEOUT_MINUTES = 0.5
"""parallel.heartbeat_timeout_minutes' floor: below six polls of 5 s, one slow request to a busy store could take a
live rank for a silent one."""


def validate(cfg: Config, where: Callable[[str], str] = lambda key: "<config>") -> None:
    """`where(key)`: what set the key an error names (the file, or an override)."""
    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{where(key)}: {key}: {msg}")

    m, a, moe, r = cfg.model, cfg.model.attention, cfg.model.moe, cfg.model.attention.rope
    for key, v in [
        ("model.vocab_size", m.vocab_size), ("model.dim", m.dim), ("model.inter_dim", m.inter_dim),
        ("model.n_layers", m.n_layers), ("model.max_seq_len", m.max_seq_len),
        ("model.attention.n_heads", a.n_heads), ("model.attention.kv_lora_rank", a.kv_lora_rank),
        ("model.attention.qk_rope_head_dim", a.qk_rope_head_dim), ("model.attention.v_head_dim", a.v_head_dim),
        ("model.moe.n_routed_experts", moe.n_routed_experts), ("model.moe.top_k", moe.top_k),
        ("model.moe.expert_inter_dim", moe.expert_inter_dim), ("model.moe.n_expert_groups", moe.n_expert_groups),
        ("model.moe.n_limited_groups", moe.n_limited_groups),
        ("data.seq_len", cfg.data.seq_len), ("train.micro_batch_size", cfg.train.micro_batch_size),
        ("train.grad_accum_steps", cfg.train.grad_accum_steps), ("train.max_steps", cfg.train.max_steps),
        ("train.eval_sequences", cfg.train.eval_sequences), ("train.keep_last", cfg.train.keep_last),
        ("train.log_every", cfg.train.log_every), ("parallel.expert_parallel_size", cfg.parallel.expert_parallel_size),
        ("train.profile_steps", cfg.train.profile_steps),
    ]:
        check(v > 0, key, f"must be positive, got {v}")
    for key, v in [
        ("model.attention.q_lora_rank", a.q_lora_rank), ("model.attention.qk_nope_head_dim", a.qk_nope_head_dim),
        ("model.moe.n_shared_experts", moe.n_shared_experts), ("model.moe.n_dense_layers", moe.n_dense_layers),
        ("model.moe.bias_update_rate", moe.bias_update_rate),
        ("model.moe.seq_aux_loss_alpha", moe.seq_aux_loss_alpha), ("model.mtp_depth", m.mtp_depth),
        ("model.mtp_loss_weight", m.mtp_loss_weight), ("train.warmup_steps", cfg.train.warmup_steps),
        ("train.min_lr", cfg.train.min_lr), ("train.weight_decay", cfg.train.weight_decay),
        ("train.grad_clip", cfg.train.grad_clip), ("train.eval_every", cfg.train.eval_every),
        ("train.save_every", cfg.train.save_every), ("train.keep_every", cfg.train.keep_every),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps),
        ("train.batch_rampup_tokens", cfg.train.batch_rampup_tokens),
        ("train.profile_start_step", cfg.train.profile_start_step),
    ]:
        check(v >= 0, key, f"must be >= 0, got {v}")
    last_traced = cfg.train.profile_start_step + cfg.train.profile_steps - 1
    check(last_traced <= cfg.train.max_steps or not cfg.train.profile_start_step, "train.profile_start_step",
          f"traces steps {cfg.train.profile_start_step}-{last_traced} (train.profile_steps "
          f"{cfg.train.profile_steps}), past train.max_steps {cfg.train.max_steps}: the trace would never be written")
    if cfg.train.batch_rampup_tokens:
        check(0 < cfg.train.batch_rampup_start < cfg.train.grad_accum_steps, "train.batch_rampup_start",
              f"must be at least 1 and below train.grad_accum_steps ({cfg.train.grad_accum_steps}), the micro-steps "
              f"the ramp rises to, got {cfg.train.batch_rampup_start}")
    for key, v in (("model.n_layers", m.n_layers), ("model.mtp_depth", m.mtp_depth)):
        check(v <= MAX_LAYERS, key, f"must be at most {MAX_LAYERS} (each block is a module of its own, built one at "
              f"a time), got {v}")
    check(cfg.train.checkpoints or not cfg.train.save_every, "train.save_every",
          f"{cfg.train.save_every} asks for checkpoints, but train.checkpoints is false")
    if cfg.train.keep_every:
        check(cfg.train.checkpoints, "train.keep_every",
              f"{cfg.train.keep_every} keeps checkpoints, but train.checkpoints is false")
        check(cfg.train.save_every > 0 and cfg.train.keep_every % cfg.train.save_every == 0, "train.keep_every",
              f"{cfg.train.keep_every} is not a multiple of train.save_every ({cfg.train.save_every}): no checkpoint "
              "would be saved at those steps")
    check(m.init_std > 0, "model.init_std", f"must be positive, got {m.init_std}")
    check(moe.route_scale > 0, "model.moe.route_scale", f"must be positive, got {moe.route_scale}")
    check(cfg.train.adam_eps > 0, "train.adam_eps", f"must be positive, got {cfg.train.adam_eps}")
    check(cfg.train.peak_tflops is None or cfg.train.peak_tflops > 0, "train.peak_tflops",
          f"must be positive, got {cfg.train.peak_tflops}")
    check(cfg.parallel.zero_persistence_threshold >= 0, "parallel.zero_persistence_threshold",
          f"must be >= 0, got {cfg.parallel.zero_persistence_threshold}")
    check(m.norm_eps > 0, "model.norm_eps", f"must be positive, got {m.norm_eps}")
    check(a.qk_rope_head_dim % 2 == 0, "model.attention.qk_rope_head_dim", f"must be even, got {a.qk_rope_head_dim}")
    if a.use_output_subspace:
        check(a.o_latent_dim is not None, "model.attention.o_latent_dim",
              "required when model.attention.use_output_subspace is true")
        check(a.o_latent_dim > 0, "model.attention.o_latent_dim", f"must be positive, got {a.o_latent_dim}")
        check(a.o_latent_dim < a.n_heads * a.v_head_dim, "model.attention.o_latent_dim",
              f"{a.o_latent_dim} >= {output_width_text(a)}: {MLA_O_TOO_WIDE}")
    else:  # as convert's MLA-o -> MLA leaves it: a width nothing would use
        check(a.o_latent_dim is None, "model.attention.o_latent_dim",
              f"{a.o_latent_dim} is set, but model.attention.use_output_subspace is false: set that true for MLA-o, "
              "or this null")
    check(r.theta > 0, "model.attention.rope.theta", f"must be positive, got {r.theta}")
    if r.scaling == "yarn":
        check(r.factor >= 1, "model.attention.rope.factor", f"must be >= 1 for yarn, got {r.factor}")
        check(r.original_max_position_embeddings > 0, "model.attention.rope.original_max_position_embeddings",
              f"must be positive, got {r.original_max_position_embeddings}")
        check(r.beta_fast > r.beta_slow, "model.attention.rope.beta_fast",
              f"must exceed beta_slow ({r.beta_slow}), got {r.beta_fast}")
        # YaRN's ramp divides by log(theta) and takes the log of max_pos / beta; its magnitude divides by mscales
        check(r.theta > 1, "model.attention.rope.theta", f"must exceed 1 for yarn, got {r.theta}")
        check(r.beta_slow > 0, "model.attention.rope.beta_slow", f"must be positive for yarn, got {r.beta_slow}")
        for key, v in (("mscale", r.mscale), ("mscale_all_dim", r.mscale_all_dim)):
            check(v >= 0, f"model.attention.rope.{key}", f"must be >= 0 for yarn, got {v}")
    check(moe.top_k <= moe.n_routed_experts, "model.moe.top_k",
          f"{moe.top_k} > model.moe.n_routed_experts ({moe.n_routed_experts})")
    check(moe.n_routed_experts % moe.n_expert_groups == 0, "model.moe.n_expert_groups",
          f"{moe.n_expert_groups} groups do not divide model.moe.n_routed_experts ({moe.n_routed_experts})")
    check(moe.n_limited_groups <= moe.n_expert_groups, "model.moe.n_limited_groups",
          f"{moe.n_limited_groups} > model.moe.n_expert_groups ({moe.n_expert_groups})")
    per_group = moe.n_routed_experts // moe.n_expert_groups
    check(moe.n_limited_groups * per_group >= moe.top_k, "model.moe.n_limited_groups",
          f"{moe.n_limited_groups} groups of {per_group} experts hold fewer than model.moe.top_k ({moe.top_k})")
    check(moe.n_dense_layers <= m.n_layers, "model.moe.n_dense_layers",
          f"{moe.n_dense_layers} > model.n_layers ({m.n_layers})")
    moe_blocks = m.n_layers - moe.n_dense_layers + m.mtp_depth if moe.n_dense_layers < m.n_layers else 0
    check(moe.n_routed_experts * moe_blocks <= MAX_ROUTED_EXPERTS, "model.moe.n_routed_experts",
          f"{moe.n_routed_experts} in each of {moe_blocks} MoE block{'s' * (moe_blocks > 1)} (model.n_layers - "
          f"model.moe.n_dense_layers + model.mtp_depth) make {moe.n_routed_experts * moe_blocks:,} routed experts, "
          f"more than {MAX_ROUTED_EXPERTS:,} (each is a module of its own, built one at a time)")
    check(moe.n_routed_experts % cfg.parallel.expert_parallel_size == 0, "parallel.expert_parallel_size",
          f"{cfg.parallel.expert_parallel_size} does not divide model.moe.n_routed_experts ({moe.n_routed_experts})")
    _validate_blend(cfg.data, check)
    if cfg.train.eval_every:
        check(cfg.data.val_split != cfg.data.train_split, "data.val_split",
              f"{cfg.data.val_split!r} is data.train_split too: the held-out loss would be measured on samples the run "
              "trains on; name the manifest's held-out split, or set train.eval_every: 0")
    check(cfg.run.dir.strip() != "", "run.dir", f"{cfg.run.dir!r} is empty: name the run directory (Path('') is the "
          "current directory, which would get the run's config.yaml, metrics.jsonl and checkpoints/)")
    check(cfg.data.seq_len <= m.max_seq_len, "data.seq_len", f"{cfg.data.seq_len} > model.max_seq_len ({m.max_seq_len})")
    check(m.mtp_depth < cfg.data.seq_len, "model.mtp_depth",
          f"{m.mtp_depth} >= data.seq_len ({cfg.data.seq_len}): depth k predicts the token k + 1 ahead, so a sequence "
          "needs more positions than the deepest module")
    if isinstance(cfg.train.activation_checkpointing, list):
        layers = cfg.train.activation_checkpointing
        bad = [i for i in layers if not 0 <= i < m.n_layers]
        check(not bad, "train.activation_checkpointing", f"block {bad[0] if bad else 0} is not in 0 .. {m.n_layers - 1} "
              "(model.n_layers)")
        check(len(set(layers)) == len(layers), "train.activation_checkpointing", f"a block is listed twice: {layers}")
    check(cfg.parallel.zero_stage > 0 or cfg.precision == "fp32", "parallel.zero_stage",
          f"0 (no ZeRO) runs only with precision: fp32 (got {cfg.precision}): DeepSpeed 0.19.8 runs bf16 without ZeRO "
          "through its FP16_UnfusedOptimizer, which takes an AdamW step on zero gradients as it starts (AdamW's bias "
          "correction is then a step behind: the first real step moves each weight ~0.73 x lr at betas 0.9, 0.95); "
          "stage 1, which partitions only the optimizer state, trains as stage 3 does")
    if cfg.parallel.zero_init:
        check(cfg.parallel.zero_stage == 3, "parallel.zero_init",
              f"needs parallel.zero_stage: 3 (got {cfg.parallel.zero_stage})")
        check(not m.tie_embeddings, "parallel.zero_init", "cannot build a model whose head shares the embedding "
              "(model.tie_embeddings: true) partitioned")
    if cfg.train.compile_blocks and cfg.parallel.zero_stage == 3:
        check(cfg.parallel.zero_leaf_blocks, "train.compile_blocks",
              "under ZeRO-3 needs parallel.zero_leaf_blocks: true (DeepSpeed's per-module hooks inside a compiled "
              "block break its graph at every linear)")
    if cfg.parallel.coalesce_grad_reduction:
        check(cfg.parallel.zero_stage > 0, "parallel.coalesce_grad_reduction",
              "needs parallel.zero_stage 1, 2 or 3 (DeepSpeed coalesces only ZeRO's gradient reduction)")
    if cfg.precision == "fp8" and cfg.fp8.fast_accum != "forward":
        check(cfg.fp8.recipe != "blockwise" or cfg.fp8.linear_weight_grads != "bf16", "fp8.fast_accum",
              f"{cfg.fp8.fast_accum!r} applies to torchao's tensorwise and rowwise recipes and to the FP8 weight "
              "gradients of fp8.linear_weight_grads; with fp8.recipe: blockwise and fp8.linear_weight_grads: bf16 it "
              "changes nothing")
    if cfg.precision == "fp8" and cfg.fp8.experts:
        check(uses_autoep(cfg), "fp8.experts",
              "needs routed experts: a model with MoE layers (model.moe.n_dense_layers < model.n_layers)")
        for key, v in (("model.dim", m.dim), ("model.moe.expert_inter_dim", moe.expert_inter_dim)):
            check(v % 16 == 0, key, f"{v} is not a multiple of 16, which fp8.experts' FP8 grouped GEMMs need")
    if cfg.precision == "fp8" and cfg.fp8.shared_experts:
        check(moe.n_shared_experts > 0, "fp8.shared_experts", "the model has none (model.moe.n_shared_experts: 0)")
        need = "a multiple of 16, which fp8.shared_experts' FP8 GEMMs need"
        check(m.dim % 16 == 0, "model.dim", f"{m.dim} is not {need}")
        width = moe.n_shared_experts * moe.expert_inter_dim
        check(width % 16 == 0, "model.moe.expert_inter_dim",
              f"the shared experts' width {width} (model.moe.n_shared_experts x this) is not {need}")
        tokens = cfg.train.micro_batch_size * cfg.data.seq_len
        check(tokens % 16 == 0, "train.micro_batch_size",
              f"{tokens} tokens per micro-step (this x data.seq_len) is not {need}")
        if cfg.parallel.zero_stage == 3:
            check(cfg.parallel.zero_leaf_blocks, "parallel.zero_leaf_blocks",
                  "fp8.shared_experts under ZeRO-3 needs it true: the shared experts' FP8 path reads their linears' "
                  "weights without calling the linears, so only a block-wide gather brings them")
    if cfg.precision == "fp8" and cfg.fp8.dense_mlp:
        check(moe.n_dense_layers > 0, "fp8.dense_mlp", "the model has no dense layer (model.moe.n_dense_layers: 0)")
    if cfg.precision == "fp8" and cfg.fp8.linear_weight_grads != "bf16":
        check(cfg.fp8.attention or cfg.fp8.dense_mlp, "fp8.linear_weight_grads",
              f"{cfg.fp8.linear_weight_grads} applies to the linears of fp8.attention and fp8.dense_mlp, and both "
              "are false")
    for key, on in (("fp8.attention", cfg.fp8.attention), ("fp8.dense_mlp", cfg.fp8.dense_mlp)):
        if cfg.precision == "fp8" and on and cfg.parallel.zero_stage == 3:
            check(cfg.parallel.zero_leaf_blocks, "parallel.zero_leaf_blocks",
                  f"{key} under ZeRO-3 needs it true: the linears' FP8 weights are cast before the block runs, from "
                  "weights that only a block-wide gather brings by then")
    if cfg.parallel.timeout_minutes is not None:
        check(0 < cfg.parallel.timeout_minutes <= MAX_TIMEOUT_MINUTES, "parallel.timeout_minutes",
              f"must be in (0, {MAX_TIMEOUT_MINUTES}] (a year), got {cfg.parallel.timeout_minutes:g}")
    if (heartbeat := cfg.parallel.heartbeat_timeout_minutes) is not None:
        check(MIN_HEARTBEAT_TIMEOUT_MINUTES <= heartbeat <= MAX_TIMEOUT_MINUTES, "parallel.heartbeat_timeout_minutes",
              f"must be in [{MIN_HEARTBEAT_TIMEOUT_MINUTES}, {MAX_TIMEOUT_MINUTES}] (30 s: six of the watch's polls, "
              f"up to a year), or null for none; got {heartbeat:g}")
    check(cfg.train.lr > 0, "train.lr", f"must be positive, got {cfg.train.lr}")
    check(cfg.train.min_lr <= cfg.train.lr, "train.min_lr", f"{cfg.train.min_lr} > train.lr ({cfg.train.lr})")
    check(0 <= cfg.train.beta1 < 1, "train.beta1", f"must be in [0, 1), got {cfg.train.beta1}")
    check(0 <= cfg.train.beta2 < 1, "train.beta2", f"must be in [0, 1), got {cfg.train.beta2}")
    check(0 < cfg.train.wsd_decay_fraction <= 1, "train.wsd_decay_fraction",
          f"must be in (0, 1], got {cfg.train.wsd_decay_fraction}")
    warmup, steps = cfg.train.warmup_steps, cfg.train.max_steps
    if warmup > steps:
        # Named by the key an override set, if one did (train.max_steps=3 on a config that warms up for 5)
        key, what = (("train.max_steps", f"{steps} < train.warmup_steps ({warmup})")
                     if where("train.warmup_steps") == where("") != where("train.max_steps")
                     else ("train.warmup_steps", f"{warmup} > train.max_steps ({steps})"))
        check(False, key, f"{what}: the learning rate would end the run at {cfg.train.lr * steps / warmup:g}, never "
              f"reaching train.lr ({cfg.train.lr:g}); set train.warmup_steps to at most {steps}, or train.max_steps to "
              f"at least {warmup}")
    if cfg.train.schedule == "wsd":  # else the lr would jump from the warmup into the middle of the decay
        check(cfg.train.warmup_steps <= cfg.train.wsd_decay_start, "train.warmup_steps",
              f"{cfg.train.warmup_steps} runs into schedule wsd's decay, which starts after step "
              f"{cfg.train.wsd_decay_start} (train.max_steps - train.wsd_decay_fraction x train.max_steps)")
    if cfg.train.exit_at_step is not None:
        check(0 < cfg.train.exit_at_step <= cfg.train.max_steps, "train.exit_at_step",
              f"must be in [1, train.max_steps={cfg.train.max_steps}], got {cfg.train.exit_at_step}")
    if cfg.train.exit_after_minutes is not None:
        check(cfg.train.exit_after_minutes > 0, "train.exit_after_minutes",
              f"must be positive, got {cfg.train.exit_after_minutes}")


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, a's value, b's value) of every leaf field where the dataclasses a and b differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(x):
            out += differences(x, y, key)
        elif x != y:
            out.append((key, x, y))
    return out
