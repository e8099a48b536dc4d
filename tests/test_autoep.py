"""Our MoE block and its DeepSpeed AutoEP conversion compute the same function, forward and backward: 2 CPU
processes (AutoEP's eager combine), and one process (on a GPU its fused Triton combine, which training uses there);
each also against the fused-dispatch layer (engine/moe_dispatch.py), which applies at expert parallel 1."""
import sys
from pathlib import Path

import pytest
import torch
from jobs import ROOT, free_port, gpu_host_env, job_env, last_json, ranks_cmd, run_job

PARITY = ROOT / "tests" / "dist" / "autoep_parity.py"


def check_parity(result: dict, combine_impl: str, fused_dispatch: int) -> None:
    assert result["converted"] == 3  # 2 MoE layers + the MTP block's
    assert result["shared_kept"]  # AutoEP drops shared experts silently unless told about them
    assert result["combine_impl"] == [combine_impl]
    assert result["max_abs_diff"] < 1e-5
    assert result["grad_max_abs"] > 1e-3  # the probe reaches the embedding through every block
    assert result["grad_max_abs_diff"] < 1e-5 * max(1.0, result["grad_max_abs"])
    # parallel.fused_moe_dispatch's layer (expert parallel 1 only) against AutoEP's, the same weights
    assert result["fused_dispatch"] == fused_dispatch
    assert result["fused_max_abs_diff"] == 0.0  # the same rows through the experts, the same sums in the same order
    assert result["fused_grad_max_abs_diff"] < 1e-6 * max(1.0, result["grad_max_abs"])  # top-k sums reordered
    # DeepSeek-V3's sequence-wise balance loss on AutoEP's layers (engine/balance.py) as our block computes it
    assert result["balance_loss_layers"] == 3 and result["balance_loss"] > 0
    assert result["balance_loss_max_abs_diff"] < 1e-6
    assert result["router_grad_max_abs"] > 1e-6  # the loss's gradient reaches every router
    assert result["router_grad_max_abs_diff"] < 1e-5 * result["router_grad_max_abs"]


@pytest.mark.slow
def test_block_equals_autoep_converted_block(tmp_path):
    """2 processes, expert parallel 2, on CPU even on a GPU host (a one-GPU host has no device for rank 1), and on
    any host as on a GPU host: AutoEP's experts, DeepSpeed's own, take its Triton SwiGLU wherever Triton sees a GPU."""
    port = free_port()
    proc = run_job(ranks_cmd(2, PARITY, port=port), gpu_host_env(tmp_path), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # init_distributed keeps DeepSpeed's CPU shared-memory all-reduce off: it left 69 MB per rank in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    check_parity(last_json(proc.stdout), "weighted_sum", fused_dispatch=0)  # expert parallel 2: AutoEP's forward


def test_block_equals_autoep_converted_block_on_one_process():
    """One process, expert parallel 1: on a GPU AutoEP's fused Triton combine (training's there), and on either
    device the fused-dispatch layer."""
    env = job_env(gpu=True, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=str(free_port()))
    proc = run_job([sys.executable, PARITY], env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = last_json(proc.stdout)
    assert result["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    check_parity(result, "fused_weighted_sum" if result["device"] == "cuda" else "weighted_sum", fused_dispatch=3)
    if result["device"] == "cpu":  # the same torch ops in the same order
        assert result["fused_grad_max_abs_diff"] == 0.0
