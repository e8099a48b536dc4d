"""The training engine end to end: 2-4 CPU processes (gloo), ZeRO-3 + AutoEP, started as the deepspeed launcher
starts them (tests/ranks.py; the SIGTERM test through `deepspeed` itself).

Runs are shared through module-scoped fixtures: `baseline` trains 8 steps uninterrupted; `stopped`
stops at step 4 and resumes to 8; the other runs start from `stopped`'s step-4 checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from jobs import (
    deepspeed_cmd,
    finish_job,
    gpu_host_env,
    job_env,
    last_json,
    ranks_cmd,
    run_job,
    session_pid,
    start_job,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "configs" / "smoke.yaml"
LOSS_REFERENCE = ROOT / "tests" / "assets" / "smoke_losses.json"
STEPS = 8
# One rank with every parameter persistent: the step keeps them gathered (parallel.zero_keep_params_gathered).
ONE_RANK_ALL_PERSISTENT = ["parallel.expert_parallel_size=1", "parallel.zero_persistence_threshold=1000000000"]


def _launch_cmd(nproc: int, run_dir: Path, data: Path, *overrides: str, launcher=ranks_cmd) -> list:
    return launcher(nproc, "--module", "deepseek_pt.train", "--config", SMOKE, f"data.path={data}",
                    f"run.dir={run_dir}", f"train.max_steps={STEPS}", "train.eval_every=0", "train.save_every=0",
                    *overrides)


def train(nproc: int, run_dir: Path, data: Path, *overrides: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    proc = run_job(_launch_cmd(nproc, run_dir, data, *overrides))
    if proc.returncode != expect_rc:
        raise AssertionError(f"exit {proc.returncode} (expected {expect_rc}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(run_dir)}


def assert_same_losses(run: Path, reference: Path, steps: range | None = None, **tolerance) -> dict[int, float]:
    """`run` logged `steps` (default: the reference's), each loss within `tolerance` (pytest.approx) of the
    reference's at that step; returns run's losses."""
    a, b = losses(reference), losses(run)
    assert sorted(b) == (sorted(a) if steps is None else list(steps))
    for step in b:
        assert b[step] == pytest.approx(a[step], **tolerance), step
    return b


def ckpt(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:08d}"


@pytest.fixture(scope="module")
def data(smoke_shards) -> Path:
    return smoke_shards


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("baseline")
    train(2, run, data, "train.eval_every=4", "train.save_every=4", "train.peak_tflops=0.001")  # an MFU to check
    return run


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, data) -> Path:
    run = tmp_path_factory.mktemp("stopped")
    train(2, run, data, "train.exit_at_step=4", "train.eval_every=4")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    train(2, run, data, "train.eval_every=4")
    return run


def test_a_finished_process_exits_with_its_code_flushed_and_without_finalization():
    """exit_process, how training's processes end: atexit callbacks run and buffered output reaches the pipe,
    but the interpreter's finalization (where a live C++ thread can abort the process) never starts."""
    code = ("import atexit, sys\n"
            "from deepseek_pt.train import exit_process\n"
            "class Global:\n"
            "    def __del__(self): print('finalized')\n"
            "kept = Global()\n"
            "atexit.register(print, 'atexit ran')\n"
            "sys.stdout.write('buffered ')\n"
            "exit_process(3)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=job_env(), capture_output=True, text=True,
                          timeout=120)
    assert (proc.returncode, proc.stdout) == (3, "buffered atexit ran\n"), proc.stderr


@pytest.mark.slow
def test_loss_falls_and_every_step_is_logged(baseline):
    records = metrics(baseline)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    for key in ("loss", "lr", "grad_norm", "tokens_seen", "tokens_per_s", "peak_mem_gib", "expert_load"):
        assert all(r[key] is not None for r in records), key
    # each MoE layer's load violation (the smoke model's one, AutoEP's), expert_load the worst of them
    assert all(r["expert_load/layer_1"] == r["expert_load"] for r in records)
    assert not [k for r in records for k in r if k.startswith("expert_load/") and k != "expert_load/layer_1"]
    assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
    assert records[-1]["tokens_seen"] == STEPS * 2 * 4 * 64  # steps x ranks x micro-batch x seq_len
    assert records[-1]["data_epochs"] == STEPS * 2 * 4 / 860  # of the train split's 860 samples
    # MFU: the model's training FLOPs per token x the world's tokens/s over the peak of every rank (two here), not one
    from deepseek_pt.config import load_config
    from deepseek_pt.model.counting import train_flops_per_token

    cfg = load_config(SMOKE)
    flops = train_flops_per_token(cfg.model, cfg.data.seq_len)
    for r in records:
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_s"] / (0.001e12 * 2), rel=1e-9), r


def test_a_run_longer_than_its_data_says_so_and_logs_its_epochs(data, mirrored_smoke_shards):
    """The order wraps into a new epoch when the data runs out, which nothing said: the run read its samples again
    without a word. The start says which sources train.max_steps reads more than once; metrics.jsonl tells how far."""
    from deepseek_pt.config import config_from_dict
    from deepseek_pt.data import PretrainDataset, TrainLoader
    from deepseek_pt.train import data_epochs, repeated_data_line

    cfg = config_from_dict({"data": {"path": str(data), "seq_len": 64}, "train": {"max_steps": 100}})
    sources = cfg.data.sources()
    loader = TrainLoader([PretrainDataset(data, "train", 64)], 4, dp_world=2)
    n = len(loader.datasets[0])
    assert n == 860  # 107.5 steps of 8 samples read it once
    assert repeated_data_line(loader, sources, cfg, 0, 0, 2) is None
    assert data_epochs(loader, sources, 8 * 100) == {"data_epochs": 800 / n}
    loader.consumed_samples = 8 * 50  # resumed at step 50, on to step 150
    cfg.train.max_steps = 150
    assert repeated_data_line(loader, sources, cfg, 50, 8 * 50 * 64, 2) == (
        f"data: train.max_steps 150 reads {data} ({n} samples of split 'train') {1200 / n:.2f} times: each pass after "
        "the first re-reads the same samples in a new order (data_epochs in metrics.jsonl)")
    # 54 steps of 16 samples read 864; a batch ramp's first 10 steps read 8 each (one micro-step until 10 micro-steps'
    # tokens), 784 in all
    loader.consumed_samples = 0
    cfg.train.max_steps, cfg.train.grad_accum_steps = 54, 2
    assert repeated_data_line(loader, sources, cfg, 0, 0, 2) is not None
    cfg.train.batch_rampup_start, cfg.train.batch_rampup_tokens = 1, 10 * 8 * 64
    assert repeated_data_line(loader, sources, cfg, 0, 0, 2) is None

    blend = config_from_dict({"data": {"seq_len": 64, "blend": [{"path": str(data), "weight": 3},
                                                                 {"path": str(mirrored_smoke_shards), "name": "m"}]}})
    loader = TrainLoader([PretrainDataset(s.path, "train", 64) for s in blend.data.sources()], 4, dp_world=2,
                         weights=[3, 1])
    assert data_epochs(loader, blend.data.sources(), 8 * 100) == {"data_epochs/shards": 600 / n,
                                                                  "data_epochs/m": 200 / n}


@pytest.mark.slow
def test_a_run_resumed_at_its_exit_step_stops_there(tmp_path, data):
    """The same command again (a requeued job) after train.exit_at_step stopped it trains no step past that one."""
    args = ("parallel.expert_parallel_size=1", "train.exit_at_step=4")
    train(1, tmp_path, data, *args)
    proc = train(1, tmp_path, data, *args)
    assert "stopped at step 4: train.exit_at_step; checkpoint step_00000004" in proc.stdout, proc.stdout[-3000:]
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.slow
def test_logged_lr_is_the_rate_each_step_ran_at(baseline, stopped):
    """metrics.jsonl's lr at step s is the rate step s ran at, lr_at(s - 1) (warmup from lr / warmup_steps), not the
    one the scheduler moved on to after it; across a resume too."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at

    cfg = load_config(SMOKE, [f"train.max_steps={STEPS}"])
    for run in (baseline, stopped):
        assert [m["lr"] for m in metrics(run)] == pytest.approx([lr_at(cfg, s) for s in range(STEPS)], rel=1e-9)


def test_lr_schedules_give_their_hand_computed_rates():
    """lr_at, which the logged-lr tests take as their reference, against rates worked out by hand: lr_at(s) is the rate
    of the run's step s + 1, k. A linear warmup from lr / warmup_steps to lr at step warmup_steps, then cosine to
    min_lr at step max_steps, WSD (flat, then linear to min_lr over the last wsd_decay_fraction of max_steps, ending
    at step max_steps), or constant; min_lr past max_steps."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at

    def rates(schedule: str, max_steps: int, steps: list[int], fraction: float = 0.25,
              shape: str = "linear") -> list[float]:
        cfg = load_config(SMOKE, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4",
                                  f"train.max_steps={max_steps}", f"train.schedule={schedule}",
                                  f"train.wsd_decay_fraction={fraction}", f"train.wsd_decay_shape={shape}"])
        return [lr_at(cfg, s) for s in steps]

    warmup = [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    # cosine over steps k = 5..14: half-way (k 9, s 8) min_lr + (lr - min_lr) / 2, min_lr at k 14 (s 13) and past it
    assert rates("cosine", 14, [0, 1, 2, 3, 8, 13, 20]) == pytest.approx(warmup + [5.5e-4, 1e-4, 1e-4], rel=1e-12)
    assert rates("cosine", 14, [4, 5]) == pytest.approx([1e-4 + 4.5e-4 * (1 + math.cos(math.pi * f))  # 1/10, 2/10
                                                         for f in (0.1, 0.2)], rel=1e-12)
    # WSD, max_steps 20: flat to k 15 (s 14), then 0.9e-3 down over k 16..20 (0.18e-3 a step) to min_lr at k 20
    assert rates("wsd", 20, [0, 3, 4, 14, 15, 16, 18, 19, 25]) == pytest.approx(
        [2.5e-4, 1e-3, 1e-3, 1e-3, 8.2e-4, 6.4e-4, 2.8e-4, 1e-4, 1e-4], rel=1e-12)
    # WSD with a cosine decay over the same k 16..20 (fifths of a half-period each), min_lr at k 20
    assert rates("wsd", 20, [3, 14, 19, 25], shape="cosine") == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4], rel=1e-12)
    assert rates("wsd", 20, [15, 16, 17], shape="cosine") == pytest.approx(
        [1e-4 + 4.5e-4 * (1 + math.cos(math.pi * f)) for f in (0.2, 0.4, 0.6)], rel=1e-12)
    assert rates("constant", 20, [0, 3, 4, 19, 25]) == pytest.approx([2.5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_a_batch_ramp_adds_a_micro_step_for_each_equal_share_of_its_tokens():
    """grad_accum_steps_at against counts worked out by hand: from batch_rampup_start, one more micro-step each
    time batch_rampup_tokens / (grad_accum_steps - start) more tokens have been trained on, then grad_accum_steps;
    sequences_to_end, what the data-repeat warning counts, sums the steps' batches."""
    from deepseek_pt.config import TrainConfig
    from deepseek_pt.engine.batch_rampup import grad_accum_steps_at, sequences_to_end

    ramp = TrainConfig(grad_accum_steps=5, batch_rampup_start=2, batch_rampup_tokens=300, max_steps=6)
    assert [grad_accum_steps_at(ramp, t) for t in (0, 99, 100, 199, 200, 299, 300, 10**15)] == [2, 2, 3, 3, 4, 4, 5, 5]
    assert grad_accum_steps_at(TrainConfig(grad_accum_steps=5), 0) == 5
    # micro-steps of 4 sequences of 10 tokens: steps at 2, 2, 3, 4, 5, 5 micro-steps (tokens before each: 0, 80,
    # 160, 280, 440, 640)
    assert sequences_to_end(ramp, 0, 0, 4, 10) == (2 + 2 + 3 + 4 + 5 + 5) * 4
    assert sequences_to_end(ramp, 2, 160, 4, 10) == (3 + 4 + 5 + 5) * 4
    assert sequences_to_end(ramp, 6, 640, 4, 10) == 0
    assert sequences_to_end(TrainConfig(grad_accum_steps=3, max_steps=7), 2, 0, 4, 10) == 5 * 3 * 4


def test_the_last_step_trains_at_min_lr_and_the_peak_once():
    """The run's last step (lr_at(max_steps - 1)) trained above min_lr, and WSD with one decay step trained none at a
    decayed rate; the peak, reached at the warmup's last step, was trained twice. Each decay now ends at min_lr on
    the last step, whatever its length."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at

    for schedule, max_steps, fraction in (("cosine", 14, 0.1), ("cosine", 5, 0.1), ("wsd", 20, 0.25),
                                          ("wsd", 10, 0.1)):  # wsd 10 x 0.1: one decay step
        cfg = load_config(SMOKE, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4",
                                  f"train.max_steps={max_steps}", f"train.schedule={schedule}",
                                  f"train.wsd_decay_fraction={fraction}"])
        assert lr_at(cfg, max_steps - 1) == pytest.approx(1e-4, rel=1e-12), (schedule, max_steps)
        assert lr_at(cfg, max_steps - 2) > 1e-4, (schedule, max_steps)
        if schedule == "cosine":
            assert lr_at(cfg, 3) == 1e-3 > lr_at(cfg, 4), (schedule, max_steps)


def test_the_scheduler_gives_each_step_lr_at_its_index():
    """ds_config.lr_scheduler, what DeepSpeed steps once per optimizer step: the optimizer's k-th step (k from 1)
    runs at lr_at(k - 1), the hand-computed rates above (the warmup's first step at lr / warmup_steps, not 0 or the
    second step's rate). Only the slow runs' logged lr saw the scheduler otherwise."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_scheduler

    cfg = load_config(SMOKE, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4", "train.max_steps=14",
                              "train.schedule=cosine"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)  # DeepSpeed builds it at lr
    scheduler = lr_scheduler(cfg, 1)(optimizer)
    rates = []
    for _ in range(16):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    assert rates[4] == pytest.approx(1e-4 + 4.5e-4 * (1 + math.cos(math.pi * 0.1)), rel=1e-12)
    assert rates[8] == pytest.approx(5.5e-4, rel=1e-12)  # half-way through the cosine
    assert rates[13:] == pytest.approx([1e-4] * 3, rel=1e-12)  # min_lr at the last step (14) and past it


def _token_clock_rates(cfg, world: int, steps: int, skipped: tuple[int, ...] = ()) -> tuple[list[float], list[int]]:
    """Each step's rate from train.lr_schedule_unit=tokens's scheduler driven as the training loop and DeepSpeed drive
    it (begin_step with the step's tokens, then step() unless the step was skipped), and each step's tokens."""
    from deepseek_pt.engine.batch_rampup import grad_accum_steps_at
    from deepseek_pt.engine.lr_schedule import lr_scheduler, tokens_to_end

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = lr_scheduler(cfg, world)(optimizer)
    scheduler.start(0, tokens_to_end(cfg, world, 0, 0))
    rates, tokens, seen = [], [], 0
    for k in range(1, steps + 1):
        tokens.append(grad_accum_steps_at(cfg.train, seen) * cfg.train.micro_batch_size * world * cfg.data.seq_len)
        scheduler.begin_step(tokens[-1])
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if k not in skipped:
            scheduler.step()
        seen += tokens[-1]
    return rates, tokens


def test_the_token_clock_without_a_batch_ramp_is_the_step_clock():
    """train.lr_schedule_unit=tokens with every step a full batch gives lr_at's rates step for step, for each
    schedule (on 2 processes, micro-steps of 2 x 64 tokens); a skipped step moves neither clock."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at

    for schedule, shape in (("cosine", "linear"), ("wsd", "linear"), ("wsd", "cosine"), ("constant", "linear")):
        common = ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=4", "train.max_steps=17",
                  "train.micro_batch_size=2", "train.grad_accum_steps=3", f"train.schedule={schedule}",
                  "train.wsd_decay_fraction=0.3", f"train.wsd_decay_shape={shape}"]
        cfg = load_config(SMOKE, [*common, "train.lr_schedule_unit=tokens"])
        rates, _ = _token_clock_rates(cfg, 2, 20)
        assert rates == pytest.approx([lr_at(cfg, s) for s in range(20)], rel=1e-12), schedule
        # Step 6 skipped (non-finite gradients): step 7 runs at step 6's rate, as DeepSpeed's step clock has it
        rates, _ = _token_clock_rates(cfg, 2, 10, skipped=(6,))
        assert rates == pytest.approx([lr_at(cfg, s) for s in (0, 1, 2, 3, 4, 5, 5, 6, 7, 8)], rel=1e-12), schedule


def test_the_token_clock_under_a_batch_ramp_moves_by_each_steps_tokens():
    """Under a batch ramp (1 to 4 micro-steps over 12 micro-steps' tokens) the token clock's positions are the
    tokens trained, in full batches: steps of 1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4 micro-steps end at 0.25, 0.5, 0.75,
    1, 1.5, 2, 2.75, 3.5, 4.5, 5.5, 6.5 and 7.5 full batches. Warmup to lr at 2 full batches (step 6), then cosine to
    min_lr at 7.5, the run's end (the last step); the step clock would have warmed up in 2 steps of a quarter batch."""
    from deepseek_pt.config import load_config

    micro = 64  # tokens of a micro-step: micro-batch 1 x 1 process x data.seq_len 64
    cfg = load_config(SMOKE, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=2", "train.max_steps=12",
                              "train.micro_batch_size=1", "train.grad_accum_steps=4", "train.batch_rampup_start=1",
                              f"train.batch_rampup_tokens={12 * micro}", "train.lr_schedule_unit=tokens"])
    rates, tokens = _token_clock_rates(cfg, 1, 13)
    assert [t // micro for t in tokens] == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4]
    assert rates[:6] == pytest.approx([1.25e-4, 2.5e-4, 3.75e-4, 5e-4, 7.5e-4, 1e-3], rel=1e-12)
    cosine = [1e-4 + 4.5e-4 * (1 + math.cos(math.pi * (k - 2) / 5.5)) for k in (2.75, 3.5, 4.5, 5.5, 6.5, 7.5)]
    assert rates[6:12] == pytest.approx(cosine, rel=1e-12)
    assert rates[11] == pytest.approx(1e-4, rel=1e-12) and rates[12] == pytest.approx(1e-4, rel=1e-12)


def test_the_token_clock_resumes_from_its_state_and_from_the_step_clocks():
    """The token clock's state (what DeepSpeed saves in a checkpoint) brings a new scheduler to the same rates, and
    on another world size to the rate it stopped at; a checkpoint of the step clock (LambdaLR's state) resumes on the
    token clock at the tokens it had seen, and the token clock's state loads into the step clock at its count of
    applied steps."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at, lr_scheduler, tokens_to_end

    common = ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=2", "train.max_steps=12",
              "train.micro_batch_size=1", "train.grad_accum_steps=4", "train.batch_rampup_start=1",
              f"train.batch_rampup_tokens={12 * 64}"]
    cfg = load_config(SMOKE, [*common, "train.lr_schedule_unit=tokens"])
    rates, tokens = _token_clock_rates(cfg, 1, 12)

    def clock(state: dict, seen: int, step: int):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
        scheduler = lr_scheduler(cfg, 1)(optimizer)
        scheduler.load_state_dict(state)
        scheduler.start(seen, tokens_to_end(cfg, 1, step, seen))
        return optimizer, scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    first = lr_scheduler(cfg, 1)(optimizer)
    first.start(0, tokens_to_end(cfg, 1, 0, 0))
    for n in tokens[:7]:
        first.begin_step(n)
        optimizer.step()
        first.step()
    seen = sum(tokens[:7])
    for state in (first.state_dict(), _step_clock_state(cfg, 7)):  # the same tokens behind both: no step skipped
        optimizer, resumed = clock(state, seen, 7)
        for n, want in zip(tokens[7:], rates[7:], strict=True):
            resumed.begin_step(n)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
            optimizer.step()
            resumed.step()
    # On 2 processes (micro-steps of 128 tokens) the clock keeps its unit, the first run's full batch of 256 tokens:
    # 704 applied (2.75 full batches), step 8 of 3 micro-steps ends at 4.25 and steps 9-12 of 4 at 12.25, the new end;
    # counted in the new full batch (512) the rate would jump back into the warmup
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    wider = lr_scheduler(cfg, 2)(optimizer)
    wider.load_state_dict(first.state_dict())
    wider.start(seen, tokens_to_end(cfg, 2, 7, seen))
    assert (seen, tokens_to_end(cfg, 2, 7, seen)) == (704, 384 + 4 * 512)
    wider.begin_step(384)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4 + 4.5e-4 * (1 + math.cos(math.pi * 2.25 / 10.25)),
                                                            rel=1e-12)
    steps_cfg = load_config(SMOKE, common)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    stepped = lr_scheduler(steps_cfg, 1)(optimizer)
    stepped.load_state_dict(first.state_dict())
    assert stepped.last_epoch == 7
    assert stepped.lr_lambdas[0](stepped.last_epoch) * 1e-3 == pytest.approx(lr_at(steps_cfg, 7), rel=1e-12)


def _step_clock_state(cfg, steps: int) -> dict:
    """LambdaLR's state after `steps` optimizer steps of the step clock."""
    from deepseek_pt.engine.lr_schedule import lr_scheduler

    steps_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr_schedule_unit="steps"))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.train.lr)
    scheduler = lr_scheduler(steps_cfg, 1)(optimizer)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.state_dict()


@pytest.mark.slow
def test_a_resume_trains_with_this_configs_optimizer_settings(tmp_path, data):
    """A resume that changes the schedule (train.lr, min_lr, max_steps) or AdamW's settings runs on this config's,
    from the checkpoint's step on: DeepSpeed's load brings back the saved param groups and the scheduler's base lr.
    It says which changed (a silent one showed only as a jump of the logged lr)."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at

    one_rank = ["parallel.expert_parallel_size=1"]
    first = train(1, tmp_path, data, *one_rank, "train.exit_at_step=4")
    assert "resume:" not in first.stdout
    changed = ["train.lr=1e-3", "train.min_lr=1e-4", "train.max_steps=12", "train.weight_decay=0.5",
               "train.beta2=0.99", "train.adam_eps=1e-6"]
    resumed = train(1, tmp_path, data, *one_rank, *changed)  # max_steps: _launch_cmd's 8
    smoke = load_config(SMOKE).train
    assert (f"resume: train.lr 0.001 ({smoke.lr} in the checkpoint), train.min_lr 0.0001 ({smoke.min_lr} in the "
            f"checkpoint), train.max_steps 12 (8 in the checkpoint), train.weight_decay 0.5 "
            f"({smoke.weight_decay} in the checkpoint), train.beta2 0.99 ({smoke.beta2} in the checkpoint), "
            f"train.adam_eps 1e-06 ({smoke.adam_eps} in the checkpoint) here: the schedule and AdamW go on with this "
            "config's from step 4\n") in resumed.stdout, resumed.stdout[-3000:]
    cfg = load_config(SMOKE, changed)
    assert [m["lr"] for m in metrics(tmp_path)][4:] == pytest.approx([lr_at(cfg, s) for s in range(4, 12)], rel=1e-9)
    saved = torch.load(ckpt(tmp_path, 12) / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    groups = saved["optimizer_state_dict"]["optimizer_state_dict"]["param_groups"]
    assert {(g["name"], g["weight_decay"], g["betas"], g["eps"]) for g in groups} == {
        ("decay", 0.5, (0.9, 0.99), 1e-6), ("no_decay", 0.0, (0.9, 0.99), 1e-6), ("ep_size_1", 0.5, (0.9, 0.99), 1e-6)}


@pytest.mark.parametrize("partitioned", [False, True], ids=["whole", "zero_init"])
def test_param_groups_decay_the_matrices_but_not_the_embedding_or_the_norms(partitioned):
    """AdamW's weight decay goes to the weight matrices (attention and expert projections, the router, lm_head, MTP's
    eh_proj) and not to the norms' gains or the input embedding (a row of it only learns when its token is seen:
    decay would shrink rare tokens' rows towards 0 between sightings). A model built partitioned
    (parallel.zero_init) holds each parameter flat on its rank: the groups come from the full shape (ds_shape), so
    they are the same; by the local shape every matrix would go undecayed."""
    from deepseek_pt.model import Transformer
    from deepseek_pt.train import param_groups
    from model_configs import tiny

    model = Transformer(tiny(mtp_depth=1).model)
    named = dict(model.named_parameters())
    if partitioned:  # as deepspeed.zero.Init leaves them: flat local partitions, the full shape in ds_shape
        for p in named.values():
            p.ds_shape = p.shape
            p.data = p.data.flatten()
    groups = param_groups(model, 0.1)
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("decay", 0.1), ("no_decay", 0.0)]
    name_of = {id(p): n for n, p in named.items()}
    decayed = {name_of[id(p)] for p in groups[0]["params"]}
    undecayed = {name_of[id(p)] for p in groups[1]["params"]}
    norms = {n for n in named if n.endswith("norm.weight")}  # RMSNorm gains, 1-dim: there are no biases
    assert undecayed == norms | {"embed_tokens.weight"}
    assert decayed == set(named) - undecayed
    assert {"lm_head.weight", "layers.1.mlp.gate.weight", "layers.0.self_attn.kv_b_proj.weight",
            "mtp.0.eh_proj.weight", "layers.2.mlp.experts.7.down_proj.weight"} <= decayed


@pytest.mark.slow
def test_losses_match_the_committed_reference(baseline):
    """Any change to the model, its initialization, the data order, the optimizer or the schedule moves these
    losses. After an intended one: UPDATE_LOSS_REFERENCE=1 pytest tests/test_train.py -k reference, and say in
    the commit why they moved."""
    got = {str(m["step"]): {k: m[k] for k in ("loss", "eval_loss") if k in m} for m in metrics(baseline)}
    if os.environ.get("UPDATE_LOSS_REFERENCE"):
        LOSS_REFERENCE.write_text(json.dumps({"run": "test_train.py's baseline: configs/smoke.yaml, 2 processes, "
                                              "tests/assets/smoke_shards", "torch": torch.__version__,
                                              "steps": got}, indent=1) + "\n")
    want = json.loads(LOSS_REFERENCE.read_text())["steps"]
    assert got.keys() == want.keys()
    for step, values in got.items():  # fp32 on CPU: other CPUs round differently, by far less than any real change
        assert values == pytest.approx(want[step], rel=2e-5), f"step {step}: {values} against {want[step]}"


@pytest.mark.slow
def test_checkpoints_are_complete_and_pruned(baseline):
    root = baseline / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_00000008"
    meta = json.loads((ckpt(baseline, 8) / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["ep_size"] == 2 and meta["step"] == 8
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
            "rng/rank_1.pt"} <= set(meta["files"])
    resolved = (baseline / "config.yaml").read_text()
    assert "expert_parallel_size: 2" in resolved


@pytest.mark.slow
def test_stop_and_resume_logs_the_same_losses(baseline, stopped):
    assert_same_losses(stopped, baseline, range(1, STEPS + 1), abs=1e-5)
    evals = lambda run: [m["eval_loss"] for m in metrics(run) if "eval_loss" in m]  # noqa: E731
    assert evals(stopped) == pytest.approx(evals(baseline), abs=1e-5)


@pytest.mark.slow
def test_a_blend_trains_evaluates_each_source_and_resumes_exactly(tmp_path, baseline, data, mirrored_smoke_shards):
    """data.blend over the smoke shards (weight 3) and their mirrored copy (weight 1): each source's eval loss and
    their weighted mean are logged, and a run stopped at step 4 and resumed logs the uninterrupted run's losses.
    The whole run hashes both sources' shards first (data.verify_checksums), changing nothing else."""
    blend = ["data.path=null", "train.eval_every=4",
             f"data.blend=[{{path: {data}, weight: 3}}, {{path: {mirrored_smoke_shards}, name: mirror}}]"]
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    train(2, whole, data, *blend, "data.verify_checksums=true")
    train(2, parted, data, *blend, "train.exit_at_step=4")
    train(2, parted, data, *blend)
    assert_same_losses(parted, whole, range(1, STEPS + 1), abs=1e-5)
    assert all(abs(a - b) > 1e-3 for a, b in zip(losses(whole).values(), losses(baseline).values()))  # other batches
    for run in (whole, parted):
        evals = [m for m in metrics(run) if "eval_loss" in m]
        assert [m["step"] for m in evals] == [4, 8]
        for m in evals:
            assert m["eval_loss"] == pytest.approx((3 * m["eval_loss/shards"] + m["eval_loss/mirror"]) / 4, rel=1e-12)
    base_evals = [m["eval_loss"] for m in metrics(baseline) if "eval_loss" in m]
    assert [m["eval_loss/shards"] for m in metrics(whole) if "eval_loss" in m] != pytest.approx(base_evals, abs=1e-5)


