"""Data-parallel training under torchrun, with torch.distributed doing the work.

A torchrun launch (RANK and WORLD_SIZE in the environment) initialises a
process group (gloo on the CPU, nccl on GPUs) and wraps the model in
DistributedDataParallel. The global set of B streams is split into
contiguous shares, one per rank, so every stream reads the same chunks and
carries the same state as in a single-process run with B streams; DDP's
gradient averaging then equals the single-process mean over all streams.
Without torchrun every method here is the trivial single-process case.

Imports torch.distributed only; never training (which uses it) or cli.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass
class DistContext:
    enabled: bool = False
    rank: int = 0
    world_size: int = 1
    device: torch.device | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def stream_share(self, batch_size: int) -> tuple[int, int]:
        """The first global stream this rank reads and how many."""
        if batch_size % self.world_size:
            raise UsageError(f"{{batch_size}} {batch_size} must be divisible by the number of processes "
                             f"({self.world_size}) so every rank reads the same number of streams", batch_size=...)
        per_rank = batch_size // self.world_size
        return self.rank * per_rank, per_rank

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, value: torch.Tensor) -> float:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return float(value)

    def sum_pair(self, a: float, b: int) -> tuple[float, int]:
        if not self.enabled:
            return a, b
        t = torch.tensor([a, float(b)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]), int(t[1])

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag, true if it is true on any rank: every rank then takes the same branch."""
        if not self.enabled:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([float(bool(f)) for f in flags], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def shard_for_eval(self) -> tuple[int, int] | None:
        return (self.rank, self.world_size) if self.enabled else None

    def gather_state(self, state) -> list | None:
        """Every stream's carried (h, c), in global stream order, on the CPU (all ranks take part)."""
        if state is None:
            return None
        if not self.enabled:
            return [[h.cpu(), c.cpu()] for h, c in state]
        gathered = []
        for h, c in state:
            pair = []
            for t in (h, c):
                parts = [torch.empty_like(t) for _ in range(self.world_size)]
                dist.all_gather(parts, t.contiguous())
                pair.append(torch.cat(parts).cpu())
            gathered.append(pair)
        return gathered


_context: DistContext | None = None


def context() -> DistContext:
    """The process group of a torchrun launch, initialised once; single-process otherwise."""
    global _context
    if _context is not None:
        return _context
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world < 2:
        _context = DistContext()
        return _context
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        backend, device = "nccl", torch.device("cuda", local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    # A bounded timeout: a rank that died must end the job, not hang the others forever.
    timeout = datetime.timedelta(seconds=float(os.environ.get("TEXTGEN_DIST_TIMEOUT", "120")))
    dist.init_process_group(backend, timeout=timeout)
    _context = DistContext(True, rank, world, device)
    return _context


def shutdown(clean: bool = True) -> None:
    """Tear the process group down; after a clean run, together, so that no rank leaves while
    another is still in a collective. After a failure, at once: the others may never arrive."""
    global _context
    if _context is not None and _context.enabled and dist.is_initialized():
        import gc
        gc.collect()                     # drop the DDP wrapper (and its reducer) before its group
        try:
            if clean:
                dist.barrier()
        finally:
            dist.destroy_process_group()
    _context = None
