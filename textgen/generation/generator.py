"""The single-prompt generator: prime the model with a prompt once, then stream characters.

``Generator`` holds the carried ``(h, c)`` and the logits for the next
character, so a prompt, the text generated from it, a following paragraph and
the next interactive turn all continue one state; nothing already read is ever
run again. It generates through sampling.py's loop (``Decoding``, and ``decode_many``
where the C kernel runs: many characters per call, the same ones as one at a time).
"""
from __future__ import annotations

import random
from typing import Iterator

import torch

from ..lstm import CharLSTM, Stepper, State
from ..styles import NO_STYLE, style_id
from ..tokenizer import CharTokenizer
from .sampling import (Decoding, SampleConfig, decode_many, encode_text, next_tokens, opening_text)


class Generator:
    """A model, its vocabulary and a carried state: feed text in, stream characters out."""

    def __init__(self, model: CharLSTM, tokenizer: CharTokenizer, num_samples: int = 1,
                 seed: int | None = None, unknown: str = "error", warn=None, style: str | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.num_samples, self.unknown = num_samples, unknown
        self.warn = warn or (lambda message: None)
        self.device = next(model.parameters()).device
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.rng = torch.Generator().manual_seed(self.seed)
        self.stepper = Stepper(model)
        self.styles: torch.Tensor | None = None      # (num_samples,) the style of every row, or None: no style
        self.set_style(style)
        self.copy_index = None                   # the training text's CopyIndex, which --max-copy needs
        self._open = None      # a decode call's characters a stream has not all handed out yet (see _settle)
        self.reset()

    # The state and logits carried on. A stream that decoded many characters in one call but has handed out
    # only some when anything else reads or replaces these is first settled: taken back to what it handed out,
    # as one character at a time would have left them.
    @property
    def state(self) -> State:
        self._settle()
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        self._settle()
        self._state = state

    @property
    def logits(self) -> torch.Tensor | None:
        self._settle()
        return self._logits

    @logits.setter
    def logits(self, logits: torch.Tensor | None) -> None:
        self._settle()
        self._logits = logits

    def set_style(self, style: str | None) -> None:
        """Read and write in this style from now on (None: no style); a name the model lacks is a UsageError."""
        label = style_id(self.model.config.style_names, style)
        self.styles = None if label == NO_STYLE else torch.full((self.num_samples,), label, device=self.device)

    def reset(self) -> None:
        """Forget everything read so far."""
        self.state: State = self.model.initial_state(self.num_samples, device=self.device)
        self.logits: torch.Tensor | None = None
        self.copy_tails: list[list[int]] = [[] for _ in range(self.num_samples)]   # output since the last input

    def _encode(self, text: str) -> torch.Tensor:
        return encode_text(self.tokenizer, text, self.unknown, self.warn)

    @torch.no_grad()
    def feed(self, text: str, output: bool = False) -> None:
        """Read text into the carried state (all samples read the same text). output: the text is part of
        the output (a paragraph's closing newlines), so a verbatim run --max-copy watches goes on through it;
        other text read (a prompt, a turn) is the user's and starts the run afresh."""
        ids = self._encode(text)
        for tail in self.copy_tails:
            if output:
                tail.extend(ids.tolist())
            else:
                tail.clear()
        if len(ids) == 0:
            return
        tokens = ids.to(self.device).unsqueeze(0).expand(self.num_samples, -1)
        was_training = self.model.training
        self.model.eval()                    # no dropout when reading, even mid-training
        try:
            self.logits, self.state = self.model.read(tokens, self.state, styles=self.styles)  # in one pass
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def stream(self, config: SampleConfig, logprobs: int | None = None) -> Iterator[list]:
        """Yield one list of num_samples characters per step, carrying the state on.

        Stops after config.length steps or once every sample's output ends with config.stop (a
        sample's stop string is the last it yields; after it, its place in the list is None).
        config.style, where given, becomes the generator's style from here on.
        With logprobs (n), each character comes as a Scored: it and the n most likely, with their
        log-probabilities.
        """
        if config.style is not None:
            self.set_style(config.style)
        if self.logits is None:
            self.feed(opening_text(self.tokenizer))     # nothing read yet: start as text does
        decoding = Decoding(config, self.rng, self.num_samples, logprobs=logprobs, copy_index=self.copy_index,
                            copy_tails=self.copy_tails)
        chars = self.tokenizer.chars
        if logprobs is None and decoding.guard is None and self.stepper.decodes:
            yield from self._decoded(decoding)              # the same characters, many per C call
        while decoding.ended is None:
            ids = next_tokens(decoding.guarded(self.logits), config.temperature, config.top_k, config.top_p,
                              decoding.uniforms())
            scored = decoding.score(self.logits, ids, chars)
            self.logits, self.state = self.stepper(ids.to(self.device), self.state, self.styles)
            listed = ids.tolist()
            yield decoding.advance([chars[i] for i in listed], scored, listed)

    # A decode call's characters: at most this many per sample, and this many row-steps in all, so that a reader
    # of the stream waits a few milliseconds at most while a call's cost is spread over hundreds of characters.
    DECODE_STEPS, DECODE_ROW_STEPS = 256, 8192

    def _decoded(self, decoding: Decoding) -> Iterator[list]:
        """stream's loop with many characters per call (decode_many): the same characters, state and random
        numbers used as one step at a time. While a call's characters are being handed out, the generator
        holds the state after all of them; should anything else use the generator meanwhile, or the reader
        close the stream, it is first taken back to what was handed out (_settle), and a stream read on after
        that goes on from where the generator then stands, as one step at a time would. Returns where decode
        does not run (then stream steps on one character at a time)."""
        config, chars, N = decoding.config, self.tokenizer.chars, self.num_samples
        settings, rows = (config.temperature, config.top_k, config.top_p), list(range(N))
        most = max(1, min(self.DECODE_STEPS, self.DECODE_ROW_STEPS // N))
        while decoding.ended is None:
            start = (self.logits, self.state, self.rng.get_state())
            decoded = decode_many(self.stepper, self._logits, self._state, self.styles, settings, [(decoding, rows)],
                                  min(most, config.length - decoding.produced), chars)
            if decoded is None:
                return
            drawn, self._logits, self._state = decoded
            call = [start, decoding, 0, len(drawn)]          # [start, decoding, handed out, drawn]
            self._open = call
            for listed in drawn:
                call[2] += 1
                if call[2] == call[3]:
                    self._open = None                        # all handed out: the state is this one's
                try:
                    yield decoding.advance([chars[i] for i in listed], None, listed)
                except GeneratorExit:
                    self._settle(call)
                    raise
                if self._open is not call and call[2] < call[3]:
                    break                                    # settled meanwhile: go on from where it stands

    def _settle(self, call: list | None = None) -> None:
        """Take an open decode call (call, or whichever is open) back to the characters it handed out: redo
        it from its start (logits, state, random state) for only those steps."""
        if self._open is None or (call is not None and self._open is not call):
            return
        (logits, state, rng_state), decoding, handed, _ = self._open
        self._open = None
        config = decoding.config
        self.rng.set_state(rng_state)
        self._logits, self._state = logits, state
        if handed:
            _, self._logits, self._state = self.stepper.decode(
                logits, state, self.styles, config.temperature, config.top_k, config.top_p,
                decoding.uniforms(handed), [], [False] * self.num_samples)

    def generate(self, config: SampleConfig) -> list[str]:
        """The generated continuations (without the text fed), one string per sample."""
        pieces = [[] for _ in range(self.num_samples)]
        for chars in self.stream(config):
            for piece, ch in zip(pieces, chars):
                if ch is not None:
                    piece.append(ch)
        return ["".join(p) for p in pieces]


def sample(model: CharLSTM, tokenizer: CharTokenizer, prompt: str = "", config: SampleConfig | None = None,
           unknown: str = "error") -> list[str]:
    """Prompt in, continuations out: the one-call form used by training and the API."""
    config = config or SampleConfig()
    gen = Generator(model, tokenizer, num_samples=config.num_samples, seed=config.seed, unknown=unknown,
                    style=config.style)
    if prompt:
        gen.feed(prompt)
    return gen.generate(config)
