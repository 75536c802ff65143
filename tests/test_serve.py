"""`textgen serve` over loopback HTTP: the API, continuous batching, limits, and the rules of a real server."""
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, run, train_tiny
from textgen.serving import server as served_module
from textgen.generation.batching import BatchingEngine
from textgen.generation.jobs import Job, Scheduler
from textgen.checkpoint import load_model
from textgen.serving.http_server import PlaygroundServer
from textgen.generation.generator import Generator
from textgen.generation.sampling import SampleConfig


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder of two trained runs: alpha (2x32) and beta (1x48, with DropConnect)."""
    root = tmp_path_factory.mktemp("runs")
    (root / "a").mkdir()
    (root / "b").mkdir()
    alpha, text = train_tiny(root / "a")
    beta, _ = train_tiny(root / "b", "--hidden-size", "48", "--layers", "1", "--weight-dropout", "0.25")
    folder = root / "served"
    folder.mkdir()
    os.rename(alpha, folder / "alpha")
    os.rename(beta, folder / "beta")
    return str(folder), text


class Served:
    """The server as `textgen serve` runs it (uvicorn on a thread of its own), with the scheduler on another."""

    def __init__(self, path, allow_hosts=(), **limits):
        self.limits = served_module.Limits(**limits)
        self.scheduler = Scheduler()
        self.catalogue = served_module.Catalogue(path, "cpu", self.limits, self.scheduler)
        self.httpd = PlaygroundServer(("127.0.0.1", 0), self.catalogue, self.limits, allow_hosts=allow_hosts)
        self.port = self.httpd.port
        self.scheduler.run_in_thread()
        self.httpd.start()

    def close(self):
        self.httpd.shutdown()
        self.scheduler.stop()
        self.catalogue.close()
        self.httpd.wait(timeout=10)

    def request(self, method, path, body=None, headers=None, raw=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        hdrs = {"Content-Type": "application/json"} if data is not None else {}
        hdrs.update(headers or {})
        conn.request(method, path, data, hdrs)
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, response.headers, payload     # headers: looked up by name in any case, as HTTP says

    def generate(self, **body):
        """Every event of a finished stream."""
        status, headers, payload = self.request("POST", "/api/generate", body)
        assert status == 200, payload
        return [json.loads(line) for line in payload.decode().splitlines()]

    def open_stream(self, **body):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("POST", "/api/generate", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = json.loads(response.readline())
        return conn, response, first

    def status(self):
        return json.loads(self.request("GET", "/api/status")[2])

    def until(self, holds, timeout=5.0):
        """Poll /api/status until holds(status) is true or the deadline passes; the last status seen."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status()
            if holds(status) or time.monotonic() > deadline:
                return status
            time.sleep(0.02)

    def idle(self, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.status()
            if s["generations"] == 0 and all(m["busy_slots"] == 0 and m["waiting"] == 0 for m in s["models"].values()):
                return True
            time.sleep(0.02)
        return False


@pytest.fixture
def served(runs):
    s = Served(runs[0], slots=4, max_waiting=2, max_length=20_000)
    yield s
    s.close()


def text_of(events, sample=None):
    return "".join(e["text"] for e in events if "text" in e and (sample is None or e.get("sample", 0) == sample))


# ---------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------

def test_models_are_listed_with_what_textgen_info_shows(served, runs):
    status, headers, payload = served.request("GET", "/api/models")
    assert status == 200 and headers["Content-Type"] == "application/json"
    models = {m["name"]: m for m in json.loads(payload)["models"]}
    assert set(models) == {"alpha", "beta"}
    from textgen.checkpoint import load
    for name, layers, hidden in (("alpha", 2, 32), ("beta", 1, 48)):
        ckpt = load(os.path.join(runs[0], name, "best.pt"))
        m = models[name]
        assert (m["layers"], m["hidden_size"], m["steps"]) == (layers, hidden, ckpt["step"])
        assert m["vocab_size"] == len(ckpt["vocab"]["chars"])
        assert m["parameters"] == sum(t.numel() for t in ckpt["model"].values())
        assert m["best_val_bits_per_char"] == pytest.approx(ckpt["best_val_loss"] / 0.6931471805599453, abs=1e-4)
        saved = ckpt["model_config"]
        assert m["regularisers"] == {k: saved[k] for k in ("dropout", "input_dropout", "embed_dropout", "weight_dropout")
                                     if saved[k]}
        assert m["head"] == "full" and m["averaged_weights"] == (ckpt.get("averaged_model") is not None)
        assert "/" not in m["file"]                 # a name, never a path on this machine


def test_a_stream_is_json_lines_that_add_up(served):
    events = served.generate(model="alpha", prompt="ANNA:\n", length=120, seed=5, temperature=1.0)
    assert events[0]["model"] == "alpha" and events[0]["seed"] == 5 and events[0]["samples"] == 1
    copy = events[-1].pop("copy")              # the copy report (tests/test_copy.py checks its figures)
    assert events[-1] == {"end": "length", "characters": 120, "session": events[0]["id"]}
    assert len(text_of(events)) == 120
    assert set(copy) == {"length", "text", "sample", "line", "offset", "occurrences", "file"}
    assert copy["file"] == "corpus.txt" and copy["text"] in text_of(events)


def test_the_server_gives_what_generate_gives_for_a_seed_at_batch_one(runs):
    """One slot: the batch is one row, as generate.py's; the same seed gives the same text."""
    s = Served(runs[0], slots=1)
    try:
        events = s.generate(model="alpha", prompt="ANNA:\n", length=200, seed=9, temperature=1.0, top_k=20)
    finally:
        s.close()
    model, tokenizer, _ = load_model(os.path.join(runs[0], "alpha"))
    gen = Generator(model, tokenizer, seed=9)
    gen.feed("ANNA:\n")
    assert text_of(events) == gen.generate(SampleConfig(length=200, temperature=1.0, top_k=20))[0]


def test_stop_string_and_samples(served):
    events = served.generate(model="alpha", prompt="ANNA:\n", length=5000, seed=1, stop="\n")
    assert events[-1]["end"] == "stop" and text_of(events).endswith("\n") and text_of(events).count("\n") == 1
    events = served.generate(model="alpha", prompt="B", length=50, seed=2, num_samples=3, temperature=1.5)
    texts = [text_of(events, k) for k in range(3)]
    assert all(len(t) == 50 for t in texts) and len(set(texts)) == 3


def test_continue_carries_the_state_and_the_randomness_on(served):
    whole = served.generate(model="alpha", prompt="CLÉO:\n", length=300, seed=4, temperature=1.0)
    first = served.generate(model="alpha", prompt="CLÉO:\n", length=120, seed=4, temperature=1.0)
    second = served.generate(model="alpha", length=180, temperature=1.0, **{"continue": first[-1]["session"]})
    assert text_of(first) + text_of(second) == text_of(whole)
    # reading more text from the carried state, as an interactive turn does
    third = served.generate(model="alpha", prompt="\nANNA:\n", length=50, seed=3, **{"continue": second[-1]["session"]})
    assert len(text_of(third)) == 50


# ---------------------------------------------------------------------------
# Continuous batching
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch", ["busy rows", "fixed"])
def test_a_request_gives_the_same_text_alone_or_in_a_crowd(runs, batch):
    """Bitwise: the text and the state it ends in, whatever row it gets and whoever else runs. The batch
    is the busy rows: the lone request steps a batch of 1, the crowd batches of 2 to 7, rows closing up
    as jobs leave; where the stepper's rows do not agree at every size (a GPU, say), all 8 slots."""
    from textgen.lstm import Stepper
    model, tokenizer, _ = load_model(os.path.join(runs[0], "alpha"))
    engine = BatchingEngine(model, tokenizer, slots=8, max_waiting=16)
    if batch == "fixed":
        engine.stepper = Stepper(model)                     # the fastest product at each size: no row agreement
    sizes = []                                              # the batch size of every step

    class Recording:
        """The engine's stepper, recording the batch size of every step it takes, one at a time or many."""
        def __init__(self, stepper):
            self.stepper, self.rows_agree, self.decodes = stepper, stepper.rows_agree, stepper.decodes

        def __call__(self, tokens, state, styles=None):
            sizes.append(len(tokens))
            return self.stepper(tokens, state, styles)

        def decode(self, logits, *rest):
            decoded = self.stepper.decode(logits, *rest)
            sizes.extend([len(logits)] * (0 if decoded is None else len(decoded[0])))
            return decoded
    engine.stepper = Recording(engine.stepper)
    try:
        def job(seed, **settings):
            config = SampleConfig(length=settings.pop("length", 400), seed=seed, **settings)
            return Job(settings.pop("prompt", "DMITRI:\n"), config)

        alone = engine.submit(job(7, temperature=1.0, top_p=0.9))
        alone.finished.wait(30)
        assert set(sizes) == ({1} if engine.stepper.rows_agree else {8})
        # Long enough that the crowd is still running when the last two join (a step of 5 rows takes
        # well under 0.1 ms here: 300 characters were over within a 50 ms wait).
        crowd = [engine.submit(job(s, temperature=t, top_k=k, length=n))
                 for s, t, k, n in ((1, 0.5, None, 2800), (2, 1.3, 5, 1200), (3, 0.0, None, 3600))]
        crowd.append(engine.submit(job(4, temperature=1.0, num_samples=2, length=2400)))
        waited = time.monotonic()           # the crowd is running: the request joins mid-flight
        while not all(j.produced for j in crowd) and time.monotonic() - waited < 30:
            time.sleep(0.001)
        again = engine.submit(job(7, temperature=1.0, top_p=0.9))
        crowd.append(engine.submit(job(5, temperature=0.9, length=400)))
        for j in crowd + [again]:
            assert j.finished.wait(60)

        def drained(j):
            out = []
            while not j.events.empty():
                out.append(j.events.get())
            return "".join(v for k, v in out if k == 0), out[-1]
        text_alone, end_alone = drained(alone)
        text_again, end_again = drained(again)
        assert end_alone == end_again == ("end", "length")
        assert len(text_alone) == 400 and text_again == text_alone
        a, b = engine.sessions[alone.id], engine.sessions[again.id]
        for (h1, c1), (h2, c2) in zip(a.state, b.state):
            assert torch.equal(h1, h2) and torch.equal(c1, c2)
        assert torch.equal(a.logits, b.logits)
        assert len({drained(j)[0] for j in crowd}) == len(crowd)
        if engine.stepper.rows_agree:                       # the crowd grew and shrank around it
            # (the crowd's 5 rows start together; which sizes follow depends on who is done by the time the
            # last two join: {1, 5, 7, ...} mostly, {1, 3, 4, 6} once on a busy machine)
            assert 1 in sizes and 5 <= max(sizes) <= 7 and len(set(sizes)) >= 4, sorted(set(sizes))
    finally:
        engine.close()
        engine.scheduler.stop()


@pytest.mark.parametrize("step", ["C step", "oneDNN products"])
@pytest.mark.parametrize("hidden", [32, 256])
def test_the_servers_stepper_gives_each_row_the_same_bits_at_every_batch_size(hidden, step, monkeypatch):
    """What the batch that follows the busy rows rests on: Stepper(rows_agree=True) gives a row the same
    logits and state alone or among 1 to 39 others (the C step by its construction, or without the C
    kernel oneDNN's products with weights packed once), where the fastest library product for each size
    (MKL at a few rows) does not. A CPU without either says so (rows_agree False), and the engine then
    keeps a fixed batch."""
    from textgen.lstm import CharLSTM, ModelConfig, Stepper, native_kernel
    if step == "oneDNN products":
        monkeypatch.setattr(native_kernel, "load", lambda: None)
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=65, hidden_size=hidden, layers=2)).eval()
    stepper = Stepper(model, rows_agree=True)
    assert (stepper.rows_step is not None) == (step == "C step" and native_kernel.load() is not None)
    if not stepper.rows_agree:
        pytest.skip("oneDNN does not pack float32 weights on this CPU: the engine keeps a fixed batch here")
    g = torch.Generator().manual_seed(1)
    state = tuple((torch.randn(40, hidden, generator=g), torch.randn(40, hidden, generator=g)) for _ in range(2))
    tokens = torch.randint(0, 65, (40,), generator=g)
    whole_logits, whole_state = stepper(tokens, state)
    threads = torch.get_num_threads()
    try:
        for n in range(1, 40):
            torch.set_num_threads(1 if n % 2 else threads)      # `textgen serve` may give the model fewer threads
            logits, part = stepper(tokens[:n].clone(), tuple((h[:n].clone(), c[:n].clone()) for h, c in state))
            assert torch.equal(logits, whole_logits[:n]), n
            assert all(torch.equal(a, b[:n]) for pair, whole in zip(part, whole_state) for a, b in zip(pair, whole)), n
    finally:
        torch.set_num_threads(threads)


