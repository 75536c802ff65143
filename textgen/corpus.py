"""Preparing a corpus of any size: streamed decoding, one vocabulary pass, a token cache, a memory map.

A corpus is a file, a folder of files, or a glob; several files are joined in
sorted path order with a separator. Preparation reads the bytes in blocks
and never holds the whole text:

1. pass one decodes UTF-8 incrementally (a character split across blocks is
   carried over; an error names the file and byte offset), refuses binary
   files, hashes the content and collects the vocabulary;
2. pass two encodes each block with the vocabulary and appends the ids, in
   the smallest unsigned dtype, to a cache file.

Cache entries live under ``--cache-dir`` (default ``machine.cache_root()``:
``$TEXTGEN_CACHE_DIR``, ``$XDG_CACHE_HOME/textgen`` or ``~/.cache/textgen``), shared by all runs.
An entry is named by the content hash and the vocabulary; a small pointer keyed by the files'
paths, sizes and modification times finds it without reading the files again, so a second run
on the same corpus starts at once, and an edited file (new size or mtime, then a new hash) gets
a new entry. A damaged entry (a pointer or meta.json that is not what preparation wrote, a
tokens.bin of the wrong size or holding an id past the vocabulary) counts as a miss: the log
says so and the corpus is prepared again, through the one writer; a cache folder that takes no
files is one sentence. Training reads the tokens through a read-only memory map: resident
memory does not grow with the corpus.

Imports tokenizer, errors, files (the one writer) and machine (the cache location); never model,
training or cli.
"""
from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass

import numpy as np

from . import files
from .errors import OutputError, UsageError
from .machine import cache_root
from .tokenizer import CharTokenizer, UnknownCharactersError, codepoints

BLOCK_BYTES = 4 << 20   # small enough that a block's code points and ids stay a few tens of MB
CACHE_FORMAT = 1


@dataclass
class PreparedCorpus:
    tokens: np.ndarray          # read-only memory map of token ids
    tokenizer: CharTokenizer
    info: dict                  # paths, separator, sizes, sha256, characters, cache entry

    @property
    def sha256(self) -> str:
        return self.info["sha256"]


def default_cache_dir() -> str:
    return cache_root()


