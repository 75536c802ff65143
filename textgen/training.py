"""The training loop: AdamW, clipping, warm-up + cosine schedule, validation, checkpoints, resume.

Owns the Trainer: build or restore everything (``__init__``), then a loop (``_run``) whose
body reads top to bottom. What is not the loop lives elsewhere: the learning-rate schedule and
time-budget planning in schedule.py, random-generator capture in rng.py, the run folder (its lock, config.json, metrics, plot) in
run_folder.py, devices and dtypes in devices.py.

Read ``Trainer._run`` top to bottom: each step takes the next chunk of every
stream, runs the model from the state the previous chunk ended in, steps the
optimizer and detaches the state, which then carries on to the next chunk for
the whole run (validation has its own state and leaves this one alone). The
one deliberate exception: each step one stream, in turn, starts from a zero
state (``restart_one_stream`` says why).

Exact resume: everything that shapes the future is in the checkpoint
(parameters, optimizer moments, the step and the schedule plan, loader
positions, the carried state of every stream, every RNG, the partial sums of
the current log interval), so on the CPU a run stopped and resumed ends with
the same parameters, bit for bit, as one that never stopped. On a GPU it is
exact up to the nondeterminism of its kernels.

Composes model, data, corpus, checkpoint, sampling, schedule, rng, devices, run_folder and distributed;
never cli.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime

import numpy as np
import torch

from . import checkpoint, files, schedule, sizing
from .rng import rng_state, seed_everything, set_rng_state
from . import distributed as dist_util
from .corpus import PreparedCorpus, prepare
from .data import StreamLoader, check_trainable, split_tokens
from .devices import check_fits, native_bf16, resolve_device, resolve_dtype
from . import settings
from .errors import OutputError, SettingError, StopTraining, UsageError, check_range, number
from .settings import parse_duration, setting, unescape
from .run_folder import (LATEST, RunFolder, checkpoint_folder, default_path, is_run_folder, resolve, run_path,
                         survey)
from .schedule import seconds_text
from .evaluate import LN2, cross_entropy
from .model import AdaptiveHead, CharLSTM, ModelConfig, describe_step_path, detach_state
from .sampling import SampleConfig, sample
from .tokenizer import CharTokenizer, UnknownCharactersError

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "corpora", "the_lighthouse_keepers.txt")


# Ranges of the settings, wide enough for any real run; outside them the arithmetic breaks or the
# value can only be a typo.
MAX_COUNT = 10**12                  # steps, intervals, characters
MAX_SAMPLE_LENGTH = 100_000
MIN_LR, MAX_LR = 1e-9, 10.0         # AdamW's step is about lr per weight: 10 is far past any useful rate
MIN_GRAD_CLIP, MAX_GRAD_CLIP = 1e-6, 1e9
MAX_TIME_S = 100 * 365 * 86400.0
_COUNT = dict(low=1, high=MAX_COUNT, within=f"a whole number from 1 to {MAX_COUNT:,}")
_COUNT0 = dict(low=0, high=MAX_COUNT, within=f"a whole number from 0 to {MAX_COUNT:,}")


@dataclass
class TrainConfig:
    """How a run trains. Each field but text is a setting declared once (settings.setting) with its
    default, its help and its range: train.py's flags are built from them, textgen.train() takes them
    as arguments, and every checkpoint stores them."""
    text: str | None = None          # corpus path; None = the embedded default corpus (train.py's TEXT)
    # 64 streams learned most per second on 2 CPU cores (benchmarks/)
    batch_size: int = setting(64, "parallel streams read side by side", group="data", **_COUNT)
    seq_len: int = setting(50, "chunk length in characters (backprop window)", group="data", **_COUNT)
    val_fraction: float = setting(0.1, "tail of the file kept for validation", group="data", low=0, high=1,
                                  within="in [0, 1)")
    separator: str = setting("\n\n", "text put between the files of a folder or glob corpus (escapes like \\n "
                             "work)", group="data", parse=unescape, shown="\\n\\n")
    cache_dir: str | None = setting(None, "where prepared corpora are cached (default: $TEXTGEN_CACHE_DIR, else "
                                    "$XDG_CACHE_HOME/textgen or ~/.cache/textgen)", group="data")
    # 3e-3 learned 0.03 nats less in the same steps, 1.2e-2 0.02 less (benchmarks/)
    lr: float = setting(5e-3, "peak AdamW learning rate", group="optimisation", low=MIN_LR, high=MAX_LR,
                        within=f"from {number(MIN_LR)} to {number(MAX_LR)}")
    min_lr_ratio: float = setting(0.1, "final lr as a fraction of --lr", group="optimisation", low=0, high=1,
                                  within="in [0, 1]")
    warmup_steps: int = setting(50, "linear warm-up steps", group="optimisation", **_COUNT0)
    # with residual layers 0.024 nats under 0.1 at the same steps; 0.6 worse (benchmarks/)
    weight_decay: float = setting(0.3, "AdamW weight decay on matrices", group="optimisation")
    grad_clip: float = setting(1.0, "clip the gradient norm to this", group="optimisation", low=MIN_GRAD_CLIP,
                               high=MAX_GRAD_CLIP, within=f"from {number(MIN_GRAD_CLIP)} to {number(MAX_GRAD_CLIP)}")
    ema: float = setting(0.995, "keep an exponential moving average of the weights with this decay (e.g. 0.999) "
                         "and validate, keep best.pt and generate with it (0: off)", group="optimisation",
                         low=0, high=1, within="0 (off) or a decay in (0, 1) such as 0.999")
    # with a time budget, an upper bound; giving steps drops the default budget
    steps: int = setting(1_000_000, "train exactly this many steps (replaces the default time budget; "
                         "reproducible)", group="optimisation", shown=None, **_COUNT)
    time_budget: float | None = setting(180.0, "train for this long (90s, 15m, 2h; seconds by default) with the "
                                        "schedule planned over it", group="optimisation", flag="time",
                                        parse=parse_duration, shown="3m", metavar="DURATION", low=0, high=MAX_TIME_S, low_open=True,
                                        within=f"a positive number of seconds (or a duration such as 15m) of at "
                                               f"most {MAX_TIME_S / 86400 / 365:.0f} years")
    eval_every: int = setting(0, "validate and print a sample every N steps (0: about 10 times over the run, and "
                              "with a time budget more validations, up to 100, where each is cheap)", group="run",
                              **_COUNT0)
    eval_chars: int = setting(200_000, "characters of the validation tail read at each validation (0: all)",
                              group="run", **_COUNT0)
    save_every: int = setting(200, "write latest.pt every N steps", group="run", **_COUNT)
    log_every: int = setting(25, "log a metrics line every N steps", group="run", **_COUNT)
    sample_length: int = setting(200, "characters sampled at each validation (0: none)", group="run", low=0,
                                 high=MAX_SAMPLE_LENGTH, within=f"a whole number from 0 to {MAX_SAMPLE_LENGTH:,}")
    keep: int = setting(3, "step checkpoints kept besides latest.pt and best.pt", group="run", **_COUNT0)
    out: str | None = setting(None, "run folder (default: checkpoints/<corpus>-<date>-<time>)", group="run")
    name: str | None = setting(None, "run name: the run folder becomes checkpoints/NAME", group="run")
    seed: int = setting(1337, "seed for initialisation and dropout", group="run", low=0, high=2**63 - 1,
                        within="a whole number from 0 to 2**63 - 1")
    device: str = setting("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps", group="run")
    dtype: str = setting("auto", "bfloat16 runs the LSTM's matrix products in bf16 (the cell state stays float32): "
                         "faster on CPUs with AVX512-BF16 or AMX and on recent GPUs; auto picks it where it is "
                         "native. float16 does the same in fp16 with loss scaling, for GPUs without bf16",
                         group="run", choices=("auto", "float32", "bfloat16", "float16"))
    size: str = setting("auto", "auto: the hidden size, layers and dropout chosen from the text's length, its "
                        "vocabulary and the throughput measured at the start, for the budget (--time or --steps); "
                        "or a fixed size such as 2x512. --hidden-size, --layers and --dropout given win",
                        group="model", metavar="auto|LAYERSxHIDDEN")
    compile: bool = setting(False, "torch.compile the training model: a slower start for faster steps where it "
                            "pays (GPUs above all; see benchmarks/README.md for the CPU)", group="run")
    quiet: bool = setting(False, "print only results and errors", short="-q", group="run")
    allow_new_text: bool = setting(False, "when resuming, continue on a different text with the old vocabulary",
                                   group="run")

    @staticmethod
    def steps_replace_time(settings: dict, explicit: set[str]) -> None:
        """The one place that decides it: a step count given without a time budget replaces the
        default budget (settings and explicit are updated in place)."""
        if "steps" in explicit and "time_budget" not in explicit:
            settings["time_budget"] = None
            explicit.add("time_budget")

    def validate(self) -> None:
        """SettingError naming the field for a value out of its range, the declared ranges and those
        that depend on another setting: where it means something and the arithmetic carries it (a
        learning rate of 1e308 overflows float32)."""
        settings.check(self)
        # AdamW scales the weights by 1 - lr * weight_decay each step: past 1 that flips their sign. The
        # bound allows for rounding: 1/lr is not exact (1e-9 and 1e9 multiply to 1, yet 1/1e-9 < 1e9).
        check_range("weight_decay", self.weight_decay, 0, (1 + 1e-12) / self.lr,
                    f"0 or more, and at most 1/lr = {number(1 / self.lr)} (each step scales the weights by "
                    f"1 - lr x weight decay)")
        if self.ema == 1:
            raise SettingError("ema", "must be 0 (off) or a decay in (0, 1) such as 0.999, got 1")
        if self.val_fraction == 1:
            raise SettingError("val_fraction", "must be in [0, 1), got 1")
        try:
            sizing.parse_size(self.size)
        except ValueError as e:
            raise SettingError("size", str(e).split(" ", 1)[1]) from None
        for name in ("out", "name", "cache_dir"):
            if getattr(self, name) == "":
                raise SettingError(name, "must not be empty")
        if self.name is not None and not is_plain_name(self.name):
            raise SettingError("name", f"must be one plain folder name (no /, no .., not hidden), got "
                                       f"{self.name!r}; the run folder becomes checkpoints/NAME")


def model_setting_error(e: ValueError) -> SettingError:
    """ModelConfig.validate's ValueError ("hidden_size must be ...") as the setting's error."""
    field, _, problem = str(e).partition(" ")
    return SettingError(field, problem)


def check_resumable_in_place(file: str, folder: str) -> None:
    """A run resumed in its checkpoint's folder writes latest.pt, best.pt and step files there: refuse
    where that would replace files of the user's (a loose checkpoint in a folder of other things) or the
    run's own later checkpoints (a step file or best.pt behind latest.pt)."""
    if not is_run_folder(folder):
        _, _, others = survey(folder)
        raise UsageError(f"{file} is not in a training run's folder ({folder} also holds "
                         f"{', '.join(others[:3])}{' and more' if len(others) > 3 else ''}, which textgen did not "
                         f"write); continue the run in a new folder with {{out}}", out=...)
    latest = os.path.join(folder, LATEST)
    if os.path.exists(latest) and not os.path.samefile(file, latest):
        raise UsageError(f"{file} is behind {latest}: resuming it in {folder} would replace that run's later "
                         f"checkpoints; continue from it in a new folder with {{out}}, or resume {latest}",
                         out=...)


