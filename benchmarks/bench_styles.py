"""Styles: does the label help, and what does it cost? Two texts of different kinds, one model.

    python benchmarks/bench_styles.py                 # ~10 minutes on 2 busy cores
    python benchmarks/bench_styles.py --steps 300     # quicker, rougher

The texts: the first 330,000 characters of tiny-shakespeare (verse drama) and 330,000 characters of
English docstrings from the Python files on this machine (technical prose; make_corpora.py's
``prose``). Each is cut into a head (300,000 characters) to train on and a held-out tail (30,000).
The two heads are trained on as one folder corpus with ``--styles`` (styles ``verse`` and ``prose``),
and again without, with the same flags and seed.

Each tail is then scored with the styled model under its own label, under the other's label, and
with no label, and with the unstyled model; two ways: as 16 long streams (textgen-eval's default: a
label matters only until the text itself says which kind it is) and as ~128-character windows each
read from a zero state (where the label is most of what the model knows at the start).

The cost: a training step (forward, backward, clip, AdamW) of the same model with and without the
style embedding, timed interleaved.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_corpora import prose_text  # noqa: E402
from textgen.cli import train_main  # noqa: E402
from textgen.checkpoint import load_model  # noqa: E402
from textgen.evaluate import cross_entropy, one_style  # noqa: E402
from textgen.lstm.model import CharLSTM, ModelConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "..", "shared", "corpora", "tinyshakespeare.txt")
HEAD, TAIL = 300_000, 30_000


def texts(shakespeare: str) -> dict[str, str]:
    with open(shakespeare, encoding="utf-8") as f:
        verse = f.read()[: HEAD + TAIL]
    prose = prose_text(HEAD + TAIL)[: HEAD + TAIL]
    return {"verse": verse, "prose": prose}


def train(corpus: str, out: str, flags: list[str]) -> float:
    start = time.perf_counter()
    assert train_main([corpus, *flags, "--out", out, "-q"]) == 0
    return time.perf_counter() - start


def score(model, tokenizer, tail: str, style: int | None, streams: int, seq_len: int) -> float:
    tokens = tokenizer.encode("".join(ch for ch in tail if ch in set(tokenizer.chars)))
    total, count = cross_entropy(model, tokens, streams, seq_len,
                                 styles=None if style is None else one_style(style))
    return total / count


def step_cost(config: dict, styles: tuple, batch: int, seq_len: int, repeats: int) -> tuple[float, float]:
    """Median ms per training step without and with styles, timed interleaved."""
    torch.manual_seed(0)
    models = [CharLSTM(ModelConfig(**config, style_names=names)) for names in ((), styles)]
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    x = torch.randint(0, config["vocab_size"], (batch, seq_len))
    y = torch.randint(0, config["vocab_size"], (batch, seq_len))
    labels = torch.randint(0, len(styles), (batch, seq_len))
    times = [[], []]
    for r in range(repeats + 2):
        for k, (model, optimizer) in enumerate(zip(models, optimizers)):
            start = time.perf_counter()
            loss, _ = model(x, targets=y, styles=labels if k else None)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if r >= 2:                                     # two warm-up rounds
                times[k].append(time.perf_counter() - start)
    return statistics.median(times[0]) * 1e3, statistics.median(times[1]) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shakespeare", default=SHAKESPEARE)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--size", default="2x128")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps of each model for the cost")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench-styles-")
    corpus = os.path.join(work, "corpus")
    os.makedirs(corpus)
    tails = {}
    for name, text in texts(args.shakespeare).items():
        with open(os.path.join(corpus, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write(text[:HEAD])
        tails[name] = text[HEAD:]
    flags = ["--steps", str(args.steps), "--size", args.size, "--batch-size", str(args.batch_size),
             "--seq-len", str(args.seq_len), "--val-fraction", "0", "--sample-length", "0",
             "--cache-dir", os.path.join(work, "cache"), "--dtype", "float32"]
    seconds = {label: train(corpus, os.path.join(work, label), flags + extra)
               for label, extra in (("styles", ["--styles"]), ("plain", []))}
    styled, tokenizer, _ = load_model(os.path.join(work, "styles"))
    plain, _, _ = load_model(os.path.join(work, "plain"))
    names = list(styled.config.style_names)
    print(f"{args.size}, {args.steps} steps of {args.batch_size}x{args.seq_len}, float32; training took "
          f"{seconds['styles']:.0f}s with styles and {seconds['plain']:.0f}s without (wall, this machine as it is)")
    print(f"held-out tails of {TAIL:,} characters, cross-entropy in nats/char:")
    print("| tail | read as | own label | other's label | no label | model without styles |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name in names:
        own, other = names.index(name), 1 - names.index(name)
        for how, streams, seq_len in (("16 streams", 16, 256), ("128-char windows", TAIL, 128)):
            figures = [score(styled, tokenizer, tails[name], s, streams, seq_len) for s in (own, other, None)]
            figures.append(score(plain, tokenizer, tails[name], None, streams, seq_len))
            print(f"| {name} | {how} | " + " | ".join(f"{x:.4f}" for x in figures) + " |")
    config = {k: getattr(styled.config, k) for k in ("vocab_size", "embed_size", "hidden_size", "layers")}
    without, with_styles = step_cost(config, tuple(names), args.batch_size, args.seq_len, args.repeats)
    print(f"a training step, median of {args.repeats} interleaved: {without:.1f} ms without styles, "
          f"{with_styles:.1f} ms with ({with_styles / without:.3f}x)")


if __name__ == "__main__":
    main()
