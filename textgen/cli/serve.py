"""`textgen serve`: the playground and the HTTP APIs over the runs of a folder.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import Formatter, Parser, add_common, run_main


def serve_parser() -> argparse.ArgumentParser:
    from ..run_folder import DEFAULT_ROOT
    from ..serving.server import Limits
    limits = Limits()
    p = Parser(prog="textgen serve", formatter_class=Formatter,
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
    from ..devices import resolve_device
    from ..serving.server import Limits, serve
    args = serve_parser().parse_args(argv)
    limits = Limits(slots=args.slots, max_waiting=args.max_waiting, max_length=args.max_length,
                    max_prompt=args.max_prompt, max_loaded=args.max_loaded)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, flush=True))
    warn = lambda m: print(f"warning: {m}", file=sys.stderr, flush=True)  # noqa: E731
    return serve(args.runs, args.host, args.port, resolve_device(args.device), limits, args.allow_host, say, warn,
                 args.verbose, args.api_key)


