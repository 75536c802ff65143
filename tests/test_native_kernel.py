"""A kernel no one else can swap: the C kernel is built into a private folder, loaded only if it
verifies, and a compiler that fails or hangs costs one honest line, never a stalled start-up.

A planted library is a real shared object whose constructor creates a marker file: if it were
ever loaded (dlopen runs constructors at once) the marker would exist.
"""
import os
import subprocess
import sys
import time

import pytest
import torch

import textgen.lstm.model
from conftest import ROOT, TINY, assert_user_error, need_c_compiler, run
from textgen.lstm import kernel_build, native_kernel
from textgen.lstm.model import CharLSTM, ModelConfig

PLANTED = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void)
{
    const char *marker = getenv("TEXTGEN_TEST_MARKER");
    FILE *f = marker ? fopen(marker, "w") : NULL;
    if (f)
        fclose(f);
}
"""


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch, tmp_path):
    """A cache folder of this test's own, the kernel neither demanded nor turned off, no cached load."""
    need_c_compiler(or_native_off=False)                 # a skip, but a failure under CI=true
    monkeypatch.delenv("TEXTGEN_NATIVE", raising=False)
    monkeypatch.setenv("TEXTGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TEXTGEN_TEST_MARKER", str(tmp_path / "planted-library-ran"))
    native_kernel.load.cache_clear()
    yield tmp_path
    native_kernel.load.cache_clear()


def kernels_folder(tmp_path):
    return tmp_path / "cache" / "kernels"


def planted_library(tmp_path) -> bytes:
    source = tmp_path / "planted.c"
    source.write_text(PLANTED)
    subprocess.run([kernel_build.compiler(), "-shared", "-fPIC", str(source), "-o", str(tmp_path / "planted.so")],
                   check=True)
    return (tmp_path / "planted.so").read_bytes()


def fresh_load():
    native_kernel.load.cache_clear()
    return native_kernel.load()


def assert_planted_library_never_ran(tmp_path):
    assert not (tmp_path / "planted-library-ran").exists(), "a planted library was loaded"


def fake_compiler(tmp_path, script: str) -> str:
    path = tmp_path / "fake-cc"
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)
    return str(path)


def test_the_kernel_is_built_once_into_a_private_folder_with_its_hash(tmp_path):
    kernel = fresh_load()
    folder = kernels_folder(tmp_path)
    assert kernel is not None and os.path.dirname(kernel.path) == str(folder)
    assert (folder.stat().st_mode & 0o777) == 0o700
    library = os.path.basename(kernel.path)
    assert sorted(os.listdir(folder)) == [library, library + ".sha256"]          # no partial files left
    built = os.path.getmtime(kernel.path)
    assert fresh_load().path == kernel.path and os.path.getmtime(kernel.path) == built    # not rebuilt


def test_a_tampered_library_is_rebuilt_and_never_loaded(tmp_path):
    kernel = fresh_load()
    with open(kernel.path, "wb") as f:              # someone (or a bad disk) changed the library
        f.write(planted_library(tmp_path))
    again = fresh_load()
    assert_planted_library_never_ran(tmp_path)
    assert again is not None and again.path == kernel.path
    import hashlib
    recorded = open(kernel.path + ".sha256").read().strip()
    assert hashlib.sha256(open(kernel.path, "rb").read()).hexdigest() == recorded


def test_a_cache_folder_others_can_write_is_never_loaded_from(tmp_path):
    kernel = fresh_load()
    folder = kernels_folder(tmp_path)
    folder.chmod(0o777)
    # What another user could then do: plant a library and a matching hash under the expected name.
    import hashlib
    planted = planted_library(tmp_path)
    with open(kernel.path, "wb") as f:
        f.write(planted)
    with open(kernel.path + ".sha256", "w") as f:
        f.write(hashlib.sha256(planted).hexdigest())
    again = fresh_load()
    assert_planted_library_never_ran(tmp_path)
    assert again is not None and not again.path.startswith(str(folder))        # built in a private mkdtemp
    assert (os.stat(os.path.dirname(again.path)).st_mode & 0o777) == 0o700
    described = textgen.lstm.describe_step_path("cpu")
    assert "writable by others" in described and "private temporary folder" in described, described


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="giving a folder away needs root")
def test_a_cache_folder_owned_by_someone_else_is_never_loaded_from(tmp_path):
    kernel = fresh_load()
    folder = kernels_folder(tmp_path)
    with open(kernel.path, "wb") as f:
        f.write(planted_library(tmp_path))
    os.chown(folder, 12345, -1)
    again = fresh_load()
    assert_planted_library_never_ran(tmp_path)
    assert again is not None and not again.path.startswith(str(folder))
    assert "belongs to user id 12345" in textgen.lstm.describe_step_path("cpu")


def test_a_cache_folder_that_is_a_symbolic_link_is_not_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    kernels_folder(tmp_path).parent.mkdir(parents=True)
    kernels_folder(tmp_path).symlink_to(elsewhere)
    kernel = fresh_load()
    assert kernel is not None and not kernel.path.startswith(str(tmp_path / "cache"))
    assert os.listdir(elsewhere) == []