def test_several_clients_at_once_each_get_their_own_text(served):
    results = {}

    def client(seed):
        results[seed] = text_of(served.generate(model="alpha", prompt="BORIS:\n", length=300, seed=seed))
    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [0, 1, 2, 3] and all(len(t) == 300 for t in results.values())
    assert len(set(results.values())) == 4
    for seed in (0, 3):                           # the same request later, alone: the same text
        assert text_of(served.generate(model="alpha", prompt="BORIS:\n", length=300, seed=seed)) == results[seed]


# ---------------------------------------------------------------------------
# A real server: stop, disconnect, limits, Host header, errors
# ---------------------------------------------------------------------------

def test_stop_ends_the_generation_on_the_server(served):
    conn, response, first = served.open_stream(model="alpha", length=20_000, seed=1)
    response.readline()                                     # it is producing
    status, _, payload = served.request("POST", "/api/stop", {"id": first["id"]})
    assert status == 200 and json.loads(payload) == {"stopped": True}
    events = [json.loads(line) for line in response.read().decode().splitlines()]
    conn.close()
    assert events[-1]["end"] == "stopped" and events[-1]["characters"] < 20_000
    assert served.idle()
    assert json.loads(served.request("POST", "/api/stop", {"id": first["id"]})[2]) == {"stopped": False}


