"""The training loop: `train(run)` steps a run built by build.build_run until its plan, its time
budget or a signal ends it. Read `train` top to bottom: a step, the time budget's plan, then what
is due at this step (validation and a sample, a metrics line, the plot, a checkpoint), then whether
to stop. What a step is lives in step.py, what a run tells in reporter.py, its state and checkpoint
in state.py, and the plan of a time budget in schedule.py.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .. import checkpoint, files
from ..lstm import release_buffers
from . import schedule
from ..errors import OutputError, StopTraining
from .reporter import Reporter
from .state import Run, checkpoint_of
from .step import sample_text, train_step, validate


@dataclass
class TrainResult:
    run_dir: str
    step: int
    best_val_loss: float | None
    history: list = field(default_factory=list)
    stopped_by: str | None = None


def train(run: Run, log=print) -> TrainResult:
    """Train the run to its end; the run folder is released after, whatever happens."""
    try:
        return _train(run, log)
    finally:
        run.folder.release()              # the process's end would too; a Python caller goes on living
        release_buffers()                 # the large chunk buffers the fast path kept for the next step


def _train(run: Run, log) -> TrainResult:
    cfg, p = run.config, run.progress
    clock = Clock(p.elapsed)
    report = Reporter(run, clock, log)
    report.begin()
    stop = StopSignals(run.dist.is_main)
    with stop, contextlib.closing(report):
        while p.step < p.budget.plan:
            with out_of_memory_is_a_stop(run):
                loss, grad_norm = train_step(run)
            p.sums.add(loss, grad_norm, cfg.batch_size * cfg.seq_len, clock.stepped())
            p.elapsed = clock.elapsed
            plan_the_budget(run, clock, report)
            out_of_time, stop_requested = run.dist.any(
                cfg.time_budget is not None and p.elapsed >= cfg.time_budget, stop.signal is not None)
            last_step = p.step >= p.budget.plan or out_of_time
            val_loss, report_due = None, False
            if p.step % eval_interval(run) == 0 or last_step:
                report_due = report.due() or last_step
                with out_of_memory_is_a_stop(run):
                    val_loss = validate(run)
                    if report_due and run.dist.is_main and cfg.sample_length > 0:
                        report.sample(sample_text(run))
            if p.step % cfg.log_every == 0 or last_step or val_loss is not None:
                report.interval(val_loss)
            if report_due:
                report.plot(last_step)
            is_best = val_loss is not None and (p.best_val_loss is None or val_loss < p.best_val_loss)
            if is_best:
                p.best_val_loss = val_loss
            if p.step % cfg.save_every == 0 or last_step or is_best or stop_requested:
                save(run, report, is_best)
            report.stepped()
            clock.steps_go_on()                       # validation and saving are not step time
            if stop_requested:
                report.stopped(stop.name())
                return TrainResult(run.run_dir, p.step, p.best_val_loss, p.history, stop.name())
            if out_of_time:
                report.out_of_time()
                break
    report.done()
    return TrainResult(run.run_dir, p.step, p.best_val_loss, p.history)


def eval_interval(run: Run) -> int:
    b = run.progress.budget
    return schedule.eval_interval(run.config.eval_every, b.plan, b.planned, b.validations)


def plan_the_budget(run: Run, clock: "Clock", report: Reporter) -> None:
    """A time budget becomes a plan of steps after a warm-up (timing one validation too), and is
    planned again at a tenth, four tenths and seven tenths of it from the steps' own time since.

    The first steps of a run are often slower (caches, the allocator, a busy machine settling), and a
    plan made from them alone left 10-15% of a 15-minute budget unused; one re-timing at a tenth still
    left 6% (54 s) when the steps sped up later. A run resumed before its plan was made simply starts
    timing again where it stands."""
    cfg, p, budget = run.config, run.progress, run.progress.budget
    if not budget.planned:
        if not budget.first_plan_due(p.step, p.elapsed, cfg.warmup_steps):
            return
        start = clock.now()
        validate(run)
        eval_seconds = clock.now() - start
        seconds_per_step = budget.make_plan(p.step, p.elapsed, eval_seconds, cfg.eval_every, run.dist.broadcast)
        how_often = "" if cfg.eval_every else f" ({budget.validations} in the run)"
        report.planned(f"time budget {schedule.seconds_text(cfg.time_budget)}: {seconds_per_step * 1000:.0f} "
                       f"ms/step, validation {eval_seconds:.1f}s{how_often}; planning {budget.plan} steps")
    elif budget.replans < len(schedule.REPLAN_AT):
        timed = budget.retime(p.step, p.elapsed, clock.step_seconds, cfg.eval_every, run.dist.broadcast)
        if timed is not None and timed[2] != budget.plan:
            seconds_per_step, steps, old = timed
            report.planned(f"time budget: {seconds_per_step * 1000:.0f} ms/step over the last {steps} "
                           f"steps; planning {budget.plan} steps (was {old})")


def save(run: Run, report: Reporter, is_best: bool = False) -> None:
    payload = checkpoint_of(run)                       # every rank joins the state gather
    if not run.dist.is_main:
        return
    try:
        checkpoint.save_run_checkpoint(payload, run.run_dir, run.config.keep, is_best)
    except (OutputError, files.WriteError) as e:      # a full disk, or a folder that stopped taking files
        raise StopTraining(f"{e}; free some space or fix the folder, then resume with {{resume}}",
                           resume=run.run_dir) from None
    run.progress.last_saved_step = run.progress.step
    if is_best:
        report.saved_best()


class Clock:
    """The run's time: elapsed across resumes, and the seconds spent in training steps alone."""

    def __init__(self, elapsed_before: float):
        self.started = self.step_started = self.now()
        self.elapsed_before = elapsed_before     # a resumed run's clock goes on from its checkpoint
        self.elapsed = elapsed_before
        self.step_seconds = 0.0                  # time in training steps alone, this process

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def stepped(self) -> float:
        """A step ended: its seconds (counted into step_seconds), and elapsed brought up to now."""
        now = self.now()
        seconds = now - self.step_started
        self.step_seconds += seconds
        self.elapsed = self.elapsed_before + (now - self.started)
        return seconds

    def steps_go_on(self) -> None:
        self.step_started = self.now()


