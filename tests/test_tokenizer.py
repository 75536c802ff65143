import sys

import numpy as np
import pytest

from textgen.tokenizer import CharTokenizer, UnknownCharactersError

MIXED = ("Hello, мир! 你好世界 こんにちは 😀👍🏽 e\u0301 (combining) Ελληνικά عربى\r\nCRLF line\r\n"
         "tab\there \U0001F468\u200D\U0001F469\u200D\U0001F467 ZWJ family")


def test_round_trip_mixed_scripts_exactly():
    tok = CharTokenizer.from_text(MIXED)
    ids = tok.encode(MIXED)
    assert tok.decode(ids) == MIXED
    assert len(ids) == len(MIXED)                      # one token per code point
    assert "\r" in tok.chars and "\u0301" in tok.chars
    assert tok.chars == "".join(sorted(set(MIXED)))


def test_smallest_dtype_fits_the_vocabulary():
    assert CharTokenizer.from_text("abc").encode("cab").dtype == np.uint8
    big = "".join(chr(0x4E00 + i) for i in range(300))
    tok = CharTokenizer.from_text(big)
    assert tok.encode(big).dtype == np.uint16
    assert tok.decode(tok.encode(big)) == big


def test_unknown_characters_are_named_never_substituted():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharactersError) as e:
        tok.encode("abxyz")
    assert e.value.unknown == "xyz" and "x y z" in str(e.value)
    assert tok.unknown_chars("abzcz") == "z"


def test_serialisation_round_trip():
    tok = CharTokenizer.from_text(MIXED)
    assert CharTokenizer.from_dict(tok.to_dict()) == tok


def test_encoding_10mb_is_one_vectorised_pass():
    """A Python loop per character would execute millions of lines; we count them."""
    text = (MIXED * (10_000_000 // len(MIXED) + 1))[:10_000_000]
    tok = CharTokenizer.from_text(text)
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        ids = tok.encode(text)
    finally:
        sys.settrace(None)
    assert len(ids) == 10_000_000 and ids.dtype == np.uint8
    assert lines < 200, f"{lines} Python lines ran to encode 10 MB"
    assert tok.decode(ids[:len(MIXED)]) == MIXED
