"""The playground's endpoints as an ASGI app, on starlette's requests and responses.

uvicorn (`http_server`) hands a request here once its whole head has arrived (h11 bounds a head that
arrives in pieces, and here one that arrived whole is bounded too). GET serves the page
and the listings; POST /api/generate reads the whole body (its size bounded here, its time by the
connection's deadline), checks it, and only then submits a job, so a client that sends slowly
never holds a generation slot. The job's characters leave as JSON lines: the stream waits on the
job's queue through the event loop, woken by the model's thread, so the loop never blocks on the
model; what arrives meanwhile goes out in one write, at most every STREAM_INTERVAL_S. A client
that goes away ends its job: starlette's stream listens for the disconnect and cancels the stream.

Every answer but a stream is JSON; an error is {"error": "one sentence"} with its status. OpenAI's
protocol (`openai_api`: /v1/..., /tokenize) is routed there, its errors in OpenAI's shape, behind the
same checks: Host and Origin, the body limit, and, where the server has an API key, the key (every API
path, both protocols; the page's own files stay public), compared in constant time.

Imports server (limits, catalogue, request parsing), openai_api, batching and errors.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from importlib import resources
from urllib.parse import unquote

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from ..generation.jobs import Busy, Job, arrived
from . import openai_api
from ..errors import UsageError
from .openai_api import OpenAIError
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


def openai_error_response(error: OpenAIError, headers: dict | None = None) -> Response:
    return json_response(error.status, openai_api.error_body(error.status, str(error), error.param, error.code),
                         headers)


class App:
    """The ASGI application: one instance per server, holding the generations it streams."""

    def __init__(self, catalogue: Catalogue, limits: Limits, url: str, hosts: set[str], api_key: str | None = None):
        self.catalogue, self.limits, self.url = catalogue, limits, url
        self.api_key = None if api_key is None else api_key.encode()
        # A proxy in front may serve the page over TLS: its origin is https://NAME.
        self.hosts, self.origins = hosts, {f"{scheme}://{h}" for h in hosts for scheme in ("http", "https")}
        self.jobs: dict[str, Job] = {}
        self.public_limits = {"slots": limits.slots, "max_length": limits.max_length, "max_prompt": limits.max_prompt}
        self.pages = {path: (resources.files("textgen.serving").joinpath("static", name).read_bytes(), kind)
                      for path, (name, kind) in STATIC.items()}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return                          # lifespan events are off and websockets are not served
        openai = openai_api.serves(scope["path"])
        try:
            response = await self._respond(Request(scope, receive))
        except OpenAIError as e:
            response = openai_error_response(e)
        except Refused as e:
            response = openai_error_response(OpenAIError(e.status, str(e)), e.headers) if openai else \
                error_response(e.status, str(e), e.headers)
        except UsageError as e:
            response = openai_error_response(openai_api.as_error(e)) if openai else \
                json_response(400, usage_error(e))
        except Busy as e:
            message, retry = f"{e}; try again shortly", {"Retry-After": "1"}
            response = openai_error_response(OpenAIError(503, message, code="overloaded"), retry) if openai else \
                error_response(503, message, retry)
        except ClientDisconnect:
            return                          # gone (or cut off by a deadline) before its body arrived
        except Exception:                   # noqa: BLE001  a bug of ours: still a JSON answer, and a log
            logging.getLogger("uvicorn.error").exception("textgen: the request failed")
            message = "the server failed on this request; its log says why"
            response = openai_error_response(OpenAIError(500, message)) if openai else error_response(500, message)
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
        if path not in self.pages:
            self._check_key(request)
        if openai_api.serves(path):
            return await self._openai(request, method, path)
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

    def _check_key(self, request: Request) -> None:
        """With an API key set, every API request must carry it: Authorization: Bearer KEY."""
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes as long whatever the first wrong byte: the key cannot be guessed byte by byte.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key):
            raise Refused(401, "this server needs its API key: send the header Authorization: Bearer KEY "
                               "(the key given to textgen serve --api-key)", {"WWW-Authenticate": "Bearer"})

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
        return JobStream([job], _lines(job, name, engine), NDJSON, self.jobs)

    # -- OpenAI's protocol ---------------------------------------------------------------

    async def _openai(self, request: Request, method: str, path: str) -> Response:
        get = method in ("GET", "HEAD")
        if path == "/v1/models" and get:
            files = await asyncio.to_thread(self.catalogue.files)
            return json_response(200, {"object": "list", "data": [openai_api.model_card(name, _mtime(file))
                                                                   for name, file in files.items()]})
        if path.startswith("/v1/models/") and get:
            name = unquote(path[len("/v1/models/"):])
            file = (await asyncio.to_thread(self.catalogue.files)).get(name)
            if file is None:
                raise _no_such_model(name)
            return json_response(200, openai_api.model_card(name, _mtime(file)))
        if path == "/v1/completions" and method == "POST":
            return await self._completions(request)
        if path in ("/tokenize", "/detokenize") and method == "POST":
            body = await self._json_body(request)
            engine, _ = await asyncio.to_thread(self._openai_engine, body.get("model") if isinstance(body, dict)
                                                else None)
            return json_response(200, openai_api.tokenize(body, engine.tokenizer, self.limits) if path == "/tokenize"
                                 else openai_api.detokenize(body, engine.tokenizer))
        if path == "/tokenizer_info" and get:
            engine, name = await asyncio.to_thread(self._openai_engine, request.query_params.get("model"))
            return json_response(200, openai_api.tokenizer_info(name, engine.tokenizer))
        known = {"/v1/models": "GET", "/v1/completions": "POST", "/tokenize": "POST", "/detokenize": "POST",
                 "/tokenizer_info": "GET"}
        if path in known:
            raise OpenAIError(405, f"{method} is not answered at {path}; use {known[path]}")
        raise OpenAIError(404, f"no endpoint {path[:200]} (this server speaks /v1/models and /v1/completions)")

    async def _completions(self, request: Request) -> Response:
        completion = openai_api.parse_completion(await self._json_body(request), self.limits)
        engine, name = await asyncio.to_thread(self._openai_engine, completion.model)
        jobs = completion.jobs(engine.tokenizer, self.limits)
        for k, job in enumerate(jobs):
            try:
                engine.submit(job)
            except Exception:
                for submitted in jobs[:k]:
                    submitted.cancel()
                raise
        completing = openai_api.Completing(completion, jobs, name)
        if completion.stream:
            return JobStream(jobs, openai_api.chunks(completing, STREAM_INTERVAL_S), "text/event-stream", self.jobs)
        for job in jobs:
            self.jobs[job.id] = job
        try:
            return json_response(200, await _unless_gone(request, openai_api.complete(completing)))
        finally:
            for job in jobs:
                job.cancel()
                self.jobs.pop(job.id, None)

    def _openai_engine(self, name):
        """The engine of the named model; OpenAI's 404 for a name that is not served (never a path)."""
        files = self.catalogue.files()
        if name is None and len(files) == 1:
            name = next(iter(files))
        if name is None:
            raise OpenAIError(400, f"name the model: this server serves {len(files)} (GET /v1/models lists them)",
                              "model", "missing_model")
        if not isinstance(name, str) or name not in files:
            raise _no_such_model(name)
        return self.catalogue.engine(name)

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