@contextlib.contextmanager
def out_of_memory_is_a_stop(run: Run):
    """An allocation that fails mid-run ends it with one sentence; the checkpoints already on
    disk are untouched (nothing is written after the failure)."""
    try:
        yield
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and not any(
                words in message.lower() for words in ("out of memory", "can't allocate", "cannot allocate")):
            raise
        saved = run.progress.last_saved_step
        kept = (f"the checkpoint of step {saved} in {run.run_dir} is kept"
                if saved is not None else "no checkpoint had been written yet")
        raise StopTraining(f"ran out of memory at step {run.progress.step + 1} ({message[:120]}); {kept}; "
                           f"try a smaller {{batch_size}} or model", batch_size=...) from None


class StopSignals:
    """While active, SIGINT and SIGTERM ask the run to finish its step and save (a second Ctrl-C quits at
    once); `signal` is the first one received."""

    def __init__(self, speaks: bool):
        self.speaks = speaks
        self.signal: int | None = None
        self.replaced: dict = {}

    def name(self) -> str:
        return signal.Signals(self.signal or signal.SIGTERM).name      # another rank's signal reads as SIGTERM

    def _request_stop(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now; checkpoints are written atomically
        if self.signal is not None:
            return          # asked again (a dead launcher's threads each send SIGTERM): once is enough
        self.signal = signum
        if self.speaks:
            sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                             f"(Ctrl-C again to quit at once)\n")

    def __enter__(self) -> "StopSignals":
        if hasattr(signal, "SIGTERM") and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.replaced[sig] = signal.signal(sig, self._request_stop)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.replaced.items():
            signal.signal(sig, handler)
