"""Data-parallel training: 1 process against 2 torchrun processes over the same global streams.

Both runs train the same model for the same steps on the same global set of
streams (each of the two ranks reads half of them), dropout off so the two
are the same computation. Prints characters per second for each and the
logged losses side by side: the figure of interest on a 2-core machine is
that the curves match; a speed-up needs more cores or machines.

    python benchmarks/bench_ddp.py [TEXT] [--steps 60]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_TEXT = os.path.join(os.path.dirname(ROOT), "shared", "corpora", "tinyshakespeare.txt")


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="?", default=DEFAULT_TEXT if os.path.exists(DEFAULT_TEXT) else None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--hidden-size", type=int, default=256)
    args = parser.parse_args()
    flags = ["--hidden-size", str(args.hidden_size), "--layers", "2", "--dropout", "0", "--dtype", "float32",
             "--batch-size", "32",
             "--seq-len", "128", "--steps", str(args.steps), "--eval-every", str(args.steps), "--log-every", "10",
             "--sample-length", "0", "-q"]
    if args.text:
        flags.insert(0, args.text)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="2")
        one = os.path.join(tmp, "one")
        started = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags, "--out", one], check=True, env=env,
                       cwd=ROOT, stdout=subprocess.DEVNULL)
        wall_one = time.perf_counter() - started
        two = os.path.join(tmp, "two")
        env["OMP_NUM_THREADS"] = "1"                  # one core per rank on a 2-core machine
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "train.py"), *flags, "--out", two], check=True, env=env, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        wall_two = time.perf_counter() - started
        a, b = metrics(one), metrics(two)
    speed = lambda rows: sum(r["chars_per_sec"] for r in rows[1:]) / max(1, len(rows) - 1)  # noqa: E731
    # chars/s is over the steps alone; the wall clock adds each command's start, validation and saving.
    print(f"1 process:   {speed(a):>8,.0f} chars/s   {wall_one:6.1f} s wall")
    print(f"2 processes: {speed(b):>8,.0f} chars/s   {wall_two:6.1f} s wall   ({speed(b) / speed(a):.2f}x the chars/s)")
    print(f"{'step':>6} {'loss 1 proc':>12} {'loss 2 procs':>13} {'rel. diff':>10}")
    for ra, rb in zip(a, b):
        print(f"{ra['step']:>6} {ra['train_loss']:>12.6f} {rb['train_loss']:>13.6f} "
              f"{abs(ra['train_loss'] - rb['train_loss']) / ra['train_loss']:>10.2e}")
    va, vb = a[-1]["val_loss"], b[-1]["val_loss"]
    print(f"final val loss: {va:.6f} vs {vb:.6f}")


if __name__ == "__main__":
    main()
