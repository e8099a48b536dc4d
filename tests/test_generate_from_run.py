"""Generate and evaluate straight from a 2-process ZeRO-3 + EP=2 training run directory."""
import json
import subprocess
import sys

import pytest
from jobs import ROOT, run_job
from test_train import metrics, train


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", module, *args], timeout=300)


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


@pytest.mark.slow
@pytest.mark.parametrize("zero_init", [False, True], ids=["built-whole", "built-partitioned"])
def test_training_starts_from_an_export(tmp_path, pydoc_data_dir, zero_init):
    """train.init_from: step 1's loss is the exported model's loss on the same first batches."""
    import torch

    from deepseek_pt.config import load_config
    from deepseek_pt.data import PretrainDataset, TrainLoader
    from deepseek_pt.export import save_export
    from deepseek_pt.model import Transformer

    data = pydoc_data_dir.shards_dir
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [f"data.path={data}"])
    torch.manual_seed(123)  # not the config's seed: the run must take these weights, not its own init
    model = Transformer(cfg.model)
    save_export(model, cfg, tmp_path / "export")
    run = tmp_path / "run"
    train(2, run, data, "train.max_steps=1", f"train.init_from={tmp_path / 'export'}", f"parallel.zero_init={zero_init}")
    ds = PretrainDataset(data, "train", cfg.data.seq_len)
    with torch.no_grad():
        expected = sum(model(*next(TrainLoader(ds, cfg.train.micro_batch_size, dp_rank=r, dp_world=2,
                                               seed=cfg.data.seed))).item() for r in range(2)) / 2
    assert metrics(run)[0]["loss"] == pytest.approx(expected, abs=1e-5)
