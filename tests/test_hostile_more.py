"""A hostile tester's second round: each failure it found, as a test that failed before its fix.

A damaged token cache, a folder that takes no files, a metrics log with bad lines, checkpoints
whose digest was recomputed after a field was changed ("signed" ones: the digest says nothing
about whether the content makes sense), the Python API given the wrong types, and the server
given numbers too large for its arithmetic. Every one must end as one sentence, or work.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import TINY, assert_user_error, small_text, train_here, train_tiny
from textgen import checkpoint
from textgen import corpus as corpus_module
from textgen.cli import cli_words
from textgen.corpus import prepare
from textgen.errors import UsageError


@contextlib.contextmanager
def unwritable(folder):
    """folder takes no new files: immutable as root (who ignores permissions), read-only otherwise."""
    folder = str(folder)
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode != 0:
            pytest.skip("chattr +i does not work on this filesystem")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", folder], check=True)
    else:
        os.chmod(folder, 0o555)
        try:
            yield
        finally:
            os.chmod(folder, 0o755)


# ---------------------------------------------------------------------------
# 11-15: the token cache
# ---------------------------------------------------------------------------

def _cached_corpus(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    cache = tmp_path / "cache"
    first = prepare(str(text), cache_dir=str(cache))
    return str(text), str(cache), first


def test_a_cache_folder_that_takes_no_files_is_one_sentence(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    cache = tmp_path / "cache"
    cache.mkdir()
    with unwritable(cache):
        result = train_here(str(text), *TINY, "--steps", "2", "--cache-dir", str(cache),
                            "--out", str(tmp_path / "run"), "-q")
    assert_user_error(result, "cannot write the token cache", "--cache-dir")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "run").exists()                   # the refused run leaves no folder


def _damage(kind: str, cache: str, first) -> None:
    entry = first.info["cache"]
    pointer = next(os.path.join(cache, n) for n in os.listdir(cache) if n.startswith("files-"))
    tokens = os.path.join(entry, "tokens.bin")
    if kind == "pointer garbage":
        with open(pointer, "wb") as f:
            f.write(b"\xff\xfe not json at all")
    elif kind == "pointer not an object":
        with open(pointer, "w") as f:
            f.write("[1, 2]")
    elif kind == "meta truncated":
        meta = os.path.join(entry, "meta.json")
        with open(meta, "rb+") as f:
            f.truncate(os.path.getsize(meta) // 2)
    elif kind == "tokens truncated":
        with open(tokens, "rb+") as f:
            f.truncate(os.path.getsize(tokens) // 2)
    elif kind == "ids out of range":
        ids = np.fromfile(tokens, dtype=first.tokenizer.dtype)
        ids[::7] = np.iinfo(ids.dtype).max                   # past any vocabulary of this text
        ids.tofile(tokens)


DAMAGE = ["pointer garbage", "pointer not an object", "meta truncated", "tokens truncated", "ids out of range"]


@pytest.mark.parametrize("kind", DAMAGE)
def test_a_damaged_cache_entry_is_a_miss_said_in_the_log(tmp_path, kind):
    text, cache, first = _cached_corpus(tmp_path)
    expected = np.array(first.tokens)
    del first.tokens                                         # let go of the map before the file changes
    _damage(kind, cache, first)
    said = []
    again = prepare(text, cache_dir=cache, log=said.append)
    assert np.array_equal(np.asarray(again.tokens), expected)
    assert any("damaged" in line for line in said), said
    # Written again through the one writer: the next run is a plain hit that reads no text.
    def read_again(*args, **kwargs):
        raise AssertionError("a cache hit read the file again")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus_module, "decoded_blocks", read_again)
        third = prepare(text, cache_dir=cache, log=said.append)
    assert np.array_equal(np.asarray(third.tokens), expected)


def test_a_damaged_entry_that_cannot_be_written_again_is_one_sentence(tmp_path):
    text, cache, first = _cached_corpus(tmp_path)
    entry = first.info["cache"]
    del first.tokens
    _damage("tokens truncated", cache, first)
    with unwritable(entry):
        with pytest.raises(UsageError) as caught:
            prepare(text, cache_dir=cache)
    assert "cannot write the token cache" in str(caught.value)
    assert "--cache-dir" in caught.value.worded(cli_words)


def test_training_on_a_cache_with_ids_out_of_range_prepares_it_again(tmp_path):
    text, cache, first = _cached_corpus(tmp_path)
    del first.tokens
    _damage("ids out of range", cache, first)
    result = train_here(text, *TINY, "--steps", "2", "--cache-dir", cache, "--out", str(tmp_path / "run"),
                        "--sample-length", "0")
    assert result.returncode == 0, result.stderr
    assert "damaged" in result.stdout and "Traceback" not in result.stderr


def test_a_file_holding_only_a_byte_order_mark_is_empty(tmp_path):
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(UsageError, match="is empty"):
        prepare(str(text), cache_dir=str(tmp_path / "cache"))


# ---------------------------------------------------------------------------
# 16-18: textgen plot on a metrics.jsonl with lines it cannot read
# ---------------------------------------------------------------------------

GOOD_LINES = [{"step": s, "time": s / 10, "train_loss": 4 - s / 10, "val_loss": None if s % 2 else 3.9 - s / 10}
              for s in range(1, 6)]
BAD_LINES = {"not UTF-8": b"\xff\xfe{\"step\": 9}", "not JSON": b"{\"step\": 3, \"train_lo",
             "no train_loss": b"{\"step\": 3, \"time\": 1.0}", "not an object": b"[1, 2, 3]",
             "a loss that is text": b"{\"step\": 3, \"time\": 0.3, \"train_loss\": \"low\"}"}


def _in_process(main, *argv):
    """(exit code, stdout, stderr) of a command's main run here, argparse's SystemExit included."""
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:                    # argparse ends with SystemExit
            code = e.code
    return code, out.getvalue(), err.getvalue()


def _run_textgen(*argv):
    from textgen.cli import textgen_main
    return _in_process(textgen_main, *argv)


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_plot_skips_a_line_it_cannot_read_with_one_note(tmp_path, kind):
    pytest.importorskip("matplotlib")
    lines = [json.dumps(row).encode() for row in GOOD_LINES]
    lines.insert(2, BAD_LINES[kind])
    (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    code, out, err = _run_textgen("plot", str(tmp_path), "--output", str(tmp_path / "loss.png"))
    assert code == 0, err
    assert err.count("\n") == 1 and "skipped 1 line" in err and "line 3" in err, err
    assert (tmp_path / "loss.png").read_bytes().startswith(b"\x89PNG")
    from textgen.run_folder import read_metrics
    notes = []
    assert read_metrics(str(tmp_path), note=notes.append) == GOOD_LINES and len(notes) == 1


# ---------------------------------------------------------------------------
# 26-28: the Python API given the wrong types
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny trained run folder and its text."""
    return train_tiny(tmp_path_factory.mktemp("hostile-tiny"))


