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
``$TEXTGEN_CACHE_DIR``, ``$XDG_CACHE_HOME/textgen`` or ``~/.cache/textgen``), shared by all runs. An entry is named by the content
hash and the vocabulary; a small pointer keyed by the files' paths, sizes and
modification times finds it without reading the files again, so a second run
on the same corpus starts at once, and an edited file (new size or mtime, then
a new hash) gets a new entry. Training reads the tokens through a read-only
memory map: resident memory does not grow with the corpus.

Imports tokenizer, errors and machine (the cache location); never model, training or cli.
"""
from __future__ import annotations

import codecs
import glob
import hashlib
import json
import os
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
        for root, dirs, files in os.walk(spec):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
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
    key, stats = _fingerprint(paths, separator)
    pointer = os.path.join(cache_dir, f"files-{key[:32]}.json")
    sha = None
    if os.path.isfile(pointer):
        with open(pointer) as f:
            sha = json.load(f).get("sha256")
        entry = _find_entry(cache_dir, sha, tokenizer)
        if entry is not None:
            return _open_entry(entry, stats, separator)

    log = log or (lambda message: None)
    log(f"preparing {spec}: {len(paths)} file(s), {total / 2**20:,.1f} MB, cached in {cache_dir}")
    started = time.perf_counter()
    bar = _bar(progress, 2 * total, "preparing")
    try:
        sha, present, characters = _scan(paths, separator, bar.update)
        own = CharTokenizer(present.astype("<u4").tobytes().decode("utf-32-le", "surrogatepass"))
        if tokenizer is not None:
            missing = "".join(ch for ch in own.chars if ch not in set(tokenizer.chars))
            if missing:
                raise UnknownCharactersError(missing, tokenizer.vocab_size)
        tokenizer = tokenizer or own
        entry = _find_entry(cache_dir, sha, tokenizer)
        if entry is None:
            entry = os.path.join(cache_dir, f"{sha[:32]}-{_vocab_key(tokenizer)}")
            os.makedirs(entry, exist_ok=True)
            try:
                count = _encode_into(paths, separator, tokenizer, os.path.join(entry, "tokens.bin"), bar.update)
            except (OutputError, files.WriteError) as e:     # the text's own errors pass as they are
                raise UsageError(f"cannot write the token cache in {entry} ({e}); "
                                 f"free some space or choose another folder with {{cache_dir}}", cache_dir=...) from None
            meta = {"format": CACHE_FORMAT, "sha256": sha, "vocab": tokenizer.chars, "dtype": tokenizer.dtype.str,
                    "tokens": count, "characters": characters, "size_bytes": total,
                    "own_vocabulary": tokenizer == own}
            _write_json(os.path.join(entry, "meta.json"), meta)
    finally:
        bar.close()
    _write_json(pointer, {"sha256": sha, "files": stats, "separator": separator})
    seconds = time.perf_counter() - started
    log(f"prepared in {seconds:.1f}s ({total / 2**20 / max(seconds, 1e-9):,.0f} MB/s)")
    return _open_entry(entry, stats, separator)


def _vocab_key(tokenizer: CharTokenizer) -> str:
    return hashlib.sha256(tokenizer.chars.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def _find_entry(cache_dir: str, sha: str | None, tokenizer: CharTokenizer | None) -> str | None:
    """The cache entry for this content (and vocabulary, if one is imposed), if complete."""
    if sha is None:
        return None
    candidates = ([f"{sha[:32]}-{_vocab_key(tokenizer)}"] if tokenizer is not None else
                  sorted(d for d in os.listdir(cache_dir) if d.startswith(sha[:32] + "-")))
    for name in candidates:
        entry = os.path.join(cache_dir, name)
        meta = os.path.join(entry, "meta.json")
        if os.path.isfile(meta) and os.path.isfile(os.path.join(entry, "tokens.bin")):
            with open(meta) as f:
                m = json.load(f)
            # Without an imposed vocabulary, only the content's own will do.
            if m.get("format") == CACHE_FORMAT and m.get("sha256") == sha and \
                    (tokenizer is not None or m.get("own_vocabulary")):
                return entry
    return None


def _open_entry(entry: str, stats: list[dict], separator: str) -> PreparedCorpus:
    with open(os.path.join(entry, "meta.json")) as f:
        meta = json.load(f)
    tokenizer = CharTokenizer(meta["vocab"])
    tokens = np.memmap(os.path.join(entry, "tokens.bin"), dtype=np.dtype(meta["dtype"]), mode="r",
                       shape=(meta["tokens"],))
    paths = [s["path"] for s in stats]
    info = {"path": paths[0] if len(paths) == 1 else os.path.commonpath(paths), "files": paths,
            "separator": separator, "size_bytes": meta["size_bytes"], "characters": meta["characters"],
            "sha256": meta["sha256"], "cache": entry}
    return PreparedCorpus(tokens, tokenizer, info)


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
