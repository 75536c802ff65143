"""The learning-rate schedule and the time budget: functions of steps and seconds, and the budget's state.

Owns: linear warm-up then cosine decay, how many steps fit a time budget once a few steps
have been timed, how often to validate, and TimeBudget, the budget's whole state with its
state_dict. Imports nothing of ours; unit-tested on its own.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass
class TimeBudget:
    """A run's time budget turned into a plan of steps, and timed again as the run goes.

    Its saved state is state_dict() (plan, planned, replans, validations, eval_seconds: the keys a
    checkpoint has always held); the timing marks are not saved, so a resumed run times afresh.
    With no budget (budget None) the plan is the step count and nothing is ever timed.
    agree(value) -> value: what every rank of a distributed run takes (rank 0's), identity alone."""
    budget: float | None
    plan: int
    planned: bool = True
    replans: int = len(REPLAN_AT)
    validations: int = EVALS_PER_RUN          # over the run, when --eval-every is 0
    eval_seconds: float = 0.0
    first_mark: tuple | None = None           # (step, elapsed) where timing for the first plan began
    retime_mark: tuple | None = None          # (step, seconds in steps) at the last timing

    @classmethod
    def start(cls, budget: float | None, steps: int) -> "TimeBudget":
        return cls(budget, steps) if budget is None else cls(budget, steps, planned=False, replans=0)

    def state_dict(self) -> dict:
        return {"plan": self.plan, "planned": self.planned, "replans": self.replans,
                "validations": self.validations, "eval_seconds": self.eval_seconds}

    def load_state_dict(self, saved: dict, steps: int) -> None:
        """saved: a checkpoint's dict; steps: the run's --steps, the plan where there is no budget."""
        self.plan = int(saved.get("plan", steps))
        self.planned = bool(saved.get("planned", True))
        # Checkpoints from before the plan was timed again three times say only whether it was, once.
        self.replans = int(saved.get("replans", len(REPLAN_AT) if saved.get("replanned", True) else 0))
        self.validations = int(saved.get("validations", EVALS_PER_RUN))
        self.eval_seconds = float(saved.get("eval_seconds", 0.0))
        if self.budget is None:
            self.plan = steps            # the saved --steps, or a new one given on resume

    def first_plan_due(self, step: int, elapsed: float, warmup_steps: int) -> bool:
        """Whether enough steps have been timed to plan by (the first call past the warm-up marks the start)."""
        if self.first_mark is None:
            if step >= timing_starts_at(warmup_steps):
                self.first_mark = (step, elapsed)
            return False
        return step >= self.first_mark[0] + TIMED_STEPS

    def make_plan(self, step: int, elapsed: float, eval_seconds: float, eval_every: int, agree) -> float:
        """Turn the budget into a step count from the timed steps and one timed validation; returns
        the seconds a step took."""
        steps0, t0 = self.first_mark
        seconds_per_step = (elapsed - t0) / (step - steps0)
        self.validations = agree(validations_for(self.budget, eval_seconds))
        plan = planned_steps(step, elapsed, self.budget, seconds_per_step, eval_seconds, eval_every, self.validations)
        self.plan, self.planned, self.eval_seconds = agree(plan), True, eval_seconds
        return seconds_per_step

    def retime(self, step: int, elapsed: float, step_seconds: float, eval_every: int, agree) -> tuple | None:
        """At a tenth, four tenths and seven tenths of the plan: time the steps since the last timing
        and plan anew. Returns (seconds a step, steps timed, the old plan) where it did, else None."""
        if self.retime_mark is None:
            self.retime_mark = (step, step_seconds)
            return None
        steps0, seconds0 = self.retime_mark
        # Each timing spans a tenth of the plan at least, even where a shorter plan brings the next one closer.
        span = max(TIMED_STEPS, self.plan // 10)
        if step < max(steps0 + span, REPLAN_AT[self.replans] * self.plan):
            return None
        seconds_per_step = (step_seconds - seconds0) / (step - steps0)
        plan = planned_steps(step, elapsed, self.budget, seconds_per_step, self.eval_seconds, eval_every,
                             self.validations)
        old, self.plan = self.plan, agree(plan)
        self.replans += 1
        self.retime_mark = (step, step_seconds)
        return seconds_per_step, step - steps0, old
