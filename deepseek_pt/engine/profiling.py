"""train.profile_start_step: a torch.profiler trace of chosen optimizer steps of a training run (Megatron's
--profile-step-start/end, torchtitan's profiling section). Every rank writes its own, under
run.dir/profile/step_A-B/: rank_R.json.gz (Perfetto or chrome://tracing read it gzipped) and rank_R.txt (its ops
by time: a first look without a trace viewer, and all a node without a browser needs). One step before the first
traced one runs under the profiler untraced, so that the profiler's own start-up stays out of the trace."""
from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from ..fileio import atomic_path, atomic_write_text


class StepProfiler:
    def __init__(self, first: int, steps: int, run_dir: Path, rank: int, device: torch.device):
        self.first, self.last = first, first + steps - 1
        self.out = Path(run_dir) / "profile" / f"step_{first}-{self.last}"
        self.rank, self.cuda = rank, device.type == "cuda"
        self.prof: profile | None = None
        self.traced = 0  # steps recorded so far
        self.written: Path | None = None

    def before_step(self, step: int) -> None:
        """Step `step` (1-based) is about to run: start the profiler one step before the first traced one (or at it,
        where that step ran before this process: a resume)."""
        if self.prof is not None or not (self.first - 1 <= step <= self.first) or self.traced:
            return
        activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * self.cuda
        window = schedule(wait=0, warmup=self.first - step, active=self.last - self.first + 1, repeat=1)
        self.prof = profile(activities=activities, schedule=window, on_trace_ready=self._write)
        self.prof.start()

    def after_step(self, step: int) -> None:
        if self.prof is None:
            return
        if step >= self.first:
            self.traced += 1
        self.prof.step()  # after the last traced step: the trace is written (_write)
        if step == self.last:
            self.prof.stop()
            self.prof = None

    def close(self) -> str | None:
        """At the end of training: what rank 0 says of the trace (None where none was due in this process's steps)."""
        if self.prof is not None:  # stopped inside the window (a signal, a time limit, exit_at_step)
            self.prof.stop()
            self.prof = None
            return (f"profile: the run stopped after {self.traced} of the {self.last - self.first + 1} steps from "
                    f"train.profile_start_step {self.first}: no trace written")
        if self.written is None:
            return None
        return (f"profile: steps {self.first}-{self.last} traced by every rank in {self.out}: rank_R.json.gz (open it in "
                "https://ui.perfetto.dev or chrome://tracing) and rank_R.txt (ops by time)")

    def _write(self, prof: profile) -> None:
        if self.traced < self.last - self.first + 1:  # a window cut short: no trace under the full window's name
            return
        self.out.mkdir(parents=True, exist_ok=True)
        final = self.out / f"rank_{self.rank}.json.gz"
        with atomic_path(final) as tmp:  # ends in .gz too: torch gzips by the name
            prof.export_chrome_trace(str(tmp))
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=50, max_name_column_width=80)
        atomic_write_text(self.out / f"rank_{self.rank}.txt",
                          f"steps {self.first}-{self.last}, rank {self.rank}, ops by {sort}\n{table}\n")
        self.written = final
