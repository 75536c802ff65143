"""`textgen export`: the ONNX graph run by onnxruntime against CharLSTM, the safetensors folder read back by
textgen.load, and every refusal as one sentence. (The web page is driven in tests/test_export_browser.py.)"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY, small_text

# Tiny models that learn the text's shape in ~3 s each, so that greedy text is words, not one repeated letter.
QUICK = [*TINY, "--batch-size", "16", "--seq-len", "32", "--steps", "100", "--lr", "1e-2", "--eval-every", "100",
         "--save-every", "100", "--dropout", "0", "--sample-length", "0", "-q"]
KINDS = {"plain": ["--no-residual", "--steps", "150"], "residual": [],
         "adaptive": ["--head", "adaptive", "--cutoffs", "8,20"]}
PROMPT = "ANNA:\n"


MARKUP = "<img src=x onerror=\"document.title='owned'\"><script>document.title='pwned'</script>\n"
TEXT = MARKUP * 10 + small_text()            # markup too, for the web page's test (test_export_browser.py)
_TRAINED = {}


def trained(kind: str, tmp_path_factory) -> str:
    """The run folder of one kind of tiny model, trained once per test session (the browser test uses it too)."""
    if kind not in _TRAINED:
        from textgen.cli import train_main
        root = tmp_path_factory.mktemp(f"export-{kind}")
        (root / "corpus.txt").write_text(TEXT, encoding="utf-8")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)        # a 2x32 model: a second thread only waits (3x the time on 2 busy cores)
        try:
            assert train_main([str(root / "corpus.txt"), *QUICK, *KINDS[kind], "--out", str(root / "run")]) == 0
        finally:
            torch.set_num_threads(threads)
        _TRAINED[kind] = str(root / "run")
    return _TRAINED[kind]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{kind: run folder} for a plain stack, a residual stack (the default) and an adaptive head."""
    return {kind: trained(kind, tmp_path_factory) for kind in KINDS}


