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


class UsageError(Exception):
    pass


class SettingError(UsageError):
    """A setting's value outside its range. It names the setting by its field (``top_p``),
    and each front end words it in its own terms (``--top-p`` on the command line,
    ``top_p`` in the Python API, ``"top_p"`` over HTTP) with ``worded``."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")

    def worded(self, name_of) -> str:
        return f"{name_of(self.field)} {self.problem}"


class StopTraining(Exception):
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