def resolve_sources(spec: str) -> list[str]:
    """The files of a corpus spec (file, folder or glob), as absolute paths in a stable order."""
    if os.path.isdir(spec):
        paths = []
        for root, dirs, names in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(root, name) for name in sorted(names) if not name.startswith(".")]
        if not paths:
            raise UsageError(f"{spec} is a folder with no files in it; give a text file or a folder of text files")
        return sorted(os.path.abspath(p) for p in paths)
    if os.path.isfile(spec):
        return [os.path.abspath(spec)]
    if any(ch in spec for ch in "*?["):
        paths = sorted(os.path.abspath(p) for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
        if not paths:
            raise UsageError(f"{spec} matches no files")
        return paths
    if os.path.exists(spec):
        raise UsageError(f"{spec} is not a regular file")
    if os.path.islink(spec):
        raise UsageError(f"{spec} is a symbolic link that leads nowhere (a loop, or a missing target)")
    raise UsageError(f"{spec}: no such file")


def decoded_blocks(path: str, block_bytes: int = BLOCK_BYTES):
    """Yield (raw bytes, decoded text) per block of a UTF-8 file; clear errors for anything else."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    first = True
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        while True:
            raw = f.read(block_bytes)
            final = not raw
            nul = raw.find(b"\0")
            if nul >= 0:
                raise UsageError(f"{path} looks like a binary file (a NUL byte at offset {offset + nul}); "
                                 f"give a UTF-8 text file")
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=final)
            except UnicodeDecodeError as e:
                raise UsageError(f"{path} is not valid UTF-8 (bad byte at offset {offset - pending + e.start}); "
                                 f"convert it to UTF-8 first") from None
            if first and text:
                if text.startswith("\ufeff"):
                    text = text[1:]              # a byte-order mark is not part of the text
                first = False
            yield raw, text
            if final:
                return
            offset += len(raw)


def read_text(path: str) -> str:
    """A whole UTF-8 file as a string, with the same checks as preparation (for small texts)."""
    paths = resolve_sources(path)
    if len(paths) != 1 or paths[0] != os.path.abspath(path):
        raise UsageError(f"{path} is a directory; give a text file")
    text = "".join(text for _, text in decoded_blocks(paths[0]))
    if not text:
        raise UsageError(f"{path} is empty; give a file with some text in it")
    return text


def _fingerprint(paths: list[str], separator: str) -> tuple[str, list[dict]]:
    stats = []
    for p in paths:
        st = os.stat(p)
        stats.append({"path": p, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    key = hashlib.sha256(json.dumps([stats, separator]).encode()).hexdigest()
    return key, stats


def _scan(paths: list[str], separator: str, progress) -> tuple[str, np.ndarray, int]:
    """Pass one: content hash, the set of code points present, and the character count."""
    digest = hashlib.sha256()
    present = np.zeros(0x110000, dtype=bool)
    characters = 0
    for k, path in enumerate(paths):
        if k:
            digest.update(separator.encode())
            characters += len(separator)
            present[codepoints(separator)] = True
        for raw, text in decoded_blocks(path):
            digest.update(raw)
            characters += len(text)
            if text:
                cps = codepoints(text)
                present[np.unique(cps) if len(cps) < 4096 else np.flatnonzero(np.bincount(cps))] = True
            progress(len(raw))
    return digest.hexdigest(), np.flatnonzero(present), characters


def _encode_into(paths, separator, tokenizer: CharTokenizer, out_path: str, progress) -> int:
    """Pass two: the ids of the whole corpus written to out_path (whole, or not at all); returns how many."""
    count = 0
    with files.output(out_path, "wb") as out:
        for k, path in enumerate(paths):
            if k:
                ids = tokenizer.encode(separator)
                out.write(ids.tobytes())
                count += len(ids)
            for raw, text in decoded_blocks(path):
                ids = tokenizer.encode(text)
                out.write(ids.tobytes())
                count += len(ids)
                progress(len(raw))
    return count


def prepare(spec: str, cache_dir: str | None = None, separator: str = "\n\n",
            tokenizer: CharTokenizer | None = None, progress: bool = False, log=None) -> PreparedCorpus:
    """The corpus at spec as memory-mapped token ids, from the cache or prepared now.

    With a tokenizer (resuming a run), the text is encoded with that vocabulary
    and characters outside it are an error naming them.
    """
    paths = resolve_sources(spec)
    total = sum(os.path.getsize(p) for p in paths)
    if total == 0:
        raise UsageError(f"{spec} is empty; give a file with some text in it")
    cache_dir = cache_dir or default_cache_dir()
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the cache folder {cache_dir} ({e.strerror}); choose another with {{cache_dir}}",
                         cache_dir=...) from None
    log = log or (lambda message: None)
    key, stats = _fingerprint(paths, separator)
    pointer = os.path.join(cache_dir, f"files-{key[:32]}.json")
    damaged: set[str] = set()          # entries found damaged (said once), prepared again below
    sha = _pointed_sha(pointer, log)
    found = _cached(cache_dir, sha, tokenizer, stats, separator, log, damaged)
    if found is not None:
        return found

    log(f"preparing {spec}: {len(paths)} file(s), {total / 2**20:,.1f} MB, cached in {cache_dir}")
    started = time.perf_counter()
    bar = _bar(progress, 2 * total, "preparing")
    try:
        sha, present, characters = _scan(paths, separator, bar.update)
        if not characters:                                   # a byte-order mark and nothing else
            raise UsageError(f"{spec} is empty; give a file with some text in it")
        own = CharTokenizer(present.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass"))
        if tokenizer is not None:
            missing = "".join(ch for ch in own.chars if ch not in set(tokenizer.chars))
            if missing:
                raise UnknownCharactersError(missing, tokenizer.vocab_size)
        tokenizer = tokenizer or own
        found = _cached(cache_dir, sha, tokenizer, stats, separator, log, damaged)
        if found is None:
            entry = os.path.join(cache_dir, f"{sha[:32]}-{_vocab_key(tokenizer)}")
            with _writing_cache(cache_dir):
                os.makedirs(entry, exist_ok=True)
                count = _encode_into(paths, separator, tokenizer, os.path.join(entry, "tokens.bin"), bar.update)
                meta = {"format": CACHE_FORMAT, "sha256": sha, "vocab": tokenizer.chars,
                        "dtype": tokenizer.dtype.str, "tokens": count, "characters": characters,
                        "size_bytes": total, "own_vocabulary": tokenizer == own}
                _write_json(os.path.join(entry, "meta.json"), meta)
            found = _open_entry(entry, meta, stats, separator, verify=False)    # just written from the text
    finally:
        bar.close()
    with _writing_cache(cache_dir):
        _write_json(pointer, {"sha256": sha, "files": stats, "separator": separator})
    seconds = time.perf_counter() - started
    log(f"prepared in {seconds:.1f}s ({total / 2**20 / max(seconds, 1e-9):,.0f} MB/s)")
    return found


@contextlib.contextmanager
def _writing_cache(cache_dir: str):
    """A cache folder that will not take the files is one sentence naming {cache_dir}, not a traceback."""
    try:
        yield
    except OutputError as e:                                 # a full disk
        raise UsageError(f"cannot write the token cache in {cache_dir} ({e}); free some space or choose another "
                         f"folder with {{cache_dir}}", cache_dir=...) from None
    except files.WriteError as e:                            # read-only, immutable, gone
        raise UsageError(f"cannot write the token cache in {cache_dir} ({e}); choose another folder with "
                         f"{{cache_dir}}", cache_dir=...) from None
    except OSError as e:                                     # the entry's folder could not be made
        raise UsageError(f"cannot write the token cache in {cache_dir} ({(e.strerror or str(e)).lower()}); "
                         f"choose another folder with {{cache_dir}}", cache_dir=...) from None


def _vocab_key(tokenizer: CharTokenizer) -> str:
    return hashlib.sha256(tokenizer.chars.encode("utf-8", "surrogatepass")).hexdigest()[:12]


class _Damaged(Exception):
    """A cache file that is not what textgen wrote there (cut short, overwritten, edited)."""


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read().decode("utf-8"))
    except (ValueError, OSError) as e:                       # not UTF-8, not JSON, unreadable
        raise _Damaged(f"{os.path.basename(path)} cannot be read: {str(e).splitlines()[0][:100]}") from None
    if not isinstance(doc, dict):
        raise _Damaged(f"{os.path.basename(path)} is not a JSON object")
    return doc


def _pointed_sha(pointer: str, log) -> str | None:
    """The content hash a pointer names; None where there is none, or it is damaged (the log says so)."""
    if not os.path.isfile(pointer):
        return None
    try:
        sha = _read_json(pointer).get("sha256")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise _Damaged(f"{os.path.basename(pointer)} names no content hash")
        return sha
    except _Damaged as e:
        log(f"the token cache is damaged ({e}); preparing the corpus again")
        return None


def _cached(cache_dir: str, sha: str | None, tokenizer: CharTokenizer | None, stats: list[dict], separator: str,
            log, damaged: set[str]) -> PreparedCorpus | None:
    """The cache entry for this content (and vocabulary, if one is imposed), opened, if it is there and whole.
    A damaged entry counts as a miss: the log says so once, and preparation writes it again."""
    if sha is None:
        return None
    if tokenizer is not None:
        candidates = [f"{sha[:32]}-{_vocab_key(tokenizer)}"]
    else:
        try:
            candidates = sorted(d for d in os.listdir(cache_dir) if d.startswith(sha[:32] + "-"))
        except OSError:
            return None                                      # a folder we cannot list holds no hit
    for name in candidates:
        entry = os.path.join(cache_dir, name)
        if entry in damaged or not (os.path.isfile(os.path.join(entry, "meta.json"))
                                    and os.path.isfile(os.path.join(entry, "tokens.bin"))):
            continue
        try:
            meta = _read_json(os.path.join(entry, "meta.json"))
            # Without an imposed vocabulary, only the content's own will do.
            if meta.get("format") != CACHE_FORMAT or meta.get("sha256") != sha or \
                    (tokenizer is None and meta.get("own_vocabulary") is not True):
                continue
            if tokenizer is not None and meta.get("vocab") != tokenizer.chars:
                raise _Damaged("meta.json holds another vocabulary than its folder's name says")
            return _open_entry(entry, meta, stats, separator)
        except _Damaged as e:
            damaged.add(entry)
            log(f"the token cache entry {entry} is damaged ({e}); preparing the corpus again")
    return None


def _open_entry(entry: str, meta: dict, stats: list[dict], separator: str, verify: bool = True) -> PreparedCorpus:
    """The entry's tokens as a read-only memory map; _Damaged where meta.json or tokens.bin is not what
    preparation wrote. verify reads the tokens once: an id past the vocabulary (a flipped or overwritten
    byte) would otherwise fail deep in training, or index out of bounds on a GPU."""
    chars, dtype, count = meta.get("vocab"), meta.get("dtype"), meta.get("tokens")
    if not (isinstance(chars, str) and chars and len(set(chars)) == len(chars)):
        raise _Damaged("meta.json holds no valid vocabulary")
    if dtype not in ("|u1", "<u2", "<u4") or not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise _Damaged("meta.json holds no valid token count or type")
    if not all(isinstance(meta.get(k), int) for k in ("characters", "size_bytes")):
        raise _Damaged("meta.json holds no valid sizes")
    path = os.path.join(entry, "tokens.bin")
    dtype = np.dtype(dtype)
    size = os.path.getsize(path)
    if size != count * dtype.itemsize:
        raise _Damaged(f"tokens.bin holds {size:,} bytes where meta.json says {count * dtype.itemsize:,}")
    tokenizer = CharTokenizer(chars)
    if tokenizer.dtype != dtype:
        raise _Damaged(f"meta.json says the ids are {dtype}, not {tokenizer.dtype} as its vocabulary needs")
    try:
        top = _max_id(path, dtype) if verify else 0
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(count,))
    except (OSError, ValueError) as e:
        raise _Damaged(f"tokens.bin cannot be read: {str(e).splitlines()[0][:100]}") from None
    if top >= tokenizer.vocab_size:
        raise _Damaged(f"tokens.bin holds the id {top}, past the vocabulary of {tokenizer.vocab_size}")
    paths = [s["path"] for s in stats]
    info = {"path": paths[0] if len(paths) == 1 else os.path.commonpath(paths), "files": paths,
            "separator": separator, "size_bytes": meta["size_bytes"], "characters": meta["characters"],
            "sha256": meta["sha256"], "cache": entry}
    return PreparedCorpus(tokens, tokenizer, info)


def _max_id(path: str, dtype: np.dtype) -> int:
    """The largest id in a tokens file, read in blocks (not mapped: the check leaves resident memory as it was)."""
    top = 0
    buffer = bytearray(BLOCK_BYTES - BLOCK_BYTES % dtype.itemsize)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            top = max(top, int(np.frombuffer(buffer, dtype, n // dtype.itemsize).max(initial=0)))
    return top


def _write_json(path: str, doc: dict) -> None:
    files.write_text(path, json.dumps(doc))


def _bar(enabled: bool, total: int, description: str):
    if not enabled:
        return _Silent()
    from tqdm import tqdm
    import sys
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description, file=sys.stderr)


class _Silent:
    def update(self, n):
        pass

    def close(self):
        pass
