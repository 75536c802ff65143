"""train.py --workers: the same command as several one-thread data-parallel processes on this machine.

The ranks start under torch.distributed's elastic launcher, the code torchrun runs, and
train as under torchrun (distributed.py): rank 0 prints and writes the run folder, and
DistributedDataParallel averages the gradients. Where one process uses its threads poorly
(many small operations) single-threaded ranks can use the cores better; on this project's
2-core AMD EPYC Zen 3 they run level with one two-threaded process (benchmarks/README.md,
"Data-parallel"), so one process stays the default.

Imports the standard library and ``errors``, and torch's launcher only when it launches;
only ``cli`` imports this module.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import uuid

from ..errors import UsageError

LAUNCHED = "TEXTGEN_LAUNCHED"       # set in the ranks this module starts
MIN_STREAMS_PER_WORKER = 8           # fewer streams a rank and its products get too small to pay


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_rank() -> int | None:
    """This process's rank when this module started it, else None."""
    return int(os.environ.get("RANK", "0")) if os.environ.get(LAUNCHED) else None


def follow_parent() -> None:
    """In a rank this module started: SIGTERM when the launching process dies, even by SIGKILL,
    so that a killed train.py does not leave its ranks training on (they save and stop)."""
    if not os.environ.get(LAUNCHED) or not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:                   # the launcher died before the call above
        os.kill(os.getpid(), signal.SIGTERM)


def cores_available() -> int:
    """The cores this run may use: the CPUs it may run on, or OMP_NUM_THREADS where that is set
    (a user who runs two trainings side by side with OMP_NUM_THREADS=1 has shared the cores out)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    threads = os.environ.get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:
        cores = min(cores, int(threads))
    return max(1, cores)


def parse_workers(text: str) -> str | int:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"--workers must be auto or a whole number of processes of at least 1, got {text!r}")
    return value


def resumed_batch_size(resume: str) -> int | None:
    """The --batch-size a run folder was trained with (its config.json), without loading torch."""
    folder = resume if os.path.isdir(resume) else os.path.dirname(os.path.abspath(resume))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            return int(json.load(f)["train"]["batch_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def choose_workers(requested: str | int, device_type: str, batch_size: int | None) -> int:
    """How many processes to train with: 1 inside a rank, on a GPU, or where the streams do not divide."""
    if under_torchrun():
        if requested not in ("auto", 1) and not os.environ.get(LAUNCHED):
            raise UsageError("--workers starts processes itself; under torchrun, give --nproc_per_node instead")
        return 1
    if requested != "auto":
        if requested > 1 and device_type != "cpu":
            raise UsageError(f"--workers {requested} runs CPU processes; for several GPUs launch train.py with "
                             "torchrun (see README)")
        if batch_size is not None and batch_size % requested:
            raise UsageError(f"--batch-size {batch_size} must be divisible by --workers {requested} so every "
                             "process reads the same number of streams")
        return requested
    if device_type != "cpu" or batch_size is None:       # None: a resumed run whose batch size is unknown
        return 1
    for workers in range(cores_available(), 1, -1):
        if batch_size % workers == 0 and batch_size // workers >= MIN_STREAMS_PER_WORKER:
            return workers
    return 1


def run_ranks(workers: int, argv: list[str]) -> int:
    """The same train command as `workers` one-thread processes; returns rank 0's exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    # The launcher reports a failing rank with a page of its own; the rank has already said why.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL + 1)
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    saved = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "PYTHONPATH", LAUNCHED)}
    os.environ.update({
        "OMP_NUM_THREADS": "1", LAUNCHED: str(workers),
        # the ranks run `python -m textgen train`, which must import this very package
        "PYTHONPATH": os.pathsep.join(p for p in (package_parent, saved["PYTHONPATH"]) if p)})
    try:
        with tempfile.TemporaryDirectory(prefix="textgen-ranks-") as logs:
            config = LaunchConfig(
                min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=str(uuid.uuid4()),
                rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                logs_specs=DefaultLogsSpecs(log_dir=logs),
                # A stopped run finishes its step and saves; give it time before the launcher kills it.
                shutdown_timeout=300)
            try:
                elastic_launch(config, sys.executable)("-m", "textgen", "train", *argv)
            except ChildFailedError as e:
                # Rank 0's status where it exited by itself; a rank the launcher killed (a negative
                # status) after another one failed did not: that one's status says what went wrong.
                failures = e.failures
                statuses = [failures[rank].exitcode for rank in sorted(failures, key=lambda r: (r != 0, r))]
                return next((status for status in statuses if status > 0), 1)
            except SignalException:
                pass    # the launcher passed the signal on; the ranks finished their step, saved and said so
        return 0
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
