"""The learning-rate schedule: a linear warmup, then cosine, warmup-stable-decay or constant, on a clock of optimizer
steps (train.lr_schedule_unit: steps) or of tokens trained (tokens). The two differ only under a batch ramp, whose
small early steps move a step clock as far as full ones: Megatron counts its schedule in samples there
(--lr-warmup-samples, --lr-decay-samples); the token clock is that, with the schedule's lengths kept in full
batches' worth of tokens so that one config reads the same either way."""
from __future__ import annotations

import math

import torch

from ..config import Config, TrainConfig
from .batch_rampup import grad_accum_steps_at, sequences_to_end, step_sequences


def wsd_decay_start_at(t: TrainConfig, end: float) -> float:
    """Schedule wsd's last position at lr in a run ending at `end`: its decay the same share of the run as of
    max_steps (train.wsd_decay_start on the step clock, where end is max_steps)."""
    return t.wsd_decay_start * end / t.max_steps


def lr_at_position(t: TrainConfig, k: float, end: float) -> float:
    """The schedule's rate at position k of a run ending at `end` (both in steps: optimizer steps, or full batches'
    worth of tokens): warmup to train.lr at k = warmup_steps; cosine, or WSD after its stable phase, decays from there
    to min_lr at k = end (WSD along train.wsd_decay_shape, its decay the same share of the run as of max_steps), and
    stays there past it; constant stays at lr."""
    if t.warmup_steps and k <= t.warmup_steps:
        return t.lr * k / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    start = wsd_decay_start_at(t, end) if t.schedule == "wsd" else t.warmup_steps  # the last step at lr
    if k <= start:
        return t.lr
    span = end - start
    frac = 1.0 if span <= 0 else min(1.0, (k - start) / span)
    if t.schedule == "wsd" and t.wsd_decay_shape == "linear":
        return t.lr + (t.min_lr - t.lr) * frac
    return t.min_lr + 0.5 * (t.lr - t.min_lr) * (1 + math.cos(math.pi * frac))


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate of the optimizer step that follows `step` steps on the step clock: step k = step + 1 of the run
    (1-based) trains at the schedule's value at k, the warmup's first step at lr / warmup_steps (not 0), the run's last
    (k = max_steps) at min_lr."""
    return lr_at_position(cfg.train, step + 1, cfg.train.max_steps)


class TokenClockLR(torch.optim.lr_scheduler.LRScheduler):
    """The schedule on the token clock: a step's position is the tokens of the optimizer steps applied so far, its own
    included, in full batches (train.grad_accum_steps micro-steps of every rank). The loop gives it each step's tokens
    (begin_step) as the step starts, which sets the step's rate; DeepSpeed steps it after each applied step only, so a
    skipped step (non-finite gradients) moves this clock no more than the step clock. The applied tokens and the
    unit (the first run's full batch) travel in the checkpoint, so a resume on another world size or batch goes on at
    the rate it stopped at; where the run ends is the resuming run's (start)."""

    def __init__(self, optimizer, train: TrainConfig, full_batch_tokens: int):
        self.train, self.full_batch_tokens = train, full_batch_tokens
        self.end = float(train.max_steps)  # until start()
        self.applied_tokens: int | None = 0
        self.step_tokens = 0
        super().__init__(optimizer)

    def start(self, tokens_seen: int, tokens_to_end: int) -> None:
        """Before this process's first step: the run trains `tokens_to_end` more tokens. A checkpoint of the step clock
        holds no applied tokens: they are those it had seen."""
        if self.applied_tokens is None:
            self.applied_tokens = tokens_seen
        self.end = (self.applied_tokens + tokens_to_end) / self.full_batch_tokens

    def begin_step(self, tokens: int) -> None:
        """The optimizer step about to run trains on `tokens` tokens (all ranks): set its rate."""
        self.step_tokens = tokens
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr, strict=True):
            group["lr"] = lr

    def step(self, epoch=None) -> None:  # after an applied step (and once from __init__, with no tokens)
        self.applied_tokens += self.step_tokens
        self.step_tokens = 0
        super().step()

    def get_lr(self) -> list[float]:
        k = (self.applied_tokens + self.step_tokens) / self.full_batch_tokens
        return [base * lr_at_position(self.train, k, self.end) / self.train.lr for base in self.base_lrs]

    def state_dict(self) -> dict:
        # What is this run's (the config, the end) stays out; `lr_lambdas` lets the step clock's LambdaLR load it,
        # resuming at the count of applied steps.
        state = {k: v for k, v in super().state_dict().items() if k not in ("train", "end", "step_tokens")}
        return {**state, "lr_lambdas": [None] * len(self.base_lrs)}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({"applied_tokens": None, **{k: v for k, v in state.items() if k != "lr_lambdas"}})


def full_batch_tokens(cfg: Config, world_size: int) -> int:
    """Tokens of one optimizer step once any batch ramp is over, all ranks."""
    return step_sequences(cfg, world_size) * cfg.data.seq_len


