"""The Python API: load a model, generate from it, train one.

    import textgen
    model = textgen.load("checkpoints/my-run")
    print(model.generate("ROMEO:", length=200, temperature=0.8, seed=1))
    textgen.train("my.txt", steps=1000)

Every argument is checked at the door, its type included (a setting's by its declared kind, in
settings.check): a wrong one is a UsageError naming the argument, never a TypeError from deep inside.

Imports checkpoint, model, sampling and settings at the top, devices and export.safetensors_files inside
load(), training only inside train(). Never cli.
"""
from __future__ import annotations

import functools
import os
from dataclasses import fields

from .checkpoint import load_model
from .errors import UsageError, check_range
from .lstm import ModelConfig
from .generation.generator import Generator
from .generation.sampling import SampleConfig
from .settings import check, shown


def _speaks_arguments(function):
    """The API raises textgen's errors as they are (their str() names settings as arguments:
    lr, resume='runs/a'), without the frames of textgen's own code behind them."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except UsageError as e:
            raise e.with_traceback(None) from None
    return wrapper


def _path_or_none(name: str, value, optional: bool = True):
    """A path argument as a str (a pathlib.Path is one too); anything else is the argument's error."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise UsageError(f"{{{name}}} must be a path (a str or pathlib.Path){' or None' if optional else ''}, "
                         f"got {shown(value)}", **{name: ...})
    return value


def _check_unknown(unknown) -> None:
    if unknown not in ("error", "skip"):
        raise UsageError(f"{{unknown}} must be 'error' or 'skip', got {shown(unknown)}", unknown=...)


class TextModel:
    """A trained model with its vocabulary, ready to generate."""

    def __init__(self, model, tokenizer, checkpoint: dict, path: str):
        self.model, self.tokenizer, self.checkpoint, self.path = model, tokenizer, checkpoint, path

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @_speaks_arguments
    def generator(self, seed: int | None = None, num_samples: int = 1, unknown: str = "error",
                  style: str | None = None) -> Generator:
        """A Generator whose state carries from one feed/generate call to the next (style: the model's
        style it reads and writes in, for a model trained with styles)."""
        SampleConfig(seed=seed, num_samples=num_samples, style=style).validate()      # their types and ranges
        _check_unknown(unknown)
        return Generator(self.model, self.tokenizer, num_samples=num_samples, seed=seed, unknown=unknown, style=style)

    @property
    def styles(self) -> list[str]:
        """The styles the model learnt (trained with styles=True on a folder of files), else []."""
        return list(self.config.style_names)

    @_speaks_arguments
    def generate(self, prompt: str = "", unknown: str = "error", prime: str | None = None, adapt: bool = False,
                 adapt_lr: float | None = None, **sampling):
        """The continuation of prompt (without the prompt); a list of strings when num_samples > 1.

        sampling: SampleConfig's settings, with their defaults there: length (500), temperature (0.8),
        top_k, top_p, seed, num_samples (1), stop, style, max_copy (never repeat more than this many characters
        of the training text verbatim). unknown: "error" or "skip" for prompt characters the model never
        saw. prime: a document (text) read into the state before the prompt; adapt=True (or an adapt_lr)
        first adapts a copy of the weights on it, as textgen-eval --adapt does."""
        from .evaluate import ADAPT_LR
        from .generation.priming import prime as read_prime
        extra = set(sampling) - {f.name for f in fields(SampleConfig)}
        if extra:
            raise UsageError(f"unknown sampling settings: {', '.join(sorted(extra))}; they are "
                             f"{', '.join(f.name for f in fields(SampleConfig))}")
        for name, value in (("prompt", prompt), ("prime", "" if prime is None else prime)):
            if not isinstance(value, str):
                raise UsageError(f"{{{name}}} must be text, got {shown(value)}", **{name: ...})
        if not isinstance(adapt, bool):
            raise UsageError(f"{{adapt}} must be True or False, got {shown(adapt)}", adapt=...)
        if adapt_lr is not None:
            check_range("adapt_lr", adapt_lr, 1e-9, 10.0, "from 1e-9 to 10 (an RMSprop step size)")
        if (adapt or adapt_lr is not None) and not prime:
            raise UsageError("{adapt} adapts the weights on the {prime} document; give one", adapt=..., prime=...)
        _check_unknown(unknown)
        config = SampleConfig(**sampling)
        config.validate()
        gen = self.generator(config.seed, config.num_samples, unknown, config.style)
        if config.max_copy is not None:
            gen.copy_index = self.copy_index
        if prime:
            read_prime(gen, prime, adapt=adapt or adapt_lr is not None, lr=adapt_lr or ADAPT_LR)
        gen.feed(prompt)
        texts = gen.generate(config)
        return texts[0] if config.num_samples == 1 else texts

    @property
    def copy_index(self):
        """The training text's CopyIndex (built once per text and cached beside its token cache); a
        UsageError says why where there is none (the text is gone or has changed)."""
        if not hasattr(self, "_copy_index"):
            from .copy_index import for_checkpoint
            self._copy_index, self._copy_note = for_checkpoint(self.checkpoint, self.tokenizer)
        if self._copy_index is None:
            raise UsageError(f"the copy index needs the training text, and {self._copy_note}")
        return self._copy_index

    @_speaks_arguments
    def copy_report(self, text) -> dict:
        """The longest span of text (or of each of a list of texts) found verbatim in the training text:
        {"length", "text", "sample", "start" (in the text), "offset" (in the training text), "line", "path"}."""
        texts = [text] if isinstance(text, str) else text
        if not (isinstance(texts, list) and all(isinstance(t, str) for t in texts)):
            raise UsageError(f"{{text}} must be text or a list of texts, got {shown(text)}", text=...)
        return self.copy_index.report(texts)

    def __repr__(self) -> str:
        c = self.config
        return (f"TextModel({self.path!r}, {c.layers}x{c.hidden_size}, vocabulary {c.vocab_size}, "
                f"step {self.checkpoint['step']})")


