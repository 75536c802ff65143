"""How a run trains: TrainConfig (each setting declared once, with its default, help and range), and the
checks that read only settings and a checkpoint's dict: which settings a resume may change, whether
the architecture matches, whether a checkpoint may be resumed where it lies, whether steps are left.

Imports settings, errors, run_folder, schedule and the model's config; never the loop.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields

import torch

from .. import checkpoint, settings
from . import sizing
from ..errors import SettingError, UsageError, check_range, number
from ..lstm import ModelConfig
from ..run_folder import LATEST, is_run_folder, survey
from .schedule import lr_at as schedule_lr_at
from ..settings import parse_duration, setting, unescape

DEFAULT_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
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
    styles: bool = setting(False, "learn a style per file of a folder or glob corpus, named by its file name without "
                           "the extension; generate with --style NAME", group="data")
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


def corpus_stem(text_path: str | None) -> str:
    """A tidy folder-name stem for a corpus spec (a folder or glob too)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(text_path or DEFAULT_CORPUS)))[0]
    # At most 100 characters (a folder name has 255 bytes, and the date follows); never hidden.
    return re.sub(r"[^\w .-]+", "_", stem).strip("_ .")[:100].strip() or "corpus"


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

# Settings that may change when resuming; changing any other is refused.
RESUMABLE_CHANGES = {"steps", "time_budget", "eval_every", "save_every", "log_every", "lr", "min_lr_ratio",
                     "warmup_steps", "grad_clip", "weight_decay", "sample_length", "keep", "device", "quiet",
                     "allow_new_text", "text", "out", "name", "cache_dir", "eval_chars",
                     "dtype", "compile"}


def lr_at(step: int, total: int, config: TrainConfig) -> float:
    return schedule_lr_at(step, total, config.lr, config.warmup_steps, config.min_lr_ratio)


def merge_resumed_config(ckpt: dict, config: TrainConfig, explicit: set[str], log) -> TrainConfig:
    """The checkpoint's settings, with those given on this command line that a resume may change;
    one sentence naming any it may not."""
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
        log("resuming with changed settings: " + ", ".join(changed))
    return merged


def check_architecture(ckpt: dict, model_config: ModelConfig | None, explicit: set[str]) -> ModelConfig:
    """The checkpoint's architecture; one sentence if this command line asks for another."""
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