def test_partial_files_of_killed_builds_are_removed(tmp_path):
    folder = kernels_folder(tmp_path)
    folder.mkdir(parents=True, mode=0o700)
    stale, fresh = folder / "partial-1234-dead.so", folder / "partial-5678-busy.so"
    stale.write_bytes(b"half a library")
    fresh.write_bytes(b"another process is building this one")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert fresh_load() is not None
    assert not stale.exists() and fresh.exists()


def test_a_failing_compiler_is_reported_with_its_first_error_lines(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", fake_compiler(tmp_path, """case "$1" in --version) echo fake-cc 1.0; exit 0;; esac
echo "lstm_kernel.c:12:3: error: planted failure" >&2; exit 1"""))
    assert fresh_load() is None
    described = textgen.lstm.describe_step_path("cpu")
    assert described.startswith("LSTM steps: PyTorch ops (no C kernel: fake-cc failed to build lstm_kernel.c:")
    assert "error: planted failure" in described
    model = CharLSTM(ModelConfig(vocab_size=9, embed_size=4, hidden_size=8, layers=1, dropout=0.0))
    logits, _ = model(torch.randint(0, 9, (2, 5)))           # the PyTorch-op path still trains
    logits.sum().backward()
    assert model.lstm.weight_hh_l0.grad is not None
    monkeypatch.setenv("TEXTGEN_NATIVE", "1")                # asked for explicitly: an error, not a fallback
    native_kernel.load.cache_clear()
    with pytest.raises(native_kernel.KernelUnavailable, match="TEXTGEN_NATIVE=1 asks for the C kernel, but "
                                                              "fake-cc failed .* planted failure"):
        native_kernel.load()
    monkeypatch.setenv("TEXTGEN_NATIVE", "0")
    native_kernel.load.cache_clear()
    assert "TEXTGEN_NATIVE=0" in textgen.lstm.describe_step_path("cpu")


HANGING_BUILD = """
import sys, time
from textgen.lstm import native_kernel, kernel_build
kernel_build.BUILD_TIMEOUT_S = 1.0
started = time.monotonic()
print(native_kernel.describe())
print(f"returned after {time.monotonic() - started:.1f} s")
"""


def test_a_hanging_compiler_is_stopped_at_the_deadline(tmp_path):
    env = dict(os.environ, CC=fake_compiler(tmp_path, "exec sleep 600"), TEXTGEN_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("TEXTGEN_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", HANGING_BUILD], capture_output=True, text=True, timeout=120,
                          env=env, cwd=ROOT)     # the timeout only keeps a broken deadline from hanging the suite
    assert done.returncode == 0, done.stderr
    assert "PyTorch ops (no C kernel: fake-cc took longer than 1 s and was stopped)" in done.stdout, done.stdout
    waited = float(done.stdout.split("returned after ")[1].split(" s")[0])
    assert waited < 30, f"a 1 s build deadline held start-up for {waited} s"     # a bound on a hang, not a speed


def test_train_with_textgen_native_1_and_no_working_compiler_exits_with_one_sentence(tmp_path, text_file):
    failing = fake_compiler(tmp_path, 'echo "error: planted failure" >&2; exit 1')
    env = {"CC": failing, "TEXTGEN_CACHE_DIR": str(tmp_path / "cache")}
    out = str(tmp_path / "run")
    demanded = run("train.py", text_file, *TINY, "--steps", "2", "--out", out,
                   env_extra={**env, "TEXTGEN_NATIVE": "1"})
    assert_user_error(demanded, "TEXTGEN_NATIVE=1 asks for the C kernel", "planted failure", code=1)
    assert len(demanded.stderr.strip().splitlines()) == 1
    fallback = run("train.py", text_file, *TINY, "--steps", "2", "--out", str(tmp_path / "run2"),
                   env_extra={**env, "TEXTGEN_NATIVE": ""})
    assert fallback.returncode == 0, fallback.stderr
    assert "PyTorch ops (no C kernel: fake-cc failed to build lstm_kernel.c: error: planted failure)" in fallback.stdout


def test_the_long_calls_give_up_the_gil_and_the_short_ones_keep_it():
    """A whole chunk (a long prompt read in a server's thread) or a block's transpose must let the server's
    other threads run; a step or a draw, microseconds, keeps the GIL so as not to wait to take it back."""
    import ctypes
    from conftest import c_kernel_or_skip
    kernel = c_kernel_or_skip()
    keeps_gil = lambda function: bool(function._flags_ & ctypes._FUNCFLAG_PYTHONAPI)   # noqa: E731  (ctypes.PyDLL's)
    assert not any(keeps_gil(f) for f in (kernel.forward_chunk, kernel.backward_chunk, kernel.transpose))
    assert all(keeps_gil(f) for f in (kernel.forward_step, kernel.backward_step, kernel.forward_step_bf16,
                                      kernel.backward_step_bf16, kernel.rows_step, kernel.sample_rows))
