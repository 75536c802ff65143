import os
import shutil
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


def train_here(*args, cwd=None, env_extra=None):
    """train.py's main in this process, for runs that are references or setup rather than the
    command line under test (a subprocess pays 5 s to import torch and its compiler stack);
    returns what run() returns: returncode, stdout, stderr."""
    import contextlib
    import io
    import types
    from textgen.cli import train_main
    out, err = io.StringIO(), io.StringIO()
    saved_env = {name: os.environ.get(name) for name in (env_extra or {})}
    saved_cwd = os.getcwd()
    os.environ.update(env_extra or {})
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train_main([str(a) for a in args])
    finally:
        os.chdir(saved_cwd)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


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


# ---------------------------------------------------------------------------
# The LSTM's two pointwise paths: PyTorch ops and the compiled C kernel
# ---------------------------------------------------------------------------

class CountingKernel:
    """The compiled kernel, recording the slice count of each call: proof that a test ran the C path.

    The per-step entry points record the slice count they were given; the whole-step ones (a chunk's loop,
    generation's step, its many steps) record 1; the transpose and the draw record nothing. Anything else passes through."""

    SLICED = ("forward_step", "backward_step", "forward_step_bf16", "backward_step_bf16")
    WHOLE = ("rows_step", "forward_chunk", "backward_chunk", "decode_rows", "forward_chunk_bf16", "backward_chunk_bf16")

    def __init__(self, kernel):
        self.kernel, self.slices, self.threaded = kernel, [], kernel.threaded

    @property
    def calls(self) -> int:
        return len(self.slices)

    def __getattr__(self, name):
        entry = getattr(self.kernel, name)
        if name not in self.SLICED + self.WHOLE:
            return entry

        def counted(*arguments):
            self.slices.append(arguments[2] if name in self.SLICED else 1)      # (B, H, slices, ...)
            return entry(*arguments)
        return counted


def need_c_compiler(or_native_off: bool = True) -> None:
    """Skip where there is no C compiler (or TEXTGEN_NATIVE=0 turns the kernel off), except under CI
    (CI=true), where .ci/run's scripts/setup installs gcc: there it fails, so that the C kernel's half
    of the fast path's tests cannot vanish from a run unseen (as the browser test does for Chromium)."""
    from textgen.lstm import kernel_build, native_kernel
    if kernel_build.compiler() is None:
        why = "no C compiler here ($CC, cc, gcc or clang)"
    elif or_native_off and native_kernel._disabled():
        why = "TEXTGEN_NATIVE=0 turns the C kernel off"
    else:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why}: under CI the C kernel's tests must run (scripts/setup installs gcc)")
    pytest.skip(f"{why}: the C kernel is not built")


def c_kernel_or_skip():
    """The compiled kernel; a skip only where there is no compiler (a failed build fails the test),
    and under CI=true not even there (need_c_compiler)."""
    from textgen.lstm import native_kernel
    need_c_compiler()
    kernel = native_kernel.load()
    assert kernel is not None, "a C compiler is here, but the kernel failed to build or its self-check"
    return kernel


@pytest.fixture(params=["torch-ops", "c-kernel"])
def pointwise(request, monkeypatch):
    """Runs a test once with each step's pointwise work in PyTorch ops and once in the C kernel."""
    from textgen.lstm import native_kernel
    if request.param == "torch-ops":
        monkeypatch.setattr(native_kernel, "load", lambda: None)
        return None
    counting = CountingKernel(c_kernel_or_skip())
    monkeypatch.setattr(native_kernel, "load", lambda: counting)
    return counting


def ran_the_chosen_path(pointwise) -> bool:
    return pointwise is None or pointwise.calls > 0


class NNLSTMStack:
    """The reference for a StackedLSTM: one torch.nn.LSTM per layer with that layer's weights copied,
    each layer after the first adding its input to its output where the stack is residual."""

    NAMES = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def __init__(self, stack):
        import torch
        self.residual = stack.residual
        self.layers = []
        for k in range(stack.layers):
            layer = torch.nn.LSTM(stack.input_size if k == 0 else stack.hidden_size, stack.hidden_size)
            layer.load_state_dict({f"{name}_l0": getattr(stack, f"{name}_l{k}").detach().clone() for name in self.NAMES})
            self.layers.append(layer)

    def __call__(self, x, state):
        """x (T, B, I), state (h0, c0) each (layers, B, H) as nn.LSTM takes it -> out, (h, c) likewise."""
        import torch
        h0, c0 = state
        out, hs, cs = x, [], []
        for k, layer in enumerate(self.layers):
            y, (h, c) = layer(out, (h0[k:k + 1], c0[k:k + 1]))
            out = y + out if self.residual and k > 0 else y
            hs.append(h[0])
            cs.append(c[0])
        return out, (torch.stack(hs), torch.stack(cs))

    def grad(self, name: str):
        """The gradient of our parameter `name` (e.g. weight_ih_l1) in the reference."""
        base, k = name.rsplit("_l", 1)
        return getattr(self.layers[int(k)], f"{base}_l0").grad


# -- Chromium, for the playground's and the exported page's browser tests ------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need(condition: bool, what: str):
    """Skip without it, except under CI (CI=true), where .ci/run installs it: there it fails."""
    if not condition:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{what} is missing; .ci/run installs it")
        pytest.skip(f"{what} is not installed")


@pytest.fixture(scope="module")
def browser():
    _need(CHROMIUM is not None, "Chromium (Debian package chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "Playwright (pip install -e '.[test]')")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


def wait_until(page, expression: str, timeout: float = 30.0) -> None:
    """Poll a JavaScript expression from here until it is true. Playwright's wait_for_function polls by
    evaluating the expression inside the page, which a page whose policy forbids eval refuses whenever
    the first check is not already true; page.evaluate goes through the debugger, which the policy allows."""
    import time
    deadline = time.monotonic() + timeout
    while not page.evaluate(expression):
        if time.monotonic() > deadline:
            raise AssertionError(f"still not true after {timeout:g} s: {expression}")
        time.sleep(0.02)
