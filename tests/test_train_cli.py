"""train.py as a user runs it: trains, writes checkpoints, resumes; refuses bad input clearly."""
import json
import os

import pytest

from conftest import TINY, assert_user_error, run, small_text, train_here
from textgen import run_folder
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
    # ... more than the characters' frequencies: the held-out tail costs the model less than it costs
    # the unigram model of the training text (3.20 against 3.08 seen; an untrained model pays ln V, 3.66).
    import numpy as np
    from textgen.data import split_tokens
    from textgen.tokenizer import CharTokenizer
    ids = CharTokenizer.from_dict(ckpt["vocab"]).encode(open(text_file, encoding="utf-8").read())
    train_ids, val_ids = split_tokens(ids, 0.1)
    frequencies = np.bincount(train_ids, minlength=len(ckpt["vocab"]["chars"])) + 0.5
    unigram = -np.log(frequencies / frequencies.sum())[val_ids[1:]].mean()
    assert ckpt["history"][-1]["val_loss"] < unigram - 0.05, (ckpt["history"][-1]["val_loss"], unigram)


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
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run
    from textgen.training.step import restart_one_stream, train_step
    run = build_run(ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=2),
                    TrainConfig(text=text_file, batch_size=4, seq_len=16, steps=10, sample_length=0,
                                out=str(tmp_path / "run"), quiet=True),
                    explicit={"hidden_size", "layers", "dropout"}, log=lambda m: None)
    for _ in range(6):
        train_step(run)
    state = run.progress.state
    restarted = restart_one_stream(state, run.progress.step, 4, run.dist)      # step 6: stream 6 % 4 == 2
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
    monkeypatch.setattr(training.build, "native_bf16", lambda device: native)
    result = train_here(text_file, *TINY, "--steps", "2", "--dtype", "bfloat16", "--out", str(tmp_path / "run"), "-q")
    assert result.returncode == 0, result.stderr
    warned = "no native bfloat16" in result.stderr and "--dtype auto picks float32" in result.stderr
    assert warned != native, result.stderr


def test_a_step_is_adamw_on_the_clipped_gradients_with_no_decay_on_biases_and_the_embedding(text_file, tmp_path):
    """The first step by hand: the gradients of the same batch, clipped to --grad-clip as
    torch.nn.utils.clip_grad_norm_ defines it (scaled by clip / (norm + 1e-6) when the norm is
    larger), then torch.optim.AdamW with weight decay on the weight matrices only. A bias moves
    exactly as AdamW without decay moves it, and measurably unlike AdamW with decay."""
    import copy

    import torch
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run
    clip, decay = 0.05, 0.3
    run = build_run(ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=2, dropout=0.0),
                      TrainConfig(text=text_file, batch_size=4, seq_len=16, steps=10, time_budget=None, warmup_steps=0,
                                  weight_decay=decay, grad_clip=clip, ema=0.0, dtype="float32", sample_length=0,
                                  out=str(tmp_path / "run"), quiet=True),
                      explicit={"hidden_size", "layers", "dropout"}, log=lambda m: None)
    named = dict(run.model.named_parameters())
    matrices = {name for name in named if name.startswith(("lstm.weight_", "head.weight"))}
    assert matrices and len(matrices) == sum(p.dim() == 2 for p in named.values()) - 1     # all but the embedding
    groups = {group["weight_decay"]: {id(p) for p in group["params"]} for group in run.optimizer.param_groups}
    assert isinstance(run.optimizer, torch.optim.AdamW) and set(groups) == {decay, 0.0}
    assert groups[decay] == {id(named[name]) for name in matrices}
    assert groups[0.0] == {id(p) for name, p in named.items() if name not in matrices}     # biases, embedding

    x, y = copy.deepcopy(run.loader).next_batch()           # the batch the step will take
    loss, _ = run.model(torch.from_numpy(x), None, targets=torch.from_numpy(y))
    raw = dict(zip(named, torch.autograd.grad(loss, list(named.values()))))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in raw.values()])).item()
    assert norm > 4 * clip                                      # the clip is at work
    before = {name: p.detach().clone() for name, p in named.items()}
    from textgen.training.step import train_step
    _, grad_norm = train_step(run)
    assert grad_norm == pytest.approx(norm, rel=1e-6)           # the norm logged is the one before clipping
    clipped = {name: g * (clip / (norm + 1e-6)) for name, g in raw.items()}
    for name, p in named.items():
        torch.testing.assert_close(p.grad, clipped[name], rtol=1e-5, atol=1e-9)
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in named.values()])).item() == \
        pytest.approx(clip, rel=1e-5)

    def adamw(decayed: set[str]) -> dict:
        leaves = {name: before[name].clone().requires_grad_() for name in named}
        for name, leaf in leaves.items():
            leaf.grad = clipped[name].clone()
        reference = torch.optim.AdamW([{"params": [leaves[n] for n in named if n in decayed], "weight_decay": decay},
                                       {"params": [leaves[n] for n in named if n not in decayed], "weight_decay": 0.0}],
                                      lr=run.optimizer.param_groups[0]["lr"], betas=(0.9, 0.99))
        reference.step()
        return {name: leaf.detach() for name, leaf in leaves.items()}

    expected, everything_decayed = adamw(matrices), adamw(set(named))
    for name, p in named.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=0, atol=1e-7)
    for name in ("lstm.bias_ih_l0", "embedding.weight"):
        assert (named[name].detach() - everything_decayed[name]).abs().max() > 100 * 1e-7, name