def check_steps_left(ckpt: dict, config: TrainConfig, resume: str) -> None:
    """A resumed run that has nothing left to do says so, before a folder is claimed or a file read."""
    done = int(ckpt["step"])
    if config.time_budget is None:
        goal = config.steps
    elif ckpt.get("planned") and ckpt.get("plan") is not None:
        goal = min(int(ckpt["plan"]), config.steps)      # a budget already turned into its plan of steps
    else:
        return
    if done >= goal:
        raise SettingError("steps", f"must be more than the {done:,} steps {resume} has already trained "
                                    f"(it has nothing left to do at {goal:,})")


def is_plain_name(name: str) -> bool:
    """One folder name: no separator, not . or .., not hidden, no control characters."""
    return (bool(name) and name not in (".", "..") and not name.startswith(".") and "/" not in name
            and os.sep not in name and (os.altsep or "/") not in name and name.isprintable())


# --dtype names whose LSTM matrix products run in low precision (the rest stays float32).
LOW_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}

# float16 gradients underflow without loss scaling: when the scale has been halved
# this far (from 65536) the gradients overflow whatever the scale, i.e. training diverged.
MIN_LOSS_SCALE = 1.0
# loss.png is redrawn at a report only when this long has passed since the last drawing (and at the
# last step): a drawing costs 0.3-0.7 s of the run's time on these CPUs, and a short run's
# validations can come seconds apart.
PLOT_EVERY_S = 30.0

