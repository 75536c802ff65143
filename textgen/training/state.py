"""A run's state and the checkpoint: `Run` holds everything a training loop needs, `Progress` what
changes as it goes, and `checkpoint_of` / `restore` are the one pair that writes it into a
checkpoint's dict and reads it back.

Exact resume: everything that shapes the future is in the checkpoint (parameters, optimizer
moments, the step and the schedule plan, loader positions, the carried state of every stream, every
RNG, the partial sums of the current log interval), so on the CPU a run stopped and resumed ends
with the same parameters, bit for bit, as one that never stopped. On a GPU it is exact up to the
nondeterminism of its kernels.
"""
from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from datetime import datetime

import numpy as np
import torch

from .. import checkpoint
from . import schedule
from ..corpus import PreparedCorpus
from ..data import StreamLoader
from ..errors import UsageError
from ..lstm import CharLSTM, ModelConfig
from ..rng import rng_state, set_rng_state
from ..run_folder import RunFolder
from ..tokenizer import CharTokenizer
from .config import TrainConfig


@dataclass
class IntervalSums:
    """Partial sums of the current log interval; saved so a resumed run logs the same numbers."""
    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    chars: int = 0
    seconds: float = 0.0
    skipped: int = 0                 # float16 steps skipped because the gradients overflowed

    def add(self, loss: float, grad_norm: float | None, chars: int, seconds: float) -> None:
        self.loss += loss
        if grad_norm is None:
            self.skipped += 1        # a float16 overflow: no update, no norm
        else:
            self.grad_norm += grad_norm
        self.steps += 1
        self.chars += chars
        self.seconds += seconds


@dataclass
class Progress:
    """What a run has done so far: the part of its state that is not a tensor of the model's."""
    budget: schedule.TimeBudget
    step: int = 0
    elapsed: float = 0.0                        # seconds of the run, across resumes
    best_val_loss: float | None = None
    history: list[dict] = field(default_factory=list)    # every metrics line logged
    sums: IntervalSums = field(default_factory=IntervalSums)
    state: tuple | None = None                  # the carried (h, c) of every layer, this process's streams
    first_loss: float | None = None             # the divergence guard's yardstick
    last_saved_step: int | None = None


@dataclass
class Run:
    """A ready run, as build.build_run returns it: the folder claimed, the corpus, the model at its size,
    the optimizer and, when resumed, every state restored."""
    config: TrainConfig
    model_config: ModelConfig
    dist: object                                # distributed.Context
    folder: RunFolder
    device: torch.device
    corpus: PreparedCorpus
    train_tokens: np.ndarray
    val_tokens: np.ndarray
    model: CharLSTM
    averaged: CharLSTM | None                   # --ema's average: validated, sampled and saved for generation
    train_model: torch.nn.Module                # the model as trained: wrapped for DDP, compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    loader: StreamLoader
    progress: Progress
    val_styles: object = None                   # the validation tail's positions -> style ids (styles.StyleMap)

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.corpus.tokenizer

    @property
    def run_dir(self) -> str:
        return self.folder.path

    def inference_model(self) -> CharLSTM:
        """What validation scores and samples: the averaged weights where --ema keeps them."""
        return self.averaged if self.averaged is not None else self.model


def checkpoint_of(run: Run) -> dict:
    """The checkpoint's dict of this run (every rank joins the gather of the carried state)."""
    p = run.progress
    return {
        "format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION,
        "model_config": asdict(run.model_config), "train_config": asdict(run.config),
        "vocab": run.tokenizer.to_dict(), "corpus": run.corpus.info,
        "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
        "step": p.step, **p.budget.state_dict(), "elapsed": p.elapsed,
        "loader": {"train": run.loader.state_dict(), "val": {"position": 0}},
        "carried_state": run.dist.gather_state(p.state),
        "rng": rng_state(), "history": p.history, "best_val_loss": p.best_val_loss,
        "first_loss": p.first_loss, "interval_sums": asdict(p.sums),
        "scaler": run.scaler.state_dict(),
        "averaged_model": run.averaged.state_dict() if run.averaged is not None else None,
        "created": datetime.now().isoformat(timespec="seconds"), "torch_version": str(torch.__version__),
    }


def restore(run: Run, ckpt: dict, resume: str) -> None:
    """The run's state from its checkpoint, whose fields checkpoint.load has checked by type; what
    their contents cannot restore (a signed file with a state of another shape) is one sentence.
    (The model's weights and the average are loaded as the run is built.)"""
    @contextlib.contextmanager
    def restoring(name: str):
        try:
            yield
        except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UsageError(f"{resume} is not a valid textgen checkpoint: its {name} cannot be restored "
                             f"({reason})") from None

    try:
        run.optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise UsageError(f"{resume}: its optimizer state does not match the model ({e})") from None
    p = run.progress
    p.step = int(ckpt["step"])
    p.budget.load_state_dict(ckpt, run.config.steps)
    p.elapsed = float(ckpt.get("elapsed", 0.0))
    p.best_val_loss = ckpt.get("best_val_loss")
    p.history = list(ckpt.get("history", []))
    p.first_loss = ckpt.get("first_loss")
    with restoring("interval_sums"):
        p.sums = IntervalSums(**ckpt.get("interval_sums", {}))
    with restoring("loader"):
        run.loader.load_state_dict(ckpt["loader"]["train"])
    carried = ckpt.get("carried_state")
    if carried:
        layers, shape = run.model_config.layers, (run.config.batch_size, run.model_config.hidden_size)
        if len(carried) != layers or any(tuple(t.shape) != shape for pair in carried for t in pair):
            raise UsageError(f"{resume} is not a valid textgen checkpoint: its carried_state does not hold "
                             f"{layers} layers of {shape[0]} x {shape[1]} states")
        first, count = run.dist.stream_share(run.config.batch_size)
        p.state = tuple((h[first:first + count].to(run.device), c[first:first + count].to(run.device))
                        for h, c in carried)
    if "rng" in ckpt:
        with restoring("rng"):
            set_rng_state(ckpt["rng"])
    if ckpt.get("scaler") and run.scaler.is_enabled():
        with restoring("scaler"):
            run.scaler.load_state_dict(ckpt["scaler"])
    p.last_saved_step = p.step
