"""ZeRO-3's per-module hooks, removed when every parameter is persistent: then they have nothing to do.

DeepSpeed hangs four hooks on each module it fetches as a unit (each leaf block under parallel.zero_leaf_blocks,
plus the embedding, the final norm, the head and the root): gather its parameters before its forward and its
backward, release them after. A persistent parameter (`ds_persist`: no larger than
parallel.zero_persistence_threshold) is never released, so when all of them are, as on one GPU with the bench
configs' threshold, the hooks gather and release nothing. They still keep books: module stacks, trace records,
parameter-set walks, and autograd Functions wrapped around each block's inputs and outputs. On this project's
2-core CPU (the smoke model, one rank) that was 22 calls per micro-step at 95-128 us each, ~2.6 ms of host time
per micro-step; on an H200's host (bench-2b) 30 calls at 110-218 us, 4.9 ms (`bench/zero3_hook_time.py`,
docs/benchmarks.md), paid while the GPU may be waiting for its next kernel.

Nothing else depends on them: gradients reach ZeRO-3 through per-parameter hooks, and the optimizer step gathers
the updated persistent parameters itself (stage 3's `_post_step`), as saving and loading a checkpoint do after
partitioning every parameter.
"""
from __future__ import annotations


def all_persistent(module) -> bool:
    """Whether every ZeRO-3 parameter of `module` stays gathered between steps."""
    return all(p.ds_persist for p in module.parameters() if hasattr(p, "ds_id"))


def remove_if_idle(engine) -> bool:
    """Remove DeepSpeed's per-module fetch/release hooks from a ZeRO-3 engine whose parameters are all persistent;
    returns whether it did."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    if offload is None or not all_persistent(engine.module):
        return False
    offload._remove_module_hooks()
    offload.forward_hooks, offload.backward_hooks = [], []
    # They are still partitioned as DeepSpeed built them, for the first fetch to gather. An eager forward would
    # gather each on access (ZeROOrderedDict), but compiled blocks read them whole: gather them now, all at once,
    # as ZeRO-3 does after a checkpoint is saved or loaded (checkpoint_event_epilogue).
    persistent = offload.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)
    return True


def present(engine) -> bool:
    """Whether the engine's modules carry ZeRO-3's per-module hooks."""
    offload = getattr(engine.optimizer, "parameter_offload", None)
    return bool(offload is not None and (offload.forward_hooks or offload.backward_hooks))
