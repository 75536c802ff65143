"""`textgen serve`: a generation playground in the browser and an HTTP API that streams.

Three modules, one job each:

* here, what is served and how a request is read: the limits, the catalogue of served runs
  (loaded on first use), a generate request's checks, and `serve()`, which runs the model work
  (a `jobs.Scheduler` stepping every engine) on the main thread until Ctrl-C or SIGTERM;
* `http_app`, the endpoints, on starlette's requests and responses: Host and Origin checks, the
  body limit, JSON lines streamed from a job's queue without ever blocking the event loop;
* `http_server`, uvicorn (h11, asyncio) on a thread of its own: an idle or slow connection costs
  a socket, never a thread; the request head and the body each have a deadline however slowly
  bytes trickle in; past a connection cap a new connection gets 503 at once; a request that is
  not valid HTTP gets a JSON answer.

What a real server needs, in all: per model a bounded number of generation slots and a bounded
queue waiting for one (past it, 503); a request-body limit and per request a maximum length and
prompt size; a job is submitted only once its whole body has arrived, so a slow client never holds
a slot; Host header checks against DNS rebinding and an Origin check on POSTs; a model is named
only from the served list, never by a path; generated text leaves as JSON strings under a Content
Security Policy that allows no inline script; a client that goes away, or presses Stop, ends its
generation at the next call of the model (within milliseconds).

API (JSON in, JSON lines out; see README, "Playground"):

    GET  /api/models    {"models": [{"name", "layers", "hidden_size", ..., "loss_curve": true}, ...]}
    GET  /api/models/NAME/loss.png   the run's loss curve, found by its catalogue name (404 without one)
    POST /api/generate  {"model", "prompt", "prime", "length", "temperature", "top_k", "top_p", "seed",
                         "num_samples", "stop", "max_copy", "unknown", "continue", "logprobs"}
                        -> application/x-ndjson, one object a line:
                           {"id", "model", "seed", "samples"}   first
                           {"text": "..."} (with "sample": i when num_samples > 1; with "logprobs": n,
                             "logprobs": [{"logprob", "top": [[char, logprob], ...]}, ...] one per character)
                           {"warning": "..."}
                           {"end": "length"|"stop"|"stopped"|"shutdown"|"error", "characters", "session",
                            "copy"} last ("copy": the longest verbatim span of the training text, or why not)
    POST /api/stop      {"id"}: end that generation
    GET  /api/status    slots busy and requests waiting, per loaded model

and OpenAI's completions protocol beside it (`openai_api`: /v1/models, /v1/completions, /tokenize).

Imports checkpoint, batching, sampling, evaluate (LN2) and errors, and in serve() http_server;
never training or cli. Needs nothing outside the core install until serve() is called.
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import itertools
import json
import os
import re
import signal
import socket
import stat
import threading
from dataclasses import dataclass

from ..generation.batching import BatchingEngine
from ..generation.jobs import Job, Scheduler
from ..checkpoint import build_model, load, summary
from ..copy_index import for_checkpoint
from ..run_folder import BEST, LATEST, PLOT, find_runs, is_run, resolve
from ..errors import SettingError, UsageError, check_range
from ..evaluate import LN2
from ..generation.sampling import MAX_LOGPROBS, SampleConfig
from ..settings import declared, kind

@dataclass
class Limits:
    slots: int = 16                  # generations stepped together per model
    max_waiting: int = 64            # generations queued per model before 503
    max_length: int = 10_000         # characters per request
    max_prompt: int = 10_000         # characters of prompt per request
    max_body: int = 256 * 1024       # bytes of request body
    max_loaded: int = 4              # models kept in memory at once
    # Not flags (tests shorten them): an asyncio server holds this many sockets without a thread each.
    max_connections: int = 1024      # open connections; past it a new one gets 503 at once
    head_timeout: float = 10.0       # seconds for a whole request head, however slowly it trickles in
    body_timeout: float = 20.0       # seconds for a request body, from the end of its head

    def validate(self) -> None:
        for name in ("slots", "max_length", "max_prompt", "max_body", "max_loaded"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise UsageError(f"--max-waiting must be 0 or more, got {self.max_waiting}")
        if self.slots > 1024:
            raise UsageError(f"--slots must be at most 1024, got {self.slots}")
        if min(self.max_connections, self.head_timeout, self.body_timeout) <= 0:
            raise UsageError("max_connections, head_timeout and body_timeout must be more than 0")


# ---------------------------------------------------------------------------
# The served models
# ---------------------------------------------------------------------------

MAX_PLOT_BYTES = 16 * 1024 * 1024     # a loss curve is ~50 KB; anything this large is not one


class Catalogue:
    """The models a server offers: one run, one checkpoint file, or every run under a folder.

    A folder is looked at again on every listing, so runs trained while the server is up appear.
    Models are loaded on first use, at most `limits.max_loaded` at a time; a checkpoint that
    changed on disk (a run still training wrote a new best.pt) is loaded afresh for new requests.
    """

    def __init__(self, path: str, device, limits: Limits, scheduler: Scheduler):
        self.path, self.device, self.limits, self.scheduler = path, device, limits, scheduler
        if os.path.isfile(path):
            self.single = os.path.basename(path)
        elif os.path.isdir(path):
            self.single = os.path.basename(os.path.normpath(path)) if is_run(path) else None
        else:
            raise UsageError(f"{path}: no such run folder, checkpoint file or folder of runs")
        self.lock, self.loading = threading.Lock(), threading.Lock()
        self.info_cache: dict[tuple, dict] = {}
        self.engines: collections.OrderedDict[str, tuple[tuple, BatchingEngine]] = collections.OrderedDict()
        if not self.files():
            raise UsageError(f"{path} holds no trained runs (no {BEST} or {LATEST} in it or in its folders); "
                             f"train one with `python train.py` first")

    def files(self) -> dict[str, str]:
        """{model name: checkpoint file}, names in the order shown (most recently written first)."""
        if self.single is not None:
            return {self.single: resolve(self.path, prefer_best=True)}
        return dict(find_runs(self.path))

    @staticmethod
    def _key(file: str) -> tuple:
        st = os.stat(file)
        return (file, st.st_mtime_ns, st.st_size)

    def models(self) -> list[dict]:
        listed = []
        for name, file in self.files().items():
            try:
                key = self._key(file)
                if key not in self.info_cache:
                    self.info_cache[key] = describe(load(file, map_location="cpu"), os.path.basename(file))
                listed.append({"name": name, **self.info_cache[key],
                               "loss_curve": os.path.isfile(os.path.join(os.path.dirname(file), PLOT))})
            except (UsageError, OSError) as e:
                listed.append({"name": name, "error": str(e)})
        return listed

    def loss_curve(self, name: str) -> bytes | None:
        """The named run's loss.png (beside its checkpoint), None where it has none. The file is found
        from the catalogue's name only, never from a path a request gives; only a regular file is read."""
        files = self.files()
        if name not in files:
            raise UsageError(f"there is no model {name[:100]!r} here; GET /api/models lists them")
        path = os.path.join(os.path.dirname(files[name]), PLOT)
        try:         # O_NONBLOCK: a FIFO by that name must not hang the reader; it is refused just below
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_PLOT_BYTES:
                return None
            return f.read(MAX_PLOT_BYTES)

    def engine(self, name) -> tuple[BatchingEngine, str]:
        """The engine serving the named model; an unknown name is the request's error."""
        files = self.files()
        if not isinstance(name, str) or name not in files:
            shown = ", ".join(list(files)[:10]) + (", ..." if len(files) > 10 else "")
            raise UsageError(f"there is no model {name!r} here; GET /api/models lists them ({shown})")
        file = files[name]
        try:
            key = self._key(file)
        except OSError:
            raise UsageError(f"model {name!r} is no longer on disk") from None
        with self.loading:                     # one load at a time: two first requests share one engine
            with self.lock:
                held = self.engines.get(name)
                if held is not None and held[0] == key:
                    self.engines.move_to_end(name)
                    return held[1], name
            ckpt = load(file, map_location="cpu")                      # outside self.lock: listings go on
            model, tokenizer = build_model(ckpt, file)
            model.to(self.device).eval()
            fresh = BatchingEngine(model, tokenizer, self.limits.slots, self.limits.max_waiting, self.scheduler)
            fresh.copy_index, fresh.copy_note = for_checkpoint(ckpt, tokenizer)     # built once per text
            with self.lock:
                held = self.engines.pop(name, None)
                self.engines[name] = (key, fresh)
                retired = [held[1]] if held else []
                while len(self.engines) > self.limits.max_loaded:
                    retired.append(self.engines.popitem(last=False)[1][1])
        for old in retired:
            old.retire()                       # finishes what it runs, then lets go of its model
        return fresh, name

    def status(self) -> dict:
        with self.lock:
            return {name: engine.counts() for name, (_, engine) in self.engines.items()}

    def close(self) -> None:
        with self.lock:
            engines = [engine for _, engine in self.engines.values()]
            self.engines.clear()
        for engine in engines:
            engine.close()


