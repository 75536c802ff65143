"""Train with the defaults for a wall-clock budget and print the validation curve beside the n-gram baseline.

    python benchmarks/quality.py ../shared/corpora/tinyshakespeare.txt --time 15m
    python benchmarks/quality.py some.txt --time 5m -- --hidden-size 256   # train.py flags after --

The split is train.py's (last --val-fraction of the file for validation); the
baseline is an interpolated Witten-Bell 5-gram counted on the same head. The
tail is also scored the way `textgen-eval --adapt` does (dynamic evaluation:
one stream, learning from what it has read) beside xz's conditional figure,
which likewise draws on the tail read so far (--no-adapt leaves both out). Both
are also given with a match model mixed in (`textgen-eval --match --history`,
textgen/match.py): it copies from the head and the tail read so far, as xz does.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ngram import WittenBell, split, xz_conditional  # noqa: E402
from textgen.cli import train_main  # noqa: E402
from textgen.settings import parse_duration  # noqa: E402
from textgen.checkpoint import load, load_model  # noqa: E402
from textgen.evaluate import adapted_cross_entropy, cross_entropy, match_mixed  # noqa: E402
from textgen.tokenizer import codepoints  # noqa: E402

LN2 = math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text")
    parser.add_argument("--time", default="15m", help="training budget (90s, 15m, 2h)")
    parser.add_argument("--order", type=int, default=5, help="n-gram order of the baseline")
    parser.add_argument("--out", default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--no-adapt", action="store_true",
                        help="skip the dynamic evaluation and the xz figure (a minute or two on 1 MB)")
    argv = sys.argv[1:]
    # argparse cannot take flags meant for another program after "--" once a positional is filled.
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    parse_duration(args.time)
    out = args.out or tempfile.mkdtemp(prefix="textgen-quality-")
    code = train_main([args.text, "--time", args.time, "--out", out, "-q", "--sample-length", "0", *args.extra])
    if code != 0:
        sys.exit(code)
    ckpt = load(os.path.join(out, "latest.pt"))
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    head, tail = split(text, ckpt["train_config"]["val_fraction"])
    baseline = WittenBell(head, args.order, set(text)).cross_entropy(tail, context=head)
    print(f"\n{'step':>6} {'seconds':>8} {'train':>7} {'val nats':>9} {'val bits':>9}")
    for row in ckpt["history"]:
        if row["val_loss"] is not None:
            print(f"{row['step']:>6} {row['time']:>8.0f} {row['train_loss']:>7.4f} {row['val_loss']:>9.4f} "
                  f"{row['val_loss'] / LN2:>9.4f}")
    # The last validation (a run stopped by a signal may end on a step without one).
    final = next((row["val_loss"] for row in reversed(ckpt["history"]) if row["val_loss"] is not None), None)
    best = ckpt["best_val_loss"]
    if final is None:
        sys.exit(f"{out}: the run stopped at step {ckpt['step']}, before its first validation; nothing to score")
    # The figure set beside the baseline covers exactly the baseline's text, the whole tail, even
    # where training validated on its first --eval-chars only.
    model, tokenizer, _ = load_model(out, prefer_best=True)
    train_cfg = ckpt["train_config"]
    tail_tokens = tokenizer.encode(tail)
    positions = np.full(len(tail_tokens), np.nan)
    total, count = cross_entropy(model, tail_tokens, train_cfg["batch_size"], train_cfg["seq_len"],
                                 positions=positions)
    whole = total / count
    head_codes, tail_codes = codepoints(head), codepoints(tail)
    matched = np.nansum(match_mixed(positions, tail_codes, head_codes)) / count
    c = ckpt["model_config"]
    print(f"\n{os.path.basename(args.text)}: {c['layers']}x{c['hidden_size']} LSTM, {ckpt['step']} steps in "
          f"{ckpt['elapsed']:.0f}s")
    print(f"final val {final:.4f} nats/char ({final / LN2:.3f} bits), best {best:.4f} ({best / LN2:.3f} bits)")
    print(f"best.pt over the whole validation tail ({count:,} characters): {whole:.4f} nats/char "
          f"({whole / LN2:.3f} bits)")
    print(f"Witten-Bell {args.order}-gram baseline {baseline:.4f} nats/char ({baseline / LN2:.3f} bits); "
          f"model / baseline = {whole / baseline:.3f}")
    print(f"with a match model over the head and the tail read so far (textgen-eval --match --history): "
          f"{matched:.4f} nats/char ({matched / LN2:.3f} bits)")
    if not args.no_adapt:
        positions = np.full(len(tail_tokens), np.nan)
        chunk_nll, count = adapted_cross_entropy(model, tail_tokens, positions=positions)
        adapted, xz = chunk_nll.sum() / count, xz_conditional(head, tail)
        adapted_matched = np.nansum(match_mixed(positions, tail_codes, head_codes)) / count
        print(f"learning as it reads (textgen-eval --adapt): {adapted:.4f} nats/char ({adapted / LN2:.3f} bits); "
              f"with the match model too {adapted_matched:.4f}; xz with the head as dictionary {xz:.4f}; "
              f"adapted / xz = {adapted / xz:.3f}, with the match model {adapted_matched / xz:.3f}")


if __name__ == "__main__":
    main()
