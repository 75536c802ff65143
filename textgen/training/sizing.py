"""--size auto: a model sized to the text and to the budget.

Two limits decide how large a model should be, and the smaller one wins:

* the data: a model with many more parameters than the text has characters learns the text by
  heart instead of its style (char-rnn's rule of thumb: parameters and characters of about the
  same order; with dropout a few times more pays). ``PARAMETERS_PER_CHAR`` sets how many, and
  ``STRONG_PARAMETERS_PER_CHAR`` how many where the strong regularisers below hold the model back.
* the budget: a model must read enough characters in the time it is given to learn anything
  (``CHARS_PER_PARAMETER`` per parameter at least), and a larger one reads fewer, since its
  cost per character grows with its parameter count. The trainer times a training step during
  warm-up (``measure``): each candidate smaller than a reference model itself (small models use the
  cores less well than their multiply-adds say, and take moments to time), larger ones as the
  reference's time scaled by their cost. A model that reads the text ``MIN_PASSES`` times or
  more is never held back by the budget: the text's own limit then decides, whatever the
  machine's speed (on tiny-shakespeare's 15 minutes an Intel Xeon that trains a third slower than
  an AMD EPYC read 2x512 2.2 characters a parameter and chose 2x384: 1.5005 nats/char against
  2x512's 1.4668 on that machine, and an AMD EPYC Zen 3 where 2x512 reads it 3.8 times: 1.4708
  against 2x384's 1.4919; where the text is read less than once, on 100 MB of code, 2x512 reading
  1.2 a parameter lost to 2x384 reading 2.7).

Dropout then follows from how often the run will read each character: one pass over the text
cannot be memorised, many passes can (``dropout_for``). Past ``MANY_PASSES`` the regularisers that
slow learning start to pay (a 100 KB text read a thousand times): DropConnect on the recurrent
weights and locked dropout with input dropout (``STRONG``) come on as well, and where the vocabulary
is large, embedding dropout (``STRONG_LARGE_VOCABULARY``).

The constants come from measurements on several kinds of text; benchmarks/README.md has the
table. Pure functions apart from ``measure``; imports model only.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, replace

import torch

from ..lstm import ADAPTIVE_FROM, CharLSTM, ModelConfig

HIDDEN_SIZES = (128, 192, 256, 384, 512, 768, 1024, 1536)
PARAMETERS_PER_CHAR = 4.0       # the data's limit: at most this many parameters per training character,
STRONG_PARAMETERS_PER_CHAR = 16.0  # or this many where STRONG regularises the model (a small text read long)
CHARS_PER_PARAMETER = 2.5       # the budget's limit: the run reads at least this many characters per parameter,
MIN_PASSES = 3                  # or the text at least this many times (2x768 reading tiny-shakespeare 4.45
                                # times, 0.6 characters a parameter, was level with 2x512 reading it 9 times;
                                # on an AMD EPYC Zen 3 2x512 reading it 3.8 times beat 2x384 reading it 5.5
                                # times by 0.021 nats)
REFERENCE = (2, 512)            # timed during warm-up and scaled to sizes as costly or more (layers, hidden)
MANY_PASSES = 32                # from here on, STRONG regularisation too
STRONG = {"weight_dropout": 0.5, "locked_dropout": True, "input_dropout": 0.2}
# With a vocabulary of ADAPTIVE_FROM characters or more (Chinese, Japanese), each character is rare
# and its embedding row is memorised along with the text; dropping whole rows for a chunk pays there
# (0.1 MB of Chinese, 3 seeds each: 0.041 nats better at 0.3, 0.035 at 0.2, 0.015 at 0.1). With 65-100
# characters it drops a common letter from a whole chunk (tiny-shakespeare, at 0.1: worse), so no.
STRONG_LARGE_VOCABULARY = {"embed_dropout": 0.3}
REGULARISERS = (*STRONG, *STRONG_LARGE_VOCABULARY)      # the settings a user's own value overrides
TRAINING_SHARE = 0.8            # of a time budget, what goes to forward and backward passes (the rest:
                                # optimizer steps, validation, checkpoints)


@dataclass(frozen=True)
class SizeChoice:
    layers: int
    hidden_size: int
    dropout: float
    reason: str
    regularisers: dict = None          # STRONG's settings where the text will be read MANY_PASSES times


def layers_for(hidden_size: int) -> int:
    return 3 if hidden_size >= 1024 else 2


def cost_per_char(config: ModelConfig) -> float:
    """Relative training cost of one character: the weights it multiplies (an embedding lookup is
    free, the adaptive head costs about its shortlist) plus the per-step pointwise work."""
    E, H, L = config.embed_size, config.hidden_size, config.layers
    lstm = 4 * H * (E + H) + (L - 1) * 8 * H * H
    head = H * (min(config.vocab_size, config.cutoffs[0]) if config.head == "adaptive" else config.vocab_size)
    return lstm + head + 40 * L * H


def dropout_for(epochs: float) -> float:
    """0.05 for one pass over the text or less, 0.05 more for every doubling of the passes, at most
    0.5 (so 0.2 at about 8 passes: tiny-shakespeare's 15 minutes, where more regularisation measured
    worse; 0.35 at 64 passes, a small text trained long)."""
    if epochs <= 1:
        return 0.05
    return round(min(0.5, 0.05 + 0.05 * math.log2(epochs)) * 20) / 20


def parse_size(text: str) -> tuple[int, int] | None:
    """'auto' -> None; '2x512' -> (2, 512). Raises ValueError otherwise."""
    if text == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise ValueError(f"size must be auto or LAYERSxHIDDEN such as 2x512, got {text!r}")
    return int(match[1]), int(match[2])


def choose(base: ModelConfig, train_chars: int, budget_chars: callable, fixed: dict) -> SizeChoice:
    """The size for a text of train_chars characters.

    base: the configuration with everything but the size settled (vocabulary, embedding, head).
    budget_chars(config): how many characters the run will read with that model.
    fixed: the settings the user gave ("layers", "hidden_size", "dropout", and any of REGULARISERS),
    which always win.
    """
    def candidate(hidden: int) -> ModelConfig:
        config = replace(base, hidden_size=fixed.get("hidden_size", hidden),
                         layers=fixed.get("layers", layers_for(hidden)))
        config.resolve_head()
        return config

    def parameters_per_char(config: ModelConfig) -> float:
        # DropConnect at 0.5 with locked and input dropout lets a larger model learn a small text
        # without learning it by heart: at 0.1 MB 2x256 beat the 4-a-character 2x128 on prose and
        # Chinese and was level on code (benchmarks/README.md). Not where the user turned one off.
        strong = budget_chars(config) >= MANY_PASSES * train_chars and all(fixed.get(name, True)
                                                                            for name in STRONG)
        return STRONG_PARAMETERS_PER_CHAR if strong else PARAMETERS_PER_CHAR

    hiddens = [fixed["hidden_size"]] if "hidden_size" in fixed else HIDDEN_SIZES
    chosen, why = candidate(hiddens[0]), "the smallest size"
    for hidden in hiddens:
        config = candidate(hidden)
        params, reads = config.num_parameters(), budget_chars(config)
        limit = parameters_per_char(config)
        if params > limit * train_chars and hidden != hiddens[0]:
            passes = reads / max(1, train_chars)
            why = (f"the text limits it ({config.layers}x{config.hidden_size}, read {passes:.3g} times, would have "
                   f"more than {limit:g} parameters a training character)")
            break
        if reads < CHARS_PER_PARAMETER * params and reads < MIN_PASSES * train_chars and hidden != hiddens[0]:
            why = (f"the budget limits it ({config.layers}x{config.hidden_size} would read fewer than "
                   f"{CHARS_PER_PARAMETER:g} characters a parameter and the text fewer than {MIN_PASSES} times)")
            break
        chosen = config
        why = "the largest size tried"
    epochs = budget_chars(chosen) / max(1, train_chars)
    dropout = fixed.get("dropout", dropout_for(epochs))
    regularisers = {}
    if epochs >= MANY_PASSES:
        strong = {**STRONG, **(STRONG_LARGE_VOCABULARY if base.vocab_size >= ADAPTIVE_FROM else {})}
        regularisers = {name: value for name, value in strong.items() if name not in fixed}
    reason = (f"{chosen.num_parameters() / 1e6:.2f}M parameters for {train_chars:,} training characters, "
              f"about {budget_chars(chosen):,.0f} characters read ({epochs:.3g} passes): {why}")
    if regularisers:
        reason += "; many passes: " + ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in
                                                regularisers.items())
    return SizeChoice(chosen.layers, chosen.hidden_size, dropout, reason, regularisers)


def timed_config(base: ModelConfig, fixed: dict) -> ModelConfig:
    """The model whose step time is scaled to the sizes that cost as much or more: the user's own
    size where they gave it, else REFERENCE. Cheaper sizes are timed themselves."""
    layers, hidden = REFERENCE
    config = replace(base, hidden_size=fixed.get("hidden_size", hidden), layers=fixed.get("layers", layers))
    config.resolve_head()
    return config


def measure(config: ModelConfig, batch: tuple[torch.Tensor, torch.Tensor], matmul_dtype, device,
            steps: int = 3, untimed: int = 2) -> float:
    """Seconds per character and per unit of ``cost_per_char`` of a training step (forward and
    backward) of this model here: the fastest of ``steps`` steps after ``untimed`` ones. The first
    steps of a new model run slow (allocations, kernel choices; on AMD EPYC, 2x512 on
    tiny-shakespeare: 310-370 ms, 280-300, 255, then 230-250): the mean of the second and third,
    as this once took, read the model 10-20% slower than it trains, the whole of the rule's margin
    there, and some runs of that text chose 2x384 (0.026 nats worse). The caller's random
    generators are left as they were."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model = CharLSTM(replace(config)).to(device).train()
        model.lstm.matmul_dtype = matmul_dtype
        x, y = batch
        fastest = math.inf
        for i in range(untimed + steps):
            start = time.perf_counter()
            loss, _ = model(x, targets=y)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= untimed:
                fastest = min(fastest, time.perf_counter() - start)
    return fastest / x.numel() / cost_per_char(config)