WRONG_SAMPLING = [("temperature", "hot", "a number"), ("length", "5", "a whole number"),
                  ("seed", "x", "a whole number"), ("length", 2.5, "a whole number"),
                  ("top_k", 2.5, "a whole number"), ("seed", 1.5, "a whole number"), ("stop", 5, "text"),
                  ("num_samples", 2.0, "a whole number"), ("length", True, "a whole number"),
                  ("top_p", "0.5", "a number"), ("prompt", None, "text"), ("prompt", 123, "text")]


@pytest.mark.parametrize("name, value, kind", WRONG_SAMPLING)
def test_generate_refuses_a_wrong_type_by_its_argument(tiny, name, value, kind):
    import textgen
    model = textgen.load(tiny[0])
    with pytest.raises(UsageError) as caught:
        model.generate(**{"length": 3, name: value})
    assert str(caught.value).startswith(f"{name} must be {kind}, got "), str(caught.value)


@pytest.mark.parametrize("arguments, says", [({"seed": 2**64}, "seed must be a whole number from 0 to 2**63 - 1"),
                                              ({"seed": "1"}, "seed must be a whole number"),
                                              ({"num_samples": 0}, "num_samples must be"),
                                              ({"unknown": "drop"}, "unknown must be 'error' or 'skip'")])
def test_generator_checks_its_arguments(tiny, arguments, says):
    import textgen
    with pytest.raises(UsageError, match=says.replace("*", r"\*")):
        textgen.load(tiny[0]).generator(**arguments)


def test_load_refuses_what_is_not_a_path_and_takes_a_pathlib_path(tiny):
    import pathlib
    import textgen
    for wrong in (None, 123, b"run"):
        with pytest.raises(UsageError, match="path must be a path"):
            textgen.load(wrong)
    assert textgen.load(pathlib.Path(tiny[0]), device=torch.device("cpu")).checkpoint["step"] == 30


WRONG_TRAINING = [({"text": 123}, "text must be a path"), ({"text": b"x"}, "text must be a path"),
                  ({"steps": "2"}, "steps must be a whole number, got '2'"), ({"lr": "fast"}, "lr must be a number"),
                  ({"time_budget": "5m"}, "time_budget must be a number"),
                  ({"hidden_size": 32.7}, "hidden_size must be a whole number, got 32.7"),
                  ({"out": 123}, "out must be a path"), ({"name": 5}, "name must be text"),
                  ({"resume": 5}, "resume must be a path"), ({"steps": True}, "steps must be a whole number"),
                  ({"locked_dropout": 1}, "locked_dropout must be True or False"),
                  ({"overwrite": "yes"}, "overwrite must be True or False")]


