"""generate.py and `textgen generate`: sampling from a checkpoint to stdout or a file, a paragraph at a time
or interactively.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

from .. import settings
from ..settings import flag_of
from ..errors import SettingError, UsageError, check_range
from .common import Formatter, Parser, add_checkpoint, add_common, add_unknown, run_main


def generate_parser() -> argparse.ArgumentParser:
    from ..generation.sampling import SampleConfig
    p = Parser(
        prog="generate.py", formatter_class=Formatter,
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
    from ..checkpoint import load_model
    from ..run_folder import latest_run
    from ..generation.sampling import Generator, SampleConfig
    from ..devices import resolve_device
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
    gen = Generator(model, tokenizer, num_samples=args.num_samples, seed=args.seed, unknown=args.unknown, warn=warn,
                    style=args.style)
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
    from ..files import check
    if path == "":
        raise SettingError("output", "must name a file (leave it out to write to standard output)")
    check(path)


def _output(path: str | None):
    """--output through the one writer (the file appears whole when generation ends; a Ctrl-C keeps
    what was generated so far), or standard output as it is."""
    if path is None:
        return contextlib.nullcontext(sys.stdout)
    from ..files import output
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


