"""uvicorn on a thread of its own, with the deadlines and the connection cap a public server needs.

uvicorn's asyncio server holds a connection as a socket and a few objects, never a thread, so
thousands of idle or slow clients cost little; h11 frames HTTP/1.0 and 1.1 correctly (a stream to
an HTTP/1.0 client, which knows no chunked encoding, ends when the connection closes). h11 is named
explicitly rather than httptools, so behaviour never depends on an optional C parser. What uvicorn
leaves out, `GuardedH11Protocol` adds:

* deadlines: the whole request head must arrive within `head_timeout` of the connection opening
  (or of the previous response ending), and the body within `body_timeout` of the head. Bytes
  that trickle in never restart them, where uvicorn's keep-alive timeout restarts on every byte.
  Past one, a partly sent request gets 408 and the connection closes. The app submits a job only
  once the whole body is here, so a body that never completes never takes a generation slot;
* a connection cap: past `max_connections` (lowered to what the open-file limit allows), a new
  connection gets 503 at once; uvicorn's limit_concurrency answers only once a head has arrived;
* a request that is not valid HTTP (a malformed Content-Length, a head over 16 KiB, a bad request
  line) gets its status and a JSON sentence, where uvicorn answers in plain text;
* at shutdown, a request whose body is still arriving gets 503 at once instead of holding the exit.

The model work stays on the caller's thread (`serve` runs it on the main thread).

Imports http_app and server.
"""
from __future__ import annotations

import asyncio
import copy
import functools
import json
import sys
import threading
import time
from http import HTTPStatus

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .http_app import MAX_HEAD, SECURITY_HEADERS, App
from .server import Catalogue, Limits, addresses, listen

KEEP_ALIVE_S = 5                    # an idle connection between requests closes after this
SHUTDOWN_GRACE_S = 3                # open streams get this long to say "shutdown" before they are cut


def raw_answer(status: int, message: str, headers: dict | None = None) -> bytes:
    """A whole response with a JSON error, for a connection closed right after (no request to frame it by)."""
    body = json.dumps({"error": message}).encode()
    fields = {"Content-Type": "application/json", "Content-Length": str(len(body)), "Connection": "close",
              **SECURITY_HEADERS, **(headers or {})}
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", *(f"{key}: {value}" for key, value in fields.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def framing_error(error: BaseException | None) -> tuple[int, str]:
    """h11's complaint about a request -> (status, one sentence)."""
    text = str(error)[:200] if error is not None else "unreadable"
    if "Content-Length" in text:
        return 400, f"the Content-Length header is malformed ({text}); send one, a whole number of bytes"
    status = getattr(error, "error_status_hint", 400)
    if status == 431:
        return 431, f"the request line and headers take more than {MAX_HEAD // 1024} KiB"
    return status, f"this is not a valid HTTP request ({text})"


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each part of a request, a connection cap and JSON errors."""

    def __init__(self, *args, limits: Limits, max_connections: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.limits, self.max_connections = limits, max_connections
        self.awaiting: tuple | None = None  # (the part of a request awaited, the cycle it follows or belongs to)
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:             # this one counted
            self._refuse(503, "too many connections; try again shortly", {"Retry-After": "1"})
        else:
            self._watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def shutdown(self) -> None:
        # A request whose body is still arriving has no job yet: nothing to finish, so it is answered now
        # rather than holding the exit for the grace period and then being cut with a plain-text 500.
        if self.conn.their_state is h11.SEND_BODY and not self.cycle.response_started \
                and not self.transport.is_closing():
            self._refuse(503, "the server is shutting down; try again shortly", {"Retry-After": "1"})
        else:
            super().shutdown()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside `except h11.RemoteProtocolError:`, so that error is the one being handled.
        status, message = framing_error(sys.exc_info()[1])
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):       # no answer of ours has begun
            self._refuse(status, message)
        else:
            self.transport.close()

    def _watch(self) -> None:
        """Arm the deadline for the part of a request now awaited; bytes that trickle in never re-arm it."""
        if self.transport.is_closing():
            self._disarm()
            return
        state = self.conn.their_state
        part = "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None
        if self.awaiting is not None and self.awaiting[0] == part and self.awaiting[1] is self.cycle:
            return
        self._disarm()
        self.awaiting = (part, self.cycle)
        if part is not None:
            seconds = self.limits.head_timeout if part == "head" else self.limits.body_timeout
            self.deadline = self.loop.call_later(seconds, self._expired, part, seconds)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self, part: str, seconds: float) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        begun = bool(self.conn.trailing_data[0]) if part == "head" else not self.cycle.response_started
        if begun:                           # a request is partly here and unanswered: say why it ends
            self._refuse(408, f"the request {part} did not arrive within {seconds:g} s; send it whole, promptly")
        else:                               # idle between requests, or answered already: nothing to say
            self.transport.close()

    def _refuse(self, status: int, message: str, headers: dict | None = None) -> None:
        self.transport.write(raw_answer(status, message, headers))
        self.transport.close()


def connection_cap(wanted: int) -> int:
    """`wanted`, or fewer where the open-file limit is lower (raised first as far as it may be)."""
    try:
        import resource
    except ImportError:                     # Windows: no such limit to mind
        return wanted
    spare = 256                             # files beside the connections: checkpoints, pipes, the listener
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(65536, hard if hard != resource.RLIM_INFINITY else 65536)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else max(1, min(wanted, soft - spare))


def _log_config(verbose: bool) -> dict | None:
    if not verbose:
        return None                         # errors still reach stderr through logging's last resort
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"      # --verbose logs every request to stderr
    return config


class PlaygroundServer:
    """The listening socket, and uvicorn serving the app on an event loop in a thread of its own."""

    def __init__(self, address: tuple[str, int], catalogue: Catalogue, limits: Limits, allow_hosts=(),
                 verbose: bool = False, api_key: str | None = None):
        self.socket = listen(*address)      # OSError (e.g. the port is in use) is the caller's to word
        bound, self.port = self.socket.getsockname()[:2]
        self.url, hosts = addresses(address[0], bound, self.port, allow_hosts)
        self.max_connections = connection_cap(limits.max_connections)
        self.app = App(catalogue, limits, self.url, hosts, api_key)
        protocol = functools.partial(GuardedH11Protocol, limits=limits, max_connections=self.max_connections)
        config = uvicorn.Config(self.app, http=protocol, ws="none", lifespan="off", loop="asyncio", interface="asgi3",
                                proxy_headers=False, server_header=False, headers=[("Server", "textgen")],
                                h11_max_incomplete_event_size=MAX_HEAD, timeout_keep_alive=KEEP_ALIVE_S,
                                timeout_graceful_shutdown=SHUTDOWN_GRACE_S, log_config=_log_config(verbose),
                                log_level="info" if verbose else "error", access_log=verbose)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]},
                                       name="textgen-http", daemon=True)

    def start(self) -> None:
        """Serve from the thread; returns once it takes connections."""
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server stopped while starting; its log above says why")
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Take no more connections; open streams may finish, for up to SHUTDOWN_GRACE_S."""
        self.server.should_exit = True

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
