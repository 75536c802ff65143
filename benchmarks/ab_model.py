"""Before and after: two versions of the textgen package trained side by side in one run, with nn.LSTM.

Machine noise moves single timings by 10% and more here, so a change to the LSTM (model.py,
fused_lstm.py, native_kernel.py, lstm_kernel.c) is judged by timing the old and the new package
in the same process, in interleaved rounds. A version is a git revision or a folder holding a
`textgen` package; the working tree's is added when one version is given:

    python benchmarks/ab_model.py HEAD~1                         # the last commit against the working tree
    python benchmarks/ab_model.py 3597110 HEAD --config 2,256,32,128
    python benchmarks/ab_model.py HEAD --config 2,512,64,50 --dropout 0.15   # with dropout between layers
    TEXTGEN_NATIVE=0 python benchmarks/ab_model.py HEAD          # the PyTorch-op path (no C kernel)

Prints training chars/s (forward + backward + clip + AdamW, float32, and bf16 products) with
each version's ratio to nn.LSTM, then generation steps/s (Stepper, 2x256, one stream).
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
from bench_lstm import EMBED, VOCAB, TorchLSTMModel, make_step, time_steps  # noqa: E402

CONFIGS = ["2,128,16,64", "2,256,32,128", "3,512,64,128", "2,512,128,50"]   # layers, hidden, streams, chunk


def import_version(label: str, version: str, scratch: str):
    """textgen.lstm.model of a git revision or of a folder holding a textgen package, as package textgen_<label>."""
    target = os.path.join(scratch, f"textgen_{label}")
    source = os.path.join(version, "textgen") if os.path.isdir(os.path.join(version, "textgen")) else None
    if source is not None:
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "-C", ROOT, "archive", version, "textgen"], capture_output=True, check=True)
        unpacked = os.path.join(scratch, f"rev_{label}")
        os.makedirs(unpacked)
        subprocess.run(["tar", "-x", "-C", unpacked], input=archive.stdout, check=True)
        shutil.move(os.path.join(unpacked, "textgen"), target)
    # relative imports resolve inside the copy; the model moved into lstm/ with the layers' folders
    layered = os.path.isdir(os.path.join(target, "lstm"))
    return importlib.import_module(f"textgen_{label}.lstm" if layered else f"textgen_{label}.model")


def stepper_rate(module, rounds: int) -> float:
    torch.manual_seed(0)
    model = module.CharLSTM(module.ModelConfig(VOCAB, EMBED, 256, 2, 0.0)).eval()
    step, state, token = module.Stepper(model), model.initial_state(1), torch.zeros(1, dtype=torch.long)
    for _ in range(50):
        _, state = step(token, state)
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(1000):
            _, state = step(token, state)
        rates.append(1000 / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("versions", nargs="+", help="git revisions or folders holding a textgen package")
    parser.add_argument("--config", action="append", help="layers,hidden,streams,chunk (default: four configs)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dropout", type=float, default=0.0, help="dropout between layers, per step (default 0)")
    args = parser.parse_args()
    versions = list(args.versions) + ([ROOT] if len(args.versions) == 1 else [])
    scratch = tempfile.mkdtemp(prefix="textgen-ab-")
    sys.path.insert(0, scratch)
    try:
        modules = {f"v{k}:{v if v != ROOT else 'working tree'}": import_version(str(k), v, scratch)
                   for k, v in enumerate(versions)}
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; versions: {', '.join(modules)}")
        for config in args.config or CONFIGS:
            layers, hidden, streams, chunk = map(int, config.split(","))
            steps = {}
            for name, module in [*modules.items(), ("nn.LSTM", None)]:
                for bf16 in ((False, True) if module is not None else (False,)):
                    torch.manual_seed(0)
                    source = module or next(iter(modules.values()))
                    model = source.CharLSTM(source.ModelConfig(VOCAB, EMBED, hidden, layers, args.dropout))
                    if module is None:
                        model = TorchLSTMModel(model)
                    else:
                        model.lstm.matmul_dtype = torch.bfloat16 if bf16 else None
                    label = name + (" bf16" if bf16 else "")
                    steps[label] = make_step(model, torch.optim.AdamW(model.parameters(), 1e-3), streams, chunk)
            median = time_steps(steps, args.rounds, steps_per_round=3)
            chars = streams * chunk
            print(f"{layers}x{hidden} {streams}x{chunk}: " + "  ".join(
                f"{name} {chars / t:,.0f} ({median['nn.LSTM'] / t:.2f})" for name, t in median.items()), flush=True)
        rates = {name: [] for name in modules}
        for _ in range(3):                                  # interleaved rounds here too
            for name, module in modules.items():
                rates[name].append(stepper_rate(module, rounds=3))
        print("generation, Stepper 2x256 one stream, steps/s: " + "  ".join(
            f"{name} {statistics.median(r):,.0f}" for name, r in rates.items()))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
