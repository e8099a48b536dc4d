"""tests/ranks.py, the suite's stand-in for `deepspeed --num_gpus N`: what the ranks see, and launch.py's rules."""
from __future__ import annotations

import json
import signal
import time

from jobs import finish_job, job_env, ranks_cmd, run_job, start_job, wait_until

SHOW = ("import json, os, pathlib, sys\n"  # each rank to a file of its own: their prints share one pipe
        "keys = ['RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_SIZE', 'CROSS_RANK', 'CROSS_SIZE', 'MASTER_ADDR',\n"
        "        'MASTER_PORT', 'CUDA_VISIBLE_DEVICES']\n"
        "seen = {'argv': sys.argv[1:], **{k: os.environ[k] for k in keys}}\n"
        "pathlib.Path(__file__).with_name(f'rank{os.environ[\"RANK\"]}.json').write_text(json.dumps(seen))\n")


def test_ranks_see_deepspeeds_environment_and_arguments(tmp_path):
    script = tmp_path / "show.py"
    script.write_text(SHOW)
    proc = run_job(ranks_cmd(2, script, "--config", "x.yaml", port=23456), job_env(), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert seen == [{"argv": [f"--local_rank={r}", "--config", "x.yaml"], "RANK": str(r), "LOCAL_RANK": str(r),
                     "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CROSS_RANK": "0", "CROSS_SIZE": "1",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "23456", "CUDA_VISIBLE_DEVICES": "0,1"}
                    for r in range(2)]


def test_a_failed_rank_stops_the_others_and_its_status_is_the_jobs(tmp_path):
    script = tmp_path / "fail.py"
    script.write_text("import os, sys, time\nif os.environ['RANK'] == '1':\n    sys.exit(3)\ntime.sleep(600)\n")
    started = time.monotonic()
    proc = run_job(ranks_cmd(2, script), job_env(), timeout=60)
    assert proc.returncode == 3 and time.monotonic() - started < 30, proc.stdout + proc.stderr


def test_sigterm_stops_the_ranks_and_fails_the_job(tmp_path):
    script = tmp_path / "wait.py"
    marks = tmp_path / "marks"
    marks.mkdir()
    script.write_text("import os, pathlib, sys, time\n"
                      f"pathlib.Path({str(marks)!r}, os.environ['RANK']).touch()\ntime.sleep(600)\n")
    proc = start_job(ranks_cmd(2, script), job_env())
    wait_until(proc, lambda: len(list(marks.iterdir())) == 2, 60, "both ranks' start")
    proc.send_signal(signal.SIGTERM)  # to ranks.py alone
    out, _ = finish_job(proc, 60)  # the ranks hold its output pipe: this returns once they are gone
    assert proc.returncode == 1, out
