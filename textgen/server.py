"""`textgen serve`: a generation playground in the browser and an HTTP API that streams.

The standard library's HTTP server, with what a real server needs on top:

* a bounded number of connection threads (past it, 503 at once) and, per model, a bounded
  queue of generations waiting for a slot in the batch (past it, 503);
* a request-body limit, and per request a maximum length and prompt size;
* Host header checks against DNS rebinding, and an Origin check on POSTs; a model is named
  only from the served list, never by a path;
* generated text leaves as JSON strings, and the page inserts it as text, under a Content
  Security Policy that allows no inline script;
* a client that goes away, or presses Stop, ends its generation at the next character.

API (JSON in, JSON lines out; see README, "Playground"):

    GET  /api/models    {"models": [{"name", "layers", "hidden_size", ...}, ...]}
    POST /api/generate  {"model", "prompt", "length", "temperature", "top_k", "top_p", "seed",
                         "num_samples", "stop", "unknown", "continue"}
                        -> application/x-ndjson, one object a line:
                           {"id", "model", "seed", "samples"}   first
                           {"text": "..."} (with "sample": i when num_samples > 1), {"warning": "..."}
                           {"end": "length"|"stop"|"stopped"|"shutdown"|"error", "characters", "session"} last
    POST /api/stop      {"id"}: end that generation
    GET  /api/status    slots busy and requests waiting, per loaded model

Imports checkpoint, batching, sampling, evaluate (LN2) and errors; never training or cli.
"""
from __future__ import annotations

import collections
import errno
import ipaddress
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

from .batching import BatchingEngine, Busy, Job, Scheduler
from .checkpoint import BEST, LATEST, build_model, load, resolve, summary
from .errors import SettingError, UsageError
from .evaluate import LN2
from .sampling import SampleConfig

# A stream writes at most this often. The text still looks continuous (50 updates a second), and
# at thousands of characters a second a write per character would cost more than the model step.
STREAM_INTERVAL_S = 0.02


@dataclass
class Limits:
    slots: int = 16                  # generations stepped together per model
    max_waiting: int = 64            # generations queued per model before 503
    max_length: int = 10_000         # characters per request
    max_prompt: int = 10_000         # characters of prompt per request
    max_body: int = 256 * 1024       # bytes of request body
    max_loaded: int = 4              # models kept in memory at once

    def validate(self) -> None:
        for name in ("slots", "max_length", "max_prompt", "max_body", "max_loaded"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_waiting < 0:
            raise UsageError(f"--max-waiting must be 0 or more, got {self.max_waiting}")
        if self.slots > 1024:
            raise UsageError(f"--slots must be at most 1024, got {self.slots}")


# ---------------------------------------------------------------------------
# The served models
# ---------------------------------------------------------------------------

def _is_run(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, name)) for name in (BEST, LATEST))


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
            self.single = os.path.basename(os.path.normpath(path)) if _is_run(path) else None
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
        found = []
        try:
            names = os.listdir(self.path)
        except OSError:
            return {}
        for name in names:
            folder = os.path.join(self.path, name)
            if not name.startswith(".") and os.path.isdir(folder) and _is_run(folder):
                try:
                    file = resolve(folder, prefer_best=True)
                    found.append((os.path.getmtime(file), name, file))
                except (UsageError, OSError):
                    continue
        return {name: file for _, name, file in sorted(found, reverse=True)}

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
                listed.append({"name": name, **self.info_cache[key]})
            except (UsageError, OSError) as e:
                listed.append({"name": name, "error": str(e)})
        return listed

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
            "vocab_size": len(info["vocab"]), "steps": info["steps"], "plan": info["plan"],
            "best_val_bits_per_char": None if best is None else round(best / LN2, 4), "created": info["created"]}


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

FIELDS = {"model": (str,), "prompt": (str,), "length": (int,), "temperature": (int, float), "top_k": (int,),
          "top_p": (int, float), "seed": (int,), "num_samples": (int,), "stop": (str,), "unknown": (str,),
          "continue": (str,)}


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
    prompt = get("prompt", "")
    for what, text in (("prompt", prompt), ("stop", body.get("stop"))):
        if text and any("\ud800" <= ch <= "\udfff" for ch in text):
            raise UsageError(f"{what} is not valid text (it holds a lone surrogate)")
    if len(prompt) > limits.max_prompt:
        raise UsageError(f"the prompt is {len(prompt):,} characters; this server takes at most {limits.max_prompt:,}")
    config = SampleConfig(length=get("length", 500), temperature=float(get("temperature", 0.8)),
                          top_k=body.get("top_k"), top_p=None if body.get("top_p") is None else float(body["top_p"]),
                          seed=body.get("seed"), num_samples=get("num_samples", 1), stop=body.get("stop"))
    config.validate()
    if config.length > limits.max_length:
        raise SettingError("length", f"must be at most {limits.max_length:,} on this server, got {config.length:,}")
    unknown = get("unknown", "error")
    if unknown not in ("error", "skip"):
        raise UsageError(f"unknown must be 'error' or 'skip', got {unknown!r}")
    return body.get("model"), Job(prompt, config, unknown, session=body.get("continue"))


