"""Continuous batching: many generation requests on one model, stepped together as one batch.

A ``BatchingEngine`` owns a number of slots (at most so many rows in its batch); a ``Scheduler`` steps
every engine that has work, in turn, on the one thread that runs it (the server's main thread:
on a few cores PyTorch's threads run markedly faster called from there, and models that take
turns beat models fighting over the cores). A job's events go out through a queue that can wake
an asyncio reader, so the server's event loop never blocks on the model.
A request (a ``Job``) waits in a bounded queue until enough slots are free, joins the
running batch at the next character, and leaves it when it ends, is stopped or its client
goes away; the others never wait for it. Each step draws one character for every busy row.

The batch is just the busy rows, in the order their jobs joined (a job that leaves takes its rows
out, and the batch closes up): a lone request steps a batch of one. Matrix libraries pick their
algorithm by the shape of a product, so a row can round differently in a batch of 1 and a batch
of 5 (MKL's torch.mm does); the stepper's products are oneDNN's with weights packed once, which
gave every row the same bits at every batch size measured (``Stepper(rows_agree=True)``, checked
again on each model as it loads). With that, and sampling done row by row (each job draws its
numbers from its own seeded generator), a request gives the same characters alone or in a crowd
(tested bitwise). Where those products are not to be had (a GPU, an adaptive output layer, a CPU
oneDNN does not pack for), the batch keeps all `slots` rows, busy or not, as a fixed shape gives
the same guarantee at the price of a lone request's speed. With one slot there is no crowd: the
engine steps exactly as generate.py does, and gives its text for a seed.

A finished job leaves its state behind as a session (the carried ``(h, c)``, the logits for
the next character, the generator's state), so a later request can continue where its text
ended, as ``generate.py --paragraphs`` does.

Imports model, sampling, tokenizer and errors; never training, checkpoint or the server.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import queue
import secrets
import threading
from dataclasses import dataclass

import torch

from ..errors import SettingError, UsageError
from ..lstm import CharLSTM, Stepper
from .sampling import Decoding, SampleConfig, encode_text, next_tokens, opening_ids, scores
from ..styles import NO_STYLE, style_id
from ..tokenizer import CharTokenizer

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
    copy_tails: list        # per sample, its last generated ids (--max-copy's run goes on into a continuation)


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


async def arrived(jobs: list["Job"]) -> list[tuple[int, tuple]]:
    """For an asyncio reader: the events queued so far by any of jobs, as (job's index, event) pairs;
    while none is, wait without blocking the loop (the next put, from the model's thread, wakes it).
    A job whose end has been read is looked at no more; with every job ended, an empty list."""
    loop = asyncio.get_running_loop()
    while True:
        got = []
        for i, job in enumerate(jobs):
            while not job.ended_read:
                try:
                    event = job.events.get_nowait()
                except queue.Empty:
                    break
                got.append((i, event))
                job.ended_read = event[0] == "end"
        waiting = [job.events for job in jobs if not job.ended_read]
        if got or not waiting:
            return got
        ready = asyncio.Event()
        for events in waiting:
            events.waiter = functools.partial(_wake, loop, ready)
        try:
            if all(events.empty() for events in waiting):     # looked again after setting the waiters
                await ready.wait()
        finally:
            for events in waiting:
                events.waiter = None


def _wake(loop: asyncio.AbstractEventLoop, ready: asyncio.Event) -> None:
    """Called from the model's thread."""
    try:
        loop.call_soon_threadsafe(ready.set)
    except RuntimeError:                    # the loop has closed: nobody waits any more
        pass


class Job:
    """One request: its settings, its own random generator, and a queue of what it produced.

    The queue holds (sample, character) pairs (the character a sampling.Scored where logprobs were
    asked for), a ("warning", message), with echo a ("prompt", [Scored of each prompt character after
    the first]) first, and, last, ("end", reason).

    stops: strings that end a sample (default: config.stop); logprobs: alternatives scored per
    character (None: none); echo: with logprobs, score the prompt too. A config.length of 0 reads
    the prompt (and scores it) and generates nothing.
    """

    def __init__(self, prompt: str, config: SampleConfig, unknown: str = "error", session: str | None = None,
                 stops: tuple[str, ...] | None = None, logprobs: int | None = None, echo: bool = False,
                 prime: str = ""):
        self.id = secrets.token_urlsafe(9)
        self.prompt, self.config, self.unknown, self.continues = prompt, config, unknown, session
        self.stops, self.logprobs, self.echo = stops, logprobs, echo
        self.prime = prime                  # a document read before the prompt, never shown
        self.style = NO_STYLE               # the style's id, set when the engine takes the job
        self.samples = config.num_samples
        self.seed = config.seed if config.seed is not None else secrets.randbelow(2**31)
        self.events = Events()
        self.ended_read = False             # a reader (arrived) has taken the ("end", reason) event
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
    """One model and up to `slots` rows stepped together; at most `max_waiting` queued jobs.

    Without a scheduler it makes one and runs it on a thread of its own.
    """

    def __init__(self, model: CharLSTM, tokenizer: CharTokenizer, slots: int = 16, max_waiting: int = 64,
                 scheduler: Scheduler | None = None):
        if slots < 1 or max_waiting < 0:
            raise ValueError("slots must be at least 1 and max_waiting at least 0")
        self.model, self.tokenizer, self.slots, self.max_waiting = model, tokenizer, slots, max_waiting
        self.device = next(model.parameters()).device
        self.stepper = Stepper(model, rows_agree=slots > 1, most_rows=slots)
        self._empty()
        self.running: dict[str, tuple[Job, list[int], Decoding]] = {}      # job id -> (job, its rows, its loop)
        self.waiting: collections.deque[Job] = collections.deque()
        self.sessions: collections.OrderedDict[str, Session] = collections.OrderedDict()
        self.lock = threading.Lock()
        self.closed = self.retiring = False
        # The training text's CopyIndex (copy_index.py) and, without one, the sentence why: --max-copy
        # needs it, and each finished job's copy report comes from it.
        self.copy_index, self.copy_note = None, "the copy index was not loaded"
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
        job.style = style_id(self.model.config.style_names, job.config.style)       # a name the model lacks: refused
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
            if job.config.max_copy is not None and self.copy_index is None:
                raise UsageError(f"{{max_copy}} needs the training text, and {self.copy_note}", max_copy=...)
            self._encode(job.prime + job.prompt, job)   # unknown characters are the request's error, raised here
            self.waiting.append(job)
        self.scheduler.notify()
        return job

    def counts(self) -> dict:
        with self.lock:
            busy = len(self.rows)
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
            self._empty()
        for job in [job for job, _, _ in running] + waiting:
            self._finish(job, "shutdown")

    # -- the worker ---------------------------------------------------------------------

    def _empty(self) -> None:
        """No busy row. The batch holds exactly the busy rows, in order, each a (job, sample); per row the
        carried state, the logits of the next draw and the sampling settings."""
        V, like = self.tokenizer.vocab_size, self.model.initial_state(1, device=self.device)
        self.rows: list[tuple[Job, int]] = []
        self.state = tuple((h[:0], c[:0]) for h, c in like)
        self.logits = torch.zeros(0, V, device=self.device)
        self.temperature, self.top_k, self.top_p = torch.ones(0), torch.zeros(0, dtype=torch.long), torch.ones(0)
        # Each row's style (a model with styles), NO_STYLE where none is asked for.
        self.styles = torch.zeros(0, dtype=torch.long) if self.model.config.style_names else None

    def _left_waiting(self, queued: list[Job]) -> int:
        """How many of the queued jobs would still wait once those that fit in the free rows join."""
        free = self.slots - len(self.rows)
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
        for job in joining:
            try:
                self._start(job)
            except Exception as e:          # noqa: BLE001  one bad job must not end the others
                self._fail([job], e)
        if self.running:
            try:
                self._step()
            except Exception as e:          # noqa: BLE001  e.g. out of memory: end the jobs, keep serving
                self._fail([job for job, _, _ in self.running.values()], e)

    def _fail(self, jobs, error: Exception) -> None:
        message = "out of memory" if isinstance(error, (MemoryError, torch.OutOfMemoryError)) else \
            f"generation failed: {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        for job in jobs:
            job.events.put(("warning", message))
            with self.lock:
                if self.running.pop(job.id, None) is not None:
                    self._keep(lambda row: row[0] is not job)
            self._finish(job, "error")

    def _admit(self) -> list[Job]:
        """Waiting jobs, in order, that fit in the free rows now (a cancelled one just ends)."""
        joining, free = [], self.slots - len(self.rows)
        while self.waiting:
            job = self.waiting[0]
            if job.cancelled:
                self.waiting.popleft()
                self._finish(job, "stopped")
                continue
            if free < job.samples:
                break
            self.waiting.popleft()
            free -= job.samples
            joining.append(job)
        return joining

    @torch.no_grad()
    def _start(self, job: Job) -> None:
        """Read the job's prompt (from its session's state, if it continues one), then add its rows to the batch."""
        n = job.samples
        rng = torch.Generator().manual_seed(job.seed)
        if job.continues is not None:
            with self.lock:
                session = self.sessions[job.continues]
            state, logits = session.state, session.logits
            if job.config.seed is None:
                rng.set_state(session.rng_state)           # carry the randomness on too, as --paragraphs does
        else:
            state, logits = self.model.initial_state(n, device=self.device), None
        # A prime document is read into the state before the prompt, and is not part of the output.
        ids = opening_ids(self.tokenizer, self._encode(job.prime + job.prompt, job, warn=True), logits)
        # Text read now is the user's: a verbatim run goes on only where a continuation reads nothing new.
        tails = [list(t) for t in session.copy_tails] if job.continues is not None and not len(ids) else None
        styles = None if job.style == NO_STYLE else torch.full((n,), job.style, device=self.device)
        if len(ids):
            tokens = ids.to(self.device).unsqueeze(0).expand(n, -1)
            if job.echo and job.logprobs is not None and job.prompt and not job.prime:
                every, logits, state = self.model.read_scored(tokens, state, styles=styles)   # the last row as read() gives it
                job.events.put(("prompt", scores(every[0], ids[1:], job.logprobs, self.tokenizer.chars)))
            else:
                logits, state = self.model.read(tokens, state, styles=styles)
        cfg, V = job.config, self.tokenizer.vocab_size
        decoding = Decoding(cfg, rng, n, job.stops, job.logprobs, self.copy_index, tails)
        with self.lock:
            rows = list(range(len(self.rows), len(self.rows) + n))
            self.rows += [(job, sample) for sample in range(n)]
            self.state = tuple((torch.cat([h0, h]), torch.cat([c0, c])) for (h0, c0), (h, c) in zip(self.state, state))
            self.logits = torch.cat([self.logits, logits.float()])
            self.temperature = torch.cat([self.temperature, torch.full((n,), float(cfg.temperature))])
            self.top_k = torch.cat([self.top_k, torch.full((n,), cfg.top_k if cfg.top_k is not None else V)])
            self.top_p = torch.cat([self.top_p, torch.full((n,), float(cfg.top_p if cfg.top_p is not None else 1))])
            if self.styles is not None:
                self.styles = torch.cat([self.styles, torch.full((n,), job.style)])
            self.running[job.id] = (job, rows, decoding)
        if decoding.ended:                          # nothing to generate (length 0): the prompt was all
            self._leave(job, decoding.ended)

    @torch.no_grad()
    def _step(self) -> None:
        """One character for every busy row. The batch is the busy rows where the stepper's rows agree at
        every size, else all `slots` rows (idle ones zeros): a fixed shape."""
        jobs = list(self.running.values())
        n = len(self.rows)
        if len(jobs) == 1:                  # one job: its own settings, the same arithmetic as one per row
            cfg, decoding = jobs[0][0].config, jobs[0][2]
            u, settings = decoding.uniforms(), (cfg.temperature, cfg.top_k, cfg.top_p)
        else:
            u = torch.cat([decoding.uniforms() for _, _, decoding in jobs])       # rows are in the jobs' order
            settings = (self.temperature, self.top_k, self.top_p)
        drawn_from = model_logits = self.logits
        for job, rows, decoding in jobs:
            if decoding.guard is not None:           # --max-copy: this job's rows lose what would copy
                drawn_from = drawn_from.clone() if drawn_from is self.logits else drawn_from
                drawn_from[rows] = decoding.guarded(self.logits[rows])
        ids = next_tokens(drawn_from, *settings, u).to(self.device)
        tokens, state, styles = ids, self.state, self.styles
        if not self.stepper.rows_agree and n < self.slots:
            tokens = torch.cat([ids, ids.new_zeros(self.slots - n)])
            state = tuple((torch.cat([h, h.new_zeros(self.slots - n, h.shape[1])]),
                           torch.cat([c, c.new_zeros(self.slots - n, c.shape[1])])) for h, c in state)
            if styles is not None:
                styles = torch.cat([styles, styles.new_full((self.slots - n,), NO_STYLE)])
        self.logits, self.state = self.stepper(tokens, state, None if styles is None else styles.to(self.device))
        if len(tokens) > n:                 # the fixed batch's idle rows: dropped again
            self.logits, self.state = self.logits[:n], tuple((h[:n], c[:n]) for h, c in self.state)
        table = self.tokenizer.chars
        listed = ids.tolist()
        chars = [table[i] for i in listed]
        ended = []
        for job, rows, decoding in self.running.values():
            # The model's own figures, before --max-copy takes anything away (as before temperature).
            scored = None if job.logprobs is None else decoding.score(model_logits[rows], ids[rows], table)
            for sample, ch in enumerate(decoding.advance([chars[i] for i in rows], scored,
                                                         [listed[i] for i in rows])):
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
                          logits=self.logits[index].clone(), rng_state=rng.get_state(),
                          copy_tails=decoding.guard.tails if decoding.guard is not None else [[] for _ in rows])
        with self.lock:
            del self.running[job.id]
            self._keep(lambda row: row[0] is not job)
            self.sessions[job.id] = session
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        self._finish(job, reason)

    def _keep(self, keeps) -> None:
        """Keep the rows for which keeps(row) holds, in order (under self.lock): the batch closes up, and each
        running job's rows are renumbered."""
        kept = [i for i, row in enumerate(self.rows) if keeps(row)]
        index = torch.tensor(kept, dtype=torch.long, device=self.device)
        self.rows = [self.rows[i] for i in kept]
        self.state = tuple((h.index_select(0, index), c.index_select(0, index)) for h, c in self.state)
        self.logits = self.logits.index_select(0, index)
        cpu = index.cpu()
        self.temperature, self.top_k, self.top_p = (t.index_select(0, cpu) for t in (self.temperature, self.top_k,
                                                                                     self.top_p))
        if self.styles is not None:
            self.styles = self.styles.index_select(0, cpu)
        for job, rows, _ in self.running.values():
            rows[:] = [i for i, row in enumerate(self.rows) if row[0] is job]

    def _finish(self, job: Job, reason: str) -> None:
        job.reason = reason
        job.events.put(("end", reason))
        job.finished.set()
