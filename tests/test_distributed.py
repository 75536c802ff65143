"""Data-parallel training on CPU/gloo, under torchrun and under train.py --workers (which starts the
ranks itself through torch's elastic launcher): the same result as one process over the same streams."""
import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run, small_text, train_here
from textgen import checkpoint
from textgen.errors import UsageError

# float32 and no dropout: one process and two then compute the same thing.
FLAGS = ["--hidden-size", "32", "--embed-size", "16", "--layers", "2", "--dropout", "0", "--dtype", "float32",
         "--batch-size", "4", "--seq-len", "16", "--steps", "20", "--eval-every", "10", "--save-every", "10",
         "--log-every", "5", "--sample-length", "0", "--warmup-steps", "5", "-q"]


def torchrun(*args, nproc=2, timeout=240, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", TEXTGEN_DIST_TIMEOUT="30", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def workers(*args, nproc=2, env_extra=None):
    """train.py starting its own ranks, as a user runs it: `train.py ... --workers 2`."""
    return run("train.py", *args, "--workers", str(nproc), env_extra={"TEXTGEN_DIST_TIMEOUT": "30", **(env_extra or {})})


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("ddp") / "corpus.txt"
    path.write_text(small_text(), encoding="utf-8")
    return str(path)


def assert_close_models(a, b, rtol=1e-5):
    """Each tensor within rtol of the other, measured over the whole tensor. Not element by element:
    Adam's first steps move a weight whose gradient is near its eps (1e-8) by lr * g / (|g| + eps),
    so two ranks rounding that gradient's sum differently can move that one weight by a good part of
    lr (seen: 1.6e-5 on one element of 2,048, the rest within 1e-7), where a real divergence moves them all."""
    for name, tensor in a["model"].items():
        other = b["model"][name]
        if tensor.is_floating_point():
            assert ((tensor - other).norm() / tensor.norm().clamp_min(1e-12)) <= rtol, name
        else:
            assert torch.equal(tensor, other), name


# The adaptive head with clusters so small and rare that on some steps a rank has no target in one.
@pytest.mark.parametrize("head", [[], ["--head", "adaptive", "--cutoffs", "4,12"]], ids=["full", "adaptive"])
def test_two_ranks_equal_one_process_over_the_same_streams(text, tmp_path, head):
    single = train_here(text, *FLAGS, *head, "--out", str(tmp_path / "single"))
    assert single.returncode == 0, single.stderr
    # One launch each way: torchrun, and train.py --workers starting the ranks itself.
    if head:
        ddp = workers(text, *FLAGS, *head, "--out", str(tmp_path / "ddp"))
    else:
        ddp = torchrun("train.py", text, *FLAGS, "--out", str(tmp_path / "ddp"))
    assert ddp.returncode == 0, ddp.stderr + ddp.stdout
    assert ddp.stdout.count("run folder") == 1 and ", 2 processes" in ddp.stdout      # only rank 0 speaks
    a = checkpoint.load(str(tmp_path / "single" / "latest.pt"))
    b = checkpoint.load(str(tmp_path / "ddp" / "latest.pt"))
    assert a["step"] == b["step"] == 20
    assert_close_models(a, b)
    assert_close_models({"model": a["averaged_model"]}, {"model": b["averaged_model"]})
    assert a["model_config"]["head"] == ("adaptive" if head else "full")
    for (h, c), (h2, c2) in zip(a["carried_state"], b["carried_state"]):
        assert h.shape == h2.shape == (4, 32)                    # the state of all global streams
        torch.testing.assert_close(h, h2, rtol=1e-4, atol=1e-5)
    val = [r["val_loss"] for r in a["history"] if r["val_loss"]], [r["val_loss"] for r in b["history"] if r["val_loss"]]
    assert val[0] == pytest.approx(val[1], rel=1e-5)


def test_a_distributed_checkpoint_resumes_in_one_process_and_a_one_process_one_under_torchrun(text, tmp_path):
    import shutil
    ddp = torchrun("train.py", text, *FLAGS, "--out", str(tmp_path / "run"))
    assert ddp.returncode == 0, ddp.stderr
    # Resume the distributed run's step-10 checkpoint in one process and train to step 20, in a folder of
    # its own (in place it would replace the run's later checkpoints, which is refused).
    resumed = train_here("--resume", str(tmp_path / "run" / "step-0000010.pt"), "--out", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 10 of 20" in resumed.stdout
    straight = train_here(text, *FLAGS, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0
    reference = checkpoint.load(str(tmp_path / "straight" / "latest.pt"))
    assert_close_models(checkpoint.load(str(tmp_path / "resumed" / "latest.pt")), reference)
    # ... and the other way: the one-process run's step-10 checkpoint, resumed by two torchrun ranks.
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "straight" / "step-0000010.pt", tmp_path / "other" / "step-0000010.pt")
    other = torchrun("train.py", "--resume", str(tmp_path / "other" / "step-0000010.pt"))
    assert other.returncode == 0, other.stderr + other.stdout
    assert "resuming at step 10 of 20" in other.stdout and ", 2 processes" in other.stdout
    continued = checkpoint.load(str(tmp_path / "other" / "latest.pt"))
    assert continued["step"] == 20
    assert_close_models(continued, reference)
    for (h, c), (h2, c2) in zip(continued["carried_state"], reference["carried_state"]):
        torch.testing.assert_close(h, h2, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, c2, rtol=1e-4, atol=1e-5)


FAILING_RANK = """
import os, sys
from textgen.training import loop
real = loop.train_step
def train_step(run):
    if run.dist.rank == 1 and run.progress.step == 5:
        raise RuntimeError("injected failure on rank 1")
    return real(run)
loop.train_step = train_step
from textgen.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def test_a_failing_rank_ends_the_job(text, tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    start = time.time()
    result = torchrun(str(script), text, *FLAGS, "--out", str(tmp_path / "run"),
                      env_extra={"PYTHONPATH": ROOT})
    assert result.returncode != 0
    assert time.time() - start < 120
    assert "injected failure on rank 1" in result.stderr + result.stdout


def test_an_elastic_restart_resumes_from_the_run_folder(text, tmp_path):
    out = str(tmp_path / "run")
    first = train_here(text, *FLAGS, "--steps", "10", "--out", out)
    assert first.returncode == 0
    # What torchrun --max-restarts sets when it restarts a failed job with the same arguments.
    before = checkpoint.load(os.path.join(out, "latest.pt"))["history"]
    again = train_here(text, *FLAGS, "--out", out, env_extra={"TORCHELASTIC_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr
    assert "resuming at step 10" in again.stdout
    history = checkpoint.load(os.path.join(out, "latest.pt"))["history"]
    assert [h["step"] for h in history] == [5, 10, 15, 20]
    assert history[:2] == before                      # the first attempt's steps, carried on, not redone


def test_a_distributed_run_resumes_exactly_with_the_same_world_size(text, tmp_path):
    import shutil
    full = tmp_path / "full"
    assert torchrun("train.py", text, *FLAGS, "--out", str(full)).returncode == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "step-0000010.pt", resumed / "step-0000010.pt")
    again = workers("--resume", str(resumed / "step-0000010.pt"))       # torchrun's ranks, resumed by --workers
    assert again.returncode == 0, again.stderr
    a, b = checkpoint.load(str(full / "latest.pt")), checkpoint.load(str(resumed / "latest.pt"))
    assert a["step"] == b["step"] == 20
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for (h, c), (h2, c2) in zip(a["carried_state"], b["carried_state"]):
        assert torch.equal(h, h2) and torch.equal(c, c2)


def start_until_saved(cmd, env, out, log_path):
    """Popen a training job (output to a file, not a pipe: nothing left behind can block the test)
    and wait until it has written latest.pt; returns (job, log)."""
    log = open(log_path, "w")
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "latest.pt")):
        if job.poll() is not None or time.time() >= deadline:
            job.kill()
            log.close()
            pytest.fail(open(log_path).read())
        time.sleep(0.05)
    return job, log


def test_under_torchrun_rank_0_holds_the_run_folder(text, tmp_path):
    """A second trainer is refused while a 2-rank job trains, and the pid it names is rank 0's."""
    import signal
    out = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1", TEXTGEN_DIST_TIMEOUT="30", PYTHONUNBUFFERED="1")
    flags = [f if f != "20" else "100000" for f in FLAGS]                  # runs until stopped
    job, log = start_until_saved([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc_per_node=2", "train.py", text, *flags, "--out", out],
                                 env, out, tmp_path / "job.log")
    try:
        with open(os.path.join(out, ".textgen.lock")) as f:
            holder = int(f.read())
        second = train_here("--resume", out)
        assert second.returncode == 2 and f"in use by another training process (pid {holder})" in second.stderr
        with open(f"/proc/{holder}/environ", "rb") as f:                # the holder is one of the job's ranks ...
            environ = f.read().split(b"\0")
        assert b"RANK=0" in environ                                      # ... rank 0
    finally:
        job.send_signal(signal.SIGTERM)        # torchrun passes it on; each rank saves and stops
        try:
            job.wait(timeout=120)
        finally:
            log.close()
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] >= 10


def test_workers_auto_takes_one_process_a_core_where_the_streams_divide(monkeypatch):
    from textgen.training import launch
    for name in ("RANK", "WORLD_SIZE", "OMP_NUM_THREADS", launch.LAUNCHED):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert launch.choose_workers("auto", "cpu", 64) == 4
    assert launch.choose_workers("auto", "cpu", 24) == 3           # 4 does not divide 24
    assert launch.choose_workers("auto", "cpu", 16) == 2           # 4 would leave each rank 4 streams
    assert launch.choose_workers("auto", "cpu", 13) == 1
    assert launch.choose_workers("auto", "cpu", None) == 1         # a resumed run whose batch is unknown
    assert launch.choose_workers("auto", "cuda", 64) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")                        # the cores shared out by the user
    assert launch.choose_workers("auto", "cpu", 64) == 1
    assert launch.choose_workers(3, "cpu", 63) == 3                # asked for, whatever the cores
    with pytest.raises(UsageError, match="divisible by --workers 3"):
        launch.choose_workers(3, "cpu", 64)
    with pytest.raises(UsageError, match="torchrun"):
        launch.choose_workers(2, "cuda", 64)
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(UsageError, match="--workers must be auto or a whole number"):
            launch.parse_workers(bad)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.choose_workers("auto", "cpu", 64) == 1           # a rank never launches ranks
    with pytest.raises(UsageError, match="--nproc_per_node"):
        launch.choose_workers(2, "cpu", 64)


def test_workers_auto_reads_a_resumed_runs_batch_size_from_its_folder(tmp_path):
    from textgen.training import launch
    (tmp_path / "config.json").write_text('{"train": {"batch_size": 48}}', encoding="utf-8")
    assert launch.resumed_batch_size(str(tmp_path)) == 48
    assert launch.resumed_batch_size(str(tmp_path / "step-0000010.pt")) == 48      # a file in the folder
    (tmp_path / "config.json").write_text("not json", encoding="utf-8")
    assert launch.resumed_batch_size(str(tmp_path)) is None
    assert launch.resumed_batch_size(str(tmp_path / "elsewhere")) is None


def test_a_mistake_under_workers_is_one_sentence_from_rank_0(text, tmp_path):
    missing = workers(str(tmp_path / "missing.txt"), *FLAGS)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'missing.txt'}: no such file"]
    uneven = workers(text, *FLAGS, "--batch-size", "5")               # refused before any rank starts
    assert uneven.returncode == 2 and "divisible by --workers 2" in uneven.stderr
    assert len(uneven.stderr.strip().splitlines()) == 1


def ranks_of(mark: str) -> list[int]:
    """The pids of live processes whose environment holds mark."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; the parent-death signal is Linux's")
@pytest.mark.parametrize("how", ["SIGINT", "SIGKILL"])
def test_stopping_train_py_stops_its_ranks_and_they_save(text, tmp_path, how):
    """Ctrl-C reaches the launching process only (the ranks sit in sessions of their own); even a
    SIGKILL of it leaves no rank training on."""
    import signal
    import uuid
    out = str(tmp_path / "run")
    marker = str(uuid.uuid4())
    env = dict(os.environ, TEXTGEN_DIST_TIMEOUT="30", PYTHONUNBUFFERED="1", TEXTGEN_WORKERS="2",
               OMP_NUM_THREADS="2", TEXTGEN_TEST_MARK=marker)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    mark = f"TEXTGEN_TEST_MARK={marker}"
    flags = [f if f != "20" else "100000" for f in FLAGS]                  # runs until stopped
    job, log = start_until_saved([sys.executable, "train.py", text, *flags, "--out", out], env, out,
                                 tmp_path / "job.log")
    try:
        assert len(ranks_of(mark)) == 3                                   # train.py and its two ranks
        job.send_signal(getattr(signal, how))
        assert job.wait(timeout=120) == (0 if how == "SIGINT" else -signal.SIGKILL)
        deadline = time.time() + 60
        while ranks_of(mark):
            assert time.time() < deadline, "ranks still running after their launcher stopped"
            time.sleep(0.1)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    said = (tmp_path / "job.log").read_text()
    signal_name = "SIGINT" if how == "SIGINT" else "SIGTERM"                # a dead parent sends SIGTERM
    assert said.count(f"{signal_name}: finishing this step") == 1, said    # said once, by rank 0
    assert said.count(f"stopped by {signal_name} at step") == 1, said
    stopped_at = int(said.split(f"stopped by {signal_name} at step ")[1].split(";")[0])
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] == stopped_at


def test_of_the_ranks_workers_started_only_rank_0_reports_a_failure(monkeypatch, capsys):
    from textgen.training import launch
    from textgen.cli import run_main

    def out_of_memory(argv):
        raise MemoryError

    def bad_flag(argv):
        raise UsageError("--lr must be positive")
    monkeypatch.setenv(launch.LAUNCHED, "2")
    for rank, said in (("0", True), ("1", False)):
        monkeypatch.setenv("RANK", rank)
        assert run_main(out_of_memory, []) == 1 and run_main(bad_flag, []) == 2
        err = capsys.readouterr().err
        assert ("error: out of memory" in err and "error: --lr must be positive" in err) == said, (rank, err)
        assert err == "" or said