def _static(name: str) -> bytes:
    return resources.files("textgen").joinpath("static", name).read_bytes()


STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8")}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Handler(BaseHTTPRequestHandler):
    server: "PlaygroundServer"
    protocol_version = "HTTP/1.1"
    server_version = "textgen"
    sys_version = ""
    timeout = 30                    # seconds a client may take to send a request or read what we send

    def log_message(self, format, *args):  # noqa: A002
        if self.server.verbose:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    # -- answers ----------------------------------------------------------------------

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: dict, extra: dict | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", extra)

    def _error(self, status: int, message: str, extra: dict | None = None) -> None:
        self._json(status, {"error": message}, extra)

    def _host_allowed(self) -> bool:
        host = self.headers.get("Host")
        if host is None or host.lower() not in self.server.allowed_hosts:
            self._error(HTTPStatus.FORBIDDEN, f"Host {host!r} is not this server's address; open "
                                              f"{self.server.url} (this guards against DNS rebinding)")
            return False
        origin = self.headers.get("Origin")
        if self.command == "POST" and origin is not None and origin.lower() not in self.server.allowed_origins:
            self._error(HTTPStatus.FORBIDDEN, f"requests from pages at {origin} are refused")
            return False
        return True

    # -- GET --------------------------------------------------------------------------

    def do_HEAD(self):  # noqa: N802
        self.do_GET()

    def do_GET(self):  # noqa: N802
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path in STATIC:
            name, kind = STATIC[path]
            self._send(HTTPStatus.OK, _static(name), kind)
        elif path == "/api/models":
            self._json(HTTPStatus.OK, {"models": self.server.catalogue.models(), "limits": self.server.public_limits})
        elif path == "/api/status":
            self._json(HTTPStatus.OK, {"models": self.server.catalogue.status(),
                                       "generations": len(self.server.jobs)})
        elif path.startswith("/api/"):
            self._error(HTTPStatus.NOT_FOUND, f"no API endpoint {path}")
        else:
            self._error(HTTPStatus.NOT_FOUND, f"nothing at {path}")

    # -- POST -------------------------------------------------------------------------

    def _body(self):
        """The JSON body, or None after answering with the error."""
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            self._error(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length, not chunked")
            return None
        if length is None or not length.isdigit():
            self._error(HTTPStatus.LENGTH_REQUIRED, "a POST needs a Content-Length header")
            return None
        if int(length) > self.server.limits.max_body:
            self.close_connection = True               # the unread body must not be taken for a next request
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                        f"the body is {int(length):,} bytes; this server takes at most {self.server.limits.max_body:,}")
            return None
        kind = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        raw = self.rfile.read(int(length))
        if kind != "application/json":
            self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the body as JSON (Content-Type: application/json)")
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            self._error(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON in UTF-8 ({str(e).splitlines()[0]})")
            return None

    def do_POST(self):  # noqa: N802
        if not self._host_allowed():
            return
        path = self.path.split("?", 1)[0]
        if path not in ("/api/generate", "/api/stop"):
            self._error(HTTPStatus.NOT_FOUND, f"no API endpoint {path}")
            return
        body = self._body()
        if body is None:
            return
        if path == "/api/stop":
            job_id = body.get("id") if isinstance(body, dict) else None
            job = self.server.jobs.get(job_id) if isinstance(job_id, str) else None
            if job is not None:
                job.cancel()
            self._json(HTTPStatus.OK, {"stopped": job is not None})
            return
        try:
            name, job = parse_request(body, self.server.limits)
            catalogue = self.server.catalogue
            if name is None:
                models = list(catalogue.files())
                if len(models) != 1:
                    raise UsageError(f"name the model: this server serves {len(models)} (GET /api/models lists them)")
                name = models[0]
            engine, name = catalogue.engine(name)
            engine.submit(job)
        except UsageError as e:
            self._error(HTTPStatus.BAD_REQUEST, str(e))
            return
        except Busy as e:
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"{e}; try again shortly", {"Retry-After": "1"})
            return
        self.server.jobs[job.id] = job
        try:
            self._stream(job, name)
        finally:
            job.cancel()                  # a no-op if it ended; if we failed to write, it stops at once
            self.server.jobs.pop(job.id, None)
            self.close_connection = True

    # -- streaming ----------------------------------------------------------------------

    def _chunk(self, lines: list[dict]) -> None:
        data = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """The client closed its side: readable with nothing to read."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _stream(self, job: Job, name: str) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/x-ndjson; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.send_header("X-Accel-Buffering", "no")
        for key, value in SECURITY_HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        try:
            self._chunk([{"id": job.id, "model": name, "seed": job.seed, "samples": job.samples}])
            while True:
                try:
                    events = [job.events.get(timeout=0.1)]
                except queue.Empty:
                    if self._client_gone():
                        job.cancel()
                        return
                    continue
                while True:                   # everything produced meanwhile goes out in one write
                    try:
                        events.append(job.events.get_nowait())
                    except queue.Empty:
                        break
                lines, pieces, end = [], {}, None
                for kind, value in events:
                    if kind == "end":
                        end = value
                    elif kind == "warning":
                        lines.append({"warning": value})
                    else:
                        pieces.setdefault(kind, []).append(value)
                for sample, chars in sorted(pieces.items()):
                    lines.append({"text": "".join(chars)} if job.samples == 1 else
                                 {"text": "".join(chars), "sample": sample})
                if end is not None:
                    lines.append({"end": end, "characters": job.produced, "session": job.id})
                if lines:
                    self._chunk(lines)
                if end is not None:
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                    return
                time.sleep(STREAM_INTERVAL_S)     # let characters gather: fewer, larger writes
        except OSError:                       # the client went away mid-write
            job.cancel()


# ---------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------

class PlaygroundServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on connection threads: past it a connection gets 503 at once."""
    daemon_threads = True
    block_on_close = False
    request_queue_size = 128          # the listen backlog: socketserver's 5 resets a burst of clients

    def __init__(self, address, catalogue: Catalogue, limits: Limits, allow_hosts=(), verbose=False):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, Handler)
        self.catalogue, self.limits, self.verbose = catalogue, limits, verbose
        self.jobs: dict[str, Job] = {}
        self.max_connections = limits.slots + limits.max_waiting + 32
        self.connections = threading.BoundedSemaphore(self.max_connections)
        host, port = self.server_address[:2]
        self.url = f"http://{_url_host(address[0], host)}:{port}/"
        names = {address[0], host, "localhost", "127.0.0.1", "[::1]", *allow_hosts}
        if _is_wildcard(address[0]):
            names |= {socket.gethostname(), *_local_addresses()}
        names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names if n}
        self.allowed_hosts = {f"{n}:{port}".lower() for n in names} | ({n.lower() for n in names} if port == 80 else set())
        self.allowed_origins = {f"http://{h}" for h in self.allowed_hosts}
        self.public_limits = {"slots": limits.slots, "max_length": limits.max_length, "max_prompt": limits.max_prompt}

    def process_request(self, request, client_address):
        if not self.connections.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Retry-After: 1\r\nConnection: close\r\nContent-Length: 52\r\n\r\n"
                                b'{"error": "too many connections; try again shortly"}')
            except OSError:
                pass
            self.shutdown_request(request)
            return
        thread = threading.Thread(target=self._serve_then_release, args=(request, client_address), daemon=True)
        thread.start()

    def _serve_then_release(self, request, client_address):
        try:
            self.process_request_thread(request, client_address)
        finally:
            self.connections.release()

    def handle_error(self, request, client_address):
        if self.verbose:
            super().handle_error(request, client_address)


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