def describe(ckpt: dict, file: str) -> dict:
    """What `textgen info` shows of a checkpoint, as JSON."""
    info = summary(ckpt)
    best = info["best_val_loss"]
    return {"file": file, **{key: info[key] for key in ("layers", "hidden_size", "embed_size", "residual", "head",
                                                         "cutoffs", "regularisers", "locked_dropout",
                                                         "averaged_weights", "parameters")},
            "vocab_size": len(info["vocab"]), "styles": info["styles"], "steps": info["steps"], "plan": info["plan"],
            "best_val_bits_per_char": None if best is None else round(best / LN2, 4), "created": info["created"]}


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

# A request's fields: the request's own, then every sampling setting (SampleConfig's, declared once),
# each with the JSON types it may take.
_SAMPLING = {f.name: kind(f) for f in declared(SampleConfig)}            # {"top_p": "float", ...}
_JSON_TYPES = {"int": (int,), "float": (int, float), "str": (str,)}
FIELDS = {"model": (str,), "prompt": (str,), "prime": (str,), "unknown": (str,), "continue": (str,), "logprobs": (int,),
          **{name: _JSON_TYPES[k] for name, k in _SAMPLING.items()}}


MAX_VOCABULARY = 0x110000              # every Unicode code point


def _as_float(name: str, value) -> float:
    """A JSON number as a float; an integer too large for one (1 and 400 zeros) is the field's error."""
    try:
        return float(value)
    except OverflowError:
        raise SettingError(name, f"must be a finite number, got an integer of {len(str(value)):,} digits") from None


