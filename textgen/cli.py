"""Command-line entry points: parse flags, check them, call the package.

Every user mistake ends as one sentence on stderr and exit code 2
(``UsageError``); a run stopped for a reason (divergence, full disk) exits 1.
The same flag names mean the same thing in every command.

The entry points' module: imports what each command needs, lazily; nothing in the package imports it
except __main__.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from dataclasses import fields

from . import __version__, settings
from .settings import flag_of
from .errors import OutputError, SettingError, UsageError, check_range
from .tokenizer import UnknownCharactersError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    def _get_help_string(self, action):
        # "(default: None)" tells nothing: such a flag's help says what happens without it.
        hidden = action.default is None or getattr(action, "hide_default", False)
        return action.help if hidden else super()._get_help_string(action)


# A value that starts with a minus sign: argparse would take "-5m" or "-5,10" for a flag.
_NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
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


def add_common(parser: argparse.ArgumentParser) -> None:
    add_version(parser)
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only results and errors")


def cli_words(name: str, value) -> str:
    """A setting as the command line names it: --lr, --resume runs/a, --overwrite."""
    return flag_of(name) if value is ... or value is True else f"{flag_of(name)} {value}"


def run_main(main, argv) -> int:
    """Run a command; turn user errors into one sentence and an exit code."""
    from .errors import StopTraining
    from .model import KernelUnavailable
    try:
        return main(argv) or 0
    except UsageError as e:
        _say_error(e.worded(cli_words))
        return 2
    except UnknownCharactersError as e:
        _say_error(e)
        return 2
    except StopTraining as e:
        _say_error(e.worded(cli_words))
        return 1
    except (KernelUnavailable, OutputError) as e:
        _say_error(e)
        return 1
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): not an error of ours
        _silence_stdout()
        return 0
    except OSError as e:
        if e.errno not in _CANNOT_WRITE:
            raise
        # Standard output on a full disk or a device that refuses it (> /dev/full).
        _say_error(f"cannot write the output: {(e.strerror or str(e)).lower()}")
        _silence_stdout()
        return 1
    except MemoryError:
        _say_error("out of memory; choose a smaller model, --batch-size or --num-samples")
        return 1
    except KeyboardInterrupt:
        # A new line first where ^C was echoed on a terminal; elsewhere the sentence stays one line.
        newline = "\n" if sys.stderr is not None and sys.stderr.isatty() else ""
        print(f"{newline}interrupted; checkpoints already written are intact", file=sys.stderr)
        return 130


_CANNOT_WRITE = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG)


def _silence_stdout() -> None:
    """Point standard output at /dev/null, so that what Python still holds for it can be flushed at
    exit without a second error about the same full disk."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass          # not a real file (a test's capture): nothing is flushed at exit


def _say_error(e: BaseException | str) -> None:
    from .launch import launched_rank
    if not launched_rank() and sys.stderr is not None:   # of the ranks --workers started, rank 0 speaks
        # One line, whatever the sentence quotes: a newline in a path shows as \n.
        print("error: " + str(e).replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)


# ---------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------

