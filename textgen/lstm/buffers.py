"""Large buffers kept for reuse: a chunk's gates, their gradients, its h and c.

glibc gives every allocation over 32 MB pages of its own (mmap) and hands them back when it is freed
(and smaller ones go back when the top of its heap is trimmed), so each chunk faulted its large
buffers in afresh and the kernel zeroed every page: at 3x512, 64 streams of 128 steps, ~540 MB a
training step; kept, 22-35 MB, and the step 15% shorter (benchmarks/page_faults.py, AMD EPYC;
benchmarks/README.md, "Speed close to the chip"). A buffer kept here is lent again only
once nothing else holds its memory (its storage's use count says so), so the chunk after reuses the
pages the chunk before faulted in, whatever autograd still keeps or frees, and in whatever order. (Not
seen: a caller who keeps only a storage object of an output, tensor.untyped_storage(), without any
tensor on it; PyTorch caches that object, so its use count does not show it.)
Only fused_lstm.py imports this.
"""
from __future__ import annotations

import math
import threading

import torch

# From this size a buffer is kept: over 32 MB glibc maps each afresh, and from a few MB its heap is trimmed
# and grown again when other work runs between two chunks (2x256, 16 MB gates, in bench_lstm.py beside
# nn.LSTM: 42,614 chars/s kept from 32 MB, 50,618 from 8 MB, two separate runs; AMD EPYC).
KEEP_FROM_BYTES = 8 << 20
# At most this many buffers kept; a free one of another size makes room for a new size.
MOST_KEPT = 16

_lock = threading.Lock()
_kept: list[torch.Tensor] = []              # flat CPU tensors, lent as views


def _use_count(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def _counts_uses() -> bool:
    try:
        return _use_count(torch.empty(1)) == 2      # the tensor and the storage object asked
    except (AttributeError, RuntimeError):
        return False


_COUNTS_USES = _counts_uses()


def empty(shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None,
          keep: bool = True) -> torch.Tensor:
    """An uninitialised tensor of this shape with like's device and dtype (or this dtype): one of the kept
    buffers where it is large, on the CPU, keep is true (a training step's buffers: the same sizes chunk
    after chunk; not a prompt's, whose lengths vary) and one of its size is free; else a new one (kept where
    large and keep is true). Never under inference mode: a buffer made there could not be saved for a
    backward pass later."""
    numel, dtype = math.prod(shape), dtype or like.dtype
    if (not keep or like.device.type != "cpu" or numel * dtype.itemsize < KEEP_FROM_BYTES or not _COUNTS_USES
            or torch.is_inference_mode_enabled()):
        return like.new_empty(shape, dtype=dtype)
    with _lock:
        for base in _kept:
            # 2: the kept tensor and the storage object asked; any view lent out adds one.
            if base.dtype == dtype and base.numel() == numel and _use_count(base) == 2:
                return base.view(shape)
        if len(_kept) >= MOST_KEPT:
            free = [k for k, base in enumerate(_kept) if _use_count(base) == 2]
            if not free:
                return like.new_empty(shape, dtype=dtype)
            del _kept[free[0]]                       # (by position: == between tensors compares their values)
        base = like.new_empty(numel, dtype=dtype)
        _kept.append(base)
        return base.view(shape)


def release() -> None:
    """Let go of every kept buffer that nothing else holds (their memory goes back to the system)."""
    with _lock:
        _kept[:] = [base for base in _kept if _use_count(base) != 2]
