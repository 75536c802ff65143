"""OpenAI's completions protocol, spoken by `textgen serve` beside its own: what clients already know.

    GET  /v1/models            {"object": "list", "data": [{"id", "object": "model", "created", "owned_by"}]}
    GET  /v1/models/{model}
    POST /v1/completions       {"model", "prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed",
                                "stream", "stream_options", "logprobs", "echo", "user", and textgen's "top_k"
                                and "unknown"}
    POST /tokenize, /detokenize, GET /tokenizer_info   the character vocabulary, as vLLM serves it, so that
                               lm-evaluation-harness (tokenizer_backend=remote) counts characters as tokens

Here is the protocol alone: a request read into textgen's own settings (`SampleConfig`, one `Job` per
prompt), the response, chunk and error shapes, and a stream of server-sent events. The work is the
batching engine's and the one generation loop's (`sampling.Decoding`), exactly as for the native API;
`http_app` routes the paths here and keeps the Host, Origin, key and size checks for both.

A token is a character. `max_tokens` counts characters, `logprobs` n gives the n most likely characters
at each step, and the figures are the model's own (temperature 1, before top-k and top-p), as OpenAI
reports them. With `echo` the prompt comes back before the completion and, with `logprobs`, every
prompt character after the first is scored (`max_tokens` 0 generates nothing): lm-evaluation-harness's
loglikelihood. A stop string ends a choice and is left out of its text, as OpenAI does; while streaming,
characters that may be the start of one are held back until they are known not to be.

Imports batching, errors, sampling, server and tokenizer; never starlette (http_app turns these into
responses).
"""
from __future__ import annotations

import asyncio
import json
import secrets
import time
from dataclasses import dataclass, field

from ..generation.jobs import Job, arrived
from ..errors import SettingError, UsageError, check_range
from ..generation.sampling import MAX_LOGPROBS, MAX_SAMPLES, SampleConfig, Scored, opening_text
from .server import Limits, check_prompt, check_text
from ..tokenizer import CharTokenizer

TOKENIZER_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")
MAX_STOPS = 4                               # OpenAI's limit
MAX_PROMPTS = 64                            # prompts in one request (each is a job of n rows)
DEFAULT_MAX_TOKENS = 16                     # OpenAI's defaults where textgen's differ (temperature 0.8, length 500)
DEFAULT_TEMPERATURE = 1.0

# textgen's setting -> the request field that sets it here
PARAMS = {"length": "max_tokens", "num_samples": "n"}

# Fields OpenAI defines that change nothing at this value, and are refused at any other.
NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",), "best_of": (1,)}
FIELDS = {"model": (str,), "prompt": (str, list), "max_tokens": (int,), "temperature": (int, float),
          "top_p": (int, float), "n": (int,), "stop": (str, list), "seed": (int,), "stream": (bool,),
          "stream_options": (dict,), "logprobs": (int,), "echo": (bool,), "user": (str,), "top_k": (int,),
          "unknown": (str,), **{name: (type(values[0]),) for name, values in NEUTRAL.items()}}


def serves(path: str) -> bool:
    """Whether this protocol answers at path (and its errors take OpenAI's shape there)."""
    return path.startswith("/v1/") or path in TOKENIZER_PATHS


