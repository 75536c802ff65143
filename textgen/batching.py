"""Continuous batching: many generation requests on one model, stepped together as one batch.

A ``BatchingEngine`` owns a fixed number of slots (rows of one batch); a ``Scheduler`` steps
every engine that has work, in turn, on the one thread that runs it (the server's main thread:
on a few cores PyTorch's threads run markedly faster called from there, and models that take
turns beat models fighting over the cores). A job's events go out through a queue that can wake
an asyncio reader, so the server's event loop never blocks on the model.
A request (a ``Job``) waits in a bounded queue until enough slots are free, joins the
running batch at the next character, and leaves it when it ends, is stopped or its client
goes away; the others never wait for it. Each step draws one character for every busy row.

The batch always has the same number of rows, busy or not. Matrix libraries pick their
algorithm by the shape of a product, so the same row can round differently in a batch of 1
and a batch of 5; with the shape fixed, and sampling done row by row (each job draws its
numbers from its own seeded generator), a request gives the same characters alone or in a
crowd (tested).

A finished job leaves its state behind as a session (the carried ``(h, c)``, the logits for
the next character, the generator's state), so a later request can continue where its text
ended, as ``generate.py --paragraphs`` does.

Imports model, sampling, tokenizer and errors; never training, checkpoint or the server.
"""
from __future__ import annotations

import collections
import queue
import secrets
import threading
from dataclasses import dataclass

import torch

from .errors import SettingError, UsageError
from .model import CharLSTM, Stepper
from .sampling import Decoding, SampleConfig, encode_text, next_tokens, opening_ids
from .tokenizer import CharTokenizer

SESSIONS_KEPT = 256       # finished jobs whose state can still be continued, per model


class Busy(Exception):
    """Every slot is taken and the waiting queue is full: try again later."""


@dataclass
class Session:
    """Where a finished job's text ended: enough to continue it exactly."""
    state: tuple            # per layer (h, c), each (samples, H)
    logits: torch.Tensor    # (samples, V)
    rng_state: torch.Tensor
    seed: int               # the seed the chain of requests started from: its random stream carries on


class Events(queue.SimpleQueue):
    """A job's output queue, which also wakes a reader that said it waits (the server's event loop).

    The reader sets `waiter` and then looks at the queue once more before it sleeps; a put calls the
    waiter after queueing. Either the reader sees the event or the put sees the waiter: no event
    is missed, and the model's thread pays nothing while nobody waits.
    """

    def __init__(self):
        super().__init__()
        self.waiter = None                  # called once (from the model's thread), then cleared

    def put(self, item, block=True, timeout=None):
        super().put(item, block, timeout)
        waiter, self.waiter = self.waiter, None
        if waiter is not None:
            waiter()


