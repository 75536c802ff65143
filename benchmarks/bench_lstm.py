"""Training throughput and peak memory: our LSTM against torch.nn.LSTM on the same shapes.

A training step is forward + cross-entropy + backward + gradient clipping +
AdamW, on a character model (embedding 64, vocabulary 65) whose LSTM is ours
or nn.LSTM with the same weights. The two are timed side by side in one run,
alternating rounds so that machine noise hits both alike, and the median
round is reported. Ours computes its loss as the trainer does (model(tokens, targets=...)), with bf16
matrix products (--dtype bfloat16 in train.py) in the output layer too; that is faster but
not exact, and is set against its real peer: nn.LSTM under torch.autocast("cpu", dtype=torch.bfloat16),
the two lines a user would add, which oneDNN runs as one fused bf16 LSTM (the same weights again), and
which runs the output layer in bf16 as well.
Peak memory is measured in a fresh subprocess per implementation: the growth of peak resident memory
over the steps, beyond the model itself. Achieved GFLOP/s is set against a measured matmul peak, fp32
for fp32 and bf16 for bf16.

    python benchmarks/bench_lstm.py            # all configs, ~5 minutes on 2 cores
    python benchmarks/bench_lstm.py --quick    # under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textgen.lstm.model import CharLSTM, ModelConfig, detach_state  # noqa: E402

VOCAB, EMBED = 65, 64
CONFIGS = {  # name: (layers, hidden, streams, chunk)
    "2x128 16x64": (2, 128, 16, 64),
    "2x256 32x128": (2, 256, 32, 128),
    "3x512 64x128": (3, 512, 64, 128),
}


class TorchLSTMModel(nn.Module):
    """The same language model with torch.nn.LSTM inside: the reference."""

    def __init__(self, ours: CharLSTM):
        super().__init__()
        c = ours.config
        self.embedding = nn.Embedding(c.vocab_size, c.embed_size)
        self.lstm = nn.LSTM(c.embed_size, c.hidden_size, c.layers, dropout=c.dropout)
        self.head = nn.Linear(c.hidden_size, c.vocab_size)
        self.load_state_dict(ours.state_dict())
        self.dropout = c.dropout

    def forward(self, tokens, state=None):
        out, state = self.lstm(self.embedding(tokens.t()), state)
        out = F.dropout(out, self.dropout, self.training)
        return self.head(out).transpose(0, 1), state


IMPLS = ("ours", "nn.LSTM", "ours-bf16", "nn.LSTM-bf16")


def build(impl: str, layers: int, hidden: int, dropout: float = 0.0):
    """impl: "ours" (float32, exact), "ours-bf16" (bf16 matrix products), "nn.LSTM" or "nn.LSTM-bf16"
    (nn.LSTM whose steps run under CPU bf16 autocast)."""
    torch.manual_seed(0)
    ours = CharLSTM(ModelConfig(VOCAB, EMBED, hidden, layers, dropout))
    ours.lstm.matmul_dtype = torch.bfloat16 if impl == "ours-bf16" else None
    model = ours if impl.startswith("ours") else TorchLSTMModel(ours)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt


def detached(state):
    if isinstance(state[0], torch.Tensor):               # nn.LSTM: (h, c) stacked over layers
        return tuple(t.detach() for t in state)
    return detach_state(state)                           # ours: ((h, c) per layer)


def make_step(model, opt, streams: int, chunk: int, autocast: bool = False):
    x = torch.randint(0, VOCAB, (streams, chunk))
    y = torch.randint(0, VOCAB, (streams, chunk))
    carried = [None]

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if isinstance(model, CharLSTM):        # the trainer's path: its loss, the output layer in the LSTM's precision
                loss, state = model(x, carried[0], targets=y)
            else:
                logits, state = model(x, carried[0])
                loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        carried[0] = detached(tuple(t.float() for t in state) if autocast else state)
    return step


def train_flops(layers: int, hidden: int, streams: int, chunk: int) -> float:
    """Matrix-product FLOPs of one training step (backward counted as twice the forward)."""
    chars = streams * chunk
    lstm = sum(2 * chars * 4 * hidden * ((EMBED if k == 0 else hidden) + hidden) for k in range(layers))
    head = 2 * chars * hidden * VOCAB
    return 3 * (lstm + head)


def matmul_peak(dtype=torch.float32) -> float:
    a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    runs = []
    for _ in range(10):
        t = time.perf_counter()
        a @ b
        runs.append(time.perf_counter() - t)
    return 2 * 1024 ** 3 / min(runs) / 1e9


def time_steps(steps: dict, rounds: int, steps_per_round: int) -> dict:
    """Median seconds per step of each named step function, timed in interleaved rounds."""
    for step in steps.values():
        step(), step()                       # warm-up: allocator, oneDNN primitives
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            for _ in range(steps_per_round):
                step()
            times[name].append((time.perf_counter() - t) / steps_per_round)
    return {name: statistics.median(v) for name, v in times.items()}


def time_side_by_side(layers, hidden, streams, chunk, rounds, steps_per_round):
    steps = {impl: make_step(*build(impl, layers, hidden), streams, chunk, autocast=impl == "nn.LSTM-bf16")
             for impl in IMPLS}
    return time_steps(steps, rounds, steps_per_round)


def peak_memory_child(impl, layers, hidden, streams, chunk) -> None:
    """Run in a fresh process: print the peak resident memory the training steps add, in MB."""
    model, opt = build(impl, layers, hidden)
    step = make_step(model, opt, streams, chunk, autocast=impl == "nn.LSTM-bf16")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                          # reset the peak (VmHWM) left by importing torch
    base = _status_kb("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"peak_mb": (_status_kb("VmHWM") - base) / 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_memory(impl, layers, hidden, streams, chunk) -> float:
    out = subprocess.run([sys.executable, __file__, "--memory-child", impl, str(layers), str(hidden), str(streams),
                          str(chunk)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller configs: under a minute")
    parser.add_argument("--config", action="append", help="only these configs, e.g. '2x256 32x128'")
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        impl, *numbers = args.memory_child
        peak_memory_child(impl, *map(int, numbers))
        return
    configs = dict(CONFIGS)
    from textgen.training import TrainConfig
    d, t = ModelConfig(vocab_size=VOCAB), TrainConfig()
    configs[f"default {d.layers}x{d.hidden_size} {t.batch_size}x{t.seq_len}"] = (d.layers, d.hidden_size,
                                                                               t.batch_size, t.seq_len)
    if args.config:
        configs = {k: v for k, v in configs.items() if k in args.config}
    elif args.quick:
        configs = {k: configs[k] for k in ("2x128 16x64", "2x256 32x128")}
    rounds, per_round = (3, 2) if args.quick else (5, 3)
    peak, peak_bf16 = matmul_peak(), matmul_peak(torch.bfloat16)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, matmul peak fp32 {peak:.0f} GFLOP/s, "
          f"bf16 {peak_bf16:.0f} GFLOP/s")
    print(f"{'config':<22} {'ours chars/s':>13} {'nn.LSTM chars/s':>16} {'ratio':>6} "
          f"{'ours GFLOP/s':>13} {'ours peak MB':>13} {'nn.LSTM peak MB':>16} {'ours bf16':>10} {'nn.LSTM bf16':>13} "
          f"{'ratio':>6} {'bf16 GFLOP/s':>13} {'MB ours/nn bf16':>16}")
    for name, (layers, hidden, streams, chunk) in configs.items():
        times = time_side_by_side(layers, hidden, streams, chunk, rounds, per_round)
        chars = streams * chunk
        ours, ref = chars / times["ours"], chars / times["nn.LSTM"]
        gflops = train_flops(layers, hidden, streams, chunk) / times["ours"] / 1e9
        mem = {impl: peak_memory(impl, layers, hidden, streams, chunk) for impl in IMPLS}
        bf16, ref_bf16 = chars / times["ours-bf16"], chars / times["nn.LSTM-bf16"]
        gflops_bf16 = train_flops(layers, hidden, streams, chunk) / times["ours-bf16"] / 1e9
        print(f"{name:<22} {ours:>13,.0f} {ref:>16,.0f} {ours / ref:>6.2f} {gflops:>8.0f} ({gflops / peak:4.0%})"
              f" {mem['ours']:>13.0f} {mem['nn.LSTM']:>16.0f} {bf16:>10,.0f} {ref_bf16:>13,.0f} {bf16 / ref_bf16:>6.2f}"
              f" {gflops_bf16:>8.0f} ({gflops_bf16 / peak_bf16:4.0%}) {mem['ours-bf16']:>7.0f} / "
              f"{mem['nn.LSTM-bf16']:<7.0f}", flush=True)


if __name__ == "__main__":
    main()
