"""What a large vocabulary costs a training step, and what the output-layer options would save.

The same LSTM (default 2x512, 128 streams x 50, with the products in the dtype the machine
runs by default) with a 65- and a 5,000-character vocabulary, and three output layers:

* fp32: today's head, a float32 linear layer and softmax over every class;
* bf16: the same linear layer with bf16 products (its cost tracking --dtype bfloat16);
* adaptive: torch.nn.AdaptiveLogSoftmaxWithLoss (frequent classes in a head cluster, the
  rest in smaller tail clusters), with targets drawn from a Zipf distribution as characters are.

A step is forward + loss + backward + AdamW, timed in interleaved rounds in one process; the
ratio is against the 65-character fp32 step. Measurement only: the product's head is unchanged.

    python benchmarks/bench_vocab.py             # ~3 minutes on 2 cores
    python benchmarks/bench_vocab.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lstm import time_steps  # noqa: E402
from textgen.devices import native_bf16  # noqa: E402
from textgen.model import CharLSTM, ModelConfig  # noqa: E402


def zipf_targets(vocab: int, shape, generator) -> torch.Tensor:
    """Class ids with frequency falling as 1/rank: id 0 the most frequent, as after sorting by count."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, shape[0] * shape[1], replacement=True, generator=generator).view(shape)


def make_step(vocab: int, head: str, streams: int, chunk: int, hidden: int, layers: int):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab, 64, hidden, layers, 0.0))
    model.lstm.matmul_dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else None
    params = list(model.parameters())
    adaptive = None
    if head == "adaptive":
        cutoffs = [c for c in (vocab // 25, vocab // 5) if 0 < c < vocab] or [max(1, vocab // 2)]
        adaptive = nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, cutoffs=sorted(set(cutoffs)), div_value=4.0)
        params += list(adaptive.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = zipf_targets(vocab, (streams, chunk), gen)
    y = zipf_targets(vocab, (streams, chunk), gen)

    def step():
        out, _ = model.lstm(model.embedding(x.t()))                      # (T, B, H)
        flat, target = out.reshape(-1, hidden), y.t().reshape(-1)
        if head == "adaptive":
            loss = adaptive(flat, target).loss
        elif head == "bf16":
            w, b = model.head.weight, model.head.bias
            logits = F.linear(flat.to(torch.bfloat16), w.to(torch.bfloat16), b.to(torch.bfloat16)).float()
            loss = F.cross_entropy(logits, target)
        else:
            loss = F.cross_entropy(model.head(flat), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2x256, 32 streams, fewer rounds")
    args = parser.parse_args()
    layers, hidden, streams, chunk = (2, 256, 32, 50) if args.quick else (2, 512, 128, 50)
    rounds = 3 if args.quick else 5
    steps = {}
    for vocab in (65, 5000):
        for head in ("fp32", "bf16", "adaptive"):
            steps[(vocab, head)] = make_step(vocab, head, streams, chunk, hidden, layers)
    median = time_steps({f"{v} {h}": s for (v, h), s in steps.items()}, rounds, steps_per_round=2)
    base = median["65 fp32"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {layers}x{hidden}, {streams}x{chunk}; "
          f"LSTM products in {'bf16' if native_bf16(torch.device('cpu')) else 'fp32'}")
    print(f"{'vocabulary':>10} {'output layer':>13} {'ms/step':>9} {'vs 65 fp32':>11}")
    for name, seconds in median.items():
        vocab, head = name.split()
        print(f"{vocab:>10} {head:>13} {seconds * 1000:9.1f} {seconds / base:11.2f}")


if __name__ == "__main__":
    main()