NDJSON = "application/x-ndjson; charset=utf-8"


class JobStream(StreamingResponse):
    """Jobs' output as a stream (JSON lines, or OpenAI's server-sent events). However the response ends
    (the jobs ended, the client went away, the server shut down), the jobs end with it and leave the
    server's list."""

    def __init__(self, jobs: list[Job], body, media_type: str, registry: dict[str, Job]):
        super().__init__(body, media_type=media_type, headers={**SECURITY_HEADERS, "X-Accel-Buffering": "no"})
        self.jobs, self.registry = jobs, registry

    async def __call__(self, scope, receive, send) -> None:
        self.registry.update((job.id, job) for job in self.jobs)
        try:
            await super().__call__(scope, receive, send)
        finally:
            for job in self.jobs:
                job.cancel()                # a no-op if it ended; if the client left, it stops at the next call
                self.registry.pop(job.id, None)


def _no_such_model(name) -> OpenAIError:
    return OpenAIError(404, f"the model {str(name)[:100]!r} does not exist here; GET /v1/models lists them",
                       "model", "model_not_found")


def _mtime(file: str) -> float:
    try:
        return os.path.getmtime(file)
    except OSError:
        return 0.0


async def _unless_gone(request: Request, work):
    """The result of work, unless the client goes away first (then ClientDisconnect, and work is cancelled)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled() or not task.done():
        raise ClientDisconnect()
    return task.result()


async def _lines(job: Job, name: str, engine=None):
    yield _ndjson([{"id": job.id, "model": name, "seed": job.seed, "samples": job.samples}])
    texts: dict[int, list[str]] = {}
    while True:
        lines, ended = _summary([event for _, event in await arrived([job])], job)
        for line in lines:                          # the text as sent, kept for the copy report
            if "text" in line:
                texts.setdefault(line.get("sample", 0), []).append(line["text"])
        if ended and engine is not None:            # the report reads the index: off the loop
            outputs = ["".join(texts.get(i, [])) for i in range(job.samples)]
            lines[-1]["copy"] = await asyncio.to_thread(copy_report, engine, outputs)
        if lines:
            yield _ndjson(lines)
        if ended:
            return
        await asyncio.sleep(STREAM_INTERVAL_S)      # let characters gather: fewer, larger writes


def copy_report(engine, outputs: list[str]) -> dict:
    """The final line's "copy": the longest span of the output found verbatim in the training text
    ({"length", "text", "sample", "line", "offset", "occurrences", "file"}: the file's name only, never its path), or
    {"unavailable": why}."""
    if engine.copy_index is None:
        return {"unavailable": engine.copy_note}
    report = engine.copy_index.report(outputs)
    return {"length": report["length"], "text": report["text"], "sample": report["sample"], "line": report["line"],
            "offset": report["offset"], "occurrences": report["occurrences"],
            "file": os.path.basename(report["path"] or "")}


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
        elif isinstance(kind, int):
            pieces.setdefault(kind, []).append(value)
    for sample, drawn in sorted(pieces.items()):
        line = {"text": "".join(d if isinstance(d, str) else d.char for d in drawn)}
        if job.logprobs is not None:            # each character's Scored, in the order of the text
            line["logprobs"] = [{"logprob": d.logprob, "top": d.top} for d in drawn]
        lines.append(line if job.samples == 1 else {**line, "sample": sample})
    if end is not None:
        lines.append({"end": end, "characters": job.produced, "session": job.id})
    return lines, end is not None
