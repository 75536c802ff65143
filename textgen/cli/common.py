"""What every command shares: the parser that reads negative numbers as values and builds flags from
the settings' declarations, the words a message uses for a setting (--flag), and run_main, which turns
every user mistake into one sentence on stderr and exit code 2 (``UsageError``), a run stopped for a
reason (divergence, full disk) into exit code 1.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys

from .. import __version__
from ..settings import flag_of
from ..errors import OutputError, UsageError, check_range
from ..tokenizer import UnknownCharactersError


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # "(default: None)" tells nothing: such a flag's help says what happens without it.
        hidden = action.default is None or getattr(action, "hide_default", False)
        return action.help if hidden else super()._get_help_string(action)


# A value that starts with a minus sign: argparse would take "-5m" or "-5,10" for a flag.
_NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (argparse's usage block would be many), exit 2,
    and a negative number is a value like any other (--time -5m reaches --time's own range check)."""

    def parse_known_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        glued = []
        for arg in args:
            flag = glued[-1] if glued and "--" not in glued[:-1] else ""
            if flag.startswith("--") and flag != "--" and "=" not in flag and _NEGATIVE_VALUE.match(arg):
                glued[-1] = f"{flag}={arg}"
            else:
                glued.append(arg)
        return super().parse_known_args(glued, namespace)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def explicit_flags(parser: argparse.ArgumentParser, argv) -> set[str]:
    """The destinations the user actually set on the command line (not left at their default).

    argparse fills in a default only where the namespace has no value yet, so a namespace that
    starts with a marker in every destination keeps the marker exactly where no flag was given."""
    unset = object()
    marked = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args(argv))})
    parsed = vars(parser.parse_args(argv, namespace=marked))
    # An optional positional (TEXT) is filled with its default None whatever the namespace holds;
    # no value typed on a command line parses to None.
    return {dest for dest, value in parsed.items() if value is not unset and value is not None}


def refuse_together(explicit: set[str], pairs) -> None:
    """Flags that contradict each other are refused, never one of them silently ignored.
    pairs: (dest, dest, why) where each dest counts as given when it is in explicit."""
    for first, second, why in pairs:
        if first in explicit and second in explicit:
            raise UsageError(f"{flag_of(first)} and {flag_of(second)} cannot be used together: {why}")


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action="version", version=f"textgen {__version__}")


def add_checkpoint(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", default=None, metavar="RUN_FOLDER_OR_FILE",
                        help="a run folder (uses best.pt, else latest.pt) or a checkpoint file "
                             "(default: the most recent run under checkpoints/)")


def add_unknown(parser: argparse.ArgumentParser, skip_does: str) -> None:
    parser.add_argument("--unknown", choices=("error", "skip"), default="error",
                        help=f"characters the model never saw: stop with an error naming them, or {skip_does}")


def add_adapt(parser: argparse.ArgumentParser, adapt_does: str) -> None:
    """--adapt and --adapt-lr, the same in textgen-eval and generate.py (evaluate.adapt does the work)."""
    from ..evaluate import ADAPT_LR
    parser.add_argument("--adapt", action="store_true", help=adapt_does)
    parser.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                        help="step size of --adapt (default %g); implies --adapt" % ADAPT_LR)


def adapt_lr_of(args) -> float | None:
    """--adapt's step size, checked; None without --adapt or --adapt-lr."""
    from ..evaluate import ADAPT_LR
    if not (args.adapt or args.adapt_lr is not None):
        return None
    adapt_lr = ADAPT_LR if args.adapt_lr is None else args.adapt_lr
    check_range("adapt_lr", adapt_lr, 1e-9, 10.0, "from 1e-9 to 10 (an RMSprop step size)")
    return adapt_lr


def add_common(parser: argparse.ArgumentParser) -> None:
    add_version(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def cli_words(name: str, value) -> str:
    """A setting as the command line names it: --lr, --resume runs/a, --overwrite."""
    return flag_of(name) if value is ... or value is True else f"{flag_of(name)} {value}"


def run_main(main, argv) -> int:
    """Run a command; turn user errors into one sentence and an exit code."""
    from ..errors import StopTraining
    from ..lstm import KernelUnavailable
    try:
        return main(argv) or 0
    except UsageError as e:
        say_error(e.worded(cli_words))
        return 2
    except UnknownCharactersError as e:
        say_error(e)
        return 2
    except StopTraining as e:
        say_error(e.worded(cli_words))
        return 1
    except (KernelUnavailable, OutputError) as e:
        say_error(e)
        return 1
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        silence_stdout()
        return 0
    except OSError as e:
        if e.errno not in _CANNOT_WRITE:
            raise
        # Standard output on a full disk or a device that refuses it (> /dev/full).
        say_error(f"cannot write the output: {(e.strerror or str(e)).lower()}")
        silence_stdout()
        return 1
    except MemoryError:
        say_error("out of memory; choose a smaller model, --batch-size or --num-samples")
        return 1
    except KeyboardInterrupt:
        # A new line first where ^C was echoed on a terminal; elsewhere the sentence stays one line.
        newline = "\n" if sys.stderr is not None and sys.stderr.isatty() else ""
        print(f"{newline}interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130


_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)


def silence_stdout() -> None:
    """Point standard output at /dev/null, so that what Python still holds for it can be flushed at
    exit without a second error about the same full disk."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass          # not a real file (a test's capture): nothing is flushed at exit


def say_error(e: BaseException | str) -> None:
    from ..training.launch import launched_rank
    if not launched_rank() and sys.stderr is not None:   # of the ranks --workers started, rank 0 speaks
        # One line, whatever the sentence quotes: a newline in a path shows as \n.
        print("error: " + str(e).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