def parse_request(body: dict, limits: Limits) -> tuple[object, Job]:
    """A generate request's JSON -> (model name, job), with the CLI's checks and messages."""
    if not isinstance(body, dict):
        raise UsageError("the request body must be a JSON object")
    for key, value in body.items():
        if key not in FIELDS:
            raise UsageError(f"unknown field {key!r}; the fields are {', '.join(FIELDS)}")
        kinds = FIELDS[key]
        if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
            raise UsageError(f"{key} must be {' or '.join('a number' if k is float else k.__name__ for k in kinds)},"
                             f" got {json.dumps(value)[:40]}")
    get = lambda key, default=None: default if body.get(key) is None else body[key]    # noqa: E731
    prompt, prime = get("prompt", ""), get("prime", "")
    check_prompt(prompt, limits)
    check_text("prime", prime)
    check_text("stop", body.get("stop"))
    if len(prompt) + len(prime) > limits.max_prompt:
        raise UsageError(f"the prime text and the prompt take {len(prompt) + len(prime):,} characters; this server "
                         f"takes at most {limits.max_prompt:,} (--max-prompt)")
    # A field left out or null takes the setting's default; JSON's integers stand for floats too.
    config = SampleConfig(**{name: _as_float(name, body[name]) if k == "float" else body[name]
                             for name, k in _SAMPLING.items() if body.get(name) is not None})
    config.validate()
    if config.top_k is not None:
        # No vocabulary holds more characters than Unicode has, so a larger k cuts nothing, as on the
        # command line; clamped here, it fits the batch's int64 tensor of one k per row.
        config.top_k = min(config.top_k, MAX_VOCABULARY)
    if config.length > limits.max_length:
        raise SettingError("length", f"must be at most {limits.max_length:,} on this server, got {config.length:,}")
    unknown = get("unknown", "error")
    if unknown not in ("error", "skip"):
        raise UsageError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    logprobs = body.get("logprobs")
    check_range("logprobs", logprobs, 0, MAX_LOGPROBS, f"a whole number from 0 to {MAX_LOGPROBS}")
    return body.get("model"), Job(prompt, config, unknown, session=body.get("continue"), logprobs=logprobs,
                                  prime=prime)


def check_text(what: str, text: str | None) -> None:
    """JSON can carry a lone surrogate (\\ud800), which is no character: refuse it by the field's name."""
    if text and any("\ud800" <= ch <= "\udfff" for ch in text):
        raise UsageError(f"{what} is not valid text (it holds a lone surrogate)")


def check_prompt(prompt: str, limits: Limits) -> None:
    """A prompt's own checks, for every protocol: valid text, within the server's limit."""
    check_text("prompt", prompt)
    if len(prompt) > limits.max_prompt:
        raise UsageError(f"the prompt is {len(prompt):,} characters; this server takes at most {limits.max_prompt:,}")


# Deeper than this is never a generate request, and json's recursion would fail on it.
MAX_JSON_DEPTH = 32
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)


