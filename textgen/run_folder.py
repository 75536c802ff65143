"""A training run's folder, its layout and its rules: the one module that knows them.

Owns: the names in a run folder (``latest.pt``, ``best.pt``, ``step-NNNNNNN.pt``,
``config.json``, ``metrics.jsonl``, ``loss.png``, the lock), the default root
``checkpoints/``, finding runs (the latest one, every one under a folder) and a
run's checkpoint (``resolve``), the rules for which folder a run may write, the
lock that keeps a second trainer out, default folder names that never collide,
and the run's small files, and reading its metrics back. What a checkpoint holds is ``checkpoint``'s. Imports
``files`` and ``errors``; never ``checkpoint``, ``training`` or ``cli``.

The rules:

* A new run goes into a missing or empty folder. A folder that holds a textgen
  run is refused (continue it with ``--resume``, or start over with
  ``--overwrite``), and so is one that holds anything else.
* ``--overwrite`` removes the old run's files before the new run writes its
  first one, so the folder never mixes two runs. It removes nothing from a
  folder that also holds files textgen did not write.
* One trainer per folder: an ``fcntl.flock`` on ``.textgen.lock``, taken before
  anything is written and held until the process ends; the kernel drops it
  when the process dies, so a killed run leaves no stale lock. The file holds
  the owner's pid for the message a second trainer gets.
* Readers (generation, evaluation, info, plot) take no lock: every file here
  and every checkpoint is written to a temporary name and renamed into place,
  so a reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import re
import sys
from datetime import datetime

from . import files
from .errors import UsageError

try:
    import fcntl
except ImportError:              # Windows: no flock; runs are then not protected from a second trainer
    fcntl = None

DEFAULT_ROOT = "checkpoints"     # where runs go unless --out says otherwise, and where they are looked for
LATEST, BEST = "latest.pt", "best.pt"
STEP_FILE = re.compile(r"step-\d{7}\.pt")
CONFIG, METRICS, PLOT = "config.json", "metrics.jsonl", "loss.png"
LOCK = files.RUN_MARK            # every run folder holds it from its first claim: the writer knows them by it
_CHECKPOINT = re.compile(r"(latest|best)\.pt|step-\d{7}\.pt")


def step_filename(step: int) -> str:
    return f"step-{step:07d}.pt"


def run_path(name: str) -> str:
    """The folder --name NAME means."""
    return os.path.join(DEFAULT_ROOT, name)


def resolve(path: str, prefer_best: bool) -> str:
    """A checkpoint file from a file or a run folder (best.pt or latest.pt first, as asked)."""
    if os.path.isdir(path):
        order = (BEST, LATEST) if prefer_best else (LATEST, BEST)
        for name in order:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UsageError(f"{path} holds no {LATEST} or {BEST}; is it a textgen run folder?")
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such checkpoint file or run folder")
    return path


def latest_run(root: str = DEFAULT_ROOT) -> str:
    """The most recently written run folder under root."""
    runs = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            for ckpt in (LATEST, BEST):
                p = os.path.join(root, name, ckpt)
                if os.path.isfile(p):
                    runs.append((os.path.getmtime(p), os.path.join(root, name)))
    if not runs:
        raise UsageError(f"no trained run found under {root}/; train one first, or name one with {{checkpoint}}",
                         checkpoint=...)
    return max(runs)[1]


def is_run(folder: str) -> bool:
    """A folder with a checkpoint to serve or generate from."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in (BEST, LATEST))


def find_runs(root: str) -> list[tuple[str, str]]:
    """(name, checkpoint file) of every run folder directly under root, most recently written first."""
    found = []
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        folder = os.path.join(root, name)
        if not name.startswith(".") and os.path.isdir(folder) and is_run(folder):
            try:
                file = resolve(folder, prefer_best=True)
                found.append((os.path.getmtime(file), name, file))
            except (UsageError, OSError):
                continue
    return [(name, file) for _, name, file in sorted(found, reverse=True)]
# What an interrupted write leaves: the writer's temporaries (files.output's and files.link's).
_LEFTOVER = re.compile(r"\..+\.tmp-\d+(\.png)?|.+\.link-tmp")


