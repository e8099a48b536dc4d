"""Where a training step's time goes, from a torch profiler run with stacks: GPU busy vs idle, the host
syncs (what waits on the GPU, from which line of Python), the heaviest kernels and CPU ops.

    summarize(prof, steps)   # prof: torch.profiler.profile(..., with_stack=True) over `steps` steps

From a trace `gpu_bench.py --profile` wrote into $OUT, every kernel (not only the heaviest 40), for two runs'
traces to be set side by side:

    python bench/profile_summary.py trace_rank0.json.gz --micro-steps 16

Sync sites and the Python-function table come from the profiler's Python events: torch 2.13 on CPU records
them; on the H100 image (torch 2.11 + CUDA 13) they were absent, so sites print as "(no Python frame)".

A host sync stalls the CPU until the GPU drains; the GPU then idles until the CPU has queued work
again, so under ZeRO-3's per-module Python hooks every sync costs the launch latency of what follows.
"""
from __future__ import annotations

import argparse
import gzip
import json
import sys
from collections import defaultdict

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
OWN_CODE_SKIP = ("torch/nn/modules/module.py", "torch/autograd", "torch/_tensor.py", "<built-in", "torch/utils/_",
                 "torch/profiler", "contextlib.py", "<frozen")


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, e in sorted(intervals):
        if e <= end:
            continue
        total += e - max(s, end)
        end = e
    return total


def _own_python(evt) -> bool:
    """A Python-call event (the profiler names them `file.py(line): function`) outside torch's plumbing."""
    return ".py(" in evt.name and not any(s in evt.name for s in OWN_CODE_SKIP)


def _site(evt) -> str:
    """The few innermost Python frames (outside torch's plumbing) that led to this runtime call; the
    profiler records Python calls as events, parents of the ops they run."""
    frames, node = [], evt.cpu_parent
    while node is not None and len(frames) < 3:
        if _own_python(node):
            frames.append(node.name.split("site-packages/")[-1])
        node = node.cpu_parent
    return " <- ".join(frames) or f"{evt.name} (no Python frame)"


def _collectives(kernels, busy: float, wall: float, steps: int, out) -> None:
    """NCCL kernel time by collective (SendRecv = AutoEP's all-to-all; AllGather / ReduceScatter = ZeRO-3), and
    the exposed part: GPU time in which only collectives ran. A collective kernel's span includes waiting for
    its peers, so the per-collective figures are upper bounds; the exposed figure is what the step pays."""
    comm = [e for e in kernels if e.name.startswith(("ncclDevKernel_", "ncclKernel_"))]
    if not comm:
        return
    by_kind: dict[str, float] = defaultdict(float)
    for e in comm:
        kind = e.name.split("(")[0].split("_")[1]
        by_kind[kind + " (all-to-all)" if kind == "SendRecv" else kind] += e.time_range.end - e.time_range.start
    comm_ids = {id(e) for e in comm}
    compute = _union_us([(e.time_range.start, e.time_range.end) for e in kernels if id(e) not in comm_ids])
    exposed = busy - compute
    print(f"collectives: exposed {exposed / steps / 1e3:.1f} ms/micro-step ({100 * exposed / wall:.1f}% of wall); "
          "kernel time by kind (ms per micro-step, % of wall):", file=out)
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {us / steps / 1e3:7.2f} {100 * us / wall:5.1f}%  {kind}", file=out)


# Kernel classes by name, first match wins. The GEMMs come first: cuBLAS's FP8 kernels are nvjet's "qq"/"qr" tiles,
# CUTLASS's carry "f8"; our Triton GEMMs (grouped_mm.py's ragged kernel, grouped_wgrad.py's) run in the precision
# of their operands, which their names do not say (bf16's gate/up GEMM has the SwiGLU in its epilogue).
KERNEL_CLASSES = (
    ("GEMM, FP8 (cuBLAS, CUTLASS)", ("_qqtst", "_qrtst", "_rqtst", "f8_f8", "e4m3")),
    ("GEMM, ours in Triton (bf16 or FP8 operands)", ("_ragged_mm_kernel", "_grouped_wgrad_kernel",
                                                     "_gate_up_swiglu_kernel")),
    ("GEMM, bf16 (cuBLAS, CUTLASS)", ("nvjet", "cutlass", "gemm", "xmma")),
    ("attention (SDPA)", ("sdpa", "fmha", "flash", "attention")),
    ("collectives (NCCL)", ("nccl",)),
    ("optimizer (AdamW)", ("adam",)),
    ("copies and fills", ("memcpy", "memset", "direct_copy_kernel", "fill_kernel")),
)


def kernel_class(name: str) -> str:
    lower = name.lower()
    return next((cls for cls, marks in KERNEL_CLASSES if any(m.lower() in lower for m in marks)),
                "other (pointwise, norms, casts, reductions)")


