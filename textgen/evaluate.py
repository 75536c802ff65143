"""Cross-entropy of a model over a text, in nats and bits per character.

The text is read as a few contiguous parallel streams (``data.eval_windows``)
with the state carried from start to end of each stream. Each stream starts
from a zero state, so its first few characters are predicted with less
context than in one single stream: with S streams that affects S short
stretches of the text, a small upward bias that shrinks as the text grows.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .data import eval_windows
from .model import CharLSTM

LN2 = math.log(2)


@torch.no_grad()
def cross_entropy(model: CharLSTM, tokens: np.ndarray, batch_size: int = 16, seq_len: int = 256,
                  device="cpu", counted: np.ndarray | None = None, progress=None,
                  shard: tuple[int, int] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of characters it covers.

    counted, a boolean array as long as tokens, leaves the characters where it
    is False out of the sum (they are still read, so the state stays whole).
    shard (rank, world_size) reads only that rank's share of the streams.
    """
    was_training = model.training
    model.eval()
    total, count, state = 0.0, 0, None
    try:
        for idx in eval_windows(len(tokens), batch_size, seq_len):
            if shard is not None:
                idx = idx[shard[0]::shard[1]]
                if len(idx) == 0:
                    continue
            window = torch.from_numpy(tokens[idx].astype(np.int64)).to(device)
            logits, state = model(window[:, :-1], state)
            nll = F.cross_entropy(logits.flatten(0, 1).float(), window[:, 1:].flatten(), reduction="none")
            if counted is not None:
                keep = torch.from_numpy(counted[idx[:, 1:]].ravel()).to(device)
                nll = nll[keep]
            total += float(nll.sum())
            count += nll.numel()
            if progress is not None:
                progress(idx.shape[0] * (idx.shape[1] - 1))
    finally:
        model.train(was_training)
    return total, count
