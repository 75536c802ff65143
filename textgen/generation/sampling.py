"""Sampling: a request's settings, the draw of each next character, and the loop every generation runs.

Sampling draws with an explicit ``torch.Generator`` seeded by the user, on
the CPU, so the same seed and checkpoint give the same text on every run on
the same machine and path (tested). Another CPU, thread count, device or
pointwise path (C kernel or PyTorch ops) may round a logit differently in its
last bits, and that can change a character where two are nearly tied.

The loop itself is ``Decoding`` (a request's settings, random stream, count, stop tracking and, where
asked, the log-probabilities of what was drawn) with ``next_tokens`` (probabilities to a draw), or
``decode_many`` (many characters per C call, the same ones): generator.py's ``Generator`` drives it for
one prompt, and the server's batching engine for many requests at once (its native API and its
OpenAI-compatible one alike), so they cannot drift apart.

Log-probabilities (``scores``) are the model's own: natural logs of the softmax of the very logits the
character was drawn from, at temperature 1 and before top-k and top-p cut anything, as OpenAI's API
reports them and as ``textgen-eval`` scores text. The temperature and the cuts change which character
is drawn, never the figures reported for it.

``--max-copy`` (``copy_index.CopyGuard``) acts inside that loop too: before each draw a row's
characters that would extend a verbatim run of the training text past N get probability 0.

Imports model, tokenizer, settings and errors (copy_index for --max-copy); never training or cli.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import settings
from ..errors import SettingError, UsageError, check_range
from ..settings import setting
from ..lstm import sample_rows
from ..tokenizer import CharTokenizer, UnknownCharactersError, escape_char


MAX_SAMPLES = 100_000            # samples are drawn as one batch: their states must fit in memory
MAX_LOGPROBS = 20                # alternatives reported per character (OpenAI's chat API allows 20 too)
# Longer requests are almost always a typo (and would run for hours); a loop of calls has no limit.
MAX_LENGTH = 100_000_000


@dataclass
class SampleConfig:
    """How to sample. Each field is a setting declared once, with its default, its help and its range:
    generate.py's flags, the API's arguments and the server's JSON fields are all built from them."""
    length: int = setting(500, "characters to generate (per paragraph or turn)", low=1, high=MAX_LENGTH,
                          within=f"from 1 to {MAX_LENGTH:,} characters")
    temperature: float = setting(0.8, "0 = always the most likely character; else from 1e-6 to 1e6")
    top_k: int | None = setting(None, "sample only from the k most likely characters", low=1, within="at least 1")
    top_p: float | None = setting(None, "sample only from the nucleus of this probability mass (the most likely "
                                  "character always stays)", low=0, high=1, low_open=True, within="in (0, 1]")
    seed: int | None = setting(None, "same seed, same checkpoint, same text on the same machine (default: random, "
                               "printed)", low=0, high=2**63 - 1, within="a whole number from 0 to 2**63 - 1")
    num_samples: int = setting(1, "independent samples, drawn as a batch (separated by ---)", low=1,
                               high=MAX_SAMPLES, within=f"from 1 to {MAX_SAMPLES:,}")
    stop: str | None = setting(None, "end the output once it ends with this string")
    style: str | None = setting(None, "write in this style, one of those a model trained with styles learnt (textgen "
                                "info lists them); the prompt is read in it too")
    max_copy: int | None = setting(None, "never let the output repeat more than this many characters of the "
                                   "training text verbatim: characters that would are removed from the "
                                   "distribution before each draw", low=1, high=MAX_LENGTH,
                                   within=f"from 1 to {MAX_LENGTH:,} characters", metavar="N")

    def validate(self) -> None:
        """SettingError naming the field for a value out of its range. A temperature outside
        [MIN_TEMPERATURE, MAX_TEMPERATURE] breaks float32 (1e-40 divides a logit into infinity,
        1e308 does not fit at all), so it is refused before any work, as NaN is."""
        settings.check(self)
        check_range("temperature", self.temperature, 0, MAX_TEMPERATURE, TEMPERATURE_RANGE)
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise SettingError("temperature", f"must be {TEMPERATURE_RANGE}, got {self.temperature:g}")
        if self.stop == "":
            raise SettingError("stop", "must not be empty")
        if self.style == "":
            raise SettingError("style", "must not be empty")


