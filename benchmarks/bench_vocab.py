"""What a vocabulary's size costs a training step with each output layer, and where the
adaptive softmax starts to pay (lstm/config.py ADAPTIVE_FROM).

The same LSTM (default 2x512, 128 streams x 50, its products in the dtype the machine runs by
default, as training runs them) with vocabularies of 65 to 5,000 characters and the product's
two output layers, through the model's own training path (``model(x, targets=y)``):

* full: a linear layer and softmax over every class, its products in the LSTM's dtype;
* adaptive: nn.AdaptiveLogSoftmaxWithLoss with the default cutoffs (lstm/config.py adaptive_cutoffs).

Inputs and targets are drawn from a Zipf distribution, as characters are, in frequency-rank
order. A step is forward + loss + backward + AdamW, timed in interleaved rounds in one process;
the ratio is against the 65-character step with the head --head auto gives it (full).

    python benchmarks/bench_vocab.py             # ~4 minutes on 2 cores
    python benchmarks/bench_vocab.py --quick
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lstm import time_steps  # noqa: E402
from textgen.devices import native_bf16  # noqa: E402
from textgen.lstm import ADAPTIVE_FROM, CharLSTM, ModelConfig  # noqa: E402


def zipf_targets(vocab: int, shape, generator) -> torch.Tensor:
    """Class ids with frequency falling as 1/rank: id 0 the most frequent, as after sorting by count."""
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return torch.multinomial(weights, shape[0] * shape[1], replacement=True, generator=generator).view(shape)


def make_step(vocab: int, head: str, streams: int, chunk: int, hidden: int, layers: int):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab, 64, hidden, layers, 0.0, head=head))
    model.lstm.matmul_dtype = torch.bfloat16 if native_bf16(torch.device("cpu")) else None
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    x = zipf_targets(vocab, (streams, chunk), gen)
    y = zipf_targets(vocab, (streams, chunk), gen)

    def step():
        loss, _ = model(x, targets=y)
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
    vocabularies = (65, 256, 512, 1000, 2000, 5000)
    steps = {}
    for vocab in vocabularies:
        for head in ("full", "adaptive"):
            if head == "adaptive" and vocab <= 256:
                continue                      # the default shortlist alone is 256 characters
            steps[(vocab, head)] = make_step(vocab, head, streams, chunk, hidden, layers)
    median = time_steps({f"{v} {h}": s for (v, h), s in steps.items()}, rounds, steps_per_round=2)
    base = median["65 full"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {layers}x{hidden}, {streams}x{chunk}; "
          f"products in {'bf16' if native_bf16(torch.device('cpu')) else 'fp32'}; --head auto is adaptive from "
          f"{ADAPTIVE_FROM} characters")
    print(f"{'vocabulary':>10} {'output layer':>13} {'ms/step':>9} {'vs 65':>7}")
    for name, seconds in median.items():
        vocab, head = name.split()
        print(f"{vocab:>10} {head:>13} {seconds * 1000:9.1f} {seconds / base:7.2f}")


if __name__ == "__main__":
    main()