def parse_json(raw: bytes):
    """A request body -> its JSON value; UsageError unless it is JSON in UTF-8, nested at most MAX_JSON_DEPTH deep."""
    try:
        text = raw.decode("utf-8")
        structure = re.findall(r"[\[\]{}]", _JSON_STRING.sub("", text))     # brackets in strings are text
        depth = max(itertools.accumulate(1 if ch in "[{" else -1 for ch in structure), default=0)
        if depth > MAX_JSON_DEPTH:
            raise UsageError(f"the JSON is nested {depth:,} levels deep; this server takes at most {MAX_JSON_DEPTH}")
        return json.loads(text)
    except (UnicodeDecodeError, ValueError) as e:
        raise UsageError(f"the body is not valid JSON in UTF-8 ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------

def listen(host: str, port: int) -> socket.socket:
    """The listening socket; OSError (e.g. the port is in use) is the caller's to word."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)      # restart at once, not after TIME_WAIT
        sock.bind((host, port))
        sock.listen(2048)             # a short backlog resets a burst of clients
    except OSError:
        sock.close()
        raise
    return sock


def addresses(asked: str, bound: str, port: int, allow_hosts=()) -> tuple[str, set[str]]:
    """(the URL to print, the Host header values this server answers to)."""
    url = f"http://{_url_host(asked, bound)}:{port}/"
    names = {asked, bound, "localhost", "127.0.0.1", "[::1]", *allow_hosts}
    if _is_wildcard(asked):
        names |= {socket.gethostname(), *_local_addresses()}
    names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names if n}
    hosts = {f"{n}:{port}".lower() for n in names} | ({n.lower() for n in names} if port == 80 else set())
    # A name given with --allow-host is the one a proxy in front answers to, on its own port: its
    # Host header carries the bare name (port 80 or 443), so the bare name counts too.
    hosts |= {(f"[{n}]" if ":" in n and not n.startswith("[") else n).lower() for n in allow_hosts if n}
    return url, hosts


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(asked: str, bound: str) -> str:
    if _is_wildcard(asked):
        return "127.0.0.1"
    return f"[{bound}]" if ":" in bound else asked


def _local_addresses() -> set[str]:
    found = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(info[4][0])
    except OSError:
        pass
    return found


def model_threads() -> None:
    """Leave a core to the HTTP thread, which encodes every stream: the model's work gets one thread fewer
    than torch would take (at least one), unless OMP_NUM_THREADS says how many. On the 2 cores here that
    is one thread for the model, and a lone client ran 1.4x faster, 16 clients 1.4x (benchmarks/README.md,
    "Serving"); the characters drawn do not depend on it (the stepper's rows agree at any thread count)."""
    import torch
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, torch.get_num_threads() - 1))


def check_api_key(key: str | None) -> None:
    """A key a client can send in a header: printable ASCII without spaces, long enough to be a secret."""
    if key is None:
        return
    if not (16 <= len(key) <= 256 and all("!" <= ch <= "~" for ch in key)):
        raise UsageError("--api-key must be 16 to 256 printable ASCII characters without spaces "
                         "(e.g. python -c \"import secrets; print(secrets.token_urlsafe(32))\")")


def _need_the_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError('serving needs the [serve] extra (uvicorn and starlette): pip install -e ".[serve]"') from None


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, device="cpu", limits: Limits | None = None,
          allow_hosts=(), say=print, warn=None, verbose=False, api_key: str | None = None) -> int:
    """Serve until Ctrl-C (or SIGTERM); returns the exit code. api_key: every API request must then
    carry it (Authorization: Bearer KEY)."""
    _need_the_serve_extra()
    from .http_server import PlaygroundServer
    limits = limits or Limits()
    limits.validate()
    check_api_key(api_key)
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {port}")
    model_threads()
    scheduler = Scheduler()
    catalogue = Catalogue(path, device, limits, scheduler)
    try:
        server = PlaygroundServer((host, port), catalogue, limits, allow_hosts, verbose, api_key)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use; pass --port with another (0 picks a free one)") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not _is_loopback(host) and warn and api_key is None:
        warn(f"serving on {host or 'every address'}: anyone who can reach this machine can use the server "
             f"(no --api-key is set); bind to 127.0.0.1 unless you mean it")
    models = catalogue.files()
    server.start()
    say(f"serving {len(models)} model{'s' if len(models) != 1 else ''} from {path} at {server.url}  (Ctrl-C stops)")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        scheduler.run()                     # the model work runs here, on the main thread
    except KeyboardInterrupt:
        say("shutting down")
    finally:
        server.shutdown()                   # no new connections...
        catalogue.close()                   # ...running generations end with "shutdown"...
        server.wait(timeout=5)              # ...and their streams say so before the process ends
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