# 0 is greedy; between these, any temperature keeps every logit / temperature finite in float32.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6
TEMPERATURE_RANGE = "0 (greedy) or from 1e-6 to 1e6"


def next_token_probs(logits: torch.Tensor, temperature, top_k=None, top_p=None) -> torch.Tensor:
    """The distribution to draw the next token from, (N, V) logits -> (N, V) probabilities.

    temperature 0 puts all mass on the argmax; top_k keeps the k most likely
    tokens; top_p keeps the nucleus: the fewest most-likely tokens whose
    probability sums to at least top_p. Each setting is one number for every row,
    or an (N,) tensor of one per row (the server's batch mixes requests; there a
    top_k of V or more and a top_p of 1 mean no cut). Rows never mix: a row's
    result is the same whatever the other rows hold.
    """
    logits = logits.float()
    N, V = logits.shape
    # The same arithmetic for one setting as for one per row (a division by an (N, 1) tensor, never
    # by a Python number, which PyTorch turns into a multiplication by its reciprocal), so a request
    # gets the same numbers whether it is sampled alone or in the server's mixed batch.
    if isinstance(temperature, (int, float)):
        if temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), V).float()
        probs = torch.softmax(logits / logits.new_full((N, 1), float(temperature)), dim=-1)
    else:
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=logits.device).expand(N)
        greedy = temperature == 0
        probs = torch.softmax(logits / torch.where(greedy, 1.0, temperature).unsqueeze(1), dim=-1)
        if bool(greedy.any()):
            one_hot = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
            probs = torch.where(greedy.unsqueeze(1), one_hot, probs)
    cut_k = top_k is not None and (top_k < V if isinstance(top_k, int) else bool((torch.as_tensor(top_k) < V).any()))
    cut_p = top_p is not None and (top_p < 1 if isinstance(top_p, (int, float)) else
                                   bool((torch.as_tensor(top_p) < 1).any()))
    if cut_k or cut_p:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        keep_sorted = torch.ones_like(sorted_probs, dtype=torch.bool)
        if cut_k:
            k = torch.as_tensor(top_k, device=logits.device).expand(N).clamp(1, V)
            kth = sorted_probs.gather(1, (k - 1).unsqueeze(1))
            keep_sorted &= sorted_probs >= kth
        if cut_p:
            p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(N).unsqueeze(1)
            mass_before = sorted_probs.cumsum(-1) - sorted_probs
            keep_sorted &= (mass_before < p * sorted_probs.sum(-1, keepdim=True)) | (p >= 1)
        keep_sorted[:, 0] = True        # the most likely token always stays: a top-p of 1e-300 is greedy, not empty
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        probs = torch.where(keep, probs, 0.0)
    return probs / probs.sum(-1, keepdim=True)


def uniforms(n: int, generator: torch.Generator) -> torch.Tensor:
    """n uniform numbers in [0, 1) from the user's seeded generator: the randomness of one step."""
    return torch.rand(n, generator=generator, dtype=torch.float64)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row by inverting each row's cumulative distribution at u (one number per row).

    The draw is the same wherever the model runs, and a row's token depends only on its own
    probabilities and number; a token of probability 0 is never drawn.
    """
    cdf = probs.detach().cpu().double().cumsum(-1)
    target = u.to(cdf.dtype).unsqueeze(1) * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def next_tokens(logits: torch.Tensor, temperature, top_k, top_p, u: torch.Tensor) -> torch.Tensor:
    """One draw per row: the distribution the settings give (next_token_probs), inverted at u.

    The C kernel's sample_rows computes this in one call where it runs (a CPU float32 model), here
    and in the batching server alike, so a seed's text does not depend on which of them serves it;
    next_token_probs and draw stay the reference it is tested against."""
    ids = sample_rows(logits, temperature, top_k, top_p, u)
    return ids if ids is not None else draw(next_token_probs(logits, temperature, top_k, top_p), u)


class Scored(NamedTuple):
    """A character with the model's log-probability of it and of the most likely characters at its step."""
    char: str
    logprob: float                          # natural log; 0 is certain
    top: list[tuple[str, float]]            # the n most likely (character, logprob), most likely first


