"""What checking a checkpoint's digest costs on load, at the default 2x512 size.

Trains one step of a 2x512 model (with its averaged weights and AdamW moments, as every default run
saves them) into a temporary folder, then loads its latest.pt with and without the digest check,
interleaved, and prints the medians beside the digest alone.

    python benchmarks/bench_checkpoint.py
"""
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textgen import checkpoint  # noqa: E402
from textgen.cli import train_main  # noqa: E402


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        text = os.path.join(folder, "text.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write("the quick brown fox jumps over the lazy dog\n" * 2000)
        run = os.path.join(folder, "run")
        assert train_main([text, "--size", "2x512", "--steps", "1", "--batch-size", "4", "--seq-len", "16", "-q",
                           "--sample-length", "0", "--out", run]) == 0
        path = os.path.join(run, "latest.pt")
        check = checkpoint._check_integrity
        checked, unchecked = [], []
        for _ in range(15):
            started = time.perf_counter()
            checkpoint.load(path)
            checked.append(time.perf_counter() - started)
            checkpoint._check_integrity = lambda *args: None
            started = time.perf_counter()
            ckpt = checkpoint.load(path)
            unchecked.append(time.perf_counter() - started)
            checkpoint._check_integrity = check
        started = time.perf_counter()
        for _ in range(10):
            checkpoint.digest(ckpt)
        digest = (time.perf_counter() - started) / 10
        print(f"2x512 checkpoint of {os.path.getsize(path) / 2**20:.1f} MiB: load {statistics.median(unchecked) * 1e3:.1f} "
              f"ms without the check, {statistics.median(checked) * 1e3:.1f} ms with it; the digest alone "
              f"{digest * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
