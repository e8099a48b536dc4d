"""ZeRO-3's optimizer step: the gradient clip, the skip of a non-finite step and AdamW in one pass over each
sub-group, whose own code waits on the GPU once, for the gradient norm: to say whether the step was applied.

DeepSpeed's DeepSpeedZeroOptimizer_Stage3.step, per step, over bench-2b's 2.0B parameters on an H200: a norm
kernel per gradient tensor after copying each one to fp32, a host sync per sub-group (a scalar built on the host
and copied in) and one more to test the norm, a copy of the sub-group's gradients into a new flat buffer and
another into fp32, a separate pass multiplying them by the clip factor, then AdamW, then a copy of the updated fp32
weights into the bf16 partition: ~45-50 ms of GPU time and 15 host syncs, as long as a whole micro-step
(docs/benchmarks.md). Ours reads each sub-group's gradients in place (they are one contiguous slice of ZeRO-3's
flat gradient buffer) and takes their norm in one fp32-accumulating pass over the bf16 values. Then one
elementwise pass per sub-group (`adamw_update`, compiled into one kernel on a GPU) reads the bf16 gradients, the
fp32 weights and Adam's moments, and writes the weights, the moments and the bf16 partition: the clip factor
divides the gradients, and a non-finite norm leaves weights, moments and step count as they were, as torch's fused
AdamW does with its `grad_scale` and `found_inf`. The moments and step count are the inner torch AdamW's own
state, so checkpoints keep their layout. Everything else (gathering, releasing sub-groups, DeepSpeed's own
bookkeeping) is DeepSpeed's code, called as its step calls it; `_post_step`, which gathers the updated persistent
parameters, may still wait on the GPU itself.

Where every parameter is persistent and partitioned over one rank (one GPU), the step leaves them gathered
(`keep_params_gathered`, `parallel.zero_keep_params_gathered`). There each parameter is a view of its partition
(DeepSpeed's gather over one rank copies nothing), which the update writes. DeepSpeed's step still releases every
parameter before the update and gathers them again after it: a Python walk over the parameters that held the GPU
idle ~2-3 ms per step on bench-2b's H200 host. A checkpoint's save or load still releases and
re-gathers them (DeepSpeed's checkpoint events); the next step checks that each is its partition's view again.

The host's wait for the norm comes after the update is queued, and waits for the norm's copy only: the host goes
on to the next micro-step while the GPU updates (2B parameters' AdamW, ~12 ms on bench-2b's H200). DeepSpeed's
backward epilogue, the step's predecessor, waited on the host for its reduction stream; here the GPU waits for it
instead (`_epilogue_without_host_wait`). At one micro-step per step those two waits left the GPU idle while the
host prepared the step and then the next micro-step (docs/benchmarks.md).

It covers what our engine builds: ZeRO-3 without offload, swapping, Muon, fp16 loss scaling, torch autocast's
scaler or tensor parallelism, on torch's AdamW without amsgrad or maximize. Anything else is refused at install
with the reason.
"""
from __future__ import annotations

import functools
import math
import types

import torch
import torch.distributed as dist


