"""Devices, dtypes and memory: which device a command runs on, whether bf16 is native there, and
whether a model fits.

Training, generation, evaluation and the Python API all choose their device here, so inference
never imports the training module. Imports ``errors`` and ``machine`` (which reads the CPU's
flags); never ``training`` or ``cli``.
"""
from __future__ import annotations

import os

import torch

from .errors import UsageError
from .machine import cpu_flags


def resolve_device(name: str) -> torch.device:
    """auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps, checked against what is here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"{{device}} {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps", device=...) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("{device} cuda was asked for but no CUDA GPU is available", device=...)
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("{device} mps was asked for but MPS is not available", device=...)
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{{device}} {name!r} is not supported; use auto, cpu, cuda, cuda:N or mps", device=...)
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 matrix products run natively (faster than float32) on this device."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    # Without these, oneDNN emulates bf16 with float32 instructions: slower, not faster.
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "bfloat16" if native_bf16(device) else "float32"
    return name


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new allocations on device, or None where that cannot be read."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0]
        except RuntimeError:
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _gigabytes(n: float) -> str:
    return f"{n / 2**30:,.1f} GB" if n < 2**40 * 1000 else f"{n / 2**30:.3g} GB"


def check_fits(parameters: int, device: torch.device, what: str = "the model") -> None:
    """Refuse, before anything is allocated, a model whose weights, gradients and two AdamW
    moments (4 float32 copies of every parameter) exceed the memory free on device."""
    needed = 16 * parameters
    free = available_memory(device)
    if free is not None and needed > free:
        raise UsageError(f"{what} has {parameters:,} parameters and needs about {_gigabytes(needed)} for its weights, "
                         f"gradients and AdamW moments, but {_gigabytes(free)} of memory is available on "
                         f"{device.type}; choose a smaller {{hidden_size}}, {{embed_size}} or {{layers}}",
                         hidden_size=..., embed_size=..., layers=...)
