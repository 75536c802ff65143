"""A match model for scoring text: the next character predicted as the one that followed the
last time the characters just read occurred, mixed into the LSTM's distribution.

An LSTM reading 50-character chunks keeps no verbatim copy of what it has read, so a licence
header, a docstring repeated for a sync and an async API, or a page that exists in two scripts
costs it nearly as much the second time as the first. A compressor such as xz copies such
repeats from anywhere in its window. The match model of the PAQ family of compressors does the
same for a predictor: it finds the most recent earlier occurrence of the last ``min_len``
characters and follows it for as long as its predictions come true.

The mixture gives the character the match predicts an extra weight w, one weight per bucket of
match length, learnt online from the characters already scored:

    p(c) = (1 - w) p_lstm(c) + w [c == predicted]

It is a distribution over the characters for any w in [0, 1), it is the LSTM's own where there
is no match, and w falls back towards 0 where matches of that length have been no better than the
LSTM; learning it online still costs a little where matches add nothing (0.005 nats a character on
tiny-shakespeare read with --adapt). Nothing at position i depends on text from i on.

Used by evaluation only (``textgen-eval --match``). Sampling draws from the LSTM alone: a copy
model pulls a sample towards repeating the text it was trained on.

Imports nothing of ours.
"""
from __future__ import annotations

import math

import numpy as np

# Chosen on the 0.1 and 1 MB corpora of benchmarks/README.md (docstrings, code, Chinese), the
# same setting for all ("A match model mixed in" there).
MIN_MATCH = 4       # characters of context a match must share before it predicts
MIX_LR = 0.01       # step of the online weight update
MAX_WEIGHT = 0.999  # keeps p > 0 for every character the LSTM gives mass to
BUCKETS = 16        # 0: no match; then lengths by powers of two: [4, 8), [8, 16), ... , >= 2**16

_BASE = np.uint64(1_000_003)


def _context_hashes(seq: np.ndarray, k: int) -> np.ndarray:
    """h[j] = a hash of seq[j-k:j] for every j >= k (h[:k] is 0): a polynomial modulo 2**64."""
    n = len(seq)
    h = np.zeros(n + 1, dtype=np.uint64)
    values = seq.astype(np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        for d in range(k):
            h[k:] = h[k:] * _BASE + values[d:n - k + d + 1]
    return h


def match_predictions(seq: np.ndarray, start: int, min_len: int = MIN_MATCH) -> tuple[np.ndarray, np.ndarray]:
    """The match model's prediction for each position of ``seq`` from ``start`` on.

    seq: integers (character codes), a history (say the training text) then the text to score,
    which begins at index ``start``. Returns (predicted, length), both of len(seq): predicted[i]
    is the element the match model expects at i (-1 where it has no match, and before start) and
    length[i] how many elements before i the match has shared (0 without one). Both depend on
    seq[:i] only.
    """
    seq = np.asarray(seq, dtype=np.int64)
    n = len(seq)
    if min_len < 1:
        raise ValueError(f"min_len must be at least 1, got {min_len}")
    if not 0 <= start <= n:
        raise ValueError(f"start must lie in [0, {n}], got {start}")
    predicted = np.full(n, -1, dtype=np.int64)
    length = np.zeros(n, dtype=np.int64)
    if n <= min_len:
        return predicted, length
    hashes = _context_hashes(seq, min_len)
    first = max(start, min_len)
    # The history's last occurrence of each context, in one sort rather than a loop over it: each
    # hash of a context ending at j < first mapped to the largest such j. The loop adds the
    # context ending at i only after predicting i, so a prediction never sees its own element.
    ends = np.arange(min_len, first)
    if len(ends):
        order = np.argsort(hashes[ends], kind="stable")
        sorted_hashes, sorted_ends = hashes[ends][order], ends[order]
        last = np.append(sorted_hashes[1:] != sorted_hashes[:-1], True)
        table = dict(zip(sorted_hashes[last].tolist(), sorted_ends[last].tolist()))
    else:
        table = {}
    values, keys = seq.tolist(), hashes.tolist()
    pointer = run = 0
    for i in range(first, n):
        if run == 0:
            j = table.get(keys[i])
            # j < i: the table holds only contexts ending before i. A hash can collide; compare.
            if j is not None and values[j - min_len:j] == values[i - min_len:i]:
                pointer, run = j, min_len
        if run:
            predicted[i], length[i] = values[pointer], run
            if values[pointer] == values[i]:
                pointer, run = pointer + 1, run + 1
            else:
                run = 0
        table[keys[i]] = i              # the context ending at i, the most recent from now on
    return predicted, length


def length_buckets(length: np.ndarray) -> np.ndarray:
    """0 for no match, else 1 + floor(log2(length / MIN_MATCH)) capped at BUCKETS - 1."""
    length = np.asarray(length)
    out = np.zeros(len(length), dtype=np.int64)
    matched = length > 0
    out[matched] = np.minimum(1 + np.floor(np.log2(np.maximum(length[matched], 1))).astype(np.int64)
                              - int(math.log2(MIN_MATCH)), BUCKETS - 1).clip(1)
    return out


def mix(nll: np.ndarray, hit: np.ndarray, length: np.ndarray, lr: float = MIX_LR) -> tuple[np.ndarray, np.ndarray]:
    """The mixture's negative log-likelihood at each position, and the weights it ended with.

    nll: the LSTM's -log p(target) per position, in the order the text is read (NaN where a
    position is not scored; it is left NaN and teaches the weights nothing). hit: whether the
    match model predicted the target. length: the match length (0: no match). Each weight takes a
    gradient step on the log-likelihood of the position just scored, after it is scored.
    """
    nll = np.asarray(nll, dtype=np.float64)
    if not (len(nll) == len(hit) == len(length)):
        raise ValueError(f"nll, hit and length must be equally long, got {len(nll)}, {len(hit)}, {len(length)}")
    out = nll.copy()
    weights = np.zeros(BUCKETS)
    buckets = length_buckets(length).tolist()
    hits = np.asarray(hit, dtype=bool).tolist()
    lstm_p = np.exp(-nll).tolist()
    for i in np.flatnonzero((np.asarray(length) > 0) & ~np.isnan(nll)).tolist():
        b, q = buckets[i], lstm_p[i]
        w = weights[b]
        target = 1.0 if hits[i] else 0.0
        p = (1.0 - w) * q + w * target
        out[i] = -math.log(p) if p > 0 else math.inf
        # d log p / d w = (target - q) / p
        weights[b] = min(MAX_WEIGHT, max(0.0, w + lr * (target - q) / max(p, 1e-12)))
    return out, weights
