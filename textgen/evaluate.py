"""Cross-entropy of a model over a text, in nats and bits per character.

The text is read as a few contiguous parallel streams (``data.eval_windows``)
with the state carried from start to end of each stream. Each stream starts
from a zero state, so its first few characters are predicted with less
context than in one single stream: with S streams that affects S short
stretches of the text, a small upward bias that shrinks as the text grows.

Imports data, model, tokenizer and errors; never training or cli.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import eval_windows
from .model import CharLSTM

LN2 = math.log(2)


@torch.no_grad()
def cross_entropy(model: CharLSTM, tokens: np.ndarray, batch_size: int = 16, seq_len: int = 256,
                  device="cpu", progress=None, shard: tuple[int, int] | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of characters it covers.

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
            targets = window[:, 1:]
            # The model's own loss path: exact -log p(target) under the full distribution, but the
            # adaptive head computes only the clusters a target is in, not every class at every position.
            mean_nll, state = model(window[:, :-1], state, targets=targets)
            total += float(mean_nll) * targets.numel()
            count += targets.numel()
            if progress is not None:
                progress(idx.shape[0] * (idx.shape[1] - 1))
    finally:
        model.train(was_training)
    return total, count


def evaluate_file(checkpoint_path: str, text_path: str, unknown: str = "error", batch_size: int = 16,
                  seq_len: int = 256, device="cpu", progress: bool = False) -> dict:
    """Cross-entropy of a checkpoint over a whole text file, as a report dict."""
    import time

    from .checkpoint import load_model
    from .corpus import read_text
    from .data import eval_streams
    from .errors import UsageError
    from .tokenizer import UnknownCharactersError, codepoints

    model, tokenizer, _ = load_model(checkpoint_path, prefer_best=True, device=device)
    text = read_text(text_path)
    cps = codepoints(text)
    missing = tokenizer.unknown_chars(text)
    skipped = 0
    if missing:
        if unknown != "skip":
            raise UsageError(f"{text_path}: {UnknownCharactersError(missing, tokenizer.vocab_size)}; "
                             f"pass --unknown skip to leave them out of the average")
        known = np.isin(cps, codepoints(missing), invert=True)
        skipped = int((~known).sum())
        cps = cps[known]            # the model reads the text without them
    tokens = tokenizer.encode_codepoints(cps)
    if len(tokens) < 2:
        raise UsageError(f"{text_path} has fewer than two characters the model knows; nothing to evaluate")
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tokens) - 1, unit="char", unit_scale=True, file=__import__("sys").stderr)
    start = time.perf_counter()
    try:
        total, count = cross_entropy(model, tokens, batch_size, seq_len, device,
                                     progress=bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    nats = total / count
    return {"checkpoint": checkpoint_path, "text": text_path, "characters": int(len(cps) + skipped),
            "predicted": count, "skipped_unknown": skipped, "nats_per_char": nats, "bits_per_char": nats / LN2,
            "streams": eval_streams(len(tokens), batch_size, seq_len), "seconds": time.perf_counter() - start}