def test_a_client_that_goes_away_stops_its_generation(served):
    for when in ("producing", "waiting"):
        body = json.dumps({"model": "alpha", "length": 20_000, "seed": 1}).encode()
        sock = socket.create_connection(("127.0.0.1", served.port))
        if when == "waiting":                   # all slots taken: this one waits in the queue when it leaves
            holders = [served.open_stream(model="alpha", length=20_000, seed=s, num_samples=2) for s in range(2)]
        sock.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (served.port, len(body), body))
        if when == "producing":
            received = b""
            while b'"text"' not in received:
                received += sock.recv(65536)
        else:
            waiting = lambda status: status["models"]["alpha"]["waiting"]  # noqa: E731
            assert waiting(served.until(lambda status: waiting(status) == 1)) == 1
        sock.close()
        if when == "waiting":
            assert waiting(served.until(lambda status: waiting(status) == 0)) == 0     # gone from the queue...
            for conn, _, first in holders:
                served.request("POST", "/api/stop", {"id": first["id"]})
                conn.close()
        assert served.idle(timeout=3), served.status()                    # ...and from the batch


def test_past_the_slots_requests_wait_and_past_the_queue_get_503(served):
    # 4 slots, 2 may wait: three 2-sample requests fill the slots and the queue...
    streams = [served.open_stream(model="alpha", length=20_000, seed=s, num_samples=2) for s in range(2)]
    waiting = [threading.Thread(target=served.generate, kwargs=dict(model="alpha", length=30, seed=9 + s))
               for s in range(2)]
    for t in waiting:
        t.start()
    deadline = time.monotonic() + 5
    counts = {}
    while (counts.get("busy_slots"), counts.get("waiting")) != (4, 2) and time.monotonic() < deadline:
        time.sleep(0.02)
        counts = served.status()["models"]["alpha"]
    assert counts["busy_slots"] == 4 and counts["waiting"] == 2
    status, headers, payload = served.request("POST", "/api/generate", {"model": "alpha", "length": 10})
    assert status == 503 and headers["Retry-After"] == "1" and "busy" in json.loads(payload)["error"]
    for conn, _, first in streams:                        # ...then the queue moves on
        served.request("POST", "/api/stop", {"id": first["id"]})
        conn.close()
    for t in waiting:
        t.join(30)
        assert not t.is_alive()
    assert served.idle()


