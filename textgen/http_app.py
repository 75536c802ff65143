"""The playground's endpoints as an ASGI app, on starlette's requests and responses.

uvicorn (`http_server`) hands a request here once its whole head has arrived (h11 bounds a head that
arrives in pieces, and here one that arrived whole is bounded too). GET serves the page
and the listings; POST /api/generate reads the whole body (its size bounded here, its time by the
connection's deadline), checks it, and only then submits a job, so a client that sends slowly
never holds a generation slot. The job's characters leave as JSON lines: the stream waits on the
job's queue through the event loop, woken by the model's thread, so the loop never blocks on the
model; what arrives meanwhile goes out in one write, at most every STREAM_INTERVAL_S. A client
that goes away ends its job: starlette's stream listens for the disconnect and cancels the stream.

Every answer but a stream is JSON; an error is {"error": "one sentence"} with its status.

Imports server (limits, catalogue, request parsing), batching and errors.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
from importlib import resources

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from .batching import Busy, Events, Job
from .errors import UsageError
from .server import Catalogue, Limits, parse_json, parse_request

MAX_HEAD = 16 * 1024                # bytes of request line and headers

# A stream writes at most this often. The text still looks continuous (50 updates a second), and
# at thousands of characters a second a write per character would cost more than the model step.
STREAM_INTERVAL_S = 0.02

STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
          "/app.css": ("app.css", "text/css; charset=utf-8"),
          **{f"/{name}.js": (f"{name}.js", "text/javascript; charset=utf-8")
             for name in ("app", "fields", "stream", "history", "panes")}}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}



def http_words(name: str, value) -> str:
    """A setting as a JSON request names it: "temperature", or "unknown": "skip" with its value."""
    return json.dumps(name) if value is ... else f"{json.dumps(name)}: {json.dumps(value)}"

def usage_error(e: UsageError) -> dict:
    """A 400's JSON: the sentence in the API's words, and for a sentence that names settings its template
    and mentions (null where only the name is meant), so that the page can word it in its own labels
    and mark the fields it names."""
    answer = {"error": e.worded(http_words)}
    if e.mentions:
        answer["template"] = e.template
        answer["mentions"] = {name: None if value is ... else value if isinstance(value, (str, int, float)) else str(value)
                              for name, value in e.mentions.items()}
    return answer


class Refused(Exception):
    """A request answered with an error: its status, one sentence, and any headers to add."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def json_response(status: int, payload: dict, headers: dict | None = None) -> Response:
    return Response(json.dumps(payload).encode(), status, {**SECURITY_HEADERS, **(headers or {})}, "application/json")


def error_response(status: int, message: str, headers: dict | None = None) -> Response:
    return json_response(status, {"error": message}, headers)


