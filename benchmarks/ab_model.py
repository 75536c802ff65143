"""Before and after: two versions of textgen/model.py trained side by side in one run, with nn.LSTM.

Machine noise moves single timings by 10% and more here, so a change to the LSTM is judged by timing
the old and the new layer in the same process, in interleaved rounds:

    git show HEAD~1:textgen/model.py > /tmp/model_before.py
    python benchmarks/ab_model.py /tmp/model_before.py              # against the working tree's model
    python benchmarks/ab_model.py /tmp/a.py /tmp/b.py --config 2,256,32,128

Prints training chars/s (forward + backward + clip + AdamW, float32) and each version's ratio to nn.LSTM.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from bench_lstm import EMBED, VOCAB, TorchLSTMModel, make_step, time_steps  # noqa: E402

CONFIGS = ["2,128,16,64", "2,256,32,128", "3,512,64,128", "2,512,128,50"]   # layers, hidden, streams, chunk


def load_module(label: str, path: str):
    # A module of the textgen package, so that model.py's relative imports (native_kernel) resolve.
    spec = importlib.util.spec_from_file_location(f"textgen._ab_model_{label}", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "textgen"
    sys.modules[spec.name] = module          # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model.py files; the working tree's is added when one is given")
    parser.add_argument("--config", action="append", help="layers,hidden,streams,chunk (default: four configs)")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    paths = list(args.models)
    if len(paths) == 1:
        paths.append(os.path.join(os.path.dirname(HERE), "textgen", "model.py"))
    versions = {f"v{k}:{os.path.basename(p)}": load_module(str(k), p) for k, p in enumerate(paths)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; " +
          ", ".join(f"{name} = {path}" for name, path in zip(versions, paths)))
    for config in args.config or CONFIGS:
        layers, hidden, streams, chunk = map(int, config.split(","))
        steps = {}
        for name, module in [*versions.items(), ("nn.LSTM", None)]:
            torch.manual_seed(0)
            source = module or next(iter(versions.values()))
            model = source.CharLSTM(source.ModelConfig(VOCAB, EMBED, hidden, layers, 0.0))
            if module is None:
                model = TorchLSTMModel(model)
            steps[name] = make_step(model, torch.optim.AdamW(model.parameters(), 1e-3), streams, chunk)
        median = time_steps(steps, args.rounds, steps_per_round=3)
        chars = streams * chunk
        print(f"{layers}x{hidden} {streams}x{chunk}: " + "  ".join(
            f"{name} {chars / t:,.0f} ({median['nn.LSTM'] / t:.2f})" for name, t in median.items()), flush=True)


if __name__ == "__main__":
    main()
