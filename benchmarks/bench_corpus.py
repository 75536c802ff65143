"""Large corpora: preparation throughput and peak memory for generated 10 MB, 100 MB and 1 GB texts.

For each size a fresh process prepares the corpus into an empty cache (MB/s,
peak resident memory added while preparing), prepares it again (the cache
hit), then trains a few steps on the memory-mapped tokens (peak memory added
while training, beyond the model and optimizer). Peak memory is the kernel's
high-water mark (VmHWM), reset after importing torch.

    python benchmarks/bench_corpus.py                 # 10 MB, 100 MB, 1 GB (needs ~3 GB of disk)
    python benchmarks/bench_corpus.py --sizes 10 100  # sizes in MB
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import torch
from textgen.corpus import prepare
from textgen.training import TrainConfig, build_run, train
from textgen.training.step import train_step
from textgen.lstm.model import ModelConfig

def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return kb("VmRSS")

path, cache = sys.argv[1], sys.argv[2]
base = reset_peak()
t = time.perf_counter()
prepared = prepare(path, cache_dir=cache)
prep_s = time.perf_counter() - t
prep_mb = (kb("VmHWM") - base) / 1024
t = time.perf_counter()
prepare(path, cache_dir=cache)
reuse_s = time.perf_counter() - t
model = ModelConfig(vocab_size=1, embed_size=32, hidden_size=128, layers=2, dropout=0.0)
config = TrainConfig(text=path, cache_dir=cache, batch_size=32, seq_len=64, steps=20, eval_every=20,
                     eval_chars=100_000, save_every=1000, sample_length=0, quiet=True, out=sys.argv[3])
run = build_run(model, config, log=lambda m: None)
train_step(run)                               # model, gradients and optimizer state now exist
base = reset_peak()
train(run, log=lambda m: None)
train_mb = (kb("VmHWM") - base) / 1024
print(json.dumps({{"prep_s": prep_s, "prep_mb": prep_mb, "reuse_s": reuse_s, "train_mb": train_mb,
                   "tokens": int(len(prepared.tokens))}}))
"""


def generate(path: str, megabytes: int) -> None:
    """Varied prose with some non-ASCII, written in 1 MB pieces."""
    import random
    rng = random.Random(0)
    words = ("the keeper lamp tower sea night light stair rocks tide gull wind storm harbour bell "
             "ship fog morning salt iron café naïve Straße море свет 灯塔 😀").split()
    piece_lines = []
    size = 0
    while size < 1 << 20:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))).capitalize() + ".\n"
        piece_lines.append(line)
        size += len(line.encode())
    piece = "".join(piece_lines).encode()
    with open(path, "wb") as f:
        for _ in range(max(1, (megabytes << 20) // len(piece))):
            f.write(piece)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="corpus sizes in MB")
    args = parser.parse_args()
    print(f"{'size':>8} {'prepare':>9} {'MB/s':>7} {'peak +MB prepare':>17} {'cache hit':>10} "
          f"{'peak +MB training':>18}")
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.sizes:
            path = os.path.join(tmp, f"corpus-{mb}.txt")
            generate(path, mb)
            actual = os.path.getsize(path) / 2**20
            out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), path, os.path.join(tmp, "cache"),
                                  os.path.join(tmp, f"run-{mb}")], capture_output=True, text=True)
            if out.returncode:
                sys.exit(out.stderr)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{actual:>6.0f}MB {r['prep_s']:>8.1f}s {actual / r['prep_s']:>7.0f} {r['prep_mb']:>17.0f} "
                  f"{r['reuse_s']:>9.3f}s {r['train_mb']:>18.0f}", flush=True)
            os.unlink(path)


if __name__ == "__main__":
    main()
