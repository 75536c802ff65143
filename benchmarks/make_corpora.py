"""Build the corpora that --size auto was measured on, from text on this machine that we may use.

    python benchmarks/make_corpora.py OUT_DIR            # writes OUT_DIR/<kind>-<size>.txt

Kinds (each cut to 0.1, 1 and 10 MB, and code also to 100 MB, from the start of one long text):

* ``code``: Python source files of the standard library and of installed packages, in sorted path
  order, each headed by its path (source code, as many users will train on).
* ``prose``: the docstrings of those same files, in the same order, each once (English technical
  prose, not code).
* ``script``: text in another script, found on this machine (see ``other_script_text``).

Nothing here is copied into the project; the files go to OUT_DIR (e.g. /tmp).
"""
from __future__ import annotations

import argparse
import ast
import glob
import gzip
import os
import re
import sys
import sysconfig
import unicodedata

MB = 1_000_000
SIZES = {"0.1MB": MB // 10, "1MB": MB, "10MB": 10 * MB, "100MB": 100 * MB}


def python_files() -> list[str]:
    roots = {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    files = set()
    for root in roots:
        files.update(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return sorted(files)


def read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def python_sources():
    """(path, text) of every readable UTF-8 Python file, in sorted path order."""
    for path in python_files():
        text = read(path)
        if text is not None and "\x00" not in text:
            yield path, text


def take(parts, limit: int) -> str:
    """Join parts until they reach limit characters (the last one whole)."""
    taken, size = [], 0
    for part in parts:
        taken.append(part)
        size += len(part)
        if size >= limit:
            break
    return "".join(taken)


def code_text(limit: int) -> str:
    return take((f"# {os.path.basename(path)}\n{text}\n" for path, text in python_sources()), limit)


# Control characters other than newline and tab: escapes in a docstring ("\0", "\b") that the
# parser decodes. One NUL byte makes the file binary to train.py (the first was 2.4M characters in).
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def docstrings(text: str):
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if (doc and len(doc) > 200 and sum(ch.isalpha() for ch in doc) > 0.7 * len(doc.replace(" ", ""))
                    and not CONTROL.search(doc)):
                yield doc.strip() + "\n\n"


def prose_text(limit: int) -> str:
    """Each docstring once: some packages repeat theirs word for word (playwright's sync and async
    APIs); before this, 77% of the 100-character stretches of the 10 MB file's tail occurred earlier
    in that tail."""
    def each_once():
        seen: set[str] = set()
        for _, text in python_sources():
            for doc in docstrings(text):
                if doc not in seen:
                    seen.add(doc)
                    yield doc

    return take(each_once(), limit)


# Groff markup in man pages: font changes, escapes and named characters, none of them text.
GROFF_ESCAPES = re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\\(..|\\[-&e|^%]")


def script(ch: str) -> str:
    """The script a letter is written in, from its Unicode name (Japanese kana count as CJK)."""
    first = unicodedata.name(ch, "UNKNOWN").split(" ")[0]
    return {"HIRAGANA": "CJK", "KATAKANA": "CJK"}.get(first, first)


def text_files(root: str):
    """(path, text) of the readable UTF-8 files under root, gzip-compressed ones (man pages) too."""
    for folder, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = os.path.join(folder, name)
            if os.path.islink(path) or os.path.getsize(path) > 50 * MB:
                continue
            if name.endswith(".gz"):
                try:
                    with gzip.open(path, "rt", encoding="utf-8") as f:
                        yield path, f.read()
                except (OSError, UnicodeDecodeError, EOFError):
                    continue
            else:
                text = read(path)
                if text:
                    yield path, text


def other_script_text(limit: int) -> str:
    """The lines in one non-Latin script, the one this machine has most text in, from the text files
    under /usr/share (man pages in other languages above all: ``apt-get install manpages-zh`` gives
    1.26M characters of Chinese, enough for 0.1 and 1 MB) and the Python trees. Man-page markup
    lines are left out."""
    lines: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    roots = ["/usr/share", sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]
    for root in roots:
        for path, text in text_files(root):
            for line in text.splitlines():
                if line.startswith((".", "'\\\"")):
                    continue                        # a groff request or comment
                line = GROFF_ESCAPES.sub("", line).strip()
                letters = [script(ch) for ch in line if ch.isalpha()]
                other = [name for name in letters if name != "LATIN"]
                if len(letters) >= 8 and len(other) > 0.8 * len(letters):
                    name = max(set(other), key=other.count)
                    lines.setdefault(name, []).append(line + "\n")
                    sizes[name] = sizes.get(name, 0) + len(line) + 1
    if not sizes:
        return ""
    most = max(sizes, key=sizes.get)
    print(f"script: {most.lower()} text, {sizes[most]:,} characters (others: "
          + ", ".join(f"{name.lower()} {size:,}" for name, size in sorted(sizes.items(), key=lambda kv: -kv[1])[1:6])
          + ")", file=sys.stderr)
    return take(lines[most], limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out")
    parser.add_argument("--kinds", nargs="+", default=["code", "prose", "script"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for kind in args.kinds:
        build = {"code": code_text, "prose": prose_text, "script": other_script_text}[kind]
        biggest = SIZES["100MB"] if kind == "code" else SIZES["10MB"]
        text = build(biggest)
        for label, size in SIZES.items():
            if size > biggest:
                continue
            if len(text) < size:
                print(f"{kind}: only {len(text):,} characters, no {label} file", file=sys.stderr)
                continue
            path = os.path.join(args.out, f"{kind}-{label}.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text[:size])
            print(f"{path}: {size:,} characters, {len(set(text[:size]))} distinct")


if __name__ == "__main__":
    main()