def train_parser() -> argparse.ArgumentParser:
    """train.py's flags: every setting of ModelConfig and TrainConfig, built from their declarations,
    and the few that say what to do rather than how (TEXT, --resume, --overwrite, --workers)."""
    from .model import ModelConfig
    from .training import TrainConfig
    p = _Parser(
        prog="train.py", formatter_class=_Formatter,
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
    from .model import ModelConfig
    from .training import TrainConfig
    parser = train_parser()
    args = parser.parse_args(argv)
    explicit = explicit_flags(parser, argv)
    if args.steps is None:
        args.steps = TrainConfig.steps
    values = vars(args)
    TrainConfig.steps_replace_time(values, explicit)
    model_config = ModelConfig(vocab_size=1, **{f.name: values[f.name] for f in fields(ModelConfig)
                                               if f.name != "vocab_size"})
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
            from .training import model_setting_error
            raise model_setting_error(e) from None
    from .launch import follow_parent
    follow_parent()
    previous = _stop_on_sigterm()
    try:
        return _train_here(args, argv, explicit, model_config, train_config)
    finally:
        if previous is not None:
            import signal
            signal.signal(signal.SIGTERM, previous)


def _train_here(args, argv, explicit, model_config, train_config) -> int:
    from . import distributed
    from .training import Trainer
    workers = _workers(args, explicit)
    if workers > 1:
        from .launch import run_ranks
        return run_ranks(workers, list(sys.argv[1:] if argv is None else argv))
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if restarts > 0 and args.resume is None:
        # torchrun restarted the job after a failure: carry on from the run folder's latest.pt.
        from .run_folder import LATEST, run_path
        folder = args.out or (run_path(args.name) if args.name else None)
        if folder is None:
            raise UsageError("an elastic restart needs a fixed run folder: pass --out or --name to train.py")
        if os.path.isfile(os.path.join(folder, LATEST)):
            # The same command line runs again: its --overwrite was for the first attempt, not this one.
            args.resume, args.overwrite = folder, False
    try:
        Trainer(model_config, train_config, resume=args.resume, explicit=explicit, log=_log,
                overwrite=args.overwrite).run()
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
    from . import launch
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
    from .devices import resolve_device
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
        _silence_stdout()
        print(f"warning: cannot write the training log to standard output ({(e.strerror or str(e)).lower()}); "
              f"training goes on, and metrics.jsonl in the run folder keeps the log", file=sys.stderr, flush=True)


_log_lost = False


# ---------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------

def generate_parser() -> argparse.ArgumentParser:
    from .sampling import SampleConfig
    p = _Parser(
        prog="generate.py", formatter_class=_Formatter,
        description="Generate text from a trained textgen model. The prompt and the generated text go to "
                    "stdout (or --output); messages go to stderr.",
        epilog="examples:\n  python generate.py --prompt 'ROMEO:' --length 300\n"
               "  python generate.py --checkpoint checkpoints/my-run --paragraphs 3 --seed 7\n"
               "  python generate.py --interactive")
    add_checkpoint(p)
    p.add_argument("--prompt", default="", help="text the output starts from; it is fed into the model first")
    settings.add_flags(p, SampleConfig)
    p.add_argument("--paragraphs", type=int, default=None,
                   help="generate N paragraphs (each ends at a blank line or --length), each continuing the state")
    p.add_argument("--interactive", action="store_true",
                   help="read a line, reply, keep the state between turns; /reset starts afresh, empty line quits")
    add_unknown(p, "skip them with a warning")
    p.add_argument("--output", default=None, help="write the text to this file instead of stdout")
    add_common(p)
    return p


def generate_main(argv=None) -> int:
    return run_main(_generate, argv)


def _generate(argv) -> int:
    from .checkpoint import load_model
    from .run_folder import latest_run
    from .sampling import Generator, SampleConfig
    from .devices import resolve_device
    args = generate_parser().parse_args(argv)
    for flag, text in (("--prompt", args.prompt), ("--stop", args.stop)):
        _check_text(flag, text)
    config = settings.from_values(SampleConfig, vars(args))
    config.validate()
    if config.temperature == 0:
        # Greedy decoding draws nothing: a cut of the distribution or more samples would be ignored.
        for name, given in (("top_k", args.top_k is not None), ("top_p", args.top_p is not None),
                            ("num_samples", args.num_samples != 1)):
            if given:
                raise UsageError(f"{flag_of(name)} and --temperature 0 cannot be used together: greedy decoding "
                                 f"always takes the most likely character, so {flag_of(name)} would change nothing")
    if args.interactive and sys.stdin is None:
        raise UsageError("--interactive reads standard input, which is closed")
    if args.output is None and sys.stdout is None:
        raise UsageError("standard output is closed; write the text to a file with --output")
    check_range("paragraphs", args.paragraphs, 1, None, "at least 1")
    if args.output is not None:
        _check_output(args.output)            # before a model is loaded or a character generated
    if args.interactive and (args.num_samples != 1 or args.paragraphs):
        raise UsageError("--interactive works with one sample and no --paragraphs")
    if args.paragraphs and args.num_samples != 1:
        raise UsageError("--paragraphs works with one sample; use --num-samples without it")
    device = resolve_device(args.device)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    path = args.checkpoint or latest_run()
    model, tokenizer, ckpt = load_model(path, prefer_best=True, device=device)
    gen = Generator(model, tokenizer, num_samples=args.num_samples, seed=args.seed, unknown=args.unknown, warn=warn)
    say(f"checkpoint {path} (step {ckpt['step']}), seed {gen.seed}")
    with _output(args.output) as out:
        if args.interactive:
            _interactive(gen, config, out, args.prompt, say)
        elif args.paragraphs:
            _paragraphs(gen, config, out, args.prompt, args.paragraphs)
        elif args.num_samples > 1:
            gen.feed(args.prompt)
            texts = gen.generate(config)
            out.write("\n---\n".join(args.prompt + t for t in texts) + "\n")
        else:
            gen.feed(args.prompt)
            _write(out, args.prompt)
            _stream_one(gen, config, out)
            _write(out, "\n")
    return 0


def _check_output(path: str) -> None:
    """Refuse an --output the writer would refuse, or whose folder is not there, before any work."""
    from .files import check
    if path == "":
        raise SettingError("output", "must name a file (leave it out to write to standard output)")
    check(path)


def _output(path: str | None):
    """--output through the one writer (the file appears whole when generation ends; a Ctrl-C keeps
    what was generated so far), or standard output as it is."""
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    from .files import output
    return output(path, "w", keep_on_interrupt=True)


def _check_text(what: str, text: str | None) -> None:
    """Text that came from a terminal in another encoding arrives with lone surrogates: refuse it."""
    if text and any("\ud800" <= ch <= "\udfff" for ch in text):
        raise UsageError(f"{what} is not valid UTF-8 text (the terminal passed bytes in another encoding); "
                         f"set the terminal to UTF-8 or pass the text from a UTF-8 file")


def _write(out, text: str) -> None:
    out.write(text)
    out.flush()


def _stream_one(gen, config, out) -> str:
    produced = []
    for chars in gen.stream(config):
        produced.append(chars[0])
        _write(out, chars[0])        # flushed per character: output shows at once
    return "".join(produced)


def _paragraphs(gen, config, out, prompt: str, count: int) -> None:
    from dataclasses import replace
    per_paragraph = replace(config, stop=config.stop or "\n\n")
    gen.feed(prompt)
    _write(out, prompt)
    for _ in range(count):
        text = _stream_one(gen, per_paragraph, out)
        if not text.endswith("\n\n"):
            # Cut at --length: close the paragraph in the text and in the state alike.
            separator = "\n\n" if not text.endswith("\n") else "\n"
            gen.feed(separator)
            _write(out, separator)


def _interactive(gen, config, out, prompt: str, say) -> None:
    from dataclasses import replace
    per_turn = replace(config, stop=config.stop or "\n\n")
    if prompt:
        gen.feed(prompt)
    tty = sys.stdin.isatty()
    say("interactive: type a line and press Enter; /reset forgets the conversation; "
        "an empty line or Ctrl-D quits")
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        raw = sys.stdin.buffer.readline()          # bytes: a line in another encoding must not end the session
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            print("error: that line is not UTF-8 text (is the terminal set to another encoding?); "
                  "it was ignored", file=sys.stderr, flush=True)
            continue
        if not line or not line.strip():
            break
        line = line.rstrip("\r\n")
        if line.strip() == "/reset":
            gen.reset()
            print("(state reset)", file=sys.stderr, flush=True)
            continue
        gen.feed(line + "\n")
        text = _stream_one(gen, per_turn, out)
        if not text.endswith("\n"):
            gen.feed("\n")
            _write(out, "\n")


# ---------------------------------------------------------------------------
# eval, info, plot, and the umbrella `textgen` command
# ---------------------------------------------------------------------------

def eval_parser() -> argparse.ArgumentParser:
    from .evaluate import ADAPT_LR, ADAPT_SEQ_LEN, EVAL_SEQ_LEN, EVAL_STREAMS
    p = _Parser(
        prog="textgen-eval", formatter_class=_Formatter,
        description="Cross-entropy of a trained model over a whole text file, in nats and bits per character. "
                    "The file is read as a few parallel streams with the state carried from start to end; each "
                    "stream starts from a zero state, a small upward bias that shrinks as the file grows.")
    add_checkpoint(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    add_unknown(p, "leave them out and count them")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"parallel streams the file is read as (default {EVAL_STREAMS}; 1 with --adapt)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"characters per chunk (default {EVAL_SEQ_LEN}, or {ADAPT_SEQ_LEN} with --adapt)")
    p.add_argument("--adapt", action="store_true",
                   help="dynamic evaluation: read the file as one stream and let the model keep learning from "
                        "what it has read, a step after each chunk is scored (never from text ahead); the "
                        "figure to set beside a compressor's, which also learns from the file as it goes")
    p.add_argument("--adapt-lr", type=float, default=None, metavar="LR",
                   help="step size of --adapt (default %g); implies --adapt" % ADAPT_LR)
    p.add_argument("--match", action="store_true",
                   help="mix in a match model, as compressors do: the character that followed the last time "
                        "the last few characters occurred in the text read so far, weighted by how often such "
                        "matches have come true; the model's own figure is printed beside it")
    p.add_argument("--history", metavar="FILE", default=None,
                   help="with --match: a text read before --text that the match model may copy from too, such "
                        "as the training text (what xz is given for its conditional figure)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(p)
    return p


def eval_main(argv=None) -> int:
    return run_main(_eval, argv)


def _eval(argv) -> int:
    import json

    from .run_folder import latest_run
    from .evaluate import ADAPT_LR, EVAL_STREAMS, LN2, evaluate_file
    from .devices import resolve_device
    args = eval_parser().parse_args(argv)
    for name in ("batch_size", "seq_len"):
        check_range(name, getattr(args, name), 1, 10**9, "a whole number from 1 to 1,000,000,000")
    adapt_lr = None
    if args.adapt or args.adapt_lr is not None:
        adapt_lr = ADAPT_LR if args.adapt_lr is None else args.adapt_lr
        check_range("adapt_lr", adapt_lr, 1e-9, 10.0, "from 1e-9 to 10 (an RMSprop step size)")
        if args.batch_size not in (None, 1):
            raise UsageError("--adapt reads the file as one stream (a step learnt on one stream would predict "
                             "text of another that comes before it); leave out --batch-size")
    if args.history is not None and not args.match:
        raise UsageError("--history is the match model's text; add --match")
    report = evaluate_file(args.checkpoint or latest_run(), args.text, args.unknown, args.batch_size or EVAL_STREAMS,
                           args.seq_len, resolve_device(args.device),
                           progress=not args.quiet and sys.stderr.isatty(), adapt_lr=adapt_lr,
                           match=args.match, history_path=args.history)
    if args.json:
        print(json.dumps(report))
        return 0
    how = (f"as one stream, learning as it reads (--adapt-lr {report['adapt_lr']:g})" if report["adapt_lr"]
           else f"in {report['streams']} streams")
    print(f"{report['text']}: {report['characters']:,} characters, {report['predicted']:,} predicted {how}")
    if report["skipped_unknown"]:
        print(f"left out {report['skipped_unknown']:,} characters the model never saw")
    if report["match"]:
        source = (f"{report['history']} ({report['history_characters']:,} characters) and the text read so far"
                  if report["history"] else "the text read so far")
        print(f"mixed with a match model over {source}")
    print(f"cross-entropy {report['nats_per_char']:.4f} nats/char = {report['bits_per_char']:.4f} bits/char "
          f"({report['seconds']:.1f}s)")
    if report["match"]:
        print(f"the model alone {report['lstm_nats_per_char']:.4f} nats/char = "
              f"{report['lstm_nats_per_char'] / LN2:.4f} bits/char")
    return 0


def info_main(argv=None) -> int:
    return run_main(_info, argv)


def _info(argv) -> int:
    from .checkpoint import load, summary
    from .run_folder import resolve
    from .evaluate import LN2
    from .tokenizer import escape_char
    p = _Parser(prog="textgen info", formatter_class=_Formatter,
                                description="Describe a checkpoint without putting its weights on a device.")
    p.add_argument("checkpoint", metavar="RUN_FOLDER_OR_FILE")
    add_version(p)
    args = p.parse_args(argv)
    path = resolve(args.checkpoint, prefer_best=False)
    ckpt = load(path, map_location="cpu")
    info = summary(ckpt, path)
    corpus, best = info["corpus"], info["best_val_loss"]
    print(f"checkpoint   {path} (format {info['version']}, written {info['created'] or '?'})")
    print(f"model        {info['layers']} x LSTM {info['hidden_size']}"
          + (" with residual connections" if info["residual"] and info["layers"] > 1 else "")
          + f", embedding {info['embed_size']}, "
          + ("adaptive softmax (cutoffs " + ", ".join(map(str, info["cutoffs"])) + ")" if info["head"] == "adaptive"
             else "full softmax"))
    regularisers = [f"{name.replace('_', ' ')} {value:g}" for name, value in info["regularisers"].items()]
    print(f"regularised  {', '.join(regularisers) or 'no dropout'}"
          + (" (locked masks)" if info["locked_dropout"] else "")
          + (f"; averaged weights (--ema {info['ema']})" if info["averaged_weights"] else ""))
    print(f"parameters   {info['parameters']:,}")
    print(f"vocabulary   {len(info['vocab'])} characters: {' '.join(escape_char(ch) for ch in info['vocab'])}")
    if corpus:
        print(f"corpus       {corpus.get('path')} ({corpus.get('size_bytes', 0):,} bytes, "
              f"{corpus.get('characters', 0):,} characters, sha256 {corpus.get('sha256', '')[:16]})")
    print(f"steps        {info['steps']:,} of {info['plan'] or '?'}")
    if best is not None:
        print(f"best val     {best:.4f} nats/char = {best / LN2:.4f} bits/char")
    print(f"train time   {info['elapsed']:.0f}s")
    return 0


def plot_main(argv=None) -> int:
    return run_main(_plot, argv)


def _plot(argv) -> int:
    from .plot import plot_runs
    p = _Parser(prog="textgen plot", formatter_class=_Formatter,
                                description="Plot training and validation loss of one or more runs into a PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER")
    p.add_argument("--output", default=None, help="PNG to write (default: loss.png in the first run folder)")
    add_version(p)
    args = p.parse_args(argv)
    out = plot_runs(args.runs, args.output)
    print(out)
    return 0


def serve_parser() -> argparse.ArgumentParser:
    from .run_folder import DEFAULT_ROOT
    from .server import Limits
    limits = Limits()
    p = _Parser(prog="textgen serve", formatter_class=_Formatter,
                description="Serve a generation playground in the browser and an HTTP API that streams "
                            "(JSON lines; see README, Playground). Concurrent requests on one model are "
                            "stepped together as one batch.",
                epilog="examples:\n  textgen serve                          # every run under checkpoints/\n"
                       "  textgen serve checkpoints/my-run --port 8080")
    p.add_argument("runs", nargs="?", default=DEFAULT_ROOT, metavar="RUN_OR_FOLDER",
                   help="a run folder, a checkpoint file, or a folder of runs (each is offered by its folder name)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback lets other machines in (warned)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="another name this server may be reached by (Host header), e.g. behind a proxy")
    p.add_argument("--slots", type=int, default=limits.slots,
                   help="generations per model stepped together as one batch; more wait in a queue")
    p.add_argument("--max-waiting", type=int, default=limits.max_waiting,
                   help="generations per model that may wait for a slot; past that a request gets 503")
    p.add_argument("--max-length", type=int, default=limits.max_length, help="most characters one request may ask for")
    p.add_argument("--max-prompt", type=int, default=limits.max_prompt, help="most characters of prompt per request")
    p.add_argument("--max-loaded", type=int, default=limits.max_loaded, help="models kept in memory at once")
    key = p.add_argument("--api-key", default=os.environ.get("TEXTGEN_API_KEY"), metavar="KEY",
                         help="every API request (native and OpenAI) must send Authorization: Bearer KEY; the "
                              "default is $TEXTGEN_API_KEY, which keeps the key out of the process list")
    key.hide_default = True             # --help never prints the key
    p.add_argument("--verbose", action="store_true", help="log every request to stderr")
    add_common(p)
    return p


def serve_main(argv=None) -> int:
    return run_main(_serve, argv)


def _serve(argv) -> int:
    from .devices import resolve_device
    from .server import Limits, serve
    args = serve_parser().parse_args(argv)
    limits = Limits(slots=args.slots, max_waiting=args.max_waiting, max_length=args.max_length,
                    max_prompt=args.max_prompt, max_loaded=args.max_loaded)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    return serve(args.runs, args.host, args.port, resolve_device(args.device), limits, args.allow_host, say, warn,
                 args.verbose, args.api_key)


def export_parser() -> argparse.ArgumentParser:
    from .export import FORMATS, QUANTIZE
    p = _Parser(prog="textgen export", formatter_class=_Formatter,
                description="Write a trained model (the weights generation uses) for another runtime: onnx (the "
                            "one-character step as an ONNX graph, for onnxruntime and others), web (one HTML file "
                            "that generates in the browser, offline) or safetensors (a folder of model.safetensors, "
                            "config.json and vocab.json, which textgen.load reads back). See README, Export.",
                epilog="examples:\n  textgen export checkpoints/my-run --format onnx --output model.onnx\n"
                       "  textgen export checkpoints/my-run --format web --output model.html --quantize int8\n"
                       "  textgen export checkpoints/my-run --format safetensors --output my-run-safetensors")
    p.add_argument("run", metavar="RUN_FOLDER_OR_FILE",
                   help="a run folder (uses best.pt, else latest.pt) or a checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", default=None,
                   help="the file to write (onnx, web), or a new or empty folder (safetensors); never over a "
                        "checkpoint or a run folder's file (default: the run's name with .onnx, .html or "
                        "-safetensors, in the current folder)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="web: int8 weights with a scale per row, about a quarter of the float32 page")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    add_version(p)
    return p


def export_main(argv=None) -> int:
    return run_main(_export, argv)


def _export(argv) -> int:
    from .export import export
    args = export_parser().parse_args(argv)
    written = export(args.run, args.format, args.output, args.quantize)
    if not args.quiet:
        for path in written:
            print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return 0


COMMANDS = {"train": train_main, "generate": generate_main, "eval": eval_main, "info": info_main,
            "plot": plot_main, "serve": serve_main, "export": export_main}


def textgen_main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("--version", "-V"):
        print(f"textgen {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        print(f"usage: textgen {{{names}}} [flags]   (textgen COMMAND --help for each)", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])
