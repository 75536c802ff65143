"""The one exception type for mistakes a user can make (a bad file, flag or checkpoint).

Entry points print its message as one sentence and exit with code 2; anything
else that escapes is a bug in textgen and keeps its traceback.

Imports nothing of ours; every module may import it.
"""


class UsageError(Exception):
    pass


class StopTraining(Exception):
    """Training ended early for a reason the user must hear (divergence, disk full, out of memory): exit 1."""


def check_finite(values: dict) -> None:
    """NaN and infinity are never a valid setting: refuse them by the flag's name."""
    import math
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
