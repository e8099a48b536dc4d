"""One training-throughput measurement on this GPU: deepseek_pt's engine or the HF peer, same shape.

    python bench/gpu_bench.py --impl ours|hf [--config configs/bench-2b.yaml] [--steps N] [key=value ...]

Both go through DeepSpeed ZeRO-3 with the optimizer, clipping and precision our config generates, and
the training loop's optimizer step (deepseek_pt.train.train_step, so parallel.coalesce_grad_reduction
applies to both); `ours` is exactly what `python -m deepseek_pt.train` builds (build_engine), `hf` is
transformers' DeepseekV3ForCausalLM of the same shape. Four fixed batches of random tokens in turn, in host memory
and moved to the device each micro-step as training moves its batches (deepseek_pt.data.to_device: pinned, without a
host wait); `--batches pageable` copies them as the training loop did before (a stream sync per copy), `--batches
device` keeps them on the device (no copy at all, as this script did before).
Prints one JSON line: tokens/s, MFU (our FLOP count of the shape, dense bf16 peak), peak memory. It runs on a
CPU too (peak memory is then the process's peak RSS): tests/test_bench.py runs it there, so that a device call
does not find its bugs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from deepseek_pt.config import Config, load_config  # noqa: E402
from deepseek_pt.data import to_device  # noqa: E402
from deepseek_pt.engine.ds_config import build_ds_config  # noqa: E402
from deepseek_pt.engine.lr_schedule import lr_scheduler  # noqa: E402
from deepseek_pt.engine.metrics import peak_flops, peak_memory_gib  # noqa: E402
from deepseek_pt.model.counting import train_flops_per_token  # noqa: E402
from deepseek_pt.engine.distributed import init_distributed  # noqa: E402
from deepseek_pt.train import build_engine, exit_process, param_groups, train_step  # noqa: E402


def hf_engine(cfg: Config, world: int):
    """The peer: HF DeepseekV3ForCausalLM of our shape under the same DeepSpeed config (no AutoEP) and schedule."""
    import deepspeed
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    m, a, moe = cfg.model, cfg.model.attention, cfg.model.moe
    hf_cfg = DeepseekV3Config(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.inter_dim, moe_intermediate_size=moe.expert_inter_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_heads,
        n_shared_experts=moe.n_shared_experts, n_routed_experts=moe.n_routed_experts, num_experts_per_tok=moe.top_k,
        n_group=moe.n_expert_groups, topk_group=moe.n_limited_groups, routed_scaling_factor=moe.route_scale,
        first_k_dense_replace=moe.n_dense_layers, norm_topk_prob=moe.norm_topk_prob, q_lora_rank=a.q_lora_rank or None,
        kv_lora_rank=a.kv_lora_rank, qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim,
        v_head_dim=a.v_head_dim, max_position_embeddings=m.max_seq_len, tie_word_embeddings=False)
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(cfg.train.seed)
    model = DeepseekV3ForCausalLM(hf_cfg)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, cfg.train.weight_decay),
                                      config=build_ds_config(cfg, world, has_moe=False),
                                      lr_scheduler=lr_scheduler(cfg, world))
    return engine


def ds_patch_problem(item: str) -> str | None:
    """Why `--ds item` cannot patch the generated DeepSpeed config (None if it can). A zero_optimization key that
    DeepSpeed does not know would otherwise fail deep inside deepspeed.initialize, after the model is built."""
    key, eq, _ = item.partition("=")
    if not (eq and key):
        return f"--ds {item}: takes dotted.key=value"
    section, *rest = key.split(".")
    if section == "zero_optimization" and len(rest) == 1:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        fields = DeepSpeedZeroConfig.model_fields
        if rest[0] not in set(fields) | {f.alias for f in fields.values() if f.alias}:
            return f"--ds {item}: DeepSpeed's zero_optimization has no key {rest[0]!r}"
    return None


def patch_ds_config(items: list[str]) -> None:
    import yaml

    if problems := [problem for item in items if (problem := ds_patch_problem(item))]:
        raise SystemExit("\n".join(problems))

    import deepseek_pt.train as train_module
    generate = train_module.build_ds_config

    def patched(*a, **kw):
        ds = generate(*a, **kw)
        for item in items:
            key, _, value = item.partition("=")
            *parents, leaf = key.split(".")
            node = ds
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = yaml.safe_load(value)
        return ds
    train_module.build_ds_config = patched


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impl", choices=["ours", "hf"], required=True)
    parser.add_argument("--config", default="configs/bench-2b.yaml")
    parser.add_argument("--steps", type=int, default=12, help="timed micro-steps (rounded up to whole optimizer steps)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed micro-steps first (rounded up likewise)")
    parser.add_argument("--profile", action="store_true",
                        help="print the top kernels and CPU ops of one optimizer step (torch profiler)")
    parser.add_argument("--cprofile", action="store_true",
                        help="print the Python functions that take the host's time over 3 optimizer steps (cProfile; "
                             "the main thread only, not the autograd thread that runs backward hooks)")
    parser.add_argument("--timeline", action="store_true",
                        help="print GPU busy against the wall of one optimizer step, queued behind another as in "
                             "training, and its longest idle gaps (a kernels-only profile: the host runs at nearly "
                             "its own speed, which --profile's does not)")
    parser.add_argument("--ds", action="append", default=[], metavar="dotted.key=value",
                        help="patch the generated DeepSpeed config (to measure a knob before it becomes a config key)")
    parser.add_argument("--engine-compile", action="store_true",
                        help="engine.compile() after initialize: torch.compile of the whole model, or DeepCompile "
                             "with --ds compile.deepcompile=true")
    parser.add_argument("--batches", choices=["pinned", "pageable", "device"], default="pinned",
                        help="how the batches reach the device: as training moves them (pinned), through pageable "
                             "memory (a stream sync per copy), or already there")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # the launcher's
    parser.add_argument("overrides", nargs="*")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the flags


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29561"}.items():
        os.environ.setdefault(k, v)
    if args.timeline and not torch.cuda.is_available():
        sys.exit("gpu_bench.py: --timeline times GPU kernels, and this machine has no GPU")
    cfg = load_config(args.config, ["train.grad_accum_steps=1", *args.overrides])
    if args.ds:
        patch_ds_config(args.ds)
    rank, world, device = init_distributed(cfg)

    def progress(what: str) -> None:  # to stderr: where a case that ran out of time got to
        if rank == 0:
            print(f"[{time.perf_counter() - started:.0f} s] {what}", file=sys.stderr, flush=True)

    engine = build_engine(cfg, world) if args.impl == "ours" else hf_engine(cfg, world)
    progress("engine built")
    if args.engine_compile:
        engine.compile()
    B, T, V, accum = cfg.train.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size, cfg.train.grad_accum_steps
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, V, (B, T + 1), generator=gen) for _ in range(4)]
    host = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
    if args.batches == "device":
        batches = itertools.cycle([(x.to(device), y.to(device)) for x, y in host])
    elif args.batches == "pageable":
        batches = ((x.to(device), y.to(device)) for x, y in itertools.cycle(host))
    else:
        batches = to_device(itertools.cycle(host), device)
    # The same optimizer step as training (train_step); the peer's call differs: HF shifts the labels itself.
    forward = None if args.impl == "ours" else lambda engine, inputs, _: engine(input_ids=inputs, labels=inputs.clone()).loss

    def synchronize() -> None:  # a CPU (CI runs this script on one) computes eagerly
        if device.type == "cuda":
            torch.cuda.synchronize()

    def run(micro_steps: int) -> torch.Tensor:
        """Whole optimizer steps covering `micro_steps`; the last one's mean loss (0 if none ran)."""
        loss = torch.zeros((), device=device)
        for _ in range(-(-micro_steps // accum)):
            loss = train_step(engine, cfg, batches, forward) / accum
        return loss

    if args.warmup > 0:  # the first optimizer step alone: it carries the compiling and autotuning
        run(1)
        synchronize()
        progress("first optimizer step done")
    run(max(0, args.warmup - accum))
    synchronize()
    progress("warm-up done")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the timed steps' peak; on a CPU, the process's peak RSS
    timed = -(-args.steps // accum) * accum
    t0 = time.perf_counter()
    loss = run(timed)
    synchronize()
    dt = (time.perf_counter() - t0) / timed
    if args.cprofile:
        import cProfile
        import pstats
        profiler = cProfile.Profile()
        profiler.enable()
        run(3 * accum)
        synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
    if args.timeline:
        from profile_summary import gpu_timeline
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(2 * accum)  # a lead-in step, then the step the timeline is of
            synchronize()
        gpu_timeline(prof, accum, lead_in=accum)
    if args.profile:
        from profile_summary import summarize
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            run(accum)
            synchronize()
        summarize(prof, steps=accum)  # per micro-step
        table = prof.key_averages()
        print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60), file=sys.stderr)
        if os.environ.get("OUT"):
            # gzipped (Perfetto and chrome://tracing read it so): a step's trace is hundreds of MB of JSON, and a
            # device call brings back files of up to 16 MiB
            prof.export_chrome_trace(os.path.join(os.environ["OUT"], f"trace_rank{rank}.json.gz"))
    tokens_per_s = B * T * world / dt
    flops = train_flops_per_token(cfg.model, T)
    peak = peak_flops(cfg.train.peak_tflops)
    if rank != 0:
        return
    settings = (args.overrides + [f"ds:{d}" for d in args.ds] + ["engine.compile()"] * args.engine_compile
                + [f"batches:{args.batches}"] * (args.batches != "pinned"))
    print(json.dumps({"impl": args.impl, "gpus": world, "precision": cfg.precision, "seq": T, "micro_batch": B,
                      "tokens_per_s": round(tokens_per_s), "mfu": round(flops * tokens_per_s / (peak * world), 4) if peak else None,
                      "peak_mem_gib": round(peak_memory_gib(), 2), "step_ms": round(dt * 1e3, 1),
                      "loss": round(float(loss), 4), "overrides": settings}), flush=True)


if __name__ == "__main__":
    try:
        main()
    finally:  # as training does: a process leaving with its NCCL group alive can abort or hang at exit, and so
        # can one that runs the interpreter's finalization (exit_process)
        import faulthandler
        faulthandler.dump_traceback_later(30)  # a teardown slower than this prints where it waits, into stderr
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    exit_process(0)