def tokens_to_end(cfg: Config, world_size: int, step: int, tokens_seen: int) -> int:
    """Tokens the run trains from `step`, with `tokens_seen` behind it, to train.max_steps."""
    return cfg.data.seq_len * sequences_to_end(cfg.train, step, tokens_seen, cfg.train.micro_batch_size * world_size,
                                               cfg.data.seq_len)


def run_full_batches(cfg: Config, world_size: int) -> float:
    """The whole run's tokens on `world_size` processes, in full batches: the token clock's end (max_steps but
    under a batch ramp)."""
    return tokens_to_end(cfg, world_size, 0, 0) / full_batch_tokens(cfg, world_size)


def token_clock_refusal(cfg: Config, world_size: int) -> str | None:
    """Why the token clock cannot run this config from its start on `world_size` processes, if it cannot: under a
    batch ramp the run holds fewer full batches' worth of tokens than max_steps, and the warmup must end before the
    decay (or the run) does."""
    t = cfg.train
    end = run_full_batches(cfg, world_size)
    last_at_lr = wsd_decay_start_at(t, end) if t.schedule == "wsd" else end
    if t.schedule == "constant" or t.warmup_steps <= last_at_lr:
        return None
    phase = "schedule wsd's stable phase, which ends at" if t.schedule == "wsd" else "the run's"
    return (f"train.warmup_steps: {t.warmup_steps} full batches' worth of tokens on train.lr_schedule_unit: tokens, more "
            f"than {phase} {last_at_lr:,.2f}: under the batch ramp, train.max_steps {t.max_steps} steps on "
            f"{world_size} processes train {end:,.2f} full batches' worth; lower train.warmup_steps, or raise "
            "train.max_steps")


def lr_scheduler(cfg: Config, world_size: int):
    """DeepSpeed's `lr_scheduler` argument: a factory giving the optimizer the schedule on train.lr_schedule_unit's
    clock, stepped by the engine after each applied optimizer step."""
    if cfg.train.lr_schedule_unit == "tokens":
        return lambda optimizer: TokenClockLR(optimizer, cfg.train, full_batch_tokens(cfg, world_size))
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(cfg, step) / cfg.train.lr)


def schedule_milestones(cfg: Config, world_size: int) -> list[dict]:
    """The run's schedule at its turning points on `world_size` processes, step by step as training takes it (no
    step skipped): each row's step, the tokens trained once it is done, its batch in sequences and its learning
    rate. Rows: the first step, the warmup's last, the batch ramp's first full batch, schedule wsd's last step at lr,
    a quarter, half and three quarters of the run, and its last step."""
    t = cfg.train
    per_micro_step = t.micro_batch_size * world_size
    full, end = full_batch_tokens(cfg, world_size), run_full_batches(cfg, world_size)
    # The ramp's steps one by one (a step's batch follows from the tokens before it), up to its first full batch;
    # from there every step trains `full` tokens, so any later step's numbers are a product (a run of millions of
    # steps is not walked).
    ramp, seen = [], 0  # (micro-steps, tokens trained once the step is done) of steps 1, 2, ...
    while len(ramp) < t.max_steps and (not ramp or ramp[-1][0] < t.grad_accum_steps):
        accum = grad_accum_steps_at(t, seen)
        seen += accum * per_micro_step * cfg.data.seq_len
        ramp.append((accum, seen))

    def at(step: int) -> tuple[int, int, float]:  # micro-steps, tokens once done, position on the schedule's clock
        accum, tokens = ramp[step - 1] if step <= len(ramp) else (t.grad_accum_steps,
                                                                  ramp[-1][1] + (step - len(ramp)) * full)
        return accum, tokens, tokens / full if t.lr_schedule_unit == "tokens" else step

    labels: dict[int, list[str]] = {}
    if t.batch_rampup_tokens and ramp[-1][0] == t.grad_accum_steps:
        labels[len(ramp)] = ["the batch ramp's first full batch"]
    for step, what in ((1, "first step"), *((max(1, t.max_steps * q // 4), f"{q}/4 of the run") for q in (1, 2, 3)),
                       *([(t.wsd_decay_start, "last step at train.lr before the decay")] if t.schedule == "wsd" else []),
                       (t.max_steps, "last step")):
        labels.setdefault(step, []).append(what)
    # The warmup's last step: the last whose position is within it, with a step after it that is not.
    lo, hi = 0, t.max_steps - 1  # the last step in 1 .. max_steps - 1 at position <= warmup_steps, 0 if none
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if at(mid)[2] <= t.warmup_steps else (lo, mid - 1)
    if lo and at(lo + 1)[2] > t.warmup_steps:
        labels.setdefault(lo, []).append("warmup's last step")
    rows = []
    for step in sorted(s for s in labels if s >= 1):  # wsd's last step at lr is 0 in a one-step run
        accum, tokens, position = at(step)
        lr = lr_at_position(t, position, end) if t.lr_schedule_unit == "tokens" else lr_at(cfg, step - 1)
        rows.append({"step": step, "tokens": tokens, "batch_sequences": accum * per_micro_step, "lr": lr,
                     "at": "; ".join(labels[step])})
    return rows
