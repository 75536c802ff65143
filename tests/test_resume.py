"""Stop training any way at all; resuming gives exactly the run that never stopped (CPU)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, run
from textgen import run_folder
from textgen import checkpoint

FLAGS = ["--hidden-size", "48", "--embed-size", "16", "--layers", "2", "--dropout", "0.2", "--batch-size", "8",
         "--seq-len", "32", "--steps", "160", "--eval-every", "40", "--save-every", "10", "--log-every", "5",
         "--sample-length", "10", "--warmup-steps", "10", "-q"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The run that never stopped."""
    from conftest import small_text
    folder = tmp_path_factory.mktemp("ref")
    text = folder / "corpus.txt"
    text.write_text(small_text(600), encoding="utf-8")
    result = run("train.py", str(text), *FLAGS, "--out", str(folder / "run"))
    assert result.returncode == 0, result.stderr
    return str(text), checkpoint.load(str(folder / "run" / "latest.pt"))


def assert_same_run(ckpt, ref):
    assert ckpt["step"] == ref["step"]
    for name, tensor in ref["model"].items():
        assert torch.equal(ckpt["model"][name], tensor), name
    losses = lambda c: [(h["step"], h["train_loss"], h["val_loss"]) for h in c["history"]]  # noqa: E731
    assert losses(ckpt) == losses(ref)
    for (h, c), (rh, rc) in zip(ckpt["carried_state"], ref["carried_state"]):
        assert torch.equal(h, rh) and torch.equal(c, rc)


def start_training(text, out, flags=FLAGS):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), text, *flags, "--out", out,
                             "--log-every", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)