# Settings that may change when resuming; changing any other is refused.
RESUMABLE_CHANGES = {"steps", "time_budget", "eval_every", "save_every", "log_every", "lr", "min_lr_ratio",
                     "warmup_steps", "grad_clip", "weight_decay", "sample_length", "keep", "device", "quiet",
                     "allow_new_text", "text", "out", "name", "cache_dir", "eval_chars",
                     "dtype", "compile"}


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    return schedule.lr_at(step, total, config.lr, config.warmup_steps, config.min_lr_ratio)


def corpus_stem(text_path: str | None) -> str:
    """A tidy folder-name stem for a corpus spec (a folder or glob too)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(text_path or DEFAULT_CORPUS)))[0]
    # At most 100 characters (a folder name has 255 bytes, and the date follows); never hidden.
    return re.sub(r"[^\w .-]+", "_", stem).strip("_ .")[:100].strip() or "corpus"


@dataclass
class IntervalSums:
    """Partial sums of the current log interval; saved so a resumed run logs the same numbers."""
    loss: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    chars: int = 0
    seconds: float = 0.0
    skipped: int = 0                 # float16 steps skipped because the gradients overflowed


@dataclass
class TrainResult:
    run_dir: str
    step: int
    best_val_loss: float | None
    history: list = field(default_factory=list)
    stopped_by: str | None = None


class Trainer:
    """One training run: builds or restores everything, then `run()` trains it."""

    def __init__(self, model_config: ModelConfig | None, config: TrainConfig, resume: str | None = None,
                 explicit: set[str] = frozenset(), log=print, overwrite: bool = False):
        self.dist = dist_util.context()
        self.log = log if self.dist.is_main else (lambda message: None)   # only rank 0 speaks
        if overwrite and resume is not None:
            raise UsageError("{overwrite} starts a new run; it cannot be combined with {resume}", overwrite=True,
                             resume=...)
        self.explicit = set(explicit)
        ckpt = None
        if resume is not None:
            ckpt = checkpoint.load(resolve(resume, prefer_best=False))
            config = self._merge_resumed_config(ckpt, config, explicit)
            model_config = self._check_architecture(ckpt, model_config, explicit)
        config.validate()
        if ckpt is not None:
            check_steps_left(ckpt, config, resume)
        self.config = config
        # The folder is claimed (locked, checked) before anything is prepared, so a second trainer
        # or a run into a finished run's folder stops at once, having written nothing.
        self.folder = self._claim_folder(resume, overwrite)
        self.run_dir = self.folder.path
        try:
            self._build(model_config, ckpt, resume)
        except BaseException:
            self.folder.abandon()
            raise

    def _claim_folder(self, resume: str | None, overwrite: bool) -> RunFolder:
        """Rank 0 chooses and locks the run folder; every rank learns the folder or the refusal."""
        cfg = self.config
        error, path, created = None, None, False
        if self.dist.is_main:
            try:
                resumed_from = checkpoint_folder(resume) if resume is not None else None
                if cfg.out or cfg.name:
                    path = cfg.out or run_path(cfg.name)
                elif resumed_from is not None:
                    path = resumed_from
                else:
                    path, created = default_path(corpus_stem(cfg.text)), True
                folder = RunFolder(path, created=created)
                # Resuming with --out elsewhere forks the run: the new folder gets a new run's rules.
                same = resumed_from is not None and os.path.realpath(path) == os.path.realpath(resumed_from)
                if same:
                    check_resumable_in_place(resolve(resume, prefer_best=False), path)
                folder.claim(new_run=not same, overwrite=overwrite)
            except UsageError as e:
                error = e                        # sent whole, so every front end still words it
        error, path = self.dist.broadcast((error, path))
        if error:
            raise error
        return folder if self.dist.is_main else RunFolder(path)      # other ranks never write it

    def _build(self, model_config: ModelConfig | None, ckpt: dict | None, resume: str | None) -> None:
        config = self.config
        self.device = self.dist.device if self.dist.enabled else resolve_device(config.device)
        config.dtype = resolve_dtype(config.dtype, self.device)     # recorded as resolved, so resume keeps it

        self.corpus = self._prepare_corpus(ckpt)
        self.tokenizer = tokenizer = self.corpus.tokenizer
        tokens = self.corpus.tokens                                   # a read-only memory map
        self.train_tokens, self.val_tokens = split_tokens(tokens, config.val_fraction)
        if config.eval_chars:
            if config.eval_chars < config.seq_len < len(self.val_tokens):     # the cut, not the tail, is short
                raise SettingError("eval_chars", f"must be 0 (all of the tail) or at least one chunk, "
                                                 f"{config.seq_len:,} characters, got {config.eval_chars:,}")
            # The same leading stretch of the tail every time, so evaluations stay comparable.
            self.val_tokens = self.val_tokens[: config.eval_chars + 1]
        check_trainable(len(self.train_tokens), len(self.val_tokens), config.batch_size, config.seq_len,
                        config.val_fraction)

        if ckpt is None:
            seed_everything(config.seed)
            model_config = model_config or ModelConfig(vocab_size=tokenizer.vocab_size)
            model_config.vocab_size = tokenizer.vocab_size
            try:
                model_config.resolve_head()
                model_config.validate()
                self._choose_size(model_config)
            except ValueError as e:
                raise model_setting_error(e) from None
            check_fits(model_config.num_parameters(), self.device)      # before a byte is allocated
            self.model = CharLSTM(model_config)
            if isinstance(self.model.head, AdaptiveHead):
                counts = np.bincount(self.train_tokens, minlength=tokenizer.vocab_size)
                self.model.head.order_by_frequency(torch.from_numpy(counts))
        else:
            self.model, _ = checkpoint.build_model(ckpt, averaged=False)
        self.model.to(self.device)
        # The average of the weights (--ema): validated, sampled and saved for generation; trained never.
        self.averaged = None
        if config.ema > 0:
            self.averaged = copy.deepcopy(self.model).eval().requires_grad_(False)
            if ckpt is not None and ckpt.get("averaged_model") is not None:
                self.averaged.load_state_dict(ckpt["averaged_model"])
        self.model.lstm.matmul_dtype = LOW_PRECISION.get(config.dtype)
        # float16's narrow range needs loss scaling: the scaler multiplies the loss before
        # backward, skips a step whose gradients overflowed and adapts the scale. It is a
        # no-op for float32 and bfloat16 (which has float32's range).
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.dtype == "float16")
        if config.dtype == "float16" and self.device.type == "cpu" and self.dist.is_main:
            print("warning: --dtype float16 is meant for GPUs; most CPUs emulate it, slower than float32 "
                  "(use bfloat16 or float32 on a CPU)", file=sys.stderr)
        if config.dtype == "bfloat16" and self.device.type == "cpu" and not native_bf16(self.device) \
                and self.dist.is_main:
            # auto never chooses it here; a user who asks gets trained, but told why it crawls.
            print("warning: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so --dtype bfloat16 is emulated "
                  "and many times slower than float32 (30x on an AMD EPYC Zen 3); --dtype auto picks float32 here",
                  file=sys.stderr)
        self.model_config = self.model.config
        self.optimizer = self._make_optimizer()
        first, count = self.dist.stream_share(config.batch_size)
        self.loader = StreamLoader(self.train_tokens, config.batch_size, config.seq_len,
                                   first_stream=first, num_streams=count)
        self.train_model = self.dist.wrap(self.model)
        if config.compile:
            # Compiles on the first steps (a slow start); the checkpoint keeps the plain model's state.
            self.train_model = torch.compile(self.train_model)

        self.step, self.elapsed = 0, 0.0
        self.budget = schedule.TimeBudget.start(config.time_budget, config.steps)
        self.best_val_loss: float | None = None
        self.history: list[dict] = []
        self.sums = IntervalSums()
        self.state = None
        self.first_loss: float | None = None
        self._last_report: int | None = None           # the step of the last sample and plot
        self._last_plot: float | None = None            # perf_counter() of the last drawing (or the run's start)
        self.last_saved_step: int | None = None
        if ckpt is not None:
            self._restore(ckpt, resume)
        self.stop_signal: int | None = None

    def _choose_size(self, model_config: ModelConfig) -> None:
        """--size: the hidden size, layers and dropout the user did not give, chosen for this text
        and budget (sizing.py), and one log line saying what and why."""
        cfg = self.config
        fixed = {name: getattr(model_config, name)
                 for name in ("layers", "hidden_size", "dropout", *sizing.REGULARISERS) if name in self.explicit}
        given = sizing.parse_size(cfg.size)
        if given is not None:
            fixed.setdefault("layers", given[0])
            fixed.setdefault("hidden_size", given[1])
        if {"layers", "hidden_size", "dropout"} <= fixed.keys():
            model_config.layers, model_config.hidden_size, model_config.dropout = \
                fixed["layers"], fixed["hidden_size"], fixed["dropout"]
            return
        chars_per_step = cfg.batch_size * cfg.seq_len
        timed = sizing.timed_config(model_config, fixed)
        measured: dict[tuple[int, int], float] = {}

        def seconds_per_unit(config: ModelConfig) -> float:
            """Seconds per character and unit of cost: timed on the main process, the same on every one."""
            key = (config.layers, config.hidden_size)
            if key not in measured:
                seconds = None
                if self.dist.is_main:
                    streams = self.dist.stream_share(cfg.batch_size)[1]
                    size = streams * (cfg.seq_len + 1)
                    window = np.resize(self.train_tokens[:size], size).astype(np.int64)
                    window = torch.from_numpy(window).view(streams, cfg.seq_len + 1).to(self.device)
                    seconds = sizing.measure(config, (window[:, :-1], window[:, 1:]), LOW_PRECISION.get(cfg.dtype),
                                             self.device) / self.dist.world_size
                measured[key] = self.dist.broadcast(seconds)
            return measured[key]

        def budget_chars(config: ModelConfig) -> float:
            by_steps = cfg.steps * chars_per_step
            if cfg.time_budget is None:
                return by_steps
            # Models smaller than the reference use the cores less well than its time scaled by
            # multiply-adds says (0.1 MB of code: 416 passes planned, 292 read, and dropout one step
            # too high), and they take a fraction of a second to time themselves.
            own = sizing.cost_per_char(config) < sizing.cost_per_char(timed)
            per_unit = seconds_per_unit(config if own else timed)
            by_time = sizing.TRAINING_SHARE * cfg.time_budget / (per_unit * sizing.cost_per_char(config))
            return min(by_steps, by_time)

        choice = sizing.choose(model_config, len(self.train_tokens), budget_chars, fixed)
        model_config.layers, model_config.hidden_size, model_config.dropout = \
            choice.layers, choice.hidden_size, choice.dropout
        for name, value in (choice.regularisers or {}).items():
            setattr(model_config, name, value)
        self.log(f"size {cfg.size}: {choice.layers}x{choice.hidden_size}, dropout {choice.dropout:g}; "
                 f"{choice.reason}")

    # -- resume checks -------------------------------------------------------------

    def _merge_resumed_config(self, ckpt: dict, config: TrainConfig, explicit: set[str]) -> TrainConfig:
        saved = dict(ckpt.get("train_config", {}))
        saved.setdefault("ema", 0.0)         # written before the average existed: resume as it was
        saved.setdefault("size", "auto")
        known = {f.name for f in fields(TrainConfig)}
        merged = TrainConfig(**{k: v for k, v in saved.items() if k in known})
        # Where the run lives is where its checkpoint is now (it may have been moved), unless
        # --out or --name says otherwise on this command line.
        merged.out, merged.name = None, None
        refused, changed = [], []
        for name in explicit & known:
            new, old = getattr(config, name), getattr(merged, name)
            if new == old:
                continue
            if name in RESUMABLE_CHANGES:
                changed.append(f"{name} {old} -> {new}")
                setattr(merged, name, new)
            else:
                refused.append(f"{name} (checkpoint {old}, now {new})")
        if refused:
            raise UsageError("cannot change these settings when resuming: " + ", ".join(refused)
                             + "; drop those flags or start a new run")
        if changed:
            self.log("resuming with changed settings: " + ", ".join(changed))
        return merged

    def _check_architecture(self, ckpt: dict, model_config: ModelConfig | None, explicit: set[str]) -> ModelConfig:
        saved = checkpoint.model_config_of(ckpt)
        if model_config is not None:
            same = lambda a, b: tuple(a) == tuple(b) if isinstance(a, (list, tuple)) else a == b  # noqa: E731
            diffs = [f"{f.name} (checkpoint {getattr(saved, f.name)}, now {getattr(model_config, f.name)})"
                     for f in fields(ModelConfig) if f.name != "vocab_size"
                     and f.name in explicit and not same(getattr(saved, f.name), getattr(model_config, f.name))]
            if diffs:
                raise UsageError("cannot change the architecture when resuming: " + ", ".join(diffs)
                                 + "; drop those flags or start a new run")
        return saved

    def _prepare_corpus(self, ckpt: dict | None) -> PreparedCorpus:
        cfg = self.config
        spec = cfg.text or DEFAULT_CORPUS
        imposed = CharTokenizer.from_dict(ckpt["vocab"]) if ckpt is not None else None

        def attempt() -> PreparedCorpus:
            try:
                return prepare(spec, cfg.cache_dir, cfg.separator, tokenizer=imposed,
                               progress=self.dist.is_main and not cfg.quiet and sys.stderr.isatty(),
                               log=None if cfg.quiet else self.log)
            except UnknownCharactersError as e:
                if not cfg.allow_new_text:
                    raise UsageError(f"{spec} is not the text this run was trained on (it has characters the "
                                     f"run never saw); pass that text, or start a new run") from None
                raise UsageError(f"{spec}: {e}; a resumed run cannot learn new characters, "
                                 f"start a new run instead") from None

        # Rank 0 prepares the cache; the other ranks then find it ready.
        if self.dist.is_main:
            try:
                corpus = attempt()
            finally:
                self.dist.barrier()
        else:
            self.dist.barrier()
            corpus = attempt()
        if ckpt is not None:
            self._check_corpus(ckpt, corpus)
        return corpus

    def _check_corpus(self, ckpt: dict, corpus: PreparedCorpus) -> None:
        old = ckpt.get("corpus", {})
        if old.get("sha256") == corpus.sha256:
            return
        if self.config.allow_new_text:
            self.log(f"continuing on new text {corpus.info['path']} with the checkpoint's vocabulary")
            return
        raise UsageError(
            f"{corpus.info['path']} is not the text this run was trained on ({old.get('path', 'unknown')}, "
            f"sha256 {old.get('sha256', '?')[:12]}); pass that text, or {{allow_new_text}} to continue on this one",
            allow_new_text=True
        )

    # -- setup ---------------------------------------------------------------------

    def _make_optimizer(self) -> torch.optim.Optimizer:
        # No weight decay on biases and the embedding: decaying them only hurts.
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and not n.startswith("embedding")]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2 or n.startswith("embedding")]
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.config.lr, betas=(0.9, 0.99),
                                 foreach=self.device.type != "cpu" or None)

    def _restore(self, ckpt: dict, resume: str) -> None:
        """The run's state from its checkpoint, whose fields checkpoint.load has checked by type; what
        their contents cannot restore (a signed file with a state of another shape) is one sentence."""
        @contextlib.contextmanager
        def restoring(name: str):
            try:
                yield
            except (TypeError, ValueError, KeyError, IndexError, OverflowError, RuntimeError) as e:
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise UsageError(f"{resume} is not a valid textgen checkpoint: its {name} cannot be restored "
                                 f"({reason})") from None

        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UsageError(f"{resume}: its optimizer state does not match the model ({e})") from None
        self.step = int(ckpt["step"])
        self.budget.load_state_dict(ckpt, self.config.steps)
        self.elapsed = float(ckpt.get("elapsed", 0.0))
        self.best_val_loss = ckpt.get("best_val_loss")
        self.history = list(ckpt.get("history", []))
        self.first_loss = ckpt.get("first_loss")
        with restoring("interval_sums"):
            self.sums = IntervalSums(**ckpt.get("interval_sums", {}))
        with restoring("loader"):
            self.loader.load_state_dict(ckpt["loader"]["train"])
        carried = ckpt.get("carried_state")
        if carried:
            shape = (self.config.batch_size, self.model_config.hidden_size)
            if len(carried) != self.model_config.layers or any(tuple(t.shape) != shape for pair in carried for t in pair):
                raise UsageError(f"{resume} is not a valid textgen checkpoint: its carried_state does not hold "
                                 f"{self.model_config.layers} layers of {shape[0]} x {shape[1]} states")
            first, count = self.dist.stream_share(self.config.batch_size)
            self.state = tuple((h[first:first + count].to(self.device), c[first:first + count].to(self.device))
                               for h, c in carried)
        if "rng" in ckpt:
            with restoring("rng"):
                set_rng_state(ckpt["rng"])
        if ckpt.get("scaler") and self.scaler.is_enabled():
            with restoring("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        self.last_saved_step = self.step

    # -- one step, one evaluation, one save ------------------------------------------

    def train_step(self) -> tuple[float, float | None]:
        x, y = self.loader.next_batch()
        x = torch.from_numpy(x).to(self.device, non_blocking=True)
        y = torch.from_numpy(y).to(self.device, non_blocking=True)
        lr = lr_at(self.step, self.budget.plan, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss, state = self.train_model(x, self.restart_one_stream(self.state), targets=y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)               # clip the true gradients, not the scaled ones
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip))
        loss_value = self.dist.mean(loss.detach())
        overflow = self.scaler.is_enabled() and not math.isfinite(grad_norm)
        self._guard(loss_value, 0.0 if overflow else grad_norm)
        self.scaler.step(self.optimizer)                    # with float16, skipped if the gradients overflowed
        self.scaler.update()
        if overflow and self.scaler.get_scale() < MIN_LOSS_SCALE:
            raise StopTraining(f"training diverged at step {self.step + 1}: the float16 gradients overflow at "
                               f"every loss scale; latest.pt still holds the last good state. Try {{dtype}} "
                               f"(or float32), or a lower {{lr}}", dtype="bfloat16", lr=...)
        self.state = detach_state(state)
        self.step += 1
        if self.averaged is not None and not overflow:
            self._update_average()
        return loss_value, None if overflow else grad_norm

    @torch.no_grad()
    def _update_average(self) -> None:
        """averaged += (1 - decay) (weights - averaged), the decay ramping up over the first
        steps ((1 + t) / (10 + t)) so early, random weights are soon forgotten."""
        decay = min(self.config.ema, (1 + self.step) / (10 + self.step))
        averaged = list(self.averaged.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in self.model.parameters()], 1 - decay)

    def restart_one_stream(self, state):
        """Zero the carried state of one stream per step, each stream in turn.

        The state otherwise carries across chunks for the whole run, so without
        this the model would meet a zero state only at step 1, while generation
        always starts from one: samples from a short prompt could derail into
        noise it never learned to leave. Resetting stream (step mod B) keeps every
        stream's text contiguous and its context long (B chunks between resets).
        The index is global, so a distributed run resets the same stream.
        """
        if state is None:
            return None
        first, count = self.dist.stream_share(self.config.batch_size)
        stream = self.step % self.config.batch_size - first
        if not 0 <= stream < count:
            return state
        restarted = []
        for h, c in state:
            h, c = h.clone(), c.clone()
            h[stream] = 0
            c[stream] = 0
            restarted.append((h, c))
        return tuple(restarted)

    def _guard(self, loss: float, grad_norm: float) -> None:
        """Stop before a diverged step can reach the parameters or a checkpoint."""
        if self.first_loss is None:
            self.first_loss = loss
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise StopTraining(f"training diverged at step {self.step + 1}: the loss is {loss} "
                               f"(gradient norm {grad_norm}); latest.pt still holds the last good state. "
                               f"Try a lower {{lr}} or {{grad_clip}}", lr=..., grad_clip=...)
        if loss > 3 * self.first_loss + 1:
            raise StopTraining(f"training diverged at step {self.step + 1}: the loss {loss:.3f} is far above "
                               f"its starting value {self.first_loss:.3f}; latest.pt still holds the last good "
                               f"state. Try a lower {{lr}}", lr=...)

    def validate(self) -> float | None:
        if len(self.val_tokens) <= self.config.seq_len:
            return None
        # Validation is float32 whatever --dtype says, so its figures compare across runs and with textgen-eval.
        model = self.inference_model()
        matmul_dtype, model.lstm.matmul_dtype = model.lstm.matmul_dtype, None
        try:
            total, count = cross_entropy(model, self.val_tokens, self.config.batch_size, self.config.seq_len,
                                         self.device, shard=self.dist.shard_for_eval())
        finally:
            model.lstm.matmul_dtype = matmul_dtype
        total, count = self.dist.sum_pair(total, count)
        return total / count

    def inference_model(self):
        """What validation scores and samples: the averaged weights where --ema keeps them."""
        return self.averaged if self.averaged is not None else self.model

    def payload(self) -> dict:
        return {
            "format": checkpoint.FORMAT, "version": checkpoint.FORMAT_VERSION,
            "model_config": asdict(self.model_config), "train_config": asdict(self.config),
            "vocab": self.tokenizer.to_dict(), "corpus": self.corpus.info,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "step": self.step, **self.budget.state_dict(), "elapsed": self.elapsed,
            "loader": {"train": self.loader.state_dict(), "val": {"position": 0}},
            "carried_state": self.dist.gather_state(self.state),
            "rng": rng_state(), "history": self.history, "best_val_loss": self.best_val_loss,
            "first_loss": self.first_loss, "interval_sums": asdict(self.sums),
            "scaler": self.scaler.state_dict(),
            "averaged_model": self.averaged.state_dict() if self.averaged is not None else None,
            "created": datetime.now().isoformat(timespec="seconds"), "torch_version": str(torch.__version__),
        }

    def save(self, is_best: bool = False) -> None:
        payload = self.payload()                       # every rank joins the state gather
        if not self.dist.is_main:
            return
        try:
            checkpoint.save_run_checkpoint(payload, self.run_dir, self.config.keep, is_best)
        except (OutputError, files.WriteError) as e:   # a full disk, or a folder that stopped taking files
            raise StopTraining(f"{e}; free some space or fix the folder, then resume with {{resume}}",
                               resume=self.run_dir) from None
        self.last_saved_step = self.step
        if is_best:
            self.log(f"step {self.step}: new best val loss {self.best_val_loss:.4f} "
                     f"({self.best_val_loss / LN2:.3f} bits/char), saved best.pt")

    # -- the loop --------------------------------------------------------------------

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.folder.release()              # the process's end would too; a Python caller goes on living

    def _run(self) -> TrainResult:
        cfg = self.config
        self._begin()
        bar, stopped_by = self._progress_bar(), None
        self._install_signal_handlers()
        try:
            while self.step < self.budget.plan:
                self._timed_train_step()                       # one optimizer step, counted into the interval
                if not self.budget.planned:
                    self._plan_budget(bar)
                elif self.budget.replans < len(schedule.REPLAN_AT):
                    self._replan_budget(bar)
                out_of_time, stop_requested = self._stop_decided()
                last_step = self.step >= self.budget.plan or out_of_time
                val_loss = None
                report = False
                if self.step % self.eval_interval() == 0 or last_step:
                    report = self._report_due() or last_step
                    with self._out_of_memory_is_a_stop():
                        val_loss = self._evaluate_and_sample(report)
                if self.step % cfg.log_every == 0 or last_step or val_loss is not None:
                    self._log_interval(val_loss, bar)
                if report:
                    self._plot(last_step)
                is_best = self._note_best(val_loss)
                if self.step % cfg.save_every == 0 or last_step or is_best or stop_requested:
                    self.save(is_best)
                if bar is not None:
                    bar.update(1)
                self._step_started = time.perf_counter()       # validation and saving are not step time
                if stop_requested:
                    stopped_by = signal.Signals(self.stop_signal).name
                    self.log(f"stopped by {stopped_by} at step {self.step}; checkpoint saved. "
                             f"Resume with: python train.py --resume {self.run_dir}")
                    break
                if out_of_time:
                    self.log(f"time budget of {seconds_text(cfg.time_budget)} spent at step {self.step}")
                    break
        finally:
            self._restore_signal_handlers()
            if bar is not None:
                bar.close()
        if stopped_by is None:
            self.log(f"done: step {self.step}, {self.elapsed:.0f}s"
                     + (f", best val loss {self.best_val_loss:.4f} ({self.best_val_loss / LN2:.3f} bits/char)"
                        if self.best_val_loss is not None else "")
                     + f"; checkpoints in {self.run_dir}")
        return TrainResult(self.run_dir, self.step, self.best_val_loss, self.history, stopped_by)

    def _begin(self) -> None:
        """The run's first writes and its opening log line; starts the clock."""
        cfg = self.config
        if self.dist.is_main:
            self.folder.start()                 # --overwrite removes the old run here, not earlier
            self.folder.write_config(self._config_doc())
            # A resumed run replays any steps logged after its checkpoint: drop those lines first.
            self.folder.write_metrics(self.history)
        self.log(f"run folder {self.run_dir}: {self.model.num_parameters() / 1e6:.2f}M parameters, vocabulary "
                 f"{self.tokenizer.vocab_size}, {len(self.train_tokens):,} training and "
                 f"{len(self.val_tokens):,} validation characters, device {self.device} ({cfg.dtype}, "
                 f"{describe_step_path(self.device)})"
                 + (f", {self.dist.world_size} processes" if self.dist.enabled else ""))
        if self.step > 0:
            self.log(f"resuming at step {self.step} of {self.budget.plan}")
        self._run_started = self._step_started = time.perf_counter()
        self._elapsed_before = self.elapsed     # a resumed run's clock goes on from its checkpoint
        self._step_seconds = 0.0                # time in training steps alone, this process

    def _timed_train_step(self) -> None:
        with self._out_of_memory_is_a_stop():
            loss, grad_norm = self.train_step()
        now = time.perf_counter()
        self.elapsed = self._elapsed_before + (now - self._run_started)
        s = self.sums
        s.loss += loss
        if grad_norm is None:
            s.skipped += 1                  # a float16 overflow: no update, no norm
        else:
            s.grad_norm += grad_norm
        s.steps += 1
        s.chars += self.config.batch_size * self.config.seq_len
        s.seconds += now - self._step_started
        self._step_seconds += now - self._step_started

    def _stop_decided(self) -> tuple[bool, bool]:
        """(out of time, stop requested), decided together: a signal or the clock on one rank
        stops every rank at the same step."""
        out_of_time, stop_requested = self.dist.any(
            self.config.time_budget is not None and self.elapsed >= self.config.time_budget,
            self.stop_signal is not None)
        if stop_requested and self.stop_signal is None:
            self.stop_signal = signal.SIGTERM       # another rank was signalled
        return out_of_time, stop_requested

    def _note_best(self, val_loss: float | None) -> bool:
        if val_loss is None or (self.best_val_loss is not None and val_loss >= self.best_val_loss):
            return False
        self.best_val_loss = val_loss
        return True

    def _plan_budget(self, bar=None) -> None:
        """After a warm-up, turn the time budget into a step count (fixed from then on).

        A run resumed before its plan was made simply starts timing again where it stands."""
        cfg, budget = self.config, self.budget
        if not budget.first_plan_due(self.step, self.elapsed, cfg.warmup_steps):
            return
        _, eval_seconds = self._timed_validation()
        seconds_per_step = budget.make_plan(self.step, self.elapsed, eval_seconds, cfg.eval_every, self.dist.broadcast)
        how_often = "" if cfg.eval_every else f" ({budget.validations} in the run)"
        self.log(f"time budget {seconds_text(cfg.time_budget)}: {seconds_per_step * 1000:.0f} ms/step, "
                 f"validation {eval_seconds:.1f}s{how_often}; planning {budget.plan} steps")
        if bar is not None:
            bar.total = budget.plan
            bar.refresh()

    def _replan_budget(self, bar=None) -> None:
        """At a tenth, four tenths and seven tenths of the plan: time the steps again since the last
        timing and plan anew. The first steps of a run are often slower (caches, the allocator, a
        busy machine settling), and a plan made from them alone left 10-15% of a 15-minute budget
        unused; one re-timing at a tenth still left 6% (54 s) when the steps sped up later."""
        timed = self.budget.retime(self.step, self.elapsed, self._step_seconds, self.config.eval_every,
                                   self.dist.broadcast)
        if timed is None or timed[2] == self.budget.plan:
            return
        seconds_per_step, steps, old = timed
        self.log(f"time budget: {seconds_per_step * 1000:.0f} ms/step over the last {steps} "
                 f"steps; planning {self.budget.plan} steps (was {old})")
        if bar is not None:
            bar.total = self.budget.plan
            bar.refresh()

    def eval_interval(self) -> int:
        b = self.budget
        return schedule.eval_interval(self.config.eval_every, b.plan, b.planned, b.validations)

    def _report_due(self) -> bool:
        """Whether this validation also samples and plots: about EVALS_PER_RUN times a run however
        often it validates (every validation where --eval-every sets the pace)."""
        every = schedule.eval_interval(self.config.eval_every, self.budget.plan, self.budget.planned)
        if self._last_report is not None and self.step // every == self._last_report // every:
            return False                # only the first validation past each multiple of `every`
        self._last_report = self.step
        return True

    def _timed_validation(self):
        start = time.perf_counter()
        value = self.validate()
        return value, time.perf_counter() - start

    def _evaluate_and_sample(self, report: bool) -> float | None:
        val_loss = self.validate()
        if report and self.dist.is_main and self.config.sample_length > 0:
            prompt = "\n" if "\n" in self.tokenizer.chars else ""
            text = sample(self.inference_model(), self.tokenizer, prompt,
                          SampleConfig(length=self.config.sample_length, temperature=0.8,
                                       seed=self.config.seed + self.step))[0]
            self.log(f"--- sample at step {self.step} ---\n{text.strip()}\n---")
        return val_loss

    def _log_interval(self, val_loss: float | None, bar) -> None:
        s = self.sums
        if s.steps == 0:
            return
        entry = {
            "step": self.step, "time": round(self.elapsed, 3), "train_loss": s.loss / s.steps,
            "val_loss": val_loss, "lr": lr_at(self.step - 1, self.budget.plan, self.config),
            "grad_norm": s.grad_norm / max(1, s.steps - s.skipped),
            # s.chars counts every rank's streams already (batch_size is the global number)
            "chars_per_sec": round(s.chars / max(s.seconds, 1e-9)),
            "epoch": round(self.loader.epoch, 4),
        }
        if self.scaler.is_enabled():
            entry["loss_scale"], entry["skipped_steps"] = self.scaler.get_scale(), s.skipped
        self.history.append(entry)
        self.sums = IntervalSums()
        if not self.dist.is_main:
            return
        self.folder.append_metrics(entry)
        val = f"{val_loss:.4f}" if val_loss is not None else "-"
        if bar is not None:
            bar.set_postfix_str(f"loss {entry['train_loss']:.4f} val {val} lr {entry['lr']:.2e} "
                                f"{entry['chars_per_sec']:,} chars/s", refresh=False)
        if bar is None or val_loss is not None:
            if not self.config.quiet or val_loss is not None:
                self.log(f"step {self.step}/{self.budget.plan} loss {entry['train_loss']:.4f} val {val} "
                         f"lr {entry['lr']:.2e} grad {entry['grad_norm']:.2f} {entry['chars_per_sec']:,} chars/s")

    def _plot(self, last_step: bool) -> None:
        now = time.perf_counter()
        since = now - (self._run_started if self._last_plot is None else self._last_plot)
        if not self.dist.is_main or not (last_step or since >= PLOT_EVERY_S):
            return
        self._last_plot = now
        self.folder.plot()

    def _config_doc(self) -> dict:
        return {"model": asdict(self.model_config), "train": asdict(self.config), "corpus": self.corpus.info,
                "parameters": self.model.num_parameters(), "torch_version": str(torch.__version__)}

    @contextlib.contextmanager
    def _out_of_memory_is_a_stop(self):
        """An allocation that fails mid-run ends it with one sentence; the checkpoints already on
        disk are untouched (nothing is written after the failure)."""
        try:
            yield
        except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and not any(
                    words in message.lower() for words in ("out of memory", "can't allocate", "cannot allocate")):
                raise
            kept = (f"the checkpoint of step {self.last_saved_step} in {self.run_dir} is kept"
                    if self.last_saved_step is not None else "no checkpoint had been written yet")
            raise StopTraining(f"ran out of memory at step {self.step + 1} ({message[:120]}); {kept}; "
                               f"try a smaller {{batch_size}} or model", batch_size=...) from None

    def _progress_bar(self):
        if self.config.quiet or not self.dist.is_main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=self.budget.plan, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr)

    # -- signals ----------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        self._old_handlers = {}
        if not hasattr(signal, "SIGTERM") or not _in_main_thread():
            return

        def request_stop(signum, frame):
            if self.stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now; checkpoints are written atomically
            if self.stop_signal is not None:
                return          # asked again (a dead launcher's threads each send SIGTERM): once is enough
            self.stop_signal = signum
            if self.dist.is_main:
                sys.stderr.write(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
                                 f"(Ctrl-C again to quit at once)\n")

        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, request_stop)

    def _restore_signal_handlers(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()
