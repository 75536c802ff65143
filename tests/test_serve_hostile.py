"""Hostile and broken HTTP clients over loopback sockets: each gets a correct, readable answer or is cut
off at a deadline, the server goes on serving, and 300 slow clients cannot lock anyone out."""
import collections
import heapq
import http.client
import io
import itertools
import json
import selectors
import signal
import socket
import threading
import time

import pytest

from test_serve import Served, start_serve

HEAD_S = BODY_S = 2.0           # the deadlines of the shared server below (10 s and 20 s by default)


@pytest.fixture(scope="module")
def served(tiny_run):
    s = Served(tiny_run[0], slots=2, max_waiting=2, head_timeout=HEAD_S, body_timeout=BODY_S)
    yield s
    s.close()


def raw(request_line: str, *fields: str, body: bytes = b"", host: bool = True) -> bytes:
    """A request as bytes: the Host header first (unless host=False), and a right Content-Length when
    there is a body and `fields` give no Content-Length or Transfer-Encoding of their own."""
    names = {field.split(":")[0].lower() for field in fields}
    lines = [request_line, *(["Host: {HOST}"] if host else []), *fields]
    if body and not names & {"content-length", "transfer-encoding"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def post(body: bytes, *fields: str, path: str = "/api/generate", version: str = "1.1") -> bytes:
    return raw(f"POST {path} HTTP/{version}", "Content-Type: application/json", *fields, body=body)


def exchange(port: int, request: bytes, method: str = "GET"):
    """Send the bytes over a fresh socket; (status, headers, body) of the answer, parsed by http.client."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        try:
            sock.sendall(request.replace(b"{HOST}", f"127.0.0.1:{port}".encode()))
        except (BrokenPipeError, ConnectionResetError):
            pass                        # answered and closed before all of it was sent: read the answer
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        return response.status, response.headers, response.read()
    finally:
        sock.close()


GEN = '{"model": "run", "length": 20, "seed": 1'
ROWS = [
    # the body
    ("JSON nested 100,000 deep", post(b"[" * 100_000), 400, "nested 100,000 levels deep"),
    ("deep JSON in a field", post(b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"), 400, "nested 50,001 levels"),
    ("brackets in a string are text", post(b'{"model": "run", "prompt": "' + b"[" * 5000 + b'"}'), 400,
     "not in the model's vocabulary"),
    ("invalid UTF-8", post(b'{"prompt": "\xc3\x28"}'), 400, "not valid JSON in UTF-8"),
    ("not JSON", post(b"{'model': 'run'}"), 400, "not valid JSON"),
    ("a JSON string", post(b'"run"'), 400, "must be a JSON object"),
    ("JSON null", post(b"null"), 400, "must be a JSON object"),
    ("a 5,000-digit number", post(b'{"length": 1' + b"0" * 5000 + b"}"), 400, "not valid JSON"),
    ("a length of 1e999", post(b'{"model": "run", "length": 1e999}'), 400, "length must be int"),
    ("temperature 1e308", post(GEN.encode() + b', "temperature": 1e308}'), 400, "temperature"),
    ("a lone surrogate", post(b'{"model": "run", "prompt": "\\ud800"}'), 400, "lone surrogate"),
    ("text/plain", raw("POST /api/generate HTTP/1.1", "Content-Type: text/plain", body=b"{}"), 415, "as JSON"),
    # the framing
    ("Content-Length -1", post(b"{}", "Content-Length: -1"), 400, "Content-Length header is malformed"),
    ("Content-Length abc", post(b"{}", "Content-Length: abc"), 400, "Content-Length header is malformed"),
    ("two different Content-Lengths", post(b"{}", "Content-Length: 2", "Content-Length: 3"), 400,
     "Content-Length header is malformed"),
    ("a 25-digit Content-Length", post(b"{}", "Content-Length: " + "9" * 25), 400,
     "Content-Length header is malformed"),
    ("a Content-Length past the limit", post(b"", "Content-Length: 300000"), 413, "at most 262,144"),
    ("a 1 MB body, sent whole", post(b"x" * 1_000_000), 413, "the body is 1,000,000 bytes"),
    ("no Content-Length", post(b""), 411, "needs a Content-Length"),
    ("a chunked body", post(b"2\r\n{}\r\n0\r\n\r\n", "Transfer-Encoding: chunked"), 411, "not chunked"),
    ("Transfer-Encoding gzip", post(b"", "Transfer-Encoding: gzip"), 501, "not a valid HTTP request"),
    # the head
    ("a 20,000-byte header line", raw("GET / HTTP/1.1", "X-Big: " + "a" * 20_000), 431, "more than 16 KiB"),
    ("3,000 headers", raw("GET / HTTP/1.1", *(f"X-{i}: a" for i in range(3000))), 431, "more than 16 KiB"),
    ("a 300 KB head, arriving in pieces", raw("GET / HTTP/1.1", "X-Big: " + "a" * 300_000), 431, "more than 16 KiB"),
    ("a header with no colon", raw("GET / HTTP/1.1", "X-No-Colon"), 400, "not a valid HTTP request"),
    ("a NUL in a header", raw("GET / HTTP/1.1", "X-Nul: a\0b"), 400, "not a valid HTTP request"),
    ("a byte over 127 in the path", b"GET /\xff HTTP/1.1\r\nHost: {HOST}\r\n\r\n", 400, "not a valid HTTP request"),
    ("no HTTP version", b"GET /\r\n\r\n", 400, "not a valid HTTP request"),
    ("a TLS handshake", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)), 400,
     "not a valid HTTP request"),
    ("HTTP/1.1 without Host", raw("GET /api/models HTTP/1.1", host=False), 400, "Missing mandatory Host"),
    ("HTTP/1.0 without Host", raw("GET /api/models HTTP/1.0", host=False), 403, "DNS rebinding"),
    ("another site's Host", raw("GET /api/models HTTP/1.1", "Host: evil.example", host=False), 403, "DNS rebinding"),
    ("another site's Origin", post(GEN.encode() + b"}", "Origin: http://evil.example"), 403, "evil.example"),
    # the method and the path
    ("an unknown method", raw("BREW /api/models HTTP/1.1"), 405, "BREW is not answered here"),
    ("DELETE", raw("DELETE /api/generate HTTP/1.1"), 405, "use GET or POST"),
    ("a path with ..", raw("GET /../../etc/passwd HTTP/1.1"), 404, "nothing at /../../etc/passwd"),
    ("an encoded ..", raw("GET /%2e%2e/%2e%2e/textgen/server.py HTTP/1.1"), 404, "nothing at /../../textgen/server.py"),
    ("a path into the package", raw("GET /app.js/../../server.py HTTP/1.1"), 404, "nothing at"),
    ("an absolute URL", raw("GET http://evil.example/api/models HTTP/1.1"), 404, "nothing at"),
    ("a GET of the generate endpoint", raw("GET /api/generate HTTP/1.1"), 404, "no API endpoint /api/generate"),
]


@pytest.mark.parametrize("request_bytes, status, fragment", [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_a_hostile_request_gets_a_readable_answer_and_the_server_goes_on(served, request_bytes, status, fragment):
    code, headers, payload = exchange(served.port, request_bytes)
    assert code == status, payload[:300]
    assert headers["Content-Type"] == "application/json"
    message = json.loads(payload)["error"]
    assert fragment in message and "\n" not in message and len(message) < 400, message
    assert served.idle(), served.status()                  # no generation started, none left behind
    events = served.generate(model="run", length=5, seed=3)    # and a normal request is served
    assert events[-1]["end"] == "length"


def test_an_http10_client_gets_a_stream_it_can_read(served):
    """HTTP/1.0 has no chunked encoding: the stream is the body up to the close, its JSON lines intact."""
    body = json.dumps({"model": "run", "length": 300, "seed": 4, "temperature": 1.0}).encode()
    status, headers, payload = exchange(served.port, post(body, version="1.0"))
    assert status == 200 and "Transfer-Encoding" not in headers and headers["Connection"] == "close"
    events = [json.loads(line) for line in payload.decode().splitlines()]
    assert events[0]["model"] == "run"
    assert events[-1].pop("copy")["file"] == "corpus.txt"         # the copy report (tests/test_copy.py)
    assert events[-1] == {"end": "length", "characters": 300, "session": events[0]["id"]}
    same = served.generate(model="run", length=300, seed=4, temperature=1.0)        # HTTP/1.1, chunked
    assert "".join(e.get("text", "") for e in events) == "".join(e.get("text", "") for e in same)
    status, headers, payload = exchange(served.port, raw("GET /api/models HTTP/1.0"))
    assert status == 200 and json.loads(payload)["models"][0]["name"] == "run"


class _Received:
    """What a connection received, for http.client to parse one response after another."""

    def __init__(self, data: bytes):
        self.file = io.BytesIO(data)
        self.file.close = lambda: None                 # a response closes its file when read to the end

    def makefile(self, *args, **kwargs):
        return self.file


def read_to_close(sock) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def test_pipelined_requests_are_answered_in_order(served):
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    three = (raw("GET /api/status HTTP/1.1") + raw("GET /app.css HTTP/1.1")
             + raw("GET /nothing HTTP/1.1", "Connection: close"))
    sock.sendall(three.replace(b"{HOST}", f"127.0.0.1:{served.port}".encode()))
    received = _Received(read_to_close(sock))              # all three, then the close that the last asked for
    sock.close()
    answers = []
    for _ in range(3):
        response = http.client.HTTPResponse(received)
        response.begin()
        answers.append((response.status, response.headers["Content-Type"], response.read()))
    assert received.file.read() == b""
    assert [a[:2] for a in answers] == [(200, "application/json"), (200, "text/css; charset=utf-8"),
                                        (404, "application/json")]
    assert "generations" in json.loads(answers[0][2]) and "nothing at /nothing" in json.loads(answers[2][2])["error"]


def test_a_request_smuggled_behind_a_chunked_body_is_never_answered(served):
    """Content-Length and Transfer-Encoding together: 411, then the connection closes (RFC 9112, 6.1)."""
    smuggled = post(b"0\r\n\r\n" + raw("GET /api/status HTTP/1.1"), "Content-Length: 4", "Transfer-Encoding: chunked")
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.sendall(smuggled.replace(b"{HOST}", f"127.0.0.1:{served.port}".encode()))
    received = read_to_close(sock)
    sock.close()
    assert received.startswith(b"HTTP/1.1 411 ") and received.count(b"HTTP/1.1 ") == 1


# ---------------------------------------------------------------------------
# Deadlines
# ---------------------------------------------------------------------------

def trickle_until_closed(sock, data: bytes, every: float, limit: float) -> tuple[bytes, float]:
    """Send `data` a byte at a time; (what came back, seconds until the server closed), or fail at `limit`."""
    start, received, sent = time.monotonic(), b"", 0
    sock.setblocking(False)
    while time.monotonic() - start < limit:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return received, time.monotonic() - start
            received += chunk
        except BlockingIOError:
            pass
        except ConnectionResetError:
            return received, time.monotonic() - start
        if sent < len(data):
            try:
                sock.send(data[sent:sent + 1])
                sent += 1
            except OSError:
                pass
        time.sleep(every)
    pytest.fail(f"the server kept the connection open {limit} s (it sent {received[:200]!r})")


def _error_of(answer: bytes) -> tuple[str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)["error"]


def test_a_head_that_never_finishes_is_cut_at_its_deadline(served):
    sock = socket.create_connection(("127.0.0.1", served.port))
    endless = f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{served.port}\r\nX-Slow: ".encode() + b"a" * 1000
    answer, seconds = trickle_until_closed(sock, endless, every=0.05, limit=HEAD_S + 3)
    sock.close()
    assert HEAD_S - 0.2 < seconds < HEAD_S + 1.5            # bytes kept coming, and never restarted the clock
    status_line, message = _error_of(answer)
    assert status_line == "HTTP/1.1 408 Request Timeout" and "request head did not arrive within 2 s" in message


def test_the_next_head_on_a_kept_alive_connection_has_its_own_deadline(served):
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    sock.sendall(raw("GET /api/status HTTP/1.1").replace(b"{HOST}", f"127.0.0.1:{served.port}".encode()))
    response = http.client.HTTPResponse(sock)
    response.begin()
    assert response.status == 200 and json.loads(response.read())["generations"] == 0
    endless = b"GET /api/status HTTP/1.1\r\nX-Slow: " + b"a" * 1000
    answer, seconds = trickle_until_closed(sock, endless, every=0.05, limit=HEAD_S + 3)
    sock.close()
    assert seconds < HEAD_S + 1.5 and _error_of(answer)[0] == "HTTP/1.1 408 Request Timeout"


def test_a_connection_that_says_nothing_is_closed_without_an_answer(served):
    sock = socket.create_connection(("127.0.0.1", served.port))
    answer, seconds = trickle_until_closed(sock, b"", every=0.05, limit=HEAD_S + 3)
    sock.close()
    assert answer == b"" and HEAD_S - 0.2 < seconds < HEAD_S + 1.5


def test_a_body_that_trickles_past_its_deadline_never_becomes_a_job(served):
    body = json.dumps({"model": "run", "length": 20_000, "seed": 1}).encode()
    head = post(body).replace(b"{HOST}", f"127.0.0.1:{served.port}".encode())[:-len(body)]
    sock = socket.create_connection(("127.0.0.1", served.port))
    sock.sendall(head + body[:10])
    seen = []
    watcher = threading.Thread(target=lambda: [seen.append(served.status()) or time.sleep(0.2) for _ in range(8)])
    watcher.start()
    answer, seconds = trickle_until_closed(sock, body[10:-1], every=0.1, limit=BODY_S + 3)
    watcher.join()
    sock.close()
    assert BODY_S - 0.2 < seconds < BODY_S + 1.5
    status_line, message = _error_of(answer)
    assert status_line == "HTTP/1.1 408 Request Timeout" and "request body did not arrive within 2 s" in message
    assert len(seen) == 8 and all(s["generations"] == 0 and s["models"].get("run", {}).get("busy_slots", 0) == 0
                                  and s["models"].get("run", {}).get("waiting", 0) == 0 for s in seen), seen
    assert served.idle()


def test_at_shutdown_a_request_still_arriving_gets_503_at_once(tiny_run):
    """It has no job yet: it must not hold the exit for the 3 s grace and then be cut with a plain 500."""
    proc, port, _ = start_serve(tiny_run[0])
    slow = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps({"length": 10}).encode()
    slow.sendall(post(body).replace(b"{HOST}", f"127.0.0.1:{port}".encode())[:-1])
    time.sleep(0.3)                                        # the head is in; the body never completes
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    answer = read_to_close(slow)
    slow.close()
    out, err = proc.communicate(timeout=15)
    assert _error_of(answer) == ("HTTP/1.1 503 Service Unavailable", "the server is shutting down; try again shortly")
    assert proc.returncode == 0 and "Traceback" not in err and time.monotonic() - began < 3.0, err


# ---------------------------------------------------------------------------
# 300 slow clients
# ---------------------------------------------------------------------------

class Tricklers:
    """`n` connections, each sending one byte of a request head that never ends every `every` seconds,
    all from one thread. A connection the server cuts is opened again at once, as an attacker would;
    one refused at once is tried again a period later."""

    def __init__(self, port: int, n: int, every: float):
        self.port, self.n, self.every = port, n, every
        self.head = f"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode() + b"a" * 10_000
        self.selector = selectors.DefaultSelector()
        self.open: dict[socket.socket, list] = {}          # each open connection: [bytes sent, when opened]
        self.due: list = []                                # heap of (when, tiebreak, socket to send on or None to open)
        self.answers: collections.Counter = collections.Counter()      # status codes the server cut us off with
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()

    def stop(self):
        self.stopping.set()
        self.thread.join()
        for sock in list(self.open):
            sock.close()

    def _later(self, when: float, sock=None):
        heapq.heappush(self.due, (when, next(self.tiebreak), sock))

    def _open(self, now: float):
        try:
            sock = socket.create_connection(("127.0.0.1", self.port))
        except OSError:
            self._later(now + self.every)
            return
        sock.setblocking(False)
        self.open[sock] = [0, now]
        self.selector.register(sock, selectors.EVENT_READ)
        self._later(now, sock)

    def _send(self, sock, now: float):
        sent = self.open[sock][0]
        try:
            sock.send(self.head[sent:sent + 1])
            self.open[sock][0] += 1
            self._later(now + self.every, sock)
        except OSError:
            self._cut(sock, now)

    def _cut(self, sock, now: float):
        lived = now - self.open.pop(sock)[1]
        self.selector.unregister(sock)
        sock.close()
        self._later(now if lived > 1.0 else now + self.every)

    def _run(self):
        self.tiebreak = itertools.count()
        start = time.monotonic()
        for i in range(self.n):                            # spread over one period, as clients arrive
            self._later(start + i * self.every / self.n)
        while not self.stopping.is_set():
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _, _, sock = heapq.heappop(self.due)
                if sock is None:
                    self._open(now)
                elif sock in self.open:
                    self._send(sock, now)
            wait = min(0.1, max(0.0, self.due[0][0] - time.monotonic())) if self.due else 0.1
            for key, _ in self.selector.select(timeout=wait):
                try:
                    answer = key.fileobj.recv(65536)
                except OSError:
                    answer = b""
                if answer.startswith(b"HTTP/1.1 "):
                    self.answers[int(answer[9:12])] += 1
                self._cut(key.fileobj, time.monotonic())


def test_300_slow_clients_cannot_lock_out_the_others(tiny_run):
    """300 connections each send one byte of a request head every 2 s for 40 s; a generate request
    made every 2 s meanwhile is answered, whole, within 5 s every time."""
    served = Served(tiny_run[0])                           # the default limits, as `textgen serve` runs
    slow = Tricklers(served.port, n=300, every=2.0)
    try:
        slow.start()
        connected_by = time.monotonic() + 15.0             # all 300 connected and sending before the clock starts
        while len(slow.open) < 300 and time.monotonic() < connected_by:      # (2 s was not always enough on a
            time.sleep(0.05)                               # busy 2-core machine: 252 open at the first request)
        results, open_counts = [], []
        start = time.monotonic()
        for i in range(20):
            time.sleep(max(0.0, start + 2.0 * i - time.monotonic()))
            open_counts.append(len(slow.open))
            began = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=5)
                conn.request("POST", "/api/generate", json.dumps({"length": 50, "seed": i}),
                             {"Content-Type": "application/json"})
                response = conn.getresponse()
                lines = response.read().decode().splitlines()
                conn.close()
                outcome = (response.status, json.loads(lines[-1]).get("end") if lines else None)
            except OSError as e:                           # a timeout is an OSError too
                outcome = (type(e).__name__, str(e))
            results.append((outcome, round(time.monotonic() - began, 2)))
    finally:
        slow.stop()
        served.close()
    assert all(outcome == (200, "length") and seconds <= 5.0 for outcome, seconds in results), results
    assert min(open_counts) >= 290, open_counts            # the pressure was on all along
    assert slow.answers[408] >= 600, slow.answers          # and the head deadline (10 s) cut them, again and again
