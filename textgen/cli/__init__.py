"""Command-line entry points: parse flags, check them, call the package. One module per command
(train, generate, serve; tools for eval, info, plot and export), what they share in common.py; the
umbrella `textgen COMMAND` here.

Imports what each command needs, lazily; nothing in the package imports it except __main__.
"""
from __future__ import annotations

import sys

from .. import __version__
from .common import cli_words, run_main
from .generate import generate_main, generate_parser
from .serve import serve_main, serve_parser
from .tools import eval_main, eval_parser, export_main, export_parser, info_main, plot_main
from .train import train_main, train_parser

__all__ = ["cli_words", "eval_main", "eval_parser", "export_main", "export_parser", "generate_main",
           "generate_parser", "info_main", "plot_main", "run_main", "serve_main", "serve_parser",
           "textgen_main", "train_main", "train_parser"]

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
