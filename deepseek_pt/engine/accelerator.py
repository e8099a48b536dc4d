"""Whether this process trains on its GPU: one answer for the engine. CUDA must be visible, and DeepSpeed not told
to use its CPU accelerator: DS_ACCELERATOR=cpu is DeepSpeed's switch for that, and its launcher still hands each rank
CUDA_VISIBLE_DEVICES (0..N-1 from --num_gpus). By torch alone the ranks would take GPUs that DeepSpeed does not
use, rank 1 of 2 on a one-GPU host one that is not there ("invalid device ordinal"). Importing the package hides
them from such a process too (deepseek_pt/__init__.py), for DeepSpeed's sake; this answer holds either way."""
from __future__ import annotations

import os

import torch


def on_gpu() -> bool:
    return os.environ.get("DS_ACCELERATOR") != "cpu" and torch.cuda.is_available()


def no_gpu_here() -> str:
    """Why on_gpu() is False, for a refusal that needs a GPU."""
    return "DS_ACCELERATOR=cpu is set" if os.environ.get("DS_ACCELERATOR") == "cpu" else "no GPU is visible here"
