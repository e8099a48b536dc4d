"""engine.metrics: metrics.jsonl holds each step once, with what the run that trained it logged."""
from __future__ import annotations

import json

import pytest

from deepseek_pt.config import config_from_dict
from deepseek_pt.engine.metrics import MetricsLogger


def test_a_resume_drops_the_steps_it_runs_again_and_a_torn_line(tmp_path, capsys):
    """A run killed after logging step 6 with its last checkpoint at step 4 resumes at 4: steps 5-6 run again and
    must not appear twice; the kill may have cut the last line short."""
    cfg = config_from_dict({})
    lines = [json.dumps({"step": s, "loss": 10.0 - s}) + "\n" for s in range(1, 7)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines) + '{"step": 7, "lo')
    log = MetricsLogger(tmp_path, cfg, True, 4, None)
    log.log({"step": 5, "loss": 4.5})
    log.close()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["loss"]) for m in steps] == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 6.0), (5, 4.5)]
    assert "dropped 3 lines past step 4" in capsys.readouterr().out


def test_a_resume_with_nothing_past_its_step_leaves_the_file_alone(tmp_path):
    cfg = config_from_dict({})
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 5))
    (tmp_path / "metrics.jsonl").write_text(text)
    MetricsLogger(tmp_path, cfg, True, 4, None).close()
    assert (tmp_path / "metrics.jsonl").read_text() == text


def test_a_torn_line_that_is_not_utf8_is_dropped_too(tmp_path, capsys):
    """Garbage bytes after a crash were a UnicodeDecodeError traceback at the resume."""
    text = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 5))
    (tmp_path / "metrics.jsonl").write_bytes(text.encode() + b'{"step": 5, "lo\xff\xfe')
    MetricsLogger(tmp_path, config_from_dict({}), True, 4, None).close()
    assert (tmp_path / "metrics.jsonl").read_text() == text
    assert "dropped 1 lines past step 4" in capsys.readouterr().out


def test_a_run_starting_over_from_step_0_drops_the_earlier_runs_steps(tmp_path, capsys):
    """A run killed before its first checkpoint (or one with train.checkpoints: false) started again trains from step
    0 in the same run.dir: its steps were appended after the earlier run's, each step twice."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 4)))
    log = MetricsLogger(tmp_path, config_from_dict({}), True, 0, None)
    log.log({"step": 1, "loss": 2.0})
    log.close()
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        [{"step": 1, "loss": 2.0}]
    assert "dropped 3 lines past step 0 (this run starts over from step 0)" in capsys.readouterr().out


def test_wandb_that_cannot_start_is_one_line_naming_run_wandb(tmp_path, monkeypatch):
    """run.wandb=online without a W&B login ended rank 0 in wandb's UsageError traceback, after the engine was built."""
    import wandb

    from deepseek_pt.engine.metrics import WandbError

    def init(**kwargs):
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(WandbError) as err:
        MetricsLogger(tmp_path, config_from_dict({"run": {"wandb": "online"}}), True, 0, None)
    assert str(err.value) == ("run.wandb: online: W&B did not start (No API key configured. Use `wandb login` to log "
                              "in.); log in (wandb login, or WANDB_API_KEY), or set run.wandb=offline")
