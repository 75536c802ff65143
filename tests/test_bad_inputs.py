"""The catalogue of bad inputs: every mistake a user can make, in every command and in the API.

Each row is one mistake. A command must end with the row's exit code and exactly one line on
stderr, with no traceback; the API must raise the row's exception, worded with argument names
rather than flags. Afterwards every file that existed before is byte for byte as it was
(and nothing new appears but the row's own fresh output folder).

Commands run in-process (train_main, generate_main, textgen_main) from a scratch working folder,
so a stray default run folder would show up as a change; the few rows that need a real process
(stdin bytes) run one.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pathlib
import socket
import stat
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch

import textgen
from conftest import ROOT, TINY, small_text, train_tiny
from textgen import checkpoint
from textgen.errors import UsageError
from textgen.run_folder import RunFolder


@dataclass
class Row:
    name: str
    command: str                       # train, generate, textgen, api, process
    args: list = field(default_factory=list)
    code: int = 2                      # exit code; for api rows, ignored
    says: tuple = ()                   # fragments the one line (or the exception) must hold; commands' fragments
                                       # are formatted with the world's names, as args are
    api: object = None                 # for api rows: world -> None, must raise UsageError
    stdin: bytes | None = None
    context: str | None = None         # a situation set up around the row (lock held, disk full)
    not_says: tuple = ()               # fragments the line must not hold (another flag's name)
    stdout: str | None = None          # for process rows: a file standard output is sent to (/dev/full)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A scratch working folder with a trained run, broken files and broken checkpoints."""
    root = tmp_path_factory.mktemp("world")
    run_dir, text = train_tiny(root)
    w = {"root": str(root), "run": run_dir, "text": text}
    files = root / "files"
    files.mkdir()
    (files / "empty.txt").write_bytes(b"")
    (files / "binary.bin").write_bytes(b"PK\x03\x04\x00\x00binary\x00data" * 20)
    (files / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50)
    (files / "short.txt").write_text("far too short\n", encoding="utf-8")
    (files / "no-files").mkdir()
    os.mkfifo(files / "fifo")
    (files / "loop-a").symlink_to(files / "loop-b")
    (files / "loop-b").symlink_to(files / "loop-a")
    (files / "unreadable.txt").write_text(small_text(), encoding="utf-8")
    (files / "unreadable.txt").chmod(0)
    (files / "a-file").write_text("not a folder\n")
    (files / "holiday-photos").mkdir()
    (files / "holiday-photos" / "beach.jpg").write_bytes(b"\xff\xd8\xff not really")
    latest = pathlib.Path(run_dir, "latest.pt")
    data = latest.read_bytes()
    ckpts = root / "ckpts"
    ckpts.mkdir()
    (ckpts / "truncated.pt").write_bytes(data[: len(data) // 2])
    payload = checkpoint.load(str(latest))
    torch.save({"state_dict": payload["model"]}, ckpts / "foreign.pt")
    torch.save({**payload, "extra": Evil(str(root / "pwned"))}, ckpts / "hostile.pt")
    torch.save({**payload, "version": checkpoint.FORMAT_VERSION + 1}, ckpts / "newer.pt")
    # Written with its own digest, as a buggy writer would: its tensors fit another config.
    checkpoint.atomic_save({**payload, "model_config": {**payload["model_config"], "hidden_size": 48}},
                           str(ckpts / "mismatched.pt"))
    (root / "metrics-only").mkdir()
    (root / "metrics-only" / "metrics.jsonl").write_text('{"step": 1, "time": 0.1, "train_loss": 3.0}\n')
    # A run folder that also holds a file textgen did not write (--overwrite must leave it alone).
    mixed = root / "mixed-run"
    mixed.mkdir()
    for name in ("latest.pt", "config.json", "metrics.jsonl"):
        (mixed / name).write_bytes(pathlib.Path(run_dir, name).read_bytes())
    (mixed / "notes.txt").write_text("my notes about this run\n")
    # A bit flipped in latest.pt, which best.pt and step-0000030.pt are hard links of; step 20 is its own file.
    flipped = root / "flipped"
    subprocess.run(["cp", "-a", run_dir, str(flipped)], check=True)
    with open(flipped / "latest.pt", "r+b") as f:
        f.seek(len(data) // 2)
        byte = f.read(1)
        f.seek(len(data) // 2)
        f.write(bytes([byte[0] ^ 0x10]))
    old = {k: v for k, v in payload.items() if k != "integrity"}          # as written before digests
    torch.save({**old, "version": 1}, ckpts / "old.pt")
    torch.save(old, ckpts / "stripped.pt")                                 # a digest taken off a current one
    loose = root / "downloads"                                             # a checkpoint among a user's files
    loose.mkdir()
    (loose / "model.pt").write_bytes(data)
    (loose / "config.json").write_text('{"my": "settings"}')
    (loose / "loss.png").write_bytes(b"\x89PNG my own picture")
    photos = root / "photos"                                               # a user's loss.png, no run at all
    photos.mkdir()
    (photos / "loss.png").write_bytes(b"\x89PNG a photo of a loss")
    (photos / "chapter.link-tmp").write_text("a draft whose name looks like a temporary")
    (root / "link-to-config.txt").symlink_to(pathlib.Path(run_dir, "config.json"))
    frozen = root / "frozen"                                               # made immutable by its rows
    subprocess.run(["cp", "-a", run_dir, str(frozen)], check=True)
    (root / "checkpoints").mkdir()
    named = root / "checkpoints" / "named"
    named.mkdir()
    (named / "latest.pt").write_bytes(data)
    # /dev/full's own device (1, 7) under a name of our own where we may make one (as root): a writer that
    # renamed over it would replace this node, not the machine's /dev/full.
    full = files / "full"
    try:
        os.mknod(full, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except OSError:
        full = pathlib.Path("/dev/full")
    w.update(files=str(files), ckpts=str(ckpts), mixed=str(mixed), flipped=str(flipped), frozen=str(frozen),
             full=str(full))
    return w


def train(*flags, text="{text}"):
    return [text, *TINY, "--steps", "2", "-q", "--sample-length", "0", "--out", "{fresh}", *flags]


def gen(*flags):
    return ["--checkpoint", "{run}", "--length", "5", "-q", *flags]


ROWS = [
    # -- files -----------------------------------------------------------------------
    Row("missing file", "train", train(text="{files}/missing.txt"), says=("missing.txt", "no such file")),
    Row("a folder with no files", "train", train(text="{files}/no-files"), says=("no files",)),
    Row("an empty file", "train", train(text="{files}/empty.txt"), says=("empty.txt",)),
    Row("a binary file", "train", train(text="{files}/binary.bin"), says=("binary",)),
    Row("not UTF-8", "train", train(text="{files}/latin1.txt"), says=("not valid UTF-8", "offset")),
    Row("a FIFO", "train", train(text="{files}/fifo"), says=("not a regular file",)),
    Row("/dev/zero", "train", train(text="/dev/zero"), says=("not a regular file",)),
    Row("a symbolic link loop", "train", train(text="{files}/loop-a"), says=("symbolic link",)),
    Row("an unreadable file", "train", train(text="{files}/unreadable.txt"), says=("cannot read", "ermission denied"),
        context="unreadable"),
    Row("text shorter than one chunk", "train", train(text="{files}/short.txt"), says=("need at least",)),
    Row("eval on a binary file", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{files}/binary.bin"],
        says=("binary",)),
    Row("eval on text that is not UTF-8", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{files}/latin1.txt"],
        says=("not valid UTF-8",)),
    # -- training flags: 0, negative, NaN, infinity, absurdly large ---------------------
    Row("--hidden-size 0", "train", train("--hidden-size", "0"), says=("--hidden-size",)),
    Row("--hidden-size -5", "train", train("--hidden-size", "-5"), says=("--hidden-size",)),
    Row("--hidden-size 99999999999", "train", train("--hidden-size", "99999999999"),
        says=("parameters and needs about", "available")),
    Row("--layers 100000000", "train", train("--layers", "100000000"), says=("parameters and needs about",)),
    Row("--embed-size 0", "train", train("--embed-size", "0"), says=("--embed-size",)),
    Row("--hidden-size abc", "train", train("--hidden-size", "abc"), says=("--hidden-size", "invalid int")),
    Row("--lr nan", "train", train("--lr", "nan"), says=("--lr must be a finite number",)),
    Row("--lr inf", "train", train("--lr", "inf"), says=("--lr must be a finite number",)),
    Row("--lr 0", "train", train("--lr", "0"), says=("--lr",)),
    Row("--lr -1", "train", train("--lr", "-1"), says=("--lr",)),
    Row("--dropout nan", "train", train("--dropout", "nan"), says=("--dropout",)),
    Row("--dropout 1", "train", train("--dropout", "1"), says=("--dropout",)),
    Row("--weight-dropout 1", "train", train("--weight-dropout", "1"), says=("--weight-dropout must be in [0, 1)",)),
    Row("--embed-dropout -0.1", "train", train("--embed-dropout", "-0.1"), says=("--embed-dropout",)),
    Row("--input-dropout nan", "train", train("--input-dropout", "nan"), says=("--input-dropout",)),
    Row("--size 3y", "train", train("--size", "3y"), says=("--size must be auto or LAYERSxHIDDEN",)),
    Row("--size 0x512", "train", train("--size", "0x512"), says=("--size must be auto",)),
    Row("--ema 1", "train", train("--ema", "1"), says=("--ema must be 0 (off) or a decay",)),
    Row("--ema nan", "train", train("--ema", "nan"), says=("--ema must be a finite",)),
    Row("--head softmax", "train", train("--head", "softmax"), says=("--head", "invalid choice")),
    Row("--cutoffs x", "train", train("--cutoffs", "x"), says=("--cutoffs", "comma-separated")),
    Row("--cutoffs 50,20", "train", train("--cutoffs", "50,20"), says=("--cutoffs must be positive and increase",)),
    Row("--head-div 0.5", "train", train("--head-div", "0.5"), says=("--head-div must be 1 or more",)),
    Row("--cutoffs beyond the vocabulary", "train", train("--head", "adaptive", "--cutoffs", "5000"),
        says=("cutoffs of the adaptive head must lie below the vocabulary size",)),
    Row("--weight-decay nan", "train", train("--weight-decay", "nan"), says=("--weight-decay must be a finite",)),
    Row("--weight-decay -1", "train", train("--weight-decay", "-1"), says=("--weight-decay",)),
    Row("--grad-clip inf", "train", train("--grad-clip", "inf"), says=("--grad-clip must be a finite",)),
    Row("--grad-clip 0", "train", train("--grad-clip", "0"), says=("--grad-clip",)),
    Row("--val-fraction nan", "train", train("--val-fraction", "nan"), says=("--val-fraction",)),
    Row("--val-fraction 1", "train", train("--val-fraction", "1"), says=("--val-fraction",)),
    Row("--min-lr-ratio nan", "train", train("--min-lr-ratio", "nan"), says=("--min-lr-ratio",)),
    Row("--time nan", "train", train("--time", "nan"), says=("--time", "not a duration")),
    Row("--time 0", "train", train("--time", "0"), says=("--time",)),
    Row("--batch-size 0", "train", train("--batch-size", "0"), says=("--batch-size",)),
    Row("--batch-size 1000000000000", "train", train("--batch-size", "1000000000000"), says=("batch-size",)),
    Row("--seq-len -1", "train", train("--seq-len", "-1"), says=("--seq-len",)),
    Row("--seq-len 1000000000", "train", train("--seq-len", "1000000000"), says=("seq-len",)),
    Row("--steps 0", "train", train("--steps", "0"), says=("--steps",)),
    Row("--warmup-steps -1", "train", train("--warmup-steps", "-1"), says=("--warmup-steps",)),
    Row("--seed -1", "train", train("--seed", "-1"), says=("--seed",)),
    Row("--dtype float8", "train", train("--dtype", "float8"), says=("--dtype", "invalid choice")),
    # -- generation flags -----------------------------------------------------------------
    Row("--temperature nan", "generate", gen("--temperature", "nan"), says=("--temperature must be a finite",)),
    Row("--temperature inf", "generate", gen("--temperature", "inf"), says=("--temperature must be a finite",)),
    Row("--temperature -1", "generate", gen("--temperature", "-1"), says=("--temperature",)),
    Row("--top-p nan", "generate", gen("--top-p", "nan"), says=("--top-p must be a finite",)),
    Row("--top-p 0", "generate", gen("--top-p", "0"), says=("--top-p",)),
    Row("--top-k 0", "generate", gen("--top-k", "0"), says=("--top-k",)),
    Row("--top-k -3", "generate", gen("--top-k", "-3"), says=("--top-k",)),
    Row("--length 0", "generate", gen("--length", "0"), says=("--length",)),
    Row("--length 1000000000000", "generate", gen("--length", "1000000000000"), says=("--length",)),
    Row("--num-samples 0", "generate", gen("--num-samples", "0"), says=("--num-samples",)),
    Row("--num-samples 1000000000", "generate", gen("--num-samples", "1000000000"), says=("--num-samples",)),
    Row("--seed -1 (generate)", "generate", gen("--seed", "-1"), says=("--seed",)),
    Row("--paragraphs 0", "generate", gen("--paragraphs", "0"), says=("--paragraphs",)),
    Row("--stop ''", "generate", gen("--stop", ""), says=("--stop",)),
    Row("eval --batch-size 0", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--batch-size", "0"],
        says=("--batch-size",)),
    Row("eval --adapt with several streams", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--adapt",
                                                          "--batch-size", "4"], says=("one stream",)),
    Row("eval --adapt-lr 0", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--adapt-lr", "0"],
        says=("--adapt-lr must be from 1e-9 to 10", "got 0")),
    Row("eval --adapt-lr nan", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--adapt-lr", "nan"],
        says=("finite",)),
    Row("eval --seq-len 0", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--seq-len", "0"],
        says=("--seq-len must be a whole number from 1",)),
    # -- checkpoints ------------------------------------------------------------------------
    Row("a truncated checkpoint", "generate", ["--checkpoint", "{ckpts}/truncated.pt"], says=("truncated",)),
    Row("a foreign pickle", "generate", ["--checkpoint", "{ckpts}/foreign.pt"], says=("not a textgen checkpoint",)),
    Row("a hostile pickle", "generate", ["--checkpoint", "{ckpts}/hostile.pt"], says=("could run code",)),
    Row("a newer format", "generate", ["--checkpoint", "{ckpts}/newer.pt"], says=("newer",)),
    Row("mismatched tensors", "generate", ["--checkpoint", "{ckpts}/mismatched.pt"], says=("do not match",)),
    Row("a folder with only metrics.jsonl", "generate", ["--checkpoint", "{root}/metrics-only"],
        says=("holds no latest.pt",)),
    Row("a missing checkpoint", "generate", ["--checkpoint", "{root}/nowhere"], says=("no such checkpoint",)),
    Row("info on a truncated checkpoint", "textgen", ["info", "{ckpts}/truncated.pt"], says=("truncated",)),
    Row("info on a folder with only metrics.jsonl", "textgen", ["info", "{root}/metrics-only"],
        says=("holds no latest.pt",)),
    Row("eval with a hostile pickle", "textgen", ["eval", "--checkpoint", "{ckpts}/hostile.pt", "--text", "{text}"],
        says=("could run code",)),
    Row("plot a folder with no metrics", "textgen", ["plot", "{files}/no-files"], says=("no metrics.jsonl",)),
    Row("serve a missing folder", "textgen", ["serve", "{root}/nowhere"], says=("no such run folder",)),
    Row("serve a folder with no runs", "textgen", ["serve", "{files}"], says=("holds no trained runs",)),
    Row("serve --slots 0", "textgen", ["serve", "{run}", "--slots", "0"], says=("--slots must be at least 1",)),
    Row("serve --port 70000", "textgen", ["serve", "{run}", "--port", "70000"], says=("--port must be from 0 to 65535",)),
    Row("serve on a port in use", "textgen", ["serve", "{run}", "--port", "{port}"], context="port in use",
        says=("port {port}", "is in use")),
    Row("resume from a truncated checkpoint", "train", ["--resume", "{ckpts}/truncated.pt"], says=("truncated",)),
    # -- run folders ------------------------------------------------------------------------
    Row("a new run into an existing run folder", "train", train("--out", "{run}"),
        says=("already holds a textgen run", "--resume", "--overwrite")),
    Row("a new run into an existing --name", "train", [*train()[:-2], "--name", "named"],
        says=("already holds a textgen run",)),
    Row("a folder that is a file", "train", train("--out", "{files}/a-file"), says=("is a file",)),
    Row("a folder holding other files", "train", train("--out", "{files}/holiday-photos"),
        says=("beach.jpg", "textgen did not write")),
    Row("--overwrite on a folder with other files too", "train", train("--out", "{mixed}", "--overwrite"),
        says=("notes.txt", "left the folder alone")),
    Row("--overwrite with --resume", "train", ["--resume", "{run}", "--overwrite"], says=("--overwrite", "--resume")),
    Row("resuming a run another trainer holds", "train", ["--resume", "{run}", "--steps", "60"], context="locked",
        says=("in use by another training process", "pid")),
    Row("a new run into a folder another trainer holds", "train", train("--out", "{run}", "--overwrite"),
        context="locked", says=("in use by another training process",)),
    Row("an unwritable folder", "train", train("--out", "/proc/textgen-catalogue/run"), says=("cannot write",)),
    Row("a full disk", "train", train(), code=1, context="disk full", says=("disk full",)),
    # -- the second hostile round: outputs, digests, names, contradictions, negative and huge numbers --
    Row("--output over best.pt (latest.pt and a step file are the same file)", "generate",
        gen("--output", "{run}/best.pt"), says=("is a checkpoint", "never writes over")),
    Row("--output over any checkpoint, known by its content", "generate", gen("--output", "{ckpts}/truncated.pt"),
        says=("is a checkpoint",)),
    Row("--output over a file of a run folder", "generate", gen("--output", "{run}/config.json"),
        says=("a training run's folder",)),
    Row("--output a folder", "generate", gen("--output", "{files}"), says=("is a folder",)),
    Row("--output in a missing folder", "generate", gen("--output", "{root}/nowhere/out.txt"), says=("does not exist",)),
    Row("--output ''", "generate", gen("--output", ""), says=("--output must name a file",)),
    Row("--output /dev/full", "generate", gen("--output", "{full}"), code=1, says=("cannot write to {full}",)),
    Row("generate.py > /dev/full", "process", ["generate.py", "--checkpoint", "{run}", "-q", "--length", "5"],
        stdout="{full}", code=1, says=("cannot write the output", "no space left")),
    Row("train.py > /dev/full trains on and says so once", "process",
        ["train.py", *[a for a in train() if a != "-q"]], stdout="{full}", code=0,
        says=("cannot write the training log", "metrics.jsonl")),
    Row("plot --output /dev/full", "textgen", ["plot", "{run}", "--output", "{full}"], code=1,
        says=("cannot write to {full}",)),
    Row("plot --output over a checkpoint", "textgen", ["plot", "{run}", "--output", "{run}/latest.pt"],
        says=("is a checkpoint",)),
    Row("generate from a checkpoint with one bit flipped", "generate", ["--checkpoint", "{flipped}", "-q"],
        says=("is corrupt", "digest", "step-0000020.pt")),
    Row("info on a flipped checkpoint", "textgen", ["info", "{flipped}"], says=("is corrupt",)),
    Row("eval on a flipped checkpoint", "textgen", ["eval", "--checkpoint", "{flipped}", "--text", "{text}"],
        says=("is corrupt",)),
    Row("resume a flipped checkpoint", "train", ["--resume", "{flipped}", "--steps", "60", "-q"],
        says=("latest.pt is corrupt", "step-0000020.pt")),
    Row("a checkpoint from before digests loads, with a note", "generate",
        ["--checkpoint", "{ckpts}/old.pt", "-q", "--length", "3"], code=0, says=("loaded unchecked",)),
    Row("--name ../../escape", "train", [*train()[:-2], "--name", "../../escape"],
        says=("--name must be one plain folder name",)),
    Row("--name a/b", "train", [*train()[:-2], "--name", "a/b"], says=("--name must be one plain folder name",)),
    Row("--name ''", "train", [*train()[:-2], "--name", ""], says=("--name must not be empty",)),
    Row("--name ..", "train", [*train()[:-2], "--name", ".."], says=("--name must be one plain folder name",)),
    Row("--out with --name", "train", train("--name", "other"), says=("--out and --name cannot be used together",)),
    Row("--allow-new-text without --resume", "train", train("--allow-new-text"), says=("--allow-new-text is for",)),
    Row("--cutoffs with --head full", "train", train("--head", "full", "--cutoffs", "5"),
        says=("--cutoffs shapes the adaptive head",)),
    Row("--head-div with --head full", "train", train("--head", "full", "--head-div", "2"),
        says=("--head-div shapes the adaptive head",)),
    Row("--eval-chars with --val-fraction 0", "train", train("--val-fraction", "0", "--eval-chars", "100"),
        says=("--eval-chars and --val-fraction 0",)),
    Row("--resume with --out and --overwrite", "train", ["--resume", "{run}", "--out", "{fresh}", "--overwrite"],
        says=("--resume and --overwrite cannot be used together",)),
    Row("--time -5m", "train", train("--time", "-5m"), says=("--time must be a positive",)),
    Row("--time 999999999h", "train", train("--time", "999999999h"), says=("--time must be", "at most 100 years")),
    Row("--cutoffs -5,10", "train", train("--cutoffs", "-5,10"), says=("--cutoffs must be positive",)),
    Row("--keep -1 names --keep alone", "train", train("--keep", "-1"), says=("--keep must be", "got -1"),
        not_says=("--warmup-steps", "--sample-length", "--eval-chars")),
    Row("--sample-length -1", "train", train("--sample-length", "-1"), says=("--sample-length must be",),
        not_says=("--keep",)),
    Row("--eval-chars -1", "train", train("--eval-chars", "-1"), says=("--eval-chars must be",), not_says=("--keep",)),
    Row("--eval-every -1", "train", train("--eval-every", "-1"), says=("--eval-every must be",)),
    Row("--save-every -5", "train", train("--save-every", "-5"), says=("--save-every must be",)),
    Row("--dropout -.5", "train", train("--dropout", "-.5"), says=("--dropout must be in [0, 1)",)),
    Row("--steps 10**21", "train", train("--steps", str(10**21)), says=("--steps must be a whole number from 1",)),
    Row("--lr 1e308", "train", train("--lr", "1e308"), says=("--lr must be from 1e-9 to 10", "1e308")),
    Row("--lr 1e-308", "train", train("--lr", "1e-308"), says=("--lr must be from 1e-9 to 10",)),
    Row("--lr -inf", "train", train("--lr", "-inf"), says=("--lr must be a finite number",)),
    Row("--weight-decay 1e308", "train", train("--weight-decay", "1e308"), says=("--weight-decay must be", "1/lr")),
    Row("--grad-clip 1e-308", "train", train("--grad-clip", "1e-308"), says=("--grad-clip must be from 1e-6",)),
    Row("--head-div 1e308", "train", train("--head", "adaptive", "--cutoffs", "5,10", "--head-div", "1e308"),
        says=("--head-div", "no width")),
    Row("--resume a run that has done its --steps", "train", ["--resume", "{run}", "-q"],
        says=("--steps must be more than the 30 steps", "nothing left to do")),
    Row("--resume into an immutable folder", "train", ["--resume", "{frozen}", "--steps", "60", "-q"],
        context="immutable", says=("cannot write", "operation not permitted")),
    Row("--temperature 1e308 --top-p 0.5", "generate", gen("--temperature", "1e308", "--top-p", "0.5"),
        says=("--temperature must be 0 (greedy) or from 1e-6 to 1e6", "1e308")),
    Row("--temperature 1e-40", "generate", gen("--temperature", "1e-40"), says=("--temperature must be",)),
    Row("--temperature -0.5", "generate", gen("--temperature", "-0.5"), says=("--temperature must be", "got -0.5")),
    Row("--top-p -.5", "generate", gen("--top-p", "-.5"), says=("--top-p must be in (0, 1]",)),
    Row("--length -5", "generate", gen("--length", "-5"), says=("--length must be from 1",)),
    Row("--paragraphs -2", "generate", gen("--paragraphs", "-2"), says=("--paragraphs must be at least 1",)),
    Row("eval --batch-size -2", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--batch-size", "-2"],
        says=("--batch-size must be",), not_says=("--seq-len",)),
    Row("eval --adapt-lr 1e308", "textgen", ["eval", "--checkpoint", "{run}", "--text", "{text}", "--adapt-lr",
                                            "1e308"], says=("--adapt-lr must be from 1e-9 to 10",)),
    Row("api: load a flipped checkpoint", "api", api=lambda w: textgen.load(w["flipped"]), says=("is corrupt",)),
    Row("api: temperature=1e308", "api", api=lambda w: textgen.load(w["run"]).generate(temperature=1e308),
        says=("temperature must be 0 (greedy) or from 1e-6 to 1e6",)),
    Row("api: lr=1e308", "api", api=lambda w: textgen.train(w["text"], lr=1e308, out=w["fresh"], steps=2),
        says=("lr must be from 1e-9 to 10",)),
    Row("api: keep=-1", "api", api=lambda w: textgen.train(w["text"], keep=-1, out=w["fresh"], steps=2),
        says=("keep must be",)),
    Row("api: name='../x'", "api", api=lambda w: textgen.train(w["text"], name="../x", steps=2),
        says=("name must be one plain folder name",)),
    Row("api: resume a finished run", "api", api=lambda w: textgen.train(resume=w["run"]),
        says=("steps must be more than the 30 steps",)),
    Row("a checkpoint of today's format with its digest taken off", "generate",
        ["--checkpoint", "{ckpts}/stripped.pt", "-q"], says=("is corrupt",)),
    Row("--resume a loose checkpoint among a user's files", "train", ["--resume", "{root}/downloads/model.pt",
                                                                     "--steps", "40", "-q"],
        says=("not in a training run's folder", "--out")),
    Row("--resume a step file behind latest.pt, in place", "train", ["--resume", "{run}/step-0000010.pt",
                                                                    "--steps", "25", "-q"],
        says=("is behind", "would replace that run's later checkpoints", "--out")),
    Row("a new run into a folder holding a user's loss.png", "train", train("--out", "{root}/photos"),
        says=("loss.png", "textgen did not write")),
    Row("--output a new file inside a run folder", "generate", gen("--output", "{run}/best-samples.txt"),
        says=("in a training run's folder",)),
    Row("--output through a link into a run folder", "generate", gen("--output", "{root}/link-to-config.txt"),
        says=("in a training run's folder",)),
    Row("--top-k with --temperature 0", "generate", gen("--temperature", "0", "--top-k", "5"),
        says=("--top-k and --temperature 0 cannot be used together",)),
    Row("--num-samples with --temperature 0", "generate", gen("--temperature", "0", "--num-samples", "3"),
        says=("--num-samples and --temperature 0",)),
    Row("--eval-chars shorter than a chunk", "train", train("--eval-chars", "1"),
        says=("--eval-chars must be 0", "at least one chunk"), not_says=("--val-fraction",)),
    Row("--workers beyond the machine", "train", train("--workers", "100000"), says=("--workers must be at most",)),
    Row("a path with a newline in it stays one line", "generate", gen("--output", "{root}/no\nsuch/out.txt"),
        says=("no\\nsuch",)),
    # -- prompts and interactive input ---------------------------------------------------------
    Row("a prompt with characters the model never saw", "generate", gen("--prompt", "\u2603 snow"),
        says=("not in the model's vocabulary", "--unknown skip")),
    Row("a prompt of lone surrogates (a non-UTF-8 terminal)", "generate", gen("--prompt", "caf\udce9"),
        says=("--prompt is not valid UTF-8",)),
    Row("an empty prompt is fine", "generate", gen("--prompt", ""), code=0),
    Row("interactive input that is not UTF-8", "process",
        ["generate.py", "--checkpoint", "{run}", "--interactive", "-q", "--length", "5"],
        stdin=b"caf\xe9 au lait\n\n", code=0, says=("not UTF-8",)),
    # -- the Python API: the same errors, with argument names ----------------------------------
    Row("api: load a missing run", "api", api=lambda w: textgen.load(w["root"] + "/nowhere"), says=("no such",)),
    Row("api: load a truncated checkpoint", "api", api=lambda w: textgen.load(w["ckpts"] + "/truncated.pt"),
        says=("truncated",)),
    Row("api: temperature=nan", "api", api=lambda w: textgen.load(w["run"]).generate(temperature=float("nan")),
        says=("temperature must be a finite number",)),
    Row("api: an unknown prompt character", "api", api=lambda w: textgen.load(w["run"]).generate("\u2603"),
        says=("unknown='skip'",)),
    Row("api: lr=nan", "api", api=lambda w: textgen.train(w["text"], lr=float("nan"), out=w["fresh"], steps=2),
        says=("lr must be a finite number",)),
    Row("api: time_budget=inf", "api", api=lambda w: textgen.train(w["text"], time_budget=float("inf"),
                                                                  out=w["fresh"]),
        says=("time_budget must be a finite number",)),
    Row("api: a run folder that holds a run", "api", api=lambda w: textgen.train(w["text"], out=w["run"], steps=2),
        says=("overwrite=True", "resume='")),
    Row("api: hidden_size=10**11", "api", api=lambda w: textgen.train(w["text"], hidden_size=10**11, out=w["fresh"],
                                                                     steps=2),
        says=("parameters and needs about", "hidden_size")),
    Row("api: an unknown setting", "api", api=lambda w: textgen.train(w["text"], hiden_size=64), says=("hiden_size",)),
    Row("api: a missing text", "api", api=lambda w: textgen.train(w["root"] + "/missing.txt", steps=2,
                                                                 out=w["fresh"]), says=("no such file",)),
]


def snapshot(root: str, fresh: str) -> dict:
    """sha256 of every file under root (and every folder), outside this row's fresh output folder."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) != fresh]
        seen[os.path.relpath(folder, root) + "/"] = None
        for name in files:
            if name == ".textgen.lock":
                continue          # a lock file holds its last holder's pid, rewritten by every claim
            path = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):           # the FIFO (opening it would block), links
                    seen[os.path.relpath(path, root)] = "not a regular file"
                    continue
                with open(path, "rb") as f:
                    seen[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
            except OSError:                                            # the unreadable file
                seen[os.path.relpath(path, root)] = "unreadable"
    return seen


@contextlib.contextmanager
def situation(row: Row, w: dict, monkeypatch):
    if row.context == "locked":
        holder = RunFolder(w["run"])
        holder.claim(new_run=False)            # another trainer, as far as the row can tell
        try:
            yield
        finally:
            holder.release()
    elif row.context == "port in use":
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            w["port"] = str(taken.getsockname()[1])
            yield
    elif row.context == "unreadable":
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Root reads a file whatever its mode (CI runs as root): the corpus reader's open fails
            # for that one file as it would for anyone else.
            from textgen import corpus
            target = os.path.realpath(os.path.join(w["files"], "unreadable.txt"))

            def denied(path, *args, **kwargs):
                if os.path.realpath(path) == target:
                    raise PermissionError(errno.EACCES, "Permission denied", path)
                return open(path, *args, **kwargs)
            monkeypatch.setattr(corpus, "open", denied, raising=False)
        yield
    elif row.context == "immutable":
        if subprocess.run(["chattr", "+i", w["frozen"]], capture_output=True).returncode != 0:
            if os.environ.get("CI") == "true":
                pytest.fail("chattr +i failed: CI runs as root on a filesystem that takes it")
            pytest.skip("chattr +i needs root and a filesystem that supports it")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", w["frozen"]], check=True)
    elif row.context == "disk full":
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(checkpoint.torch, "save", full)
        yield
    else:
        yield


def run_command(row: Row, args: list[str], capsys) -> tuple[int, str]:
    from textgen.cli import generate_main, textgen_main, train_main
    main = {"train": train_main, "generate": generate_main, "textgen": textgen_main}[row.command]
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as e:                    # argparse ends with SystemExit
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_a_bad_input_is_one_sentence_and_changes_nothing(row, world, tmp_path, monkeypatch, capsys):
    fresh = os.path.join(world["root"], f"fresh-{abs(hash(row.name))}")
    w = {**world, "fresh": fresh}
    monkeypatch.chdir(world["root"])          # a default run folder would appear here, and be caught
    with situation(row, w, monkeypatch):
        args = [a.format(**w) if isinstance(a, str) else a for a in row.args]
        before = snapshot(world["root"], fresh)
        if row.command == "api":
            with pytest.raises(UsageError) as raised:
                row.api(w)
            message = str(raised.value)
            assert "--" not in message, f"an API message names a flag: {message}"
            for fragment in row.says:
                assert fragment in message, (fragment, message)
        else:
            if row.command == "process":
                with open(row.stdout.format(**w), "wb") if row.stdout else contextlib.nullcontext(subprocess.PIPE) as out:
                    done = subprocess.run([sys.executable, os.path.join(ROOT, args[0]), *args[1:]],
                                          input=row.stdin, stdout=out, stderr=subprocess.PIPE, timeout=120,
                                          cwd=world["root"])
                code, err = done.returncode, done.stderr.decode("utf-8", "replace")
            else:
                code, err = run_command(row, args, capsys)
            assert "Traceback" not in err, err
            assert code == row.code, (code, err)
            lines = err.strip().splitlines()
            if row.says or code != 0:
                assert len(lines) == 1, f"stderr is not one line: {err!r}"
            else:
                assert lines == [], err
            for fragment in row.says:
                assert fragment.format(**w) in err, (fragment, err)
            for fragment in row.not_says:
                assert fragment not in err, (fragment, err)
        after = snapshot(world["root"], fresh)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    assert not os.path.exists(os.path.join(world["root"], "pwned")), "a hostile pickle ran code"
    for device in (world["full"], "/dev/full", "/dev/null"):      # written through, never renamed over
        assert stat.S_ISCHR(os.stat(device).st_mode), f"{device} is no longer a device"
    if row.code != 0 and row.context != "disk full":
        assert not os.path.exists(fresh), "a refused run left a folder behind"


def test_the_catalogue_holds_at_least_forty_rows_across_every_command():
    commands = {row.command for row in ROWS}
    assert len(ROWS) >= 40 and {"train", "generate", "textgen", "api", "process"} <= commands
    assert {"eval", "info", "plot", "serve"} <= {row.args[0] for row in ROWS if row.command == "textgen"}


def test_each_front_end_words_a_sentence_in_its_own_terms():
    """No message is translated back: a sentence names its settings, and the command line, the Python
    API and HTTP each word them (the API's regex over --flags is gone)."""
    from textgen.cli import cli_words
    from textgen.errors import SettingError
    from textgen.serving.http_app import http_words
    from textgen.cli import train_parser
    train_parser()                     # registers the flags the command line words settings with (--time)
    error = UsageError("runs/a already holds a textgen run; continue it with {resume}, or start over with "
                       "{overwrite}", resume="runs/a", overwrite=True)
    assert str(error) == ("runs/a already holds a textgen run; continue it with resume='runs/a', or start over "
                          "with overwrite=True")
    assert error.worded(cli_words) == ("runs/a already holds a textgen run; continue it with --resume runs/a, "
                                       "or start over with --overwrite")
    assert error.worded(http_words) == ('runs/a already holds a textgen run; continue it with "resume": "runs/a", '
                                        'or start over with "overwrite": true')
    late = SettingError("time_budget", "must be a positive number of seconds, got -3")
    assert (str(late), late.worded(cli_words)) == ("time_budget must be a positive number of seconds, got -3",
                                                 "--time must be a positive number of seconds, got -3")


def test_a_disk_that_fills_mid_run_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """The catalogue's full-disk row fails at the very first save, so there is no previous checkpoint
    there: here the disk fills at the second save, and the first one must stay whole, valid and latest."""
    from textgen.cli import train_main
    real_save, calls = checkpoint.torch.save, []

    def save_then_fill(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) == 2:
            f.write(b"PK\x03\x04 the first bytes of a checkpoint that never fits")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)
    monkeypatch.setattr(checkpoint.torch, "save", save_then_fill)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    out = tmp_path / "run"
    code = train_main([str(text), *TINY, "--steps", "20", "--save-every", "5", "--eval-every", "100",
                       "--sample-length", "0", "-q", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "disk full" in err and "latest.pt was left as it was" in err and f"--resume {out}" in err, err
    assert calls == [5, 10]
    kept = checkpoint.load(str(out / "latest.pt"))          # whole: its digest checks
    assert kept["step"] == 5 and checkpoint.load(str(out / "step-0000005.pt"))["step"] == 5
    assert not [n for n in os.listdir(out) if "tmp" in n], os.listdir(out)


def test_running_out_of_memory_mid_run_is_one_sentence_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from textgen.cli import train_main
    from textgen.training import loop
    real_step, calls = loop.train_step, []

    def step_then_fail(run):
        calls.append(run.progress.step)
        if len(calls) == 7:                       # after the checkpoint of step 5 (--save-every 5)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(run)
    monkeypatch.setattr(loop, "train_step", step_then_fail)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    out = str(tmp_path / "run")
    code = train_main([str(text), *TINY, "--steps", "20", "--save-every", "5", "--sample-length", "0", "-q",
                       "--out", out])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "ran out of memory at step 7" in err and "the checkpoint of step 5" in err and "is kept" in err
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] == 5


def test_a_reader_that_goes_away_is_no_error(world):
    """generate.py | head: the pipe closes under the writer; exit 0, nothing on stderr (a BrokenPipeError
    caught as a full disk's OSError once printed a traceback)."""
    job = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint", world["run"], "-q",
                            "--length", "200000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(job.stdout.read(10)) == 10
    job.stdout.close()
    assert job.wait(120) == 0
    assert job.stderr.read() == b""
