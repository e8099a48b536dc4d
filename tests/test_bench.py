"""The device calls' scripts on CPU. The loss comparison: runs side by side (PARALLEL=1), each run's metrics, the
summary table, and the curve of a run that a device call's limit cut off. The throughput benchmark: the peer and
our engine on one shape, the side-by-side table, every case file's lines, and --ds patches that DeepSpeed would
refuse. The training loop's wall-clock rate. ZeRO-3's hook timer. Issue 6's multi-GPU check, on 2 CPU processes. The
gradients' determinism probe."""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ROOT, finish_job, free_port, job_env, kill_job, start_job, wait_until


def _script_env(out_dir: Path, **extra: str) -> dict:
    """A device script's environment here: $OUT, a free port, this interpreter's venv first on PATH (the scripts call
    python3), and TMPDIR inside the test's tmp_path, so that what a killed run leaves stays there."""
    (out_dir / "tmp").mkdir(exist_ok=True)
    return job_env(OUT=str(out_dir), TMPDIR=str(out_dir / "tmp"), MASTER_PORT=str(free_port()),
                   PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]), **extra)


def _bench_module(name: str, monkeypatch) -> object:
    """bench/NAME.py imported as a module (bench/ is scripts, not a package), registered under its name, which
    torch.compile looks the module up by."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return module


def _loss_check_env(out_dir: Path, **extra: str) -> dict:
    return _script_env(out_dir, CONFIG="configs/smoke.yaml", PARALLEL="1", **extra)


@pytest.mark.slow
def test_fp8_loss_check_compares_runs_started_side_by_side(tmp_path, pydoc_data_dir):
    # smoke compiles nothing, so bf16_eager is bf16 again: the same losses to the last bit, as a rerun on one
    # machine must give; fp8_blockwise (emulated here) must differ from both, and FP8 in
    # the routed experts as well (fp8_blockwise_experts) from that.
    env = _loss_check_env(tmp_path, RUNS="bf16 bf16_eager fp8_blockwise fp8_blockwise_experts", RUN_TIMEOUT="150")
    proc = start_job(["bash", ROOT / "bench/fp8_loss_check.sh", pydoc_data_dir.shards_dir, 8, "data.seq_len=64",
                      "train.micro_batch_size=2", "train.eval_every=4", "train.eval_sequences=2",
                      "parallel.expert_parallel_size=1"], env)
    out, _ = finish_job(proc, timeout=200)
    assert proc.returncode == 0 and "FAILED" not in out, out
    rows = [line for line in out.splitlines() if re.match(r"\| \d+-\d+ \|", line)]
    assert [r.split(" | ")[0] for r in rows] == [f"| {s}-{s}" for s in range(1, 9)] + ["| 5-8"], out
    # bf16, eager, blockwise, + experts, then each against bf16
    cells = [row.strip("| ").split(" | ")[1:] for row in rows]
    assert all(eager == bf16 and eager_rel == "+0.00%" for bf16, eager, _, _, eager_rel, *_ in cells), out
    assert any(blockwise != bf16 for bf16, _, blockwise, *_ in cells), out
    assert any(experts != blockwise for _, _, blockwise, experts, *_ in cells), out
    assert "fp8: routed experts of 1 MoE layer" in (tmp_path / "train_fp8_blockwise_experts.log").read_text()
    for name in ("bf16", "bf16_eager", "fp8_blockwise", "fp8_blockwise_experts"):
        assert (tmp_path / f"metrics_{name}.jsonl").read_text().count("\n") == 8
        log = (tmp_path / f"train_{name}.log").read_text()
        assert "stopped at step 8: train.max_steps reached; no checkpoint (train.checkpoints: false)" in log
        assert "compile: Inductor's deterministic mode (train.compile_deterministic)" in log  # what the runs share
        held_out = "" if name == "bf16" else r"; held-out vs bf16: [-+][\d.]+% at step 8 \(.* over 2 evaluations\)"
        assert re.search(rf"^{name}: 8 steps, .*eval loss at step 4: [\d.]+, 8: [\d.]+{held_out}$", out, re.M), out


@pytest.mark.slow
def test_fp8_loss_check_says_what_each_run_sets(tmp_path, pydoc_data_dir):
    # The run names compose (fp8_RECIPE[_experts[_shared]][_attn][_dense][_wgrad|_wgradrow][_fast]): a CPU trains the
    # first (the routed and shared experts, the attention projections and the dense MLP emulated, which leaves
    # torchao's recipe no linear); the config refuses fast accumulation for blockwise, and FP8 weight gradients
    # without the linears they are for, each in its run's log.
    first = "fp8_rowwise_experts_shared_attn_dense_wgrad_fast"
    env = _loss_check_env(tmp_path, RUNS=f"{first} fp8_blockwise_fast fp8_tensorwise_wgradrow", RUN_TIMEOUT="120")
    out, _ = finish_job(start_job(["bash", ROOT / "bench/fp8_loss_check.sh", pydoc_data_dir.shards_dir, 1,
                                  "data.seq_len=64", "parallel.expert_parallel_size=1"], env), 180)
    lines = out.splitlines()
    assert (f"{first}: precision=fp8 fp8.layers=all fp8.fast_accum=all fp8.linear_weight_grads=fp8 fp8.dense_mlp=true "
            "fp8.attention=true fp8.shared_experts=true fp8.experts=true fp8.recipe=rowwise") in lines, out
    assert "fp8_blockwise_fast: precision=fp8 fp8.layers=all fp8.fast_accum=all fp8.recipe=blockwise" in lines, out
    assert ("fp8_tensorwise_wgradrow: precision=fp8 fp8.layers=all fp8.linear_weight_grads=fp8_rowwise "
            "fp8.recipe=tensorwise") in lines, out
    assert f"FAILED: {first}" not in lines and "FAILED: fp8_blockwise_fast" in lines, out
    assert "FAILED: fp8_tensorwise_wgradrow" in lines, out
    assert "fp8.linear_weight_grads: fp8_rowwise applies to the linears of fp8.attention" in (
        tmp_path / "train_fp8_tensorwise_wgradrow.log").read_text()
    assert (tmp_path / f"metrics_{first}.jsonl").read_text().count("\n") == 1
    log = (tmp_path / f"train_{first}.log").read_text()
    assert "fp8: routed experts of 1 MoE layer" in log and "fp8: shared experts of 1 MoE layer" in log
    assert "attention projections" in log and "dense MLP projections" in log and "weight gradients in FP8" in log
    assert "fp8: no linear left for fp8.recipe=rowwise beside our FP8 paths (below)" in log
    assert "fp8.fast_accum: 'all' applies to torchao's tensorwise and rowwise recipes" in (
        tmp_path / "train_fp8_blockwise_fast.log").read_text()


@pytest.mark.slow
def test_fp8_loss_check_compares_each_seed_with_its_own_bf16(tmp_path, pydoc_data_dir):
    # _seedN on any run sets train.seed; an FP8 run is held against the bf16 of its seed, a bf16 of another seed
    # against seed 0's, so that a table of several seeds gives FP8's gap and bf16's own spread side by side.
    env = _loss_check_env(tmp_path, RUNS="bf16 bf16_seed1 fp8_tensorwise_seed1", RUN_TIMEOUT="120")
    out, _ = finish_job(start_job(["bash", ROOT / "bench/fp8_loss_check.sh", pydoc_data_dir.shards_dir, 2,
                                  "data.seq_len=64", "train.micro_batch_size=2", "parallel.expert_parallel_size=1"],
                                 env), 180)
    lines = out.splitlines()
    assert "bf16_seed1: precision=bf16 train.seed=1" in lines, out
    assert "fp8_tensorwise_seed1: precision=fp8 fp8.layers=all fp8.recipe=tensorwise train.seed=1" in lines, out
    assert ("| steps (mean train loss) | bf16 | bf16_seed1 | fp8_tensorwise_seed1 | bf16_seed1 vs bf16 | "
            "fp8_tensorwise_seed1 vs bf16_seed1 |") in lines, out
    first = next(line for line in lines if line.startswith("| 1-1 |")).strip("| ").split(" | ")
    bf16, seed1, fp8, seed1_rel, fp8_rel = (first[1], first[2], first[3], first[4], first[5])
    assert seed1 != bf16  # another initialization, another first loss
    # The table's percentages come from unrounded means, these from the printed 4 decimals: within 0.01 points.
    assert float(fp8_rel.rstrip("%")) == pytest.approx(100 * (float(fp8) / float(seed1) - 1), abs=0.011), out
    assert float(seed1_rel.rstrip("%")) == pytest.approx(100 * (float(seed1) / float(bf16) - 1), abs=0.011), out


def test_loss_table_sets_runs_from_other_calls_against_their_seeds_bf16(tmp_path, monkeypatch, capsys):
    """bench/loss_table.py on metrics files from two directories (two device calls): window means, the second half,
    each run against its seed's bf16, the held-out gaps, and a recipe's gaps over its seeds; a run that stopped
    early is set against the steps it logged, and one whose file is missing is left out."""
    def write(path: Path, losses: list[float], evals: dict[int, float]) -> Path:
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps({"step": s, "loss": loss, "tokens_per_s": 100.0 * s, "peak_mem_gib": 1.5,
                                            **({"eval_loss": evals[s]} if s in evals else {})}) + "\n"
                                for s, loss in enumerate(losses, 1)))
        return path

    call1, call2 = tmp_path / "call1", tmp_path / "call2"
    files = [write(call1 / "metrics_bf16.jsonl", [4.0] * 10, {5: 2.0, 10: 1.0}),
             write(call2 / "metrics_fp8_tensorwise.jsonl", [4.4] * 5 + [3.6] * 5, {5: 2.2, 10: 0.9}),
             write(call2 / "metrics_bf16_seed1.jsonl", [5.0] * 6 + [4.0, 3.0, 2.0, 1.0], {}),
             write(call1 / "metrics_fp8_tensorwise_seed1.jsonl", [6.0] * 6 + [4.8, 3.6], {}),  # 1.2x, to step 8
             call2 / "metrics_fp8_rowwise.jsonl"]  # failed before its first step
    _bench_module("loss_table", monkeypatch).main([str(f) for f in files])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| steps (mean train loss) | bf16 | fp8_tensorwise | bf16_seed1 | fp8_tensorwise_seed1 | "
                        "fp8_tensorwise vs bf16 | bf16_seed1 vs bf16 | fp8_tensorwise_seed1 vs bf16_seed1 |")
    rows = {line.split(" | ")[0].strip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:13]}
    assert list(rows) == [f"{s}-{s}" for s in range(1, 11)] + ["6-10"]  # steps default to the last logged, 10
    assert rows["1-1"] == ["4.0000", "4.4000", "5.0000", "6.0000", "+10.00%", "+25.00%", "+20.00%"]
    assert rows["9-9"] == ["4.0000", "3.6000", "2.0000", "-", "-10.00%", "-50.00%", "-"]  # seed 1's FP8 stopped at 8
    # Over its steps 6-8 only, against bf16_seed1's same steps (against all of 6-10, a falling loss makes it +60.00%).
    assert rows["6-10"] == ["4.0000", "3.6000", "3.0000", "4.8000 (steps 6-8)", "-10.00%", "-25.00%",
                            "+20.00% (steps 6-8)"]
    assert ("fp8_tensorwise: 10 steps, median tokens/s over the second half 800, peak memory 1.5 GiB, eval loss at "
            "step 5: 2.2000, 10: 0.9000; held-out vs bf16: -10.00% at step 10 (-10.00% to +10.00% over 2 "
            f"evaluations); its bf16 from {call1}, another call: if that ran on another machine, the same run there "
            "may differ by ~0.3% alone") in lines
    assert not any(line.startswith("fp8_rowwise") for line in lines)
    # The recipe over its seeds (bf16_seed1 against bf16 is a new initialization, not a recipe); held-out gaps only
    # where every seed has one.
    assert lines[-1] == ("fp8_tensorwise over seeds 0, 1: second half vs its seed's bf16 -10.00%, +20.00% (steps 6-8); "
                         "mean +5.00%")
    seeds = [write(call2 / "metrics_fp8_tensorwise_seed1.jsonl", [6.0] * 10, {5: 2.0, 10: 1.02}),
             write(call2 / "metrics_bf16_seed1.jsonl", [5.0] * 10, {5: 2.0, 10: 1.0}),
             write(call2 / "metrics_bf16_seed2.jsonl", [4.5] * 10, {})]
    _bench_module("loss_table", monkeypatch).main([str(f) for f in files[:2] + seeds])
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("bf16 over seeds") for line in lines)  # seeds 1 and 2 against seed 0
    assert "another call" not in next(line for line in lines if line.startswith("fp8_tensorwise_seed1:"))  # one call
    assert lines[-1] == (
        "fp8_tensorwise over seeds 0, 1: second half vs its seed's bf16 -10.00%, +20.00%; mean +5.00%; held-out at "
        "the last evaluation -10.00%, +2.00%; mean -4.00%")
    with pytest.raises(SystemExit, match="no bf16 run to compare against"):
        _bench_module("loss_table", monkeypatch).main([str(files[1])])
    with pytest.raises(SystemExit, match="two runs named 'bf16': .*call1/metrics_bf16.jsonl and .*call2/metrics_b"):
        _bench_module("loss_table", monkeypatch).main([str(files[0]), str(call2 / "metrics_bf16.jsonl")])


@pytest.mark.slow
def test_fp8_loss_check_keeps_the_curve_of_a_run_killed_midway(tmp_path, pydoc_data_dir):
    # A device call's limit kills the script and its runs at once (SIGKILL to all): the steps trained so far must
    # already be in $OUT.
    env = _loss_check_env(tmp_path, RUNS="bf16")

    def check(steps: int) -> subprocess.Popen:
        return start_job(["bash", ROOT / "bench/fp8_loss_check.sh", pydoc_data_dir.shards_dir, steps,
                          "data.seq_len=64", "train.micro_batch_size=2", "parallel.expert_parallel_size=1"], env)

    def steps_in(metrics: Path) -> list[int]:
        return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.endswith("}")]

    proc, metrics = check(100000), tmp_path / "metrics_bf16.jsonl"
    wait_until(proc, lambda: metrics.exists() and metrics.read_text().count("\n") >= 3, 120, "the curve in $OUT")
    kill_job(proc)
    proc.communicate()
    steps = steps_in(metrics)
    assert len(steps) >= 3 and steps == list(range(1, len(steps) + 1))
    # The next call (same machine, same run name) starts a curve of its own, not one appended to the killed run's.
    metrics.unlink()
    proc = check(3)
    out, _ = finish_job(proc, timeout=120)
    assert proc.returncode == 0 and steps_in(metrics) == [1, 2, 3], out


@pytest.mark.slow
def test_gpu_bench_runs_ours_and_the_peer_side_by_side(tmp_path):
    # The device calls' benchmark script, on CPU: a case file with a comment, the HF peer and our engine on one
    # shape, one JSON line each, the side-by-side table with our ratio to the peer, and each case's progress log.
    shape = "--config configs/smoke.yaml parallel.expert_parallel_size=1 --warmup 2 --steps 4"
    cases = tmp_path / "cases.txt"
    cases.write_text(f"# the peer first, as in bench/cases/\n--impl hf {shape}\n\n--impl ours {shape}\n")
    proc = start_job(["bash", ROOT / "bench/gpu_bench.sh", cases], _script_env(tmp_path))
    out, _ = finish_job(proc, timeout=300)
    assert proc.returncode == 0 and "FAILED" not in out, out
    rows = [json.loads(line) for line in (tmp_path / "gpu_bench.jsonl").read_text().splitlines()]
    assert [(r["impl"], r["seq"], r["precision"]) for r in rows] == [("hf", 64, "fp32"), ("ours", 64, "fp32")], rows
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gib"] > 0 and r["loss"] > 0 for r in rows), rows
    ours = next(line for line in out.splitlines() if line.startswith("ours "))
    assert float(ours.split()[7]) == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"], abs=0.006), out
    for log in sorted(tmp_path.glob("gpu_bench.*.log")):
        stages = re.findall(r"^\[\d+ s\] (.+)$", log.read_text(), re.M)
        assert stages == ["engine built", "first optimizer step done", "warm-up done"], log.read_text()[-2000:]


@pytest.mark.slow
def test_train_loop_rate_times_the_loop_by_its_records(tmp_path):
    """The training loop's wall-clock rate from its records' `time`: over steps FROM..STEPS, never faster than the
    steps' own times say (the loop's work after each step comes on top); a FROM outside the run is named. A profiled
    run's traces come back beside the log."""
    script = ["bash", ROOT / "bench/train_loop_rate.sh", "configs/smoke.yaml", "parallel.expert_parallel_size=1"]
    profiled = [*script, "train.profile_start_step=3", "train.profile_steps=2"]
    proc = subprocess.run(profiled, env=_script_env(tmp_path, STEPS="5", FROM="2"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "profile/step_3-4").iterdir()) == ["rank_0.json.gz", "rank_0.txt"]
    rate = json.loads(proc.stdout.splitlines()[-1])
    records = [json.loads(line) for line in (tmp_path / "train_loop_rate.jsonl").read_text().splitlines()]
    assert rate["steps"] == "2-5" and [r["step"] for r in records] == [1, 2, 3, 4, 5], (rate, records)
    assert rate["ms_per_step_wall"] >= rate["ms_per_step_logged"] > 0, rate
    tokens_per_step = records[0]["tokens_seen"]
    # tokens_per_s_wall is a whole number: 1 token/s of rounding (the profiled steps make it a few hundred here)
    assert rate["tokens_per_s_wall"] == pytest.approx(tokens_per_step / rate["ms_per_step_wall"] * 1e3, rel=1e-3,
                                                      abs=1), rate
    proc = subprocess.run(script, env=_script_env(tmp_path, STEPS="3", FROM="3"), capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode != 0 and "FROM=3 must lie in 1..2 (STEPS=3)" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_zero3_hook_time_times_every_hook(tmp_path, smoke_shards):
    # One rank, every smoke parameter persistent (as on one GPU). The calls per step are those DeepSpeed 0.19.8 makes
    # on the smoke model with blocks as leaf modules: other counts mean ZeRO-3 now hooks other modules.
    cmd = [Path(sys.executable).parent / "deepspeed", "--num_gpus", "1", "--master_port", str(free_port()),
           ROOT / "bench/zero3_hook_time.py", "--steps", "2", f"data.path={smoke_shards}",
           "parallel.expert_parallel_size=1", "parallel.zero_persistence_threshold=1000000000"]
    proc = start_job(cmd, _script_env(tmp_path))
    out, _ = finish_job(proc, timeout=300)
    assert proc.returncode == 0, out[-3000:]
    report = json.loads([line for line in out.splitlines() if line.startswith("{")][-1])
    calls = {name: hook["calls_per_step"] for name, hook in report.items() if name != "ms_per_step"}
    assert calls == {"pre_sub_module_forward_function": 6, "post_sub_module_forward_function": 6,
                     "pre_sub_module_backward_function": 6, "post_sub_module_backward_function": 4}, report
    assert all(0 < hook["us_per_call"] < 1e3 * report["ms_per_step"] for name, hook in report.items() if name != "ms_per_step")


# Issue 6's check on CPU processes with the smoke model, in two calls as a device's 10-minute limit asks of 8 GPUs
# (two tests, which pytest's workers can run side by side)
MULTI_GPU_CHECK_SETTINGS = dict(CONFIG="configs/smoke.yaml", SMALL="", SCALE="--warmup 1 --steps 2",
                                PROFILE="--warmup 1 --steps 1")


@pytest.mark.slow
def test_multi_gpu_check_correctness_on_cpu_ranks(tmp_path):
    # On 4 processes: EP 4 against a stop-and-resume (exact), EP 1 (data parallel only) and a universal resume on 2
    # processes, EP 4 -> 2 (8 -> 4 GPUs' resharding, each rank's experts regrouped).
    proc = start_job(["bash", ROOT / "bench/multi_gpu_check.sh", 4], _script_env(tmp_path, PARTS="correctness",
                                                                               **MULTI_GPU_CHECK_SETTINGS))
    out, _ = finish_job(proc, timeout=480)
    assert re.findall(r"^(\w) exit (\d+)$", out, re.M) == [(run, "0") for run in "ABBCD"], out
    # Per run against A: (loss or grad norm, first step, last step) -> gap. The resume must be exact. EP 1 and the
    # universal resume sum in other orders, so: close over their first three steps in common with A, bounded after.
    gaps = {(run, what, int(first), int(last)): float(gap) for run, what, first, last, gap in re.findall(
        r"^max \|(\w) (- A\||/ A - 1\| of the grad norm) over steps (\d+)-(\d+): (\S+)$", out, re.M)}
    loss, norm = "- A|", "/ A - 1| of the grad norm"
    assert {run for run, *_ in gaps} == {"B", "C", "D"}, out
    assert all(gap == 0 for (run, *_), gap in gaps.items() if run == "B"), out
    for run, first in (("C", 1), ("D", 6)):
        assert gaps[run, loss, first, first + 2] < 1e-5 and gaps[run, norm, first, first + 2] < 1e-4, out
        assert gaps[run, loss, first, 10] < 1e-3 and gaps[run, norm, first, 10] < 1e-2, out
    assert "(universal: resharded)" in out, out
    assert "stopped at step 5: train.exit_at_step" in (tmp_path / "B.log").read_text()  # each run keeps its log
    assert "resumed from " in (tmp_path / "B_resumed.log").read_text()
    assert not list((tmp_path / "tmp").glob("multi_gpu.*"))  # the shards and run directories are gone
    assert not list(tmp_path.glob("scale*.err")) and not list(tmp_path.glob("profile*.err"))  # not asked for


@pytest.mark.slow
def test_multi_gpu_check_scaling_and_profile_on_cpu_ranks(tmp_path):
    proc = start_job(["bash", ROOT / "bench/multi_gpu_check.sh", 2], _script_env(tmp_path, PARTS="scaling profile",
                                                                               SCALE_GPUS="1 2",
                                                                               **MULTI_GPU_CHECK_SETTINGS))
    out, _ = finish_job(proc, timeout=300)
    assert " exit " not in out, out  # no correctness run this time
    runs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["gpus"] for r in runs] == [1, 2, 2] and all(r["tokens_per_s"] > 0 for r in runs), out
    for rank in (0, 1):  # the profile's traces, gzipped to come back from a device call
        with gzip.open(tmp_path / f"trace_rank{rank}.json.gz") as trace:
            assert json.load(trace)["traceEvents"]


