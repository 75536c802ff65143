"""Run folders, inspection, plots, the Python API and CLI conventions."""
import json
import os
import re
import shutil
import sys

import pytest

from conftest import ROOT, TINY, run, small_text, train_here
from textgen.cli import info_main, plot_main


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run[0]


def test_run_folder_holds_config_metrics_and_checkpoints(run_dir):
    config = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["model"]["hidden_size"] == 32 and config["train"]["batch_size"] == 4
    assert config["corpus"]["sha256"] and config["parameters"] > 0
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    for row in rows:
        assert {"step", "time", "train_loss", "val_loss", "lr", "grad_norm", "chars_per_sec"} <= set(row)
        assert row["chars_per_sec"] > 0 and row["lr"] > 0
    assert [r["step"] for r in rows if r["val_loss"] is not None] == [10, 20, 30]
    assert {"latest.pt", "best.pt"} <= set(os.listdir(run_dir))
    # best.pt is the checkpoint of the step with the lowest validation loss; latest.pt the last step's
    from textgen.checkpoint import load
    best_row = min((r for r in rows if r["val_loss"] is not None), key=lambda r: r["val_loss"])
    best = load(os.path.join(run_dir, "best.pt"))
    assert best["step"] == best_row["step"] and best["best_val_loss"] == pytest.approx(best_row["val_loss"], rel=1e-12)
    assert load(os.path.join(run_dir, "latest.pt"))["step"] == 30


def test_default_run_folder_and_name(tmp_path):
    text = tmp_path / "my story.txt"
    text.write_text(small_text(), encoding="utf-8")
    assert train_here(str(text), *TINY, "--steps", "5", "-q", cwd=str(tmp_path)).returncode == 0
    (folder,) = os.listdir(tmp_path / "checkpoints")
    assert re.fullmatch(r"my story-\d{8}-\d{6}", folder)
    assert train_here(str(text), *TINY, "--steps", "5", "-q", "--name", "mine", cwd=str(tmp_path)).returncode == 0
    assert os.path.exists(tmp_path / "checkpoints" / "mine" / "latest.pt")
    again = run("generate.py", "--length", "10", "--seed", "1", cwd=str(tmp_path))   # the most recent run
    assert again.returncode == 0 and "checkpoints/mine" in again.stderr


def test_info_names_the_right_numbers(run_dir, capsys):
    from textgen.checkpoint import load, load_model
    assert info_main([run_dir]) == 0
    out = capsys.readouterr().out
    model, tok, _ = load_model(run_dir)
    ckpt = load(os.path.join(run_dir, "latest.pt"))
    assert f"parameters   {model.num_parameters():,}" in out
    assert "2 x LSTM 32 with residual connections, embedding 16" in out
    assert f"vocabulary   {tok.vocab_size} characters" in out and "É" in out and "\\n" in out
    assert "steps        30 of 30" in out
    assert f"{ckpt['best_val_loss']:.4f} nats/char" in out


def test_plot_writes_a_png(run_dir, tmp_path, monkeypatch):
    """The PNG holds the figure drawn, 1200 x 450 pixels and not blank, and the figure holds each run's
    metrics: train loss at every logged step and validation loss where there was one, against steps
    and against seconds, one pair of curves per run, labelled with its name."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure
    from matplotlib.image import imread
    from textgen.run_folder import read_metrics
    figures, real_savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: figures.append(fig) or real_savefig(fig, *a, **k))
    out = tmp_path / "loss.png"
    assert plot_main([run_dir, run_dir, "--output", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(str(out))
    assert pixels.shape[:2] == (450, 1200) and len(set(map(tuple, pixels.reshape(-1, pixels.shape[2])))) > 10
    (figure,) = figures
    rows = read_metrics(run_dir)
    val = [r for r in rows if r["val_loss"] is not None]
    assert len(rows) == 6 and len(val) == 3
    name = os.path.basename(os.path.normpath(run_dir))
    for ax, x, label in zip(figure.axes, ("step", "time"), ("step", "seconds")):
        assert ax.get_xlabel() == label and ax.get_ylabel() == "loss (nats/char)"
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == [f"{name} train", f"{name} val"] * 2
        for train, validation in (lines[:2], lines[2:]):
            assert list(train.get_xdata()) == [r[x] for r in rows]
            assert list(train.get_ydata()) == [r["train_loss"] for r in rows]
            assert list(validation.get_xdata()) == [r[x] for r in val]
            assert list(validation.get_ydata()) == [r["val_loss"] for r in val]


@pytest.mark.parametrize("every, seconds_per_step, drawn_at", [(0.0, 0.5, [10, 20, 30]), (30.0, 0.5, [30]),
                                                              (30.0, 2.0, [20, 30])])
def test_training_draws_loss_png_at_reports_at_most_every_plot_every_s_and_at_the_end(every, seconds_per_step, drawn_at,
                                                                                     tmp_path, monkeypatch):
    """Reports (validations) at steps 10, 20 and 30 of a run whose clock is simulated, so that no
    machine is too slow for it: with no minimum spacing every report draws loss.png; at 30 s, a run of
    15 s draws it once, at its last step, and one of 60 s at step 20 (40 s in) and at the end (step 10,
    20 s in, is too soon after the start)."""
    pytest.importorskip("matplotlib")
    from textgen import plot as loss_plot
    from textgen.training import reporter
    from conftest import train_tiny
    from test_evaluate import _simulate_the_clock
    _simulate_the_clock(monkeypatch, lambda step: seconds_per_step)
    drawn, real_draw, real_plot = [], loss_plot.plot_runs, reporter.Reporter.plot

    def plot(report, last_step):
        step = report.run.progress.step
        monkeypatch.setattr(loss_plot, "plot_runs", lambda folders: drawn.append(step) or real_draw(folders))
        real_plot(report, last_step)

    monkeypatch.setattr(reporter.Reporter, "plot", plot)
    monkeypatch.setattr(reporter, "PLOT_EVERY_S", every)
    out, _ = train_tiny(tmp_path, "--steps", "30")                 # validations (and reports) at 10, 20, 30
    assert drawn == drawn_at
    assert open(os.path.join(out, "loss.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_how_to_get_it(run_dir, monkeypatch, capsys):
    for name in [name for name in sys.modules if name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)                    # as if never imported by an earlier test
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    assert plot_main([run_dir]) == 2
    assert 'pip install -e ".[plot]"' in capsys.readouterr().err


def readme_python_example() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"## Python API\n\n```python\n(.*?)```", readme, re.S).group(1)


def test_the_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """It trains what it says (60 steps of 64 units, 8 streams of 32 characters, validated at 30 and 60)
    and prints, after the training log, the 100 characters the best model gives for its prompt and
    seed, then the chat's reply: what loading the run folder again gives for the same calls."""
    import textgen
    from textgen import checkpoint
    from textgen.generation.sampling import SampleConfig
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_python_example(), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    folder = tmp_path / "checkpoints" / "api-demo"
    assert os.path.exists(folder / "best.pt")
    assert len(printed) > 100
    latest = checkpoint.load(str(folder / "latest.pt"))
    assert latest["step"] == 60 and latest["model_config"]["hidden_size"] == 64
    assert (latest["train_config"]["batch_size"], latest["train_config"]["seq_len"]) == (8, 32)
    assert [row["step"] for row in latest["history"] if row["val_loss"] is not None] == [30, 60]
    again = textgen.load(str(folder))
    assert again.checkpoint["best_val_loss"] == latest["best_val_loss"]
    first = again.generate("MAREN.\n", length=100, temperature=0.8, seed=1)
    chat = again.generator(seed=1)
    chat.feed("TOBIAS.\n")
    reply = chat.generate(SampleConfig(length=80, stop="\n\n"))[0]
    assert len(first) == 100 and (len(reply) == 80 or reply.endswith("\n\n") and len(reply) < 80)
    assert printed.endswith(first + "\n" + reply + "\n")