class OpenAIError(Exception):
    """A request answered with an error in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def words(name: str, value) -> str:
    """A setting as this protocol names it ("max_tokens" for textgen's length), for Worded messages."""
    shown = json.dumps(PARAMS.get(name, name))
    return shown if value is ... else f"{shown}: {json.dumps(value)}"


def as_error(error: UsageError) -> OpenAIError:
    """textgen's own refusal (a setting out of range, a character the model never saw), in this protocol's words."""
    param = PARAMS.get(error.field, error.field) if isinstance(error, SettingError) else \
        next(iter(error.mentions), None)
    return OpenAIError(400, error.worded(words), param, "invalid_value" if param else None)


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------

@dataclass
class Completion:
    """A /v1/completions request in textgen's terms."""
    model: str | None
    prompts: list                           # each a str, or a list of token ids (characters' ids)
    config: SampleConfig                    # length = max_tokens (0 allowed), num_samples = n
    stops: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    unknown: str = "error"
    id: str = field(default_factory=lambda: "cmpl-" + secrets.token_urlsafe(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def jobs(self, tokenizer: CharTokenizer, limits: Limits) -> list[Job]:
        """One job per prompt, each with n samples; a prompt given as token ids is read as its characters."""
        jobs = []
        for prompt in self.prompts:
            if not isinstance(prompt, str):
                bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
                if bad:
                    raise OpenAIError(400, f"token {bad[0]} is not in the model's vocabulary of "
                                           f"{tokenizer.vocab_size} (ids 0 to {tokenizer.vocab_size - 1})", "prompt")
                prompt = "".join(tokenizer.chars[t] for t in prompt)
            check_prompt(prompt, limits)
            jobs.append(Job(prompt, self.config, self.unknown, stops=self.stops, logprobs=self.logprobs,
                            echo=self.echo))
        return jobs


def _kind_ok(value, kinds) -> bool:
    return any(isinstance(value, k) for k in kinds) and (bool in kinds or not isinstance(value, bool))


def parse_completion(body, limits: Limits) -> Completion:
    """A /v1/completions body -> Completion; OpenAIError (400, naming the field) for anything wrong."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key not in FIELDS:
            raise OpenAIError(400, f"unrecognized request argument supplied: {key}", key, "unknown_parameter")
        if value is not None and not _kind_ok(value, FIELDS[key]):
            kinds = " or ".join({"str": "a string", "list": "a list", "int": "an integer", "float": "a number",
                                 "bool": "true or false", "dict": "an object"}[k.__name__] for k in FIELDS[key])
            raise OpenAIError(400, f"{key} must be {kinds}, got {json.dumps(value)[:40]}", key, "invalid_type")
        if key in NEUTRAL and value is not None and value not in NEUTRAL[key]:
            raise OpenAIError(400, f"{key} is not supported here (only {json.dumps(NEUTRAL[key][0])})", key,
                              "unsupported_value")
    get = lambda key, default=None: default if body.get(key) is None else body[key]    # noqa: E731
    prompts = _prompts(get("prompt", ""))
    stops = _stops(body.get("stop"))
    logprobs = body.get("logprobs")
    max_tokens = get("max_tokens", DEFAULT_MAX_TOKENS)
    try:
        check_range("logprobs", logprobs, 0, MAX_LOGPROBS, f"a whole number from 0 to {MAX_LOGPROBS}")
        check_range("length", max_tokens, 0, limits.max_length, f"from 0 to {limits.max_length:,} characters on "
                                                               f"this server")
        config = SampleConfig(length=max(1, max_tokens), temperature=float(get("temperature", DEFAULT_TEMPERATURE)),
                              top_k=body.get("top_k"), seed=body.get("seed"), num_samples=get("n", 1),
                              top_p=None if body.get("top_p") is None else float(body["top_p"]))
        config.validate()
    except UsageError as e:
        raise as_error(e) from None
    except OverflowError:                   # an integer too large for a float
        raise OpenAIError(400, "temperature and top_p must be finite numbers", "temperature") from None
    config.length = max_tokens              # 0 reads (and with echo, scores) the prompt and generates nothing
    if config.top_k is not None:
        config.top_k = min(config.top_k, 0x110000)          # no vocabulary is larger than Unicode
    if len(prompts) * config.num_samples > MAX_SAMPLES:
        raise OpenAIError(400, f"too many choices: prompts times n must be at most {MAX_SAMPLES:,}", "n")
    unknown = get("unknown", "error")
    if unknown not in ("error", "skip"):
        raise OpenAIError(400, f"unknown must be 'error' or 'skip', got {unknown!r}", "unknown")
    options = get("stream_options", {})
    if set(options) - {"include_usage"}:
        raise OpenAIError(400, f"stream_options takes include_usage only, got {sorted(options)}", "stream_options")
    return Completion(body.get("model"), prompts, config, stops, logprobs, get("echo", False), get("stream", False),
                      bool(options.get("include_usage")), unknown)


def _prompts(prompt) -> list:
    """OpenAI's four forms: a string, a list of strings, a list of token ids, a list of lists of them."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError(400, "prompt must not be an empty list", "prompt")
    if all(_kind_ok(t, (int,)) for t in prompt):
        return [prompt]
    if not all(isinstance(p, str) or (isinstance(p, list) and all(_kind_ok(t, (int,)) for t in p)) for p in prompt):
        raise OpenAIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of "
                               "lists of them", "prompt")
    if len(prompt) > MAX_PROMPTS:
        raise OpenAIError(400, f"{len(prompt)} prompts in one request; this server takes at most {MAX_PROMPTS}",
                          "prompt")
    return list(prompt)


def _stops(stop) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them", "stop")
    for s in stops:
        check_text("stop", s)
    return tuple(stops)


# ---------------------------------------------------------------------------
# One choice's text, as OpenAI gives it
# ---------------------------------------------------------------------------

class Choice:
    """One sample of one prompt: the characters (with their scores, where asked) released so far and
    those held back because they may be the start of a stop string; the stop string itself is never
    released, as OpenAI leaves it out."""

    def __init__(self, index: int, stops: tuple[str, ...]):
        self.index, self.stops = index, stops
        self.held: list[tuple[str, Scored | None]] = []
        self.generated = 0                  # characters the model drew for this choice, the stop string's too
        self.finish_reason: str | None = None
        self.offset = 0                     # where the next released character stands in the choice's text

    def add(self, value) -> list[tuple[str, Scored | None]]:
        """A drawn character (a str, or a Scored); what can now be released."""
        self.generated += 1
        self.held.append((value, None) if isinstance(value, str) else (value.char, value))
        text = "".join(ch for ch, _ in self.held)
        if any(text.endswith(s) for s in self.stops):
            self.finish_reason = "stop"     # the engine's Decoding stops this sample here too
            return []
        keep = max((k for s in self.stops for k in range(1, min(len(s), len(text)) + 1) if s.startswith(text[-k:])),
                   default=0)
        released, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        return released

    def finish(self) -> list[tuple[str, Scored | None]]:
        """The job ended: what is still held, less the stop string that ended the choice."""
        if self.finish_reason == "stop":
            text = "".join(ch for ch, _ in self.held)
            cut = max(len(s) for s in self.stops if text.endswith(s))
            released = self.held[:len(self.held) - cut]
        else:
            self.finish_reason, released = "length", self.held
        self.held = []
        return released

    def logprobs(self, entries: list[tuple[str, Scored | None]]) -> dict:
        """OpenAI's logprobs object for entries that continue the text at self.offset."""
        block = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ch, scored in entries:
            block["tokens"].append(ch)
            block["token_logprobs"].append(None if scored is None else scored.logprob)
            block["top_logprobs"].append(None if scored is None else dict(scored.top))
            block["text_offset"].append(self.offset)
            self.offset += len(ch)
        return block


def _prompt_entries(job: Job, scored: list[Scored] | None) -> list[tuple[str, Scored | None]]:
    """The echoed prompt as entries: its first character unscored (nothing predicts it), the rest scored."""
    if not job.prompt:
        return []
    if scored is None:
        return [(ch, None) for ch in job.prompt]
    return [(job.prompt[0], None)] + [(s.char, s) for s in scored]


class Completing:
    """The choices of one request's jobs, filled as their events arrive (choice index = prompt * n + sample)."""

    def __init__(self, request: Completion, jobs: list[Job], model: str):
        self.request, self.jobs, self.model = request, jobs, model
        n = request.config.num_samples
        self.choices = [[Choice(p * n + s, request.stops) for s in range(n)] for p in range(len(jobs))]
        self.failure: tuple[int, str] | None = None     # (status, sentence) where a job ended badly

    def start(self) -> list[tuple[Choice, list]]:
        """The echoed prompts where no scores are asked for (with logprobs, they come scored, in take)."""
        if not self.request.echo or self.request.logprobs is not None:
            return []
        return [(choice, _prompt_entries(job, None)) for job, choices in zip(self.jobs, self.choices)
                for choice in choices]

    def take(self, events: list[tuple[int, tuple]]) -> list[tuple[Choice, list | None]]:
        """Events of the jobs, (job index, event) -> (choice, entries released) pairs in order; a choice
        that has finished is followed by a (choice, None) pair."""
        out = []
        for p, (kind, value) in events:
            job, choices = self.jobs[p], self.choices[p]
            if kind == "prompt":
                if self.request.echo:
                    out += [(choice, _prompt_entries(job, value)) for choice in choices]
            elif kind == "warning":
                self.failure = (500, value)
            elif kind == "end":
                if value in ("error", "shutdown", "stopped"):
                    self.failure = (503, "the server is shutting down; try again shortly") if value == "shutdown" \
                        else (500, f"the generation failed: {self.failure[1] if self.failure else value}")
                for choice in choices:
                    out += [(choice, choice.finish()), (choice, None)]
            else:
                out.append((choices[kind], choices[kind].add(value)))
        return out

    def usage(self) -> dict:
        prompt = sum(len(job.prompt) for job in self.jobs)
        completion = sum(choice.generated for choices in self.choices for choice in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def head(self) -> dict:
        return {"id": self.request.id, "object": "text_completion", "created": self.request.created,
                "model": self.model}

    def choice_body(self, choice: Choice, entries: list, finished: bool) -> dict:
        logprobs = choice.logprobs(entries) if self.request.logprobs is not None else None
        return {"text": "".join(ch for ch, _ in entries), "index": choice.index, "logprobs": logprobs,
                "finish_reason": choice.finish_reason if finished else None}


def _failed(completing: Completing) -> OpenAIError | None:
    if completing.failure is None or not any(job.reason in ("error", "shutdown") for job in completing.jobs):
        return None
    status, message = completing.failure
    return OpenAIError(status, message, code="overloaded" if status == 503 else None)


async def complete(completing: Completing) -> dict:
    """Wait for every job of the request; the whole response."""
    entries = {choice.index: [] for choices in completing.choices for choice in choices}
    pairs = completing.start()
    while True:
        for choice, released in pairs:
            entries[choice.index] += released or []
        events = await arrived(completing.jobs)
        if not events:
            break
        pairs = completing.take(events)
    error = _failed(completing)
    if error is not None:
        raise error
    choices = [completing.choice_body(choice, entries[choice.index], True)
               for row in completing.choices for choice in row]
    return {**completing.head(), "choices": choices, "usage": completing.usage()}


def sse(payload) -> bytes:
    return b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"


async def chunks(completing: Completing, interval: float):
    """The response as server-sent events: `data: {chunk}` lines, one chunk per choice that has news, at
    most every interval seconds, a usage chunk where stream_options asks for it, then `data: [DONE]`."""
    usage = {"usage": None} if completing.request.include_usage else {}
    pairs = completing.start()
    while True:
        news: dict[int, tuple[Choice, list, bool]] = {}
        for choice, released in pairs:
            _, entries, finished = news.get(choice.index, (choice, [], False))
            news[choice.index] = (choice, entries + (released or []), finished or released is None)
        out = b"".join(sse({**completing.head(), "choices": [completing.choice_body(choice, entries, finished)],
                            **usage})
                       for choice, entries, finished in news.values() if entries or finished)
        events = await arrived(completing.jobs)
        error = _failed(completing) if not events else None
        if error is not None:
            yield out + sse(error_body(error.status, str(error), code=error.code))
            return
        if not events:
            if completing.request.include_usage:
                out += sse({**completing.head(), "choices": [], "usage": completing.usage()})
            yield out + sse(b"[DONE]")
            return
        if out:
            yield out
        pairs = completing.take(events)
        await asyncio.sleep(interval)                   # let characters gather: fewer, larger writes


# ---------------------------------------------------------------------------
# Models and the vocabulary
# ---------------------------------------------------------------------------

def model_card(name: str, created: float) -> dict:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "textgen"}


def tokenizer_info(name: str, tokenizer: CharTokenizer) -> dict:
    """What lm-evaluation-harness's remote tokenizer reads: no end-of-text token (a character model has
    none); the text a generation reads when given nothing stands for the beginning."""
    return {"model": name, "tokenizer_class": "textgen.CharTokenizer", "vocab_size": tokenizer.vocab_size,
            "eos_token": None, "bos_token": opening_text(tokenizer), "pad_token": None}


def tokenize(body, tokenizer: CharTokenizer, limits: Limits) -> dict:
    text = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(text, str):
        raise OpenAIError(400, "send {\"prompt\": text}", "prompt")
    check_text("prompt", text)
    missing = tokenizer.unknown_chars(text)
    if missing:
        raise OpenAIError(400, f"{len(missing)} character(s) not in the model's vocabulary: {missing[:20]!r}", "prompt")
    tokens = tokenizer.encode(text).tolist()
    return {"tokens": tokens, "count": len(tokens), "max_model_len": limits.max_prompt}


def detokenize(body, tokenizer: CharTokenizer) -> dict:
    tokens = body.get("tokens") if isinstance(body, dict) else None
    if not isinstance(tokens, list) or not all(_kind_ok(t, (int,)) and 0 <= t < tokenizer.vocab_size for t in tokens):
        raise OpenAIError(400, f"send {{\"tokens\": [ids from 0 to {tokenizer.vocab_size - 1}]}}", "tokens")
    return {"prompt": "".join(tokenizer.chars[t] for t in tokens)}