def test_multi_gpu_check_names_an_unknown_part(tmp_path):
    proc = start_job(["bash", ROOT / "bench/multi_gpu_check.sh", 2], _script_env(tmp_path, PARTS="correctness scale"))
    out, _ = finish_job(proc, timeout=30)
    assert proc.returncode == 2 and "PARTS: unknown part 'scale' (correctness, scaling, profile)" in out, out


@pytest.mark.slow
def test_dense_block_probe_variants_compute_the_same_mlp(monkeypatch):
    """bench/fp8_dense_block.py's variants on a CPU (its timing needs a GPU): each one the dense MLP half of the
    same block, within FP8's error of bf16; gate and up fused into one linear give rowwise's output to the bit."""
    import torch

    from deepseek_pt.config import load_config

    probe = _bench_module("fp8_dense_block", monkeypatch)
    # The narrowest widths that fp8.layers=auto converts (engine/fp8.py's fp8_gemm_pays).
    model = load_config(ROOT / "configs" / "bench-2b.yaml", ["model.dim=1040", "model.inter_dim=4112"]).model
    torch.manual_seed(0)
    block = probe.Block(model, moe=False).to(torch.bfloat16)
    # Two tokens (rowwise scales the input per token, tensorwise once): the widths above decide what converts, the
    # tokens only the time, and a CPU runs tensorwise's FP8 GEMMs in oneDNN's reference kernel, ~0.5 s per token for
    # each of gate and up (at 32 tokens the test took 2 minutes).
    x = torch.randn(1, 2, model.dim, dtype=torch.bfloat16)
    outputs = {name: forward(x).float() for name, _, forward in probe.variants(block, "forward")}
    assert list(outputs) == ["bf16", "fp8 rowwise", "fp8 rowwise, gate+up fused", "fp8 tensorwise",
                             "fp8 tensorwise, gate+up fused", "fp8 rowwise, norm apart",
                             "fp8 rowwise, tiled reductions"]
    mlp = outputs["bf16"] - x.float()
    for name, out in outputs.items():
        err = ((out - outputs["bf16"]).norm() / mlp.norm()).item()
        assert (err == 0) if name == "bf16" else 0.01 < err < 0.1, (name, err)
    assert torch.equal(outputs["fp8 rowwise, gate+up fused"], outputs["fp8 rowwise"])


