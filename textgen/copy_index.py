"""Where generated text copies the training text: a suffix array over the corpus, its cache, and the
two questions asked of it.

* ``longest_copy(ids)``: the longest span of a generated text that occurs verbatim in the corpus,
  and where (generate.py's copy report, the server's final line).
* ``extensions(window)``: the characters that, appended to ``window``, give a string that occurs in
  the corpus. With ``window`` the last N generated characters, those are exactly the characters
  that would make a verbatim run of N + 1 (``CopyGuard``, which ``--max-copy N`` puts into the one
  generation loop).

The index is the corpus's suffix array: the start of every suffix, sorted. Every string that occurs
in the corpus is the common prefix of one contiguous interval of it, found by binary search; the
characters that follow it there come in sorted order along that interval, so the distinct ones are
found with one binary search each. The corpus is the token cache's memory map (``corpus``): one-byte
ids are compared as the mapped file's bytes, wider ones as lists of ints. A query costs O(m log n)
for a string of m characters in a corpus of n (benchmarks/README.md, "Copy index", has the figures).

The array is built once per corpus by prefix doubling (``suffix_array``: numpy sorts, O(n log n)
a round, one round per doubling of the longest repeat) and cached beside the token cache's
entry, as ``suffix.bin`` with ``suffix.json`` holding the corpus's hash, the array's size and the
array's own sha256, checked on every load (a damaged file is built again, as the token cache is).

``for_checkpoint`` finds the text a checkpoint was trained on from what it records (path, size,
sha256): a text that is gone or has changed gets one sentence and no index.

Imports corpus, files, tokenizer and errors; never model, sampling's loop or cli.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import mmap
import os
import time

import numpy as np
import torch

from . import files
from .errors import OutputError, UsageError
from .tokenizer import CharTokenizer, UnknownCharactersError

INDEX_FORMAT = 1
_BLOCK = 1 << 24                       # bytes hashed at a time


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """The start of every suffix of tokens in lexicographic order (a shorter suffix before any it begins).

    Prefix doubling: sort the suffixes by their first k tokens (the first round packs as many tokens
    as fit into one 63-bit key), then, knowing each suffix's group (the suffixes that share its first k
    tokens), by the pair (group at i, group at i + k), which sorts them by their first 2k. Only groups
    of more than one suffix are sorted again (Larsson and Sadakane's refinement): a round costs what is
    still tied, which in text shrinks to its long repeats within a few rounds. A group is named by the
    position in the array where it starts, so a settled suffix never moves. uint32 where the corpus
    allows, int64 past 4G tokens.
    """
    n = len(tokens)
    index_dtype = np.uint32 if n < 2**32 else np.int64
    if n == 0:
        return np.zeros(0, dtype=index_dtype)
    t = np.asarray(tokens).astype(np.int64) + 1                     # 0 stands for "past the end"
    bits = int(t.max()).bit_length()
    k = max(1, 63 // bits)
    key = np.zeros(n, dtype=np.int64)
    for d in range(k):
        key <<= bits
        if d < n:
            key[: n - d] |= t[d:]
    del t
    order = np.argsort(key, kind="stable")                          # (n,) the array being sorted
    key = key[order]
    starts = np.ones(n, dtype=bool)                                 # a group starts at this position
    starts[1:] = key[1:] != key[:-1]
    del key
    group = np.empty(n, dtype=np.int64)                              # each suffix's group: where it starts
    group[order] = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    while k < n:
        tied = np.flatnonzero(~(starts & np.append(starts[1:], True)))  # positions in groups of two or more
        if len(tied) == 0:
            break
        s = order[tied]
        after = s + k
        # (group at i, group at i + k) as one int64: n (n + 1) + n < 2**63 for any corpus that fits in memory.
        pair = group[s] * (n + 1) + np.where(after < n, group[np.minimum(after, n - 1)] + 1, 0)
        by_pair = np.argsort(pair, kind="stable")                    # stays within each group: its start leads
        order[tied] = s = s[by_pair]
        pair = pair[by_pair]
        new = np.ones(len(tied), dtype=bool)
        new[1:] = pair[1:] != pair[:-1]
        starts[tied] = new
        group[s] = np.maximum.accumulate(np.where(new, tied, 0))
        k *= 2
    return order.astype(index_dtype)


class CopyIndex:
    """A corpus's token ids and their suffix array; the questions generation asks of them."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, tokenizer: CharTokenizer, info: dict | None = None):
        self.tokens, self.sa, self.tokenizer = tokens, sa, tokenizer
        self.info = info or {}
        self.n = len(tokens)
        # The searches read one entry at a time, millions of times: through memoryviews, whose items are
        # Python ints, not numpy's scalars (a memory map's own indexing costs microseconds an item).
        self._sa = memoryview(np.asarray(sa))
        self._tokens = memoryview(np.asarray(tokens))
        # One-byte ids compare as bytes, slices of the file's own mapping; wider ones as lists of ints.
        self._raw = _raw_bytes(tokens) if tokens.dtype.itemsize == 1 else None

    @classmethod
    def from_text(cls, text: str, tokenizer: CharTokenizer | None = None) -> "CopyIndex":
        """An index of a text in memory (tests, small texts); nothing is cached."""
        tokenizer = tokenizer or CharTokenizer.from_text(text)
        tokens = tokenizer.encode(text)
        return cls(tokens, suffix_array(tokens), tokenizer)

    # -- the primitives: a comparable key, the interval of a string ----------------------------

    def _key(self, ids: list[int]):
        return bytes(ids) if self._raw is not None else ids

    def _at(self, start: int, length: int):
        """The corpus's tokens [start, start + length) (fewer at its end), comparable with _key's."""
        if self._raw is not None:
            return self._raw[start:start + length]
        return self._tokens[start:start + length].tolist()

    def interval(self, ids) -> tuple[int, int]:
        """[lo, hi) of the suffix array: the suffixes that begin with ids (empty: lo == hi)."""
        m, key = len(ids), self._key([int(i) for i in ids])
        at = lambda s: self._at(s, m)                           # noqa: E731
        lo = bisect.bisect_left(self._sa, key, key=at)
        if lo == self.n or at(self._sa[lo]) != key:             # most windows of new text occur nowhere
            return lo, lo
        return lo, bisect.bisect_right(self._sa, key, lo, key=at)

    def _narrow(self, lo: int, hi: int, depth: int, token: int) -> tuple[int, int]:
        """Within [lo, hi), whose suffixes share their first depth tokens, those whose next token is token."""
        tokens, n = self._tokens, self.n

        def next_token(s: int) -> int:
            return tokens[s + depth] if s + depth < n else -1
        lo2 = bisect.bisect_left(self._sa, token, lo, hi, key=next_token)
        return lo2, bisect.bisect_right(self._sa, token, lo2, hi, key=next_token)

    # -- the questions ----------------------------------------------------------------------

    def extensions(self, window) -> list[int]:
        """The tokens c for which window + [c] occurs in the corpus (window itself must, or there are none)."""
        window = [int(i) for i in window]
        lo, hi = self.interval(window)
        depth, found = len(window), []
        while lo < hi:
            s = self._sa[lo] + depth
            if s >= self.n:                      # the corpus ends with window: that suffix sorts first
                lo += 1
                continue
            c = self._tokens[s]
            found.append(c)
            lo = self._narrow(lo, hi, depth, c)[1]
        return found

    def longest_copy(self, ids) -> dict:
        """The longest span of ids that occurs in the corpus (the first such span): {"length", "start" (in ids),
        "offset" (its first occurrence in the corpus), "occurrences"}; length 0 where none does."""
        ids = [int(i) for i in ids]
        best = {"length": 0, "start": 0, "offset": 0, "occurrences": 0}
        for i in range(len(ids)):
            if len(ids) - i <= best["length"]:
                break
            # Only a longer span matters: first ask whether one more character than the best occurs here.
            lo, hi = self.interval(ids[i:i + best["length"] + 1])
            if lo == hi:
                continue
            length = best["length"] + 1
            while i + length < len(ids):
                lo2, hi2 = self._narrow(lo, hi, length, ids[i + length])
                if lo2 == hi2:
                    break
                lo, hi, length = lo2, hi2, length + 1
            # The earliest occurrence (of the first million in suffix order: a span found more often than that
            # is a word or two, and reading all its entries would cost more than the search).
            best = {"length": length, "start": i, "offset": int(np.min(self.sa[lo:min(hi, lo + (1 << 20))])),
                    "occurrences": hi - lo}
        return best

    def line_of(self, offset: int) -> int:
        """The 1-based line of the corpus a character offset lies on."""
        newline = self.tokenizer.chars.find("\n")
        if newline < 0:
            return 1
        count = 0
        for start in range(0, offset, _BLOCK):            # in blocks: the corpus may be a large memory map
            count += int(np.count_nonzero(self.tokens[start:min(offset, start + _BLOCK)] == newline))
        return count + 1

    def report(self, texts: list[str]) -> dict:
        """The copy report of one or more generated texts: the longest verbatim span of any of them."""
        best = {"length": 0, "sample": 0, "start": 0, "offset": 0, "occurrences": 0, "text": ""}
        for sample, text in enumerate(texts):
            known = "".join(ch for ch in text if ch in self.tokenizer.chars) if \
                self.tokenizer.unknown_chars(text) else text
            found = self.longest_copy(self.tokenizer.encode(known))
            if found["length"] > best["length"]:
                best = {**found, "sample": sample, "text": known[found["start"]:found["start"] + found["length"]]}
        best["line"] = self.line_of(best["offset"]) if best["length"] else None
        best["path"] = self.info.get("path")
        return best


def describe(report: dict, samples: int = 1) -> str:
    """A copy report as the one line generate.py prints."""
    if not report["length"]:
        return "copy report: no character of the output occurs in the training text"
    shown = json.dumps(report["text"] if len(report["text"]) <= 60 else report["text"][:57] + "...", ensure_ascii=False)
    which = f" (sample {report['sample'] + 1})" if samples > 1 else ""
    where = f" of {report['path']}" if report.get("path") else ""
    more = report["occurrences"] - 1
    others = f"; and {more:,} other place{'s' if more > 1 else ''}" if more > 0 else ""
    return (f"copy report: the longest span of the output{which} found verbatim in the training text is "
            f"{report['length']:,} characters, {shown}, from line {report['line']:,}{where} "
            f"(character {report['offset']:,}{others})")


# -- building, caching and loading --------------------------------------------------------------

def _raw_bytes(tokens: np.ndarray):
    """A one-byte token array as something whose slices are bytes: its file mapped again (read-only, so
    memory stays the page cache's), else a copy of a small array in memory."""
    if isinstance(tokens, np.memmap) and tokens.filename and tokens.offset == 0:
        with open(tokens.filename, "rb") as f:
            raw = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        if len(raw) == len(tokens):
            return raw
        raw.close()
    return tokens.tobytes()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def cached(entry: str, tokens: np.ndarray, sha: str, log=None) -> np.ndarray:
    """The suffix array of the token cache entry's tokens: loaded from suffix.bin if it is whole and
    matches, else built now and written beside tokens.bin (through the one writer)."""
    log = log or (lambda message: None)
    array_path, meta_path = os.path.join(entry, "suffix.bin"), os.path.join(entry, "suffix.json")
    dtype = np.dtype(np.uint32 if len(tokens) < 2**32 else np.int64)
    if os.path.isfile(array_path) and os.path.isfile(meta_path):
        problem = None
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT or meta.get("corpus_sha256") != sha \
                    or meta.get("count") != len(tokens) or meta.get("dtype") != dtype.str:
                problem = "suffix.json does not describe this corpus"
            elif os.path.getsize(array_path) != len(tokens) * dtype.itemsize:
                problem = "suffix.bin has the wrong size"
            elif _sha256(array_path) != meta.get("sha256"):
                problem = "suffix.bin does not match its recorded sha256"
        except (OSError, ValueError) as e:
            problem = f"it cannot be read: {str(e).splitlines()[0][:100]}"
        if problem is None:
            return np.memmap(array_path, dtype=dtype, mode="r", shape=(len(tokens),))
        log(f"the copy index in {entry} is damaged ({problem}); building it again")
    log(f"indexing the training text for the copy report ({len(tokens):,} characters, once per text)")
    started = time.perf_counter()
    sa = suffix_array(tokens).astype(dtype, copy=False)
    try:
        with files.output(array_path, "wb") as f:
            f.write(memoryview(sa))
        files.write_text(meta_path, json.dumps({"format": INDEX_FORMAT, "corpus_sha256": sha, "count": len(tokens),
                                                "dtype": dtype.str, "sha256": _sha256(array_path)}))
    except (OutputError, UsageError) as e:             # a full or read-only cache: use it this once, say so
        log(f"the copy index could not be cached in {entry} ({e}); it is built again next time")
    log(f"indexed in {time.perf_counter() - started:.1f}s")
    return sa


def for_checkpoint(ckpt: dict, tokenizer: CharTokenizer, log=None) -> tuple[CopyIndex | None, str | None]:
    """(the index of the text the checkpoint was trained on, None), or (None, one sentence why not):
    the text is gone, has changed since, or the checkpoint does not say which it was."""
    from .corpus import prepare, resolve_sources
    info = ckpt.get("corpus") or {}
    path, sha, size = info.get("path"), info.get("sha256"), info.get("size_bytes")
    if not (isinstance(path, str) and isinstance(sha, str)):
        return None, "the checkpoint does not record its training text"
    recorded = info.get("files") if isinstance(info.get("files"), list) else [path]
    try:
        found = resolve_sources(path)
    except UsageError:
        found = None
    if found is None or found != [os.path.abspath(p) for p in recorded]:
        return None, f"the training text {path} is not there any more"
    if isinstance(size, int) and sum(os.path.getsize(p) for p in found) != size:
        return None, f"the training text {path} has changed since training (another size)"
    entry = info.get("cache")
    cache_dir = os.path.dirname(entry) if isinstance(entry, str) and os.path.isdir(os.path.dirname(entry)) else None
    try:
        corpus = prepare(path, cache_dir, info.get("separator", "\n\n"), tokenizer=tokenizer, log=log)
    except UnknownCharactersError:
        return None, f"the training text {path} has changed since training (new characters)"
    except UsageError as e:
        return None, f"the training text {path} cannot be read ({e})"
    if corpus.sha256 != sha:
        return None, f"the training text {path} has changed since training (another sha256)"
    key = (corpus.info["cache"], sha)
    if key not in _LOADED:
        _LOADED[key] = CopyIndex(corpus.tokens, cached(corpus.info["cache"], corpus.tokens, sha, log),
                                 corpus.tokenizer, {"path": path})
    return _LOADED[key], None


_LOADED: dict[tuple, CopyIndex] = {}             # one index per corpus and process (the server loads runs again)


class CopyGuard:
    """--max-copy N for a request's rows: before each draw, the characters that would extend a row's
    last N generated characters into a run of N + 1 found in the corpus get probability 0.

    What that does to the distribution: where the last N characters occur in the corpus, the
    characters F that follow them there are removed and the rest renormalised, p'(c) = p(c) / (1 -
    p(F)); then temperature 0, top-k and top-p act on what is left. Elsewhere (most steps, on text
    the model has not learnt by heart) nothing changes. It looks one character ahead only, so it is
    not the distribution over whole texts conditioned on holding no longer run: it never dead-ends
    (where every character would extend a run, the row is left as it is and ``unguarded`` counts
    it), but it may steer into a context where the likeliest characters are forbidden. Only the
    generated text counts: a prompt quoted from the corpus is the user's, not a copy."""

    def __init__(self, index: CopyIndex, max_copy: int, samples: int, tails: list[list[int]] | None = None):
        self.index, self.max_copy = index, max_copy
        # Each row's last generated ids (kept in place: a caller may carry them from one call to the next).
        self.tails = tails if tails is not None else [[] for _ in range(samples)]
        for tail in self.tails:
            del tail[:-max_copy]
        self.acted = 0              # row-steps where a character was removed
        self.unguarded = 0          # row-steps where every character would have extended a run

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """(samples, V) logits -> the same with each row's forbidden characters at -inf."""
        banned = [self.index.extensions(tail) if len(tail) == self.max_copy else [] for tail in self.tails]
        if not any(banned):
            return logits
        out = logits.clone()
        V = logits.shape[-1]
        for row, ids in enumerate(banned):
            if not ids:
                continue
            if len(ids) >= V:
                self.unguarded += 1
                continue
            out[row, ids] = float("-inf")
            self.acted += 1
        return out

    def push(self, ids: list[int]) -> None:
        """Each row's drawn token joins its tail (the last max_copy tokens)."""
        for tail, i in zip(self.tails, ids):
            tail.append(int(i))
            del tail[:-self.max_copy]
