"""train.py and `textgen train`: the flags of ModelConfig and TrainConfig, the run started here or in
--workers processes, and the training log on stdout.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields

from .. import settings
from ..settings import flag_of
from ..errors import UsageError
from .common import Formatter, Parser, add_version, explicit_flags, refuse_together, run_main, silence_stdout


def train_parser() -> argparse.ArgumentParser:
    """train.py's flags: every setting of ModelConfig and TrainConfig, built from their declarations,
    and the few that say what to do rather than how (TEXT, --resume, --overwrite, --workers)."""
    from ..lstm import ModelConfig
    from ..training import TrainConfig
    p = Parser(
        prog="train.py", formatter_class=Formatter,
        description="Train a character-level LSTM on a UTF-8 text file.",
        epilog="examples:\n  python train.py                      # the embedded default corpus\n"
               "  python train.py my.txt --time 15m     # your file, for 15 minutes\n"
               "  python train.py --resume checkpoints/my-20260101-120000")
    p.add_argument("text", nargs="?", default=None, metavar="TEXT",
                   help="UTF-8 text to train on: a file, a folder of files or a quoted glob "
                        "(default: the embedded corpus in corpora/)")
    groups = {name: p.add_argument_group(name) for name in ("model", "regularisation", "data", "optimisation", "run")}
    settings.add_flags(p, TrainConfig, only=("size",), groups=groups)
    settings.add_flags(p, ModelConfig, groups=groups)
    settings.add_flags(p, TrainConfig, only=tuple(f.name for f in settings.declared(TrainConfig)
                                                  if f.name not in ("size", "quiet")), groups=groups)
    run = groups["run"]
    run.add_argument("--workers", default=os.environ.get("TEXTGEN_WORKERS", "1"), metavar="auto|N",
                     help="data-parallel processes on this machine's CPU, one thread each, sharing the --batch-size "
                          "streams (auto: one per core, or per OMP_NUM_THREADS where set; 1 on a GPU); "
                          "$TEXTGEN_WORKERS sets the default. On 2 cores it runs level with one process "
                          "(benchmarks/README.md)")
    run.add_argument("--resume", default=None, metavar="RUN_FOLDER_OR_FILE", help="continue a run from its latest.pt")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in a folder that holds an old one, deleting the old run's files first "
                          "(without it, such a folder is refused)")
    add_version(p)
    settings.add_flags(p, TrainConfig, only=("quiet",))
    return p


def train_main(argv=None) -> int:
    return run_main(_train, argv)


def _train(argv) -> int:
    from ..lstm import ModelConfig
    from ..training import TrainConfig
    parser = train_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    if args.steps is None:
        args.steps = TrainConfig.steps
    values = vars(args)
    TrainConfig.steps_replace_time(values, explicit)
    model_config = ModelConfig(vocab_size=1, **{f.name: values[f.name] for f in settings.declared(ModelConfig)})
    train_config = TrainConfig(**{f.name: values[f.name] for f in fields(TrainConfig)})
    refuse_together(explicit, TRAIN_CONFLICTS)
    if args.allow_new_text and args.resume is None:
        raise UsageError("--allow-new-text is for --resume (a new run trains on any text); drop it or add --resume")
    if args.val_fraction == 0 and "eval_chars" in explicit:
        raise UsageError("--eval-chars and --val-fraction 0 cannot be used together: --val-fraction 0 keeps no "
                         "text to validate on")
    if args.head == "full" and explicit & {"cutoffs", "head_div"}:
        raise UsageError(f"{flag_of(min(explicit & {'cutoffs', 'head_div'}))} shapes the adaptive head, and "
                         f"--head full has none; drop it or pass --head adaptive")
    if args.resume is None:
        try:
            model_config.validate(vocabulary_known=False)
        except ValueError as e:
            from ..training import model_setting_error
            raise model_setting_error(e) from None
    from ..training.launch import follow_parent
    follow_parent()
    previous = _stop_on_sigterm()
    try:
        return _train_here(args, argv, explicit, model_config, train_config)
    finally:
        if previous is not None:
            import signal
            signal.signal(signal.SIGTERM, previous)


def _train_here(args, argv, explicit, model_config, train_config) -> int:
    from ..training import distributed
    from ..training import build_run, train
    workers = _workers(args, explicit)
    if workers > 1:
        from ..training.launch import run_ranks
        return run_ranks(workers, list(sys.argv[1:] if argv is None else argv))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts > 0 and args.resume is None:
        # torchrun restarted the job after a failure: carry on from the run folder's latest.pt.
        from ..run_folder import LATEST, run_path
        folder = args.out or (run_path(args.name) if args.name else None)
        if folder is None:
            raise UsageError("an elastic restart needs a fixed run folder: pass --out or --name to train.py")
        if os.path.isfile(os.path.join(folder, LATEST)):
            # The same command line runs again: its --overwrite was for the first attempt, not this one.
            args.resume, args.overwrite = folder, False
    try:
        train(build_run(model_config, train_config, resume=args.resume, explicit=explicit, log=_log,
                        overwrite=args.overwrite), log=_log)
    except BaseException:
        distributed.shutdown(clean=False)
        raise
    distributed.shutdown()
    return 0


TRAIN_CONFLICTS = (
    ("out", "name", "both name the run folder (--name N is --out checkpoints/N); pass one"),
    ("resume", "overwrite", "--overwrite starts a new run and --resume continues one"),
)


def _stop_on_sigterm():
    """Until the trainer installs its own handlers (which finish the step and save), SIGTERM stops
    setup as Ctrl-C does: one sentence, and a run folder made for this run and still empty goes.
    Returns the handler it replaced (None off the main thread), for the caller to put back."""
    import signal
    import threading

    def interrupted(signum, frame):
        raise KeyboardInterrupt
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, interrupted)
    return None


def _workers(args, explicit: set[str]) -> int:
    """How many processes --workers asks for on this machine (1 inside a rank)."""
    from ..training import launch
    try:
        requested = launch.parse_workers(args.workers)
    except UsageError as e:
        if "workers" in explicit or "TEXTGEN_WORKERS" not in os.environ:
            raise
        raise UsageError(str(e).replace("--workers", "$TEXTGEN_WORKERS", 1)) from None
    most = 4 * (os.cpu_count() or 1)
    if requested != "auto" and requested > most:
        raise UsageError(f"--workers must be at most {most} on this machine ({os.cpu_count()} cores), got {requested}")
    if launch.under_torchrun() or requested == 1:
        return launch.choose_workers(requested, "cpu", None)
    from ..devices import resolve_device
    batch_size = args.batch_size
    if args.resume is not None and "batch_size" not in explicit:
        batch_size = launch.resumed_batch_size(args.resume)
    return launch.choose_workers(requested, resolve_device(args.device).type, batch_size)


def _log(message: str) -> None:
    """Training messages on stdout, above the progress bar when there is one.

    A standard output that stops taking text (> /dev/full, a full disk) does not stop the run: it
    is said once on stderr, and training goes on with its log in metrics.jsonl."""
    from tqdm import tqdm
    global _log_lost
    if _log_lost or sys.stdout is None:          # closed (>&-): the log is in metrics.jsonl
        return
    try:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()
    except OSError as e:
        _log_lost = True
        silence_stdout()
        print(f"warning: cannot write the training log to standard output ({(e.strerror or str(e)).lower()}); "
              f"training goes on, and metrics.jsonl in the run folder keeps the log", file=sys.stderr, flush=True)


_log_lost = False


