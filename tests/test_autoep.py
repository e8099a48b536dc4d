"""Our MoE block and its DeepSpeed AutoEP conversion compute the same function, forward and backward: 2 CPU
processes (AutoEP's eager combine), and on a GPU one process (its fused Triton combine, which training uses there)."""
import sys
from pathlib import Path

import pytest
import torch
from jobs import ROOT, deepspeed_cmd, free_port, job_env, last_json, run_job

PARITY = ROOT / "tests" / "dist" / "autoep_parity.py"


def check_parity(result: dict, combine_impl: str) -> None:
    assert result["converted"] == 3  # 2 MoE layers + the MTP block's
    assert result["shared_kept"]  # AutoEP drops shared experts silently unless told about them
    assert result["combine_impl"] == [combine_impl]
    assert result["max_abs_diff"] < 1e-5
    assert result["grad_max_abs"] > 1e-3  # the probe reaches the embedding through every block
    assert result["grad_max_abs_diff"] < 1e-5 * max(1.0, result["grad_max_abs"])


@pytest.mark.slow
def test_block_equals_autoep_converted_block():
    port = free_port()
    proc = run_job(deepspeed_cmd(2, PARITY, port=port), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # init_distributed keeps DeepSpeed's CPU shared-memory all-reduce off: it left 69 MB per rank in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    check_parity(last_json(proc.stdout), "weighted_sum")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AutoEP's fused combine is a CUDA kernel")
def test_block_equals_autoep_converted_block_with_fused_combine_on_gpu():
    env = job_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = run_job([sys.executable, PARITY], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["device"] == "cuda"
    check_parity(result, "fused_weighted_sum")
