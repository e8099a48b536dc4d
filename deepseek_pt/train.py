"""python -m deepseek_pt.train --config FILE [key.path=value ...] (started by the deepspeed launcher, or alone as one
process)

The loop: DeepSpeed ZeRO-3 (+ AutoEP expert parallelism) steps, aux-loss-free bias balancing after
each optimizer step, one metrics.jsonl line per step, evaluation and checkpoints on schedule, and a
clean checkpoint + exit 0 at train.exit_at_step, train.exit_after_minutes, or SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import math
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

# isort: off
# First, before torch's import (seconds): the launcher is recorded as the process starts (engine/launcher.py).
from .engine import launcher  # noqa: F401
# isort: on
import torch
import torch.distributed as dist

from .config import Config, ConfigError, differences, load_config, model_from_dict, save_config, uses_autoep
from .data.format import DataError
from .engine import balance, checkpoint, run_tokenizer
from .engine.accelerator import on_gpu
from .engine.batch_rampup import grad_accum_steps_at, sequences_to_end, step_sequences
from .engine.checkpoint import CheckpointError
from .engine.distributed import agree, check_same_config, init_distributed, mean_over_ranks
from .engine.ds_config import build_ds_config, deepspeed_micro_steps
from .engine.lr_schedule import TokenClockLR, lr_scheduler, tokens_to_end
from .engine.metrics import MetricsLogger, WandbError, peak_flops, peak_memory_gib
from .engine.peer_failure import PeerFailureWatch
from .engine.preflight import (
    DETERMINISTIC_CUBLAS_WORKSPACES,
    NEW_DATA_HINT,
    PreflightError,
    gpu_memory,
    ignored_fp8_settings,
    ignored_zero3_settings,
    preflight,
    resume_settings,
)
from .engine.profiling import StepProfiler
from .fileio import describe_os_error
from .model import Block, SwiGLU, Transformer, writable
from .model.counting import train_flops_per_token

WRITE_REFUSED = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EROFS)
"""A full disk, quota or file-size limit, no permission, a read-only filesystem: where run.dir cannot be written
(config.yaml, metrics.jsonl at start), one line naming the file ends the run."""


class StoppedError(RuntimeError):
    """Training stopped before its end without a checkpoint, for the reason the message gives (a diverged loss,
    metrics that cannot be written)."""


class OutOfGpuMemory(RuntimeError):
    """A CUDA out-of-memory error in training, told as the config's to fix (engine/model_states.py)."""


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m deepseek_pt.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (configs/*.yaml)")
    parser.add_argument("--check-only", action="store_true", help="validate config and inputs, then exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=100")
    return parser.parse_intermixed_args(argv)  # options after overrides too: `... a=1 --check-only b=2`


def wandb_run_to_resume(wandb_id: str | None, resume_dir: Path, run_dir: Path, say: bool) -> str | None:
    """The wandb run a resume logs into: the checkpoint's, unless the checkpoint is another run.dir's (a branch, a
    rollback resumed into a new run.dir). That run already holds the steps after the checkpoint, and wandb drops a
    step lower than the newest it has: the branch's metrics would never show, and its config would replace the
    original's. `say`: print which it is when a new one starts."""
    if wandb_id is None or resume_dir.parent.resolve() == checkpoint.checkpoints_dir(run_dir).resolve():
        return wandb_id
    if say:
        print(f"wandb: a new run for {run_dir}: the checkpoint is another run.dir's, whose wandb run {wandb_id} holds "
              "that run's steps", flush=True)
    return None


def data_epochs(loader, sources: list, consumed_samples: int) -> dict[str, float]:
    """How many times each training source has been read through once `consumed_samples` global samples are
    (1.5: the whole source once, half of it a second time, in a new order): `data_epochs` for one source,
    `data_epochs/NAME` per source of a blend, as eval_loss is named."""
    read = [n / len(ds) for n, ds in zip(loader.source_reads_at(consumed_samples), loader.datasets, strict=True)]
    if len(sources) == 1:
        return {"data_epochs": read[0]}
    return {f"data_epochs/{s.label}": r for s, r in zip(sources, read, strict=True)}


def repeated_data_line(loader, sources: list, cfg: Config, step: int, tokens_seen: int, world: int) -> str | None:
    """A line saying which sources train.max_steps reads more than once, or None: a run longer than its data
    repeats it (each epoch in a new order) without any error, and this is where that is said before it happens."""
    at_end = loader.consumed_samples + sequences_to_end(cfg.train, step, tokens_seen,
                                                        cfg.train.micro_batch_size * world, cfg.data.seq_len)
    epochs = data_epochs(loader, sources, at_end).values()
    over = [f"{s.path} ({len(ds):,} samples of split {ds.split!r}) {e:.2f} times"
            for s, ds, e in zip(sources, loader.datasets, epochs, strict=True) if e > 1]
    if not over:
        return None
    return (f"data: train.max_steps {cfg.train.max_steps} reads {'; '.join(over)}: each pass after the first re-reads "
            "the same samples in a new order (data_epochs in metrics.jsonl)")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay; norms, biases and the embedding don't."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        ndim = len(getattr(p, "ds_shape", p.shape))  # a parameter built partitioned (zero_init) is flat locally
        (no_decay if ndim < 2 or name == "embed_tokens.weight" else decay).append(p)
    return [{"name": "decay", "params": decay, "weight_decay": weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]


class StopSignal:
    """Remembers SIGTERM/SIGINT so the loop can checkpoint at the end of the step and exit 0."""

    _pipe: tuple[int, int] | None = None  # the wakeup fd's pipe (read, write): one per process

    def __init__(self):
        self.received: str | None = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        # Python runs _handle in the main thread once its current C call returns (a GPU sync, a collective: seconds),
        # but the C handler writes the signal's number into the wakeup fd at once: `arrived` reads it, for the
        # peer-failure watch's thread, to which a launcher that dies of the same SIGTERM (a scheduler's, sent to every
        # process of the job) must not look killed. Not where something else holds the wakeup fd (an asyncio loop).
        self._early, self._wakeup = False, None
        if StopSignal._pipe is None:
            StopSignal._pipe = os.pipe()
            for fd in StopSignal._pipe:
                os.set_blocking(fd, False)
        read, write = StopSignal._pipe
        if (held := signal.set_wakeup_fd(write, warn_on_full_buffer=False)) in (-1, write):
            self._wakeup = read
            with contextlib.suppress(BlockingIOError):
                os.read(read, 1 << 16)  # an earlier run's in this process
        else:
            signal.set_wakeup_fd(held)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def arrived(self) -> bool:
        """Whether SIGTERM or SIGINT has come, its handler run yet or not; from any thread."""
        if self.received is None and not self._early and self._wakeup is not None:
            with contextlib.suppress(BlockingIOError):
                self._early = bool({signal.SIGTERM, signal.SIGINT} & set(os.read(self._wakeup, 4096)))
        return self.received is not None or self._early


def verify_checksums(cfg: Config, device) -> None:
    """data.verify_checksums: hash the training shards, and the val shards if the run evaluates. A node's processes
    share the work (local rank r hashes every LOCAL_SIZE-th shard), so each node checks the copy it reads, node-local
    copies included, and reads it once. DataError on every rank if any shard is bad, named where it was found."""
    from .data.format import check_shard, open_manifest

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or "1")
    splits = [cfg.data.train_split] + ([cfg.data.val_split] if cfg.train.eval_every else [])
    problem = None
    try:
        manifests = [open_manifest(s.path) for s in cfg.data.sources()]
        shards = [(m, shard) for m in manifests for split in splits for shard in m.shards(split)]
        for m, shard in shards[local_rank::local_size]:
            check_shard(m, shard, checksum=True)
    except DataError as e:
        problem = str(e)
    if agree([problem is not None], device)[0]:
        raise DataError(problem or "data.verify_checksums: a shard failed its check in another process (named there)")


OPTIMIZER_KEYS = ("lr", "min_lr", "warmup_steps", "schedule", "wsd_decay_fraction", "wsd_decay_shape", "max_steps",
                  "lr_schedule_unit", "weight_decay", "beta1", "beta2", "adam_eps", "grad_clip", "batch_rampup_tokens",
                  "batch_rampup_start")
"""train.* keys a resume may change (the run goes on with the new values), said at resume: a silent change of the
learning rate shows in the metrics only as a jump."""


def optimizer_settings(cfg: Config) -> dict:
    """What a checkpoint records of the schedule and AdamW (its client state's `optimizer_settings`)."""
    return {key: getattr(cfg.train, key) for key in OPTIMIZER_KEYS}


def optimizer_changes(saved: dict | None, cfg: Config) -> str:
    """`train.lr 0.001 (0.0003 in the checkpoint), ...` for each setting this config changes; '' for none, or for a
    checkpoint written before they were recorded."""
    here = optimizer_settings(cfg)
    return ", ".join(f"train.{key} {here[key]} ({saved[key]} in the checkpoint)" for key in OPTIMIZER_KEYS
                     if saved and key in saved and saved[key] != here[key])


def changed_model_keys(theirs, mine, whose: str, said_here: str = "") -> str:
    """`model.k v{said_here} (w in WHOSE), ...` for each key where model sections `mine` and `theirs` differ; '' for
    none."""
    return ", ".join(f"{key} {value!r}{said_here} ({other!r} in {whose})"
                     for key, other, value in differences(theirs, mine, "model"))


def resume_notes(client: dict, cfg: Config, world: int, step: int, eval_sequences: int | None,
                 saved_model: dict | None = None) -> list[str]:
    """What a resume changes against the checkpoint's run (its client state `client`, its meta.json's model section
    `saved_model`), as lines for the start's log: the sequences per optimizer step, the optimizer's settings, the
    evaluation's sequences, model keys that shape no parameter (preflight refuses the others). Said, not refused."""
    notes = []
    if saved_model and (changed := changed_model_keys(model_from_dict(saved_model, "the checkpoint's meta.json"),
                                                      cfg.model, "the checkpoint", said_here=" here")):
        # DeepSeek-V3 stopped its balancing for its last 500B tokens
        notes.append(f"resume: {changed}: the weights go on under this config's")
    here = step_sequences(cfg, world)
    saved_batch = client.get("sequences_per_step")  # absent from checkpoints before it was recorded
    if saved_batch is not None and saved_batch != here:
        notes.append(f"resume: {here} sequences per optimizer step here (train.micro_batch_size "
                     f"{cfg.train.micro_batch_size} x train.grad_accum_steps {cfg.train.grad_accum_steps} x {world} "
                     f"processes), {saved_batch} in the checkpoint's run: the learning-rate schedule goes on by "
                     "steps, each now of that many sequences")
    if changed := optimizer_changes(client.get("optimizer_settings"), cfg):
        notes.append(f"resume: {changed} here: the schedule and AdamW go on with this config's from step {step}")
    saved_eval = client.get("eval_sequences")
    if eval_sequences and saved_eval and saved_eval != eval_sequences:
        notes.append(f"resume: evaluation reads the first {eval_sequences} sequences of {cfg.data.val_split!r} here "
                     f"(train.eval_sequences), {saved_eval} in the checkpoint's run: eval_loss from here on is over "
                     "another set, not comparable with the earlier steps'")
    return notes


def evaluate(engine, cfg: Config, rank: int, world: int, device) -> dict[str, float]:
    """eval_loss, the mean loss per token over data.val_split's first train.eval_sequences sequences, whatever the
    number of processes; for a blend, each source's (eval_loss/NAME) and their weighted mean."""
    from .data import to_device, val_batches

    engine.eval()
    sources = cfg.data.sources()
    sums = torch.zeros(len(sources), 2, dtype=torch.float64, device=device)  # (loss sum, tokens) per source
    with torch.no_grad():
        for j, source in enumerate(sources):
            batches = val_batches(source.path, split=cfg.data.val_split, seq_len=cfg.data.seq_len,
                                  micro_batch_size=cfg.train.micro_batch_size, dp_rank=rank, dp_world=world,
                                  max_sequences=cfg.train.eval_sequences)
            for inputs, targets in to_device(batches, device):
                engine(inputs, targets)
                # lm_loss is the mean over the batch's counted targets; a rank's padding rows count none (and a
                # batch of padding alone has a NaN mean)
                tokens = (targets != -100).sum().double()
                loss = engine.module.last_losses["lm_loss"].detach().double()
                sums[j, 0] += torch.where(tokens > 0, loss * tokens, 0.0)
                sums[j, 1] += tokens
    engine.train()
    balance.reset_counts(engine.module)  # evaluation routing must not steer the bias
    dist.all_reduce(sums)
    losses = (sums[:, 0] / sums[:, 1]).tolist()
    if len(sources) == 1:
        return {"eval_loss": losses[0]}
    weights = [s.weight for s in sources]
    mean = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    return {"eval_loss": mean, **{f"eval_loss/{s.label}": loss for s, loss in zip(sources, losses, strict=True)}}


def _torchao_fp8_lines(cfg: Config, fp8, own_fp8: bool) -> list[str]:
    """What the start's log says of convert_to_fp8's result `fp8` (engine/fp8.py's Fp8Conversion); `own_fp8`: our
    FP8 paths take other linears (reported by _convert_own_fp8)."""
    if fp8.emulated:
        how = f"emulated in fp32 (numerics only, slower than bf16: the real-GEMM path {fp8.emulated})"
    elif cfg.fp8.recipe == "blockwise":
        how = "torchao's blockwise kernels"
    else:
        gemms = "forward GEMM" if cfg.fp8.fast_accum == "forward" else "three GEMMs"
        how = f"torchao, fast accumulation in the {gemms}"
        if not on_gpu():
            how += "; on a CPU: torch's CPU FP8 GEMMs, the recipe's numerics, slower than bf16"
    kept = f"; {fp8.too_narrow} too narrow to gain left in bf16 (fp8.layers=auto)" if fp8.too_narrow else ""
    if fp8.unaligned:
        kept += f"; {fp8.unaligned} with a dimension not a multiple of 128 left in bf16"
    if fp8.converted or fp8.too_narrow or not own_fp8:
        lines = [f"fp8: {fp8.converted} linears, {cfg.fp8.recipe} scaling, {how}{kept}"]
    else:
        lines = [f"fp8: no linear left for fp8.recipe={cfg.fp8.recipe} beside our FP8 paths (below)"]
    if cfg.fp8.recipe == "blockwise" and fp8.converted and not fp8.emulated:
        lines.append("fp8: the first micro-step autotunes torchao's Triton casts for each shape (minutes on a fresh "
                     "machine); Triton's cache keeps the results for later runs")
    if fp8.converted == 0 and not own_fp8:
        hint = "; fp8.layers=all converts the narrow ones too" if fp8.too_narrow else ""
        lines.append(f"fp8: no linear converted, this run computes in bf16{hint}")
    return lines


def _convert_own_fp8(engine, cfg: Config, coalesced: bool) -> list[str]:
    """Put the layers that fp8.experts, fp8.shared_experts, fp8.attention and fp8.dense_mlp name on our FP8 GEMMs
    (after deepspeed.initialize: AutoEP's layers exist, and DeepSpeed's hooks are on the blocks, fp8_linears' after
    them); returns the start log's lines."""
    from .engine import fp8_experts, fp8_linears
    from .engine.fp8 import expert_gemms_unavailable
    why = expert_gemms_unavailable()
    steps, emulate = (lambda: engine.global_steps), why is not None
    converted = []
    if cfg.fp8.experts:
        layers = fp8_experts.convert_experts_to_fp8(engine.module, steps, emulate)
        converted.append((f"routed experts of {layers} MoE layer{'s' * (layers != 1)}", "bf16"))
    fp8_in_place = cfg.parallel.linear_grads_in_place and coalesced
    if cfg.fp8.shared_experts:
        layers = fp8_experts.convert_shared_experts_to_fp8(engine.module, steps, emulate,
                                                           cfg.parallel.expert_triton_gemms, fp8_in_place)
        converted.append((f"shared experts of {layers} MoE layer{'s' * (layers != 1)}", "bf16"))
    if cfg.fp8.attention or cfg.fp8.dense_mlp:
        counts = fp8_linears.convert_linears_to_fp8(engine.module, steps, emulate, fp8_in_place,
                                                    cfg.fp8.attention, cfg.fp8.dense_mlp,
                                                    cfg.fp8.linear_weight_grads, cfg.fp8.fast_accum == "all")
        for part, (n, total) in counts.items():
            kept = f" ({total - n} with a dimension not a multiple of 16 kept in bf16)" if n < total else ""
            what = "attention projections" if part == "attention" else "dense MLP projections"
            converted.append((f"{n} {what}{kept}", cfg.fp8.linear_weight_grads))
    how = f"emulated in fp32 (numerics only: the real-GEMM path {why})" if why else "real FP8 GEMMs"
    wgrads = {"bf16": "weight gradients in bf16", "fp8": "weight gradients in FP8 (tensorwise scales)",
              "fp8_rowwise": "weight gradients in FP8 (a scale per channel)"}
    lines = [f"fp8: {what}, rowwise scaling, {wgrads[weight_grads]}, {how}" for what, weight_grads in converted]
    if why is None and cfg.train.grad_accum_steps == 1:
        lines.append(ONE_MICRO_STEP_FP8)
    return lines


ONE_MICRO_STEP_FP8 = (
    "fp8: one micro-step per optimizer step (train.grad_accum_steps: 1): these paths cast their FP8 weights once per "
    "optimizer step, which on bench-2b costs what one micro-step's FP8 GEMMs save (0.96-0.99x bf16's tokens/s there "
    "on an H100, 1.09-1.14x at 16 micro-steps per step: docs/benchmarks.md)")


def set_determinism(cfg: Config) -> list[str]:
    """train.deterministic and train.compile_deterministic, before anything compiles or runs a GEMM; the log's lines.
    (preflight refused a CUBLAS_WORKSPACE_CONFIG that would defeat train.deterministic.)"""
    lines = []
    if cfg.train.compile_deterministic or cfg.train.deterministic:
        from torch._inductor import config as inductor_config
        inductor_config.deterministic = True  # read when a kernel is compiled: every compile after this
        asked_by = "train.compile_deterministic" if cfg.train.compile_deterministic else "implied by train.deterministic"
        lines.append(f"compile: Inductor's deterministic mode ({asked_by}), kernel configurations chosen without "
                     "timing them")
    if cfg.train.deterministic:
        workspace = os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", DETERMINISTIC_CUBLAS_WORKSPACES[0])
        torch.use_deterministic_algorithms(True)  # and, its default, new tensors filled: no read of unwritten memory
        lines.append(f"deterministic: torch.use_deterministic_algorithms, CUBLAS_WORKSPACE_CONFIG={workspace}, "
                     "attention through FlashAttention-2 on v padded to q/k's width (train.deterministic)")
    return lines


def build_engine(cfg: Config, world: int, init_from: str | None = None, load_universal: bool = False):
    """The model and its DeepSpeed engine, as training (and bench/) use them."""
    import deepspeed

    rank0 = int(os.environ.get("RANK", 0)) == 0  # who reports how the engine was built
    # FP8 GEMMs of our own (fp8_experts.py, fp8_linears.py), beside the linears torchao's recipes convert
    own_fp8 = cfg.precision == "fp8" and (cfg.fp8.experts or cfg.fp8.shared_experts or cfg.fp8.attention
                                          or cfg.fp8.dense_mlp)
    ds_config = build_ds_config(cfg, world, has_moe=uses_autoep(cfg), load_universal=load_universal)
    for line in set_determinism(cfg):
        if rank0:
            print(line, flush=True)
    torch.manual_seed(cfg.train.seed)
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=cfg.parallel.zero_init):
        model = Transformer(cfg.model)
    if cfg.parallel.zero_init and rank0:
        held = sum(p.ds_tensor.numel() for p in model.parameters())
        total = sum(p.ds_numel for p in model.parameters())
        print(f"zero_init: model built partitioned, rank 0 holds {held:,} of {total:,} parameters", flush=True)
    if init_from:
        from .export import ExportError, load_export
        try:  # preflight read export.json; the weights are checked here (sha256, names, shapes), on every rank alike
            exported, exported_cfg = load_export(init_from, dtype=torch.float32)
        except ExportError as e:
            raise PreflightError(f"train.init_from: {e}") from None
        with writable(*model.parameters()):  # the export is whole on every rank anyway
            model.load_state_dict(exported.state_dict())
        if rank0 and (changed := changed_model_keys(exported_cfg.model, cfg.model, "the export")):
            # a new phase: a longer context (max_seq_len, YaRN), another balancing rate; the RoPE tables are this
            # config's (reset_rope below)
            print(f"init_from: the weights of {init_from} under this config's {changed}", flush=True)
    if cfg.train.compile:
        from .model.layers import compile_pointwise
        compile_pointwise()
    if cfg.precision == "fp8":
        from .engine.fp8 import convert_to_fp8, taken_elsewhere
        fp8 = convert_to_fp8(model, cfg.fp8.recipe, cfg.fp8.layers, cfg.fp8.fast_accum,
                             taken_elsewhere(cfg.fp8.shared_experts, cfg.fp8.attention, cfg.fp8.dense_mlp))
        for line in _torchao_fp8_lines(cfg, fp8, own_fp8) if rank0 else []:
            print(line, flush=True)
    elif rank0 and (ignored := ignored_fp8_settings(cfg)):
        print(f"fp8: {ignored}", flush=True)
    if rank0 and (ignored := ignored_zero3_settings(cfg)):
        print(f"zero: {ignored}", flush=True)
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_leaf_blocks:
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, [Block])
    if cfg.train.activation_checkpointing:
        from functools import partial

        from torch.utils.checkpoint import checkpoint as recompute
        layers = cfg.train.activation_checkpointing
        model.recompute_in_backward(partial(recompute, use_reentrant=False), None if layers is True else layers)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
        config=ds_config, lr_scheduler=lr_scheduler(cfg, world))
    if cfg.parallel.zero_stage == 0:
        from .engine import no_zero_step
        no_zero_step.install(engine, cfg.train.grad_clip)
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_fused_step:
        from .engine import zero3_step
        zero3_step.install(engine.optimizer)
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_idle_hooks_off:
        from .engine import zero3_hooks
        if zero3_hooks.remove_if_idle(engine) and rank0:
            print("zero3: every parameter persistent, per-module fetch/release hooks removed "
                  "(parallel.zero_idle_hooks_off)", flush=True)
    if cfg.parallel.zero_stage == 3 and cfg.parallel.zero_fused_step and cfg.parallel.zero_keep_params_gathered:
        from .engine import zero3_step
        kept = zero3_step.keep_params_gathered(engine.optimizer)
        if kept and rank0:
            print(f"zero3: all {kept} parameters stay gathered through the optimizer step, views of their one-rank "
                  "partitions (parallel.zero_keep_params_gathered)", flush=True)
    # DeepSpeed keeps fp32 buffers when it casts to bf16, but under zero.Init the RoPE frequencies were computed in
    # bf16; exports compute them afresh in fp32, and training must rotate positions as they will.
    engine.module.reset_rope()
    coalesced = deepspeed_micro_steps(cfg) != cfg.train.grad_accum_steps
    if own_fp8:
        lines = _convert_own_fp8(engine, cfg, coalesced)
        for line in lines if rank0 else []:
            print(line, flush=True)
    grads_in_place = cfg.parallel.expert_grads_in_place and coalesced
    if grads_in_place or cfg.parallel.expert_triton_gemms:
        from .engine.expert_grads import convert_routed_experts
        converted, layers = convert_routed_experts(engine.module, grads_in_place, cfg.parallel.expert_triton_gemms)
        if rank0 and layers:
            in_place = "weight gradients added into .grad in place (parallel.expert_grads_in_place)"
            triton = ("forward and input gradients through a Triton kernel on Hopper or later GPUs "
                      "(parallel.expert_triton_gemms)")
            what = [w for w, on in ((in_place, grads_in_place), (triton, cfg.parallel.expert_triton_gemms)) if on]
            print(f"experts: {converted} of {layers} AutoEP expert layers on our GEMMs: {'; '.join(what)}", flush=True)
    if cfg.parallel.linear_grads_in_place and coalesced:  # before compile_blocks: the compiled halves trace it
        from .engine.linear_grads import linear_grads_in_place
        converted, layers = linear_grads_in_place(engine.module)
        if rank0:
            print(f"linears: weight gradients added into .grad by their GEMM in {converted} of {layers} linear "
                  "layers (parallel.linear_grads_in_place)", flush=True)
    if cfg.parallel.fused_moe_dispatch:
        from .engine.moe_dispatch import fuse_moe_dispatch
        converted, layers = fuse_moe_dispatch(engine.module)
        if rank0 and layers:
            rest = "" if converted == layers else "; the others, under expert parallelism, dispatch by AutoEP's all-to-all"
            print(f"moe: tokens dispatched to and combined from the experts' padded rows in one pass each in "
                  f"{converted} of {layers} AutoEP MoE layers (parallel.fused_moe_dispatch){rest}", flush=True)
    if cfg.model.moe.seq_aux_loss_alpha:
        layers = balance.add_sequence_balance_loss(engine.module, cfg.model.moe.seq_aux_loss_alpha)
        if rank0 and layers:
            print(f"moe: the sequence-wise balance loss (model.moe.seq_aux_loss_alpha) on {layers} AutoEP MoE layers",
                  flush=True)
    for _, bias in balance.moe_routers(engine.module):  # selection bias must keep fp32 resolution
        bias.data = bias.data.float()
    if cfg.train.compile_blocks:
        compile_blocks(engine.module)
    return engine


def train_step(engine, cfg: Config, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
               forward: Callable | None = None, parts: dict[str, torch.Tensor] | None = None,
               accum: int | None = None) -> torch.Tensor:
    """One optimizer step over `accum` micro-batches from `batches` (train.grad_accum_steps unless a batch ramp says
    fewer); returns the sum of their losses, on device. `forward(engine, inputs, targets) -> loss` defaults to our
    model's call. `parts`, if given, receives the sums of the model's loss terms besides lm_loss (mtp_loss,
    balance_loss), on device."""
    accum = accum or cfg.train.grad_accum_steps
    coalesce = deepspeed_micro_steps(cfg) != cfg.train.grad_accum_steps  # as build_engine set the engine up
    ramp = bool(cfg.train.batch_rampup_tokens) and not coalesce
    if ramp and engine.gradient_accumulation_steps() != accum:  # DeepSpeed's 1/accum loss scale
        engine.set_train_batch_size(accum * cfg.train.micro_batch_size * engine.dp_world_size)
    loss_sum = torch.zeros((), device=engine.device)
    with engine.coalesce_grad_reduction() if coalesce else contextlib.nullcontext():
        for i in range(accum):
            inputs, targets = next(batches)
            loss = forward(engine, inputs, targets) if forward else engine(inputs, targets)
            if coalesce:  # DeepSpeed counts one micro-step per optimizer step: average the losses here
                engine.backward(loss / accum)
            else:  # DeepSpeed scales by 1/accum and steps the optimizer on the last micro-step
                if ramp:  # its own count of micro-steps finds the last only while their number stays the same
                    engine.set_gradient_accumulation_boundary(i == accum - 1)
                engine.backward(loss)
                engine.step()
            loss_sum += loss.detach().float()
            if parts is not None:
                for name, value in engine.module.last_losses.items():
                    if name != "lm_loss":
                        parts[name] = parts.get(name, 0) + value.float()
    if coalesce:
        engine.step()
    return loss_sum


def compile_blocks(model: Transformer) -> None:
    """torch.compile each block's attention half, its MLP half where that is a dense SwiGLU, and the token loss.
    Methods, not modules, are compiled: the block's call and ZeRO-3's leaf hooks around it stay eager. DeepSpeed
    AutoEP's MoE layer stays eager too: its split plans and collectives run on the host."""
    for block in model.modules():
        if isinstance(block, Block):
            block.attention_residual = torch.compile(block.attention_residual)
            if isinstance(block.mlp, SwiGLU):
                block.mlp_residual = torch.compile(block.mlp_residual)
    model.token_loss = torch.compile(model.token_loss)


def lock_run_dir(run_dir: Path):
    """An exclusive lock on run.dir (its .lock file), or PreflightError naming the process that holds it: two runs in
    one run.dir (a job resubmitted while the old one still runs) wrote one metrics.jsonl and saved into the same
    checkpoint directories, each save deleting the other's of that step first. Returns the open file; the lock goes
    with the process. A filesystem without locks (some NFS mounts) runs unlocked."""
    import fcntl

    file = open(run_dir / ".lock", "a+")  # noqa: SIM115 - open for the whole run: closing it would drop the lock
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or "another process"
        file.close()
        raise PreflightError(f"run.dir: {run_dir} is in use by another training run ({holder} holds "
                             f"{run_dir / '.lock'}): wait for it to end, or use another run.dir") from None
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        return file
    file.truncate(0)
    file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    file.flush()
    return file


def train(cfg: Config) -> int:
    stop = StopSignal()
    started = time.monotonic()
    rank, world, device = init_distributed(cfg)
    heartbeat = cfg.parallel.heartbeat_timeout_minutes
    watch = PeerFailureWatch(rank, world, heartbeat_timeout_seconds=heartbeat * 60 if heartbeat is not None else None,
                             stopping=stop.arrived)
    watch.start()
    try:
        return _train(cfg, rank, world, device, stop, started, watch)
    except StoppedError:  # every rank stops together
        raise
    except Exception as e:
        watch.stop()  # an error every rank raises together (a failed save) must not reach this one's watcher first
        if isinstance(e, torch.OutOfMemoryError):
            from .engine.model_states import describe_out_of_memory
            e = OutOfGpuMemory(f"rank {rank}: " + describe_out_of_memory(cfg, world, str(e), gpu_memory()))
        found = isinstance(e, (CheckpointError, DataError, PreflightError, WandbError, OSError, OutOfGpuMemory))
        # Anything else may be a collective that failed because another rank failed first (gloo: a closed
        # connection): say that instead; a broken connection that no rank explains, as such, not as this rank's own.
        if not found and (peer := watch.peer_failure() or watch.publish_lost_connection(e)):
            raise StoppedError(f"{peer}; rank {rank} stops too") from None
        watch.publish(describe_os_error(e) if isinstance(e, OSError) else str(e) if found
                      else f"{type(e).__name__}: {e}")
        if isinstance(e, OutOfGpuMemory):
            raise e from None
        raise
    finally:
        watch.stop()


def _train(cfg: Config, rank: int, world: int, device: torch.device, stop: StopSignal, started: float,
           watch: PeerFailureWatch) -> int:
    from .data import PretrainDataset, TrainLoader, open_manifest, to_device
    from .data.loader import NewDataError

    check_same_config(cfg, world)
    run_dir = Path(cfg.run.dir)
    failure, error, lock = [None], None, None
    if rank == 0:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock = lock_run_dir(run_dir)  # held until this process exits
            save_config(cfg, run_dir / "config.yaml")
            # for the tools used after training, from any directory (data.path may be relative to this one)
            run_tokenizer.record(open_manifest(cfg.data.sources()[0].path), run_dir)
        except OSError as e:
            failure, error = [f"rank 0 could not write run.dir: {describe_os_error(e)}"], e
        except (PreflightError, DataError) as e:
            failure, error = [f"rank 0: {e}"], e
    if world > 1:  # the others would go on into the engine's collectives and die there (gloo) or wait (NCCL)
        dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error  # main: one line for a full disk, no permission, read-only; a traceback for anything else
    if failure[0]:
        raise StoppedError(failure[0])

    resume_dir = checkpoint.resolve(cfg.train.resume, run_dir)
    meta = checkpoint.verify(resume_dir) if resume_dir else None
    layout = (world, cfg.parallel.expert_parallel_size, cfg.parallel.zero_init)
    reshard = meta is not None and (meta["world_size"], meta["ep_size"], meta.get("zero_init", False)) != layout
    if reshard:
        resume_dir = checkpoint.ensure_universal(resume_dir)

    engine = build_engine(cfg, world, init_from=cfg.train.init_from if resume_dir is None else None,
                          load_universal=reshard)
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)

    sources = cfg.data.sources()
    if cfg.data.verify_checksums:
        verify_checksums(cfg, device)
    loader = TrainLoader([PretrainDataset(s.path, cfg.data.train_split, cfg.data.seq_len)
                          for s in sources], cfg.train.micro_batch_size, dp_rank=rank, dp_world=world,
                         seed=cfg.data.seed, weights=[s.weight for s in sources])
    step, tokens_seen, wandb_id = 0, 0, None
    sequences_per_step = step_sequences(cfg, world)
    sequences_per_micro_step = cfg.train.micro_batch_size * world
    # evaluate() reads the val split's first this many sequences (fewer if the split is shorter)
    eval_sequences = cfg.train.eval_sequences if cfg.train.eval_every else None
    if resume_dir is not None:
        settings = checkpoint.optimizer_settings(engine.optimizer)
        _, client = engine.load_checkpoint(str(resume_dir.parent), tag=resume_dir.name)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {resume_dir}")
        if reshard:
            checkpoint.repair_universal_load(engine.optimizer)
        checkpoint.restore_optimizer_settings(engine.optimizer, engine.lr_scheduler, settings)
        balance.restore_balance_biases(engine.module, client["balance_bias"])  # universal loads drop buffers
        try:
            new_data = loader.load_state_dict(client["loader"], new_data=cfg.data.resume_on_new_data)
        except DataError as e:  # a checkpoint whose meta.json has no loader state: preflight could not refuse it
            hint = NEW_DATA_HINT if isinstance(e, NewDataError) else ""
            raise CheckpointError(f"train.resume: {resume_dir}: {e}{hint}") from None
        if rank == 0 and new_data:
            print(f"data: new training data from sample {loader.phase_start}; samples already read per source: "
                  f"{dict(zip([s.label for s in sources], loader.offsets, strict=True))}", flush=True)
        step, tokens_seen = client["step"], client["tokens_seen"]
        wandb_id = wandb_run_to_resume(client.get("wandb_id"), resume_dir, run_dir,
                                       say=rank == 0 and cfg.run.wandb != "disabled")
        rng_file = resume_dir / "rng" / f"rank_{rank}.pt"
        if not reshard and rng_file.exists():
            checkpoint.set_rng_state(torch.load(rng_file, weights_only=False))
        if rank == 0:
            print(f"resumed from {resume_dir} at step {step}" + (" (universal: resharded)" if reshard else ""), flush=True)
            for line in resume_notes(client, cfg, world, step, eval_sequences, meta.get("settings", {}).get("model")):
                print(line, flush=True)

    # The token clock's end is this run's: from here, on this world, to train.max_steps
    clock = engine.lr_scheduler if isinstance(engine.lr_scheduler, TokenClockLR) else None
    if clock is not None:
        clock.start(tokens_seen, tokens_to_end(cfg, world, step, tokens_seen))
    if rank == 0 and (repeated := repeated_data_line(loader, sources, cfg, step, tokens_seen, world)):
        print(repeated, flush=True)
    if rank == 0 and (accum := grad_accum_steps_at(cfg.train, tokens_seen)) < cfg.train.grad_accum_steps:
        print(f"batch: {accum * sequences_per_micro_step} sequences per optimizer step from here, rising "
              f"to {sequences_per_step} by train.batch_rampup_tokens {cfg.train.batch_rampup_tokens:,} tokens "
              f"({tokens_seen:,} trained on)", flush=True)
    for source in sources if rank == 0 and eval_sequences else ():
        held = open_manifest(source.path).num_samples(cfg.data.val_split, cfg.data.seq_len)
        if held < eval_sequences:
            print(f"eval: split {cfg.data.val_split!r} of {source.path} holds {held} sequences of data.seq_len + 1 "
                  f"tokens, fewer than train.eval_sequences {eval_sequences}: evaluation reads all {held}", flush=True)
    log = MetricsLogger(run_dir, cfg, rank == 0, step, wandb_id)
    peak = peak_flops(cfg.train.peak_tflops)
    last_saved = step if resume_dir is not None else None

    def save(at_step: int) -> None:
        nonlocal last_saved
        if not cfg.train.checkpoints:  # a run nothing resumes: every save point passes
            return
        client = {"step": at_step, "tokens_seen": tokens_seen, "loader": loader.state_dict(),
                  "balance_bias": balance.balance_biases(engine.module), "wandb_id": log.wandb_id,
                  "sequences_per_step": sequences_per_step, "eval_sequences": eval_sequences,
                  "optimizer_settings": optimizer_settings(cfg)}
        # The loader's state in meta.json too, where preflight reads it: a resume on other data is refused before
        # DeepSpeed starts, not once it has loaded the checkpoint (the client state is inside DeepSpeed's files)
        checkpoint.save(engine, run_dir, at_step, client, cfg.parallel.expert_parallel_size, cfg.train.keep_last,
                        cfg.parallel.zero_init, {**resume_settings(cfg), "loader": client["loader"]},
                        keep_every=cfg.train.keep_every)
        last_saved = at_step

    def newest() -> str:  # for a stop without a checkpoint: where to resume
        return "none saved" if last_saved is None else \
            f"the newest is {checkpoint.checkpoints_dir(run_dir) / checkpoint.tag_for(last_saved)}"

    batches = to_device(loader, device)
    exit_reason = None
    if cfg.train.exit_at_step is not None and step >= cfg.train.exit_at_step:
        exit_reason = "train.exit_at_step"  # resumed at or past it (a job started again): no step past it
    nonfinite = 0  # steps in a row with a non-finite loss or gradient norm
    profiler = (StepProfiler(cfg.train.profile_start_step, cfg.train.profile_steps, run_dir, rank, device)
                if cfg.train.profile_start_step else None)
    while step < cfg.train.max_steps and not exit_reason:
        if profiler is not None:
            profiler.before_step(step + 1)
        t0 = time.perf_counter()
        accum = grad_accum_steps_at(cfg.train, tokens_seen)
        tokens_per_step = accum * sequences_per_micro_step * cfg.data.seq_len
        if clock is not None:
            clock.begin_step(tokens_per_step)
        lr = engine.get_lr()[0]  # the rate this step runs at: the scheduler moves on inside the step
        # Summed on device: one host sync per step, not per micro-step.
        parts = {}  # mtp_loss, balance_loss: summed over the micro-steps, as the loss
        skipped_before = engine.skipped_steps
        loss_sum = train_step(engine, cfg, batches, parts=parts, accum=accum)
        step += 1
        tokens_seen += tokens_per_step
        skipped = engine.skipped_steps > skipped_before  # non-finite gradients: the same on every rank
        layer_loads = balance.update_balance(engine.module, cfg.model.moe.bias_update_rate, applied=not skipped)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if profiler is not None:
            profiler.after_step(step)
        grad_norm = engine.get_global_grad_norm()
        means = mean_over_ranks({name: v.double() / accum
                                 for name, v in {"loss": loss_sum, **parts}.items()})
        record = {
            "step": step,
            "loss": means.pop("loss"),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_seen": tokens_seen,
            "batch_sequences": accum * sequences_per_micro_step,  # all ranks: below the full batch during a ramp
            "tokens_per_s": tokens_per_step / dt,
            "mfu": flops_per_token * tokens_per_step / dt / (peak * world) if peak else None,
            "peak_mem_gib": peak_memory_gib(),
            "expert_load": max(layer_loads.values()) if layer_loads else None,  # the worst layer's
            **(layer_loads or {}),
            "step_time_s": dt,
            "skipped_steps": engine.skipped_steps,  # in the whole run, resumes included
            "time": time.time(),  # when the step was logged: wall-clock rates over many steps (bench/train_loop_rate.sh)
            **data_epochs(loader, sources, loader.consumed_samples),
            **means,
        }
        if cfg.train.eval_every and (step % cfg.train.eval_every == 0 or step == cfg.train.max_steps):
            record.update(evaluate(engine, cfg, rank, world, device))
        log.log(record, cfg.train.log_every)
        nonfinite = nonfinite + 1 if skipped or not math.isfinite(record["loss"]) else 0
        if nonfinite and nonfinite == cfg.train.max_nonfinite_steps:
            log.close()
            raise StoppedError(
                f"steps {step - nonfinite + 1}-{step}: the loss or gradient norm was not finite at {nonfinite} steps "
                f"in a row (train.max_nonfinite_steps); stopped without a checkpoint ({newest()}; skipped steps leave "
                "the weights as they were). Resume with a lower train.lr, a longer train.warmup_steps or a smaller "
                "train.grad_clip")

        timed_out = cfg.train.exit_after_minutes is not None and time.monotonic() - started > 60 * cfg.train.exit_after_minutes
        # Agreed apart: a rank that did not get the signal itself must not report a time limit.
        signalled, timed_out, unlogged = agree([stop.received is not None, timed_out, log.failure is not None], device)
        if unlogged:  # rank 0's metrics.jsonl: a full disk would fail the checkpoint too
            log.close()
            raise StoppedError(f"{log.failure or 'rank 0 could not write its metrics.jsonl'}: stopped at step {step} "
                               f"without a checkpoint ({newest()})")
        if signalled or timed_out:
            exit_reason = "signal" if signalled else "time limit"
        elif cfg.train.exit_at_step is not None and step >= cfg.train.exit_at_step:
            exit_reason = "train.exit_at_step"
        if exit_reason or step == cfg.train.max_steps or (cfg.train.save_every and step % cfg.train.save_every == 0):
            save(step)
        if exit_reason:
            break

    said = profiler.close() if profiler is not None else None
    if rank == 0 and said:
        print(said, flush=True)
    if last_saved != step:
        save(step)
    log.close()
    if rank == 0:
        saved = (f"checkpoint {checkpoint.tag_for(step)}" if cfg.train.checkpoints
                 else "no checkpoint (train.checkpoints: false)")
        print(f"stopped at step {step}: {exit_reason or 'train.max_steps reached'}; {saved}", flush=True)
    watch.stop()  # before the barrier: past it rank 0, and with it the store, may be gone before this rank leaves
    dist.barrier()
    if lock is not None:
        lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except (ConfigError, PreflightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check_only:
        print(f"ok: {args.config} is valid", flush=True)
        return 0
    # torch 2.13 deprecates collectives DeepSpeed 0.19.8 calls several times a step: noise a user cannot act on
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)
    try:
        return train(cfg)
    except (CheckpointError, PreflightError, StoppedError, DataError, WandbError, OutOfGpuMemory) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in WRITE_REFUSED:  # anything else is not the user's to fix: keep its traceback
            raise
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    finally:
        # A rank leaving with its gloo/NCCL group alive can abort at exit ("terminate called ...").
        if dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End the process with `code` once its work is done, without the interpreter's finalization. There, a C++
    thread still alive that takes the GIL (a process group's worker dropping its last tensor, say) is stopped by
    Python mid-destructor and the process aborts after a successful run: "terminate called without an active
    exception", exit -6, seen once in CI after a rank had saved its checkpoint. What a normal exit does before
    that point is done here: the atexit callbacks (torch.compile's worker pools among them) and flushing stdout
    and stderr."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_process(main())