@_speaks_arguments
def load(path: str, device: str = "cpu", prefer_best: bool = True) -> TextModel:
    """A run folder (best.pt, else latest.pt) or a checkpoint file, on any device; or a safetensors
    export (``textgen export RUN --format safetensors``: its folder or its model.safetensors)."""
    from .devices import resolve_device
    path = _path_or_none("path", path, optional=False)
    import torch
    device = str(device) if isinstance(device, torch.device) else device
    if not isinstance(device, str):
        raise UsageError(f"{{device}} must be a device name such as 'cpu' or 'cuda', got {shown(device)}", device=...)
    from .export.safetensors_files import is_export, read
    if is_export(path):          # no checkpoint digest here: read() checks every tensor against config.json
        model, tokenizer, config = read(path)
        return TextModel(model.to(resolve_device(device)), tokenizer, config, path)
    model, tokenizer, ckpt = load_model(path, prefer_best=prefer_best, device=resolve_device(device))
    return TextModel(model, tokenizer, ckpt, path)


@_speaks_arguments
def train(text: str | None = None, resume: str | None = None, log=print, overwrite: bool = False,
          **settings) -> TextModel:
    """Train on a text file (None: the embedded corpus) and return the best model.

    settings are ModelConfig and TrainConfig fields, e.g. hidden_size=256,
    steps=1000, time_budget=60, out="checkpoints/mine". A folder that already
    holds a run is refused unless overwrite=True (or resume= continues it).
    """
    from .training import TrainConfig, build_run, train
    model_fields = {f.name for f in fields(ModelConfig)} - {"vocab_size", "style_names"}   # those two: from the text
    train_fields = {f.name for f in fields(TrainConfig)} - {"text"}
    unknown = set(settings) - model_fields - train_fields
    if unknown:
        raise UsageError(f"unknown training settings: {', '.join(sorted(unknown))}")
    text, resume = _path_or_none("text", text), _path_or_none("resume", resume)
    settings.update({name: _path_or_none(name, settings[name]) for name in ("out", "cache_dir") if name in settings})
    if not isinstance(overwrite, bool):
        raise UsageError(f"{{overwrite}} must be True or False, got {shown(overwrite)}", overwrite=...)
    if not callable(log):
        raise UsageError(f"{{log}} must be a function that takes a line of text, got {shown(log)}", log=...)
    model_config = ModelConfig(vocab_size=1, **{k: v for k, v in settings.items() if k in model_fields})
    check(model_config)                       # the types of the model's settings, before a folder is made
    train_settings = {k: v for k, v in settings.items() if k in train_fields}
    explicit = set(settings) | ({"text"} if text else set())
    TrainConfig.steps_replace_time(train_settings, explicit)
    train_config = TrainConfig(text=text, **train_settings)
    result = train(build_run(model_config, train_config, resume=resume, explicit=explicit, log=log,
                             overwrite=overwrite), log=log)
    return load(result.run_dir)


@_speaks_arguments
def generate(model_or_path, prompt: str = "", **kwargs):
    """One call: generate(\"checkpoints/run\", \"ROMEO:\", length=200)."""
    model = model_or_path if isinstance(model_or_path, TextModel) else load(model_or_path)
    return model.generate(prompt, **kwargs)
