"""The exceptions for what a user can cause, each one sentence.

Entry points print the message and exit with code 2 (``UsageError``: a bad file,
flag, setting or checkpoint) or 1 (``StopTraining``, ``OutputError``: the run or
the output could not go on); anything else that escapes is a bug in textgen and
keeps its traceback.

Imports nothing of ours; every module may import it.
"""
from __future__ import annotations

import math
import re


class Worded(Exception):
    """One sentence that may name settings, each front end in its own words.

    In the message, {lr} stands for the setting lr; mentions gives each named setting's value, or
    ... where only its name is meant: UsageError("continue it with {resume}", resume="runs/a") reads
    `--resume runs/a` on the command line, `resume='runs/a'` in the Python API (str()) and
    `"resume": "runs/a"` over HTTP. Nothing translates messages back: each front end calls worded()."""

    def __init__(self, message: str, **mentions):
        self.template, self.mentions = message, mentions
        super().__init__(self.worded(api_words))

    def worded(self, speak) -> str:
        """The sentence with each named setting in speak(name, value)'s words."""
        sentence = self.template
        for name, value in self.mentions.items():      # only {name} of a mention: other braces stay as they are
            sentence = sentence.replace("{" + name + "}", speak(name, value))
        return sentence

    def __reduce__(self):                  # pickled whole (between ranks), not as its rendered text
        return _rebuild, (type(self), self.template, self.mentions)


def _rebuild(cls, template: str, mentions: dict):
    error = Exception.__new__(cls)
    Worded.__init__(error, template, **mentions)
    if issubclass(cls, SettingError):
        error.field = next(iter(mentions))
        error.problem = template.split(" ", 1)[1]
    return error


def api_words(name: str, value) -> str:
    """A setting as the Python API names it: lr, or resume='runs/a' with its value."""
    return name if value is ... else f"{name}={value!r}"


class UsageError(Worded):
    """A mistake a user can make (a bad file, flag, setting or checkpoint): exit 2."""


class SettingError(UsageError, ValueError):
    """A setting's value outside its range. It names the setting by its field (``top_p``),
    and each front end words it in its own terms (``--top-p`` on the command line,
    ``top_p`` in the Python API, ``"top_p"`` over HTTP)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{{{field}}} {problem}", **{field: ...})


class StopTraining(Worded):
    """Training ended early for a reason the user must hear (divergence, disk full, out of memory): exit 1."""


class OutputError(Exception):
    """Output could not be written (a full disk, a device that refused the bytes): exit 1."""


def check_finite(values: dict) -> None:
    """NaN and infinity are never a valid setting: refuse them by the setting's field."""
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError(name, f"must be a finite number, got {value}")


def number(x) -> str:
    """A bound as a person writes it: 1e-09 -> 1e-9, 1000000.0 -> 1e6, 0.5 -> 0.5."""
    return re.sub(r"e([+-])0*(\d)", lambda m: "e" + ("-" if m[1] == "-" else "") + m[2], f"{x:g}")


def check_range(field: str, value, low=None, high=None, what: str = "", low_open: bool = False) -> None:
    """value must lie in [low, high] (low itself excluded with low_open), or a SettingError
    naming field says `must be {what}`. None passes (an unset optional setting).

    Every number a user gives passes through here, so that one the arithmetic cannot carry
    (a temperature of 1e308 overflows float32) is refused before any work, as NaN is."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise SettingError(field, f"must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    if below or (high is not None and value > high):
        shown = number(value) if isinstance(value, float) else f"{value}"
        raise SettingError(field, f"must be {what}, got {shown}")
