"""The learning-rate schedule and the time budget: pure functions of steps and seconds.

Owns: linear warm-up then cosine decay, how many steps fit a time budget once a few steps
have been timed, and how often to validate. Imports nothing of ours; unit-tested on its own.
"""
from __future__ import annotations

import math

EVALS_PER_RUN = 10     # validations over a run when --eval-every is 0, at least; samples and plots at these
MAX_EVALS_PER_RUN = 100  # where a validation is cheap, up to this many ...
EVAL_SHARE = 0.02      # ... as long as they take at most this share of the budget
TIMED_STEPS = 20       # steps timed before a time budget is turned into a step count
SPARE = 0.03           # of the remaining budget, kept for samples, checkpoints and noise
REPLAN_AT = (0.1, 0.4, 0.7)  # fractions of the plan where the steps are timed again and the plan made anew


def lr_at(step: int, total: int, lr: float, warmup_steps: int, min_lr_ratio: float) -> float:
    """Linear warm-up to lr, then cosine down to lr * min_lr_ratio at `total`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def timing_starts_at(warmup_steps: int) -> int:
    """The step after which steps are timed: once the first few (allocator, oneDNN primitives) are behind."""
    return min(10, max(2, warmup_steps // 5))


def validations_for(budget: float, eval_seconds: float) -> int:
    """How many times a run with a time budget validates when --eval-every is 0: EVALS_PER_RUN, or
    more where a validation is cheap against the budget. A small text memorised within a minute or
    two has its best weights early, between ten evenly spaced validations (0.1 MB of Chinese: best
    at the first of them, 127 s in, and worse at every one after), and best.pt can only keep weights
    that were validated."""
    affordable = int(EVAL_SHARE * budget / max(eval_seconds, 1e-6))
    return max(EVALS_PER_RUN, min(MAX_EVALS_PER_RUN, affordable))


def planned_steps(step: int, elapsed: float, budget: float, seconds_per_step: float, eval_seconds: float,
                  eval_every: int, validations: int = EVALS_PER_RUN) -> int:
    """The total step count that fits the budget, counting the validations still to come.

    With eval_every 0 the run validates `validations` times, evenly: when the plan is made again
    late in a run only the share still ahead is reserved (reserving all ten had a 100 MB run with
    24 s validations stop 224 s early)."""
    remaining = max(0.0, budget - elapsed)
    evals = remaining / seconds_per_step / eval_every if eval_every else math.ceil(validations * remaining / budget)
    training_seconds = (1 - SPARE) * remaining - evals * eval_seconds
    return step + max(1, int(training_seconds / seconds_per_step))


def eval_interval(eval_every: int, plan: int, planned: bool, validations: int = EVALS_PER_RUN) -> int:
    """Steps between validations: eval_every, or the plan shared among `validations` once the plan
    is known. With validations=EVALS_PER_RUN: the steps between samples and plots."""
    if eval_every:
        return eval_every
    if not planned:
        return plan + 1                 # not before the time budget is planned
    return max(1, plan // validations)


def seconds_text(seconds: float) -> str:
    """A budget as the log shows it: whole seconds, but a budget under 10 s with its significant
    digits, so that 0.5 s does not read as "0s"."""
    return f"{seconds:.0f}s" if seconds >= 10 else f"{seconds:.2g}s"
