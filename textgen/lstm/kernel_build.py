"""Building the C kernel (lstm_kernel.c) safely, once per source, compiler and CPU, into a private cache.

native_kernel.py binds, checks and loads what this builds; only it imports this, and this imports only
machine.py (where textgen's cache is, what CPU this is) and files.py, the one writer. Because a shared
library runs code the moment it is loaded:

* It loads only from a folder it made private: created with mode 0700, and checked (owned by this user,
  a real folder, writable by nobody else) through an open descriptor before anything in it is read. Where
  the cache folder fails that check, the kernel is built in a fresh ``mkdtemp`` folder for this process
  instead; there is no predictable shared fallback.
* A cached library is loaded only if its sha256 matches the one written beside it when it was built;
  otherwise it is rebuilt.
* The build has one deadline in all (``BUILD_TIMEOUT_S``); a compiler that hangs is killed with its
  children. Partial files left by killed builds are removed.
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from typing import NamedTuple

import torch

from .. import files
from ..machine import cache_root, cpu_identity

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lstm_kernel.c")
# -fno-trapping-math lets the compiler turn the clamps in exp_approx into vector min/max; the
# kernel never reads floating-point exception flags. Tried in order: the first that builds wins.
FLAG_SETS = (["-O3", "-fno-trapping-math", "-march=native"],
             ["-O3", "-fno-trapping-math", "-mcpu=native"],
             ["-O3", "-fno-trapping-math"])
# All compiler calls together (a build takes about 0.3 s here): a hung compiler must not stall start-up.
BUILD_TIMEOUT_S = 20.0
PARTIAL_PREFIX = "partial-"


# ---------------------------------------------------------------------------
# The private cache folder
# ---------------------------------------------------------------------------

def _private_problem(fd: int) -> str | None:
    """Why the open folder fd is not private to this user, or None when it is."""
    info = os.fstat(fd)
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if hasattr(os, "getuid") and info.st_uid != os.getuid():
        return f"belongs to user id {info.st_uid}, not to you"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _open_folder(path: str) -> int:
    """An fd of path itself (never of a symbolic link's target), for checks that cannot be raced."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))


def _private_folder() -> tuple[str, int, str | None]:
    """(path, open fd, note): the kernel cache if it is private to this user, else a fresh mkdtemp.

    The checks are made on an open descriptor and everything is then read through it, so
    the folder cannot be swapped for another between the check and the load.
    """
    path = os.path.join(cache_root(), "kernels")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        fd = _open_folder(path)
        problem = _private_problem(fd)
        if problem is None:
            return path, fd, None
        os.close(fd)
    except OSError as e:
        problem = f"cannot be used ({e.strerror or e})"
    temporary = tempfile.mkdtemp(prefix="textgen-kernel-")        # mode 0700, a name no one can predict
    atexit.register(shutil.rmtree, temporary, True)
    return temporary, _open_folder(temporary), f"the cache folder {path} {problem}; built in a private temporary folder"


def _remove_stale_partials(fd: int) -> None:
    """Remove partial files of builds that were killed: older than any build can take."""
    for name in os.listdir(fd):
        if name.startswith(PARTIAL_PREFIX):
            try:
                if time.time() - os.stat(name, dir_fd=fd, follow_symlinks=False).st_mtime > 2 * BUILD_TIMEOUT_S:
                    os.unlink(name, dir_fd=fd)
            except OSError:
                pass


def _read(fd: int, name: str) -> bytes | None:
    try:
        file = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
    except OSError:
        return None
    with os.fdopen(file, "rb") as f:
        return f.read()


def _load_verified(fd: int, folder: str, name: str) -> tuple[ctypes.CDLL, ctypes.PyDLL] | None:
    """The library `name` if its bytes hash to the sha256 recorded beside it at build time."""
    library, recorded = _read(fd, name), _read(fd, name + ".sha256")
    if library is None or recorded is None or hashlib.sha256(library).hexdigest() != recorded.decode(errors="replace").strip():
        return None
    # Through the checked descriptor where the OS offers one, so the path cannot be redirected.
    through_fd = f"/proc/self/fd/{fd}/{name}"
    path = through_fd if os.path.exists(through_fd) else os.path.join(folder, name)
    return ctypes.CDLL(path), ctypes.PyDLL(path)          # one library, two ways to call it (native_kernel.Kernel)


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------

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


def compiler() -> str | None:
    """The C compiler to build with ($CC, cc, gcc or clang), or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class BuildFailed(Exception):
    """The kernel could not be built or loaded here; the message says why, in one line."""


def _run_compiler(command: list[str], deadline: float) -> subprocess.CompletedProcess:
    """Run the compiler until the deadline; past it, kill it with its children (cc1, as, ld)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise BuildFailed(f"the build took longer than {BUILD_TIMEOUT_S:g} s")
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=remaining)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            proc.kill()
        proc.communicate()
        raise BuildFailed(f"{os.path.basename(command[0])} took longer than {BUILD_TIMEOUT_S:g} s and was stopped")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _first_error_lines(output: str, count: int = 3) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines
    return " | ".join(errors[:count]) or "no output"