def machine_has_native_bf16() -> bool:
    """Read here from /proc/cpuinfo, apart from textgen.machine: README's rule is AVX512-BF16 or AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_dtype_and_device_auto_choose_what_this_machine_has(text_file, tmp_path):
    """No detection patched: the default run (--device auto --dtype auto) trains on this machine's
    device with bf16 products exactly where the CPU has native bf16, and records what it chose."""
    import torch
    from textgen.devices import resolve_device
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run, train
    if torch.cuda.is_available():
        device, dtype = "cuda", "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, dtype = "mps", "float32"
    else:
        device, dtype = "cpu", "bfloat16" if machine_has_native_bf16() else "float32"
    assert resolve_device("auto").type == device
    lines = []
    run = build_run(ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=1, dropout=0.0),
                      TrainConfig(text=text_file, batch_size=4, seq_len=16, steps=2, time_budget=None, sample_length=0,
                                  out=str(tmp_path / "run"), quiet=True),
                      explicit={"hidden_size", "layers", "dropout"}, log=lines.append)
    assert run.device.type == device and run.config.dtype == dtype
    assert run.model.lstm.matmul_dtype == {"bfloat16": torch.bfloat16, "float32": None}[dtype]
    train(run, log=lines.append)
    assert f"device {device}" in next(line for line in lines if line.startswith("run folder"))
    assert f"({dtype}, " in next(line for line in lines if line.startswith("run folder"))
    assert checkpoint.load(str(tmp_path / "run" / "latest.pt"))["train_config"]["dtype"] == dtype


def test_device_auto_prefers_cuda_then_mps_then_the_cpu(monkeypatch):
    import torch
    from textgen.devices import resolve_device
    for cuda, mps, expected in ((True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
        assert resolve_device("auto").type == expected


def test_train_py_keeps_the_last_keep_step_checkpoints_as_hard_links(text_file, tmp_path):
    """--keep 2 with a save every 5 steps: the two newest step files remain, each the file latest.pt
    was when it was written (a hard link: one inode, no extra disk), best.pt the file of its step."""
    out = tmp_path / "run"
    result = train_here(text_file, *TINY, "--steps", "30", "--save-every", "5", "--keep", "2", "--out", str(out), "-q")
    assert result.returncode == 0, result.stderr
    steps = sorted(name for name in os.listdir(out) if name.startswith("step-"))
    assert steps == [run_folder.step_filename(25), run_folder.step_filename(30)]
    assert os.path.samefile(out / "latest.pt", out / steps[1]) and os.stat(out / "latest.pt").st_nlink >= 2
    assert not os.path.samefile(out / steps[0], out / steps[1])
    assert checkpoint.load(str(out / steps[0]))["step"] == 25
    best = checkpoint.load(str(out / "best.pt"))
    assert best["step"] in (10, 20, 30) and best["best_val_loss"] == checkpoint.load(str(out / "latest.pt"))["best_val_loss"]
    if best["step"] == 30:
        assert os.path.samefile(out / "best.pt", out / "latest.pt")
    none = tmp_path / "none"
    assert train_here(text_file, *TINY, "--steps", "10", "--save-every", "5", "--keep", "0", "--out", str(none), "-q") \
        .returncode == 0
    assert not [name for name in os.listdir(none) if name.startswith("step-")]
