"""The one writer: every file textgen writes for a user goes through ``output()``.

A file is written under a temporary name in its own folder, flushed, fsynced and
renamed over the target, so a reader (or a crash) sees the old file or the new one,
never half of one, and hard-linked siblings of the old file keep their content (a
run's ``best.pt``, ``latest.pt`` and ``step-*.pt`` are often one file under three
names). What it will not do:

* rename anything over something that is not a regular file: a FIFO, a terminal,
  ``/dev/null`` or ``/dev/stdout`` (whatever it leads to, a file opened for appending
  included) is written through as it is, opened in place; a link is judged by its target;
* replace a PyTorch checkpoint (found by its content, whatever its name), unless the
  caller is the checkpoint writer itself (``replace="checkpoint"``);
* write a user's file into a training run's folder (one holding ``RUN_MARK`` or a checkpoint),
  where it could be taken for one of the run's own; only that run's writer replaces its own
  files there (``replace="own"``), and only as regular files, never through a link;
* write into a folder that is not there.

Every failure is one sentence that says what was kept: ``UsageError`` (exit 2) for a
target it refuses or a folder it may not write, ``OutputError`` (exit 1) for a disk that
filled up or a device that refused the bytes.

Imports errors only; every module that writes a file imports it.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
from typing import IO, Iterator

from .errors import OutputError, UsageError

# Every run folder holds this file from its first claim on (run_folder's lock, never removed).
RUN_MARK = ".textgen.lock"
_TORCH_MAGIC = b"PK\x03\x04"              # torch.save writes a zip archive
_FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(UsageError):
    """A folder or device that would not take the file (read-only, immutable, gone): exit 2."""


def is_checkpoint_file(path: str) -> bool:
    """A regular file that holds a PyTorch checkpoint (a zip archive with a data.pkl)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != _TORCH_MAGIC:
                return False
    except OSError:
        return False
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return path.endswith((".pt", ".pth"))    # a damaged checkpoint is still somebody's checkpoint


