"""Page faults and system time of a training step: what fresh memory a step costs.

Trains our CharLSTM (embedding 64, vocabulary 65, no dropout) for a few steps (forward, cross-entropy,
backward, clip, AdamW, as bench_lstm.py) and prints, per step after two warm-up steps: the time, the
minor page faults (each a 4 KB page the kernel mapped and zeroed), those as MB, and the system time.
glibc maps allocations over 32 MB afresh each time, so a step whose large buffers are not kept faults
them in at every chunk (textgen/lstm/buffers.py keeps them). Compare runs on one machine only, and
with nothing else running:

    python benchmarks/page_faults.py --config 3,512,64,128
    MALLOC_MMAP_MAX_=0 python benchmarks/page_faults.py --config 3,512,64,128   # glibc keeps everything
"""
import argparse
import os
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textgen.lstm.model import CharLSTM, ModelConfig  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="3,512,64,128", help="layers,hidden,streams,chunk")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    layers, hidden, streams, chunk = map(int, args.config.split(","))
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(65, 64, hidden, layers, 0.0))
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, y = torch.randint(0, 65, (streams, chunk)), torch.randint(0, 65, (streams, chunk))

    def step():
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 65), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    step(), step()
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(args.steps):
        step()
    after, n = resource.getrusage(resource.RUSAGE_SELF), args.steps
    faults = (after.ru_minflt - before.ru_minflt) // n
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.config}: "
          f"{(time.perf_counter() - start) / n * 1e3:.1f} ms a step, {faults} page faults "
          f"({faults * 4 // 1024} MB), {(after.ru_stime - before.ru_stime) / n:.3f} s system time")


if __name__ == "__main__":
    main()
