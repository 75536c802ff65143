"""Log-probabilities of each generated character and its most likely alternatives, computed in the one
generation loop (sampling.Decoding), for the Generator and for the server's native stream alike."""
import json
import math

import pytest
import torch

from conftest import train_tiny
from test_serve import Served
from textgen.checkpoint import load_model
from textgen.generation.generator import Generator
from textgen.generation.sampling import SampleConfig


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("logprobs"))[0]


def test_scores_are_the_models_own_and_change_no_draw(run):
    model, tokenizer, _ = load_model(run)
    config = SampleConfig(length=30, temperature=0.7, top_k=5, seed=5)
    plain = Generator(model, tokenizer, seed=5)
    plain.feed("ANNA:\n")
    scored_gen = Generator(model, tokenizer, seed=5)
    scored_gen.feed("ANNA:\n")
    scored = [chars[0] for chars in scored_gen.stream(config, logprobs=4)]
    text = "".join(s.char for s in scored)
    assert text == plain.generate(config)[0]                  # scoring draws nothing
    ids = torch.from_numpy(tokenizer.encode("ANNA:\n" + text).astype("int64")).unsqueeze(0)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0][0].float(), dim=-1)      # (T, V): temperature 1, no cut
    for k, s in enumerate(scored):
        row = logp[len("ANNA:\n") + k - 1]
        assert s.logprob == pytest.approx(row[tokenizer.encode(s.char)[0]].item(), abs=1e-4)
        best = row.topk(4)
        assert [c for c, _ in s.top] == [tokenizer.chars[i] for i in best.indices.tolist()]
        assert [v for _, v in s.top] == pytest.approx(best.values.tolist(), abs=1e-4)


def test_the_native_stream_carries_them_beside_the_text(run):
    served = Served(run)
    try:
        events = served.generate(prompt="BORIS:\n", length=50, seed=2, logprobs=3)
        plain = served.generate(prompt="BORIS:\n", length=50, seed=2)
        lines = [e for e in events if "text" in e]
        text = "".join(e["text"] for e in lines)
        assert text == "".join(e.get("text", "") for e in plain) and all("logprobs" not in e for e in plain)
        for line in lines:
            assert len(line["logprobs"]) == len(line["text"])
            for ch, s in zip(line["text"], line["logprobs"]):
                values = [v for _, v in s["top"]]
                assert len(s["top"]) == 3 and values == sorted(values, reverse=True) and s["logprob"] <= values[0]
                assert ch not in [c for c, _ in s["top"]] or s["logprob"] == dict(s["top"])[ch]
                assert sum(math.exp(v) for v in values) <= 1 + 1e-6
        status, _, payload = served.request("POST", "/api/generate", {"prompt": "A", "logprobs": 21})
        assert status == 400 and json.loads(payload)["error"] == '"logprobs" must be a whole number from 0 to 20, got 21'
    finally:
        served.close()
