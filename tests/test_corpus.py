"""Large-corpus preparation: streamed decoding, the token cache, folders, bounded memory."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, TINY, run, small_text
from textgen import corpus as corpus_module
from textgen.corpus import decoded_blocks, prepare, resolve_sources
from textgen.errors import UsageError
from textgen.tokenizer import CharTokenizer, UnknownCharactersError

MIXED = "añ€😀ж\r\n中e\u0301" * 3


def test_incremental_decoding_splits_characters_at_every_offset(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_text(MIXED, encoding="utf-8")
    for block in range(1, 9):                                    # every split of every multi-byte character
        assert "".join(t for _, t in decoded_blocks(str(path), block_bytes=block)) == MIXED


def test_prepared_tokens_equal_encoding_at_once(tmp_path, monkeypatch):
    path = tmp_path / "mixed.txt"
    path.write_text(MIXED * 50, encoding="utf-8")
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 7)         # blocks cut through characters
    prepared = prepare(str(path), cache_dir=str(tmp_path / "cache"))
    expected = CharTokenizer.from_text(MIXED * 50)
    assert prepared.tokenizer == expected
    assert np.array_equal(np.asarray(prepared.tokens), expected.encode(MIXED * 50))
    assert isinstance(prepared.tokens, np.memmap)


def test_decoding_error_names_the_byte_offset_across_blocks(tmp_path, monkeypatch):
    path = tmp_path / "bad.txt"
    path.write_bytes("héllo wörld ".encode() * 10 + b"\xff tail")
    monkeypatch.setattr(corpus_module, "BLOCK_BYTES", 5)
    with pytest.raises(UsageError, match="offset 140"):
        prepare(str(path), cache_dir=str(tmp_path / "cache"))


def test_second_run_reuses_the_cache_and_a_changed_file_invalidates_it(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(small_text(), encoding="utf-8")
    cache = str(tmp_path / "cache")
    first = prepare(str(path), cache_dir=cache)

    def read_again(*args, **kwargs):
        raise AssertionError("a cache hit read the file again")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus_module, "decoded_blocks", read_again)
        second = prepare(str(path), cache_dir=cache)              # found by path, size and mtime alone
    assert second.info["cache"] == first.info["cache"]
    path.write_text(small_text().replace("sea", "SEA"), encoding="utf-8")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = prepare(str(path), cache_dir=cache)
    assert changed.sha256 != first.sha256 and changed.info["cache"] != first.info["cache"]
    text = changed.tokenizer.decode(changed.tokens[:])
    assert text == small_text().replace("sea", "SEA") and "SEA" not in first.tokenizer.decode(first.tokens[:])


def test_imposed_vocabulary_for_a_resumed_run(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("abcab", encoding="utf-8")
    wider = CharTokenizer("abcdz")
    prepared = prepare(str(path), cache_dir=str(tmp_path / "cache"), tokenizer=wider)
    assert prepared.tokenizer == wider and wider.decode(prepared.tokens) == "abcab"
    own = prepare(str(path), cache_dir=str(tmp_path / "cache"))             # a fresh run: its own vocabulary
    assert own.tokenizer.chars == "abc"
    with pytest.raises(UnknownCharactersError, match="c"):
        prepare(str(path), cache_dir=str(tmp_path / "cache"), tokenizer=CharTokenizer("ab"))


def test_a_folder_is_one_deterministic_corpus_recorded_in_the_checkpoint(tmp_path):
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second " * 200, encoding="utf-8")
    (folder / "a.txt").write_text("first " * 200, encoding="utf-8")
    (folder / "sub" / "c.txt").write_text("third " * 200, encoding="utf-8")
    (folder / ".hidden").write_text("never", encoding="utf-8")
    paths = resolve_sources(str(folder))
    assert [os.path.relpath(p, folder) for p in paths] == ["a.txt", "b.txt", os.path.join("sub", "c.txt")]
    a = prepare(str(folder), cache_dir=str(tmp_path / "c1"), separator="\n---\n")
    b = prepare(str(folder), cache_dir=str(tmp_path / "c2"), separator="\n---\n")
    text = a.tokenizer.decode(a.tokens)
    assert text == "first " * 200 + "\n---\n" + "second " * 200 + "\n---\n" + "third " * 200
    assert a.sha256 == b.sha256 and np.array_equal(a.tokens, b.tokens)
    globbed = prepare(str(folder / "*.txt"), cache_dir=str(tmp_path / "c1"), separator="\n---\n")
    assert globbed.tokenizer.decode(globbed.tokens).count("third") == 0
    out = tmp_path / "run"
    result = run("train.py", str(folder), *TINY, "--steps", "5", "--out", str(out), "--separator", "\\n---\\n", "-q")
    assert result.returncode == 0, result.stderr
    config = json.load(open(out / "config.json"))
    assert config["corpus"]["files"] == paths and config["corpus"]["separator"] == "\n---\n"


MEMORY_PROBE = """
import json, os, sys
import torch
from textgen.cli import train_main
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                     # forget the peak left by importing torch
def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
base = kb("VmRSS")
code = train_main(sys.argv[1:])
print(json.dumps({"code": code, "growth_mb": (kb("VmHWM") - base) / 1024}))
"""


def peak_growth_mb(tmp_path, megabytes: int) -> tuple[float, float]:
    """Peak resident memory added by preparing and training on a generated corpus; and its decoded size."""
    path = tmp_path / f"{megabytes}mb.txt"
    line = "The keeper climbs the stair; the lamp turns over the rocks — ever on. 😀\n"
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(megabytes * 1_000_000 // len(line.encode())):
            f.write(line)
    characters = os.path.getsize(path) // len(line.encode()) * len(line)
    result = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), *TINY, "--steps", "20", "-q",
                             "--out", str(tmp_path / f"run{megabytes}"), "--sample-length", "0",
                             "--eval-chars", "20000"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["code"] == 0
    return report["growth_mb"], characters * 4 / 2**20              # a str with an emoji: 4 bytes a character


def test_memory_does_not_grow_with_the_corpus(tmp_path):
    small, _ = peak_growth_mb(tmp_path, 1)
    large, decoded_mb = peak_growth_mb(tmp_path, 50)
    # Preparing and training on 50 MB costs no more than a few MB beyond 1 MB, far below
    # the ~180 MB the decoded text would take (the fixed cost is imports, model, optimizer).
    assert large - small < decoded_mb / 10, (small, large, decoded_mb)
