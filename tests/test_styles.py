"""Styles: a model trained on a folder of files with styles learns one label per file, and generation
written under a label keeps to that file's characters; everything without styles is as it was."""
import json
import random

import numpy as np
import pytest
import torch

import textgen
from conftest import train_here
from textgen import checkpoint
from textgen.generation.batching import BatchingEngine
from textgen.generation.jobs import Job
from textgen.cli import generate_main, info_main
from textgen.corpus import prepare
from textgen.data import StreamLoader
from textgen.lstm import CharLSTM, ModelConfig, Stepper
from textgen.generation.sampling import SampleConfig
from textgen.styles import style_map

LOWER, UPPER = "abcdefghij", "KLMNOPQRST"
TINY = dict(hidden_size=32, layers=1, embed_size=16, batch_size=8, seq_len=32, eval_every=1000, val_fraction=0.05,
            ema=0.0, sample_length=0, warmup_steps=10, quiet=True)


def words(alphabet: str, count: int, seed: int) -> str:
    r = random.Random(seed)
    return " ".join("".join(r.choice(alphabet) for _ in range(r.randint(2, 6))) for _ in range(count))


def share(text: str, alphabet: str) -> float:
    """The fraction of text's characters that belong to the file of alphabet (its letters, spaces, newlines)."""
    own = set(alphabet) | {" ", "\n"}
    return sum(ch in own for ch in text) / len(text)


@pytest.fixture(scope="module")
def styled(tmp_path_factory):
    """A run trained with styles on two files whose letters do not overlap: (run folder, corpus folder)."""
    base = tmp_path_factory.mktemp("styles")
    corpus = base / "corpus"
    corpus.mkdir()
    (corpus / "lower.txt").write_text(words(LOWER, 3000, 1), encoding="utf-8")
    (corpus / "upper.txt").write_text(words(UPPER, 3000, 2), encoding="utf-8")
    out = str(base / "run")
    textgen.train(str(corpus), styles=True, steps=150, out=out, cache_dir=str(base / "cache"), log=lambda m: None,
                  **TINY)
    return out, str(corpus)


def test_text_written_in_a_style_keeps_to_that_files_characters(styled):
    model = textgen.load(styled[0])
    assert model.styles == ["lower", "upper"]
    for style, alphabet in (("lower", LOWER), ("upper", UPPER)):
        for seed in (1, 2):
            text = model.generate("", length=400, seed=seed, style=style)
            assert share(text, alphabet) >= 0.95, (style, text)


def test_rows_of_one_batch_each_keep_their_own_style(styled):
    model, tokenizer, _ = checkpoint.load_model(styled[0])
    engine = BatchingEngine(model, tokenizer, slots=4, max_waiting=4)
    try:
        jobs = [engine.submit(Job("", SampleConfig(length=300, seed=seed, style=style)))
                for seed, style in ((1, "lower"), (2, "upper"), (3, "upper"), (4, "lower"))]
        for job in jobs:
            assert job.finished.wait(60)
        for job in jobs:
            events = []
            while not job.events.empty():
                events.append(job.events.get())
            text = "".join(ch for sample, ch in events if sample == 0)
            assert len(text) == 300
            assert share(text, LOWER if job.config.style == "lower" else UPPER) >= 0.95, (job.config.style, text)
    finally:
        engine.close()
        engine.scheduler.stop()


