"""Loss curves of one or more runs, against steps and against wall time, into a PNG.

matplotlib is an optional extra (`pip install -e ".[plot]"`); without it the
command says so and training simply skips its plot. Lines of metrics.jsonl that cannot be read
are skipped with one note, and the rest is drawn.

Imports errors and files (the one writer); never training or cli.
"""
from __future__ import annotations

import json
import os
import sys

from . import files
from .errors import UsageError
from .files import refusal


def read_metrics(run_dir: str, note=None) -> list[dict]:
    """The run's metrics, one dict a line, each with a numeric step and train_loss.

    A last line without its newline is one a running trainer is still appending, and is left out.
    A line textgen cannot read (not UTF-8, not JSON, not an object, no step or train_loss) is
    skipped, and note(message) hears once how many there were and the first (default: stderr):
    a plot of the good lines serves better than none while a trainer writes, or after an edit."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} has no metrics.jsonl; is it a textgen run folder?")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise UsageError(f"cannot read {path} ({(e.strerror or str(e)).lower()})") from None
    rows, skipped = [], []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            problem = _problem(row)
        except UnicodeDecodeError:
            problem = "is not UTF-8"
        except ValueError:
            problem = "is not JSON"
        if problem:
            skipped.append(f"line {number} {problem}")
        else:
            rows.append(row)
    if skipped:
        (note or _note)(f"{path}: skipped {len(skipped)} line{'s' if len(skipped) > 1 else ''} that textgen cannot "
                        f"read ({skipped[0]}{', ...' if len(skipped) > 1 else ''}); the plot shows the others")
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(row) -> str | None:
    """Why a parsed metrics line cannot be plotted, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    for key in ("step", "train_loss"):
        if not _is_number(row.get(key)):
            return f"has no number for {key}"
    for key in ("time", "val_loss"):
        if row.get(key) is not None and not _is_number(row[key]):
            return f"has a {key} that is not a number"
    return None


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def plot_runs(run_dirs: list[str], output: str | None = None, replace: str = "user") -> str:
    """Draw the runs' curves into output (default: loss.png in the first run folder, which that run
    owns). replace is the writer's rule for what may stand at output (files.output)."""
    try:
        # The Figure API with the Agg canvas, not pyplot: no GUI backend is looked for, nothing
        # global is kept between plots, and the import costs half of pyplot's (0.5 s against 1 s).
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError('plotting needs matplotlib: pip install -e ".[plot]"') from None
    own = os.path.join(run_dirs[0], "loss.png")
    if output is None or os.path.realpath(output) == os.path.realpath(own):
        output, replace = output or own, "own"        # the first run's own picture, drawn again
    reason = refusal(output, replace)
    if reason:
        raise UsageError(reason)             # before the metrics are read or anything is drawn
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for run_dir in run_dirs:
        rows = read_metrics(run_dir)
        name = os.path.basename(os.path.normpath(run_dir))
        for ax, x in zip(axes, ("step", "time")):
            drawn = [r for r in rows if r.get(x) is not None]             # a line may lack its time
            val = [r for r in drawn if r.get("val_loss") is not None]
            line, = ax.plot([r[x] for r in drawn], [r["train_loss"] for r in drawn], alpha=0.6, label=f"{name} train")
            ax.plot([r[x] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(),
                    label=f"{name} val")
    for ax, label in zip(axes, ("step", "seconds")):
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/char)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with files.output(output, "wb", replace) as f:     # renamed into place: a reader sees old or new
        fig.savefig(f, format="png", dpi=100)
    return output


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False

