"""Cross-entropy of a model over a text, in nats and bits per character.

The text is read as a few contiguous parallel streams (``data.eval_windows``)
with the state carried from start to end of each stream. Each stream starts
from a zero state, so its first few characters are predicted with less
context than in one single stream: with S streams that affects S short
stretches of the text, a small upward bias that shrinks as the text grows.

``adapted_cross_entropy`` is dynamic evaluation (Krause et al. 2018): the text
is read as one stream, each chunk is scored first and then the model takes a
step on it, so later text is predicted by a model that has learnt from
everything before it, and nothing after. That is how a compressor such as xz
scores text (it copies from what it has read), and the fair figure beside one.

``match_mixed`` mixes a match model (``match``) into either: the character that
followed the last occurrence of the current context, in a history (say the
training text, as xz is given it for its conditional figure) or in the text
read so far.

Imports data, model, match, tokenizer and errors; never training or cli.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import torch

from .data import eval_windows
from .match import match_predictions, mix
from .lstm import CharLSTM, detach_state

LN2 = math.log(2)
EVAL_STREAMS = 16       # textgen-eval's defaults: parallel streams, characters a chunk
EVAL_SEQ_LEN = 256


@torch.no_grad()
def cross_entropy(model: CharLSTM, tokens: np.ndarray, batch_size: int = EVAL_STREAMS, seq_len: int = EVAL_SEQ_LEN,
                  device="cpu", progress=None, shard: tuple[int, int] | None = None,
                  positions: np.ndarray | None = None, styles=None) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of characters it covers.

    styles, for a model with styles: a function from positions in tokens to their style ids (a
    styles.StyleMap, or ``one_style``); None reads with no style.

    shard (rank, world_size) reads only that rank's share of the streams. positions, a float
    array as long as tokens, receives each predicted character's negative log-likelihood at
    its index (the others are left as they are).
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
            labels = _labels(styles, idx[:, :-1], device)
            # The model's own loss path: exact -log p(target) under the full distribution, but the
            # adaptive head computes only the clusters a target is in, not every class at every position.
            if positions is None:
                mean_nll, state = model(window[:, :-1], state, targets=targets, styles=labels)
                total += float(mean_nll) * targets.numel()
            else:
                nll, state = model(window[:, :-1], state, targets=targets, reduction="none", styles=labels)
                positions[idx[:, 1:]] = nll.float().cpu().numpy()
                total += float(nll.sum())
            count += targets.numel()
            if progress is not None:
                progress(idx.shape[0] * (idx.shape[1] - 1))
    finally:
        model.train(was_training)
    return total, count


def one_style(style: int):
    """The styles function of a text written in one style throughout."""
    return lambda positions: np.full(np.shape(positions), style, dtype=np.int64)


def _labels(styles, positions: np.ndarray, device) -> torch.Tensor | None:
    return None if styles is None else torch.from_numpy(np.asarray(styles(positions), dtype=np.int64)).to(device)


# Dynamic evaluation's defaults: chosen on tiny-shakespeare and the 1 MB docstring, code and
# Chinese corpora of benchmarks/README.md, the same setting for all four.
ADAPT_LR = 3e-4
ADAPT_SEQ_LEN = 50
ADAPT_DECAY = 1e-3
ADAPT_BETA = 0.99


def adapted_cross_entropy(model: CharLSTM, tokens: np.ndarray, seq_len: int = ADAPT_SEQ_LEN,
                          lr: float = ADAPT_LR, decay: float = ADAPT_DECAY, beta: float = ADAPT_BETA,
                          device="cpu", progress=None, positions: np.ndarray | None = None,
                          styles=None) -> tuple[np.ndarray, int]:
    """Dynamic evaluation: summed negative log-likelihood (nats) of each chunk, and the characters covered.

    The text is one stream of seq_len-character chunks. Each chunk is scored with the weights
    as they are, then the weights take one step on that chunk's loss: RMSprop (per-weight
    steps of about lr, from a running mean square of the gradients with Adam's bias
    correction), then a pull of ``decay`` back toward the trained weights. Several streams
    would leak: a step learnt on one stream would then predict earlier text of another.

    The caller's model is left as it was: the steps go to a copy. Dropout stays off. positions
    (as in ``cross_entropy``) receives each character's negative log-likelihood; styles as there.
    """
    _, _, chunk_nll, n = adapt(model, tokens, seq_len, lr, decay, beta, device, progress, positions, styles)
    return chunk_nll, n


def adapt(model: CharLSTM, tokens: np.ndarray, seq_len: int = ADAPT_SEQ_LEN, lr: float = ADAPT_LR,
          decay: float = ADAPT_DECAY, beta: float = ADAPT_BETA, device="cpu", progress=None,
          positions: np.ndarray | None = None, styles=None):
    """Dynamic evaluation's reading (``adapted_cross_entropy``), returning what it leaves too:
    (the adapted copy of the model, the state after the last chunk's inputs, each chunk's summed
    negative log-likelihood, the characters scored). The text's last character has been a target
    only: whoever goes on from here reads it next (``priming``)."""
    work = copy.deepcopy(model).to(device)
    work.eval()
    params = [p for p in work.parameters() if p.requires_grad]
    trained = [p.detach().clone() for p in params] if decay > 0 else None
    mean_square = [torch.zeros_like(p) for p in params]
    n = len(tokens) - 1
    chunk_nll = np.zeros(max(0, math.ceil(n / seq_len)))
    state = None
    data = torch.from_numpy(np.asarray(tokens).astype(np.int64)).to(device)
    for i, start in enumerate(range(0, n, seq_len)):
        stop = min(start + seq_len, n)
        inputs, targets = data[start:stop][None], data[start + 1:stop + 1][None]
        labels = _labels(styles, np.arange(start, stop)[None], device)
        if positions is None:
            mean_nll, state = work(inputs, state, targets=targets, styles=labels)
        else:
            nll, state = work(inputs, state, targets=targets, reduction="none", styles=labels)
            positions[start + 1:stop + 1] = nll.detach()[0].float().cpu().numpy()
            mean_nll = nll.mean()
        chunk_nll[i] = float(mean_nll.detach()) * (stop - start)
        # Every weight joins the graph (an adaptive-head cluster no target reached gets zeros, and
        # with them a step of 0 / (0 + eps) = 0).
        grads = torch.autograd.grad(mean_nll, params)
        with torch.no_grad():
            correction = 1 - beta ** (i + 1)
            for k, (p, g) in enumerate(zip(params, grads)):
                mean_square[k].mul_(beta).addcmul_(g, g, value=1 - beta)
                p.addcdiv_(g, (mean_square[k] / correction).sqrt_().add_(1e-8), value=-lr)
                if trained is not None:
                    p.lerp_(trained[k], decay)
        state = detach_state(state)
        if progress is not None:
            progress(stop - start)
    return work, state, chunk_nll, n


def match_mixed(positions: np.ndarray, codes: np.ndarray, history: np.ndarray | None = None) -> np.ndarray:
    """Per-character negative log-likelihoods with a match model mixed in (``match``).

    positions: the model's negative log-likelihood of each character of the text (NaN where it
    predicted none), codes: the text's character codes, history: codes of a text read before
    it (none: the match model draws on the text read so far only). Returns the mixture's
    figures, NaN where positions is.
    """
    history = np.zeros(0, dtype=np.int64) if history is None else np.asarray(history, dtype=np.int64)
    codes = np.asarray(codes, dtype=np.int64)
    predicted, length = match_predictions(np.concatenate([history, codes]), len(history))
    predicted, length = predicted[len(history):], length[len(history):]
    return mix(positions, predicted == codes, length)[0]


def evaluate_file(checkpoint_path: str, text_path: str, unknown: str = "error", batch_size: int = EVAL_STREAMS,
                  seq_len: int | None = None, device="cpu", progress: bool = False,
                  adapt_lr: float | None = None, match: bool = False, history_path: str | None = None,
                  style: str | None = None) -> dict:
    """Cross-entropy of a checkpoint over a whole text file, as a report dict.

    adapt_lr: dynamic evaluation with that step size (one stream; ``adapted_cross_entropy``).
    seq_len defaults to EVAL_SEQ_LEN characters a chunk, or ADAPT_SEQ_LEN when adapting.
    match: mix in a match model (``match_mixed``) over the text read so far, after the text of
    history_path where given; the report's nats_per_char is then the mixture's, and
    lstm_nats_per_char the model's alone. style: read the text under that style's label (a model
    trained with styles).
    """
    import time

    from .checkpoint import load_model
    from .corpus import read_text
    from .data import eval_streams
    from .errors import UsageError
    from .tokenizer import UnknownCharactersError, codepoints

    from .styles import NO_STYLE, style_id

    model, tokenizer, _ = load_model(checkpoint_path, prefer_best=True, device=device)
    label = style_id(model.config.style_names, style)
    styles = None if label == NO_STYLE else one_style(label)
    text = read_text(text_path)
    history = codepoints(read_text(history_path)) if history_path is not None else None
    cps = codepoints(text)
    missing = tokenizer.unknown_chars(text)
    skipped = 0
    if missing:
        if unknown != "skip":
            raise UsageError(f"{text_path}: {UnknownCharactersError(missing, tokenizer.vocab_size)}; "
                             f"pass {{unknown}} to leave them out of the average", unknown="skip")
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
    positions = np.full(len(tokens), np.nan) if match else None
    start = time.perf_counter()
    try:
        if adapt_lr is None:
            seq_len = seq_len or EVAL_SEQ_LEN
            total, count = cross_entropy(model, tokens, batch_size, seq_len, device,
                                         progress=bar.update if bar else None, positions=positions, styles=styles)
            streams = eval_streams(len(tokens), batch_size, seq_len)
        else:
            seq_len = seq_len or ADAPT_SEQ_LEN
            chunk_nll, count = adapted_cross_entropy(model, tokens, seq_len, adapt_lr, device=device,
                                                     progress=bar.update if bar else None, positions=positions,
                                                     styles=styles)
            total, streams = float(chunk_nll.sum()), 1
    finally:
        if bar:
            bar.close()
    lstm_nats = nats = total / count
    if match:
        nats = float(np.nansum(match_mixed(positions, cps, history))) / count
    return {"checkpoint": checkpoint_path, "text": text_path, "characters": int(len(cps) + skipped),
            "predicted": count, "skipped_unknown": skipped, "nats_per_char": nats, "bits_per_char": nats / LN2,
            "streams": streams, "seq_len": seq_len, "adapt_lr": adapt_lr, "match": match,
            "history": history_path, "history_characters": 0 if history is None else int(len(history)),
            "lstm_nats_per_char": lstm_nats, "style": style, "seconds": time.perf_counter() - start}