def wait_for_checkpoint(out, proc, step_at_least=20):
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail("training ended before it could be stopped: " + proc.stderr.read())
        if os.path.exists(os.path.join(out, run_folder.step_filename(step_at_least))):
            return
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_exact_resume_after_a_stop(reference, tmp_path, how):
    text, ref = reference
    out = str(tmp_path / "run")
    proc = start_training(text, out)
    wait_for_checkpoint(out, proc)
    proc.send_signal(getattr(signal, how))
    stdout, stderr = proc.communicate(timeout=120)
    if how == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 0, stderr
        assert f"stopped by {how}" in stdout and f"--resume {out}" in stdout
    stopped_at = checkpoint.load(os.path.join(out, "latest.pt"))["step"]
    assert 20 <= stopped_at < 160
    resumed = run("train.py", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(checkpoint.load(os.path.join(out, "latest.pt")), ref)


# Large enough for the paths the default configuration takes: 32 streams x 384 cells is past the
# kernel's threshold for splitting a step over threads, and the recurrent products (32 x 1536 x 384)
# are above the size where the weight is packed for oneDNN and above the whole-chunk C loop's.
THREADED_PACKED_FLAGS = ["--hidden-size", "384", "--embed-size", "16", "--layers", "2", "--dropout", "0.2",
                         "--batch-size", "32", "--seq-len", "16", "--steps", "24", "--eval-every", "12",
                         "--save-every", "8", "--log-every", "5", "--sample-length", "10", "--warmup-steps", "4"]


def kill_and_resume(text, out, flags, step_at_least, steps) -> dict:
    """Start a run, SIGKILL it once step_at_least is saved, resume it to the end: its latest.pt."""
    proc = start_training(text, out, flags)
    wait_for_checkpoint(out, proc, step_at_least=step_at_least)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] < steps
    resumed = run("train.py", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    return checkpoint.load(os.path.join(out, "latest.pt"))


def test_exact_resume_on_the_threaded_kernel_and_packed_products(tmp_path):
    from conftest import small_text
    import textgen.lstm.fused_lstm as fused
    from textgen.lstm import native_kernel, products
    # threaded steps, packed products, and not the whole-chunk C loop (FLAGS' small layers run that)
    assert 32 * 384 >= native_kernel.PARALLEL_MIN_CELLS
    assert 32 * 4 * 384 * 384 > max(products._SMALL_PRODUCT, fused._CHUNK_PRODUCT)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(600), encoding="utf-8")
    whole = run("train.py", str(text), *THREADED_PACKED_FLAGS, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    if native_kernel.load() is not None and torch.get_num_threads() > 1:
        assert "C kernel (threaded" in whole.stdout, whole.stdout
    ref = checkpoint.load(str(tmp_path / "whole" / "latest.pt"))
    ckpt = kill_and_resume(str(text), str(tmp_path / "stopped"), THREADED_PACKED_FLAGS, step_at_least=8, steps=24)
    assert_same_run(ckpt, ref)


KILL_DURING_SAVE = """
import os, signal, sys
import textgen.checkpoint as ck
real_replace, saves = os.replace, []
def replace(src, dst):
    if dst.endswith("latest.pt"):
        saves.append(dst)
        if len(saves) == 3:
            os.kill(os.getpid(), signal.SIGKILL)   # the new file is written, not yet renamed
    return real_replace(src, dst)
ck.os.replace = replace
from textgen.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


def test_a_kill_between_write_and_rename_leaves_a_loadable_latest(reference, tmp_path):
    text, ref = reference
    out = str(tmp_path / "run")
    proc = subprocess.run([sys.executable, "-c", KILL_DURING_SAVE, text, *FLAGS, "--out", out],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [n for n in os.listdir(out) if ".tmp-" in n]
    assert leftovers, "the kill should have left the unrenamed temporary file"
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] == 20
    resumed = run("train.py", "--resume", out)
    assert resumed.returncode == 0, resumed.stderr
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    assert_same_run(checkpoint.load(os.path.join(out, "latest.pt")), ref)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(text_file, tmp_path, monkeypatch, capsys):
    import torch.nn.functional as F
    from textgen.cli import train_main
    real, calls = F.cross_entropy, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 25 else loss

    monkeypatch.setattr(F, "cross_entropy", poisoned)
    out = str(tmp_path / "run")
    code = train_main([text_file, "--hidden-size", "32", "--batch-size", "4", "--seq-len", "16", "--steps", "100",
                       "--eval-every", "1000", "--save-every", "10", "--sample-length", "0", "--out", out, "-q"])
    assert code == 1
    assert "diverged at step 25" in capsys.readouterr().err
    ckpt = checkpoint.load(os.path.join(out, "latest.pt"))
    assert ckpt["step"] == 20
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


@pytest.mark.parametrize("poison", ["nan", "exploding"])
def test_a_diverged_step_never_reaches_the_weights_the_average_or_the_optimizer(text_file, tmp_path, monkeypatch,
                                                                                poison):
    """Step 7's loss turns NaN, or 50 times its size (an exploding loss): the run stops with StopTraining
    and the weights, the averaged weights, the AdamW moments and the step are exactly what step 6 left,
    as is latest.pt (saved after every step). A checkpoint is written before every step here, so a
    guard placed after optimizer.step() would leave the weights poisoned, and fail."""
    import copy
    import torch.nn.functional as F
    from textgen.errors import StopTraining
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run, loop, train
    real_loss, real_step, before = F.cross_entropy, loop.train_step, {}

    def poisoned_loss(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        if before:                                   # step 7's forward pass
            return loss * float("nan") if poison == "nan" else loss * 50
        return loss

    def recording_step(run):
        if run.progress.step == 6:
            before.update(model=copy.deepcopy(run.model.state_dict()),
                          averaged=copy.deepcopy(run.averaged.state_dict()),
                          optimizer=copy.deepcopy(run.optimizer.state_dict()))
        return real_step(run)

    monkeypatch.setattr(F, "cross_entropy", poisoned_loss)
    monkeypatch.setattr(loop, "train_step", recording_step)
    out = str(tmp_path / "run")
    trainer = build_run(ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=2, dropout=0.0),
                      TrainConfig(text=text_file, batch_size=4, seq_len=16, steps=20, time_budget=None, save_every=1,
                                  eval_every=1000, sample_length=0, warmup_steps=2, out=out, quiet=True),
                      explicit={"hidden_size", "layers", "dropout"}, log=lambda m: None)
    with pytest.raises(StopTraining, match="diverged at step 7" + (": the loss is nan" if poison == "nan" else
                                                                   ": the loss [0-9.]+ is far above")):
        train(trainer)
    assert trainer.progress.step == 6
    for name, tensor in before["model"].items():
        assert torch.equal(trainer.model.state_dict()[name], tensor), name
    for name, tensor in before["averaged"].items():
        assert torch.equal(trainer.averaged.state_dict()[name], tensor), name
    moments = trainer.optimizer.state_dict()["state"]
    for index, state in before["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(moments[index][key], value), (index, key)
    saved = checkpoint.load(os.path.join(out, "latest.pt"))
    assert saved["step"] == 6
    for name, tensor in before["model"].items():
        assert torch.equal(saved["model"][name], tensor), name


# -- float16: loss scaling is part of the exact state ------------------------------------------

FP16 = ["--hidden-size", "32", "--embed-size", "16", "--layers", "2", "--batch-size", "4", "--seq-len", "16",
        "--steps", "40", "--eval-every", "20", "--save-every", "10", "--log-every", "5", "--sample-length", "0",
        "--warmup-steps", "5", "--dtype", "float16", "-q"]


def eager_scaler(monkeypatch, **settings):
    """Make GradScaler move fast enough to matter in a 40-step run."""
    import functools
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, **settings))


def scaled_history(ckpt):
    return [(h["step"], h["train_loss"], h["val_loss"], h["loss_scale"], h["skipped_steps"]) for h in ckpt["history"]]


def test_float16_overflows_skip_steps_and_resume_exactly(text_file, tmp_path, monkeypatch, capsys):
    """An enormous starting scale overflows the fp16 gradients: those steps are skipped (not called
    divergence) and the scale falls, then probes upwards every 5 clean steps; stopped and resumed, the
    run (weights, losses, loss-scale history, scaler state) equals the one that never stopped."""
    from textgen import training
    from textgen.cli import train_main
    eager_scaler(monkeypatch, init_scale=2.0 ** 30, growth_interval=5)
    ref_dir = str(tmp_path / "ref")
    assert train_main([text_file, *FP16, "--out", ref_dir]) == 0
    assert "--dtype float16 is meant for GPUs" in capsys.readouterr().err
    ref = checkpoint.load(os.path.join(ref_dir, "latest.pt"))
    scales = [h["loss_scale"] for h in ref["history"]]
    assert sum(h["skipped_steps"] for h in ref["history"]) > 0          # it overflowed ...
    assert min(scales) < 2.0 ** 30 and ref["step"] == 40                # ... backed off and carried on
    assert all(torch.isfinite(t).all() for t in ref["model"].values())

    real_step = training.loop.train_step

    def stop_at_17(run):
        result = real_step(run)
        if run.progress.step == 17:
            os.kill(os.getpid(), signal.SIGINT)       # as a user's Ctrl-C, into the trainer's own handler
        return result

    monkeypatch.setattr(training.loop, "train_step", stop_at_17)
    out = str(tmp_path / "run")
    assert train_main([text_file, *FP16, "--out", out]) == 0
    assert checkpoint.load(os.path.join(out, "latest.pt"))["step"] == 17
    monkeypatch.setattr(training.loop, "train_step", real_step)
    assert train_main(["--resume", out, "-q"]) == 0
    resumed = checkpoint.load(os.path.join(out, "latest.pt"))
    assert_same_run(resumed, ref)
    assert scaled_history(resumed) == scaled_history(ref)
    assert resumed["scaler"] == ref["scaler"]


def test_float16_overflowing_at_every_scale_is_divergence(text_file, tmp_path, monkeypatch, capsys):
    from textgen import training
    from textgen.cli import train_main
    eager_scaler(monkeypatch, init_scale=2.0 ** 40)
    monkeypatch.setattr(training.step, "MIN_LOSS_SCALE", 2.0 ** 40)     # the first halving already counts
    code = train_main([text_file, *FP16, "--out", str(tmp_path / "run")])
    assert code == 1
    assert "float16 gradients overflow at every loss scale" in capsys.readouterr().err
