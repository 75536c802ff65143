"""generate.py and `textgen generate`: sampling from a checkpoint to stdout or a file, a paragraph at a time
or interactively.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys

from .. import settings
from ..settings import flag_of
from ..errors import SettingError, UsageError, check_range
from .common import Formatter, Parser, adapt_lr_of, add_adapt, add_checkpoint, add_common, add_unknown, cli_words, run_main


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
    p.add_argument("--prime-file", default=None, metavar="DOC",
                   help="a UTF-8 document read into the model's state before the prompt (not printed)")
    add_adapt(p, "with --prime-file: first adapt the weights on the document, in memory, as textgen-eval --adapt "
                 "does (the checkpoint is never changed)")
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
    from ..generation.generator import Generator
    from ..generation.sampling import SampleConfig
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
    adapt_lr = adapt_lr_of(args)
    if adapt_lr is not None and args.prime_file is None:
        raise UsageError("--adapt adapts the weights on the --prime-file document; give one")
    document = None if args.prime_file is None else _read_prime(args.prime_file)
    device = resolve_device(args.device)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    path = args.checkpoint or latest_run()
    model, tokenizer, ckpt = load_model(path, prefer_best=True, device=device)
    gen = Generator(model, tokenizer, num_samples=args.num_samples, seed=args.seed, unknown=args.unknown, warn=warn,
                    style=args.style)
    report = not args.quiet and not args.interactive      # the copy report, after the text
    if config.max_copy is not None or report:
        from ..copy_index import for_checkpoint
        gen.copy_index, why = for_checkpoint(ckpt, tokenizer, log=say)
        if gen.copy_index is None and config.max_copy is not None:
            raise UsageError(f"{{max_copy}} needs the training text, and {why}", max_copy=...)
    say(f"checkpoint {path} (step {ckpt['step']}), seed {gen.seed}")
    if document is not None:
        _prime(gen, document, args.prime_file, adapt_lr, say)
    with _output(args.output) as out:
        if args.interactive:
            _interactive(gen, config, out, args.prompt, say)
            texts = None
        elif args.paragraphs:
            texts = [_paragraphs(gen, config, out, args.prompt, args.paragraphs)]
        elif args.num_samples > 1:
            gen.feed(args.prompt)
            texts = gen.generate(config)
            out.write("\n---\n".join(args.prompt + t for t in texts) + "\n")
        else:
            gen.feed(args.prompt)
            _write(out, args.prompt)
            texts = [_stream_one(gen, config, out)]
            _write(out, "\n")
    if report and texts is not None:
        from ..copy_index import describe
        say(describe(gen.copy_index.report(texts), len(texts)) if gen.copy_index is not None
            else f"{why}; no copy report")
    return 0


def _read_prime(path: str) -> str:
    """--prime-file's document, with the checks every text file gets (one sentence for a missing, binary,
    non-UTF-8 or empty file)."""
    from ..corpus import read_text
    if os.path.isdir(path):
        raise UsageError(f"--prime-file {path} is a folder; give a text file")
    try:
        return read_text(path)
    except UsageError as e:
        raise UsageError(f"--prime-file {e.worded(cli_words)}") from None


def _prime(gen, document: str, path: str, adapt_lr, say) -> None:
    from ..generation.priming import prime
    if adapt_lr is not None:
        say(f"adapting the weights on {path} ({len(document):,} characters, --adapt-lr {adapt_lr:g}; in memory only)")
    done = prime(gen, document, adapt=adapt_lr is not None, lr=adapt_lr or 0.0)
    how = (f", adapted in {done['seconds']:.1f}s ({done['nats_per_char']:.4f} nats/char while reading)"
           if done["adapted"] else "")
    say(f"primed with {path} ({done['characters']:,} characters{how})")


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


def _paragraphs(gen, config, out, prompt: str, count: int) -> str:
    """The paragraphs written, as one text (the prompt left out)."""
    from dataclasses import replace
    per_paragraph = replace(config, stop=config.stop or "\n\n")
    gen.feed(prompt)
    _write(out, prompt)
    written = []
    for _ in range(count):
        text = _stream_one(gen, per_paragraph, out)
        written.append(text)
        if not text.endswith("\n\n"):
            # Cut at --length: close the paragraph in the text and in the state alike.
            separator = "\n\n" if not text.endswith("\n") else "\n"
            gen.feed(separator, output=True)
            _write(out, separator)
            written.append(separator)
    return "".join(written)


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


