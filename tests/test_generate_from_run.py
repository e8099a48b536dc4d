"""Generate and evaluate straight from a 2-process ZeRO-3 + EP=2 training run directory, and from any directory."""
import hashlib
import json
import shutil
import subprocess
import sys

import pytest
from jobs import ROOT, finish_job, job_env, run_job, start_job
from test_train import SMOKE, metrics, train


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return run_job([sys.executable, "-m", module, *args], timeout=300)


@pytest.mark.slow
def test_generate_and_evaluate_from_a_sharded_ep_run(tmp_path, pydoc_data_dir):
    run = tmp_path / "run"
    data = pydoc_data_dir.shards_dir
    train(2, run, data, "train.max_steps=6", "train.eval_every=6", "train.eval_sequences=13")
    # One process, batches of 3 (the engine's two ranks took batches of 4, padded): the same 13 sequences the engine
    # evaluated at step 6, the same loss.
    ev = _cli("deepseek_pt.evaluate", "--checkpoint", str(run), "--data", str(data), "--json",
              "--batch-size", "3", "--max-sequences", "13")
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
    train(2, run, data, "train.max_steps=1", "train.warmup_steps=1", f"train.init_from={tmp_path / 'export'}",
          f"parallel.zero_init={zero_init}")
    ds = PretrainDataset(data, "train", cfg.data.seq_len)
    with torch.no_grad():
        expected = sum(model(*next(TrainLoader(ds, cfg.train.micro_batch_size, dp_rank=r, dp_world=2,
                                               seed=cfg.data.seed))).item() for r in range(2)) / 2
    assert metrics(run)[0]["loss"] == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_longer_context_trains_from_an_export_under_yarn(tmp_path, pydoc_data_dir):
    """DeepSeek-V3's context extension as a new phase: train.init_from an export with a longer data.seq_len and
    model.max_seq_len, under YaRN. Step 1's loss is the exported weights' loss with the new config's positions (its
    RoPE tables computed afresh, not the export's), and the start says which model keys changed."""
    import torch

    from deepseek_pt.config import load_config
    from deepseek_pt.data import PretrainDataset, TrainLoader
    from deepseek_pt.export import save_export
    from deepseek_pt.model import Transformer

    data = pydoc_data_dir.shards_dir
    cfg = load_config(SMOKE, [f"data.path={data}"])
    torch.manual_seed(123)
    model = Transformer(cfg.model)
    with torch.no_grad():  # larger than init: outputs that depend on positions enough to tell YaRN's apart
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15)
    save_export(model, cfg, tmp_path / "export")
    longer = ["data.seq_len=128", "model.max_seq_len=512", "model.attention.rope.scaling=yarn",
              "model.attention.rope.factor=4", "model.attention.rope.original_max_position_embeddings=128"]
    run = tmp_path / "run"
    proc = train(2, run, data, "train.max_steps=1", "train.warmup_steps=1", f"train.init_from={tmp_path / 'export'}",
                 *longer)
    assert (f"init_from: the weights of {tmp_path / 'export'} under this config's model.max_seq_len 512 (256 in the "
            "export), model.attention.rope.scaling 'yarn' ('none' in the export), model.attention.rope.factor 4.0 (1.0 "
            "in the export), model.attention.rope.original_max_position_embeddings 128 (4096 in the export)"
            ) in proc.stdout, proc.stdout[-3000:]
    extended = Transformer(load_config(SMOKE, [f"data.path={data}", *longer]).model)
    extended.load_state_dict(model.state_dict())
    ds = PretrainDataset(data, "train", 128)
    batches = [next(TrainLoader(ds, cfg.train.micro_batch_size, dp_rank=r, dp_world=2, seed=cfg.data.seed))
               for r in range(2)]
    with torch.no_grad():
        expected = sum(extended(*b).item() for b in batches) / 2
        unextended = sum(model(*b).item() for b in batches) / 2  # the export's own positions, seq 128 < 256
    assert metrics(run)[0]["loss"] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - unextended) > 1e-3  # YaRN moved the positions enough for the check to tell them apart


@pytest.mark.slow
def test_a_run_keeps_its_tokenizer_for_the_tools_run_from_any_directory(tmp_path, pydoc_data_dir, monkeypatch, capsys):
    """A run trained with a relative data.path and exported (or sampled, evaluated) from another directory lost its
    tokenizer: the export had none (a note said so), generate needed --tokenizer and took any. The run directory now
    keeps the tokenizer and its identity from the start; runs started before that behave as they did."""
    from deepseek_pt.engine.export import export_checkpoint
    from deepseek_pt.evaluate import main as evaluate_main
    from deepseek_pt.export import read_export_info
    from deepseek_pt.generate import main as generate_main
    from deepseek_pt.engine.distributed import RENDEZVOUS_ENV

    start = tmp_path / "start"
    shutil.copytree(pydoc_data_dir.shards_dir, start / "data")
    env = {k: v for k, v in job_env().items() if k not in RENDEZVOUS_ENV}  # one process, no launcher
    proc = start_job([sys.executable, "-m", "deepseek_pt.train", "--config", SMOKE, "data.path=data", "run.dir=run",
                      "parallel.expert_parallel_size=1", "train.max_steps=2", "train.warmup_steps=2",
                      "train.eval_every=0"], env, cwd=start)
    out, _ = finish_job(proc, 300)
    assert proc.returncode == 0, out[-3000:]
    run, sha = start / "run", hashlib.sha256(pydoc_data_dir.tokenizer_model.read_bytes()).hexdigest()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    export = export_checkpoint(run, tmp_path / "export")
    info = read_export_info(export)
    assert (export / "tokenizer.model").read_bytes() == pydoc_data_dir.tokenizer_model.read_bytes()
    assert (info["tokenizer_sha256"], info["doc_boundary"]) == (sha, "eos")
    shutil.rmtree(start / "data")  # the data may be gone too: the run has what the tools need
    prompt = ["--prompt", "The for statement", "--max-new-tokens", "3", "--temperature", "0"]
    assert generate_main(["--checkpoint", str(run)] + prompt) == 0
    assert capsys.readouterr().out.startswith("The for statement")
    other = ROOT / "tests" / "assets" / "smoke_shards"  # another tokenizer of 1024 pieces
    assert generate_main(["--checkpoint", str(run), "--tokenizer", str(other / "tokenizer.model")] + prompt) == 2
    assert f"is not the tokenizer {run} was trained with (sha256 {sha[:12]}...)" in capsys.readouterr().err
    assert evaluate_main(["--checkpoint", str(run), "--data", str(other), "--max-sequences", "1"]) == 2
    assert "another tokenizer than the one" in capsys.readouterr().err

    shutil.copy(other / "tokenizer.model", run / "tokenizer.model")  # the run's copy replaced: named, not used
    assert generate_main(["--checkpoint", str(run)] + prompt) == 2
    assert capsys.readouterr().err.startswith(f"error: {run / 'tokenizer.model'}: sha256 ")

    # A run started before runs kept their tokenizer: the data's, where data.path leads from here
    (run / "data.json").unlink()
    (run / "tokenizer.model").unlink()
    shutil.copytree(pydoc_data_dir.shards_dir, start / "data")
    assert not (export_checkpoint(run, tmp_path / "old") / "tokenizer.model").exists()
    assert ("(data.path data is relative to the directory the run was started from, and "
            f"{run} keeps no tokenizer of its own: run this from that directory)") in capsys.readouterr().err
    monkeypatch.chdir(start)
    assert read_export_info(export_checkpoint(run, tmp_path / "old2"))["tokenizer_sha256"] == sha
