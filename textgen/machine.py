"""What this machine is, and where textgen keeps what it makes for it.

Owns: the one cache location (``cache_root``: prepared corpora under it, compiled kernels in
its ``kernels`` folder) and the one reading of the CPU's model and feature flags. Standard
library only and imports nothing of ours, so that every module may use it: the model's fast
path (for the kernel cache and the ``-march=native`` build key), devices (is bf16 native?)
and corpus (the token cache).
"""
from __future__ import annotations

import functools
import os
import platform


def cache_root() -> str:
    """$TEXTGEN_CACHE_DIR, else $XDG_CACHE_HOME/textgen, else ~/.cache/textgen."""
    return os.environ.get("TEXTGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "textgen")


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return tuple(line for line in f if line.startswith(("model name", "flags", "Features", "CPU part")))
    except OSError:
        return ()


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo; empty elsewhere)."""
    return set(next((line for line in _cpuinfo_lines() if line.startswith("flags")), "").split()[2:])


def cpu_identity() -> str:
    """What code built with -march=native depends on: the CPU's model and feature flags."""
    lines = _cpuinfo_lines()
    return "".join(sorted(set(lines))) if lines else platform.processor() + platform.machine()