def in_run_folder(path: str) -> bool:
    """Whether path lies in a training run's folder: one that holds RUN_MARK (every folder a trainer
    claimed), or a checkpoint (a run folder copied without its dotfile)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.exists(os.path.join(folder, RUN_MARK)):
        return True
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))[:20]
    except OSError:
        return False
    return any(is_checkpoint_file(os.path.join(folder, n)) for n in names)


_DESCRIPTOR = re.compile(r"/dev/(stdout|stderr|fd/\d+)|/proc/(self|\d+)/fd/\d+")


def is_descriptor(path: str) -> bool:
    """/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N: a stream this process already holds,
    whatever it leads to (a terminal, a pipe, or a file opened for appending by the shell)."""
    return bool(_DESCRIPTOR.fullmatch(os.path.normpath(path)))


def fsync_folder(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a folder; the rename is still atomic
    finally:
        os.close(fd)


def _reason(e: OSError) -> str:
    return (e.strerror or str(e)).rstrip(".").lower()


def refusal(path: str, replace: str = "user") -> str | None:
    """Why output(path, replace) would refuse to write path, or None where it may.

    replace: "user" (a file the user named: never a checkpoint, never into a run's folder),
    "own" (a run's writer replacing its own file there: only a regular file or nothing) or
    "checkpoint" (the checkpoint writer). A link is judged by what it leads to."""
    if replace == "user" and is_descriptor(path):
        return None                          # written through, as the shell set it up
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"cannot write {path}: {_reason(e)}"
    if st is not None and stat.S_ISDIR(st.st_mode):
        return f"{path} is a folder; name a file to write"
    if st is not None and (stat.S_ISBLK(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
        return f"{path} is a disk or a socket, not a file; name a file to write"
    if replace == "own":
        if os.path.islink(path) or (st is not None and not stat.S_ISREG(st.st_mode)):
            return f"{path} is not a regular file; a run writes its own files only as regular files"
        return None
    if st is not None and not stat.S_ISREG(st.st_mode):
        return None                          # a FIFO, a terminal, /dev/null: written through, never replaced
    if replace != "checkpoint" and st is not None and is_checkpoint_file(real):
        return (f"{path} is a checkpoint; textgen never writes over one, so name another file "
                f"(it was left as it was)")
    if replace == "user" and in_run_folder(real):
        return (f"{path} is in a training run's folder, where textgen writes nothing for you (a file there "
                f"could be taken for the run's own); name a file outside it")
    return None


def check(path: str, replace: str = "user") -> None:
    """Refuse, before any work is done, a path output() would refuse or whose folder is not there."""
    reason = refusal(path, replace)
    if reason is None and not is_descriptor(path) and not os.path.isdir(os.path.dirname(os.path.realpath(path))):
        reason = f"cannot write {path}: the folder {os.path.dirname(path) or '.'} does not exist"
    if reason:
        raise UsageError(reason)


@contextlib.contextmanager
def output(path: str, mode: str = "w", replace: str = "user", keep_on_interrupt: bool = False) -> Iterator[IO]:
    """Open path for writing ("w" text in UTF-8, or "wb") under the rules above.

    The file appears at path when the block ends without an error; on an error nothing at
    path changes. keep_on_interrupt: a Ctrl-C inside the block still puts what was written
    in place (generated text shown so far), where an error would discard it."""
    reason = refusal(path, replace)
    if reason:
        raise UsageError(reason)
    # A link to a file: write the file, keep the link (a run's own file is never a link: refused above).
    target = path if replace == "own" else os.path.realpath(path)
    try:
        special = is_descriptor(path) or not stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        special = False
    except OSError as e:
        raise WriteError(f"cannot write {path}: {_reason(e)}") from None
    if special:
        with _through(path, mode) as f:
            yield f
        return
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise WriteError(f"cannot write {path}: the folder {os.path.dirname(path) or '.'} does not exist")
    # A short temporary name: one beside a 250-character name must still fit the filesystem's limit.
    partial = os.path.join(folder, f".{os.path.basename(target)[:40]}.tmp-{os.getpid()}")
    try:
        f = open(partial, mode, **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {}))
    except OSError as e:
        raise _failure(e, path, existed=os.path.exists(target)) from None
    committed = False
    try:
        try:
            yield f
        except OSError as e:
            raise _failure(e, path, os.path.exists(target)) from None
        except KeyboardInterrupt:
            if not keep_on_interrupt:
                raise
            _commit(f, partial, target, path)
            committed = True
            raise
        _commit(f, partial, target, path)
        committed = True
    finally:
        if not committed:
            with contextlib.suppress(OSError):
                f.close()
            with contextlib.suppress(OSError):
                os.unlink(partial)


def _commit(f: IO, partial: str, target: str, path: str) -> None:
    existed = os.path.exists(target)
    try:
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if existed:
            with contextlib.suppress(OSError):
                os.chmod(partial, stat.S_IMODE(os.stat(target).st_mode))   # keep the old file's permissions
        os.replace(partial, target)
    except OSError as e:
        raise _failure(e, path, existed) from None
    fsync_folder(os.path.dirname(target))


@contextlib.contextmanager
def _through(path: str, mode: str) -> Iterator[IO]:
    """A FIFO, a terminal or a device: opened and written in place, as a shell redirection would."""
    try:
        f = open(path, mode.replace("w", "a") if "w" in mode else mode,
                 **({"encoding": "utf-8", "newline": ""} if "b" not in mode else {}))
    except OSError as e:
        raise _failure(e, path, existed=True, special=True) from None
    try:
        yield f
        f.flush()
    except OSError as e:
        raise _failure(e, path, existed=True, special=True) from None
    finally:
        with contextlib.suppress(OSError):
            f.close()


def _failure(e: OSError, path: str, existed: bool, special: bool = False) -> Exception:
    if special:                            # a device or a pipe: there is no old file to keep
        return (OutputError if e.errno in _FULL or e.errno == errno.EIO else WriteError)(
            f"cannot write to {path}: {_reason(e)}")
    kept = f"{path} was left as it was" if existed else "nothing was written"
    if e.errno in _FULL:
        return OutputError(f"disk full while writing {path}; {kept}")
    if e.errno == errno.ENOENT:
        return WriteError(f"cannot write {path}: its folder is gone; {kept}")
    return WriteError(f"cannot write {path}: {_reason(e)}; {kept}")


def link(source: str, path: str) -> None:
    """Make path another name of source (a hard link, or a copy where links are not possible),
    replacing what was at path in one rename: the checkpoint writer's step files and best.pt."""
    partial = path + ".link-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)
    try:
        try:
            os.link(source, partial)
        except OSError as e:
            if e.errno in _FULL:
                raise
            import shutil
            shutil.copyfile(source, partial)      # no hard links on this filesystem
        os.replace(partial, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise _failure(e, path, os.path.exists(path)) from None


def append_text(path: str, text: str) -> None:
    """Append to a run's own log (metrics.jsonl), in one write, where only a regular file stands."""
    if os.path.lexists(path) and not os.path.isfile(path):
        raise UsageError(f"{path} is not a regular file; textgen appends only to its own log files")
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise _failure(e, path, os.path.exists(path)) from None


def write_text(path: str, text: str, replace: str = "user") -> None:
    with output(path, "w", replace) as f:
        f.write(text)


def write_bytes(path: str, data: bytes, replace: str = "user") -> None:
    with output(path, "wb", replace) as f:
        f.write(data)


def write_in_folder(folder_fd: int, name: str, data: bytes, partial: str) -> None:
    """data into `name` in the folder open as folder_fd (a private cache checked through that
    descriptor, so it cannot be swapped between the check and the write): a new file `partial`
    (mode 0600, never an existing one, never through a link), fsynced and renamed over `name`."""
    file = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600,
                   dir_fd=folder_fd)
    try:
        with os.fdopen(file, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial, dir_fd=folder_fd)
        raise