def _classes(kernels, steps: int, out) -> None:
    """GPU time by kernel class: what a faster GEMM or FP8 can still shrink against what it cannot."""
    by_class: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_class[kernel_class(e.name)].append(e.time_range.end - e.time_range.start)
    total = sum(map(sum, by_class.values()))
    print("GPU time by kernel class (ms per micro-step, % of kernel time, launches per micro-step):", file=out)
    for cls, ds in sorted(by_class.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(ds) / steps / 1e3:7.2f} {100 * sum(ds) / total:5.1f}% {len(ds) / steps:6.0f}  {cls}", file=out)


def _gpu_kernels(events) -> list:
    """The GPU kernels and copies among a profile's events, by start time. User annotations (e.g.
    "Optimizer.step#AdamW.step") are recorded on the GPU too, spanning the kernels they contain: left out."""
    return sorted((e for e in events if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)),
                  key=lambda e: e.time_range.start)


def _gaps(spans: list[tuple[float, float]]):
    """For spans (start, end) sorted by start, each stretch where none runs: (its start, its length, the index of
    the span that ended last before it, the index of the span that ends it)."""
    end, last = spans[0][1], 0
    for i, (start, stop) in enumerate(spans[1:], 1):
        if start > end:
            yield end, start - end, last, i
        if stop > end:
            end, last = stop, i


def _launcher(op) -> str:
    """The CPU op that launched a kernel and up to three of its ancestors (Python frames where the profiler has
    them): the host work the GPU was waiting for."""
    names, node = [], op
    while node is not None and len(names) < 4:
        names.append(node.name.split("site-packages/")[-1][:70])
        node = node.cpu_parent
    return " < ".join(names) or "(launch not linked to an op)"


def _kernel_launches(prof) -> list[tuple[float, float, int]]:
    """(start us, end us, id of the CPU op that launched it) for every GPU kernel and copy, from the profiler's raw
    events: torch 2.11's FunctionEvent drops the launch link."""
    from torch._C._autograd import DeviceType
    found = []
    for e in prof.profiler.kineto_results.events():
        annotation = getattr(e, "is_user_annotation", lambda: False)()
        if e.device_type() == DeviceType.CUDA and not annotation:
            found.append((e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.linked_correlation_id()))
    return sorted(found)


def _idle_gaps(prof, cpu, steps: int, out, min_gap_us: float = 5.0) -> None:
    """GPU idle time by what ended it: every gap between kernels is charged to the op that launched the kernel after
    it, which the host had not queued in time. Where the host runs ahead, kernels follow each other without gaps."""
    ops = {e.id: e for e in cpu}
    launches = _kernel_launches(prof)
    gaps: dict[str, list[float]] = defaultdict(list)
    for _, gap, _, after in _gaps([(start, stop) for start, stop, _ in launches]):
        if gap > min_gap_us:
            gaps[_launcher(ops.get(launches[after][2]))].append(gap)
    total = sum(map(sum, gaps.values()))
    print(f"GPU idle gaps over {min_gap_us:g} us: {total / steps / 1e3:.2f} ms/micro-step; by the op launched after "
          "the gap (ms per micro-step, gaps per micro-step):", file=out)
    for site, ds in sorted(gaps.items(), key=lambda kv: -sum(kv[1]))[:30]:
        print(f"  {sum(ds) / steps / 1e3:7.2f} {len(ds) / steps:6.1f}  {site}", file=out)


def gpu_timeline(prof, steps: int, lead_in: int, out=sys.stderr, top: int = 12) -> None:
    """GPU busy against the wall of a profile that recorded kernels only (CUDA activity, no CPU ops or stacks: the
    host runs at nearly its own speed), and where the idle time lies: the longest gaps between kernels, with what
    ran before and after each and when in the window. The profile holds `lead_in` micro-steps and then `steps`,
    queued back to back as training queues them; the window is the last `steps`, from the end of the lead-in's
    last kernel (its kernels: their share of the count, every micro-step launching the same ones). A window that
    started with the profile would start with an idle GPU and a host that has no head start on it, and blame the
    step's start for a wait that training overlaps."""
    kernels = _gpu_kernels(prof.events())
    cut = round(len(kernels) * lead_in / (lead_in + steps))
    if len(kernels) <= cut or cut == 0:
        print(f"profile: {len(kernels)} GPU kernels recorded, too few for a lead-in of {lead_in} micro-steps", file=out)
        return
    window = kernels[cut:]
    spans = [(e.time_range.start, e.time_range.end) for e in window]
    start = max(e.time_range.end for e in kernels[:cut])
    busy, end = _union_us([(max(a, start), b) for a, b in spans]), max(stop for _, stop in spans)
    # A zero-length span at `start` first: a gap before the window's first kernel counts too.
    names = ["(the lead-in's last kernel)"] + [e.name for e in window]
    gaps = [(gap, at - start, names[before], names[after]) for at, gap, before, after in _gaps([(start, start), *spans])]
    wall = end - start
    print(f"timeline over {steps} micro-steps after {lead_in} (steady state): wall {wall / steps / 1e3:.2f} ms/micro-step "
          f"(the GPU's clock), GPU busy {busy / steps / 1e3:.2f}, idle {(wall - busy) / steps / 1e3:.2f}", file=out)
    for floor in (10, 100, 1000):
        big = [g for g in gaps if g[0] >= floor]
        print(f"  gaps of {floor} us or more: {len(big) / steps:.1f} per micro-step, "
              f"{sum(g[0] for g in big) / steps / 1e3:.2f} ms per micro-step", file=out)
    print(f"  the {top} longest (us, ms into the window, kernel before -> kernel after):", file=out)
    for gap, at, before, after in sorted(gaps, reverse=True)[:top]:
        print(f"  {gap:8.0f} {at / 1e3:8.1f}  {before[:60]} -> {after[:60]}", file=out)