def test_past_max_loaded_the_least_recently_used_model_is_let_go(runs):
    s = Served(runs[0], max_loaded=1)
    try:
        first = text_of(s.generate(model="alpha", length=30, seed=1))
        assert list(s.status()["models"]) == ["alpha"]
        s.generate(model="beta", length=30, seed=1)
        assert list(s.status()["models"]) == ["beta"]                  # alpha was let go...
        assert text_of(s.generate(model="alpha", length=30, seed=1)) == first    # ...and comes back the same
        assert list(s.status()["models"]) == ["alpha"]
    finally:
        s.close()


def test_allow_host_lets_that_name_in_and_no_other(runs):
    s = Served(runs[0], allow_hosts=["textgen.example.org"])
    try:
        for host, status in (("textgen.example.org", 200), (f"textgen.example.org:{s.port}", 200),
                             ("other.example.org", 403), (f"127.0.0.1:{s.port}", 200)):
            code, _, payload = s.request("GET", "/api/models", headers={"Host": host})
            assert code == status, (host, payload)
        for origin, status in (("https://textgen.example.org", 200), ("http://textgen.example.org", 200),
                               ("https://other.example.org", 403)):
            code, _, payload = s.request("POST", "/api/generate", {"model": "alpha", "length": 5},
                                         headers={"Host": "textgen.example.org", "Origin": origin})
            assert code == status, (origin, payload)
    finally:
        s.close()


