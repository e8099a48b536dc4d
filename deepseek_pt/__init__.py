"""deepseek_pt: DeepSeek-V3-style pretraining (MLA + MoE) on DeepSpeed.

Under DS_ACCELERATOR=cpu (DeepSpeed's switch to its CPU accelerator) a process that imports the package no longer
sees the GPUs that DeepSpeed's launcher hands every rank all the same (CUDA_VISIBLE_DEVICES=0..N-1). DeepSpeed
decides whether its Triton kernels run (AutoEP's SwiGLU among them) when it first imports them, by whether Triton
sees a GPU, and then runs them on CPU tensors too. The package's import comes before that and before any CUDA
call; engine/accelerator.py's on_gpu() gives the engine's answer."""
import os

if os.environ.get("DS_ACCELERATOR") == "cpu":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