def summarize(prof, steps: int, out=sys.stderr) -> None:
    events = prof.events()
    kernels = _gpu_kernels(events)
    cpu = [e for e in events if e.device_type.name == "CPU"]
    if not kernels:
        print("profile: no GPU kernels recorded", file=out)
        return
    t0 = min(e.time_range.start for e in cpu)
    t1 = max(max(e.time_range.end for e in kernels), max(e.time_range.end for e in cpu))
    busy = _union_us([(e.time_range.start, e.time_range.end) for e in kernels])
    wall = t1 - t0
    print(f"profile over {steps} micro-steps: wall {wall / steps / 1e3:.1f} ms/micro-step, GPU busy {busy / steps / 1e3:.1f} ms/micro-step "
          f"({100 * busy / wall:.0f}%), GPU idle {(wall - busy) / steps / 1e3:.1f} ms/micro-step", file=out)

    _collectives(kernels, busy, wall, steps, out)
    _idle_gaps(prof, cpu, steps, out)

    syncs: dict[str, list[float]] = defaultdict(list)
    for e in cpu:
        if e.name in SYNC_CALLS:
            syncs[_site(e)].append(e.time_range.end - e.time_range.start)
    n = sum(len(v) for v in syncs.values())
    print(f"host syncs: {n / steps:.1f} per micro-step, CPU waiting {sum(map(sum, syncs.values())) / steps / 1e3:.1f} ms/micro-step; "
          "by site (count per micro-step, wait ms per micro-step):", file=out)
    for site, waits in sorted(syncs.items(), key=lambda kv: -sum(kv[1]))[:25]:
        print(f"  {len(waits) / steps:5.1f} {sum(waits) / steps / 1e3:7.2f}  {site}", file=out)

    by_kernel: dict[str, list[float]] = defaultdict(list)
    for e in kernels:
        by_kernel[e.name[:90]].append(e.time_range.end - e.time_range.start)
    print("heaviest GPU kernels (ms per micro-step, launches per micro-step):", file=out)
    for name, ds in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:40]:
        print(f"  {sum(ds) / steps / 1e3:7.2f} {len(ds) / steps:6.0f}  {name}", file=out)
    print(f"kernel launches per micro-step: {len(kernels) / steps:.0f}", file=out)
    _classes(kernels, steps, out)

    inclusive: dict[str, list[float]] = defaultdict(list)
    for e in cpu:
        if _own_python(e):
            inclusive[e.name.split("site-packages/")[-1]].append(e.time_range.end - e.time_range.start)
    print("Python functions by inclusive CPU time (ms per micro-step, calls per micro-step):", file=out)
    for name, ds in sorted(inclusive.items(), key=lambda kv: -sum(kv[1]))[:45]:
        print(f"  {sum(ds) / steps / 1e3:7.2f} {len(ds) / steps:6.0f}  {name[:110]}", file=out)


def trace_kernels(path: str, steps: int, out=sys.stdout) -> None:
    """Every GPU kernel, copy and fill of a chrome trace (gzipped or not) with its time and launches per
    micro-step, heaviest first, after the time of each kernel class."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    by_kernel: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e:
            by_kernel[e["name"]].append(e["dur"])
    by_class: dict[str, float] = defaultdict(float)
    for name, ds in by_kernel.items():
        by_class[kernel_class(name)] += sum(ds)
    total = sum(by_class.values())
    print(f"kernel time {total / steps / 1e3:.2f} ms per micro-step; by class (ms per micro-step, % of it):", file=out)
    for cls, us in sorted(by_class.items(), key=lambda kv: -kv[1]):
        print(f"  {us / steps / 1e3:7.2f} {100 * us / total:5.1f}%  {cls}", file=out)
    print("every kernel (ms per micro-step, launches per micro-step):", file=out)
    for name, ds in sorted(by_kernel.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {sum(ds) / steps / 1e3:8.3f} {len(ds) / steps:7.1f}  {name[:150]}", file=out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="every GPU kernel of a profiler trace, by time per micro-step")
    parser.add_argument("trace", help="a chrome trace (.json or .json.gz), as gpu_bench.py --profile writes into $OUT")
    parser.add_argument("--micro-steps", type=int, required=True, help="how many micro-steps the profile holds")
    args = parser.parse_args()
    trace_kernels(args.trace, args.micro_steps)
