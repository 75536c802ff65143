"""The shape of the package at one or more git revisions: lines per module, the longest functions, the
classes with the most methods. What issue 43 asks to measure before and after a restructuring.

    python benchmarks/code_shape.py 6bab4da HEAD
"""
from __future__ import annotations

import argparse
import ast
import io
import os
import subprocess
import tarfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources(revision: str) -> dict[str, str]:
    """{path: text} of every .py file under textgen/ at the revision."""
    archive = subprocess.run(["git", "-C", ROOT, "archive", revision, "textgen"], capture_output=True, check=True)
    found = {}
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".py"):
                found[member.name] = tar.extractfile(member).read().decode("utf-8")
    return found


def shape(files: dict[str, str]) -> dict:
    functions, classes = [], []
    for path, text in files.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
            elif isinstance(node, ast.ClassDef):
                methods = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
                classes.append((len(methods), node.end_lineno - node.lineno + 1, f"{path}:{node.name}"))
    lines = sorted(((text.count("\n"), path) for path, text in files.items()), reverse=True)
    return {"modules": len(files), "lines": sum(n for n, _ in lines), "biggest": lines[:8],
            "over_450": sum(n > 450 for n, _ in lines), "functions": sorted(functions, reverse=True)[:10],
            "classes": sorted(classes, reverse=True)[:6]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("revisions", nargs="+")
    for revision in parser.parse_args().revisions:
        s = shape(sources(revision))
        print(f"## {revision}: {s['modules']} modules, {s['lines']:,} lines, {s['over_450']} over 450 lines")
        print("largest modules: " + ", ".join(f"{path} {n}" for n, path in s["biggest"]))
        print("longest functions: " + ", ".join(f"{name} {n}" for n, name in s["functions"]))
        print("most methods: " + ", ".join(f"{name} {m} methods/{n} lines" for m, n, name in s["classes"]))
        print()


if __name__ == "__main__":
    main()