@pytest.mark.slow
def test_resume_on_new_data_is_refused_unless_asked_for(tmp_path, data, mirrored_smoke_shards):
    """A run on data.path stopped at step 4 and resumed on a blend that adds a second source: refused, naming the
    new source and the key that allows it, before DeepSpeed starts; with data.resume_on_new_data the blend takes over at
    sample 32."""
    run = tmp_path / "run"
    train(2, run, data, "train.exit_at_step=4")
    blend = ["data.path=null", f"data.blend=[{{path: {data}}}, {{path: {mirrored_smoke_shards}}}]"]
    refused = train(2, run, data, *blend, expect_rc=2)
    assert "Traceback" not in refused.stderr
    assert re.search(r"error: train.resume: \S+step_00000004: loader state was saved on other training data than "
                     r"this .*: new sources \['\w+'\]; set data.resume_on_new_data=true", refused.stderr), refused.stderr
    # refused by preflight, from meta.json: the run never started, so its config.yaml is still the first run's
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["blend"] == []
    proc = train(2, run, data, *blend, "data.resume_on_new_data=true")
    assert "data: new training data from sample 32; samples already read per source: {'shards': 32, 'mirrored': 0}" \
        in proc.stdout
    assert sorted(losses(run)) == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_balancing_bias_is_identical_on_every_rank_and_saved(baseline):
    states = [torch.load(ckpt(baseline, 8) / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", weights_only=False)
              for r in range(2)]
    bias0, bias1 = states[0]["balance_bias"], states[1]["balance_bias"]
    assert len(bias0) == 1 and bias0[0].dtype == torch.float32
    assert torch.equal(bias0[0], bias1[0]) and bias0[0].abs().sum() > 0
    # The router's persistent buffer (AutoEP's copy of gate.e_score_correction_bias) is the same tensor.
    module = states[0]["module"]
    assert torch.equal(module["layers.1.mlp.router.e_score_correction_bias"], bias0[0])


@pytest.mark.slow
def test_expert_parallel_1_and_2_give_the_same_losses(tmp_path, baseline, data):
    """Expert parallel 1 also takes the fused dispatch (parallel.fused_moe_dispatch), the baseline's 2 AutoEP's."""
    proc = train(2, tmp_path, data, "parallel.expert_parallel_size=1", "train.checkpoints=false")  # no resume here
    fused = re.search(r"padded rows in one pass each in (\d+) of (\d+) AutoEP MoE layers", proc.stdout)
    assert fused and fused[1] == fused[2] != "0", proc.stdout[-3000:]
    assert_same_losses(tmp_path, baseline, abs=1e-5)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_zero_init_builds_the_model_partitioned_and_trains_like_the_default(tmp_path, baseline, data):
    proc = train(2, tmp_path, data, "parallel.zero_init=true", "train.eval_every=4", "train.save_every=4")
    held, total = (int(n.replace(",", "")) for n in
                   re.search(r"rank 0 holds ([\d,]+) of ([\d,]+) parameters", proc.stdout).groups())
    assert 0.45 * total < held < 0.55 * total  # half of every parameter from the start, never a full copy
    # Same seed, same initialization (rank 0 draws each module's weights in the default's order); weight decay
    # still sees matrices as matrices although they are flat locally.
    assert_same_losses(tmp_path, baseline, abs=1e-6)
    assert json.loads((ckpt(tmp_path, 8) / "meta.json").read_text())["zero_init"] is True


@pytest.mark.slow
def test_zero_init_in_bf16_builds_the_same_model(tmp_path, data):
    """Under bf16 zero.Init builds the parameters in bf16 from the start, the default casts them later: the weights
    are drawn in fp32 either way, so both runs start from the same model and log the same losses."""
    whole, partitioned = tmp_path / "whole", tmp_path / "partitioned"
    train(2, whole, data, "precision=bf16", "train.max_steps=3", "train.warmup_steps=3")
    train(2, partitioned, data, "precision=bf16", "train.max_steps=3", "train.warmup_steps=3",
          "parallel.zero_init=true")
    assert_same_losses(partitioned, whole, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("coalesce, resumed, partitioned", [
    (False, False, False), (True, False, False), (True, True, False), (True, False, True)],
    ids=["reduced-per-micro-step", "reduced-per-step", "reduced-per-step-stopped-and-resumed",
         "reduced-per-step-parameters-partitioned"])
def test_two_micro_steps_of_two_give_the_losses_of_one_of_four(tmp_path, baseline, data, coalesce, resumed,
                                                                partitioned):
    """Gradient accumulation is exact in fp32: 2 micro-batches of 2 sequences train like the baseline's 1 of 4,
    whether ZeRO reduces after each micro-step's backward or once per optimizer step (the routed experts and every
    linear then add their weight gradients into .grad in place: parallel.expert_grads_in_place and
    linear_grads_in_place), and across a resume; also where ZeRO-3 partitions every parameter and gathers it for
    each use (the smoke model's are all persistent at the default threshold)."""
    overrides = ("train.micro_batch_size=2", "train.grad_accum_steps=2",
                 f"parallel.coalesce_grad_reduction={str(coalesce).lower()}",
                 *(["parallel.zero_persistence_threshold=0"] if partitioned else []))
    if resumed:
        train(2, tmp_path, data, *overrides, "train.exit_at_step=4")
    proc = train(2, tmp_path, data, *overrides)
    experts = re.search(r"experts: 1 of 1 AutoEP expert layers on our GEMMs: (.*)", proc.stdout)
    assert experts is not None, proc.stdout[-3000:]
    assert ("weight gradients added into .grad in place" in experts[1]) == coalesce, experts[0]
    linears = re.search(r"linears: weight gradients added into \.grad by their GEMM in (\d+) of (\d+) ", proc.stdout)
    assert (linears is not None and linears[1] == linears[2] != "0") == coalesce, proc.stdout[-3000:]
    assert ("zero3: every parameter persistent" in proc.stdout) != partitioned, proc.stdout[-3000:]
    assert len(metrics(tmp_path)) == STEPS  # a resume went on from step 4, it did not start again
    assert_same_losses(tmp_path, baseline, abs=1e-5)


@pytest.mark.slow
def test_a_batch_ramp_trains_as_runs_resumed_with_each_of_its_batches(tmp_path, data):
    """train.batch_rampup_tokens, exact in fp32: a run whose batch ramps from 1 to 3 micro-steps (steps of 1, 1, 2,
    3, 3) logs the losses and gradient norms of a run resumed by hand with grad_accum_steps 1, then 2, then 3, with
    ZeRO reducing after each micro-step (DeepSpeed's own count of micro-steps would step the optimizer after 2 of
    the 3 at step 4) and once per step, across a stop and resume inside the ramp."""
    tokens_per_micro_step = 2 * 2 * 64  # micro-batch x ranks x data.seq_len
    common = ("train.micro_batch_size=2", "train.max_steps=5")
    ramp = (*common, "train.grad_accum_steps=3", "train.batch_rampup_start=1",
            f"train.batch_rampup_tokens={3 * tokens_per_micro_step}")
    by_hand = tmp_path / "by_hand"
    for accum, exit_at in ((1, 2), (2, 3), (3, 5)):
        train(2, by_hand, data, *common, f"train.grad_accum_steps={accum}", f"train.exit_at_step={exit_at}")
    per_micro_step = tmp_path / "per_micro_step"
    proc = train(2, per_micro_step, data, *ramp)
    assert (f"batch: 4 sequences per optimizer step from here, rising to 12 by train.batch_rampup_tokens "
            f"{3 * tokens_per_micro_step:,} tokens (0 trained on)") in proc.stdout, proc.stdout[-3000:]
    once_per_step = tmp_path / "once_per_step"
    train(2, once_per_step, data, *ramp, "parallel.coalesce_grad_reduction=true", "train.exit_at_step=2")
    proc = train(2, once_per_step, data, *ramp, "parallel.coalesce_grad_reduction=true")
    assert (f"batch: 8 sequences per optimizer step from here, rising to 12 by train.batch_rampup_tokens "
            f"{3 * tokens_per_micro_step:,} tokens (512 trained on)") in proc.stdout, proc.stdout[-3000:]
    expected = metrics(by_hand)
    for run in (per_micro_step, once_per_step):
        logged = metrics(run)
        assert [m["batch_sequences"] for m in logged] == [4, 4, 8, 12, 12]
        assert [m["tokens_seen"] for m in logged] == [m["tokens_seen"] for m in expected]
        assert [m["loss"] for m in logged] == pytest.approx([m["loss"] for m in expected], abs=1e-5), run.name
        assert [m["grad_norm"] for m in logged] == pytest.approx([m["grad_norm"] for m in expected], rel=1e-4), run.name
        assert [m["lr"] for m in logged] == pytest.approx([m["lr"] for m in expected], rel=1e-9)


@pytest.mark.slow
def test_the_token_clock_trains_stops_and_resumes_under_a_batch_ramp(tmp_path, data):
    """train.lr_schedule_unit=tokens in launched runs on 1 process: steps of 1, 1, 1, 1, 2, 2, 2, 2 micro-steps (of 256
    tokens) end at 0.5, 1, 1.5, 2, 3, 4, 5 and 6 full batches; each step's logged lr is the schedule's there (warmup
    to lr at 2, cosine to min_lr at 6), through DeepSpeed's checkpoint of the clock at step 4. A resume on the step
    clock at step 6 says so and goes on from the 6 steps applied."""
    from deepseek_pt.config import load_config
    from deepseek_pt.engine.lr_schedule import lr_at, lr_at_position

    common = ("parallel.expert_parallel_size=1", "train.warmup_steps=2", "train.grad_accum_steps=2",
              "train.batch_rampup_start=1", f"train.batch_rampup_tokens={4 * 256}")
    train(1, tmp_path, data, *common, "train.lr_schedule_unit=tokens", "train.exit_at_step=4")
    train(1, tmp_path, data, *common, "train.lr_schedule_unit=tokens", "train.exit_at_step=6")
    proc = train(1, tmp_path, data, *common)
    assert ("resume: train.lr_schedule_unit steps (tokens in the checkpoint) here: the schedule and AdamW go on with "
            "this config's from step 6") in proc.stdout, proc.stdout[-3000:]
    logged = metrics(tmp_path)
    assert [m["tokens_seen"] for m in logged] == [256, 512, 768, 1024, 1536, 2048, 2560, 3072]
    cfg = load_config(SMOKE, [*common, f"train.max_steps={STEPS}"])
    want = [lr_at_position(cfg.train, k, 6) for k in (0.5, 1, 1.5, 2, 3, 4)] + [lr_at(cfg, 6), lr_at(cfg, 7)]
    assert [m["lr"] for m in logged] == pytest.approx(want, rel=1e-9)
    assert want[:4] == pytest.approx([cfg.train.lr * f for f in (0.25, 0.5, 0.75, 1)], rel=1e-12)


@pytest.mark.slow
def test_profiled_steps_are_traced_by_every_rank(tmp_path, data):
    """train.profile_start_step 3 with 2 steps, on 2 processes: each rank writes a gzipped Chrome trace of steps 3
    and 4 (two profiler steps, the untraced step 2 before them) and its ops by time."""
    import gzip

    proc = train(2, tmp_path / "traced", data, "train.profile_start_step=3", "train.profile_steps=2")
    out = tmp_path / "traced" / "profile" / "step_3-4"
    assert f"profile: steps 3-4 traced by every rank in {out}: rank_R.json.gz" in proc.stdout, proc.stdout[-3000:]
    for rank in (0, 1):
        trace = json.loads(gzip.decompress((out / f"rank_{rank}.json.gz").read_bytes()))
        steps = sorted({e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")})
        assert steps == ["ProfilerStep#1", "ProfilerStep#2"], steps  # #0 was the untraced step 2
        table = (out / f"rank_{rank}.txt").read_text()
        assert table.startswith(f"steps 3-4, rank {rank}, ops by self_cpu_time_total\n") and "aten::mm" in table
    assert sorted(p.name for p in out.iterdir()) == ["rank_0.json.gz", "rank_0.txt", "rank_1.json.gz", "rank_1.txt"]


@pytest.mark.filterwarnings("ignore:Profiler won't be using warmup")  # torch's, for the resume at the first step
def test_a_profile_window_cut_short_or_resumed_past_writes_no_trace(tmp_path):
    """StepProfiler as the loop drives it: a run that stops inside the window (a signal, exit_at_step) writes no trace
    under the window's name and says so; one resumed past the window traces nothing and says nothing; one resumed at
    the window's first step traces it without the untraced lead-in step."""
    from deepseek_pt.engine.profiling import StepProfiler

    def run(steps: range, first: int = 3, n: int = 2) -> tuple[StepProfiler, str | None]:
        profiler = StepProfiler(first, n, tmp_path, rank=0, device=torch.device("cpu"))
        for step in steps:
            profiler.before_step(step)
            torch.ones(8, 8) @ torch.ones(8, 8)
            profiler.after_step(step)
        return profiler, profiler.close()

    _, said = run(range(1, 4))
    assert said == "profile: the run stopped after 1 of the 2 steps from train.profile_start_step 3: no trace written"
    assert not (tmp_path / "profile").exists()
    assert run(range(6, 9))[1] is None and not (tmp_path / "profile").exists()
    profiler, said = run(range(3, 6))  # resumed at step 2's checkpoint: step 3 runs first, traced at once
    assert said.startswith(f"profile: steps 3-4 traced by every rank in {tmp_path / 'profile' / 'step_3-4'}: ")
    assert sorted(p.name for p in (tmp_path / "profile" / "step_3-4").iterdir()) == ["rank_0.json.gz", "rank_0.txt"]


@pytest.mark.slow
def test_one_rank_parameters_kept_gathered_through_the_step_train_and_resume_alike(tmp_path, data):
    """parallel.zero_keep_params_gathered on one rank with every parameter persistent: the step writes the
    parameters through their partitions instead of releasing and re-gathering them. A checkpoint's save (which
    releases and re-gathers them) and a resume from it give the losses of DeepSpeed's release and re-gather."""
    common = [*ONE_RANK_ALL_PERSISTENT, "train.save_every=4"]
    reference, kept, resumed = tmp_path / "released", tmp_path / "kept", tmp_path / "resumed"
    proc = train(1, reference, data, *common, "parallel.zero_keep_params_gathered=false")
    assert "stay gathered through the optimizer step" not in proc.stdout
    proc = train(1, kept, data, *common)
    assert re.search(r"zero3: all \d+ parameters stay gathered through the optimizer step", proc.stdout), proc.stdout
    assert_same_losses(kept, reference, abs=1e-6)
    train(1, resumed, data, *common, f"train.resume={ckpt(kept, 4)}")
    assert_same_losses(resumed, reference, range(5, STEPS + 1), abs=1e-6)


@pytest.mark.slow
def test_recomputing_the_moe_block_gives_the_same_losses(tmp_path, baseline, data):
    """Activation checkpointing of block 1 (AutoEP's MoE layer under ZeRO-3) changes memory, not the math."""
    train(2, tmp_path, data, "train.activation_checkpointing=[1]")
    assert_same_losses(tmp_path, baseline, abs=1e-5)


@pytest.mark.slow
def test_fp8_blockwise_emulation_trains_like_fp32(tmp_path, baseline, data):
    """DeepSeek-V3 blockwise FP8 on the MLP linears and rowwise FP8 on the routed and shared experts' and the attention
    projections' GEMMs (all emulated) under ZeRO-3 + AutoEP EP 2: the run says so, and its losses track the fp32
    baseline's."""
    proc = train(2, tmp_path, data, "precision=fp8", "fp8.recipe=blockwise", "fp8.layers=all", "fp8.experts=true",
                 "fp8.shared_experts=true", "fp8.attention=true")
    assert "blockwise scaling, emulated in fp32" in proc.stdout and "the real-GEMM path needs a Hopper GPU" in proc.stdout
    assert "fp8: routed experts of 1 MoE layer, rowwise scaling, weight gradients in bf16, emulated" in proc.stdout
    assert "fp8: shared experts of 1 MoE layer, rowwise scaling, weight gradients in bf16, emulated" in proc.stdout
    assert re.search(r"fp8: \d+ attention projections( \(\d+ with a dimension not a multiple of 16 kept in bf16\))?, "
                     r"rowwise scaling, weight gradients in bf16, emulated", proc.stdout), proc.stdout
    b = assert_same_losses(tmp_path, baseline, rel=0.01)
    assert b[STEPS] < b[1] - 0.1


@pytest.mark.slow
def test_fp8_torchao_rowwise_on_a_cpu_trains_like_fp32_across_a_resume(tmp_path, baseline, data):
    """torchao's Float8Linear (rowwise, on every eligible linear but the dense MLP's, which fp8.dense_mlp takes,
    emulated, its weight gradients FP8 too, a scale per channel) under ZeRO-3 + AutoEP EP 2, run by torch's CPU FP8
    GEMMs: the run says so, saves and resumes with FP8 linears in its state, and its losses track the fp32
    baseline's."""
    fp8 = ("precision=fp8", "fp8.recipe=rowwise", "fp8.layers=all", "fp8.dense_mlp=true",
           "fp8.linear_weight_grads=fp8_rowwise")
    proc = train(2, tmp_path, data, *fp8, "train.exit_at_step=4")
    assert "fp8: 11 linears, rowwise scaling, torchao" in proc.stdout and "on a CPU: torch's CPU FP8 GEMMs" in proc.stdout
    assert ("fp8: 3 dense MLP projections, rowwise scaling, weight gradients in FP8 (a scale per channel), emulated"
            in proc.stdout), proc.stdout
    assert "Failed to load" not in proc.stdout + proc.stderr  # torchao's CUDA extensions are not even tried
    train(2, tmp_path, data, *fp8)
    b = assert_same_losses(tmp_path, baseline, rel=0.01)
    assert b[STEPS] < b[1] - 0.1


@pytest.mark.slow
@pytest.mark.parametrize("experts", ["ours", "deepspeeds"])
def test_cpu_ranks_on_a_gpu_host_train_as_on_a_cpu_host(tmp_path, baseline, data, experts):
    """DS_ACCELERATOR=cpu where torch sees a GPU (faked: tests/jobs.py's gpu_host_env). DeepSpeed's launcher hands the
    ranks CUDA_VISIBLE_DEVICES=0,1 all the same: by torch's answer the engine took cuda:1 ("invalid device ordinal" on
    a one-GPU H100), and DeepSpeed's Triton SwiGLU ran on CPU rows, in our experts' GEMMs and in AutoEP's own
    (parallel.expert_triton_gemms=false). The run now trains on the CPU, as the baseline did on a CPU host: the same
    losses, to the bit with our experts; AutoEP's differentiate their SwiGLU by autograd, ours by its formula."""
    run = tmp_path / "run"
    on_autoeps = [] if experts == "ours" else ["parallel.expert_triton_gemms=false"]
    proc = run_job(_launch_cmd(2, run, data, "train.eval_every=4", "train.save_every=4", "train.peak_tflops=0.001",
                               *on_autoeps), gpu_host_env(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("AutoEP expert layers on our GEMMs" in proc.stdout) == (experts == "ours"), proc.stdout[-3000:]
    if experts == "ours":
        assert losses(run) == losses(baseline)
    else:
        assert_same_losses(run, baseline, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, overrides", [
    (4, ["train.micro_batch_size=2"]),            # 2 -> 4 processes, same global batch
    (2, ["parallel.expert_parallel_size=1"]),     # EP 2 -> 1
    (2, ["parallel.zero_init=true"]),             # built whole -> built partitioned: other partition layout
], ids=["2-to-4-processes", "ep2-to-ep1", "to-zero-init"])
def test_universal_resume_on_another_topology(tmp_path, baseline, stopped, data, nproc, overrides):
    proc = train(nproc, tmp_path, data, f"train.resume={ckpt(stopped, 4)}", *overrides)
    assert "universal: resharded" in proc.stdout
    assert "sequences per optimizer step here" not in proc.stdout  # the same global batch
    assert_same_losses(tmp_path, baseline, range(5, STEPS + 1), abs=1e-4)


@pytest.mark.slow
def test_a_resume_that_changes_the_global_batch_or_the_eval_set_says_so(tmp_path, stopped, data):
    proc = train(2, tmp_path, data, f"train.resume={ckpt(stopped, 4)}", "train.grad_accum_steps=2", "train.max_steps=5",
                 "train.eval_every=4", "train.eval_sequences=1000", "model.moe.bias_update_rate=0.0")
    assert ("resume: model.moe.bias_update_rate 0.0 here (0.01 in the checkpoint): the weights go on under this "
            "config's") in proc.stdout, proc.stdout[-3000:]
    assert ("resume: 16 sequences per optimizer step here (train.micro_batch_size 4 x train.grad_accum_steps 2 x 2 "
            "processes), 8 in the checkpoint's run") in proc.stdout, proc.stdout[-3000:]
    assert ("resume: evaluation reads the first 1000 sequences of 'val' here (train.eval_sequences), 32 in the "
            "checkpoint's run: eval_loss from here on is over another set") in proc.stdout, proc.stdout[-3000:]
    assert (f"eval: split 'val' of {data} holds 304 sequences of data.seq_len + 1 tokens, fewer than "
            "train.eval_sequences 1000: evaluation reads all 304") in proc.stdout, proc.stdout[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("every_process", [True, False], ids=["job", "one-rank"])
def test_sigterm_checkpoints_the_current_step(tmp_path, data, every_process):
    proc = start_job(_launch_cmd(2, tmp_path, data, "train.max_steps=100000", launcher=deepspeed_cmd), job_env())
    wait_until(proc, lambda: (tmp_path / "metrics.jsonl").exists() and len(metrics(tmp_path)) >= 3, 300,
               "3 training steps")
    # Preemption signals every process of the job (as SLURM does): the launcher, its launch.py child
    # and the ranks; the ranks finish the step, checkpoint and exit 0. A signal to one rank alone stops them all too,
    # and rank 0, which did not get it, says why (it said "time limit", with none set).
    if every_process:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        os.kill(session_pid(proc, "--local_rank=1"), signal.SIGTERM)  # the launcher starts rank R with --local_rank=R
    out, _ = finish_job(proc, 120)
    assert "stopped at step" in out and ": signal" in out, out[-3000:]
    assert every_process or proc.returncode == 0, out[-3000:]  # a signalled launcher kills its ranks and fails
    last = metrics(tmp_path)[-1]["step"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{last:08d}"
    assert (ckpt(tmp_path, last) / "meta.json").exists()


@pytest.mark.slow
def test_corrupt_checkpoint_is_named(tmp_path, stopped, data):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    victim = ckpt(run, 8) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    victim.write_bytes(bytes(blob))
    proc = train(2, run, data, "train.max_steps=10", expect_rc=2)
    assert f"{victim}: sha256 mismatch" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cuda_out_of_memory_is_told_as_the_configs_to_fix(tmp_path, data):
    """An out-of-memory error in a step (here raised in place of the step, on one process) ends the run with an
    error line, not a traceback: torch's account of the allocation, the model states' share and the keys that
    shrink the rest."""
    said = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.02 "
            "GiB is free. Including non-PyTorch memory, this process has 78.16 GiB memory in use. If reserved but "
            "unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    driver = ("import sys, torch\nimport deepseek_pt.train as t\n"
              f"def step(*args, **kwargs):\n    raise torch.OutOfMemoryError({said!r})\n"
              "t.train_step = step\nsys.exit(t.main(sys.argv[1:]))")
    proc = run_job([sys.executable, "-c", driver, "--config", SMOKE, f"data.path={data}", f"run.dir={tmp_path}",
                    "parallel.expert_parallel_size=1", "train.grad_accum_steps=2"], timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"^error: rank 0: CUDA out of memory\. Tried to allocate 2\.00 GiB\. GPU 0 has a total "
                     r"capacity of 79\.19 GiB of which 1\.02 GiB is free\. The model states take at least 0\.0 GiB"
                     r"( of its [^(]+)? \(python -m deepseek_pt\.params CONFIG --gpus 1\); the rest went to "
                     r"activations, for train\.micro_batch_size x data\.seq_len = 4 x 64 tokens per micro-step: a "
                     r"smaller train\.micro_batch_size \(now 4; raise train\.grad_accum_steps, now 2, to keep the "
                     r"batch\); or train\.activation_checkpointing: true \(recompute each block's activations in "
                     r"backward\)$", proc.stderr, re.M), proc.stderr[-3000:]


@pytest.mark.slow
def test_a_diverged_run_stops_after_max_nonfinite_steps(tmp_path, data):
    """A learning rate of 1e30 makes every step after the first non-finite. Such a run went on skipping steps to
    train.max_steps: now it stops with an error after train.max_nonfinite_steps in a row, on both ranks, saving
    nothing; the skipped steps changed neither the weights nor the balancing biases, and are counted."""
    proc = train(2, tmp_path, data, "train.lr=1e30", "train.warmup_steps=0", "train.max_nonfinite_steps=3",
                 "train.save_every=1", "train.max_steps=20", expect_rc=2)
    out = proc.stdout + proc.stderr
    assert out.count("error: steps 2-4: the loss or gradient norm was not finite at 3 steps in a row "
                     "(train.max_nonfinite_steps); stopped without a checkpoint (the newest is "
                     f"{ckpt(tmp_path, 3)};") == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    logged = metrics(tmp_path)
    assert [m["skipped_steps"] for m in logged] == [0, 1, 2, 3]
    assert math.isfinite(logged[0]["loss"]) and all(math.isnan(m["loss"]) for m in logged[1:])
    assert logged[0]["expert_load"] is not None and all(m["expert_load"] is None for m in logged[1:])
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    def saved(step: int, rank: int, kind: str) -> dict:
        return torch.load(ckpt(tmp_path, step) / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt", weights_only=False)

    for rank in range(2):  # step 1's checkpoint and step 3's, after two skipped steps
        weights = [saved(step, rank, "optim")["optimizer_state_dict"]["fp32_flat_groups"] for step in (1, 3)]
        biases = [saved(step, rank, "model")["balance_bias"] for step in (1, 3)]
        for before, after in (weights, biases):
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.slow
def test_metrics_that_cannot_be_written_stop_every_rank(tmp_path, data):
    """Rank 0's metrics.jsonl write failing (here past a file-size limit, as on a full disk) ended rank 0 in a
    traceback while rank 1 waited in the next collective: now both stop at that step, each with one line."""
    run = tmp_path / "run"
    # 24 KiB: past the run's copy of its tokenizer (15 KiB, written at start), ~50 steps' metrics lines
    limited = ["bash", "-c", 'ulimit -f 24 && exec "$@"', "bash", *_launch_cmd(2, run, data, "train.max_steps=200",
                                                                              "train.checkpoints=false")]
    proc = run_job(limited)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    step = len(lines) + 1 if lines[-1].endswith("}") else len(lines)  # the step whose line did not fit, or only part
    assert [json.loads(line)["step"] for line in lines[:step - 1]] == list(range(1, step))
    assert out.count(f"error: {run / 'metrics.jsonl'}: File too large (") == 1, out[-3000:]
    assert len(re.findall(rf"\d [MG]iB free\): stopped at step {step} without a checkpoint \(none saved\)", out)) == 1, \
        out[-3000:]
    assert out.count(f"error: rank 0 could not write its metrics.jsonl: stopped at step {step}") == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_a_run_dir_rank_0_cannot_write_at_start_stops_every_rank(tmp_path, data):
    """Rank 0's config.yaml failing (here past a file-size limit, as on a full disk) was one line on rank 0, while
    rank 1 went on into DeepSpeed's first collective and died there in a DistNetworkError traceback (or waited,
    under NCCL); a file-size limit (EFBIG) was a traceback on rank 0 too."""
    run = tmp_path / "run"
    limited = ["bash", "-c", 'ulimit -f 2 && exec "$@"', "bash", *_launch_cmd(2, run, data)]
    proc = run_job(limited, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert out.count(f"error: {run / 'config.yaml'}: File too large") == 1, out[-3000:]
    assert out.count(f"error: rank 0 could not write run.dir: {run / 'config.yaml'}: File too large") == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


# ------------------------------------------------------------------------------------------------
# Bad input: refused before any process group starts, by the module itself (fast).


def _direct(*args: str, world: int = 2) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", "deepseek_pt.train", "--config", str(SMOKE), *args],
                   job_env(WORLD_SIZE=str(world)), timeout=120)


@pytest.mark.parametrize("args, world, message", [
    (["model.moe.topk=2"], 2, "model.moe.topk: unknown key"),
    (["data.path=/nonexistent/shards"], 2, "data.path: /nonexistent/shards/manifest.json: manifest not found"),
    (["parallel.expert_parallel_size=2"], 3, "parallel.expert_parallel_size: 2 does not divide the world size (3 processes)"),
    (["parallel.expert_parallel_size=3"], 3, "parallel.expert_parallel_size: 3 does not divide model.moe.n_routed_experts (8)"),
    (["model.vocab_size=512"], 2, "model.vocab_size: 512 is smaller than the tokenizer's vocabulary (1024"),
    (["precision=fp8", "fp8.recipe=blockwise", "fp8.fast_accum=all"], 2,
     "fp8.fast_accum: 'all' applies to torchao's tensorwise and rowwise recipes and to the FP8 weight gradients of "
     "fp8.linear_weight_grads"),
    (["model.dim=8192", "model.moe.expert_inter_dim=65536", "model.moe.n_routed_experts=64"], 2,  # 103B parameters
     "parallel.zero_init: false builds the whole model in fp32 in each of this node's 2 processes: 780.2 GiB"),
    (["train.resume=/nonexistent/ckpt"], 2, "train.resume: checkpoint /nonexistent/ckpt does not exist"),
    (["train.checkpoints=false", "train.save_every=4"], 2,
     "train.save_every: 4 asks for checkpoints, but train.checkpoints is false"),
    (["train.init_from=/nonexistent/export"], 2, "train.init_from: /nonexistent/export/export.json: not found"),
    (["data.path=null"], 2, "data.path: required to train: a shard directory (or the sources of data.blend)"),
    (["train.eval_every=4", "data.seq_len=20000", "model.max_seq_len=20000"], 2,  # val: 19,462 tokens, train 55,062
     "data.val_split: split 'val' of {data}/manifest.json holds no sample of data.seq_len + 1 = 20001 tokens"),
    (["data.path=null", "data.blend=[{path: {data}}, {path: /nonexistent/code}]"], 2,
     "data.blend[1].path: /nonexistent/code/manifest.json: manifest not found"),
    (["data.path=null", "data.blend=[{path: {data}}, {path: {other}}]"], 2,
     ("data.blend[1].path: {other}/manifest.json was tokenized with another tokenizer (sha256 000000000000) than "
      "{data}/manifest.json")),
    (["run.dir=/dev/null/run"], 2, "run.dir: /dev/null/run: /dev/null is not a directory"),
])
def test_bad_input_is_refused_before_start(tmp_path, data, args, world, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("sentinel")
    other = shutil.copytree(data, tmp_path / "other")  # the same shards, said to come from another tokenizer
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"]["sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(manifest))

    def named(text: str) -> str:
        return text.replace("{data}", str(data)).replace("{other}", str(other))

    proc = _direct(f"data.path={data}", f"run.dir={run}", *map(named, args), world=world)
    assert proc.returncode == 2
    message = named(message)
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert (run / "config.yaml").read_text() == "sentinel" and sorted(p.name for p in run.iterdir()) == ["config.yaml"]


def test_options_may_follow_overrides():
    from deepseek_pt.train import parse_args

    args = parse_args(["--config", "c.yaml", "train.max_steps=3", "--check-only", "run.dir=/tmp/r", "--local_rank=1"])
    assert (args.config, args.check_only, args.local_rank) == ("c.yaml", True, 1)
    assert args.overrides == ["train.max_steps=3", "run.dir=/tmp/r"]


def test_a_process_started_alone_gets_a_rendezvous_of_its_own(monkeypatch):
    from deepseek_pt.engine import distributed

    for key in (*distributed.RENDEZVOUS_ENV, "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    said = distributed.rendezvous_env()
    assert said.startswith("one process (no launcher's RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT")
    assert {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert said.endswith(f"127.0.0.1:{os.environ['MASTER_PORT']}")
    assert distributed.rendezvous_env() is None  # a launcher's whole set (here, the one just made) is left alone
    monkeypatch.delenv("MASTER_PORT")
    with pytest.raises(distributed.PreflightError, match="the environment sets RANK, LOCAL_RANK, WORLD_SIZE, "
                                                          "MASTER_ADDR but not MASTER_PORT: start the ranks"):
        distributed.rendezvous_env()
    for key in distributed.RENDEZVOUS_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_NTASKS", "8")  # srun python: 8 lone processes would each train the whole run
    with pytest.raises(distributed.PreflightError, match="SLURM started 8 tasks without RANK, .*launch/slurm.sbatch"):
        distributed.rendezvous_env()
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "8")  # mpirun: DeepSpeed's MPI discovery sets them
    assert distributed.rendezvous_env() is None and "RANK" not in os.environ


@pytest.mark.slow
def test_one_process_without_a_launcher_trains_like_two_ranks(tmp_path, baseline, data):
    """`python -m deepseek_pt.train` alone (DeepSpeed would look for MPI): a rendezvous of its own, and the baseline's
    global batch in one rank gives the baseline's losses."""
    from deepseek_pt.engine.distributed import RENDEZVOUS_ENV

    env = {k: v for k, v in job_env().items() if k not in RENDEZVOUS_ENV}
    proc = run_job([sys.executable, "-m", "deepseek_pt.train", "--config", SMOKE, f"data.path={data}",
                    f"run.dir={tmp_path}", f"train.max_steps={STEPS}", "train.eval_every=0", "train.save_every=0",
                    "parallel.expert_parallel_size=1", "train.micro_batch_size=8"], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "one process (no launcher's RANK" in proc.stdout
    assert_same_losses(tmp_path, baseline, abs=1e-4)


@pytest.mark.slow
def test_one_process_with_warnings_shown_logs_no_deprecation_of_deepspeeds_collectives(tmp_path, data):
    """README's one-process command, outside the launch scripts' PYTHONWARNINGS=ignore: torch 2.13's FutureWarnings
    on DeepSpeed's reduce_scatter_tensor and all_gather_into_tensor took two lines of the log each, several times a
    step, nothing a user could act on."""
    from deepseek_pt.engine.distributed import RENDEZVOUS_ENV

    env = {k: v for k, v in job_env().items() if k not in (*RENDEZVOUS_ENV, "PYTHONWARNINGS")}
    proc = run_job([sys.executable, "-m", "deepseek_pt.train", "--config", SMOKE, f"data.path={data}",
                    f"run.dir={tmp_path}", "train.max_steps=2", "train.warmup_steps=2", "train.eval_every=0",
                    "train.save_every=0", *ONE_RANK_ALL_PERSISTENT], env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FutureWarning: `torch.distributed." not in proc.stdout + proc.stderr, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("split", ["train", "val"])
def test_verify_checksums_names_a_corrupt_shard_of_either_split(tmp_path, data, split):
    """data.verify_checksums hashed only the training shards (evaluation read a corrupt val shard unchecked), in
    every process, and a mismatch ended in a DataError traceback. Now the node's two processes hash half of the
    shards each: the bad one is named once, by the process that hashed it, and both stop before training."""
    shards = tmp_path / "shards"
    shutil.copytree(data, shards)
    victim = shards / f"{split}-00001.bin"
    blob = bytearray(victim.read_bytes())
    blob[100] ^= 1
    victim.write_bytes(bytes(blob))
    proc = train(2, tmp_path / "run", shards, "train.eval_every=1", "train.checkpoints=false",
                 "data.verify_checksums=true", expect_rc=2)
    out = proc.stdout + proc.stderr
    assert out.count(f"error: shard {victim}: corrupt: sha256") == 1, out[-3000:]
    assert out.count("error: data.verify_checksums: a shard failed its check in another process") == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_incomplete_latest_checkpoint_is_refused(tmp_path, data):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}")
    assert proc.returncode == 2 and "step_00000004, which is missing or incomplete (no meta.json); no complete " \
        "checkpoint is left (train.resume=none starts over)" in proc.stderr, proc.stderr


def test_latest_naming_a_removed_checkpoint_names_the_way_on(tmp_path, data):
    """The newest checkpoint found corrupt and removed by hand: `latest` names it, and the error said only that. It
    names the newest complete one now, which then resumes (not refused as a rollback: nothing later is left)."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text(
        json.dumps({"step": 4, "world_size": 2, "ep_size": 2, "files": {}}))
    (run / "checkpoints" / "latest").write_text("step_00000008\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}", "--check-only")
    assert proc.returncode == 2, proc.stderr
    assert (f"step_00000008, which is missing or incomplete (no meta.json); name the newest complete one instead "
            f"(train.resume={ckpt(run, 4)} to resume it)") in proc.stderr, proc.stderr
    assert _direct(f"data.path={data}", f"run.dir={run}", f"train.resume={ckpt(run, 4)}", "--check-only").returncode == 0


def test_a_universal_checkpoint_named_for_resume_resumes_its_source(tmp_path):
    """train.resume=.../step_N_universal, the conversion kept beside step_N for resumes on another layout, failed as
    corrupt ("failed verification: ... truncated or overwritten; ... missing"): its meta.json is step_N's."""
    from deepseek_pt.engine import checkpoint
    from deepseek_pt.engine.checkpoint import CheckpointError

    root = tmp_path / "run" / "checkpoints"
    universal = root / "step_00000004_universal"
    universal.mkdir(parents=True)
    (universal / "meta.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"^train.resume: {universal} is a universal checkpoint without its "
                                              rf"source {root / 'step_00000004'}; name a step_\* checkpoint$"):
        checkpoint.resolve(str(universal), tmp_path / "elsewhere")
    (root / "step_00000004").mkdir()
    (root / "step_00000004" / "meta.json").write_text("{}")
    assert checkpoint.resolve(str(universal), tmp_path / "elsewhere") == root / "step_00000004"


@pytest.mark.parametrize("meta, named", [
    ({"step": 4, "files": {}}, "missing or malformed world_size, ep_size"),
    ({"step": 4, "world_size": 2, "ep_size": 2, "files": {"mp_rank_00_model_states.pt": {"bytes": 1}}},
     "missing or malformed files.mp_rank_00_model_states.pt"),
    ({"step": 4, "world_size": 2, "ep_size": 2, "files": {}, "settings": "bf16"}, "missing or malformed settings"),
    ({"step": 4, "world_size": 2, "ep_size": 2, "files": {}, "settings": {"model": {}, "bf16": False, "autoep": 1}},
     "missing or malformed settings.zero_stage, settings.autoep"),
])
def test_a_malformed_meta_json_is_named(tmp_path, data, meta, named):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"step_00000004/meta.json: {named}" in proc.stderr, proc.stderr


def test_a_rollback_in_place_is_refused(tmp_path, data):
    """Resuming step 4 in the run.dir that holds step 8: its saves would mix with the later history, which `latest`
    keeps naming until they replace it. Another run.dir resumes it; so does the newest checkpoint in place."""
    run = tmp_path / "run"
    for step in (4, 8):
        (run / "checkpoints" / f"step_0000000{step}").mkdir(parents=True)
        meta = {"step": step, "world_size": 2, "ep_size": 2, "files": {}}
        (run / "checkpoints" / f"step_0000000{step}" / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "latest").write_text("step_00000008\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}", f"train.resume={ckpt(run, 4)}", "--check-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"train.resume: step_00000004 is older than step_00000008 in the same run.dir ({run}/checkpoints): resume "
            f"it into another run.dir (run.dir=NEW train.resume={ckpt(run, 4)})") in proc.stderr, proc.stderr
    for where, resume in ((tmp_path / "elsewhere", ckpt(run, 4)), (run, ckpt(run, 8)), (run, "auto")):
        proc = _direct(f"data.path={data}", f"run.dir={where}", f"train.resume={resume}", "--check-only")
        assert proc.returncode == 0, proc.stderr


def test_max_steps_below_the_resumed_step_is_refused(tmp_path, data):
    """A resume past train.max_steps trained nothing and reported "stopped at step 8: train.max_steps reached" with
    max_steps 6: an extension mistyped looked like a finished run. At max_steps it is the finished run started again."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000008").mkdir(parents=True)
    (run / "checkpoints" / "step_00000008" / "meta.json").write_text(
        json.dumps({"step": 8, "world_size": 2, "ep_size": 2, "files": {}}))
    (run / "checkpoints" / "latest").write_text("step_00000008\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}", "train.max_steps=6", "--check-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"error: train.max_steps: 6 is below the step of the checkpoint it resumes (8, {ckpt(run, 8)}): nothing "
            "to train; raise it to go on") in proc.stderr, proc.stderr
    assert _direct(f"data.path={data}", f"run.dir={run}", "train.max_steps=8", "--check-only").returncode == 0


def test_a_save_killed_between_its_meta_json_and_latest_resumes_from_it(tmp_path, data):
    """meta.json and `latest` are renamed into place one after the other: a kill in between left step 8 complete
    and `latest` naming step 4, which train.resume=auto then refused as a rollback in place (and told to remove
    the complete step 8). The newest complete checkpoint is where the run stood."""
    from deepseek_pt.engine import checkpoint

    run = tmp_path / "run"
    for step in (4, 8):
        (run / "checkpoints" / f"step_0000000{step}").mkdir(parents=True)
        meta = {"step": step, "world_size": 2, "ep_size": 2, "files": {}}
        (run / "checkpoints" / f"step_0000000{step}" / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "step_00000012").mkdir()  # a later save, killed before its meta.json: not taken
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    assert checkpoint.resolve("auto", run) == ckpt(run, 8)
    proc = _direct(f"data.path={data}", f"run.dir={run}", "--check-only")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("latest", [True, False])
def test_a_fresh_start_over_complete_checkpoints_is_refused(tmp_path, data, latest):
    """Its saves would replace the old run's checkpoints of the same steps, and pruning (by step) would delete its
    own in favour of the old run's later ones, leaving `latest` naming a deleted checkpoint. Without `latest` (the
    first save killed between its meta.json and `latest`), resume=auto takes the newest complete checkpoint: it was
    refused as such a fresh start."""
    from deepseek_pt.engine import checkpoint

    run = tmp_path / "run"
    for step in (4, 8):
        (run / "checkpoints" / f"step_0000000{step}").mkdir(parents=True)
        (run / "checkpoints" / f"step_0000000{step}" / "meta.json").write_text("{}")
    if latest:
        (run / "checkpoints" / "latest").write_text("step_00000008\n")
    proc = _direct(f"data.path={data}", f"run.dir={run}", "train.resume=none", "--check-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert ("train.resume: none starts from step 0" in proc.stderr
            and f"{run / 'checkpoints'} holds complete checkpoints (newest step_00000008)" in proc.stderr), proc.stderr
    assert checkpoint.resolve("auto", run) == ckpt(run, 8)


def test_a_run_on_data_of_another_tokenizer_than_its_checkpoints_is_refused(tmp_path, data):
    """Each start records the data's tokenizer in run.dir for the tools used after training: a resume on data of
    another tokenizer (the same vocabulary size, shards of the same shape) trained on ids that name other pieces,
    and would have made the record false of the checkpoints before it."""
    from deepseek_pt.data import open_manifest

    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    meta = {"step": 4, "world_size": 2, "ep_size": 2, "files": {}}
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text(json.dumps(meta))
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    (run / "data.json").write_text(json.dumps({"tokenizer_sha256": "0" * 64, "doc_boundary": "eos"}))
    sha = open_manifest(data).tokenizer_sha256
    # resumed in place, resumed into another run.dir, started afresh beside them without checkpoints of its own
    for where, extra in ((run, []), (tmp_path / "elsewhere", [f"train.resume={ckpt(run, 4)}"]),
                         (run, ["train.resume=none", "train.checkpoints=false", "train.save_every=0"])):
        proc = _direct(f"data.path={data}", f"run.dir={where}", *extra, "--check-only")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert (f"error: data.path: {data / 'manifest.json'} was tokenized with another tokenizer (sha256 "
                f"{sha[:12]}...) than the checkpoints in {run} were trained with ({run / 'data.json'}: sha256 000000000000...): its "
                "ids would name other pieces; train on data of that tokenizer, or in another run.dir") in proc.stderr
    (run / "data.json").write_text(json.dumps({"tokenizer_sha256": sha, "doc_boundary": "eos"}))
    assert _direct(f"data.path={data}", f"run.dir={run}", "--check-only").returncode == 0


TRUNCATED = "data.path: shard {file}: truncated: 16382 bytes, manifest says 8192 tokens x 2 = 16384 bytes"


@pytest.mark.parametrize("shard, damage, overrides, message", [
    ("train-00002.bin", "remove", [], "data.path: shard {file}: missing (listed in {shards}/manifest.json)"),
    ("train-00001.bin", "truncate", [], TRUNCATED),
    ("val-00001.bin", "truncate", ["train.eval_every=4"], TRUNCATED),
    ("train-00003.bin", "empty split", [], "data.train_split: split 'train' of {shards}/manifest.json is empty"),
])
def test_a_missing_or_truncated_shard_is_refused_before_the_start(tmp_path, data, shard, damage, overrides, message):
    """--check-only passed, and the run stopped only after writing run.dir's config.yaml and tokenizer, on a shard
    the loader found missing or of the wrong size. A split whose shards are not the run's is not looked at."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    shards = shutil.copytree(data, tmp_path / "shards")
    file = shards / shard
    if damage == "remove":
        file.unlink()
    elif damage == "truncate":
        file.write_bytes(file.read_bytes()[:-2])
    else:
        manifest = json.loads((shards / "manifest.json").read_text())
        manifest["splits"]["train"] = []
        (shards / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(SMOKE, [f"data.path={shards}", f"run.dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(preflight_checks.PreflightError) as err:
        preflight_checks.preflight(cfg, 2)
    assert str(err.value) == message.format(file=file, shards=shards)
    assert not (tmp_path / "run").exists()
    if shard.startswith("val"):
        preflight_checks.preflight(load_config(SMOKE, [f"data.path={shards}", f"run.dir={tmp_path / 'run'}",
                                                       "train.eval_every=0"]), 2)


@pytest.mark.parametrize("name", ["config.yaml", "metrics.jsonl", "tokenizer.model", "data.json", ".lock",
                                  "checkpoints"])
def test_a_run_dir_entry_of_the_wrong_kind_is_refused_before_the_start(tmp_path, data, name):
    """A directory where the run writes a file ended the start in an IsADirectoryError traceback; a file named
    checkpoints was found only by the first save, the steps before it lost."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    run = tmp_path / "run"
    if name == "checkpoints":
        run.mkdir()
        (run / name).write_text("")
    else:
        (run / name).mkdir(parents=True)
    with pytest.raises(preflight_checks.PreflightError) as err:
        preflight_checks.preflight(load_config(SMOKE, [f"data.path={data}", f"run.dir={run}"]), 2)
    kind = "not a directory" if name == "checkpoints" else "a directory"
    assert str(err.value) == (f"run.dir: {run / name} is {kind}, where the run writes its {name}: remove it, or use "
                              "another run.dir")


def test_a_shard_directorys_wrong_tokenizer_is_refused_before_the_start(tmp_path, data):
    """--check-only passed, and the run stopped only after writing run.dir's config.yaml, on a tokenizer.model that
    is not the one the manifest names (the copy every start keeps in run.dir)."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    shards = shutil.copytree(data, tmp_path / "shards")
    (shards / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(preflight_checks.PreflightError, match=rf"^data.path: {shards / 'tokenizer.model'}: sha256 "
                                                          r"[0-9a-f]{12}\.\.\. is not the tokenizer "):
        preflight_checks.preflight(load_config(SMOKE, [f"data.path={shards}", f"run.dir={tmp_path / 'run'}"]), 2)
    assert not (tmp_path / "run").exists()


def test_an_empty_val_split_is_named_as_empty_before_the_start(tmp_path, pydoc_data_dir):
    """Shards built with build_shards' default --val-fraction 0 have an empty val split, which training with
    train.eval_every set refused as "split 'val' not in .../manifest.json (has: ['train', 'val'])"."""
    import deepseek_pt.engine.preflight as preflight_checks
    from data_prep import build_shards
    from deepseek_pt.config import load_config

    shards = tmp_path / "shards"
    build_shards.build([str(pydoc_data_dir.corpus)], pydoc_data_dir.tokenizer_model, shards, shard_tokens=1 << 20,
                       num_proc=1, progress=False)
    config = lambda *extra: load_config(SMOKE, [f"data.path={shards}", f"run.dir={tmp_path / 'run'}", *extra])
    with pytest.raises(preflight_checks.PreflightError, match=(
            rf"^data.val_split: split 'val' of {shards / 'manifest.json'} is empty \(build_shards.py --val-fraction "
            r"puts documents there, 0 by default\): set train.eval_every=0 to train without evaluation$")):
        preflight_checks.preflight(config(), 2)
    preflight_checks.preflight(config("train.eval_every=0"), 2)


def test_the_run_keeps_the_tokenizer_its_data_names(tmp_path, data):
    from deepseek_pt.data import DataError, open_manifest
    from deepseek_pt.engine import run_tokenizer
    from deepseek_pt.engine.checkpoint import CheckpointError

    shards = shutil.copytree(data, tmp_path / "shards")
    run = tmp_path / "run"
    run.mkdir()
    run_tokenizer.record(open_manifest(shards), run)
    kept = run_tokenizer.read(run)
    assert kept.model == (shards / "tokenizer.model").read_bytes()
    assert (kept.sha256, kept.doc_boundary) == (open_manifest(shards).tokenizer_sha256, "eos")
    (shards / "tokenizer.model").unlink()  # the data's copy removed since: the run's, the same tokenizer, stays
    run_tokenizer.record(open_manifest(shards), run)
    assert run_tokenizer.read(run) == kept
    (shards / "tokenizer.model").write_bytes(b"another tokenizer")  # not the one the shards were built with
    with pytest.raises(DataError, match=f"{shards / 'tokenizer.model'}: sha256 [0-9a-f]{{12}}... is not the tokenizer "
                                        f"{shards / 'manifest.json'} was built with"):
        run_tokenizer.record(open_manifest(shards), run)
    (run / "data.json").write_text("{}")
    with pytest.raises(CheckpointError, match="data.json: needs tokenizer_sha256"):
        run_tokenizer.read(run)
    (run / "data.json").unlink()  # a run started before runs kept their tokenizer
    assert run_tokenizer.read(run) is None


def test_a_checkpoint_this_config_cannot_load_is_refused_before_start(tmp_path, data):
    """A changed model shape, ZeRO stage or precision failed deep inside DeepSpeed's load (a size mismatch, an
    assertion, a missing bf16_* file), after config.yaml had been overwritten; meta.json now records them."""
    import torch.distributed as dist

    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config
    from deepseek_pt.engine import checkpoint

    class Engine:
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"states")

    run = tmp_path / "run"
    config = lambda *overrides: load_config(SMOKE, [f"data.path={data}", f"run.dir={run}", *overrides])  # noqa: E731
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        checkpoint.save(Engine(), run, 4, {}, ep_size=2, keep_last=3,
                        settings=preflight_checks.resume_settings(config()))
    finally:
        dist.destroy_process_group()
    for overrides, why in [
        (["model.dim=32"], "the model's parameter shapes differ: model.dim: 32 here, 64 in the checkpoint"),
        (["model.moe.n_routed_experts=4", "model.moe.n_expert_groups=2"],
         ("the model's parameter shapes differ: model.moe.n_routed_experts: 4 here, 8 in the checkpoint; "
          "model.moe.n_expert_groups: 2 here, 4 in the checkpoint")),
        (["parallel.zero_stage=2"], "parallel.zero_stage: 2 here, 3 in the checkpoint"),
        (["precision=bf16"], "precision: bf16 here, fp32 in the checkpoint"),
        # refused by the loader's state only after the engine was built, and --check-only passed it
        (["data.seq_len=32"], "data.seq_len: 32 here, 64 in the checkpoint (every source's sample order would change)"),
        (["data.seed=7"], "data.seed: 7 here, 1234 in the checkpoint (every source's sample order would change)"),
    ]:
        with pytest.raises(preflight_checks.PreflightError) as refused:
            preflight_checks.preflight(config(*overrides), 2)
        assert str(refused.value).startswith(f"train.resume: this config cannot resume {run}/checkpoints/step_00000004: "
                                             f"{why}"), refused.value
    preflight_checks.preflight(config("model.moe.top_k=3", "model.attention.rope.theta=50000"), 2)  # no shape changes


def test_a_resume_on_other_data_is_refused_before_start(tmp_path, data, mirrored_smoke_shards):
    """A resume on other training data (other sources or blend weights) was refused only by the loader's state in
    DeepSpeed's files, once the engine had been built and had loaded them; meta.json now records that state and
    preflight refuses it, in the loader's words. A checkpoint from before (no loader state in its meta.json) is
    left to that late check."""
    import torch.distributed as dist

    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config
    from deepseek_pt.data import PretrainDataset, TrainLoader
    from deepseek_pt.data.loader import NewDataError
    from deepseek_pt.engine import checkpoint

    class Engine:
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"states")

    run = tmp_path / "run"
    tag = run / "checkpoints" / "step_00000004"

    def blend(weight: int) -> list[str]:
        return ["data.path=null", f"data.blend=[{{path: {data}}}, {{path: {mirrored_smoke_shards}, weight: {weight}}}]"]

    def config(*overrides: str):
        return load_config(SMOKE, [f"run.dir={run}", *(overrides or blend(1))])

    def loader(cfg):
        return TrainLoader([PretrainDataset(s.path, cfg.data.train_split, cfg.data.seq_len) for s in cfg.data.sources()],
                           4, seed=cfg.data.seed, weights=[s.weight for s in cfg.data.sources()])

    def save(settings: dict) -> None:
        shutil.rmtree(run, ignore_errors=True)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
        try:
            checkpoint.save(Engine(), run, 4, {}, ep_size=2, keep_last=3, settings=settings)
        finally:
            dist.destroy_process_group()
            (tmp_path / "store").unlink(missing_ok=True)

    saved = loader(config())  # a blend of two sources, equal weights, 32 samples in
    saved.consumed_samples = 32
    save({**preflight_checks.resume_settings(config()), "loader": saved.state_dict()})
    for overrides, why in (([f"data.path={data}"], "sources no longer trained on (shard fingerprints) ['"),
                           (blend(3), "blend counts: checkpoint [1, 1] for sources ['")):
        cfg = config(*overrides)
        with pytest.raises(preflight_checks.PreflightError) as refused:
            preflight_checks.preflight(cfg, 2)
        with pytest.raises(NewDataError) as late:  # what the check after DeepSpeed's load says
            loader(cfg).load_state_dict(saved.state_dict())
        assert why in str(late.value)
        assert str(refused.value) == (f"train.resume: {tag}: {late.value}; set data.resume_on_new_data=true to go on "
                                      "with this data")
    preflight_checks.preflight(config(*blend(3), "data.resume_on_new_data=true"), 2)
    preflight_checks.preflight(config(), 2)  # the same data
    save(preflight_checks.resume_settings(config()))  # an older checkpoint: no loader state in its meta.json
    preflight_checks.preflight(config(*blend(3)), 2)
    (tag / "meta.json").write_text(json.dumps({**checkpoint.read_meta(tag), "settings": {
        **preflight_checks.resume_settings(config()), "loader": [1]}}))
    with pytest.raises(preflight_checks.PreflightError, match=r"meta.json: missing or malformed settings.loader$"):
        preflight_checks.preflight(config(), 2)


def test_a_checkpoint_in_our_own_moe_blocks_layout_is_refused(data):
    """Before AutoEP's layers computed the sequence-wise balance loss, a model with one trained in our own MoE block
    and saved its experts in that layout, which AutoEP's load cannot read: such a checkpoint (its settings without
    the `autoep` key) is refused; one of a model without that loss went through AutoEP then too."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    def old_meta(cfg):
        settings = preflight_checks.resume_settings(cfg)
        del settings["autoep"]
        return {"settings": settings}

    with_loss = load_config(SMOKE, [f"data.path={data}", "model.moe.seq_aux_loss_alpha=0.01"])
    why = preflight_checks.resume_mismatch(old_meta(with_loss), with_loss, "meta.json")
    assert why is not None and why.startswith("its routed experts are in deepseek_pt's own MoE block's layout"), why
    current = {"settings": preflight_checks.resume_settings(with_loss)}
    assert preflight_checks.resume_mismatch(current, with_loss, "") is None
    without = load_config(SMOKE, [f"data.path={data}"])
    assert preflight_checks.resume_mismatch(old_meta(without), without, "meta.json") is None


@pytest.mark.slow
def test_a_resume_on_other_data_is_named(tmp_path, data):
    from deepseek_pt.engine.distributed import RENDEZVOUS_ENV

    alone = {k: v for k, v in job_env().items() if k not in RENDEZVOUS_ENV}  # one process, no launcher
    cmd = [sys.executable, "-m", "deepseek_pt.train", "--config", SMOKE, f"data.path={data}", f"run.dir={tmp_path}",
           "train.max_steps=2", "train.warmup_steps=2", "train.eval_every=0", *ONE_RANK_ALL_PERSISTENT]
    assert run_job(cmd, alone, timeout=300).returncode == 0
    proc = run_job([*cmd, "train.max_steps=4", "data.seq_len=32"], alone, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"error: train.resume: this config cannot resume \S+step_00000002: data.seq_len: 32 here, 64 in "
                     r"the checkpoint", proc.stderr), proc.stderr


@pytest.mark.slow
def test_time_limit_exit_and_offline_wandb_resume_the_same_run(tmp_path, data):
    first = train(2, tmp_path, data, "train.max_steps=100", "train.exit_after_minutes=0.0001", "run.wandb=offline",
                  "train.warmup_steps=1")
    assert "stopped at step 1: time limit" in first.stdout
    state = lambda step: torch.load(ckpt(tmp_path, step) / "zero_pp_rank_0_mp_rank_00_model_states.pt",  # noqa: E731
                                    weights_only=False)
    wandb_id = state(1)["wandb_id"]
    assert wandb_id and any((tmp_path / "wandb").glob(f"offline-run-*-{wandb_id}"))
    train(2, tmp_path, data, "train.max_steps=3", "run.wandb=offline", "train.warmup_steps=1")
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3]
    assert state(3)["wandb_id"] == wandb_id
    # A branch from step 1 into another run.dir: the first run's wandb run already holds steps 2-3, which wandb
    # would keep, dropping the branch's.
    branch = tmp_path / "branch"
    proc = train(2, branch, data, "train.max_steps=2", "run.wandb=offline", "train.warmup_steps=1",
                 f"train.resume={ckpt(tmp_path, 1)}")
    assert f"whose wandb run {wandb_id} holds that run's steps" in proc.stdout, proc.stdout[-3000:]
    branch_id = torch.load(ckpt(branch, 2) / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["wandb_id"]
    assert branch_id not in (None, wandb_id)


def test_a_resume_keeps_the_wandb_run_of_its_own_run_dir_only(tmp_path, capsys):
    from deepseek_pt.train import wandb_run_to_resume

    run = tmp_path / "run"
    for resumed in (ckpt(run, 4), run / "checkpoints" / "step_00000004_universal"):
        assert wandb_run_to_resume("abc", resumed, run, say=True) == "abc"
    assert wandb_run_to_resume("abc", ckpt(run, 4), tmp_path / "branch", say=True) is None
    assert "wandb: a new run for" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("overrides, parts", [
    (["model.mtp_depth=1", "parallel.expert_parallel_size=2"], {"mtp_loss"}),  # MTP's MoE block under AutoEP
    (["model.moe.seq_aux_loss_alpha=0.01", "parallel.expert_parallel_size=2"], {"balance_loss"}),
], ids=["mtp-autoep", "sequence-balance-loss-autoep"])
def test_mtp_and_sequence_balance_loss_train_under_zero3(tmp_path, data, overrides, parts):
    train(2, tmp_path, data, "train.max_steps=3", "train.warmup_steps=3", *overrides)
    records = metrics(tmp_path)
    assert len(records) == 3
    for r in records:
        assert parts <= set(r) and all(r[p] > 0 for p in parts)
        loads = sorted(k for k in r if k.startswith("expert_load/"))  # the MTP block's MoE layer's own, under AutoEP
        assert loads == ["expert_load/layer_1"] + ["expert_load/mtp_0"] * ("mtp_loss" in parts)


@pytest.mark.slow
def test_loss_parts_are_means_over_the_micro_steps(tmp_path, data):
    """mtp_loss and balance_loss, like loss, average every micro-step of the step: 2 micro-batches of 2 sequences
    log what 1 of 4 does (they logged the last micro-step's)."""
    parts = ["model.mtp_depth=1", "model.moe.seq_aux_loss_alpha=0.01", "parallel.expert_parallel_size=1",
             "train.max_steps=3", "train.warmup_steps=3"]
    train(1, tmp_path / "one", data, *parts)
    train(1, tmp_path / "two", data, *parts, "train.micro_batch_size=2", "train.grad_accum_steps=2")
    for one, two in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert two[key] == pytest.approx(one[key], abs=1e-5), (one["step"], key)


def test_keep_last_prunes_old_and_incomplete_checkpoints(tmp_path):
    from deepseek_pt.engine.checkpoint import _prune
    root = tmp_path / "checkpoints"
    for step, complete in [(2, True), (4, False), (6, True), (8, True), (10, True), (12, False)]:
        tag = root / f"step_{step:08d}"
        tag.mkdir(parents=True)
        if complete:
            (tag / "meta.json").write_text("{}")
    (root / "step_00000002_universal").mkdir()
    _prune(root, keep_last=2)
    # The newest two complete ones stay; an incomplete one older than the newest complete goes; one
    # newer (a save in flight) stays.
    assert sorted(p.name for p in root.iterdir()) == ["step_00000008", "step_00000010", "step_00000012"]


def _small_checkpoint(tmp_path: Path) -> Path:
    """A step_00000004 of two files and the meta.json listing their sizes and sha256 (checkpoint.save's, in small)."""
    import hashlib

    tag = tmp_path / "step_00000004"
    (tag / "rng").mkdir(parents=True)
    contents = {"mp_rank_00_model_states.pt": b"weights" * 100, "rng/rank_0.pt": b"rng state"}
    for name, data in contents.items():
        (tag / name).write_bytes(data)
    files = {n: {"bytes": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in contents.items()}
    (tag / "meta.json").write_text(json.dumps({"format_version": 1, "step": 4, "world_size": 1, "ep_size": 1,
                                               "files": files}))
    return tag


def test_verify_names_a_same_size_corruption_by_its_sha256(tmp_path):
    """checkpoint.verify: a file whose bytes changed but not its size (a flipped bit, a bad sector) fails on its
    sha256, named, where a size check alone would load it; an intact checkpoint passes. Before, only the slow
    runs' corrupt-checkpoint test reached the hash comparison."""
    from deepseek_pt.engine.checkpoint import CheckpointError, verify

    tag = _small_checkpoint(tmp_path)
    assert verify(tag, collective=False)["step"] == 4
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"weighTs" + b"weights" * 99)  # same size
    with pytest.raises(CheckpointError) as err:
        verify(tag, collective=False)
    assert f"{tag / 'mp_rank_00_model_states.pt'}: sha256 mismatch (corrupt)" in str(err.value)
    assert "rank_0.pt" not in str(err.value)


def _rewrite_meta(tag: Path, **changes) -> None:
    (tag / "meta.json").write_text(json.dumps({**json.loads((tag / "meta.json").read_text()), **changes}))


@pytest.mark.parametrize("damage, named", [
    (lambda tag: (tag / "rng" / "rank_0.pt").unlink(), "rng/rank_0.pt: missing"),
    (lambda tag: (tag / "rng" / "rank_0.pt").write_bytes(b"rng"),
     "rng/rank_0.pt: 3 bytes, meta.json says 9 (truncated or overwritten)"),
    (lambda tag: _rewrite_meta(tag, format_version=99),
     "meta.json: format_version 99 is newer than this reader (1); update deepseek_pt"),
    (lambda tag: (tag / "meta.json").write_text("[]"), "meta.json: not a checkpoint meta.json (no step / files)"),
    (lambda tag: (tag / "meta.json").write_bytes(b"\xff\xfe{"), "meta.json: unreadable ("),
], ids=["missing-file", "truncated-file", "newer-format", "not-a-meta", "not-text"])
def test_verify_names_what_is_wrong_with_a_checkpoint(tmp_path, damage, named):
    """What checkpoint.verify refuses before a resume loads anything, each case one CheckpointError naming the file
    and the fault (a missing file, a size that is not meta.json's, a newer writer, a meta.json that is not one)."""
    from deepseek_pt.engine.checkpoint import CheckpointError, verify

    tag = _small_checkpoint(tmp_path)
    damage(tag)
    with pytest.raises(CheckpointError) as err:
        verify(tag, collective=False)
    assert f"{tag}/{named}" in str(err.value), str(err.value)


def _failed_save(run_dir: Path, engine) -> str:
    """The CheckpointError of checkpoint.save(engine) at step 4, in a process group of one."""
    import torch.distributed as dist

    from deepseek_pt.engine import checkpoint

    dist.init_process_group("gloo", init_method=f"file://{run_dir}/store", rank=0, world_size=1)
    try:
        with pytest.raises(checkpoint.CheckpointError) as failed:
            checkpoint.save(engine, run_dir, 4, {}, ep_size=1, keep_last=3)
    finally:
        dist.destroy_process_group()
    return str(failed.value)


def test_a_save_that_fills_the_disk_is_named_and_keeps_the_last_checkpoint(tmp_path):
    from deepseek_pt.engine import checkpoint

    class DiskFullEngine:  # writes part of a partition, then fails as torch.save does on a full disk
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 21812932864 vs 21812932760")

    root = checkpoint.checkpoints_dir(tmp_path)
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "meta.json").write_text("{}")
    (root / "latest").write_text("step_00000002\n")
    message = _failed_save(tmp_path, DiskFullEngine())
    assert message.startswith(f"{root / 'step_00000004'}: writing the checkpoint failed on rank 0 ([enforce fail")
    assert re.search(r"\d [MG]iB free on that filesystem", message) and "ignored on resume" in message
    assert (root / "latest").read_text() == "step_00000002\n" and not (root / "step_00000004" / "meta.json").exists()
    assert checkpoint.resolve("auto", tmp_path) == root / "step_00000002"


def test_a_save_whose_meta_json_or_latest_cannot_be_written_fails_on_every_rank(tmp_path):
    """Rank 0 wrote meta.json and `latest` outside the failure exchange: a failure there (here `latest` a directory;
    a full disk alike) was a traceback on rank 0 while the others, at the closing barrier, died in gloo's
    'Connection closed by peer' (or waited, under NCCL). Now a CheckpointError on every rank, and meta.json removed
    again: a checkpoint `latest` cannot name counts as incomplete."""
    from deepseek_pt.engine import checkpoint

    class Engine:
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"states")

    root = checkpoint.checkpoints_dir(tmp_path)
    (root / "latest" / "x").mkdir(parents=True)
    assert _failed_save(tmp_path, Engine()).startswith(f"{root / 'step_00000004'}: writing the checkpoint failed on rank 0 "
                                        f"({root / 'latest'}: Is a directory); ")
    assert not (root / "step_00000004" / "meta.json").exists()


def test_a_damaged_kept_universal_checkpoint_is_converted_again(tmp_path, monkeypatch):
    """The universal checkpoint a resharding resume makes is kept and reused by later ones: one with a file truncated
    since was loaded as it was, a torch.load traceback from deep inside DeepSpeed's load."""
    import torch.distributed as dist

    from deepseek_pt.engine import checkpoint

    tag_dir = tmp_path / "checkpoints" / "step_00000004"
    (tag_dir / "rng").mkdir(parents=True)
    (tag_dir / "meta.json").write_text("{}")
    conversions = []

    def convert(src, out):
        conversions.append(src)
        (out / "zero" / "w").mkdir(parents=True)
        (out / "zero" / "w" / "fp32.pt").write_bytes(b"x" * 100)
        return out

    monkeypatch.setattr(checkpoint, "convert_to_universal", convert)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        out = checkpoint.ensure_universal(tag_dir)
        assert checkpoint.ensure_universal(tag_dir) == out and len(conversions) == 1  # kept: reused
        os.truncate(out / "zero" / "w" / "fp32.pt", 10)
        assert checkpoint.ensure_universal(tag_dir) == out and len(conversions) == 2  # damaged: converted again
        assert (out / "zero" / "w" / "fp32.pt").stat().st_size == 100
    finally:
        dist.destroy_process_group()


def test_a_resharding_resume_of_a_read_only_checkpoint_says_to_copy_it(tmp_path, monkeypatch):
    """The universal conversion is written beside the checkpoint: on a read-only mount it failed inside
    ds_to_universal, one line that did not say what to do."""
    from deepseek_pt.engine import checkpoint

    tag_dir = tmp_path / "checkpoints" / "step_00000004"
    tag_dir.mkdir(parents=True)
    monkeypatch.setattr(checkpoint.os, "access", lambda path, mode: Path(path) != tag_dir.parent)
    monkeypatch.setattr(checkpoint, "convert_to_universal", lambda *a: pytest.fail("converted into a read-only dir"))
    with pytest.raises(checkpoint.CheckpointError, match=f"but {tag_dir.parent} is not writable: copy the checkpoint "
                       "into a writable checkpoints/ directory and resume from there"):
        checkpoint.keep_universal(tag_dir)


@pytest.mark.parametrize("output, named", [
    (("Traceback (most recent call last):\n  ...\nRuntimeError: [enforce fail at inline_container.cc:672] . "
      "unexpected pos 704 vs 598"), "No space left on device ("),
    ("Traceback (most recent call last):\n  ...\nKeyError: 'param_shapes'",
     "DeepSpeed's ds_to_universal failed (exit 1): KeyError: 'param_shapes' (its output: "),
], ids=["disk-full", "other"])
def test_a_failed_universal_conversion_is_one_line(tmp_path, monkeypatch, output, named):
    """ds_to_universal's failure (a resume on another world size, an export) was its whole stderr, a DeepSpeed
    traceback, in the error: now one line, a full disk named with the space free and needed, and what the
    conversion wrote removed."""
    from deepseek_pt.engine import checkpoint

    tag_dir, out = tmp_path / "step_00000004", tmp_path / ".step_00000004_universal.tmp"
    tag_dir.mkdir()
    (tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(bytes(3 << 20))

    def failing_conversion(cmd, **kwargs):
        (out / "zero").mkdir(parents=True)  # as far as it got
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=output)

    monkeypatch.setattr(checkpoint.subprocess, "run", failing_conversion)
    monkeypatch.setattr(checkpoint.tempfile, "tempdir", str(tmp_path))  # the kept output's log, not in /tmp
    with pytest.raises(checkpoint.CheckpointError) as failed:
        checkpoint.convert_to_universal(tag_dir, out)
    message = str(failed.value)
    assert message.startswith(f"{tag_dir}: ") and named in message and "\n" not in message, message
    if "No space" in named:
        assert message.endswith(" free there; it needs roughly 6.0 MiB, twice the checkpoint's size)"), message
    else:
        log = Path(message.rsplit("(its output: ", 1)[1].rstrip(")"))
        assert log.parent == tmp_path and log.read_text() == output + "\n"
    assert not out.exists()


@pytest.mark.slow
def test_parallel_timeout_minutes_ends_a_wait_on_a_hung_rank():
    proc = run_job(ranks_cmd(2, ROOT / "tests" / "dist" / "collective_timeout.py", "0.05"), timeout=120)
    result = last_json(proc.stdout)
    # 3 s, not DeepSpeed's default (here 3 minutes), nor the 15 s until the stalled rank exits
    assert result["error"] and 2.5 <= result["waited_s"] < 10, result


@pytest.mark.slow
@pytest.mark.parametrize("overrides, leaf, compiled, hooked_linears", [
    (["parallel.zero_leaf_blocks=false", "parallel.zero_memory_efficient_linear=true",
      "parallel.zero_idle_hooks_off=false"], [], [], 18),
    (["train.compile_blocks=true", "train.deterministic=true"], ["layers.0", "layers.1"],
     ["layers.0.attention_residual", "layers.0.mlp_residual", "layers.1.attention_residual", "token_loss"], 0),
    (["parallel.zero_persistence_threshold=1000"], ["layers.0", "layers.1"], [], 1),
], ids=["hooks-per-linear", "leaf-and-compiled-blocks", "params-released"])
def test_zero3_block_granularity_and_compiled_blocks(tmp_path, baseline, data, overrides, leaf, compiled,
                                                     hooked_linears):
    """Blocks as ZeRO-3 leaf modules (the default) and compiled block halves (here in Inductor's deterministic mode)
    change the hooks, not the math: the wiring is what the engine reports, and 8 training steps give the baseline's
    losses, also under torch's deterministic algorithms (train.deterministic, which implies Inductor's deterministic
    mode: no op on this path lacks a deterministic kernel). So do ZeRO-3's per-module hooks, which the baseline runs
    without: at the default threshold every smoke parameter (the largest, the embedding, has 65,536 elements) stays
    gathered, so the engine removes them (parallel.zero_idle_hooks_off); the hooks-per-linear case keeps them. So
    does ZeRO-3 releasing parameters after each use and gathering them again, which only the params-released case
    runs. DeepSpeed's own F.linear (memory_efficient_linear) runs in the hooks-per-linear case only."""
    proc = run_job(ranks_cmd(2, ROOT / "tests" / "dist" / "engine_report.py", *overrides), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wiring = last_json(proc.stdout)
    assert wiring["leaf"] == leaf and wiring["compiled"] == compiled  # the AutoEP MoE half stays eager
    # with leaf blocks only the output head is hooked as a linear; with the hooks removed, none
    assert wiring["hooked_linears"] == hooked_linears and wiring["zero3_module_hooks"] == (hooked_linears > 0)
    assert not wiring["throughput_timer"]  # DeepSpeed's would synchronize the GPU at every forward
    assert wiring["torch_linear"] == ("parallel.zero_memory_efficient_linear=true" not in overrides)
    assert wiring["fused_zero_step"]  # parallel.zero_fused_step's default
    deterministic = "train.deterministic=true" in overrides
    assert wiring["inductor_deterministic"] == wiring["deterministic_algorithms"] == deterministic
    assert wiring["cublas_workspace"] == (":4096:8" if deterministic else None)
    train(2, tmp_path, data, *overrides)
    assert_same_losses(tmp_path, baseline, abs=1e-5)


def zero_step_report(data: Path, *overrides: str, nproc: int = 2) -> dict:
    proc = run_job(ranks_cmd(nproc, ROOT / "tests" / "dist" / "zero_step_check.py", f"data.path={data}",
                                 "train.grad_clip=0.5", *overrides), timeout=300)  # smoke norms are 0.7-1.0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return last_json(proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, overrides, rel", [
    (2, [], 1e-6),
    (2, ["precision=bf16", "train.grad_accum_steps=2", "parallel.coalesce_grad_reduction=true"], 1e-3),
    (1, ["precision=bf16", *ONE_RANK_ALL_PERSISTENT], 1e-3),
], ids=["fp32", "bf16-coalesced", "bf16-one-rank-kept-gathered"])
def test_zero3_fused_step_updates_and_skips_as_deepspeeds(data, nproc, overrides, rel):
    """engine/zero3_step.py's step against DeepSpeed's own, on 2 ranks with AutoEP (the experts' norms summed over
    the expert-parallel group), the clip engaged: the same losses and gradient norms (DeepSpeed sums the norm in
    fp64, ours in fp32; in bf16 the gradients are bf16), and a NaN loss's step skipped alike: master weights,
    Adam's moments and step count and the learning rate untouched, counted as skipped, the next step training on.
    On one rank with every parameter persistent, ours never releases the parameters (views of their bf16
    partitions, which the update writes), where DeepSpeed's releases and re-gathers them at every step. Run on a
    GPU (one rank), it also checks that the host never waits on ZeRO-3's reduction stream."""
    ours, theirs = (zero_step_report(data, *overrides, f"parallel.zero_fused_step={on}", nproc=nproc)
                    for on in ("true", "false"))
    assert ours["fused_step"] and not theirs["fused_step"]
    assert theirs["releases"] == 3 and ours["releases"] == (0 if nproc == 1 else 3), (ours, theirs)
    # On a GPU DeepSpeed's backward epilogue waits on the host for its reduction stream at every step (its step
    # more: 7 waits in 3 steps on an H200); ours has the GPU wait for it. A CPU has no such stream.
    assert ours["stream_waits"] == 0, ours
    assert theirs["stream_waits"] >= 3 if ours["device"] == "cuda" else theirs["stream_waits"] == 0, theirs
    if nproc == 1:
        assert ours["partition_views"] == ours["parameters"], ours
    for step, (got, want) in enumerate(zip(ours["steps"], theirs["steps"]), 1):
        if step == 2:  # the NaN loss
            assert math.isnan(got["loss"]) and math.isnan(want["loss"]), (got, want)
            assert {k: v for k, v in got.items() if k != "loss"} == {k: v for k, v in want.items() if k != "loss"} \
                == {"grad_norm": float("inf"), "state_unchanged": True, "lr_unchanged": True}, (got, want)
            continue
        assert got["loss"] == pytest.approx(want["loss"], rel=rel) and got["grad_norm"] == pytest.approx(
            want["grad_norm"], rel=rel), (step, got, want)
        assert not got["state_unchanged"] and not got["lr_unchanged"], (step, got)
    assert ours["skipped_steps"] == theirs["skipped_steps"] == 1


# GPUs run the update compiled (one Triton kernel) and torch's fused AdamW as a CUDA kernel: check both pairs there.
UPDATE_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", UPDATE_DEVICES)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_adamw_update_steps_as_torchs_fused_adamw(grad_dtype, device):
    """zero3_step's one-pass update, as the step runs it on `device`, against torch's fused AdamW on the same flat
    tensors: four steps with a clip factor, the third on a non-finite norm (nothing moves, the step count
    included), a bf16 copy of the weights written as they change."""
    from deepseek_pt.engine.zero3_step import _compiled_adamw_update, adamw_update
    update = _compiled_adamw_update() if device == "cuda" else adamw_update
    gen = torch.Generator().manual_seed(0)
    weights = torch.randn(1000, generator=gen).to(device)
    reference = torch.nn.Parameter(weights.clone())
    torch_adamw = torch.optim.AdamW([reference], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    exp_avg, exp_avg_sq, step = torch.zeros_like(weights), torch.zeros_like(weights), torch.zeros((), device=device)
    copy = torch.empty(1000, dtype=torch.bfloat16, device=device)
    for n, (scale, skip) in enumerate([(1.0, False), (2.5, False), (1.0, True), (1.7, False)]):
        grad = torch.randn(1000, generator=gen).to(device, grad_dtype)
        grad_scale, found_inf = torch.tensor(scale, device=device), torch.tensor(float(skip), device=device)
        reference.grad = grad.float().clone()  # torch's kernel divides it in place
        torch_adamw.grad_scale, torch_adamw.found_inf = grad_scale, found_inf
        torch_adamw.step()
        update(weights, exp_avg, exp_avg_sq, grad, copy, step, grad_scale, found_inf,
               torch.tensor(1e-2, device=device), 0.9, 0.95, 1e-8, 0.1)
        state = torch_adamw.state[reference]
        assert step.item() == state["step"].item() == n + (not skip) - (n >= 3)
        # float rounding apart (torch's kernels order some operations otherwise)
        torch.testing.assert_close(weights, reference.detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(exp_avg, state["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], rtol=1e-5, atol=1e-9)
        assert torch.equal(copy, weights.bfloat16())


@pytest.mark.parametrize("device", UPDATE_DEVICES)
def test_adamw_update_compiles_to_one_graph_for_every_learning_rate(device):
    """GPUs run adamw_update compiled (one kernel per sub-group size): on views into larger buffers, as ZeRO-3's
    flat gradient and bf16 partition are, it must capture whole (fullgraph), equal the eager update, and not
    recompile as the learning rate, the clip factor or the skip change from step to step."""
    import torch._dynamo
    from deepseek_pt.engine.zero3_step import _compiled_adamw_update, adamw_update

    def tensors():
        gen = torch.Generator().manual_seed(0)
        grad_buffer, lp_buffer = torch.randn(5000, generator=gen).bfloat16(), torch.empty(4000, dtype=torch.bfloat16)
        return [t.to(device) for t in (torch.randn(3000, generator=gen), torch.zeros(3000), torch.zeros(3000))] + \
            [grad_buffer.to(device).narrow(0, 1000, 3000), lp_buffer.to(device).narrow(0, 500, 3000),
             torch.zeros((), device=device)]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # other tests in this process may have compiled before
    compiled = _compiled_adamw_update()  # as the step compiles it for GPUs
    eager, traced = tensors(), tensors()
    for scale, skip, lr in [(1.0, 0.0, 1e-2), (2.0, 0.0, 5e-3), (1.0, 1.0, 4e-3), (1.5, 0.0, 3e-3)]:
        scalars = [torch.tensor(v, device=device) for v in (scale, skip, lr)] + [0.9, 0.95, 1e-8, 0.1]
        adamw_update(*eager, *scalars)
        compiled(*traced, *scalars)
        for want, got in zip(eager, traced):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_the_step_without_zero_clips_by_the_whole_norm_and_skips_a_non_finite_one():
    """parallel.zero_stage 0: no_zero_step's wrapped AdamW step reports the gradients' global norm, scales them by
    train.grad_clip over it (not when below), and skips a step whose norm is not finite as ZeRO does (overflow set,
    nothing moves). One process: no routed experts here, the expert groups' sums are the multi-process test's."""
    from types import SimpleNamespace

    from deepseek_pt.engine import no_zero_step
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    no_zero_step.install(SimpleNamespace(optimizer=optimizer, module=module, device=torch.device("cpu")), 1.0)
    for grads, norm, moved in [((3.0, 4.0), 5.0, 0.2), ((0.3, 0.4), 0.5, 1.0), ((float("nan"), 1.0), None, 0.0)]:
        before = [p.detach().clone() for p in module.parameters()]
        module.weight.grad = torch.full_like(module.weight, grads[0] / 6 ** 0.5)  # 6 values: norm grads[0]
        module.bias.grad = torch.full_like(module.bias, grads[1] / 2 ** 0.5)
        optimizer.step()
        assert optimizer.overflow == (norm is None)
        if norm is not None:
            assert optimizer._global_grad_norm.item() == pytest.approx(norm)
        for p, b, g in zip(module.parameters(), before, grads, strict=True):
            want = b - moved * torch.full_like(b, g / p.numel() ** 0.5) if moved else b
            torch.testing.assert_close(p.detach(), want)


@pytest.mark.slow
def test_zero_stages_0_1_and_2_train_resume_and_ramp_as_stage_3(tmp_path, data):
    """Every ZeRO stage, fp32 on 2 processes under expert parallelism 2 with the clip at work (gradient norms above
    train.grad_clip) and a batch ramp: stages 1 and 2 log stage 3's losses and gradient norms to the bit, stage 0
    (no_zero_step's norm, its own sum order) to float rounding; a stage-2 stop-and-resume is exact and a stage-1
    checkpoint resumes on 1 process (universal)."""
    common = ("train.grad_clip=0.5", "train.micro_batch_size=2", "train.grad_accum_steps=2",
              f"train.batch_rampup_tokens={2 * 2 * 64 * 2}", "train.save_every=4")
    runs = {stage: tmp_path / f"stage{stage}" for stage in (3, 2, 1, 0)}
    for stage, run in runs.items():
        train(2, run, data, *common, f"parallel.zero_stage={stage}")
    reference = metrics(runs[3])
    assert [m["batch_sequences"] for m in reference] == [4, 4, 8, 8, 8, 8, 8, 8]
    assert all(m["grad_norm"] > 0.5 for m in reference[2:])  # the clip scales those steps' gradients
    for stage in (2, 1, 0):
        logged = metrics(runs[stage])
        exact = {} if stage else {"rel": 1e-6}
        assert [m["loss"] for m in logged] == pytest.approx([m["loss"] for m in reference], **exact), stage
        assert [m["grad_norm"] for m in logged] == pytest.approx([m["grad_norm"] for m in reference], **exact), stage
    resumed = tmp_path / "stage2_resumed"
    train(2, resumed, data, *common, "parallel.zero_stage=2", f"train.resume={ckpt(runs[2], 4)}")
    assert_same_losses(resumed, runs[2], range(5, STEPS + 1), rel=0, abs=0)
    resharded = tmp_path / "stage1_on_one_process"
    proc = train(1, resharded, data, *common, "parallel.zero_stage=1", "parallel.expert_parallel_size=1",
                 "train.micro_batch_size=4", f"train.batch_rampup_tokens={2 * 2 * 64 * 2}",
                 f"train.resume={ckpt(runs[1], 4)}")
    assert "universal: resharded" in proc.stdout
    assert_same_losses(resharded, runs[1], range(5, STEPS + 1), abs=1e-4)


def test_zero3_fused_step_refuses_an_optimizer_it_does_not_cover():
    from deepseek_pt.engine import zero3_step
    with pytest.raises(RuntimeError, match="parallel.zero_fused_step: .* not ZeRO stage 3's; set "
                                           "parallel.zero_fused_step=false"):
        zero3_step.install(torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]))


def test_kept_gathered_parameters_become_views_of_their_partitions_again():
    """What the kept-gathered step does with a parameter a checkpoint left as a gathered copy or released: it points
    it at its partition again (values from the partition, status available); one in flight is refused."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    from deepseek_pt.engine import zero3_step
    param = torch.nn.Parameter(torch.zeros(4, 8))
    param.ds_id, param.ds_shape, param.ds_numel, param.ds_tensor = 0, param.shape, 32, torch.arange(34.0)
    for data, status in ((torch.zeros(4, 8), ZeroParamStatus.AVAILABLE), (torch.empty(0), ZeroParamStatus.NOT_AVAILABLE)):
        param.data, param.ds_status = data, status
        zero3_step._as_partition_views([param])
        assert param.data.data_ptr() == param.ds_tensor.data_ptr() and param.ds_status == ZeroParamStatus.AVAILABLE
        assert torch.equal(param.data, torch.arange(32.0).view(4, 8))
    param.ds_status = ZeroParamStatus.INFLIGHT
    with pytest.raises(RuntimeError, match="parameter 0 is being gathered at the optimizer step"):
        zero3_step._as_partition_views([param])


@pytest.mark.slow
@pytest.mark.parametrize("zero_init", [False, True], ids=["built-whole", "built-partitioned"])
def test_bf16_engine_keeps_rope_frequencies_and_balance_bias_in_fp32(zero_init):
    proc = run_job(ranks_cmd(2, ROOT / "tests" / "dist" / "engine_report.py", "precision=bf16",
                                 f"parallel.zero_init={zero_init}"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = last_json(proc.stdout)
    assert report["param_dtypes"] == ["torch.bfloat16"]
    assert report["rope_dtypes"] == ["torch.float32"] and report["rope_exact"]
    assert report["bias_dtypes"] == ["torch.float32"]


def test_fp8_settings_at_another_precision_are_named_as_ignored(tmp_path, data):
    """fp8.* keys set while precision is bf16 or fp32 were ignored without a word: a run meant for FP8 trained in
    bf16. The start names each key changed from its default; preflight passes (one config compares bf16 and FP8)."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    def config(*overrides):
        return load_config(SMOKE, [f"data.path={data}", f"run.dir={tmp_path / 'run'}", *overrides])

    cfg = config("fp8.recipe=rowwise", "fp8.layers=auto", "fp8.shared_experts=true")
    preflight_checks.preflight(cfg, 2)
    assert preflight_checks.ignored_fp8_settings(cfg) == (
        f"fp8.recipe=rowwise, fp8.shared_experts=true ignored: precision is {cfg.precision}, and the fp8 section "
        "applies at precision=fp8 only")
    assert preflight_checks.ignored_fp8_settings(config("precision=bf16", "fp8.recipe=tensorwise")) is None  # defaults
    assert preflight_checks.ignored_fp8_settings(config("precision=fp8", "fp8.recipe=rowwise")) is None


def test_zero3_settings_at_another_stage_are_named_as_ignored(tmp_path, data):
    """bench-2b's persistence threshold (and any other ZeRO-3-only key set from its default) under stage 1 or 2 is
    named at the start, as fp8's keys at another precision are; the defaults and stage 3 say nothing."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    cfg = load_config(ROOT / "configs" / "bench-2b.yaml", ["parallel.zero_stage=2", "parallel.zero_fused_step=false"])
    assert preflight_checks.ignored_zero3_settings(cfg) == (
        "parallel.zero_persistence_threshold=1000000000, parallel.zero_fused_step=false ignored: parallel.zero_stage "
        "is 2, and these apply to ZeRO-3 only")
    assert preflight_checks.ignored_zero3_settings(load_config(ROOT / "configs" / "bench-2b.yaml")) is None
    assert preflight_checks.ignored_zero3_settings(load_config(SMOKE, ["parallel.zero_stage=1"])) is None
    proc = train(1, tmp_path, data, "parallel.zero_stage=1", "parallel.expert_parallel_size=1", "train.max_steps=1",
                 "train.warmup_steps=1", "parallel.zero_idle_hooks_off=false")
    assert ("zero: parallel.zero_idle_hooks_off=false ignored: parallel.zero_stage is 1, and these apply to ZeRO-3 "
            "only") in proc.stdout, proc.stdout[-3000:]


def test_a_partitioned_build_needs_no_whole_model_in_host_memory(monkeypatch, tmp_path, data):
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config

    cfg = load_config(SMOKE, [f"data.path={data}", f"run.dir={tmp_path / 'run'}"])
    monkeypatch.setattr(preflight_checks, "host_memory_available", lambda: 1024)  # no whole model fits in 1 KiB
    with pytest.raises(preflight_checks.PreflightError, match="parallel.zero_init: false builds the whole model"):
        preflight_checks.preflight(cfg, 2)
    cfg.parallel.zero_init = True
    preflight_checks.preflight(cfg, 2)


@pytest.mark.parametrize("victim", ["latest", "meta.json"])
def test_a_latest_or_meta_json_that_is_not_text_is_named(tmp_path, data, victim):
    """A corrupt `latest` or meta.json (bytes that are not UTF-8, or `latest` a directory) was a UnicodeDecodeError
    or IsADirectoryError traceback, in training's preflight and in engine.export alike."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000004").mkdir(parents=True)
    (run / "checkpoints" / "step_00000004" / "meta.json").write_text(json.dumps({"step": 4, "files": {}}))
    (run / "checkpoints" / "latest").write_text("step_00000004\n")
    bad = run / "checkpoints" / ("latest" if victim == "latest" else "step_00000004/meta.json")
    bad.write_bytes(b"\xff\xfe\x00")
    proc = _direct(f"data.path={data}", f"run.dir={run}", "--check-only")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {bad}: unreadable (" in proc.stderr, proc.stderr
    proc = run_job([sys.executable, "-m", "deepseek_pt.engine.export", str(run), str(tmp_path / "out")], job_env(),
                   timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: {bad}: unreadable (" in proc.stderr, proc.stderr
    if victim == "latest":
        bad.unlink()
        bad.mkdir()
        proc = _direct(f"data.path={data}", f"run.dir={run}", "--check-only")
        assert proc.returncode == 2 and f"error: {bad}: unreadable ([Errno 21] Is a directory" in proc.stderr, proc.stderr


def test_a_meta_json_or_data_json_nested_too_deeply_is_named(tmp_path):
    """Thousands of nested arrays in a checkpoint's meta.json or run.dir's data.json were a RecursionError from inside
    json.loads, in training's preflight and in engine.export alike."""
    from deepseek_pt.engine import checkpoint, run_tokenizer
    from deepseek_pt.engine.checkpoint import CheckpointError

    deep = '{"step": 4, "files": {}, "settings": ' + "[" * 5000 + "]" * 5000 + "}"
    (tmp_path / "meta.json").write_text(deep)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'meta.json'}: unreadable \(nested too deeply: lists or "
                                              r"mappings more than 100 levels inside each other\)$"):
        checkpoint.read_meta(tmp_path)
    (tmp_path / run_tokenizer.RECORD_NAME).write_text(deep)
    with pytest.raises(CheckpointError, match=f"^{tmp_path / run_tokenizer.RECORD_NAME}: nested too deeply"):
        run_tokenizer.read(tmp_path)


def test_a_second_run_in_a_run_dir_in_use_is_refused(tmp_path, data):
    """Two runs started on one run.dir (a job resubmitted while the old one still ran) both trained: one
    metrics.jsonl with every step twice, interleaved, and saves into the same checkpoint directories, each deleting
    the other's of that step first. Rank 0 now holds a lock on run.dir for the whole run."""
    from deepseek_pt.engine.preflight import PreflightError
    from deepseek_pt.train import lock_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("sentinel")
    held = lock_run_dir(run)  # as the running job's rank 0 holds it
    try:
        proc = run_job([sys.executable, "-m", "deepseek_pt.train", "--config", str(SMOKE), f"data.path={data}",
                        f"run.dir={run}", "parallel.expert_parallel_size=1", "train.max_steps=2",
                        "train.warmup_steps=2"], timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert (f"error: run.dir: {run} is in use by another training run (pid {os.getpid()} on "
                in proc.stderr), proc.stderr[-3000:]
        assert (run / "config.yaml").read_text() == "sentinel" and not (run / "metrics.jsonl").exists()
        with pytest.raises(PreflightError, match="is in use by another training run"):
            lock_run_dir(run)
    finally:
        held.close()
    lock_run_dir(run).close()  # free again once the holder is gone


def test_an_init_from_export_of_another_model_names_the_keys(tmp_path, data):
    """The refusal said only that the model sections differ; a model section has dozens of keys. Keys that shape no
    parameter may change (a longer context, another balancing rate: a new phase of training)."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config
    from deepseek_pt.export import save_export
    from deepseek_pt.model import Transformer

    cfg = load_config(SMOKE, [f"data.path={data}"])
    export = save_export(Transformer(cfg.model), cfg, tmp_path / "export")
    common = [f"data.path={data}", f"run.dir={tmp_path / 'run'}", "model.moe.bias_update_rate=0.1",
              f"train.init_from={export}"]
    with pytest.raises(preflight_checks.PreflightError) as refused:
        preflight_checks.preflight(load_config(SMOKE, [*common, "model.dim=32"]), 2)
    assert str(refused.value) == (
        f"train.init_from: the parameter shapes of {export}/config.yaml's model differ from this config's: model.dim: "
        "32 here, 64 in the export; model.moe.bias_update_rate: 0.1 here, 0.01 in the export; train with that model "
        "section (keys that shape no parameter, such as model.max_seq_len and model.attention.rope for a longer "
        "context, may change)")
    preflight_checks.preflight(load_config(SMOKE, [*common, "model.max_seq_len=512", "model.attention.rope.scaling=yarn",
                                                   "model.attention.rope.factor=2"]), 2)


def test_an_init_from_export_of_another_tokenizer_is_refused(tmp_path, data):
    """Its embeddings were learned for the pieces of the tokenizer it records; the data's ids would name others."""
    import deepseek_pt.engine.preflight as preflight_checks
    from deepseek_pt.config import load_config
    from deepseek_pt.export import save_export
    from deepseek_pt.model import Transformer

    cfg = load_config(SMOKE, [f"data.path={data}"])
    export = save_export(Transformer(cfg.model), cfg, tmp_path / "export", tokenizer_sha256="ab" * 32)
    with pytest.raises(preflight_checks.PreflightError, match=rf"^train.init_from: {export} was trained with another "
                                                          r"tokenizer \(sha256 abababababab\.\.\.\) than data.path "):
        preflight_checks.preflight(load_config(SMOKE, [f"data.path={data}", f"run.dir={tmp_path / 'run'}",
                                                   f"train.init_from={export}"]), 2)
    same = save_export(Transformer(cfg.model), cfg, tmp_path / "same", tokenizer=data / "tokenizer.model")
    preflight_checks.preflight(load_config(SMOKE, [f"data.path={data}", f"run.dir={tmp_path / 'run'}",
                                               f"train.init_from={same}"]), 2)


def test_a_corrupt_init_from_export_is_one_line(tmp_path, data):
    """Preflight reads train.init_from's export.json; its weights' sha256 is checked when the engine loads them,
    where an ExportError (a flipped byte) was a traceback on every rank."""
    from deepseek_pt.config import load_config
    from deepseek_pt.export import save_export
    from deepseek_pt.model import Transformer

    cfg = load_config(SMOKE, [f"data.path={data}"])
    export = save_export(Transformer(cfg.model), cfg, tmp_path / "export")
    weights = bytearray((export / "model.safetensors").read_bytes())
    weights[-100] ^= 0x40
    (export / "model.safetensors").write_bytes(bytes(weights))
    proc = run_job([sys.executable, "-m", "deepseek_pt.train", "--config", str(SMOKE), f"data.path={data}",
                    f"run.dir={tmp_path / 'run'}", "parallel.expert_parallel_size=1", "train.max_steps=2",
                    "train.warmup_steps=2", f"train.init_from={export}"], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: train.init_from: {export / 'model.safetensors'}: corrupt: sha256 " in proc.stderr, proc.stderr


def test_resume_notes_say_what_the_resume_changes_and_nothing_else():
    # The slow resume tests pin each line in a real resume; here the cases around them: the same settings say
    # nothing, and a checkpoint from before these records were kept (no fields) says nothing either.
    from deepseek_pt.config import load_config
    from deepseek_pt.train import optimizer_settings, resume_notes

    cfg = load_config(SMOKE)
    same = {"sequences_per_step": 8, "optimizer_settings": optimizer_settings(cfg), "eval_sequences": 32}
    assert resume_notes(same, cfg, world=2, step=5, eval_sequences=32) == []
    assert resume_notes({}, cfg, world=2, step=5, eval_sequences=32) == []
    assert resume_notes(same, cfg, world=2, step=5, eval_sequences=None) == []  # no evaluation here: nothing to compare
    notes = resume_notes(same, load_config(SMOKE, ["train.lr=1e-3"]), world=4, step=5, eval_sequences=64)
    assert [n.split(" here")[0] for n in notes] == [
        "resume: 16 sequences per optimizer step", f"resume: train.lr 0.001 ({cfg.train.lr} in the checkpoint)",
        "resume: evaluation reads the first 64 sequences of 'val'"], notes
    import dataclasses

    saved = dataclasses.asdict(cfg.model)
    assert resume_notes(same, cfg, world=2, step=5, eval_sequences=32, saved_model=saved) == []
    later = load_config(SMOKE, ["model.moe.bias_update_rate=0.0", "model.mtp_loss_weight=0.1"])
    assert resume_notes(same, later, world=2, step=5, eval_sequences=32, saved_model=saved) == [
        "resume: model.mtp_loss_weight 0.1 here (0.3 in the checkpoint), model.moe.bias_update_rate 0.0 here (0.01 in "
        "the checkpoint): the weights go on under this config's"]


def test_fp8_at_one_micro_step_per_step_says_its_weight_casts_cost_what_it_saves(monkeypatch):
    # Only where the real FP8 GEMMs run (a CPU emulates them: no speed to speak of) and only at one micro-step.
    from types import SimpleNamespace

    from deepseek_pt.config import load_config
    from deepseek_pt.engine import fp8
    from deepseek_pt.train import ONE_MICRO_STEP_FP8, _convert_own_fp8

    engine = SimpleNamespace(module=torch.nn.Module(), global_steps=0)
    cfg = load_config(SMOKE, ["precision=fp8"])
    assert _convert_own_fp8(engine, cfg, coalesced=False) == []  # this CPU: emulated
    monkeypatch.setattr(fp8, "expert_gemms_unavailable", lambda: None)
    assert _convert_own_fp8(engine, cfg, coalesced=False) == [ONE_MICRO_STEP_FP8]
    accumulating = load_config(SMOKE, ["precision=fp8", "train.grad_accum_steps=4"])
    assert _convert_own_fp8(engine, accumulating, coalesced=True) == []


def test_keep_every_keeps_milestones_that_keep_last_would_prune(tmp_path):
    import torch.distributed as dist

    from deepseek_pt.engine import checkpoint

    class Engine:
        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"states")

    root = checkpoint.checkpoints_dir(tmp_path)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        for step in range(2, 21, 2):
            checkpoint.save(Engine(), tmp_path, step, {}, ep_size=1, keep_last=2, keep_every=6)
            if step == 6:
                (root / "step_00000006_universal").mkdir()  # a resume's conversion of a milestone stays with it
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step_00000006", "step_00000006_universal", "step_00000012", "step_00000018", "step_00000020"]


@pytest.mark.slow
def test_a_run_keeps_its_milestone_checkpoints(tmp_path, data):
    train(1, tmp_path, data, "parallel.expert_parallel_size=1", "train.save_every=2", "train.keep_last=1",
          "train.keep_every=4")
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_00000004", "step_00000008"]
