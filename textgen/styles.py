"""Styles: each file of a folder or glob corpus is a style, named by its file stem.

Training with ``--styles`` labels every character of the corpus with the style of the file it
comes from (a separator belongs to the file after it, so the model learns how each style begins),
and the model adds that style's learned embedding to each character's (see CharLSTM). The labels
are never stored: a ``StyleMap`` holds where each style's stretch of the corpus starts, and turns
positions into style ids with one binary search, so a corpus of any size costs a few integers.

Generation names a style (``--style NAME``, ``style=``, ``"style"``); ``style_id`` turns the name
into the model's id, or says in one sentence which names the model knows.

Imports corpus (to count each file's characters) and errors; never the model, training or cli.
"""
from __future__ import annotations

import os

import numpy as np

from .corpus import PreparedCorpus, decoded_blocks
from .errors import UsageError

NO_STYLE = -1       # a row with no label: the model adds no style embedding to it


def names_of(paths: list[str]) -> tuple[str, ...]:
    """The style of each file: its name without the extension; two files of one name are one sentence."""
    names = tuple(os.path.splitext(os.path.basename(p))[0] for p in paths)
    seen: dict[str, str] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise UsageError(f"{seen[name]} and {path} would both be the style {name!r}; with {{styles}} each "
                             f"file is a style named by its file name without the extension, so rename one",
                             styles=True)
        seen[name] = path
    return names


class StyleMap:
    """Where each style's stretch of the corpus starts: positions -> style ids."""

    def __init__(self, starts):
        self.starts = np.asarray(starts, dtype=np.int64)      # (S,) increasing; starts[0] == 0

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """The style id of each position (any shape), as int64."""
        return np.searchsorted(self.starts, positions, side="right") - 1

    def shifted(self, offset: int) -> "StyleMap":
        """The same labels for a slice of the corpus that starts at offset (the validation tail)."""
        return StyleMap(self.starts - offset)


def style_map(corpus: PreparedCorpus) -> tuple[tuple[str, ...], StyleMap]:
    """The style names of a corpus's files and where each one's text starts among its tokens."""
    paths, separator = corpus.info["files"], corpus.info["separator"]
    if len(paths) < 2:
        raise UsageError(f"{{styles}} needs a folder or glob of several files, one per style, but "
                         f"{corpus.info['path']} is one file", styles=True)
    names = names_of(paths)
    starts, position = [], 0
    for k, path in enumerate(paths):
        # The separator before a file is labelled with that file's style: it leads into that style's text.
        starts.append(position)
        position += (len(separator) if k > 0 else 0) + sum(len(text) for _, text in decoded_blocks(path))
    if position != len(corpus.tokens):
        raise UsageError(f"the files of {corpus.info['path']} changed while they were read; run again")
    return names, StyleMap(starts)


def style_id(names, name: str | None) -> int:
    """The id of the style called name in a model that knows names; NO_STYLE for None."""
    if name is None:
        return NO_STYLE
    if not names:
        raise UsageError("{style} was given, but this model was trained without styles (a model trained on a "
                         "folder of files with styles learns one per file)", style=name)
    if name not in names:
        raise UsageError(f"this model has no style {name!r} for {{style}}; its styles are "
                         f"{', '.join(names)}", style=...)
    return list(names).index(name)