@pytest.mark.parametrize("arguments, says", WRONG_TRAINING)
def test_train_refuses_a_wrong_type_by_its_argument_and_makes_no_folder(tmp_path, arguments, says):
    import textgen
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    settings = dict(text=str(text), out=str(tmp_path / "run"), steps=2, hidden_size=16, embed_size=8, batch_size=4,
                    seq_len=16, sample_length=0, log=lambda message: None)
    with pytest.raises(UsageError, match=says):
        textgen.train(**{**settings, **arguments})
    assert sorted(os.listdir(tmp_path)) == ["corpus.txt"]


# ---------------------------------------------------------------------------
# 40-42: settings at the edge of their parsing
# ---------------------------------------------------------------------------

def test_weight_decay_of_exactly_one_over_lr_is_accepted_despite_rounding():
    from textgen.errors import SettingError
    from textgen.training import TrainConfig
    TrainConfig(lr=1e-9, weight_decay=1e9).validate()             # 1/1e-9 is 999999999.9999999 in floats
    TrainConfig(lr=3e-3, weight_decay=1 / 3e-3).validate()
    with pytest.raises(SettingError, match="at most 1/lr = 1e9"):
        TrainConfig(lr=1e-9, weight_decay=1.001e9).validate()


@pytest.mark.parametrize("flags, says", [(["--separator", "\\"], "'\\\\' is not a valid escape sequence"),
                                         (["--separator", "ab\\x4"], "is not a valid escape sequence"),
                                         (["--head", "adaptive", "--cutoffs", ","], "',' holds no numbers"),
                                         (["--cutoffs", ""], "'' holds no numbers")])
def test_a_flag_that_cannot_be_parsed_is_one_sentence_naming_it(tmp_path, flags, says):
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    from textgen.cli import train_main
    code, _, err = _in_process(train_main, text, *TINY, "--steps", "2", "--out", tmp_path / "run", *flags)
    assert code == 2 and says in err and f"argument {flags[-2]}" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_escapes_decode_alone_and_leave_the_text_around_them_as_typed():
    from textgen.settings import unescape
    assert unescape("\\n\\n") == "\n\n"
    assert unescape("é\\t—") == "é\t—"
    assert unescape("\\u20ac \\x41\\101 \\N{EM DASH}") == "€ AA —"       # \u20ac failed before: not latin-1
    assert unescape("a\\qb") == "a\\qb"                                 # unknown: kept, as Python keeps it


# ---------------------------------------------------------------------------
# 19-22: signed checkpoints whose fields hold what textgen never writes there
# ---------------------------------------------------------------------------

def _signed(source: str, target: str, change) -> str:
    """source's checkpoint with change(payload) applied and its digest written afresh, as anybody can."""
    payload = checkpoint.load(source)
    payload.pop("integrity")
    change(payload)
    checkpoint.atomic_save(payload, target)
    return target


ODD_FIELDS = [("best_val_loss", "low", "its best_val_loss is 'low'"), ("elapsed", "long", "its elapsed is 'long'"),
              ("step", "thirty", "its step is 'thirty'"), ("corpus", "x", "its corpus is 'x'"),
              ("train_config", "x", "its train_config is 'x'"), ("model", [1], "its model is a list"),
              ("model_config", [1, 2], "its model_config is a list"), ("vocab", {"chars": 5}, "its vocabulary is 5"),
              ("vocab", ["a"], "its vocab is a list"), ("plan", "x", "its plan is 'x'"),
              ("history", "x", "its history is 'x'"), ("created", 12345, "its created is 12345")]


@pytest.mark.parametrize("field, value, says", ODD_FIELDS)
def test_info_on_a_signed_checkpoint_with_an_odd_field_is_one_sentence(tiny, tmp_path, field, value, says):
    forged = _signed(os.path.join(tiny[0], "latest.pt"), str(tmp_path / "forged.pt"),
                     lambda p: p.__setitem__(field, value))
    code, out, err = _run_textgen("info", forged)
    assert code == 2 and out == "", (code, out, err)
    assert err.startswith(f"error: {forged} is not a valid textgen checkpoint: {says}, not "), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value", [("step", "thirty"), ("plan", "x"), ("elapsed", "long"), ("history", "x"),
                                          ("train_config", "x"), ("interval_sums", {"bogus": 1.0}),
                                          ("rng", {"torch": 5}), ("carried_state", [[torch.zeros(1), torch.zeros(1)]])])