class App:
    """The ASGI application: one instance per server, holding the generations it streams."""

    def __init__(self, catalogue: Catalogue, limits: Limits, url: str, hosts: set[str]):
        self.catalogue, self.limits, self.url = catalogue, limits, url
        # A proxy in front may serve the page over TLS: its origin is https://NAME.
        self.hosts, self.origins = hosts, {f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")}
        self.jobs: dict[str, Job] = {}
        self.public_limits = {"slots": limits.slots, "max_length": limits.max_length, "max_prompt": limits.max_prompt}
        self.pages = {path: (resources.files("textgen").joinpath("static", name).read_bytes(), kind)
                      for path, (name, kind) in STATIC.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return                          # lifespan events are off and websockets are not served
        try:
            response = await self._respond(Request(scope, receive))
        except Refused as e:
            response = error_response(e.status, str(e), e.headers)
        except UsageError as e:
            response = json_response(400, usage_error(e))
        except Busy as e:
            response = error_response(503, f"{e}; try again shortly", {"Retry-After": "1"})
        except ClientDisconnect:
            return                          # gone (or cut off by a deadline) before its body arrived
        except Exception:                   # noqa: BLE001  a bug of ours: still a JSON answer, and a log
            logging.getLogger("uvicorn.error").exception("textgen: the request failed")
            response = error_response(500, "the server failed on this request; its log says why")
        await response(scope, receive, send)

    async def _respond(self, request: Request) -> Response:
        scope = request.scope
        head = len(scope["raw_path"]) + len(scope["query_string"]) + sum(len(k) + len(v) + 4
                                                                        for k, v in scope["headers"])
        if head > MAX_HEAD:
            raise Refused(431, f"the request line and headers take more than {MAX_HEAD // 1024} KiB")
        if "transfer-encoding" in request.headers:
            # Closed after the answer: with a Content-Length beside it, it may be an attempt at request
            # smuggling (RFC 9112, 6.1), and a body we do not read must not be taken for a next request.
            raise Refused(411, "send the body with a Content-Length, not chunked", {"Connection": "close"})
        self._check_host(request)
        method, path = request.method, scope["path"]
        if method in ("GET", "HEAD"):
            return await self._get(path)
        if method != "POST":
            raise Refused(405, f"{method} is not answered here; use GET or POST", {"Allow": "GET, HEAD, POST"})
        if path == "/api/generate":
            return await self._generate(await self._json_body(request))
        if path == "/api/stop":
            return self._stop(await self._json_body(request))
        raise Refused(404, f"no API endpoint {path[:200]}")

    def _check_host(self, request: Request) -> None:
        host = request.headers.get("host")
        if host is None or host.lower() not in self.hosts:
            raise Refused(403, f"Host {host!r} is not this server's address; open {self.url} "
                               f"(this guards against DNS rebinding)")
        origin = request.headers.get("origin")
        if request.method == "POST" and origin is not None and origin.lower() not in self.origins:
            raise Refused(403, f"requests from pages at {origin} are refused")

    async def _get(self, path: str) -> Response:
        if path in self.pages:
            page, kind = self.pages[path]
            return Response(page, 200, SECURITY_HEADERS, kind)
        if path == "/api/models":           # may read checkpoints from disk: off the loop
            models = await asyncio.to_thread(self.catalogue.models)
            return json_response(200, {"models": models, "limits": self.public_limits})
        if path.startswith("/api/models/") and path.endswith("/loss.png"):
            name = path[len("/api/models/"):-len("/loss.png")]
            try:
                picture = await asyncio.to_thread(self.catalogue.loss_curve, name)
            except UsageError as e:
                raise Refused(404, str(e)) from None
            if picture is None:
                raise Refused(404, f"the run {name!r} has no loss curve (training draws loss.png when matplotlib "
                                   f"is installed)")
            return Response(picture, 200, SECURITY_HEADERS, "image/png")
        if path == "/api/status":
            return json_response(200, {"models": self.catalogue.status(), "generations": len(self.jobs)})
        raise Refused(404, f"no API endpoint {path[:200]}" if path.startswith("/api/") else f"nothing at {path[:200]}")

    async def _json_body(self, request: Request):
        """The whole body as JSON, checked against the limits before a byte of it is read."""
        length = request.headers.get("content-length")       # h11 let only one whole number through
        if length is None:
            raise Refused(411, "a POST needs a Content-Length header")
        if int(length) > self.limits.max_body:
            # Up to a few times the limit, the body is read and dropped after this answer, so a client still
            # sending it reads the answer rather than a broken pipe; a larger one is not worth reading.
            close = {"Connection": "close"} if int(length) > 4 * self.limits.max_body else {}
            raise Refused(413, f"the body is {int(length):,} bytes; this server takes at most {self.limits.max_body:,}",
                          close)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise Refused(415, "send the body as JSON (Content-Type: application/json)")
        return parse_json(await request.body())

    async def _generate(self, body) -> Response:
        name, job = parse_request(body, self.limits)
        engine, name = await asyncio.to_thread(self._engine, name)      # may load a checkpoint: off the loop
        engine.submit(job)
        return JobStream(job, name, self.jobs)

    def _stop(self, body) -> Response:
        job_id = body.get("id") if isinstance(body, dict) else None
        job = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is not None:
            job.cancel()
        return json_response(200, {"stopped": job is not None})

    def _engine(self, name):
        if name is None:
            models = list(self.catalogue.files())
            if len(models) != 1:
                raise UsageError(f"name the model: this server serves {len(models)} (GET /api/models lists them)")
            name = models[0]
        return self.catalogue.engine(name)


class JobStream(StreamingResponse):
    """A job's JSON lines. However the response ends (the job ended, the client went away, the server
    shut down), the job ends with it and leaves the server's list."""

    def __init__(self, job: Job, name: str, jobs: dict[str, Job]):
        super().__init__(_lines(job, name), media_type="application/x-ndjson; charset=utf-8",
                         headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})
        self.job, self.jobs = job, jobs

    async def __call__(self, scope, receive, send) -> None:
        self.jobs[self.job.id] = self.job
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()               # a no-op if it ended; if the client left, it stops at the next step
            self.jobs.pop(self.job.id, None)


async def _lines(job: Job, name: str):
    yield _ndjson([{"id": job.id, "model": name, "seed": job.seed, "samples": job.samples}])
    while True:
        lines, ended = _summary(await _arrived(job.events), job)
        if lines:
            yield _ndjson(lines)
        if ended:
            return
        await asyncio.sleep(STREAM_INTERVAL_S)      # let characters gather: fewer, larger writes


def _ndjson(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode("utf-8")


def _summary(events: list, job: Job) -> tuple[list[dict], bool]:
    """A batch of a job's events -> the lines to send (text joined per sample), and whether it ended."""
    lines, pieces, end = [], {}, None
    for kind, value in events:
        if kind == "end":
            end = value
        elif kind == "warning":
            lines.append({"warning": value})
        else:
            pieces.setdefault(kind, []).append(value)
    for sample, drawn in sorted(pieces.items()):
        line = {"text": "".join(d if isinstance(d, str) else d.char for d in drawn)}
        if job.logprobs is not None:            # each character's Scored, in the order of the text
            line["logprobs"] = [{"logprob": d.logprob, "top": d.top} for d in drawn]
        lines.append(line if job.samples == 1 else {**line, "sample": sample})
    if end is not None:
        lines.append({"end": end, "characters": job.produced, "session": job.id})
    return lines, end is not None


async def _arrived(events: Events) -> list:
    """Everything queued so far; while nothing is, wait without blocking the loop (the next put wakes us)."""
    loop = asyncio.get_running_loop()
    while True:
        got = []
        while True:
            try:
                got.append(events.get_nowait())
            except queue.Empty:
                break
        if got:
            return got
        ready = asyncio.Event()
        events.waiter = functools.partial(_wake, loop, ready)
        if events.empty():                  # looked again after setting the waiter: no put slips between
            try:
                await ready.wait()
            finally:
                events.waiter = None


def _wake(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
    """Called from the model's thread."""
    try:
        loop.call_soon_threadsafe(ready.set)
    except RuntimeError:                    # the loop has closed: nobody waits any more
        pass