def test_a_run_that_appears_while_the_server_is_up_is_listed_and_served(runs, tmp_path):
    import shutil
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copytree(os.path.join(runs[0], "alpha"), folder / "alpha")
    s = Served(str(folder))
    try:
        names = lambda: {m["name"] for m in json.loads(s.request("GET", "/api/models")[2])["models"]}  # noqa: E731
        assert names() == {"alpha"}
        shutil.copytree(os.path.join(runs[0], "beta"), folder / "gamma")          # trained meanwhile
        assert names() == {"alpha", "gamma"}
        assert len(text_of(s.generate(model="gamma", length=20, seed=2))) == 20
    finally:
        s.close()


def test_connection_threads_are_bounded(runs):
    s = Served(runs[0], slots=1, max_waiting=0)
    held = []
    try:
        threads_before = threading.active_count()
        for _ in range(s.httpd.max_connections):           # clients that connect and say nothing
            held.append(socket.create_connection(("127.0.0.1", s.port)))
        time.sleep(0.3)
        extra = socket.create_connection(("127.0.0.1", s.port))
        extra.settimeout(10)
        answer = extra.recv(1000)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer
        assert threading.active_count() <= threads_before + s.httpd.max_connections
    finally:
        for sock in held:
            sock.close()
        s.close()


@pytest.mark.parametrize("body, status, fragment", [
    ({"model": "alpha", "prompt": "Zebra ×"}, 400, 'not in the model\'s vocabulary of 39: Z b ×; pass "unknown": "skip"'),
    ({"model": "alpha", "temperature": -1}, 400, '"temperature" must be 0 (greedy) or from 1e-6 to 1e6'),
    ({"model": "alpha", "top_p": 1.5}, 400, '"top_p" must be in (0, 1]'),
    ({"model": "alpha", "top_k": 0}, 400, '"top_k" must be at least 1'),
    ({"model": "alpha", "length": 0}, 400, '"length" must be from 1'),
    ({"model": "alpha", "length": 20_001}, 400, '"length" must be at most 20,000 on this server'),
    ({"model": "alpha", "temperature": 1e308, "top_p": 0.5}, 400, '"temperature" must be 0 (greedy) or from 1e-6'),
    ({"model": "alpha", "prompt": "a" * 10_001}, 400, "at most 10,000"),
    ({"model": "alpha", "num_samples": 5}, 400, '"num_samples" must be at most 4 here'),
    ({"model": "alpha", "seed": -3}, 400, '"seed" must be a whole number'),
    ({"model": "alpha", "stop": ""}, 400, '"stop" must not be empty'),
    ({"model": "alpha", "unknown": "maybe"}, 400, "unknown must be 'error' or 'skip'"),
    ({"model": "alpha", "length": "long"}, 400, "length must be int"),
    ({"model": "alpha", "temperature": True}, 400, "temperature must be"),
    ({"model": "alpha", "colour": "red"}, 400, "unknown field 'colour'"),
    ({"model": "gamma"}, 400, "there is no model 'gamma'"),
    ({"model": "../served/alpha"}, 400, "there is no model"),
    ({"model": "/etc/passwd"}, 400, "there is no model"),
    ({"length": 10}, 400, "name the model: this server serves 2"),
    ({"model": "alpha", "continue": "nope"}, 400, "there is no session 'nope'"),
    ([1, 2], 400, "must be a JSON object"),
])
def test_bad_requests_get_400_with_a_sentence_in_the_apis_words(served, body, status, fragment):
    code, headers, payload = served.request("POST", "/api/generate", body)
    assert code == status and fragment in json.loads(payload)["error"], payload
    assert "\n" not in json.loads(payload)["error"]


def test_bad_requests_of_other_kinds(served):
    cases = [
        (dict(raw=b'{"model": "alpha", "temperature": NaN}'), 400, '"temperature" must be a finite number'),
        (dict(raw=b"{not json"), 400, "not valid JSON"),
        (dict(raw=b'{"prompt": "\xff"}'), 400, "not valid JSON in UTF-8"),
        (dict(raw=b"{}", headers={"Content-Type": "text/plain"}), 415, "as JSON"),
        (dict(raw=b"x" * (256 * 1024 + 1)), 413, "at most 262,144"),
    ]
    for kwargs, status, fragment in cases:
        code, _, payload = served.request("POST", "/api/generate", **kwargs)
        assert code == status and fragment in json.loads(payload)["error"], (kwargs.get("headers"), payload)
    assert served.request("GET", "/api/nothing")[0] == 404
    assert served.request("POST", "/api/models", {})[0] == 404