def unsupported_reason(zero) -> str | None:
    """Why `zero` (a DeepSpeed ZeRO optimizer) cannot take our step, or None when it can."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    if not isinstance(zero, DeepSpeedZeroOptimizer_Stage3):
        return f"the optimizer is {type(zero).__name__}, not ZeRO stage 3's"
    for attr, what in (("offload_optimizer", "optimizer offload"), ("swap_optimizer", "optimizer swapping"),
                       ("use_muon", "Muon"), ("zenflow", "ZenFlow"), ("torch_autocast_gradscaler", "torch autocast")):
        if getattr(zero, attr, None):
            return f"{what} is on"
    if zero.dtype == torch.float16:
        return "fp16 needs DeepSpeed's loss-scale overflow check"
    if zero.model_parallel_group is not None:
        return "tensor parallelism adds norms over its own group"
    inner = zero.optimizer
    if type(inner) is not torch.optim.AdamW:
        return f"the inner optimizer is {type(inner).__name__}, not torch's AdamW"
    for flag in ("amsgrad", "maximize"):
        if any(g.get(flag) for g in inner.param_groups):
            return f"AdamW's {flag} is on"
    return None


def install(zero) -> None:
    """Replace `zero.step` (a DeepSpeedZeroOptimizer_Stage3) with ours; raises if it cannot take it."""
    why = unsupported_reason(zero)
    if why is not None:
        raise RuntimeError(f"parallel.zero_fused_step: ZeRO-3's fused step cannot run here: {why}; "
                           "set parallel.zero_fused_step=false for DeepSpeed's step")
    zero._norm_process_groups = [_norm_process_groups(zero, params) for params in zero.fp16_groups]
    zero._kept_gathered = None
    zero.step = types.MethodType(_fused_step, zero)
    if isinstance(zero.reduce_and_partition_stream, torch.cuda.Stream):
        zero.independent_gradient_partition_epilogue = types.MethodType(_epilogue_without_host_wait, zero)


def keep_params_gathered(zero) -> int:
    """Have the step leave every parameter of the model gathered, as a view of its partition, where each is
    persistent and partitioned over one rank (the module docstring); returns how many parameters that is, 0 where
    some parameter does not qualify (then nothing changes). Call after install."""
    params = list(zero.module.parameters())
    if not params or not all(_one_rank_persistent(zero, p) for p in params):
        return 0
    zero._kept_gathered = params
    _as_partition_views(params)
    return len(params)


def _one_rank_persistent(zero, param) -> bool:
    partition = getattr(param, "ds_tensor", None)
    return (getattr(param, "ds_persist", False) and partition is not None
            and getattr(param, "ds_secondary_tensor", None) is None
            and partition.dtype == param.dtype and partition.device == param.device
            and partition.numel() >= param.ds_numel
            and zero._get_param_partition_world_size(param) == 1)


def _as_partition_views(params) -> None:
    """Make each parameter a view of its partition where it is not one (a copy, or released)."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    for param in params:
        if param.ds_status == ZeroParamStatus.INFLIGHT:  # only hooks fetch, and they never fetch persistent ones
            raise RuntimeError(f"ZeRO-3 parameter {param.ds_id} is being gathered at the optimizer step")
        # Checked without building the view: every step runs this over every parameter, while the GPU waits.
        data = param.data
        if data.data_ptr() != param.ds_tensor.data_ptr() or data.shape != param.ds_shape:
            if data.is_cuda:  # as DeepSpeed's free_param: queued kernels may still read a copy
                data.record_stream(torch.cuda.current_stream())
            param.data = param.ds_tensor.data.narrow(0, 0, param.ds_numel).view(param.ds_shape)
        param.ds_status = ZeroParamStatus.AVAILABLE


def installed(zero) -> bool:
    return getattr(zero.step, "__func__", None) is _fused_step


def _norm_process_groups(zero, params) -> tuple:
    """The process groups a sub-group's squared gradient norm sums over, as DeepSpeed's get_grad_norm_direct
    sums it: the group its parameters are partitioned over, then AutoEP's expert-parallel group for experts."""
    from deepspeed.comm import pg_utils
    zero._assert_same_partition_group(params)
    found = [zero._get_param_partition_group(params[0])]
    expert_group = zero._autoep_expert_parallel_group(params)
    if pg_utils.is_parallel(expert_group):
        found.append(expert_group)
    return tuple(g for g in found if g is not None and dist.get_world_size(group=g) > 1)


def _flat_gradients(zero, sub_group: int) -> torch.Tensor:
    """The sub-group's gradient partitions as one flat tensor: a slice of ZeRO-3's flat gradient buffer when they
    lie back to back in it (they do: the buffer is laid out parameter by parameter, sub-group by sub-group), a
    copy otherwise (a frozen parameter's zeros, say)."""
    grads, buffer = zero.averaged_gradients[sub_group], zero.grad_partitions_flat_buffer
    start = grads[0].storage_offset()
    offset = start
    for g in grads:
        if g.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr() or g.storage_offset() != offset \
                or not g.is_contiguous():
            return zero.flatten(grads)
        offset += g.numel()
    return buffer.narrow(0, start - buffer.storage_offset(), offset - start)


