"""The LSTM's per-step pointwise work in C (lstm_kernel.c), compiled on first use.

Only textgen.model imports this. On small shapes one LSTM step's ten or so
pointwise tensor operations cost more in dispatch than in arithmetic, and
torch.tanh is slow on some CPUs; lstm_kernel.c does a step's pointwise work,
forward or backward, in one vectorised pass. It is compiled with the machine's
C compiler (``$CC``, ``cc``, ``gcc`` or ``clang``; ``-march=native``, since it is
built where it runs) into a cache folder, once per source, compiler and CPU,
and called through ctypes, so it needs neither PyTorch headers nor a build step
at install time. Where there is no compiler, or the build or a numerical
self-check fails, ``load()`` returns None and the model runs its pure-PyTorch
path, the same function a little slower. ``TEXTGEN_NATIVE=0`` turns the
kernel off; ``TEXTGEN_CACHE_DIR`` moves the cache (default
``$XDG_CACHE_HOME/textgen`` or ``~/.cache/textgen``).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_kernel.c")
# -fno-trapping-math lets the compiler turn the clamps in exp_approx into vector min/max; the
# kernel never reads floating-point exception flags. Tried in order: the first that builds wins.
FLAG_SETS = (["-O3", "-fno-trapping-math", "-march=native"],
             ["-O3", "-fno-trapping-math", "-mcpu=native"],
             ["-O3", "-fno-trapping-math"])


def _torch_uses_libgomp() -> bool:
    """Whether this process's PyTorch runs its threads on GNU OpenMP (libgomp.so.1).

    Only then is the kernel built with -fopenmp: its libgomp.so.1 then resolves to the copy
    PyTorch already loaded, so both share one pool of threads. A second OpenMP runtime (say
    libgomp beside PyTorch's Intel or LLVM OpenMP) would put two spinning pools on the same cores.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            return "libgomp" in f.read() and "OpenMP" in torch.__config__.parallel_info()
    except OSError:
        return False


def _flag_sets() -> list[list[str]]:
    if _torch_uses_libgomp():
        return [[*flags, "-fopenmp"] for flags in FLAG_SETS] + list(FLAG_SETS)
    return list(FLAG_SETS)


class Kernel:
    """ctypes bindings of lstm_kernel.c; arguments are sizes and data pointers of float32 tensors."""

    def __init__(self, library_path: str, flags: list[str]):
        self.path, self.flags = library_path, flags
        lib = ctypes.CDLL(library_path)
        size, ptr = ctypes.c_int64, ctypes.c_void_p
        self.forward_step = lib.lstm_forward_step
        self.forward_step.argtypes = [size, size, ptr, ptr, ptr, ptr, ptr]
        self.forward_step.restype = None
        self.backward_step = lib.lstm_backward_step
        self.backward_step.argtypes = [size, size, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        self.backward_step.restype = None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> str:
    root = os.environ.get("TEXTGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "textgen")
    try:
        os.makedirs(root, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = os.path.join(tempfile.gettempdir(), f"textgen-{os.getuid() if hasattr(os, 'getuid') else 'user'}")
    os.makedirs(fallback, exist_ok=True)
    return fallback


def _build(compiler: str, source: bytes) -> tuple[str, list[str]] | None:
    """Compile to the cache (or find it there); returns the library's path and flags used."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cache = _cache_dir()
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([source.hex(), compiler, version, " ".join(flags), platform.machine(),
                                        _cpu_identity()]).encode()).hexdigest()[:20]
        library = os.path.join(cache, f"lstm_kernel-{key}{suffix}")
        if os.path.exists(library):
            return library, flags
        # Build under a temporary name and rename: processes started together (torchrun)
        # may all build, and none may load another's half-written file.
        fd, partial = tempfile.mkstemp(suffix=suffix, dir=cache)
        os.close(fd)
        try:
            done = subprocess.run([compiler, *flags, "-shared", "-fPIC", SOURCE, "-o", partial],
                                  capture_output=True, timeout=120)
            if done.returncode == 0:
                os.replace(partial, library)
                return library, flags
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    return None


def _self_check(kernel: Kernel) -> bool:
    """The compiled kernel against the same formulas in PyTorch, on two small random steps.

    H is not a multiple of a vector width, so the loops' tails run too; the second shape is
    large enough for the kernel to split it over threads.
    """
    return all(_check_step(kernel, B, H) for B, H in ((3, 37), (48, 101)))


def _check_step(kernel: Kernel, B: int, H: int) -> bool:
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(B, 4 * H, generator=gen) * 4
    c_prev, grad_h, grad_c = (torch.randn(B, H, generator=gen) for _ in range(3))
    gates, c, h, grad_pre = torch.empty(B, 4 * H), torch.empty(B, H), torch.empty(B, H), torch.empty(B, 4 * H)
    kernel.forward_step(B, H, pre.data_ptr(), gates.data_ptr(), c_prev.data_ptr(), c.data_ptr(), h.data_ptr())
    i, f, g, o = pre.chunk(4, 1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c_ref = f * c_prev + i * g
    tanh_c = torch.tanh(c_ref)
    dc = grad_c + grad_h * o * (1 - tanh_c**2)
    grad_pre_ref = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g**2),
                              grad_h * tanh_c * o * (1 - o)], 1)
    grad_c_in, grad_bias = grad_c.clone(), torch.ones(4 * H)
    kernel.backward_step(B, H, gates.data_ptr(), c.data_ptr(), c_prev.data_ptr(), grad_h.data_ptr(),
                         grad_c_in.data_ptr(), grad_pre.data_ptr(), grad_bias.data_ptr())
    pairs = [(gates, torch.cat([i, f, g, o], 1)), (c, c_ref), (h, o * tanh_c), (grad_pre, grad_pre_ref),
             (grad_c_in, dc * f), (grad_bias, 1 + grad_pre_ref.sum(0))]
    return all(torch.allclose(ours, ref, atol=1e-5, rtol=1e-5) for ours, ref in pairs)


def _disabled() -> bool:
    return os.environ.get("TEXTGEN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


@functools.cache
def load() -> Kernel | None:
    """The compiled kernel, or None when it is turned off or cannot be built here."""
    if _disabled():
        return None
    compiler = _compiler()
    if compiler is None:
        return None
    try:
        with open(SOURCE, "rb") as f:
            built = _build(compiler, f.read())
        if built is None:
            return None
        kernel = Kernel(*built)
    except OSError:
        return None
    return kernel if _self_check(kernel) else None


def describe() -> str:
    """One line for logs: which LSTM pointwise path runs here."""
    kernel = load()
    if kernel is None:
        reason = "TEXTGEN_NATIVE=0" if _disabled() else "no C compiler found or its build failed"
        return f"PyTorch ops (no C kernel: {reason})"
    return "C kernel"
