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

Imports the LSTM, jobs, sampling, styles, tokenizer and errors; never training, checkpoint or the server.
"""
from __future__ import annotations

import collections
import threading

import torch

from ..errors import SettingError, UsageError
from ..lstm import CharLSTM, Stepper
from .jobs import Busy, Job, Scheduler, Session
from .sampling import Decoding, decode_many, encode_text, next_tokens, opening_ids, scores
from ..styles import NO_STYLE, style_id
from ..tokenizer import CharTokenizer

SESSIONS_KEPT = 256       # finished jobs whose state can still be continued, per model


class Rows:
    """The batch: its busy rows in order, each a (job, sample), and what each row carries: the LSTM's state
    and the logits of its next draw (on the model's device), its sampling settings and its style (on the
    CPU, one column each). A job joins at the end; a job that leaves takes its rows out, and the rest
    close up."""

    def __init__(self, model: CharLSTM, vocab_size: int, device: torch.device):
        self.owners: list[tuple[Job, int]] = []
        self.state = tuple((h[:0], c[:0]) for h, c in model.initial_state(1, device=device))
        self.logits = torch.zeros(0, vocab_size, device=device)
        self.columns = {"temperature": torch.ones(0), "top_k": torch.zeros(0, dtype=torch.long),
                        "top_p": torch.ones(0)}
        if model.config.style_names:
            self.columns["style"] = torch.zeros(0, dtype=torch.long)     # NO_STYLE where none is asked for

    def __len__(self) -> int:
        return len(self.owners)

    def add(self, job: Job, state, logits: torch.Tensor, **values) -> list[int]:
        """The job's rows (one a sample) at the end of the batch, each column given its value; their indices."""
        n = job.samples
        first = len(self.owners)
        self.owners += [(job, sample) for sample in range(n)]
        self.state = tuple((torch.cat([h0, h]), torch.cat([c0, c])) for (h0, c0), (h, c) in zip(self.state, state))
        self.logits = torch.cat([self.logits, logits.float()])
        for name, column in self.columns.items():
            self.columns[name] = torch.cat([column, torch.full((n,), values[name], dtype=column.dtype)])
        return list(range(first, first + n))

    def keep(self, keeps) -> None:
        """Keep the rows whose (job, sample) keeps(...) holds for, in order."""
        kept = [i for i, owner in enumerate(self.owners) if keeps(owner)]
        index = torch.tensor(kept, dtype=torch.long, device=self.logits.device)
        self.owners = [self.owners[i] for i in kept]
        self.state = tuple((h.index_select(0, index), c.index_select(0, index)) for h, c in self.state)
        self.logits = self.logits.index_select(0, index)
        self.columns = {name: column.index_select(0, index.cpu()) for name, column in self.columns.items()}

    def of(self, job: Job) -> list[int]:
        return [i for i, (owner, _) in enumerate(self.owners) if owner is job]


def _hand_out(running, chars: str, listed: list[int], score=None) -> list[tuple[Job, str]]:
    """One step's characters (ids, one per row) to each running job's Decoding and its stream (running: job id
    -> (job, its rows, its Decoding)), scored where the job asks (score(job, rows, decoding)); the jobs that
    end here and why."""
    ended, shown = [], [chars[i] for i in listed]
    for job, rows, decoding in running.values():
        scored = None if job.logprobs is None or score is None else score(job, rows, decoding)
        for sample, ch in enumerate(decoding.advance([shown[i] for i in rows], scored, [listed[i] for i in rows])):
            if ch is not None:
                job.events.put((sample, ch))
        job.produced = decoding.produced
        if job.cancelled:
            ended.append((job, "stopped"))
        elif decoding.ended:
            ended.append((job, decoding.ended))
    return ended