def test_the_checkpoint_lists_its_styles_and_names_them_when_one_is_unknown(styled, capsys):
    assert info_main([styled[0]]) == 0
    assert "styles       lower, upper" in capsys.readouterr().out
    assert generate_main(["--checkpoint", styled[0], "--style", "middle", "--length", "5", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: this model has no style 'middle' for --style; its styles are lower, upper"
    with pytest.raises(textgen.UsageError, match=r"no style 'middle' for style; its styles are lower, upper"):
        textgen.load(styled[0]).generate("", length=5, style="middle")


def test_a_model_without_styles_refuses_a_style(tiny_run, capsys):
    assert generate_main(["--checkpoint", tiny_run[0], "--style", "lower", "--length", "5", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--style lower was given, but this model was trained without styles" in err and "Traceback" not in err
    assert textgen.load(tiny_run[0]).styles == []


def test_styles_need_several_files_with_distinct_names(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text(words(LOWER, 500, 1), encoding="utf-8")
    result = train_here(one, "--styles", "--steps", "2", "--out", tmp_path / "a", "--cache-dir", tmp_path / "c")
    assert result.returncode == 2
    assert "--styles needs a folder or glob of several files, one per style" in result.stderr
    for sub in ("x", "y"):
        (tmp_path / "two" / sub).mkdir(parents=True)
        (tmp_path / "two" / sub / "same.txt").write_text(words(LOWER, 500, 1), encoding="utf-8")
    result = train_here(tmp_path / "two", "--styles", "--steps", "2", "--out", tmp_path / "b",
                        "--cache-dir", tmp_path / "c")
    assert result.returncode == 2 and "would both be the style 'same'" in result.stderr, result.stderr


def test_each_position_is_labelled_with_its_files_style_the_separator_with_the_next(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 37, encoding="utf-8")
    (tmp_path / "b.txt").write_text("b" * 23, encoding="utf-8")
    (tmp_path / "c.txt").write_text("c" * 41, encoding="utf-8")
    corpus = prepare(str(tmp_path / "*.txt"), str(tmp_path / "cache"), separator="--")
    names, styles = style_map(corpus)
    assert names == ("a", "b", "c")
    chars = np.array(list(corpus.tokenizer.decode(np.asarray(corpus.tokens))))
    assert "".join(chars) == "a" * 37 + "--" + "b" * 23 + "--" + "c" * 41
    # The separator before a file goes with that file: it leads into its text.
    assert styles(np.arange(len(chars))).tolist() == [0] * 37 + [1] * 25 + [2] * 43
    loader = StreamLoader(corpus.tokens, 3, 10, styles=styles)
    for _ in range(6):                       # across the ring's wrap too
        position = loader.position
        x, _, s = loader.next_labelled_batch()
        letters = np.array(list(corpus.tokenizer.decode(x.reshape(-1)))).reshape(x.shape)
        expected = {"a": 0, "b": 1, "c": 2}
        for (row, col), ch in np.ndenumerate(letters):
            if ch != "-":
                assert s[row, col] == expected[ch], (position, row, col)


def test_stepping_with_styles_matches_the_chunk_and_styles_change_the_output():
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=11, embed_size=8, hidden_size=19, layers=2, dropout=0.0,
                                 style_names=("x", "y", "z"))).eval()
    with torch.no_grad():
        model.style_embedding.weight.normal_()
    tokens = torch.randint(0, 11, (4, 9))
    rows = torch.tensor([0, 2, -1, 1])
    logits, state = model(tokens, styles=rows)
    per_position, _ = model(tokens, styles=rows[:, None].expand(4, 9).contiguous())
    assert torch.equal(logits, per_position)
    unstyled, _ = model(tokens)
    assert torch.equal(logits[2], unstyled[2]) and not torch.allclose(logits[0], unstyled[0])
    stepper, stepped = Stepper(model), model.initial_state(4)
    for t in range(9):
        out, stepped = stepper(tokens[:, t], stepped, rows)
        torch.testing.assert_close(out, logits[:, t], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"styles must be ids in \[0, 3\) or -1"):
        model(tokens, styles=torch.tensor([0, 3, 0, 0]))


def test_a_checkpoint_from_before_styles_loads_and_generates_as_before(tiny_run, tmp_path):
    ckpt = checkpoint.load(f"{tiny_run[0]}/latest.pt")
    old = {k: v for k, v in ckpt.items() if k != "integrity"}
    old["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k != "style_names"}
    old["train_config"] = {k: v for k, v in ckpt["train_config"].items() if k != "styles"}
    checkpoint.atomic_save(old, str(tmp_path / "old.pt"))
    then, now = textgen.load(str(tmp_path / "old.pt")), textgen.load(f"{tiny_run[0]}/latest.pt")
    assert then.config.style_names == () and "style_embedding.weight" not in then.model.state_dict()
    assert then.generate("a", length=60, seed=3) == now.generate("a", length=60, seed=3)


def test_a_run_with_styles_resumes_exactly(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "lower.txt").write_text(words(LOWER, 800, 1), encoding="utf-8")
    (corpus / "upper.txt").write_text(words(UPPER, 800, 2), encoding="utf-8")
    flags = ["--styles", "--hidden-size", "24", "--layers", "1", "--embed-size", "8", "--batch-size", "4",
             "--seq-len", "16", "--eval-every", "10", "--save-every", "10", "--sample-length", "10",
             "--cache-dir", tmp_path / "cache", "-q"]
    assert train_here(corpus, *flags, "--steps", "20", "--out", tmp_path / "whole").returncode == 0
    assert train_here(corpus, *flags, "--steps", "10", "--out", tmp_path / "half").returncode == 0
    assert train_here("--resume", tmp_path / "half", "--steps", "20", "-q").returncode == 0
    whole, resumed = (checkpoint.load(str(tmp_path / name / "latest.pt")) for name in ("whole", "half"))
    assert resumed["step"] == 20 and whole["model_config"]["style_names"] == ("lower", "upper")
    for name, tensor in whole["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name
    untimed = lambda history: [{k: v for k, v in row.items() if k not in ("time", "chars_per_sec")}  # noqa: E731
                               for row in history]
    assert json.dumps(untimed(whole["history"])) == json.dumps(untimed(resumed["history"]))