def test_grad_determinism_finds_no_difference_on_a_cpu_in_a_process_or_between_two(tmp_path):
    # A CPU computes every gradient in a fixed order: no repeat and no second process may differ. (On the H100 the
    # same probe named cuDNN SDPA's query gradient: docs/benchmarks.md.)
    def probe(*args: str) -> dict:
        proc = subprocess.run([sys.executable, ROOT / "bench/grad_determinism.py", "--config", "configs/smoke.yaml",
                               *args, "parallel.expert_parallel_size=1"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300, env=_script_env(tmp_path), check=False)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        return json.loads(proc.stdout.splitlines()[-1])

    first = probe("--digests", str(tmp_path / "first.json"))
    assert first["params"] == 31 and len(set(first["losses"])) == 1 and first["differ_between_repeats"] == {}, first
    second = probe("--repeats", "2", "--against", str(tmp_path / "first.json"))
    assert second["differ_from_against"] == [] and second["losses"][0] == first["losses"][0], second


def test_sdpa_backends_pads_v_for_flash_and_reports_a_refused_kernel(monkeypatch):
    """The probe's flash case (v zero-padded to q/k's width, the padding's output columns dropped) gives math's
    output and gradients, v's unpadded; a kernel SDPA refuses is reported as refused, not raised (CPU has no cuDNN)."""
    import torch

    probe = _bench_module("sdpa_backends", monkeypatch)
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, 32, 24, generator=gen, requires_grad=True) for _ in range(2))
    v = torch.randn(1, 2, 32, 16, generator=gen, requires_grad=True)
    grad_out = torch.randn(1, 2, 32, 16, generator=gen)
    padded, math = (probe.gradients(kernel, q, k, v, grad_out) for kernel in ("flash-padded", "math"))
    assert padded[2].shape == v.shape
    for got, want in zip(padded, math, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(probe.attention("flash-padded", q, k, v), probe.attention("math", q, k, v))
    assert "No viable backend" in probe.measure("cudnn", (q, k, v, grad_out), iters=1)["refused"]


def test_grad_determinism_names_what_differs(monkeypatch):
    import torch

    probe = _bench_module("grad_determinism", monkeypatch)
    a, b = torch.zeros(4, 3), torch.zeros(4, 3)
    b[1, 2], b[3, 0] = 1e-9, -2e-9
    found = probe.differences([a, a, None, a], [a, b, None, None], ["same", "moved", "unused", "lost"])
    assert found == {"moved": {"values": 2, "of": 12, "max_abs_diff": pytest.approx(2e-9), "max_abs_grad": 0.0},
                     "lost": {"values": "a gradient in one repeat only"}}, found
    mine = {"loss": probe.digest(torch.tensor(1.0)), "w": probe.digest(a), "only_mine": "x"}
    theirs = {"loss": probe.digest(torch.tensor(1.0)), "w": probe.digest(b)}
    assert probe.compare_digests(mine, theirs) == ["only_mine", "w"]


def test_every_benchmark_case_parses_and_its_config_loads(monkeypatch):
    # A case with a stale flag or config key would fail only on the GPU, after its device call has started.
    import shlex

    from deepseek_pt.config import ConfigError, load_config

    gpu_bench = _bench_module("gpu_bench", monkeypatch)
    files = sorted((ROOT / "bench" / "cases").glob("*.txt"))
    assert files
    refused = []
    for path in files:
        lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines, path
        for line in lines:
            try:
                args = gpu_bench.parse_args(shlex.split(line))
                load_config(ROOT / args.config, ["train.grad_accum_steps=1", *args.overrides])
            except SystemExit:
                refused.append(f"{path.name}: {line}: gpu_bench.py's arguments")
            except ConfigError as e:
                refused.append(f"{path.name}: {line}: {e}")
            else:
                refused += [f"{path.name}: {problem}" for item in args.ds
                            if (problem := gpu_bench.ds_patch_problem(item))]
    assert not refused, "\n".join(refused)


def test_a_ds_patch_deepspeed_would_refuse_is_named_before_the_run(monkeypatch):
    gpu_bench = _bench_module("gpu_bench", monkeypatch)
    assert gpu_bench.ds_patch_problem("zero_optimization.sub_group_size=4000000000") is None
    assert gpu_bench.ds_patch_problem("zero_optimization.stage3_param_persistence_threshold=1") is None  # an alias
    with pytest.raises(SystemExit, match="zero_optimization has no key 'stage3_sub_group_size'"):
        gpu_bench.patch_ds_config(["zero_optimization.overlap_comm=false",
                                   "zero_optimization.stage3_sub_group_size=4000000000"])
    with pytest.raises(SystemExit, match="takes dotted.key=value"):
        gpu_bench.patch_ds_config(["zero_optimization.overlap_comm"])


def test_trace_kernels_lists_every_kernel_by_time_per_micro_step(tmp_path):
    """The trace CLI: kernels, copies and fills (not CPU ops) summed by name over the micro-steps, heaviest first,
    after their classes."""
    trace = tmp_path / "trace_rank0.json.gz"
    events = [{"cat": "kernel", "name": "_ragged_mm_kernel", "dur": 3000}, {"cat": "kernel", "name": "triton_poi_add",
              "dur": 500}, {"cat": "kernel", "name": "_ragged_mm_kernel", "dur": 1000},
              {"cat": "gpu_memcpy", "name": "Memcpy DtoD (Device -> Device)", "dur": 500},
              {"cat": "cpu_op", "name": "aten::mm", "dur": 9000}, {"cat": "kernel", "name": "no duration"}]
    with gzip.open(trace, "wt") as f:
        json.dump({"traceEvents": events}, f)
    out = subprocess.run([sys.executable, ROOT / "bench/profile_summary.py", trace, "--micro-steps", "2"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == "kernel time 2.50 ms per micro-step; by class (ms per micro-step, % of it):", out
    assert [line.split(None, 2) for line in out[1:4]] == [
        ["2.00", "80.0%", "GEMM, ours in Triton (bf16 or FP8 operands)"],
        ["0.25", "10.0%", "other (pointwise, norms, casts, reductions)"], ["0.25", "10.0%", "copies and fills"]], out
    assert [line.split(None, 2) for line in out[5:]] == [["2.000", "1.0", "_ragged_mm_kernel"],
                                                         ["0.250", "0.5", "triton_poi_add"],
                                                         ["0.250", "0.5", "Memcpy DtoD (Device -> Device)"]], out


def test_gpu_timeline_times_the_step_after_its_lead_in(monkeypatch, capsys):
    """--timeline's window: the kernels after the lead-in's share, from the end of its last kernel: an idle GPU
    before the lead-in, and kernels of the lead-in that end inside the window, count for nothing."""
    from types import SimpleNamespace as Event

    summary = _bench_module("profile_summary", monkeypatch)
    cuda = Event(name="CUDA")
    kernels = [("lead_0", 90, 95), ("lead_a", 100, 110), ("lead_b", 112, 121), ("step_a", 120, 130), ("step_b", 140, 150),
               ("step_c", 146, 151)]  # in us, 3 per micro-step; step_a starts on another stream before lead_b ends
    events = [Event(name=n, device_type=cuda, time_range=Event(start=a, end=b)) for n, a, b in kernels]
    summary.gpu_timeline(Event(events=lambda: events), steps=1, lead_in=1, out=sys.stdout)
    lines = capsys.readouterr().out.splitlines()
    # The window: 121 -> 151 us; busy 121-130 and 140-151
    assert lines[0] == "timeline over 1 micro-steps after 1 (steady state): wall 0.03 ms/micro-step (the GPU's clock), GPU busy 0.02, idle 0.01", lines
    assert lines[1] == "  gaps of 10 us or more: 1.0 per micro-step, 0.01 ms per micro-step", lines
    assert lines[-1].split() == ["10", "0.0", "step_a", "->", "step_b"], lines


def test_kernel_classes_name_fp8_gemms_before_bf16_ones(monkeypatch):
    """The profile's classes: cuBLAS's FP8 tiles and CUTLASS's f8 kernels are FP8 GEMMs though their names also say
    nvjet / cutlass / gemm; SDPA is attention; the rest falls to "other"."""
    summary = _bench_module("profile_summary", monkeypatch)
    cls = summary.kernel_class
    assert cls("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_") == "GEMM, FP8 (cuBLAS, CUTLASS)"
    assert cls("void cutlass::Kernel2<cutlass_sm90_f8_f8_bf16_gemm>") == "GEMM, FP8 (cuBLAS, CUTLASS)"
    assert cls("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coo") == "GEMM, bf16 (cuBLAS, CUTLASS)"
    assert cls("_ragged_mm_kernel") == cls("_gate_up_swiglu_kernel") == "GEMM, ours in Triton (bf16 or FP8 operands)"
    assert cls("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention (SDPA)"
    assert cls("triton_poi_fused__scaled_mm__to_copy_add") == "other (pointwise, norms, casts, reductions)"
