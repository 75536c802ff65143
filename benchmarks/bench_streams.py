"""Characters per second and updates per second of a training step at several streams x chunk shapes.

Why the default is 64 streams of 50 characters: on a few CPU cores the rate of characters hardly
depends on the streams, so fewer streams give more updates for the same characters (the quality A/B is
in benchmarks/README.md). A step is forward + loss + backward + AdamW through the model's training path
(2x512, vocabulary 65, products in the dtype training uses on this machine), timed in interleaved rounds
in one process; the ratio is against 128x50.

    python benchmarks/bench_streams.py            # ~2 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lstm import time_steps  # noqa: E402
from bench_vocab import make_step  # noqa: E402

SHAPES = ((128, 50), (64, 50), (32, 50), (128, 25), (64, 25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2x512", help="LAYERSxHIDDEN")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    layers, hidden = (int(n) for n in args.size.split("x"))
    steps = {f"{s}x{c}": make_step(65, "full", s, c, hidden, layers) for s, c in SHAPES}
    median = time_steps(steps, args.rounds, steps_per_round=3)
    base = 128 * 50 / median["128x50"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size}")
    print(f"{'streams x chunk':>16} {'ms/step':>8} {'chars/s':>9} {'vs 128x50':>10} {'updates/s':>10}")
    for (streams, chunk), seconds in zip(SHAPES, median.values()):
        rate = streams * chunk / seconds
        print(f"{streams:>10} x {chunk:<3} {seconds * 1000:8.1f} {rate:9,.0f} {rate / base:10.2f} {1 / seconds:10.2f}")


if __name__ == "__main__":
    main()
