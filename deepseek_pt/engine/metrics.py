"""Per-step metrics: metrics.jsonl (every step, rank 0), a console progress bar, optional wandb."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import sys
from pathlib import Path

import torch

from ..fileio import atomic_write_text, first_line, free_space
from .accelerator import on_gpu

# Dense bf16 peak of the GPU, by name fragment: the MFU denominator (FP8 runs are measured against it too).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_flops(configured_tflops: float | None) -> float | None:
    if configured_tflops:
        return configured_tflops * 1e12
    if on_gpu():
        name = torch.cuda.get_device_name()
        for key, tflops in PEAK_BF16_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None  # CPU or unknown GPU: no honest peak to divide by


def peak_memory_gib() -> float:
    if on_gpu():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class WandbError(RuntimeError):
    """Weights & Biases refused to start the run (run.wandb); the message says why."""


class MetricsLogger:
    """Rank 0 writes; other ranks hold a no-op logger so the loop needs no rank checks."""

    def __init__(self, run_dir: Path, cfg, enabled: bool, start_step: int, wandb_id: str | None):
        self.enabled = enabled
        self.bar = None
        self.wandb = None
        self.wandb_id = wandb_id
        self.failure: str | None = None
        """Why metrics.jsonl could not be written (a full disk): the loop stops on it."""
        self.console_keys = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "expert_load", "eval_loss")
        if cfg.train.batch_rampup_tokens:  # the batch each step trained on, while it grows
            self.console_keys = ("batch_sequences", *self.console_keys)
        if not enabled:
            return
        # Resumed, or started over from step 0 (a run killed before its first checkpoint, one that writes none):
        # the steps this run trains again must not appear twice.
        _keep_steps_up_to(run_dir / "metrics.jsonl", start_step)
        self.file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if sys.stderr.isatty() or os.environ.get("DEEPSEEK_PT_PROGRESS") == "1":
            from tqdm import tqdm
            self.bar = tqdm(total=cfg.train.max_steps, initial=start_step, dynamic_ncols=True, desc="train")
        if cfg.run.wandb != "disabled":
            import wandb
            try:
                self.wandb = wandb.init(project=cfg.run.wandb_project, name=cfg.run.name or run_dir.name,
                                        dir=str(run_dir), mode=cfg.run.wandb, id=wandb_id, resume="allow",
                                        config=cfg.to_dict())
            except wandb.errors.Error as e:  # no login, no network: wandb's traceback on rank 0 before
                why = first_line(str(e), type(e).__name__)
                raise WandbError(f"run.wandb: {cfg.run.wandb}: W&B did not start ({why}); log in (wandb login, or "
                                 "WANDB_API_KEY), or set run.wandb=offline") from None
            self.wandb_id = self.wandb.id

    def log(self, record: dict, console_every: int = 1) -> None:
        if not self.enabled:
            return
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:
            where = Path(self.file.name)
            self.failure = f"{where}: {e.strerror or e} ({free_space(where.parent)})"
            return
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step" and v is not None}, step=record["step"])
        shown = {k: record.get(k) for k in self.console_keys}
        shown.update((k, v) for k, v in record.items() if k.startswith("eval_loss/"))  # a blend's, per source
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items() if v is not None)
        if self.bar is not None:
            self.bar.n = record["step"]
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
        elif record["step"] % console_every == 0 or "eval_loss" in record:
            print(f"step {record['step']} {text}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
        with contextlib.suppress(OSError):  # the line a full disk refused is still buffered
            self.file.close()


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the lines of steps after `step` (the checkpoint a run resumes, 0 for a run starting over) and any torn
    line: a run that stopped without a checkpoint at its last step (a crash, a kill) logged steps it now runs again,
    and each step must appear once, with what the run now training did."""
    if not path.exists():
        return
    # A crash can leave other bytes than a cut line (a block of garbage that is not UTF-8): such a line is torn too,
    # not a UnicodeDecodeError traceback on rank 0 while the other ranks wait in their first collective
    lines = path.read_text(errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash
            pass
    if len(kept) < len(lines):
        atomic_write_text(path, "".join(kept))
        why = "the steps this run resumes before" if step else "this run starts over from step 0"
        print(f"metrics: {path}: dropped {len(lines) - len(kept)} lines past step {step} ({why}) or torn", flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