def test_resuming_a_signed_checkpoint_with_an_odd_field_is_one_sentence(tiny, tmp_path, field, value):
    run = tmp_path / "run"
    shutil.copytree(tiny[0], run)
    for name in ("latest.pt", "best.pt"):
        os.unlink(run / name)                            # hard links: the run's other names keep the old file
    _signed(os.path.join(tiny[0], "latest.pt"), str(run / "latest.pt"), lambda p: p.__setitem__(field, value))
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    result = train_here(tiny[1], "--resume", str(run), "--steps", "40", "-q")
    assert_user_error(result, "is not a valid textgen checkpoint", field)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


def test_generate_on_a_signed_checkpoint_whose_vocabulary_is_a_number_is_one_sentence(tiny, tmp_path):
    import textgen
    from textgen.cli import generate_main
    forged = _signed(os.path.join(tiny[0], "latest.pt"), str(tmp_path / "forged.pt"),
                     lambda p: p.__setitem__("vocab", {"chars": 5}))
    code, _, err = _in_process(generate_main, "--checkpoint", forged, "--length", "5")
    assert code == 2 and "its vocabulary is 5" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(UsageError, match="its vocabulary is 5"):
        textgen.load(forged)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_a_checkpoint_holding_a_sparse_tensor_is_digested_and_loads(tiny, tmp_path):
    sparse = torch.eye(3).to_sparse()
    forged = _signed(os.path.join(tiny[0], "latest.pt"), str(tmp_path / "sparse.pt"),
                     lambda p: p.__setitem__("extra", sparse))
    assert torch.equal(checkpoint.load(forged)["extra"].to_dense(), torch.eye(3))     # its digest verifies
    other = checkpoint.digest({"extra": torch.eye(3).to_sparse_csr()})                  # any layout is digested
    assert other != checkpoint.digest({"extra": torch.eye(3)})
    code, out, err = _run_textgen("info", forged)
    assert code == 0, err
    in_the_model = _signed(os.path.join(tiny[0], "latest.pt"), str(tmp_path / "sparse-weight.pt"),
                           lambda p: p["model"].__setitem__("embedding.weight", p["model"]["embedding.weight"].to_sparse()))
    with pytest.raises(UsageError, match="its model's embedding.weight is a sparse tensor, not a tensor"):
        checkpoint.load(in_the_model)


def test_the_digest_of_an_ordinary_checkpoint_is_what_it_always_was():
    """Pinned from before sparse tensors were digested: every checkpoint written so far still verifies."""
    payload = {"a": torch.arange(6, dtype=torch.float32).view(2, 3).t(), "b": [1, "x", None, 2.5, (3, 4)],
               "c": {"k": True, 2: torch.zeros(0, dtype=torch.bfloat16)}, "integrity": 5}
    assert checkpoint.digest(payload) == "9fec813b0e87632f225681504f2b94589a928518dece6d1b81520a35411dddba"


# ---------------------------------------------------------------------------
# 29-31: the server
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served_forged(tiny, tmp_path_factory):
    """A server over a folder of two runs: "good", and "forged", signed with vocab={"chars": 5}."""
    pytest.importorskip("uvicorn")
    from test_serve import Served
    folder = tmp_path_factory.mktemp("served")
    shutil.copytree(tiny[0], folder / "good")
    (folder / "forged").mkdir()
    _signed(os.path.join(tiny[0], "latest.pt"), str(folder / "forged" / "best.pt"),
            lambda p: p.__setitem__("vocab", {"chars": 5}))
    server = Served(str(folder))
    yield server
    server.close()


def test_the_listing_shows_a_forged_model_with_its_error_and_generating_from_it_is_400(served_forged):
    status, _, payload = served_forged.request("GET", "/api/models")
    assert status == 200, payload
    models = {m["name"]: m for m in json.loads(payload)["models"]}
    assert models["good"]["layers"] == 2 and "error" not in models["good"]
    assert "its vocabulary is 5" in models["forged"]["error"]
    status, _, payload = served_forged.request("POST", "/api/generate", {"model": "forged", "length": 5})
    assert status == 400 and "its vocabulary is 5" in json.loads(payload)["error"], payload


@pytest.mark.parametrize("field", ["temperature", "top_p", "length", "seed", "num_samples"])     # top_k: below
def test_an_integer_too_large_for_a_float_is_400(served_forged, field):
    raw = b'{"model": "good", "%s": 1%s}' % (field.encode(), b"0" * 400)
    status, _, payload = served_forged.request("POST", "/api/generate", raw=raw)
    assert status == 400, payload
    error = json.loads(payload)["error"]
    assert error.startswith(f'"{field}" must be'), error


def test_a_top_k_past_the_vocabulary_is_no_cut_as_on_the_command_line(served_forged):
    huge = served_forged.generate(model="good", length=20, seed=3, top_k=10**30)
    plain = served_forged.generate(model="good", length=20, seed=3)
    assert huge[-1]["end"] == "length", huge
    assert "".join(e.get("text", "") for e in huge) == "".join(e.get("text", "") for e in plain)