def scores(logits: torch.Tensor, ids: torch.Tensor, n: int, chars: str) -> list[Scored]:
    """Per row of logits (N, V): the log-probability of the token ids[row] and the n most likely tokens,
    under the model's own distribution (temperature 1, no cut). Ties list the lower id first."""
    logp = torch.log_softmax(logits.float(), dim=-1)                        # (N, V)
    chosen = logp.gather(1, ids.to(logp.device).view(-1, 1)).squeeze(1).tolist()
    values, order = logp.sort(dim=-1, descending=True, stable=True)
    k = min(n, logp.shape[-1])
    values, order = values[:, :k].tolist(), order[:, :k].tolist()
    return [Scored(chars[token], lp, [(chars[j], v) for j, v in zip(row_ids, row_values)])
            for token, lp, row_ids, row_values in zip(ids.tolist(), chosen, order, values)]


class Decoding:
    """What one request's rows carry from step to step besides the model's state: its settings, its
    random stream, how many characters it has made, which samples have met a stop string and, where
    asked, the log-probabilities of what each drew.

    The single-prompt Generator and the server's batching engine both generate through it, so a stop
    string ends each sample alike, one sample or several, alone or in a crowd.

    stops: the strings that end a sample (default: config.stop; the OpenAI API passes up to 4);
    logprobs: how many alternatives to score per character (None: no scores); copy_index and
    copy_tails: the training text's index and each sample's last ids so far, which --max-copy needs.
    """

    def __init__(self, config: SampleConfig, rng: torch.Generator, samples: int, stops: tuple[str, ...] | None = None,
                 logprobs: int | None = None, copy_index=None, copy_tails: list[list[int]] | None = None):
        self.config, self.rng, self.samples, self.logprobs = config, rng, samples, logprobs
        self.stops = tuple(stops) if stops is not None else ((config.stop,) if config.stop else ())
        self.tail_length = max(map(len, self.stops), default=0)
        self.produced = 0                          # characters per sample so far
        self.tails = [""] * samples                # the last tail_length characters of each sample
        self.stopped = [False] * samples
        self.guard = None
        if config.max_copy is not None:
            if copy_index is None:
                raise UsageError("{max_copy} needs the training text's copy index, and this model has none",
                                 max_copy=...)
            from ..copy_index import CopyGuard
            # copy_tails: each sample's last generated ids so far, carried on from an earlier call's output.
            self.guard = CopyGuard(copy_index, config.max_copy, samples, copy_tails)

    def guarded(self, logits: torch.Tensor) -> torch.Tensor:
        """The rows' logits with what --max-copy forbids at -inf (as they are without it)."""
        return logits if self.guard is None else self.guard.mask(logits)

    def uniforms(self, steps: int = 1) -> torch.Tensor:
        """The random numbers of the next steps, one per sample each, step after step (in bulk, the same
        numbers as one step at a time)."""
        return uniforms(steps * self.samples, self.rng)

    def stop_ends(self, chars: str) -> list[int] | None:
        """The ids of the stop strings' last characters, after which a stop may have been met (None where a
        stop string is empty, met after any character)."""
        if "" in self.stops:
            return None
        return sorted({chars.index(stop[-1]) for stop in self.stops if stop[-1] in chars})

    def score(self, logits: torch.Tensor, ids: torch.Tensor, chars: str) -> list[Scored] | None:
        """This step's scores of the drawn ids (one per sample) from the logits they were drawn from;
        None unless the request asked for log-probabilities."""
        return None if self.logprobs is None else scores(logits, ids, self.logprobs, chars)

    def advance(self, chars: list[str], scored: list[Scored] | None = None, ids: list[int] | None = None) -> list:
        """Take one step's characters (and their ids, which --max-copy needs), one per sample; what each
        sample shows: its character, or its Scored where scores are given, or None for one that has
        already met a stop string (its row goes on stepping, its text has ended)."""
        self.produced += 1
        if self.guard is not None:
            self.guard.push(ids)
        shown = []
        for i, ch in enumerate(chars):
            if self.stopped[i]:
                shown.append(None)
                continue
            shown.append(ch if scored is None else scored[i])
            if self.stops:
                self.tails[i] = (self.tails[i] + ch)[-self.tail_length:]
                self.stopped[i] = any(self.tails[i].endswith(stop) for stop in self.stops)
        return shown

    @property
    def ended(self) -> str | None:
        """"stop" once every sample met its stop string, "length" once the length is reached, else None."""
        if all(self.stopped):
            return "stop"
        return "length" if self.produced >= self.config.length else None