class BatchingEngine:
    """One model and up to `slots` rows stepped together; at most `max_waiting` queued jobs.

    Without a scheduler it makes one and runs it on a thread of its own.
    """

    # Characters per tick where every job is decoded many per C call (decode_many): enough to spread a call's
    # cost, few enough that a request arriving meanwhile waits a few milliseconds to join.
    DECODE_STEPS, DECODE_ROW_STEPS = 128, 512

    def __init__(self, model: CharLSTM, tokenizer: CharTokenizer, slots: int = 16, max_waiting: int = 64,
                 scheduler: Scheduler | None = None):
        if slots < 1 or max_waiting < 0:
            raise ValueError("slots must be at least 1 and max_waiting at least 0")
        self.model, self.tokenizer, self.slots, self.max_waiting = model, tokenizer, slots, max_waiting
        self.device = next(model.parameters()).device
        self.stepper = Stepper(model, rows_agree=slots > 1, most_rows=slots)
        self.batch = Rows(model, tokenizer.vocab_size, self.device)
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
            busy = len(self.batch)
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
            self.batch = Rows(self.model, self.tokenizer.vocab_size, self.device)
        for job in [job for job, _, _ in running] + waiting:
            self._finish(job, "shutdown")

    # -- the worker ---------------------------------------------------------------------

    def _left_waiting(self, queued: list[Job]) -> int:
        """How many of the queued jobs would still wait once those that fit in the free rows join."""
        free = self.slots - len(self.batch)
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
                    self._keep(job)
            self._finish(job, "error")

    def _admit(self) -> list[Job]:
        """Waiting jobs, in order, that fit in the free rows now (a cancelled one just ends)."""
        joining, free = [], self.slots - len(self.batch)
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
        cfg = job.config
        decoding = Decoding(cfg, rng, n, job.stops, job.logprobs, self.copy_index, tails)
        with self.lock:
            rows = self.batch.add(job, state, logits, temperature=cfg.temperature, style=job.style,
                                  top_k=cfg.top_k if cfg.top_k is not None else self.tokenizer.vocab_size,
                                  top_p=cfg.top_p if cfg.top_p is not None else 1.0)
            self.running[job.id] = (job, rows, decoding)
        if decoding.ended:                          # nothing to generate (length 0): the prompt was all
            self._leave(job, decoding.ended)

    @torch.no_grad()
    def _step(self) -> None:
        """Characters for every busy row: many per call where the stepper decodes every job's (decode_many),
        else one. The batch is the busy rows where the stepper's rows agree at every size, else all `slots`
        rows (idle ones zeros): a fixed shape."""
        jobs, batch = list(self.running.values()), self.batch
        n, styles = len(batch), batch.columns.get("style")
        if len(jobs) == 1:                  # one job: its own settings, the same arithmetic as one per row
            cfg = jobs[0][0].config
            settings = (cfg.temperature, cfg.top_k, cfg.top_p)
        else:
            settings = tuple(batch.columns[name] for name in ("temperature", "top_k", "top_p"))
        if (self.stepper.decodes and (self.stepper.rows_agree or n == self.slots)       # (no fixed batch to pad)
                and all(job.logprobs is None and decoding.guard is None and not job.cancelled
                        for job, _, decoding in jobs)):
            steps = min(self.DECODE_STEPS, max(1, self.DECODE_ROW_STEPS // n),
                        *(decoding.config.length - decoding.produced for _, _, decoding in jobs))
            decoded = decode_many(self.stepper, batch.logits, batch.state, styles, settings,
                                  [(decoding, rows) for _, rows, decoding in jobs], steps, self.tokenizer.chars)
            if decoded is not None:
                drawn, batch.logits, batch.state = decoded
                for listed in drawn:
                    ended = _hand_out(self.running, self.tokenizer.chars, listed)   # ends: at the last step only
                for job, reason in ended:
                    self._leave(job, reason)
                return
        u = torch.cat([decoding.uniforms() for _, _, decoding in jobs])       # rows are in the jobs' order
        drawn_from = model_logits = batch.logits
        for job, rows, decoding in jobs:
            if decoding.guard is not None:           # --max-copy: this job's rows lose what would copy
                drawn_from = drawn_from.clone() if drawn_from is model_logits else drawn_from
                drawn_from[rows] = decoding.guarded(model_logits[rows])
        ids = next_tokens(drawn_from, *settings, u).to(self.device)
        tokens, state = ids, batch.state
        if not self.stepper.rows_agree and n < self.slots:
            tokens = torch.cat([ids, ids.new_zeros(self.slots - n)])
            state = tuple((torch.cat([h, h.new_zeros(self.slots - n, h.shape[1])]),
                           torch.cat([c, c.new_zeros(self.slots - n, c.shape[1])])) for h, c in state)
            if styles is not None:
                styles = torch.cat([styles, styles.new_full((self.slots - n,), NO_STYLE)])
        batch.logits, batch.state = self.stepper(tokens, state, None if styles is None else styles.to(self.device))
        if len(tokens) > n:                 # the fixed batch's idle rows: dropped again
            batch.logits, batch.state = batch.logits[:n], tuple((h[:n], c[:n]) for h, c in batch.state)
        # The model's own figures, before --max-copy takes anything away (as before temperature).
        table = self.tokenizer.chars
        for job, reason in _hand_out(self.running, table, ids.tolist(), lambda job, rows, decoding: decoding.score(
                model_logits[rows], ids[rows], table)):
            self._leave(job, reason)

    def _leave(self, job: Job, reason: str) -> None:
        """Free the job's rows, keeping where it ended as a session."""
        _, rows, decoding = self.running[job.id]
        rng = decoding.rng
        index = torch.tensor(rows, device=self.device)
        session = Session(seed=job.seed, state=tuple((h[index].clone(), c[index].clone()) for h, c in self.batch.state),
                          logits=self.batch.logits[index].clone(), rng_state=rng.get_state(),
                          copy_tails=decoding.guard.tails if decoding.guard is not None else [[] for _ in rows])
        with self.lock:
            del self.running[job.id]
            self._keep(job)
            self.sessions[job.id] = session
            while len(self.sessions) > SESSIONS_KEPT:
                self.sessions.popitem(last=False)
        self._finish(job, reason)

    def _keep(self, leaving: Job) -> None:
        """Take the leaving job's rows out of the batch (under self.lock), and renumber each running job's."""
        self.batch.keep(lambda owner: owner[0] is not leaving)
        for job, rows, _ in self.running.values():
            rows[:] = self.batch.of(job)

    def _finish(self, job: Job, reason: str) -> None:
        job.reason = reason
        job.events.put(("end", reason))
        job.finished.set()
