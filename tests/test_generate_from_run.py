"""Generate and evaluate straight from a 2-process ZeRO-3 + EP=2 training run directory."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_train import ROOT, metrics, train


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_generate_and_evaluate_from_a_sharded_ep_run(tmp_path, pydoc_data_dir):
    run = tmp_path / "run"
    data = pydoc_data_dir.shards_dir
    train(2, run, data, "train.max_steps=6", "train.eval_every=6", "train.eval_batches=2")
    # One process, batches of 8 = both ranks' batches of 4: the same samples the engine evaluated at step 6.
    ev = _cli("deepseek_pt.evaluate", "--checkpoint", str(run), "--data", str(data), "--json",
              "--batch-size", "8", "--max-batches", "2")
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout.strip().splitlines()[-1])
    engine_eval = [m["eval_loss"] for m in metrics(run) if "eval_loss" in m][-1]
    assert result["loss"] == pytest.approx(engine_eval, abs=1e-4)
    greedy = [_cli("deepseek_pt.generate", "--checkpoint", str(run), "--prompt", "The for statement",
                   "--max-new-tokens", "12", "--temperature", "0", *extra) for extra in ([], ["--no-cache"])]
    for g in greedy:
        assert g.returncode == 0, g.stderr
    text = [g.stdout for g in greedy]
    assert text[0].strip() and text[0] == text[1]
    assert "B/token" in greedy[0].stdout + greedy[0].stderr  # the compressed-cache size report
