"""Priming from a document, measured: cross-entropy on a held-out continuation, unprimed, primed and adapted.

    python benchmarks/bench_prime.py ../shared/corpora/tinyshakespeare.txt --time 3m

The text's last DOC + TAIL characters are held out of training (the run trains on the rest). Of
those, the first DOC characters are the document given to --prime-file, and the last TAIL its
continuation, which nothing has seen. The continuation is scored with fixed weights, as
generation would draw from them:

* unprimed: read from a zero state, the checkpoint's weights;
* primed:   read on from the state the document left (generate.py --prime-file DOC);
* adapted:  the same, with the weights adapted on the document first (generate.py --prime-file DOC
            --adapt), their steps done; the time that adapting took is printed.

--run reuses a run folder trained by an earlier call (on the same text and split).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from textgen.checkpoint import load_model  # noqa: E402
from textgen.corpus import read_text  # noqa: E402
from textgen.evaluate import ADAPT_LR, LN2  # noqa: E402
from textgen.generation.priming import prime  # noqa: E402
from textgen.generation.generator import Generator  # noqa: E402


@torch.no_grad()
def continuation_nats(gen: Generator, text: str) -> float:
    """Mean -log p (nats) of each character of text, read on from gen's state with gen's (fixed) weights."""
    ids = torch.from_numpy(gen.tokenizer.encode(text).astype("int64"))[None]
    if gen.logits is None:                             # nothing read: a zero state, and the opening newline
        gen.feed("\n")
    first = -torch.log_softmax(gen.logits[:1].float(), -1)[0, ids[0, 0]]
    nll, _ = gen.model(ids[:, :-1], gen.state, targets=ids[:, 1:], reduction="none")
    return float((nll.sum() + first) / ids.shape[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text")
    p.add_argument("--doc", type=int, default=100_000, help="characters of the document (default 100,000)")
    p.add_argument("--tail", type=int, default=10_000, help="characters of its held-out continuation")
    p.add_argument("--time", default="3m", help="training budget")
    p.add_argument("--run", default=None, help="a run folder already trained on this split")
    p.add_argument("--adapt-lr", type=float, default=ADAPT_LR)
    args = p.parse_args()

    text = read_text(args.text)
    held = args.doc + args.tail
    train, document, tail = text[:-held], text[-held:-args.tail], text[-args.tail:]
    run = args.run
    if run is None:
        from textgen.cli import train_main
        work = tempfile.mkdtemp(prefix="bench-prime-")
        train_path = os.path.join(work, "train.txt")
        with open(train_path, "w", encoding="utf-8") as f:
            f.write(train)
        run = os.path.join(work, "run")
        assert train_main([train_path, "--time", args.time, "--out", run, "--sample-length", "0", "-q"]) == 0
    model, tokenizer, ckpt = load_model(run)
    c = model.config
    print(f"{args.text}: trained on the first {len(train):,} characters ({c.layers}x{c.hidden_size}, "
          f"step {ckpt['step']}); document {len(document):,}, continuation {len(tail):,}, both held out")

    figures = {}
    figures["unprimed"] = continuation_nats(Generator(model, tokenizer, seed=0), tail)
    gen = Generator(model, tokenizer, seed=0)
    done = prime(gen, document)
    figures["primed"] = continuation_nats(gen, tail)
    gen = Generator(model, tokenizer, seed=0)
    done = prime(gen, document, adapt=True, lr=args.adapt_lr)
    figures["primed and adapted"] = continuation_nats(gen, tail)
    for name, nats in figures.items():
        print(f"{name:>20}: {nats:.4f} nats/char ({nats / LN2:.3f} bits) on the held-out continuation")
    print(f"adapting on the {len(document):,}-character document took {done['seconds']:.1f} s "
          f"({done['seconds'] / len(document) * 1e3:.2f} ms a character; it read it at {done['nats_per_char']:.4f} "
          f"nats/char while learning), torch threads {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
