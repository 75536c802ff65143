"""The copy index's costs: its one-time build, and what the report and --max-copy cost a character.

    python benchmarks/bench_copy.py ../shared/corpora/tinyshakespeare.txt
    python benchmarks/bench_copy.py /tmp/corpora/code-100MB.txt --max-copy 20

The file's first 90% is indexed as a training text (prepared through the token cache, in a cache
folder of this run's own); its held-out last 10% stands for generated text in the same style: new
text whose short stretches do occur in the training text, as a model's samples do. Printed:

* build: the suffix array built and written beside the token cache, and the peak memory of it;
* load: a second load, from the cache (its sha256 checked);
* guard: per character, the --max-copy step (the characters that would extend the last N into a
  verbatim run of N + 1), over the held-out text's positions;
* report: per character, the longest verbatim span of 2,000-character pieces of the held-out text.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textgen.copy_index import CopyIndex, cached            # noqa: E402
from textgen.corpus import prepare, read_text                # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text")
    p.add_argument("--max-copy", type=int, default=20, help="N of the guard's window")
    p.add_argument("--steps", type=int, default=5000, help="guard steps to time")
    p.add_argument("--report-chars", type=int, default=20000, help="held-out characters to report on")
    args = p.parse_args()

    work = tempfile.mkdtemp(prefix="bench-copy-")
    text = read_text(args.text)
    cut = int(len(text) * 0.9)
    train, held_out = text[:cut], text[cut:]
    del text
    train_path = os.path.join(work, "train.txt")
    with open(train_path, "w", encoding="utf-8") as f:
        f.write(train)
    del train
    corpus = prepare(train_path, os.path.join(work, "cache"))
    n = len(corpus.tokens)
    print(f"{args.text}: {n:,} characters indexed ({os.path.getsize(train_path) / 1e6:,.1f} MB), "
          f"{len(held_out):,} held out")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    sa = cached(corpus.info["cache"], corpus.tokens, corpus.sha256, log=lambda m: None)
    build = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"build: {build:.2f} s ({n / build / 1e6:.2f} M characters/s), peak memory +{(peak - before) / 1024:,.0f} MB "
          f"(process peak {peak / 1024:,.0f} MB), {sa.nbytes / 1e6:,.1f} MB on disk")
    del sa
    started = time.perf_counter()
    sa = cached(corpus.info["cache"], corpus.tokens, corpus.sha256, log=print)
    print(f"load from the cache (sha256 checked): {time.perf_counter() - started:.3f} s")
    index = CopyIndex(corpus.tokens, sa, corpus.tokenizer)

    vocabulary = set(corpus.tokenizer.chars)
    known = "".join(ch for ch in held_out[:10 * (args.steps + args.report_chars)] if ch in vocabulary)
    ids = corpus.tokenizer.encode(known).tolist()
    N = args.max_copy
    steps = min(args.steps, len(ids) - N)
    banned = 0
    started = time.perf_counter()
    for i in range(steps):
        banned += bool(index.extensions(ids[i:i + N]))
    guard = (time.perf_counter() - started) / steps
    print(f"guard (--max-copy {N}): {guard * 1e6:,.0f} us a character ({steps:,} steps; the last {N} characters "
          f"occurred in the training text at {banned / steps:.1%} of them)")

    pieces = [known[i:i + 2000] for i in range(0, min(len(known), args.report_chars), 2000)]
    started = time.perf_counter()
    lengths = [index.report([piece])["length"] for piece in pieces]
    report = (time.perf_counter() - started) / sum(map(len, pieces))
    print(f"report: {report * 1e6:,.0f} us a character ({len(pieces)} pieces of 2,000; longest verbatim spans "
          f"{min(lengths)}-{max(lengths)} characters)")


if __name__ == "__main__":
    main()
