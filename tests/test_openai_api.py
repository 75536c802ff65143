"""`textgen serve`'s OpenAI-compatible API, driven by the official `openai` package over loopback HTTP."""
import http.client
import json
import math

import pytest

from conftest import train_tiny
from textgen.serving import server as served_module
from textgen.generation.jobs import Scheduler
from textgen.evaluate import cross_entropy
from textgen.checkpoint import load_model
from textgen.serving.http_server import PlaygroundServer

openai = pytest.importorskip("openai", reason="the openai package is in the [test] extra")

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("openai"))[0]


class Served:
    """`textgen serve` as it runs (uvicorn on a thread), the scheduler on another."""

    def __init__(self, path, api_key=None, **limits):
        self.limits = served_module.Limits(**limits)
        self.scheduler = Scheduler()
        self.catalogue = served_module.Catalogue(path, "cpu", self.limits, self.scheduler)
        self.httpd = PlaygroundServer(("127.0.0.1", 0), self.catalogue, self.limits, api_key=api_key)
        self.port = self.httpd.port
        self.scheduler.run_in_thread()
        self.httpd.start()
        self.name = next(iter(self.catalogue.files()))

    def client(self, api_key=KEY) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=api_key, max_retries=0, timeout=60)

    def request(self, method, path, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        payload = response.read()
        conn.close()
        return response.status, response.headers, payload

    def close(self):
        self.httpd.shutdown()
        self.scheduler.stop()
        self.catalogue.close()
        self.httpd.wait(timeout=10)


MAX_LENGTH = 20_000      # the served model's longest answer: a stream test asks for all of it


@pytest.fixture(scope="module")
def served(run):
    s = Served(run, slots=4, max_waiting=8, max_length=MAX_LENGTH)
    yield s
    s.close()


@pytest.fixture
def client(served):
    return served.client()


def native_text(served, **body):
    status, _, payload = served.request("POST", "/api/generate", body)
    assert status == 200, payload
    return "".join(json.loads(line).get("text", "") for line in payload.decode().splitlines())


def test_models_are_the_catalogues_names(served, client):
    assert [m.id for m in client.models.list()] == [served.name]
    assert client.models.retrieve(served.name).owned_by == "textgen"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_a_plain_completion_is_the_native_apis_text_for_the_seed(served, client):
    out = client.completions.create(model=served.name, prompt="ANNA:\n", max_tokens=60, temperature=1.0, seed=3)
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == served.name and len(out.choices) == 1
    assert len(choice.text) == 60 and choice.finish_reason == "length" and choice.logprobs is None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (6, 60, 66)
    assert choice.text == native_text(served, model=served.name, prompt="ANNA:\n", length=60, temperature=1.0, seed=3)


def test_the_same_seed_gives_the_same_text_twice(served, client):
    texts = [client.completions.create(model=served.name, prompt="B", max_tokens=80, seed=s,
                                             extra_body={"top_k": 10}).choices[0].text
             for s in (11, 11, 12)]
    assert texts[0] == texts[1] != texts[2]


def test_a_stream_adds_up_to_the_whole_text(served, client):
    whole = client.completions.create(model=served.name, prompt="CLÉO:\n", max_tokens=MAX_LENGTH, seed=5).choices[0].text
    chunks = list(client.completions.create(model=served.name, prompt="CLÉO:\n", max_tokens=MAX_LENGTH, seed=5, stream=True,
                                            stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == whole and len(texts) > 1               # it arrived in pieces (20,000: a few
    # thousand characters are made within milliseconds, and 2,000 once came as one)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == MAX_LENGTH


def test_n_2_gives_two_choices_and_a_list_of_prompts_n_each(served, client):
    out = client.completions.create(model=served.name, prompt="ANNA:\n", max_tokens=40, n=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1] and out.choices[0].text != out.choices[1].text
    out = client.completions.create(model=served.name, prompt=["ANNA:\n", "BORIS:\n"], max_tokens=20, n=2, seed=1)
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and out.usage.prompt_tokens == 13
    streamed = {}
    for chunk in client.completions.create(model=served.name, prompt="ANNA:\n", max_tokens=40, n=2, seed=1,
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    alone = client.completions.create(model=served.name, prompt="ANNA:\n", max_tokens=40, n=2, seed=1)
    assert streamed == {c.index: c.text for c in alone.choices}


def test_a_stop_list_ends_each_choice_without_the_stop_string(served, client):
    stops = ["\n", "e ", "gull"]
    native = native_text(served, model=served.name, prompt="ANNA:\nThe", length=300, seed=4, temperature=1.0)
    cut = min((native.index(s), s) for s in stops if s in native)
    out = client.completions.create(model=served.name, prompt="ANNA:\nThe", max_tokens=300, seed=4, temperature=1.0,
                                    stop=stops)
    assert out.choices[0].text == native[:cut[0]] and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens == cut[0] + len(cut[1])                 # the stop string was generated
    streamed = client.completions.create(model=served.name, prompt="ANNA:\nThe", max_tokens=300, seed=4,
                                         temperature=1.0, stop=stops, stream=True)
    chunks = [c.choices[0] for c in streamed]
    assert "".join(c.text for c in chunks) == native[:cut[0]] and chunks[-1].finish_reason == "stop"


def test_logprobs_are_the_models_own_top_n_of_each_character(served, client):
    out = client.completions.create(model=served.name, prompt="DMITRI:\n", max_tokens=50, seed=2, logprobs=3,
                                    temperature=0.5, extra_body={"top_k": 4})
    choice = out.choices[0]
    lp = choice.logprobs
    assert lp.tokens == list(choice.text) and lp.text_offset == list(range(50))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and logprob <= 0 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-6
        assert logprob <= max(top.values()) + 1e-9
        assert token not in top or top[token] == logprob
    # before temperature and the top-k cut: a greedy run's choices are each step's most likely character
    greedy = client.completions.create(model=served.name, prompt="DMITRI:\n", max_tokens=50, temperature=0,
                                       logprobs=1).choices[0].logprobs
    assert all(list(top) == [token] for token, top in zip(greedy.tokens, greedy.top_logprobs))
    assert all(v < 0 for v in greedy.token_logprobs)                 # not the one-hot the draw used
    # the native API reports the same figures, per character
    status, _, payload = served.request("POST", "/api/generate", {"model": served.name, "prompt": "DMITRI:\n",
                                        "length": 50, "seed": 2, "logprobs": 3, "temperature": 0.5, "top_k": 4})
    lines = [line for line in map(json.loads, payload.decode().splitlines()) if "text" in line]
    native = [entry for line in lines for entry in line["logprobs"]]
    assert [e["logprob"] for e in native] == lp.token_logprobs
    assert [dict(e["top"]) for e in native] == lp.top_logprobs


def test_echo_scores_the_prompt_as_textgen_eval_scores_the_text(served, client, run):
    text = "ANNA:\nThe sea is calm tonight and the light turns slowly.\n\nBORIS:\nThe rocks where gulls sleep.\n"
    out = client.completions.create(model=served.name, prompt=text, max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    lp = choice.logprobs
    assert choice.text == text and lp.tokens == list(text) and lp.token_logprobs[0] is None
    assert lp.top_logprobs[0] is None and out.usage.completion_tokens == 0
    echoed = sum(lp.token_logprobs[1:]) / (len(text) - 1)
    model, tokenizer, _ = load_model(run)
    nats, count = cross_entropy(model, tokenizer.encode(text), batch_size=1)          # textgen-eval, one stream
    assert count == len(text) - 1 and echoed == pytest.approx(-nats / count, abs=1e-5)
    # with a completion: the prompt's figures, then the generated characters', one list
    more = client.completions.create(model=served.name, prompt=text, max_tokens=5, echo=True, logprobs=1, seed=3)
    assert more.choices[0].text.startswith(text) and len(more.choices[0].logprobs.tokens) == len(text) + 5
    assert more.choices[0].logprobs.token_logprobs[:len(text)] == lp.token_logprobs
    plain = client.completions.create(model=served.name, prompt=text, max_tokens=5, seed=3)
    assert more.choices[0].text == text + plain.choices[0].text      # scoring the prompt changes nothing drawn


def test_bad_values_raise_bad_request_with_the_field(served, client):
    cases = [dict(temperature=-1), dict(top_p=1.5), dict(max_tokens=-1), dict(max_tokens=MAX_LENGTH + 1), dict(n=5),
             dict(logprobs=21), dict(stop=["a", "b", "c", "d", "e"]), dict(stop=""), dict(seed=-1),
             dict(prompt="Zebra ×"), dict(extra_body={"top_k": 0}), dict(frequency_penalty=0.5)]
    params = ["temperature", "top_p", "max_tokens", "max_tokens", "n", "logprobs", "stop", "stop", "seed", "unknown",
              "top_k", "frequency_penalty"]
    for case, param in zip(cases, params):
        kwargs = {"model": served.name, "prompt": "A", **case}
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(**kwargs)
        error = caught.value.body
        assert error["param"] == param and error["type"] == "invalid_request_error", (case, error)
        assert param in error["message"] or param == "unknown", error
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=served.name, prompt="A", extra_body={"colour": "red"})


def test_unknown_models_and_paths_are_not_found(served, client):
    for name in ("gamma", "../openai0/run", "/etc/passwd"):
        with pytest.raises(openai.NotFoundError) as caught:
            client.completions.create(model=name, prompt="A", max_tokens=3)
        assert caught.value.body["code"] == "model_not_found"


def test_the_api_key_is_required_when_set_and_compared_whole(run):
    s = Served(run, api_key=KEY)
    try:
        for wrong in ("wrong", KEY[:-1], KEY + "x"):
            with pytest.raises(openai.AuthenticationError):
                s.client(api_key=wrong).completions.create(model=s.name, prompt="A", max_tokens=3)
        assert len(s.client().completions.create(model=s.name, prompt="A", max_tokens=3).choices[0].text) == 3
        status, headers, payload = s.request("GET", "/v1/models")                     # no header at all
        assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
        assert json.loads(payload)["error"]["type"] == "invalid_request_error"
        assert s.request("POST", "/api/generate", {"length": 3})[0] == 401           # the native API too
        assert s.request("GET", "/")[0] == 200                                        # the page's files stay public
    finally:
        s.close()


def test_host_and_origin_checks_hold_on_the_openai_paths(served):
    status, _, payload = served.request("GET", "/v1/models", headers={"Host": "evil.example"})
    assert status == 403 and "DNS rebinding" in json.loads(payload)["error"]["message"]
    status, _, payload = served.request("POST", "/v1/completions", {"model": served.name, "prompt": "A"},
                                        headers={"Origin": "http://evil.example"})
    assert status == 403 and json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_the_vocabulary_endpoints_lm_evaluation_harness_reads(served):
    status, _, payload = served.request("POST", "/tokenize", {"prompt": "ANNA:\n", "add_special_tokens": False})
    tokens = json.loads(payload)["tokens"]
    assert status == 200 and len(tokens) == 6
    assert json.loads(served.request("POST", "/detokenize", {"tokens": tokens})[2]) == {"prompt": "ANNA:\n"}
    info = json.loads(served.request("GET", "/tokenizer_info")[2])
    assert "eos_token" in info and info["bos_token"] == "\n"
    # a prompt of token ids reads as its characters
    by_ids = served.client().completions.create(model=served.name, prompt=tokens, max_tokens=20, seed=8)
    by_text = served.client().completions.create(model=served.name, prompt="ANNA:\n", max_tokens=20, seed=8)
    assert by_ids.choices[0].text == by_text.choices[0].text
