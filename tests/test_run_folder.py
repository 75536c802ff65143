"""Run folders: never overwritten by accident, one trainer at a time, readable while training writes."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import textgen
from conftest import ROOT, TINY, assert_user_error, small_text, train_here
from textgen import run_folder
from textgen import checkpoint
from textgen.run_folder import RunFolder, default_path, survey


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(small_text(), encoding="utf-8")
    return str(path)


def train(corpus, out, *flags, steps=3):
    return train_here(corpus, *TINY, "--steps", str(steps), "--save-every", "1", "--sample-length", "0",
               "-q", "--out", out, *flags)


def test_retyping_a_command_without_resume_is_refused_and_overwrite_starts_clean(corpus, tmp_path):
    """The issue's slip: a 3-step run, then a 2-step run of another size into the same folder."""
    out = str(tmp_path / "runs" / "a")
    assert train(corpus, out, "--hidden-size", "32").returncode == 0
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    assert "step-0000003.pt" in before
    again = train(corpus, out, "--hidden-size", "16", steps=2)
    assert_user_error(again, f"{out} already holds a textgen run", f"--resume {out}", "--overwrite")
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    over = train(corpus, out, "--hidden-size", "16", "--overwrite", steps=2)
    assert over.returncode == 0, over.stderr
    names = set(os.listdir(out))
    assert "step-0000003.pt" not in names and "step-0000002.pt" in names      # nothing of the old run is left
    assert checkpoint.load(os.path.join(out, "latest.pt"))["model_config"]["hidden_size"] == 16
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line)["step"] for line in f]
    assert logged and max(logged) == 2                                        # only the new run's lines
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model"]["hidden_size"] == 16


def test_overwrite_deletes_nothing_when_the_new_run_cannot_start(corpus, tmp_path):
    out = str(tmp_path / "a")
    assert train(corpus, out).returncode == 0
    before = sorted(os.listdir(out))
    failed = train(corpus, out, "--overwrite", "--seq-len", "100000")         # the text is far too short
    assert_user_error(failed, "need at least")
    assert sorted(os.listdir(out)) == before


def test_two_runs_started_in_the_same_second_get_two_folders(tmp_path):
    root = str(tmp_path / "checkpoints")
    folders = [default_path("corpus", root) for _ in range(3)]
    assert len(set(folders)) == 3 and all(os.path.isdir(f) and not os.listdir(f) for f in folders)


def start(corpus, out, *flags, steps=400):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), corpus, *TINY, "--steps", str(steps),
                             "--save-every", "2", "--log-every", "2", "--eval-every", "20", "--sample-length", "0",
                             "-q", "--out", out, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            pytest.fail("training ended early: " + proc.stderr.read())
        time.sleep(0.02)
    pytest.fail(f"{path} never appeared")


def test_a_second_trainer_on_a_running_folder_is_refused_with_the_holders_pid(corpus, tmp_path):
    out = str(tmp_path / "run")
    first = start(corpus, out)
    try:
        wait_for(os.path.join(out, "latest.pt"), first)
        resumed = train_here("--resume", out)
        assert_user_error(resumed, f"the run folder {out} is in use by another training process (pid {first.pid})")
        new = train(corpus, out, "--overwrite")
        assert_user_error(new, "in use by another training process", f"pid {first.pid}")
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 0


def test_a_killed_trainer_leaves_no_stale_lock(corpus, tmp_path):
    out = str(tmp_path / "run")
    proc = start(corpus, out, steps=40)
    wait_for(os.path.join(out, run_folder.step_filename(4)), proc)
    proc.kill()
    proc.communicate(timeout=60)
    resumed = train_here("--resume", out)                      # the kernel dropped the dead process's lock
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] == 40


def test_readers_never_see_a_half_written_file_while_training_saves(corpus, tmp_path):
    """Generate, inspect and plot a run in a loop, in this process, while another process trains and
    saves it every other step: every read succeeds."""
    from textgen.cli import textgen_main
    from textgen.run_folder import read_metrics
    out = str(tmp_path / "run")
    proc = start(corpus, out, steps=100_000)          # stopped by SIGINT once enough reads overlapped saves
    reads = 0
    try:
        wait_for(os.path.join(out, "best.pt"), proc)
        while proc.poll() is None and reads < 20:
            model = textgen.load(out)
            assert len(model.generate("the ", length=8, seed=reads)) == 8
            for prefer_best in (False, True):
                checkpoint.load(run_folder.resolve(out, prefer_best=prefer_best))
            assert read_metrics(out)
            with open(os.path.join(out, "config.json")) as f:
                assert json.load(f)["model"]["hidden_size"] == 32
            assert textgen_main(["info", out]) == 0
            reads += 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert reads == 20, f"training ended after only {reads} reads"
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] > 20     # it saved all the while
    holds_run, ours, others = survey(out)
    assert holds_run and others == [] and not [n for n in ours if ".tmp-" in n]


def test_the_lock_is_released_when_a_run_ends_in_this_process(corpus, tmp_path):
    """The Python API trains in a long-lived process: after train() returns, the folder is free."""
    out = str(tmp_path / "run")
    textgen.train(corpus, out=out, steps=2, hidden_size=16, embed_size=8, batch_size=4, seq_len=16,
                  sample_length=0, log=lambda message: None)
    folder = RunFolder(out)
    folder.claim(new_run=False)             # would raise "in use" if the trainer still held it
    folder.release()


def test_metrics_readers_skip_a_line_still_being_appended(tmp_path):
    from textgen.run_folder import read_metrics
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": 3.0}\n{"step": 2, "train_lo')
    assert read_metrics(str(tmp_path)) == [{"step": 1, "train_loss": 3.0}]
