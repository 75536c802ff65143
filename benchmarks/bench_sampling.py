"""Generation speed at batch 1: our Generator against torch.nn.LSTM stepped one character at a time.

Both use the same weights (copied into nn.LSTM) and the same sampling code
(temperature 0.8, one seeded draw), so the difference is the model step.
Rounds alternate between the two so machine noise hits both alike; the
median round is reported.

    python benchmarks/bench_sampling.py [--hidden-size 256 --layers 2 --chars 2000]
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from textgen.lstm.model import CharLSTM, ModelConfig  # noqa: E402
from textgen.generation.generator import Generator  # noqa: E402
from textgen.generation.sampling import SampleConfig, draw, next_token_probs, uniforms  # noqa: E402
from textgen.tokenizer import CharTokenizer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--chars", type=int, default=2000, help="characters per round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    tok = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    model = CharLSTM(ModelConfig(tok.vocab_size, 64, args.hidden_size, args.layers, 0.0)).eval()
    ref = torch.nn.LSTM(64, args.hidden_size, args.layers)
    ref.load_state_dict(model.lstm.state_dict())
    ref.eval()
    config = SampleConfig(length=args.chars, temperature=0.8)

    def ours():
        gen = Generator(model, tok, seed=1)
        gen.feed("A")
        for _ in gen.stream(config):
            pass

    @torch.no_grad()
    def nn_lstm():
        rng = torch.Generator().manual_seed(1)
        token, state = torch.tensor([[0]]), None
        for _ in range(args.chars):
            out, state = ref(model.embedding(token), state)
            logits = model.head(out[0])
            token = draw(next_token_probs(logits, 0.8), uniforms(1, rng)).view(1, 1)

    ours(), nn_lstm()
    times = {"ours": [], "nn.LSTM": []}
    for _ in range(args.rounds):
        for name, fn in (("ours", ours), ("nn.LSTM", nn_lstm)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    speed = {k: args.chars / statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.layers}x{args.hidden_size}, batch 1")
    print(f"ours     {speed['ours']:>9,.0f} chars/s")
    print(f"nn.LSTM  {speed['nn.LSTM']:>9,.0f} chars/s")
    print(f"ratio    {speed['ours'] / speed['nn.LSTM']:>9.2f}x")


if __name__ == "__main__":
    main()
