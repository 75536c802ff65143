"""Interpolated Witten-Bell character n-gram: what counting alone achieves.

Counts n-grams of orders 1..N on the head of a file and reports the
cross-entropy of the tail (the same split textgen trains and validates on),
in nats and bits per character, so every model figure stands beside it.

    P(w | h) = (c(hw) + T(h) P(w | h')) / (c(h) + T(h))

where c counts occurrences, T(h) is the number of distinct characters seen
after h, h' is h without its first character, and the recursion ends in a
uniform distribution over the characters of the whole file. A context never
seen backs off to h' entirely.

Beside it, what a general-purpose compressor reaches on the same split: xz's conditional figure,
the compressed size of train+val minus that of train (so the tail is coded with the whole head
as its dictionary), in nats per character of the tail.

    python benchmarks/ngram.py ../shared/corpora/tinyshakespeare.txt --order 5
    python benchmarks/ngram.py FILE --order 3 4 5 6 7 8     # the best of these orders, and xz
"""
from __future__ import annotations

import argparse
import lzma
import math
import sys
from collections import Counter, defaultdict


class WittenBell:
    def __init__(self, text: str, order: int, alphabet: set[str]):
        self.order = order
        self.uniform = 1.0 / len(alphabet)
        self.counts = []                # per order n: Counter of n-grams
        self.context = []               # per order n: context (n-1 chars) -> (c(h), T(h))
        for n in range(1, order + 1):
            grams = Counter(text[i:i + n] for i in range(len(text) - n + 1))
            totals, types = defaultdict(int), defaultdict(int)
            for gram, count in grams.items():
                totals[gram[:-1]] += count
                types[gram[:-1]] += 1
            self.counts.append(grams)
            self.context.append({h: (totals[h], types[h]) for h in totals})

    def prob(self, history: str, char: str) -> float:
        p = self.uniform
        for n in range(1, self.order + 1):           # from unigram up to the full context
            if n - 1 > len(history):
                break
            h = history[len(history) - (n - 1):] if n > 1 else ""
            seen = self.context[n - 1].get(h)
            if seen is None:
                break                                # longer contexts are unseen too
            total, types = seen
            p = (self.counts[n - 1].get(h + char, 0) + types * p) / (total + types)
        return p

    def cross_entropy(self, text: str, context: str = "") -> float:
        """Mean nats per character of text, each predicted from up to order-1 preceding characters."""
        full = context[-(self.order - 1):] + text if self.order > 1 else text
        offset = len(full) - len(text)
        total = 0.0
        for i in range(offset, len(full)):
            total -= math.log(self.prob(full[max(0, i - self.order + 1):i], full[i]))
        return total / len(text)


def split(text: str, val_fraction: float) -> tuple[str, str]:
    n_val = int(len(text) * val_fraction)
    return text[: len(text) - n_val], text[len(text) - n_val:]


def xz_conditional(train: str, val: str) -> float:
    """(xz(train + val) - xz(train)) in nats per character of val, xz at its strongest setting with a
    dictionary that holds all of train (up to xz's 1.5 GiB limit)."""
    head, whole = train.encode("utf-8"), (train + val).encode("utf-8")
    dict_size = min(max(len(whole), 1 << 20), 1536 << 20)
    filters = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME, "dict_size": dict_size}]
    size = lambda data: len(lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters))  # noqa: E731
    return (size(whole) - size(head)) * 8 * math.log(2) / len(val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", help="UTF-8 text file")
    parser.add_argument("--order", type=int, nargs="+", default=[5], help="n-gram order(s) to report")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="tail held out, as in train.py")
    parser.add_argument("--no-xz", action="store_true", help="skip the xz figure")
    args = parser.parse_args()
    with open(args.text, encoding="utf-8") as f:
        text = f.read()
    train, val = split(text, args.val_fraction)
    best = None
    for order in args.order:
        model = WittenBell(train, order, set(text))
        nats = model.cross_entropy(val, context=train)
        best = min(best or (nats, order), (nats, order))
        print(f"Witten-Bell {order}-gram: {nats:.4f} nats/char = {nats / math.log(2):.4f} bits/char "
              f"({len(val):,} validation characters)")
        sys.stdout.flush()
    if len(args.order) > 1:
        print(f"best Witten-Bell: order {best[1]}, {best[0]:.4f} nats/char")
    if not args.no_xz:
        nats = xz_conditional(train, val)
        print(f"xz conditional (xz -9e of train+val minus train): {nats:.4f} nats/char = "
              f"{nats / math.log(2):.4f} bits/char")


if __name__ == "__main__":
    main()