class Built(NamedTuple):
    """A verified library: its two ctypes handles (calls that give up the GIL, and calls that keep it), where
    it is, and the flags it was built with."""
    library: ctypes.CDLL
    quick: ctypes.PyDLL
    path: str
    flags: list[str]


def build(compiler: str) -> tuple[Built, str | None]:
    """The library, built or found in textgen's private cache folder, and a note when that folder could
    not be used. Raises BuildFailed (or OSError) where it cannot be had."""
    with open(SOURCE, "rb") as f:
        source = f.read()
    folder, fd, note = _private_folder()
    try:
        _remove_stale_partials(fd)
        return _build(compiler, source, fd, folder), note
    finally:
        os.close(fd)


def _build(compiler: str, source: bytes, fd: int, folder: str) -> Built:
    """The library from the private folder, built there first when it is missing or does not verify."""
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    try:
        version = _run_compiler([compiler, "--version"], deadline).stdout
    except OSError as e:
        raise BuildFailed(f"{compiler} could not be run ({e.strerror or e})")
    suffix = ".dylib" if platform.system() == "Darwin" else ".so"
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256("\0".join([source.hex(), compiler, version, " ".join(flags), platform.machine(),
                                        cpu_identity()]).encode()).hexdigest()[:20]
        name = f"lstm_kernel-{key}{suffix}"
        libs = _load_verified(fd, folder, name)
        if libs is not None:
            return Built(libs[0], libs[1], os.path.join(folder, name), flags)
        # Build under a partial name, then install: processes started together (torchrun) may all
        # build, and none may load another's half-written file.
        partial = f"{PARTIAL_PREFIX}{os.getpid()}-{os.urandom(4).hex()}{suffix}"
        try:
            # The compiler writes by path; what it wrote is read back through the checked fd.
            done = _run_compiler([compiler, *flags, "-shared", "-fPIC", SOURCE, "-o", os.path.join(folder, partial)],
                                 deadline)
            if done.returncode != 0:
                errors.append(_first_error_lines(done.stderr + done.stdout))
                continue
            built = _read(fd, partial)
            if built is None:
                errors.append("the compiler wrote no library")
                continue
            # The bytes read back are the ones hashed and the ones installed, through the one writer.
            files.write_in_folder(fd, name + ".sha256", hashlib.sha256(built).hexdigest().encode(),
                                  f"{PARTIAL_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
            files.write_in_folder(fd, name, built, f"{PARTIAL_PREFIX}{os.getpid()}-{os.urandom(4).hex()}{suffix}")
        finally:
            try:
                os.unlink(partial, dir_fd=fd)
            except OSError:
                pass
        libs = _load_verified(fd, folder, name)
        if libs is not None:
            return Built(libs[0], libs[1], os.path.join(folder, name), flags)
        errors.append("the library changed between its build and its load")   # another process rebuilt it
    raise BuildFailed(f"{os.path.basename(compiler)} failed to build {os.path.basename(SOURCE)}: {errors[0]}")
