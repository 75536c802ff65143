import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CORPORA = os.path.join(os.path.dirname(ROOT), "shared", "corpora")

def pytest_configure(config):
    # Prepared corpora go to a cache of the test session's own, never the user's (subprocesses inherit it).
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="textgen-test-cache-")


# Small and fast: a few seconds of training on two cores.
TINY = ["--hidden-size", "32", "--embed-size", "16", "--layers", "2", "--batch-size", "4", "--seq-len", "16",
        "--eval-every", "10", "--save-every", "10", "--log-every", "5", "--sample-length", "20", "--warmup-steps", "5"]


def small_text(n_lines: int = 400) -> str:
    """A text with a learnable structure and some non-ASCII characters."""
    names = ["ANNA", "BORIS", "CLÉO", "DMITRI"]
    words = "the sea is calm tonight and the light turns slowly over the rocks where gulls sleep".split()
    lines = []
    for i in range(n_lines):
        speaker = names[i % len(names)]
        line = " ".join(words[(i * 7 + k * 3) % len(words)] for k in range(6 + i % 5))
        lines.append(f"{speaker}:\n{line.capitalize()}.\n")
    return "\n".join(lines)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(small_text(), encoding="utf-8")
    return str(path)


def run(script: str, *args, cwd=None, input=None, timeout=300, env_extra=None):
    """Run train.py / generate.py / a module as a user would; returns CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env.update(env_extra or {})
    if script.startswith("-m"):
        cmd = [sys.executable, "-m", script[2:].strip(), *args]
    else:
        cmd = [sys.executable, os.path.join(ROOT, script), *args]
    return subprocess.run(cmd, cwd=cwd or ROOT, input=input, capture_output=True, text=True, timeout=timeout,
                          env=env)


def assert_user_error(result, *fragments, code=2):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def train_tiny(folder, *flags):
    """Train a TINY model on small_text() in folder; returns (run folder, text path). Later flags win."""
    from textgen.cli import train_main
    text = folder / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    out = str(folder / "run")
    assert train_main([str(text), *TINY, "--steps", "30", "--out", out, "-q", "--sample-length", "0", *flags]) == 0
    return out, str(text)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run folder trained for 30 tiny steps on small_text(), and the text's path."""
    return train_tiny(tmp_path_factory.mktemp("tiny"))