def _fused_step(self, closure=None):
    """DeepSpeedZeroOptimizer_Stage3.step for the configurations unsupported_reason admits (bound as its method)."""
    self._pre_step()
    if self._kept_gathered:  # the update writes them through their partitions
        _as_partition_views(self._kept_gathered)
    else:
        self._partition_all_parameters()
    self.overflow = False

    # Squared norms summed locally per set of process groups, then reduced once per set: the same sum
    # get_grad_norm_direct reduces sub-group by sub-group.
    flats, squares = [], {}
    for i in range(len(self.fp16_groups)):
        flat = _flat_gradients(self, i)
        if flat.numel() != self.fp32_partitioned_groups_flat[i].numel():
            raise RuntimeError(f"ZeRO-3 sub-group {i}: {flat.numel()} gradient elements for "
                               f"{self.fp32_partitioned_groups_flat[i].numel()} parameters")
        flats.append(flat)
        square = torch.linalg.vector_norm(flat, 2, dtype=torch.float32).square()
        key = self._norm_process_groups[i]
        squares[key] = squares[key] + square if key in squares else square
    total = torch.zeros((), dtype=torch.float32, device=self.device)
    for process_groups, square in squares.items():
        for group in process_groups:
            dist.all_reduce(square, op=dist.ReduceOp.SUM, group=group)
        total = total + square
    norm = total.sqrt() / self.loss_scale
    not_finite = ~torch.isfinite(norm)
    overflow = _HostFlag(not_finite)  # on its way to the host while the update below is queued
    self._global_grad_norm = torch.where(not_finite, torch.full_like(norm, math.inf), norm)

    scale = torch.full_like(norm, float(self.loss_scale))
    if self.clip_grad > 0.0:  # as unscale_and_clip_grads: divide by max(1, (norm + 1e-6) / clip)
        scale = scale * torch.clamp((norm + 1e-6) / self.clip_grad, min=1.0)
    grad_scale = torch.where(not_finite, torch.ones_like(scale), scale)
    found_inf = not_finite.float()

    self.zero_grad(set_to_none=True)  # the gradients live in the flat buffer now
    for i, flat in enumerate(flats):
        self.averaged_gradients[i] = None
        weights = self.fp32_partitioned_groups_flat[i]
        group = self.optimizer.param_groups[self.sub_group_to_group_id[i]]
        state = self.optimizer.state[weights]
        if not state:  # as torch's AdamW creates it on its first step (fused: the step count on the device)
            state.update(step=torch.zeros((), dtype=torch.float32, device=weights.device),
                         exp_avg=torch.zeros_like(weights), exp_avg_sq=torch.zeros_like(weights))
        lr = torch.full((), group["lr"], dtype=torch.float32, device=weights.device)  # a tensor: no recompiles
        update = _compiled_adamw_update() if weights.is_cuda else adamw_update
        update(weights, state["exp_avg"], state["exp_avg_sq"], flat, self.fp16_partitioned_groups_flat[i],
               state["step"], grad_scale, found_inf, lr, *group["betas"], group["eps"], group["weight_decay"])
        self._unflatten_partitioned_parameters(i)
        self._release_sub_group(i, set())
    self._post_step(set())  # gathers the persistent parameters released above

    # The engine reads `overflow` on the host to skip the LR step and count the skipped step: our one wait on the
    # GPU, for the norm only. The update, queued already, runs while the host goes on to the next micro-step.
    # Then DeepSpeed's loss-scale bookkeeping, and its clean-up after a skipped step.
    self.overflow = overflow.read()
    self._loss_scale_update_and_overflow_cleanup()


class _HostFlag:
    """A boolean the GPU computes, copied to pinned host memory behind the kernels that compute it. read() waits for
    that copy only, not for the kernels queued after it (bool() on the GPU tensor would wait for all of them)."""

    def __init__(self, flag: torch.Tensor):
        self._ready = None
        if flag.is_cuda:
            self._flag = torch.empty((), dtype=flag.dtype, pin_memory=True).copy_(flag, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._flag = flag

    def read(self) -> bool:
        if self._ready is not None:
            self._ready.synchronize()
        return bool(self._flag)


def _epilogue_without_host_wait(self):
    """DeepSpeed's backward epilogue (the last gradient buckets reduced into their partitions), bound as its method
    where a CUDA stream carries the reduction: its host wait on that stream becomes the current stream's wait on
    it. The step's kernels, queued on the current stream, still start after the reduction; the host no longer
    idles the GPU while it prepares them (the step's start, ~1 ms per step on bench-2b's H200 at one micro-step
    per step). Tensors the host drops meanwhile are safe: each returns to its own stream's pool, and both pools'
    next users run after this wait."""
    stream = self.reduce_and_partition_stream
    stream.synchronize = functools.partial(torch.cuda.current_stream(stream.device).wait_stream, stream)
    try:
        type(self).independent_gradient_partition_epilogue(self)
    finally:
        del stream.synchronize


@torch.no_grad()
def adamw_update(weights, exp_avg, exp_avg_sq, grad, weights_copy, step, grad_scale, found_inf, lr,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW step over flat tensors, in place, as torch's fused AdamW computes it: `grad` (any float dtype) is
    divided by `grad_scale`; where `found_inf` is 1 nothing changes, the step count included. `weights_copy`
    (ZeRO-3's bf16 partition) receives the updated weights. step, grad_scale, found_inf and lr are 0-dim tensors on
    the weights' device."""
    skip = found_inf > 0
    new_step = step + 1 - found_inf
    g = grad.float() / grad_scale
    m = exp_avg * beta1 + g * (1 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1 - beta2)
    denom = v.sqrt() / (1 - beta2 ** new_step).sqrt() + eps
    updated = weights * (1 - lr * weight_decay) - (lr / (1 - beta1 ** new_step)) * m / denom
    updated = torch.where(skip, weights, updated)
    exp_avg.copy_(torch.where(skip, exp_avg, m))
    exp_avg_sq.copy_(torch.where(skip, exp_avg_sq, v))
    weights_copy.copy_(updated)
    weights.copy_(updated)
    step.copy_(new_step)


@functools.cache
def _compiled_adamw_update():
    """adamw_update compiled into one kernel per sub-group size, for GPUs: eager it would make a dozen passes over
    the sub-group. CPUs run it eager, where compiling would cost more than it saves."""
    return torch.compile(adamw_update, fullgraph=True, dynamic=False)
