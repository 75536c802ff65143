"""Character tokenizer over Unicode code points.

The vocabulary is the sorted set of code points seen in the training text; a
token id is a position in that list. Encoding and decoding are vectorised with
numpy through UTF-32 (one fixed-width unit per code point), never a Python loop
per character, and encoded text uses the smallest unsigned dtype that fits.

Imports nothing of ours.
"""
from __future__ import annotations

import numpy as np

_MAX_CODEPOINT = 0x110000


class UnknownCharactersError(ValueError):
    """The text holds characters the vocabulary lacks."""

    def __init__(self, unknown: str, vocab_size: int):
        self.unknown = unknown
        shown = " ".join(escape_char(ch) for ch in unknown[:20])
        more = f" and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        super().__init__(
            f"{len(unknown)} character(s) not in the model's vocabulary of {vocab_size}: {shown}{more}"
        )


def escape_char(ch: str) -> str:
    """A printable, unambiguous form of one character for messages."""
    if ch.isprintable() and not ch.isspace():
        return ch
    return repr(ch)[1:-1] if len(repr(ch)) > 3 else f"U+{ord(ch):04X}"


def codepoints(text: str) -> np.ndarray:
    """The code points of text as a uint32 array, in one vectorised pass."""
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


def smallest_dtype(vocab_size: int) -> np.dtype:
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocabulary of {vocab_size} does not fit in uint32")


class CharTokenizer:
    def __init__(self, chars: str):
        cps = np.unique(codepoints(chars)) if chars else np.zeros(0, dtype=np.uint32)
        if len(cps) == 0:
            raise ValueError("a tokenizer needs at least one character")
        self.chars = cps.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
        self._codepoints = cps.astype(np.uint32)             # id -> code point
        self.dtype = smallest_dtype(len(cps))
        self._lookup = None                                   # code point -> id, built on first use

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls.from_codepoints(codepoints(text))

    @classmethod
    def from_codepoints(cls, cps: np.ndarray) -> "CharTokenizer":
        present = np.flatnonzero(np.bincount(cps, minlength=1)).astype("<u4")
        return cls(present.tobytes().decode("utf-32-le", "surrogatepass"))

    @property
    def vocab_size(self) -> int:
        return len(self._codepoints)

    def _table(self) -> np.ndarray:
        if self._lookup is None:
            table = np.full(_MAX_CODEPOINT, -1, dtype=np.int32)
            table[self._codepoints] = np.arange(self.vocab_size, dtype=np.int32)
            self._lookup = table
        return self._lookup

    def unknown_chars(self, text: str) -> str:
        """The distinct characters of text that the vocabulary lacks, sorted."""
        cps = codepoints(text)
        missing = np.unique(cps[self._table()[cps] < 0]).astype("<u4")
        return missing.tobytes().decode("utf-32-le", "surrogatepass")

    def encode_codepoints(self, cps: np.ndarray) -> np.ndarray:
        ids = self._table()[cps]
        if ids.size and ids.min() < 0:
            missing = np.unique(cps[ids < 0]).astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")
            raise UnknownCharactersError(missing, self.vocab_size)
        return ids.astype(self.dtype)

    def encode(self, text: str) -> np.ndarray:
        return self.encode_codepoints(codepoints(text))

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64)
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def to_dict(self) -> dict:
        return {"chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        return cls(d["chars"])

    def __eq__(self, other) -> bool:
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"
