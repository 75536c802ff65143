"""Where a training step's time goes: products, pointwise, dropout, copies, the C kernel, Python.

One training step of bench_lstm.py (forward, cross-entropy, backward, clip, AdamW; embedding 64,
vocabulary 65) with our LSTM in float32 or with bf16 products, optionally with dropout between the
layers, is run under torch.profiler. Each PyTorch operation's self time goes to one category by its
name; the C kernel's calls (made through ctypes, which the profiler does not see) are timed by a thin
wrapper; "Python and dispatch" is what is left of the step's wall time measured without the profiler
(so it also absorbs the profiler's own inflation of the operations, and the wrapper's ~0.3 us a call).

    python benchmarks/profile_step.py                         # 2x256 32x128 and 2x512 64x50, fp32 and bf16
    python benchmarks/profile_step.py --config 2,256,32,128 --dtype bf16 --dropout 0.15 --ops
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_lstm import build, make_step  # noqa: E402
from textgen.lstm import native_kernel  # noqa: E402

CATEGORIES = ("products", "pointwise", "dropout", "copies and fills", "loss and embedding", "optimizer and clip",
              "C kernel", "Python and dispatch")
PRODUCT_OPS = ("mm", "addmm", "bmm", "matmul", "linear", "_linear_pointwise", "mkldnn_rnn", "mkldnn_rnn_layer",
               "mkldnn_rnn_layer_backward", "baddbmm", "dot", "mv", "addmv")
DROPOUT_OPS = ("bernoulli_", "bernoulli", "rand", "uniform_", "dropout", "native_dropout", "ge_", "ge")
COPY_OPS = ("copy_", "_to_copy", "to", "clone", "cat", "contiguous", "zeros_like", "zero_", "fill_", "empty_like",
            "zeros", "full", "_reshape_alias", "stack", "index_select")
LOSS_OPS = ("log_softmax", "_log_softmax", "nll_loss", "nll_loss_nd", "nll_loss_forward", "nll_loss_backward",
            "_log_softmax_backward_data", "cross_entropy_loss", "embedding", "embedding_backward",
            "embedding_dense_backward", "index_add_", "embedding_dense_backward_cpu")


def category(name: str) -> str | None:
    """The category of a profiled operation, or None for structural ones (views, autograd nodes' shells)."""
    bare = name.split("::")[-1]
    if "FusedLSTMLayer" in name or "evaluate_function" in name or bare in ("MkldnnRnnLayerBackward0", "lstm"):
        return None                  # autograd shells: their self time is our Python (and ctypes calls), or dispatch
    if name.startswith("Optimizer") or "_foreach" in bare or "clip_grad" in name or bare in ("norm", "linalg_vector_norm",
                                                                                            "_fused_adamw_", "sqrt"):
        return "optimizer and clip"
    if bare.startswith("_linear_pointwise") or bare in PRODUCT_OPS:
        return "products"
    if bare in DROPOUT_OPS:
        return "dropout"
    if bare in COPY_OPS:
        return "copies and fills"
    if bare in LOSS_OPS:
        return "loss and embedding"
    if bare in ("view", "unbind", "select", "slice", "t", "transpose", "unflatten", "reshape", "as_strided", "empty",
                "expand", "unsqueeze", "squeeze", "permute", "detach", "detach_", "alias", "resize_", "empty_strided",
                "_unsafe_view", "set_", "lift_fresh", "result_type", "is_nonzero", "item", "_local_scalar_dense"):
        return None                  # no arithmetic: their cost is dispatch, counted under Python and dispatch
    return "pointwise"


class TimedKernel:
    """The C kernel's entry points that a training step calls, timed: the profiler cannot see a ctypes call."""

    ENTRY_POINTS = ("forward_step", "backward_step", "forward_step_bf16", "backward_step_bf16", "transpose",
                    "forward_chunk", "backward_chunk", "forward_chunk_bf16", "backward_chunk_bf16")

    def __init__(self, kernel):
        self.kernel, self.seconds, self.calls = kernel, 0.0, 0
        # (an older kernel, profiled for a before/after, has fewer of them)
        self.original = {name: getattr(kernel, name) for name in self.ENTRY_POINTS if hasattr(kernel, name)}
        for name, fn in self.original.items():
            setattr(kernel, name, self._timed(fn))

    def _timed(self, fn):
        def call(*args):
            t = time.perf_counter()
            fn(*args)
            self.seconds += time.perf_counter() - t
            self.calls += 1
        return call

    def restore(self):
        for name, fn in self.original.items():
            setattr(self.kernel, name, fn)


def wall_per_step(step, steps: int, rounds: int) -> float:
    step(), step()
    runs = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(steps):
            step()
        runs.append((time.perf_counter() - t) / steps)
    return statistics.median(runs)


def breakdown(impl: str, layers: int, hidden: int, streams: int, chunk: int, dropout: float, steps: int,
              show_ops: bool) -> tuple[float, dict]:
    """(ms a step without the profiler, {category: ms a step})."""
    model, opt = build(impl, layers, hidden, dropout)
    step = make_step(model, opt, streams, chunk, autocast=impl == "nn.LSTM-bf16")
    wall = wall_per_step(step, steps, 3)
    kernel = native_kernel.load()
    timed = TimedKernel(kernel) if kernel is not None and impl.startswith("ours") else None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    if timed is not None:
        timed.restore()
    ms = collections.Counter()
    ops = collections.Counter()
    for event in prof.key_averages():
        cat = category(event.key)
        if cat is not None:
            ms[cat] += event.self_cpu_time_total / 1e3 / steps
            ops[(cat, event.key)] += event.self_cpu_time_total / 1e3 / steps
    if timed is not None:
        ms["C kernel"] = timed.seconds * 1e3 / steps
    ms["Python and dispatch"] = max(0.0, wall * 1e3 - sum(ms.values()))
    if show_ops:
        for (cat, name), value in ops.most_common(25):
            print(f"    {value:8.2f} ms  {cat:<20} {name}")
    return wall * 1e3, ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="layers,hidden,streams,chunk (default 2,256,32,128 and "
                        "2,512,64,50)")
    parser.add_argument("--dtype", action="append", choices=("fp32", "bf16"), help="default both")
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout between layers (default 0)")
    parser.add_argument("--steps", type=int, default=4, help="training steps profiled (default 4)")
    parser.add_argument("--ops", action="store_true", help="also list the 25 costliest operations")
    parser.add_argument("--peer", action="store_true", help="also profile nn.LSTM (fp32, and bf16 under autocast)")
    args = parser.parse_args()
    configs = [tuple(map(int, c.split(","))) for c in (args.config or ["2,256,32,128", "2,512,64,50"])]
    impls = [{"fp32": "ours", "bf16": "ours-bf16"}[d] for d in (args.dtype or ["fp32", "bf16"])]
    if args.peer:
        impls += [{"ours": "nn.LSTM", "ours-bf16": "nn.LSTM-bf16"}[i] for i in list(impls)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dropout {args.dropout:g}; "
          f"{native_kernel.describe()}")
    header = f"| {'config':<14} | {'path':<13} | {'ms/step':>7} | " + " | ".join(f"{c:>10}" for c in CATEGORIES) + " |"
    rows = []
    for layers, hidden, streams, chunk in configs:
        for impl in impls:
            name = f"{layers}x{hidden} {streams}x{chunk}"
            if args.ops:
                print(f"{name} {impl}:")
            wall, ms = breakdown(impl, layers, hidden, streams, chunk, args.dropout, args.steps, args.ops)
            cells = " | ".join(f"{ms.get(c, 0.0):>5.1f} ({ms.get(c, 0.0) / wall:3.0%})" for c in CATEGORIES)
            rows.append(f"| {name:<14} | {impl:<13} | {wall:>7.1f} | {cells} |")
            print(rows[-1], flush=True)
    print()
    print(header)
    print("|" + "|".join("---" for _ in range(len(CATEGORIES) + 3)) + "|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
