"""Loss curves of one or more runs, against steps and against wall time, into a PNG.

matplotlib is an optional extra (`pip install -e ".[plot]"`); without it the
command says so and training simply skips its plot. Lines of metrics.jsonl that cannot be read
are skipped with one note, and the rest is drawn.

Imports errors, files (the one writer) and run_folder (the layout, and reading metrics); never training or cli.
"""
from __future__ import annotations

import os

from . import files
from .errors import UsageError
from .files import refusal
from .run_folder import PLOT, read_metrics


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
    own = os.path.join(run_dirs[0], PLOT)
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