def test_unknown_characters_message_is_the_clis_in_the_requests_words(served, runs):
    cli = run("generate.py", "--checkpoint", os.path.join(runs[0], "alpha"), "--prompt", "Zebra ×")
    _, _, payload = served.request("POST", "/api/generate", {"model": "alpha", "prompt": "Zebra ×"})
    said = cli.stderr.strip().splitlines()[-1].removeprefix("error: ")
    assert "pass --unknown skip" in said
    assert json.loads(payload)["error"] == said.replace("--unknown skip", '"unknown": "skip"')
    events = served.generate(model="alpha", prompt="Zebra ×", length=20, unknown="skip")
    assert "leaving out" in events[1]["warning"] and len(text_of(events)) == 20


def test_host_header_and_origin_are_checked(served):
    for host in ("evil.example:%d", "127.0.0.1.nip.io:%d", "localhost:1"):
        status, _, payload = served.request("GET", "/api/models", headers={"Host": host.replace("%d", str(served.port))})
        assert status == 403 and "DNS rebinding" in json.loads(payload)["error"]
    status, _, _ = served.request("GET", "/", headers={"Host": f"localhost:{served.port}"})
    assert status == 200
    status, _, payload = served.request("POST", "/api/generate", {"model": "alpha", "length": 5},
                                        headers={"Origin": "http://evil.example"})
    assert status == 403
    status, _, _ = served.request("POST", "/api/generate", {"model": "alpha", "length": 5},
                                  headers={"Origin": f"http://127.0.0.1:{served.port}"})
    assert status == 200


def test_the_page_is_served_with_a_policy_that_forbids_inline_script(served):
    status, headers, page = served.request("GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and headers["X-Content-Type-Options"] == "nosniff"
    assert b"<script>" not in page.replace(b'<script src="/app.js" defer></script>', b"")
    js = served.request("GET", "/app.js")[2].decode()
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "document.write" not in js
    assert "http" not in js.replace("http://", "")          # nothing fetched from elsewhere
    assert served.request("GET", "/app.css")[0] == 200
    _, headers, _ = served.request("POST", "/api/generate", {"model": "alpha", "length": 3})
    assert headers["Content-Type"].startswith("application/x-ndjson") and headers["X-Content-Type-Options"] == "nosniff"


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def start_serve(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "textgen", "serve", *args, "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
    return proc, int(line.split("127.0.0.1:")[1].split("/")[0]), line


def test_ctrl_c_shuts_down_cleanly_and_ends_open_streams(runs):
    proc, port, line = start_serve(os.path.join(runs[0], "alpha"))
    assert "serving 1 model from" in line and f"http://127.0.0.1:{port}/" in line
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/api/generate", json.dumps({"length": 10_000}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    response.readline()
    response.readline()
    proc.send_signal(signal.SIGINT)
    events = [json.loads(line) for line in response.read().decode().splitlines()]
    assert events[-1]["end"] == "shutdown"
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 0 and "Traceback" not in err and "shutting down" in out


def test_a_public_address_is_warned_about(runs):
    proc, port, _ = start_serve(os.path.join(runs[0], "alpha"), "--host", "0.0.0.0")
    try:
        status = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status.request("GET", "/api/models")
        assert status.getresponse().status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    assert "warning: serving on 0.0.0.0: anyone who can reach this machine" in err and proc.returncode == 0



def test_serving_without_the_serve_extra_is_one_sentence(runs, monkeypatch, capsys):
    from textgen.cli import serve_main
    monkeypatch.setitem(sys.modules, "uvicorn", None)        # as after a plain `pip install -e .`
    with pytest.raises(SystemExit) as done:
        serve_main(["--help"])                               # the flags are still there to read
    assert done.value.code == 0 and "--max-waiting" in capsys.readouterr().out
    assert serve_main([os.path.join(runs[0], "alpha"), "--port", "0"]) == 2
    assert capsys.readouterr().err == \
        'error: serving needs the [serve] extra (uvicorn and starlette): pip install -e ".[serve]"\n'
