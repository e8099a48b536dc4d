"""Our MoE block and its DeepSpeed AutoEP conversion compute the same function (2 CPU processes)."""
from pathlib import Path

import pytest
from jobs import ROOT, deepspeed_cmd, free_port, last_json, run_job


@pytest.mark.slow
def test_block_forward_equals_autoep_converted_forward():
    port = free_port()
    proc = run_job(deepspeed_cmd(2, ROOT / "tests" / "dist" / "autoep_parity.py", port=port), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # init_distributed keeps DeepSpeed's CPU shared-memory all-reduce off: it left 69 MB per rank in /dev/shm.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    result = last_json(proc.stdout)
    assert result["converted"] == 3  # 2 MoE layers + the MTP block's
    assert result["shared_kept"]  # AutoEP drops shared experts silently unless told about them
    assert result["max_abs_diff"] < 1e-5
