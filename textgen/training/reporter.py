"""Everything a run tells: its log lines, metrics.jsonl, the progress bar, the samples and loss.png.
Only rank 0 speaks and writes; every rank keeps the history (it goes into the checkpoint).
"""
from __future__ import annotations

import sys
from dataclasses import asdict

import torch

from ..evaluate import LN2
from ..lstm import describe_step_path
from .. import plot as loss_plot
from . import schedule
from .schedule import seconds_text
from .config import lr_at
from .state import IntervalSums, Run

# loss.png is redrawn at a report only when this long has passed since the last drawing (and at the
# last step): a drawing costs 0.3-0.7 s of the run's time on these CPUs, and a short run's
# validations can come seconds apart.
PLOT_EVERY_S = 30.0


class Reporter:
    def __init__(self, run: Run, clock, log=print):
        self.run, self.clock = run, clock
        self.main = run.dist.is_main
        self.log = log if self.main else (lambda message: None)
        self.bar = None
        self.last_report: int | None = None           # the step of the last sample and plot
        self.last_plot: float | None = None            # the clock's reading at the last drawing (None: the start)

    def begin(self) -> None:
        """The run's first writes (the folder, config.json, metrics.jsonl as of the checkpoint), its opening
        line and the bar."""
        run, p = self.run, self.run.progress
        if self.main:
            run.folder.start()                 # --overwrite removes the old run here, not earlier
            run.folder.write_config({"model": asdict(run.model_config), "train": asdict(run.config),
                                     "corpus": run.corpus.info, "parameters": run.model.num_parameters(),
                                     "torch_version": str(torch.__version__)})
            # A resumed run replays any steps logged after its checkpoint: drop those lines first.
            run.folder.write_metrics(p.history)
        self.log(f"run folder {run.run_dir}: {run.model.num_parameters() / 1e6:.2f}M parameters, vocabulary "
                 f"{run.tokenizer.vocab_size}, {len(run.train_tokens):,} training and "
                 f"{len(run.val_tokens):,} validation characters, device {run.device} ({run.config.dtype}, "
                 f"{describe_step_path(run.device)})"
                 + (f", {run.dist.world_size} processes" if run.dist.enabled else ""))
        if p.step > 0:
            self.log(f"resuming at step {p.step} of {p.budget.plan}")
        if self.main and not run.config.quiet and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=p.budget.plan, initial=p.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def planned(self, message: str) -> None:
        """A plan of steps made or made again: say so, and stretch the bar to it."""
        self.log(message)
        if self.bar is not None:
            self.bar.total = self.run.progress.budget.plan
            self.bar.refresh()

    def interval(self, val_loss: float | None) -> None:
        """Close the log interval: its metrics line into the history and metrics.jsonl, the bar and the log."""
        run, p = self.run, self.run.progress
        s = p.sums
        if s.steps == 0:
            return
        entry = {
            "step": p.step, "time": round(p.elapsed, 3), "train_loss": s.loss / s.steps,
            "val_loss": val_loss, "lr": lr_at(p.step - 1, p.budget.plan, run.config),
            "grad_norm": s.grad_norm / max(1, s.steps - s.skipped),
            # s.chars counts every rank's streams already (batch_size is the global number)
            "chars_per_sec": round(s.chars / max(s.seconds, 1e-9)),
            "epoch": round(run.loader.epoch, 4),
        }
        if run.scaler.is_enabled():
            entry["loss_scale"], entry["skipped_steps"] = run.scaler.get_scale(), s.skipped
        p.history.append(entry)
        p.sums = IntervalSums()
        if not self.main:
            return
        run.folder.append_metrics(entry)
        val = f"{val_loss:.4f}" if val_loss is not None else "-"
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {entry['train_loss']:.4f} val {val} lr {entry['lr']:.2e} "
                                     f"{entry['chars_per_sec']:,} chars/s", refresh=False)
        if self.bar is None or val_loss is not None:
            if not run.config.quiet or val_loss is not None:
                self.log(f"step {p.step}/{p.budget.plan} loss {entry['train_loss']:.4f} val {val} "
                         f"lr {entry['lr']:.2e} grad {entry['grad_norm']:.2f} {entry['chars_per_sec']:,} chars/s")

    def due(self) -> bool:
        """Whether this validation also samples and plots: about EVALS_PER_RUN times a run however
        often it validates (every validation where --eval-every sets the pace)."""
        p = self.run.progress
        every = schedule.eval_interval(self.run.config.eval_every, p.budget.plan, p.budget.planned)
        if self.last_report is not None and p.step // every == self.last_report // every:
            return False                # only the first validation past each multiple of `every`
        self.last_report = p.step
        return True

    def sample(self, text: str) -> None:
        self.log(f"--- sample at step {self.run.progress.step} ---\n{text.strip()}\n---")

    def plot(self, last_step: bool) -> None:
        """loss.png again, at the last step or when PLOT_EVERY_S has passed since the last drawing."""
        now = self.clock.now()
        since = now - (self.clock.started if self.last_plot is None else self.last_plot)
        if not self.main or not (last_step or since >= PLOT_EVERY_S):
            return
        self.last_plot = now
        if loss_plot.matplotlib_available():
            loss_plot.plot_runs([self.run.run_dir])          # its own loss.png, written atomically

    def saved_best(self) -> None:
        best = self.run.progress.best_val_loss
        self.log(f"step {self.run.progress.step}: new best val loss {best:.4f} ({best / LN2:.3f} bits/char), "
                 f"saved best.pt")

    def stepped(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def stopped(self, signal_name: str) -> None:
        self.log(f"stopped by {signal_name} at step {self.run.progress.step}; checkpoint saved. "
                 f"Resume with: python train.py --resume {self.run.run_dir}")

    def out_of_time(self) -> None:
        self.log(f"time budget of {seconds_text(self.run.config.time_budget)} spent at step "
                 f"{self.run.progress.step}")

    def done(self) -> None:
        p = self.run.progress
        self.log(f"done: step {p.step}, {p.elapsed:.0f}s"
                 + (f", best val loss {p.best_val_loss:.4f} ({p.best_val_loss / LN2:.3f} bits/char)"
                    if p.best_val_loss is not None else "")
                 + f"; checkpoints in {self.run.run_dir}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
