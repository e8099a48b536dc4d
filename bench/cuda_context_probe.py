"""Whether a torch call creates device 0's CUDA primary context, asked of the driver (cuDevicePrimaryCtxGetState)
before and after it, in a fresh process per call: preflight and fp8's capability check run before init_distributed
sets each rank's device, and a context made there would sit on GPU 0 for every rank of a multi-GPU host.

    for c in count props capability mem_get_info empty; do python3 bench/cuda_context_probe.py $c; done
"""
import ctypes
import sys

import torch

cuda = ctypes.CDLL("libcuda.so.1")
assert cuda.cuInit(0) == 0


def active(dev: int) -> int:
    flags, on = ctypes.c_uint(), ctypes.c_int()
    assert cuda.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(on)) == 0
    return on.value


call = sys.argv[1]
print(call, "before:", active(0), end=" ")
{"props": lambda: torch.cuda.get_device_properties(0), "capability": lambda: torch.cuda.get_device_capability(),
 "count": lambda: torch.cuda.device_count(), "mem_get_info": lambda: torch.cuda.mem_get_info(0),
 "empty": lambda: torch.empty(1, device="cuda")}[call]()
print("after:", active(0), "initialized:", torch.cuda.is_initialized())
