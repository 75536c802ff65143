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
