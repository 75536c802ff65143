"""Laying a corpus out as parallel streams of consecutive chunks (reading files is corpus.py's job).

Training text is a ring of N tokens read by B heads spaced N // B apart. Every
step each head reads the next chunk of T characters, so chunk k+1 of a stream
continues chunk k and the LSTM state can carry across them. The whole loader
state is one integer, the step position.

Wrapping is deliberate: when a head reaches the place where the next head
started, it simply reads on into that region; the last head runs off the end
of the text into its beginning. No text is skipped at an epoch boundary and no
state is reset, because every stream stays contiguous text; the one seam is
the end of the corpus joined to its start, which the model sees as one more
document boundary.

Validation is the contiguous tail of the text, read by ``eval_windows`` as a
few streams from their starts with the state carried from chunk to chunk.

Imports errors; knows token arrays, never the model, training or cli.
"""
from __future__ import annotations

import numpy as np

from .errors import UsageError


def split_tokens(tokens: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """The head of the text for training, the contiguous tail for validation."""
    n_val = int(len(tokens) * val_fraction)
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]


def check_trainable(n_train: int, n_val: int, batch_size: int, seq_len: int, val_fraction: float) -> None:
    need = batch_size * (seq_len + 1)
    if n_train < need:
        raise UsageError(
            f"the training text has {n_train} characters but {batch_size} streams of {seq_len + 1} "
            f"need at least {need}; use a longer text or lower {{batch_size}} or {{seq_len}}",
            batch_size=..., seq_len=...
        )
    if val_fraction > 0 and n_val < seq_len + 1:
        raise UsageError(
            f"the validation tail has {n_val} characters, less than one chunk of {seq_len + 1}; "
            f"raise {{val_fraction}}, lower {{seq_len}}, or set {{val_fraction}} to 0", val_fraction=..., seq_len=...
        )


class StreamLoader:
    """B read heads on a ring of tokens; each call returns the next (B, T) chunk of every stream."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, position: int = 0,
                 first_stream: int = 0, num_streams: int | None = None, styles=None):
        self.tokens = tokens
        self.styles = styles            # positions -> style ids (styles.StyleMap), or None: no labels
        self.batch_size, self.seq_len = batch_size, seq_len
        self.stride = len(tokens) // batch_size
        # A distributed rank reads only its own slice of the global streams.
        self.streams = np.arange(first_stream, first_stream + (num_streams or batch_size))
        self.position = position
        self._offsets = np.arange(seq_len + 1)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        return self.next_labelled_batch()[:2]

    def next_labelled_batch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The next chunk of every stream, (B, T) inputs and targets, and the style id of each input
        (None without styles)."""
        starts = self.streams * self.stride + self.position * self.seq_len
        positions = (starts[:, None] + self._offsets) % len(self.tokens)        # (B, T+1)
        window = self.tokens[positions]
        self.position += 1
        window = window.astype(np.int64)
        styles = None if self.styles is None else self.styles(positions[:, :-1])
        return window[:, :-1], window[:, 1:], styles

    @property
    def epoch(self) -> float:
        return self.position * self.seq_len / self.stride

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def eval_streams(n_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many parallel streams to read n_tokens with: at most batch_size, each at least one chunk."""
    return max(1, min(batch_size, (n_tokens - 1) // (seq_len + 1)))


def eval_windows(n_tokens: int, batch_size: int, seq_len: int):
    """Yield (S, w + 1) arrays of positions covering n_tokens as S contiguous streams, in order.

    Row s of each window continues row s of the previous one, so the caller
    carries the state from one window to the next. Only the last window may be
    narrower than seq_len. At most S - 1 final characters (of n_tokens - 1
    predictions) are left out because the streams have equal length.
    """
    streams = eval_streams(n_tokens, batch_size, seq_len)
    length = (n_tokens - 1) // streams                      # predictions per stream
    base = np.arange(streams)[:, None] * length
    for start in range(0, length, seq_len):
        width = min(seq_len, length - start)
        yield base + start + np.arange(width + 1)


def eval_chunks(tokens: np.ndarray, batch_size: int, seq_len: int):
    """Yield (x, y) chunks of tokens read as in eval_windows."""
    for idx in eval_windows(len(tokens), batch_size, seq_len):
        window = tokens[idx].astype(np.int64)
        yield window[:, :-1], window[:, 1:]