def serve(path: str, host: str = "127.0.0.1", port: int = 8000, device="cpu", limits: Limits | None = None,
          allow_hosts=(), say=print, warn=None, verbose=False) -> int:
    """Serve until Ctrl-C (or SIGTERM); returns the exit code."""
    limits = limits or Limits()
    limits.validate()
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be from 0 to 65535, got {port}")
    scheduler = Scheduler()
    catalogue = Catalogue(path, device, limits, scheduler)
    try:
        server = PlaygroundServer((host, port), catalogue, limits, allow_hosts, verbose)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use; pass --port with another (0 picks a free one)") from None
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    if not _is_loopback(host) and warn:
        warn(f"serving on {host or 'every address'}: anyone who can reach this machine can use the server "
             f"(there is no login); bind to 127.0.0.1 unless you mean it")
    models = catalogue.files()
    say(f"serving {len(models)} model{'s' if len(models) != 1 else ''} from {path} at {server.url}  (Ctrl-C stops)")

    def on_term(signum, frame):
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() \
        else None
    http = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="textgen-http",
                            daemon=True)
    http.start()
    try:
        scheduler.run()                     # the model work runs here, on the main thread
    except KeyboardInterrupt:
        say("shutting down")
    finally:
        server.shutdown()                   # no new connections...
        catalogue.close()                   # ...running generations end with "shutdown"...
        deadline = time.monotonic() + 3
        while server.jobs and time.monotonic() < deadline:
            time.sleep(0.02)                # ...and their streams say so before the process ends
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0

