"""train.py as a user runs it: trains, writes checkpoints, resumes; refuses bad input clearly."""
import json
import os

import pytest

from conftest import TINY, assert_user_error, run, small_text, train_here
from textgen import checkpoint
from textgen.cli import train_main


def test_train_then_resume_continues_at_the_next_step(text_file, tmp_path):
    out = str(tmp_path / "run")
    first = train_here(text_file, *TINY, "--steps", "20", "--out", out)
    assert first.returncode == 0, first.stderr
    assert "new best val loss" in first.stdout and "--- sample at step 10 ---" in first.stdout
    for name in ("latest.pt", "best.pt", "config.json", "metrics.jsonl", "step-0000020.pt"):
        assert os.path.exists(os.path.join(out, name)), name
    ckpt = checkpoint.load(os.path.join(out, "latest.pt"))
    assert ckpt["step"] == 20 and ckpt["loader"]["train"]["position"] == 20
    assert len(ckpt["carried_state"]) == 2 and ckpt["carried_state"][0][0].shape == (4, 32)

    second = run("train.py", "--resume", out, "--steps", "30")
    assert second.returncode == 0, second.stderr
    assert "resuming at step 20 of 30" in second.stdout
    assert "steps 20 -> 30" in second.stdout                     # the changed setting is reported
    ckpt = checkpoint.load(os.path.join(out, "latest.pt"))
    assert ckpt["step"] == 30 and ckpt["loader"]["train"]["position"] == 30
    logged = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert logged == [5, 10, 15, 20, 25, 30]
    train_losses = [h["train_loss"] for h in ckpt["history"]]
    assert train_losses[-1] < train_losses[0]                     # it learns


def test_resume_refuses_an_architecture_change_naming_the_field(text_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_main([text_file, *TINY, "--steps", "10", "--out", out, "-q"]) == 0
    assert train_main(["--resume", out, "--hidden-size", "64"]) == 2
    assert "hidden_size (checkpoint 32, now 64)" in capsys.readouterr().err


def test_resume_on_a_different_text_is_refused_unless_asked(text_file, tmp_path, capsys):
    out = str(tmp_path / "run")
    assert train_main([text_file, *TINY, "--steps", "10", "--out", out, "-q"]) == 0
    other = tmp_path / "other.txt"
    other.write_text(small_text(300)[::-1], encoding="utf-8")       # same characters, other text
    assert train_main([str(other), "--resume", out, "--steps", "12"]) == 2
    assert "is not the text this run was trained on" in capsys.readouterr().err
    assert train_main([str(other), "--resume", out, "--steps", "12", "--allow-new-text", "-q"]) == 0
    new_chars = tmp_path / "new.txt"
    new_chars.write_text(small_text(300) + "ß", encoding="utf-8")
    assert train_main([str(new_chars), "--resume", out, "--steps", "14", "--allow-new-text"]) == 2
    assert "not in the model's vocabulary" in capsys.readouterr().err


@pytest.mark.parametrize("content, flags, message", [
    (None, [], "no such file"),
    ("DIR", [], "is a folder with no files in it"),
    (b"", [], "is empty"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", [], "binary"),
    (b"abc \xe9t\xe9 latin-1", [], "not valid UTF-8 (bad byte at offset 4)"),
    ("short", [], "need at least"),
    ("ok", ["--hidden-size", "0"], "hidden-size must be a positive integer"),
    ("ok", ["--dropout", "1.0"], "dropout must be in [0, 1)"),
    ("ok", ["--batch-size", "-3"], "--batch-size must be a whole number from 1 to 1,000,000,000,000, got -3"),
    ("ok", ["--lr", "0"], "--lr must be from 1e-9 to 10, got 0"),
    ("ok", ["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    ("ok", ["--resume", "/nonexistent/run"], "no such checkpoint"),
])
def test_bad_input_gets_one_sentence_and_exit_code_2(tmp_path, capsys, content, flags, message):
    path = tmp_path / "input.txt"
    if content == "DIR":
        path = tmp_path
    elif content == "short":
        path.write_text("too short for a chunk per stream", encoding="utf-8")
    elif content == "ok":
        path.write_text(small_text(), encoding="utf-8")
    elif content is not None:
        path.write_bytes(content)
    code = train_main([str(path), *TINY, "--steps", "2", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_input_from_the_real_command_line(tmp_path):
    path = tmp_path / "bin.dat"
    path.write_bytes(bytes(range(256)) * 10)
    assert_user_error(run("train.py", str(path)), "binary")


def test_each_step_restarts_exactly_one_stream_in_turn(text_file, tmp_path):
    import torch
    from textgen.model import ModelConfig
    from textgen.training import Trainer, TrainConfig
    trainer = Trainer(ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=2),
                      TrainConfig(text=text_file, batch_size=4, seq_len=16, steps=10, sample_length=0,
                                  out=str(tmp_path / "run"), quiet=True),
                      explicit={"hidden_size", "layers", "dropout"}, log=lambda m: None)
    for _ in range(6):
        trainer.train_step()
    state = trainer.state
    restarted = trainer.restart_one_stream(state)              # step 6: stream 6 % 4 == 2
    for (h, c), (rh, rc) in zip(state, restarted):
        assert torch.equal(rh[2], torch.zeros(16)) and torch.equal(rc[2], torch.zeros(16))
        keep = [0, 1, 3]
        assert torch.equal(rh[keep], h[keep]) and torch.equal(rc[keep], c[keep])
        assert h[2].abs().sum() > 0                             # the carried state itself is untouched


@pytest.mark.parametrize("native", [False, True])
def test_bfloat16_asked_for_on_a_cpu_without_it_trains_and_says_why_it_is_slow(native, text_file, tmp_path,
                                                                             monkeypatch):
    """On an AVX2-only CPU (AMD EPYC Zen 3) bf16 products are emulated, about 30x slower than
    float32: the run goes ahead, with one warning; where bf16 is native nothing is said."""
    from textgen import training
    monkeypatch.setattr(training, "native_bf16", lambda device: native)
    result = train_here(text_file, *TINY, "--steps", "2", "--dtype", "bfloat16", "--out", str(tmp_path / "run"), "-q")
    assert result.returncode == 0, result.stderr
    warned = "no native bfloat16" in result.stderr and "--dtype auto picks float32" in result.stderr
    assert warned != native, result.stderr