def test_a_moved_checkpoint_generates_the_same_text(run_dir, tmp_path):
    import textgen
    here = textgen.load(run_dir).generate("ANNA:\n", length=80, seed=12)
    moved = tmp_path / "elsewhere" / "model.pt"
    moved.parent.mkdir()
    shutil.copy(os.path.join(run_dir, "best.pt"), moved)
    assert textgen.load(str(moved)).generate("ANNA:\n", length=80, seed=12) == here
    assert textgen.generate(str(moved), "ANNA:\n", length=80, seed=12) == here


def test_version_and_help_show_defaults_from_the_command_line():
    from textgen import __version__
    version = run("train.py", "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"textgen {__version__}"
    help_text = run("train.py", "--help").stdout
    assert "(default:" in help_text and "--device" in help_text and "--quiet" in help_text


@pytest.mark.parametrize("command", [["generate"], ["eval"]])
def test_version_and_help_show_defaults(command, capsys):
    """The other commands' parsers, in this process (generate.py and `-m textgen` run as processes
    in test_generate and test_evaluate)."""
    from textgen import __version__
    from textgen.cli import generate_main, textgen_main
    main = generate_main if command == ["generate"] else (lambda argv: textgen_main(["eval", *argv]))
    for flag in ("--version", "--help"):
        with pytest.raises(SystemExit) as done:
            main([flag])
        assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"textgen {__version__}\n")
    assert "(default:" in out and "--device" in out and "--quiet" in out


def test_api_rejects_unknown_settings():
    import textgen
    from textgen.errors import UsageError
    with pytest.raises(UsageError, match="hiden_size"):
        textgen.train(None, hiden_size=10)


def test_compile_flag_trains_with_torch_compile(text_file, tmp_path, monkeypatch):
    """--compile wraps the training model in torch.compile, Dynamo really captures graphs of it, and
    the run computes what the eager run of the same seed computes (dropout 0, float32): the same
    losses and weights to float32 rounding (seen: 1.3e-7 of each tensor's norm; the compiled graph
    runs the PyTorch-op steps fused, the eager one the C kernel). Compilation is slow: a short run, in
    this process to watch it."""
    import torch
    from torch._dynamo.utils import counters
    from textgen import checkpoint
    from textgen.cli import train_main
    compiled = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: compiled.append(model) or real_compile(model, *a, **k))
    torch._dynamo.reset()
    counters.clear()
    flags = [text_file, *TINY, "--steps", "12", "--eval-every", "12", "--dtype", "float32", "--dropout", "0", "-q",
             "--sample-length", "0"]
    out = tmp_path / "run"
    assert train_main([*flags, "--compile", "--out", str(out)]) == 0
    assert len(compiled) == 1 and counters["stats"]["unique_graphs"] >= 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert train_main([*flags, "--out", str(tmp_path / "eager")]) == 0
    assert len(compiled) == 1
    eager = [json.loads(line) for line in open(tmp_path / "eager" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [r["step"] for r in eager] == [5, 10, 12]
    for row, reference in zip(rows, eager):
        for key in ("train_loss", "val_loss", "grad_norm"):
            assert row[key] == (None if reference[key] is None else pytest.approx(reference[key], rel=1e-5)), key
    ours, theirs = checkpoint.load(str(out / "latest.pt")), checkpoint.load(str(tmp_path / "eager" / "latest.pt"))
    for name, tensor in theirs["model"].items():
        assert (ours["model"][name] - tensor).norm() <= 1e-5 * tensor.norm(), name