def textgen_cli(*argv) -> int:
    """`textgen ARGV...` in this process; its exit code (argparse's own refusals exit through SystemExit)."""
    from textgen.cli import textgen_main
    try:
        return textgen_main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def need(module: str):
    """module, or a skip where it is not installed (a failure under CI=true, where scripts/setup installs it)."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module)


def onnx_session(run, tmp_path):
    need("onnx")
    ort = need("onnxruntime")
    path = tmp_path / "model.onnx"
    assert textgen_cli("export", run, "--format", "onnx", "--output", path, "-q") == 0
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def onnx_step(session, tokens, state):
    """One character for every stream through the ONNX graph: tokens (N,), state {name: (N, H)}."""
    outputs = session.run(None, {"tokens": np.asarray(tokens, dtype=np.int64), **state})
    named = dict(zip((o.name for o in session.get_outputs()), outputs))
    return named["logits"], {name[len("next_"):]: value for name, value in named.items() if name.startswith("next_")}


def zero_state(session, streams):
    return {i.name: np.zeros((streams, i.shape[1]), np.float32) for i in session.get_inputs() if i.name != "tokens"}


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_steps_300_characters_of_two_streams_as_charlstm_does(runs, kind, tmp_path):
    from textgen.checkpoint import load_model
    session = onnx_session(runs[kind], tmp_path)
    model, tokenizer, _ = load_model(runs[kind])
    assert model.config.residual == (kind != "plain") and (model.config.head == "adaptive") == (kind == "adaptive")
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["textgen.vocab"]) == list(tokenizer.chars)
    assert json.loads(meta["textgen.model_config"])["hidden_size"] == model.config.hidden_size
    assert meta["textgen.version"] == __import__("textgen").__version__ and meta["textgen.opening_text"] == "\n"
    assert session.get_inputs()[0].shape == ["batch"]
    assert session.get_outputs()[0].shape == ["batch", len(tokenizer.chars)]

    tokens = torch.tensor(np.stack([tokenizer.encode(TEXT[:300]), tokenizer.encode(TEXT[5000:5300])]).astype("int64"))
    with torch.no_grad():
        expected, (*_, (h_last, c_last)) = model(tokens)                   # (2, 300, V) from the zero state
    state = zero_state(session, 2)
    for t in range(300):
        logits, state = onnx_step(session, tokens[:, t], state)
        np.testing.assert_allclose(logits, expected[:, t].numpy(), atol=1e-4, rtol=0, err_msg=f"step {t}")
    last = model.config.layers - 1
    # (c grows past 10 in some units after 300 steps, where float32's steps are 2e-6: relative as well)
    np.testing.assert_allclose(state[f"h_{last}"], h_last.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(state[f"c_{last}"], c_last.numpy(), atol=1e-5, rtol=1e-5)
    if kind == "adaptive":                       # exact log-probabilities: each row's probabilities sum to 1
        np.testing.assert_allclose(np.exp(logits).sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_onnx_greedy_text_equals_generate_py_at_temperature_0(runs, kind, tmp_path, capsys):
    from textgen.checkpoint import load_model
    from textgen.cli import generate_main
    session = onnx_session(runs[kind], tmp_path)
    _, tokenizer, _ = load_model(runs[kind])
    capsys.readouterr()
    assert generate_main(["--checkpoint", runs[kind], "--prompt", PROMPT, "--length", "500", "--temperature", "0",
                          "-q"]) == 0
    expected = capsys.readouterr().out[len(PROMPT):-1]
    state = zero_state(session, 1)
    for token in tokenizer.encode(PROMPT):
        logits, state = onnx_step(session, [token], state)
    produced = []
    for _ in range(500):
        token = int(logits[0].argmax())
        produced.append(tokenizer.chars[token])
        logits, state = onnx_step(session, [token], state)
    assert "".join(produced) == expected
    assert len(set(expected)) >= 8, expected           # words of the text, not one letter over and over


def test_safetensors_folder_loads_back_to_the_same_logits(runs, tmp_path):
    need("safetensors")
    import textgen
    out = tmp_path / "shared"
    assert textgen_cli("export", runs["adaptive"], "--format", "safetensors", "--output", out, "-q") == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "vocab.json"]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["model_type"] == "textgen-char-lstm" and config["head"] == "adaptive"
    original = textgen.load(runs["adaptive"])
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    assert vocab == {ch: i for i, ch in enumerate(original.tokenizer.chars)}
    tokens = torch.tensor(original.tokenizer.encode(TEXT[:400]).astype("int64")).unsqueeze(0)
    with torch.no_grad():
        expected, _ = original.model(tokens)
        for path in (out, out / "model.safetensors"):
            again = textgen.load(str(path))
            assert torch.equal(again.model(tokens)[0], expected)
            assert again.tokenizer == original.tokenizer
    assert again.generate(PROMPT, length=80, temperature=0) == original.generate(PROMPT, length=80, temperature=0)


@pytest.mark.parametrize("damage, sentence", [
    (lambda out: _edit_json(out / "config.json", hidden_size=48),
     "does not fit config.json: lstm.weight_ih_l0 is torch.float32 (128, 16)"),
    (lambda out: _edit_json(out / "config.json", vocab_size=7), "characters but"),
    (lambda out: (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100]),
     "is not a readable safetensors file"),
    (lambda out: os.remove(out / "vocab.json"), "vocab.json is missing"),
])
def test_a_safetensors_folder_that_does_not_fit_is_one_sentence(runs, tmp_path, damage, sentence):
    need("safetensors")
    import textgen
    out = tmp_path / "shared"
    assert textgen_cli("export", runs["residual"], "--format", "safetensors", "--output", out, "-q") == 0
    damage(out)
    with pytest.raises(textgen.UsageError) as caught:
        textgen.load(str(out))
    message = str(caught.value)
    assert sentence in message and "\n" not in message, message


def _edit_json(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(changes)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_export_refusals_are_one_sentence_and_leave_files_as_they_were(runs, tmp_path, capsys):
    run = runs["residual"]
    empty_run = tmp_path / "nothing-here"
    empty_run.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine", encoding="utf-8")
    best = os.path.join(run, "best.pt")
    before = open(best, "rb").read()
    cases = [
        (("--format", "tflite"), "invalid choice: 'tflite'"),
        (("--format", "onnx", "--output", tmp_path / "no" / "such" / "model.onnx"), "does not exist"),
        (("--format", "web", "--output", tmp_path), "is a folder; name a file to write"),
        (("--format", "onnx", "--output", best), "is a checkpoint; textgen never writes over one"),
        (("--format", "web", "--output", os.path.join(run, "config.json")), "training run's folder"),
        (("--format", "safetensors", "--output", full), "is a folder with files in it"),
        (("--format", "onnx", "--quantize", "int8"), "--quantize int8 is for --format web"),
    ]
    for flags, fragment in cases:
        capsys.readouterr()
        assert textgen_cli("export", run, *flags) == 2, flags
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and err.startswith("error: "), (flags, err)
    capsys.readouterr()
    assert textgen_cli("export", empty_run, "--format", "onnx", "--output", tmp_path / "m.onnx") == 2
    err = capsys.readouterr().err
    assert "holds no latest.pt or best.pt" in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.onnx").exists() and os.listdir(full) == ["keep.txt"]
    assert open(best, "rb").read() == before
