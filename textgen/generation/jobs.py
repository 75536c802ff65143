"""A request to the batching engine and how its output travels: the ``Job`` (its settings, its random
seed, a queue of what it produced), the ``Events`` queue that can wake an asyncio reader, ``arrived``
(which such a reader awaits), the ``Session`` a finished job leaves behind for a continuation, and the
``Scheduler`` that steps every engine in turn on one thread.

Imports sampling's settings and the styles' id; the engine (batching.py) and the server use these.
"""
from __future__ import annotations

import asyncio
import functools
import queue
import secrets
import threading
from dataclasses import dataclass

import torch

from ..styles import NO_STYLE
from .sampling import SampleConfig


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
        """Stop at the next call of the model (Stop pressed, or the client went away): within the characters
        being decoded at the time (a few milliseconds), and at once where none are."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class Scheduler:
    """Steps every engine with work, one character each in turn, on the thread that calls run()."""

    def __init__(self):
        self.wake = threading.Condition()
        self.engines: list = []                   # BatchingEngines
        self.stopped = False

    def add(self, engine) -> None:
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