class Job:
    """One request: its settings, its own random generator, and a queue of what it produced.

    The queue holds (sample, character) pairs (the character a sampling.Scored where logprobs, the
    number of alternatives to score per character, was asked for), a ("warning", message) or, last,
    ("end", reason).
    """

    def __init__(self, prompt: str, config: SampleConfig, unknown: str = "error", session: str | None = None,
                 logprobs: int | None = None):
        self.id = secrets.token_urlsafe(9)
        self.prompt, self.config, self.unknown, self.continues = prompt, config, unknown, session
        self.logprobs = logprobs
        self.samples = config.num_samples
        self.seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
        self.events = Events()
        self.produced = 0                   # characters per sample so far
        self.finished = threading.Event()
        self._cancelled = threading.Event()
        self.reason: str | None = None

    def cancel(self) -> None:
        """Stop at the next character (Stop pressed, or the client went away)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """Steps every engine with work, one character each in turn, on the thread that calls run()."""

    def __init__(self):
        self.wake = threading.Condition()
        self.engines: list[BatchingEngine] = []
        self.stopped = False

    def add(self, engine: "BatchingEngine") -> None:
        with self.wake:
            self.engines.append(engine)

    def notify(self) -> None:
        with self.wake:
            self.wake.notify_all()

    def run(self) -> None:
        """Until stop(); a KeyboardInterrupt (Ctrl-C in the main thread) goes through to the caller."""
        while True:
            with self.wake:
                if self.stopped:
                    return
                self.engines = [e for e in self.engines if not e.done]    # retired and idle: let go
                working = [e for e in self.engines if e.has_work()]
                if not working:
                    self.wake.wait(timeout=0.5)
                    continue
            for engine in working:
                engine.tick()

    def stop(self) -> None:
        with self.wake:
            self.stopped = True
            self.wake.notify_all()

    def run_in_thread(self) -> threading.Thread:
        """For tests and embedding: the same loop on a thread of its own (slower on a few cores)."""
        thread = threading.Thread(target=self.run, name="textgen-scheduler", daemon=True)
        thread.start()
        return thread


class BatchingEngine:
    """One model and `slots` rows stepped together; at most `max_waiting` queued jobs.

    Without a scheduler it makes one and runs it on a thread of its own.
    """

    def __init__(self, model: CharLSTM, tokenizer: CharTokenizer, slots: int = 16, max_waiting: int = 64,
                 scheduler: Scheduler | None = None):
        if slots < 1 or max_waiting < 0:
            raise ValueError("slots must be at least 1 and max_waiting at least 0")
        self.model, self.tokenizer, self.slots, self.max_waiting = model, tokenizer, slots, max_waiting
        self.device = next(model.parameters()).device
        self.stepper = Stepper(model)
        V = tokenizer.vocab_size
        self.state = model.initial_state(slots, device=self.device)
        self.logits = torch.zeros(slots, V, device=self.device)
        self.temperature = torch.ones(slots)
        self.top_k = torch.full((slots,), V, dtype=torch.long)
        self.top_p = torch.ones(slots)
        self.rows: list[tuple[Job, int] | None] = [None] * slots      # (job, sample) per row
        self.running: dict[str, tuple[Job, list[int], torch.Generator, list[str]]] = {}
        self.waiting: collections.deque[Job] = collections.deque()
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.closed = self.retiring = False
        if scheduler is None:
            scheduler = Scheduler()
            scheduler.run_in_thread()
        self.scheduler = scheduler
        scheduler.add(self)

    # -- what request threads call ------------------------------------------------------

    def submit(self, job: Job) -> Job:
        """Queue a job (checked first: a bad one raises UsageError and is never queued)."""
        if job.samples > self.slots:
            raise SettingError("num_samples", f"must be at most {self.slots} here (the server's batch size), "
                                              f"got {job.samples}")
        with self.lock:
            if job.continues is not None and job.continues not in self.sessions:
                raise UsageError(f"there is no session {job.continues!r} to continue on this model "
                                 f"(sessions are kept for the last {SESSIONS_KEPT} requests)")
            if job.continues is not None and self.sessions[job.continues].logits.shape[0] != job.samples:
                raise UsageError("a continued request must ask for as many samples as the one it continues")
            if job.continues is not None and job.config.seed is None:
                # It carries on the session's random stream, so the seed it reports is the chain's: the
                # one that, given again to the first request and continued alike, gives this text again.
                job.seed = self.sessions[job.continues].seed
            if self.closed or self.retiring:
                raise Busy("this model is being replaced or the server is shutting down")
            if self._left_waiting([*self.waiting, job]) > self.max_waiting:
                raise Busy(f"all {self.slots} generation slots are busy and {len(self.waiting)} requests wait")
            self._encode(job.prompt, job)        # unknown characters are the request's error, raised here
            self.waiting.append(job)
        self.scheduler.notify()
        return job

    def counts(self) -> dict:
        with self.lock:
            busy = sum(row is not None for row in self.rows)
            return {"slots": self.slots, "busy_slots": busy, "running": len(self.running),
                    "waiting": len(self.waiting)}

    def retire(self) -> None:
        """Take no more jobs; the scheduler lets go of the engine once the running and waiting ones are done."""
        with self.lock:
            self.retiring = True

    @property
    def done(self) -> bool:
        return self.closed or (self.retiring and not self.has_work())

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def close(self) -> None:
        """End every job now (reason "shutdown"); call it from the scheduler's thread, or once that has stopped."""
        with self.lock:
            self.closed = True
            running, waiting = list(self.running.values()), list(self.waiting)
            self.running.clear()
            self.waiting.clear()
            self.rows = [None] * self.slots
        for job in [job for job, _, _ in running] + waiting:
            self._finish(job, "shutdown")

    # -- the worker ---------------------------------------------------------------------

    def _left_waiting(self, queued: list[Job]) -> int:
        """How many of the queued jobs would still wait once those that fit in the free rows join."""
        free = sum(row is None for row in self.rows)
        for joined, job in enumerate(queued):
            if job.samples > free:
                return len(queued) - joined
            free -= job.samples
        return 0

    def _encode(self, text: str, job: Job, warn: bool = False) -> torch.Tensor:
        say = (lambda message: job.events.put(("warning", message))) if warn else None
        return encode_text(self.tokenizer, text, job.unknown, say)

    def tick(self) -> None:
        """Let waiting jobs join, then one character for every running one (the scheduler's call)."""
        with self.lock:
            if self.closed:
                return
            joining = self._admit()
        for job, rows in joining:
            try:
                self._start(job, rows)
            except Exception as e:          # noqa: BLE001  one bad job must not end the others
                self._fail([(job, rows)], e)
        if self.running:
            try:
                self._step()
            except Exception as e:          # noqa: BLE001  e.g. out of memory: end the jobs, keep serving
                self._fail([(job, rows) for job, rows, _ in self.running.values()], e)

    def _fail(self, jobs, error: Exception) -> None:
        message = "out of memory" if isinstance(error, (MemoryError, torch.OutOfMemoryError)) else \
            f"generation failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        for job, rows in jobs:
            job.events.put(("warning", message))
            with self.lock:
                self.running.pop(job.id, None)
                for i in rows:
                    self.rows[i] = None
            self._finish(job, "error")

    def _admit(self) -> list[tuple[Job, list[int]]]:
        """Waiting jobs, in order, that fit in the free rows now (a cancelled one just ends)."""
        joining = []
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._finish(job, "stopped")
                continue
            free = [i for i, row in enumerate(self.rows) if row is None]
            if len(free) < job.samples:
                break
            self.waiting.popleft()
            rows = free[: job.samples]
            for sample, i in enumerate(rows):
                self.rows[i] = (job, sample)
            joining.append((job, rows))
        return joining

    @torch.no_grad()
    def _start(self, job: Job, rows: list[int]) -> None:
        """Read the job's prompt (from its session's state, if it continues one) into its rows."""
        n, index = job.samples, torch.tensor(rows, device=self.device)
        rng = torch.Generator().manual_seed(job.seed)
        if job.continues is not None:
            with self.lock:
                session = self.sessions[job.continues]
            state, logits = session.state, session.logits
            if job.config.seed is None:
                rng.set_state(session.rng_state)           # carry the randomness on too, as --paragraphs does
        else:
            state, logits = self.model.initial_state(n, device=self.device), None
        ids = opening_ids(self.tokenizer, self._encode(job.prompt, job, warn=True), logits)
        if len(ids):
            tokens = ids.to(self.device).unsqueeze(0).expand(n, -1)
            logits, state = self.model.read(tokens, state)
        for layer, (h, c) in enumerate(state):
            self.state[layer][0][index] = h
            self.state[layer][1][index] = c
        self.logits[index] = logits.float()
        cfg, V = job.config, self.tokenizer.vocab_size
        self.temperature[rows] = cfg.temperature
        self.top_k[rows] = cfg.top_k if cfg.top_k is not None else V
        self.top_p[rows] = cfg.top_p if cfg.top_p is not None else 1.0
        with self.lock:
            self.running[job.id] = (job, rows, Decoding(cfg, rng, n, job.logprobs))

    @torch.no_grad()
    def _step(self) -> None:
        u = torch.full((self.slots,), 0.5, dtype=torch.float64)
        for job, rows, decoding in self.running.values():
            u[rows] = decoding.uniforms()
        drawn_from = self.logits
        ids = next_tokens(drawn_from, self.temperature, self.top_k, self.top_p, u)
        self.logits, self.state = self.stepper(ids.to(self.device), self.state)
        table = self.tokenizer.chars
        chars = [table[i] for i in ids.tolist()]
        ended = []
        for job, rows, decoding in self.running.values():
            scored = None if job.logprobs is None else decoding.score(drawn_from[rows], ids[rows], table)
            for sample, ch in enumerate(decoding.advance([chars[i] for i in rows], scored)):
                if ch is not None:
                    job.events.put((sample, ch))
            job.produced = decoding.produced
            if job.cancelled:
                ended.append((job, "stopped"))
            elif decoding.ended:
                ended.append((job, decoding.ended))
        for job, reason in ended:
            self._leave(job, reason)

    def _leave(self, job: Job, reason: str) -> None:
        """Free the job's rows, keeping where it ended as a session."""
        _, rows, decoding = self.running[job.id]
        rng = decoding.rng
        index = torch.tensor(rows, device=self.device)
        session = Session(seed=job.seed, state=tuple((h[index].clone(), c[index].clone()) for h, c in self.state),
                          logits=self.logits[index].clone(), rng_state=rng.get_state())
        with self.lock:
            del self.running[job.id]
            for i in rows:
                self.rows[i] = None
            self.sessions[job.id] = session
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        for h, c in self.state:                     # idle rows hold zeros, never stale numbers
            h[index] = 0
            c[index] = 0
        self._finish(job, reason)

    def _finish(self, job: Job, reason: str) -> None:
        job.reason = reason
        job.events.put(("end", reason))
        job.finished.set()
