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


def _run_textgen(*argv):
    import contextlib as _contextlib
    import io
    from textgen.cli import textgen_main
    out, err = io.StringIO(), io.StringIO()
    with _contextlib.redirect_stdout(out), _contextlib.redirect_stderr(err):
        code = textgen_main(list(argv))
    return code, out.getvalue(), err.getvalue()


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
    from textgen.plot import read_metrics
    notes = []
    assert read_metrics(str(tmp_path), note=notes.append) == GOOD_LINES and len(notes) == 1
