"""Batch-size ramp-up: DeepSeek-V3 trained its first 469B tokens with a global batch rising from 3072 to 15360
sequences, then held it. Here the batch grows by whole micro-steps per optimizer step, from
train.batch_rampup_start to train.grad_accum_steps, one more micro-step each time an equal share of
train.batch_rampup_tokens has been trained on (Megatron's --rampup-batch-size, in tokens). The count for a step is
a function of the tokens seen before it, which a checkpoint holds: a resume picks up the ramp where it stopped."""

from ..config import Config, TrainConfig


def step_sequences(cfg: Config, world: int) -> int:
    """Sequences in one full optimizer step (train.grad_accum_steps micro-steps) over all `world` processes."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * world


def grad_accum_steps_at(train: TrainConfig, tokens_seen: int) -> int:
    """Micro-steps of the optimizer step that starts once `tokens_seen` tokens (all ranks) have been trained on."""
    full = train.grad_accum_steps
    if not train.batch_rampup_tokens:
        return full
    start = train.batch_rampup_start
    return min(full, start + tokens_seen * (full - start) // train.batch_rampup_tokens)


def sequences_to_end(train: TrainConfig, step: int, tokens_seen: int, sequences_per_micro_step: int,
                     seq_len: int) -> int:
    """Sequences (all ranks) the run reads from `step`, with `tokens_seen` behind it, to train.max_steps;
    `sequences_per_micro_step` is the micro-batch times the processes."""
    total = 0
    while step < train.max_steps and (accum := grad_accum_steps_at(train, tokens_seen)) < train.grad_accum_steps:
        total += accum * sequences_per_micro_step
        tokens_seen += accum * sequences_per_micro_step * seq_len
        step += 1
    return total + max(train.max_steps - step, 0) * train.grad_accum_steps * sequences_per_micro_step