def decode_many(stepper, logits: torch.Tensor, state, styles, settings: tuple, parts: list[tuple[Decoding, list[int]]],
                steps: int, chars: str) -> tuple[list[list[int]], torch.Tensor, tuple] | None:
    """Up to `steps` characters for every row of logits (N, V) in one C call (Stepper.decode), each what one
    next_tokens draw and one step would give: the rows of one request or several (parts: each request's
    Decoding and its rows), settings (temperature, top_k, top_p) as next_tokens takes them. Each request's
    random numbers are drawn in bulk from its own generator, and those the call did not use are given back,
    so its stream goes on as one step at a time leaves it. The call returns early after a character that may
    end a stop string; every newly stopped sample is therefore at the last step. Returns (the ids drawn, one
    list of N per step; the logits and state after them), or None where the stepper does not decode these
    (nothing drawn)."""
    ends = [decoding.stop_ends(chars) for decoding, _ in parts]
    if None in ends:                                 # an empty stop string is met after any character
        steps = 1
    u = logits.new_empty(steps, logits.shape[0], dtype=torch.float64, device="cpu")
    watch = [False] * logits.shape[0]
    starts = []
    for decoding, rows in parts:
        starts.append(decoding.rng.get_state())
        u[:, rows] = decoding.uniforms(steps).view(steps, len(rows))
        for sample, row in enumerate(rows):
            watch[row] = not decoding.stopped[sample]
    decoded = stepper.decode(logits, state, styles, *settings, u.view(-1),
                             sorted({end for found in ends if found for end in found}), watch)
    for (decoding, _), start in zip(parts, starts):
        if decoded is None or len(decoded[0]) < steps:        # give back the numbers not used
            decoding.rng.set_state(start)
            if decoded is not None:
                decoding.uniforms(len(decoded[0]))
    return None if decoded is None else (decoded[0].tolist(), decoded[1], decoded[2])


def opening_ids(tokenizer: CharTokenizer, ids: torch.Tensor, logits) -> torch.Tensor:
    """What to read before generating: the prompt's ids, or, with nothing read at all, the opening
    text (a newline where the model knows one), as text starts."""
    if len(ids) == 0 and logits is None:
        return encode_text(tokenizer, opening_text(tokenizer))
    return ids


def encode_text(tokenizer: CharTokenizer, text: str, unknown: str = "error", warn=None) -> torch.Tensor:
    """Text to ids; characters the model never saw are an error, or with unknown="skip" left out with a warning."""
    missing = tokenizer.unknown_chars(text)
    if missing:
        if unknown != "skip":
            raise UsageError(str(UnknownCharactersError(missing, tokenizer.vocab_size))
                             + "; pass {unknown} to leave them out", unknown="skip")
        if warn:
            warn("leaving out character(s) the model never saw: " + " ".join(escape_char(ch) for ch in missing))
        text = "".join(ch for ch in text if ch not in set(missing))
    return torch.from_numpy(tokenizer.encode(text).astype("int64"))


def opening_text(tokenizer: CharTokenizer) -> str:
    """What generation reads when given nothing: a newline if the model knows one, as text starts."""
    return "\n" if "\n" in tokenizer.chars else tokenizer.chars[0]
