"""Priming from a document: read it into the state before the prompt, and with ``adapt`` learn from it first.

Reading a document is what feeding a prompt is, except that the document is not part of the output:
the state carries its names, its subject and its manner into what is generated. A character-level
LSTM's state forgets within a few hundred characters, so ``adapt`` goes further and does what
``textgen-eval --adapt`` does (``evaluate.adapt``: dynamic evaluation, Krause et al. 2018): the
document is read as one stream of 50-character chunks, and after each chunk the weights take one
RMSprop step on it. Generation then continues from the adapted weights and the state the reading
ended in. The steps go to a copy of the model in memory; the checkpoint on disk is never touched.

Imports evaluate, model, sampling and errors; never cli.
"""
from __future__ import annotations

import time

import torch

from ..errors import UsageError
from ..evaluate import ADAPT_LR, adapt as adapt_weights
from ..lstm import Stepper
from .generator import Generator
from .sampling import encode_text


def prime(gen: Generator, document: str, adapt: bool = False, lr: float = ADAPT_LR, progress=None) -> dict:
    """Read document into gen's state (all its samples); with adapt, first adapt a copy of gen's model on it
    and generate from that copy from now on. Returns {"characters", "adapted", "seconds", "nats_per_char"}
    (the last: the adapting reading's own cross-entropy on the document, None without adapt)."""
    if not isinstance(document, str):
        raise UsageError(f"the prime document must be text, got {type(document).__name__}")
    ids = encode_text(gen.tokenizer, document, gen.unknown, gen.warn)
    started = time.perf_counter()
    if not adapt or len(ids) < 2:
        gen.feed(gen.tokenizer.decode(ids.numpy()))           # what is left after --unknown skip
        return {"characters": len(ids), "adapted": False, "seconds": time.perf_counter() - started,
                "nats_per_char": None}
    work, state, chunk_nll, scored = adapt_weights(gen.model, ids.numpy(), lr=lr, device=gen.device,
                                                   progress=progress)
    work.eval()
    for p in work.parameters():
        p.requires_grad_(False)
    n = gen.num_samples
    with torch.no_grad():
        # The document's last character was only a target while adapting: read it now, with the adapted weights.
        logits, state = work.read(ids[-1:].to(gen.device).unsqueeze(0), state)
    gen.model, gen.stepper = work, Stepper(work)
    gen.state = tuple((h.expand(n, -1).clone(), c.expand(n, -1).clone()) for h, c in state)
    gen.logits = logits.expand(n, -1).clone()
    return {"characters": len(ids), "adapted": True, "seconds": time.perf_counter() - started,
            "nats_per_char": float(chunk_nll.sum()) / max(scored, 1)}