def _is_textgen_config(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and {"model", "train"} <= doc.keys()


def _is_textgen_metrics(path: str) -> bool:
    """A metrics.jsonl whose first line is one of textgen's log lines (a user's own file of that name is not)."""
    try:
        with open(path, encoding="utf-8") as f:
            first = f.readline(10_000)
        return first == "" or (isinstance(json.loads(first), dict) and "step" in json.loads(first))
    except (OSError, ValueError):
        return False


def survey(path: str) -> tuple[bool, list[str], list[str]]:
    """(holds a run, the files of textgen's there, everything else) for a folder that exists.

    A checkpoint, config.json or metrics.jsonl counts as textgen's by its content, not its name
    alone; the lock, loss.png and a writer's leftover temporaries only in a folder that is a run's
    (it holds the lock or a run file), so a folder of photos keeps its loss.png."""
    names = sorted(os.listdir(path))
    marked = LOCK in names
    run_files = []
    for name in names:
        full = os.path.join(path, name)
        if not os.path.isfile(full) or os.path.islink(full):
            continue
        if ((_CHECKPOINT.fullmatch(name) and files.is_checkpoint_file(full))
                or (name == METRICS and _is_textgen_metrics(full))
                or (name == CONFIG and _is_textgen_config(full))):
            run_files.append(name)
    ours = set(run_files)
    if marked or run_files:
        ours |= {n for n in names if (n in (LOCK, PLOT) or _LEFTOVER.fullmatch(n))
                 and os.path.isfile(os.path.join(path, n)) and not os.path.islink(os.path.join(path, n))}
    return bool(run_files), sorted(ours), [n for n in names if n not in ours]


def is_run_folder(path: str) -> bool:
    """A folder a run may be resumed in place: it holds the lock every trainer leaves, or nothing
    but textgen's own files (a run folder copied without its dotfile)."""
    if os.path.exists(os.path.join(path, LOCK)):
        return True
    holds_run, _, others = survey(path)
    return holds_run and not others


def _listing(names: list[str], most: int = 3) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def default_path(stem: str, root: str = DEFAULT_ROOT) -> str:
    """A new folder root/<stem>-<date>-<time>, created here so that two runs started in the same
    second get two folders (the second gets a -2 suffix, and so on)."""
    base = os.path.join(root, f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(root, exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)           # atomic: exactly one process creates each name
            return path
        except FileExistsError:
            continue
    raise UsageError(f"could not find a free run folder name under {root}; name one with {{out}}", out=...)


class RunFolder:
    """One run's folder, claimed for one trainer (``claim``) until ``release`` or the process's end."""

    def __init__(self, path: str, created: bool = False):
        self.path = path
        self._lock_fd: int | None = None
        self._created = created          # made for this run, so an abandoned claim may remove it
        self._clear_before_writing = False

    # -- claiming ------------------------------------------------------------------

    def claim(self, new_run: bool, overwrite: bool = False) -> None:
        """Lock the folder for this trainer; for a new run, check that it may start here.

        Nothing in an existing folder changes unless the claim succeeds: the checks only read.
        """
        if overwrite and not new_run:
            raise UsageError("{overwrite} starts a new run; it cannot be combined with {resume}", overwrite=True,
                             resume=...)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise UsageError(f"{self.path} is a file, not a run folder; give {{out}} a folder", out=...)
        fd = self._open_lock(create=False)
        try:
            if fd is not None:
                self._lock(fd)
            if new_run:
                self._check_new_run(overwrite)
            if fd is None:
                try:
                    self._created = self._created or not os.path.isdir(self.path)
                    os.makedirs(self.path, exist_ok=True)
                    fd = self._open_lock(create=True)
                except OSError as e:
                    raise UsageError(f"cannot write the run folder {self.path}: {e.strerror}") from None
                self._lock(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        self._lock_fd = fd

    def _open_lock(self, create: bool) -> int | None:
        try:
            return os.open(os.path.join(self.path, LOCK), os.O_RDWR | (os.O_CREAT if create else 0), 0o644)
        except FileNotFoundError:
            if create:
                raise
            return None
        except OSError as e:
            raise UsageError(f"cannot write the run folder {self.path}: {e.strerror}") from None

    def _lock(self, fd: int) -> None:
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise UsageError(f"the run folder {self.path} is in use by another training process (pid {holder}); "
                             f"wait for it to finish or stop it first") from None

    def _check_new_run(self, overwrite: bool) -> None:
        if not os.path.isdir(self.path):
            return
        holds_run, ours, others = survey(self.path)
        if holds_run and not overwrite:
            raise UsageError(f"{self.path} already holds a textgen run; continue it with {{resume}}, "
                             f"or start over with {{overwrite}} (which deletes its checkpoints)", resume=self.path,
                             overwrite=True)
        if others:
            what = "also holds" if holds_run else "is not empty: it holds"
            advice = ("{overwrite} removes only textgen's own files, so it left the folder alone"
                      if overwrite and holds_run else "give {out} a new or empty folder")
            raise UsageError(f"{self.path} {what} {_listing(others)}, which textgen did not write; {advice}",
                             overwrite=True, out=...)
        self._clear_before_writing = holds_run or bool(set(ours) - {LOCK})

    def release(self) -> None:
        """Let another trainer in (the process's end does the same)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def abandon(self) -> None:
        """Release a claim whose run never started; a folder this claim created, still empty, goes too."""
        self.release()
        if self._created:
            try:
                os.unlink(os.path.join(self.path, LOCK))
                os.rmdir(self.path)
            except OSError:
                pass

    # -- writing -------------------------------------------------------------------

    def start(self) -> None:
        """Called just before the run writes its first file: --overwrite's removal happens here,
        once everything else has been checked, so a run that fails to start deletes nothing."""
        if not self._clear_before_writing:
            return
        _, ours, _ = survey(self.path)
        for name in ours:
            if name != LOCK:
                os.unlink(os.path.join(self.path, name))
        self._clear_before_writing = False

    def _replace(self, name: str, text: str) -> None:
        files.write_text(os.path.join(self.path, name), text, replace="own")

    def write_config(self, doc: dict) -> None:
        self._replace(CONFIG, json.dumps(doc, indent=2))

    def write_metrics(self, entries: list[dict]) -> None:
        """Replace metrics.jsonl with these entries (a resumed run drops lines logged after its checkpoint)."""
        self._replace(METRICS, "".join(json.dumps(e) + "\n" for e in entries))

    def append_metrics(self, entry: dict) -> None:
        # One write of one whole line; readers skip a last line without its newline.
        files.append_text(os.path.join(self.path, METRICS), json.dumps(entry) + "\n")


def read_metrics(run_dir: str, note=None) -> list[dict]:
    """The run's metrics, one dict a line, each with a numeric step and train_loss.

    A last line without its newline is one a running trainer is still appending, and is left out.
    A line textgen cannot read (not UTF-8, not JSON, not an object, no step or train_loss) is
    skipped, and note(message) hears once how many there were and the first (default: stderr):
    a plot of the good lines serves better than none while a trainer writes, or after an edit."""
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        raise UsageError(f"{run_dir} has no metrics.jsonl; is it a textgen run folder?")
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as e:
        raise UsageError(f"cannot read {path} ({(e.strerror or str(e)).lower()})") from None
    rows, skipped = [], []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            problem = _problem(row)
        except UnicodeDecodeError:
            problem = "is not UTF-8"
        except ValueError:
            problem = "is not JSON"
        if problem:
            skipped.append(f"line {number} {problem}")
        else:
            rows.append(row)
    if skipped:
        (note or _note)(f"{path}: skipped {len(skipped)} line{'s' if len(skipped) > 1 else ''} that textgen cannot "
                        f"read ({skipped[0]}{', ...' if len(skipped) > 1 else ''}); the plot shows the others")
    return rows


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _problem(row) -> str | None:
    """Why a parsed metrics line cannot be plotted, or None."""
    if not isinstance(row, dict):
        return "is not a JSON object"
    for key in ("step", "train_loss"):
        if not _is_number(row.get(key)):
            return f"has no number for {key}"
    for key in ("time", "val_loss"):
        if row.get(key) is not None and not _is_number(row[key]):
            return f"has a {key} that is not a number"
    return None


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr, flush=True)


def checkpoint_folder(resume: str) -> str:
    """The folder a resumed run writes: the one its checkpoint is in."""
    return os.path.dirname(os.path.abspath(resolve(resume, prefer_best=False)))
