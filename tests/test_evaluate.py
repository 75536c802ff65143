"""Evaluation in nats and bits per character, the time budget, and the n-gram baseline."""
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, TINY, run, small_text, train_tiny
from textgen import checkpoint
from textgen.training import schedule
from textgen.checkpoint import load_model
from textgen.settings import parse_duration
from textgen.errors import UsageError
from textgen.evaluate import adapted_cross_entropy, cross_entropy, evaluate_file
from textgen.lstm.model import CharLSTM, ModelConfig


@pytest.fixture(scope="module")
def trained(tiny_run):
    return tiny_run


def direct_loss(run_dir, text):
    model, tok, _ = load_model(run_dir)
    ids = torch.from_numpy(tok.encode(text).astype(np.int64))[None]
    with torch.no_grad():
        logits, _ = model(ids[:, :-1])
    return F.cross_entropy(logits[0], ids[0, 1:]).item()


def test_evaluation_matches_a_direct_computation(trained, tmp_path):
    run_dir, _ = trained
    held_out = tmp_path / "held.txt"
    held_out.write_text(small_text(60)[::-1], encoding="utf-8")
    text = held_out.read_text(encoding="utf-8")
    report = evaluate_file(run_dir, str(held_out), batch_size=1, seq_len=37)   # one stream, state carried
    assert report["predicted"] == len(text) - 1
    assert report["nats_per_char"] == pytest.approx(direct_loss(run_dir, text), abs=1e-5)
    assert report["bits_per_char"] == pytest.approx(report["nats_per_char"] / math.log(2))
    several = evaluate_file(run_dir, str(held_out), batch_size=4, seq_len=37)
    assert several["streams"] == 4 and abs(several["nats_per_char"] - report["nats_per_char"]) < 0.05


def test_unknown_characters_error_or_skip(trained, tmp_path):
    run_dir, _ = trained
    path = tmp_path / "odd.txt"
    clean = small_text(40)
    path.write_text(clean[:200] + "Ωλ" + clean[200:] + "Ω", encoding="utf-8")
    with pytest.raises(UsageError, match="Ω λ"):
        evaluate_file(run_dir, str(path))
    report = evaluate_file(run_dir, str(path), unknown="skip", batch_size=1, seq_len=50)
    assert report["skipped_unknown"] == 3 and report["characters"] == len(clean) + 3
    assert report["nats_per_char"] == pytest.approx(direct_loss(run_dir, clean), abs=1e-5)


def test_eval_command_line(trained):
    run_dir, text = trained
    result = run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text)
    assert result.returncode == 0, result.stderr
    assert "nats/char" in result.stdout and "bits/char" in result.stdout
    # the figures printed are the text's, as evaluate_file computes them (tested against a direct computation)
    report = evaluate_file(run_dir, text)
    line = next(line for line in result.stdout.splitlines() if line.startswith("cross-entropy"))
    assert line.startswith(f"cross-entropy {report['nats_per_char']:.4f} nats/char = "
                           f"{report['nats_per_char'] / math.log(2):.4f} bits/char")
    assert f"{report['characters']:,} characters, {report['predicted']:,} predicted" in result.stdout


# ---------------------------------------------------------------------------
# Dynamic evaluation (--adapt): scored first, learnt from after, never from text ahead
# ---------------------------------------------------------------------------

def test_adapting_with_no_step_is_the_one_stream_score(trained):
    run_dir, text = trained
    model, tok, _ = load_model(run_dir)
    ids = tok.encode(open(text, encoding="utf-8").read()[:3000])
    chunk_nll, count = adapted_cross_entropy(model, ids, seq_len=47, lr=0.0)
    total, static_count = cross_entropy(model, ids, batch_size=1, seq_len=47)
    assert count == static_count == len(ids) - 1 and len(chunk_nll) == math.ceil(count / 47)
    assert chunk_nll.sum() == pytest.approx(total, rel=1e-5)


def test_adapting_learns_from_what_it_has_read_and_only_that(trained):
    run_dir, _ = trained
    model, tok, _ = load_model(run_dir)
    before = [p.detach().clone() for p in model.parameters()]
    rng = np.random.default_rng(0)
    noise = rng.integers(0, tok.vocab_size, size=50)         # nothing the model could have learnt
    repeated = np.concatenate([noise] * 12)                  # 24 chunks of 25
    adapted, _ = adapted_cross_entropy(model, repeated, seq_len=25, lr=3e-2)
    static, _ = adapted_cross_entropy(model, repeated, seq_len=25, lr=0.0)
    first, last = slice(0, 2), slice(20, 24)                 # the first copy and the last two
    assert adapted[first].sum() == pytest.approx(static[first].sum(), rel=0.1)
    assert adapted[last].sum() < 0.75 * static[last].sum()   # the copies it has read help
    # Causal: changing the text from chunk 15 on leaves the scores of chunks 0-13 exactly as they were
    # (chunk 14's last target is the first changed character).
    changed = repeated.copy()
    changed[15 * 25:] = rng.integers(0, tok.vocab_size, size=len(changed) - 15 * 25)
    again, _ = adapted_cross_entropy(model, changed, seq_len=25, lr=3e-2)
    np.testing.assert_array_equal(again[:14], adapted[:14])
    assert not np.array_equal(again[14:], adapted[14:])
    # The steps went to a copy: the caller's model is as it was.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_each_chunk_is_scored_before_the_step_it_teaches(trained):
    """The update rule by hand: chunk 0 is scored by the trained weights, chunk 1 by those weights
    after one RMSprop step on chunk 0 (its first step, bias-corrected: lr * g / |g|) and the pull of
    decay back toward the trained weights."""
    run_dir, text = trained
    model, tok, _ = load_model(run_dir)
    ids = tok.encode(open(text, encoding="utf-8").read()[:200])
    lr, decay, L = 1e-2, 0.25, 30
    chunk_nll, _ = adapted_cross_entropy(model, ids, seq_len=L, lr=lr, decay=decay)
    data = torch.from_numpy(ids.astype(np.int64))[None]
    model.eval()
    loss0, state = model(data[:, :L], None, targets=data[:, 1:L + 1])
    assert chunk_nll[0] == pytest.approx(float(loss0.detach()) * L, rel=1e-6)
    grads = torch.autograd.grad(loss0, list(model.parameters()))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            stepped = p - lr * g / (g.abs() + 1e-8)
            p.copy_(stepped + decay * (p - stepped))
        loss1, _ = model(data[:, L:2 * L], state, targets=data[:, L + 1:2 * L + 1])
    assert chunk_nll[1] == pytest.approx(float(loss1) * L, rel=1e-5)


def test_adapting_at_the_defaults_is_adam_without_momentum_pulled_back_to_the_trained_weights(trained):
    """Every chunk of a 1,500-character text, at README's defaults (step size 3e-4, a pull of 1e-3 back
    toward the trained weights; 50-character chunks): RMSprop with Adam's bias correction is
    torch.optim.Adam with no momentum (betas (0, 0.99), eps 1e-8), so a loop of it, each chunk scored
    before its step, gives every chunk's figure. Pins the size of every step, not just the first."""
    import copy
    from textgen.lstm.model import detach_state
    run_dir, text = trained
    model, tok, _ = load_model(run_dir)
    ids = tok.encode(open(text, encoding="utf-8").read()[:1500])
    chunk_nll, count = adapted_cross_entropy(model, ids)
    work = copy.deepcopy(model)
    params = list(work.parameters())
    trained_weights = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=3e-4, betas=(0.0, 0.99), eps=1e-8)
    data, state, expected = torch.from_numpy(ids.astype(np.int64))[None], None, []
    for start in range(0, count, 50):
        stop = min(start + 50, count)
        loss, state = work(data[:, start:stop], state, targets=data[:, start + 1:stop + 1])
        expected.append(loss.item() * (stop - start))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for p, weight in zip(params, trained_weights):
                p.lerp_(weight, 1e-3)
        state = detach_state(state)
    assert len(chunk_nll) == len(expected) == 30
    np.testing.assert_allclose(chunk_nll, expected, rtol=2e-5)


def test_adapting_an_adaptive_head_keeps_the_clusters_no_target_has_reached_finite():
    """Tail clusters get zero gradients until a target falls in them: their steps must be 0, not
    0 / 0, or the scores turn NaN once the text reaches them."""
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(300, 8, 24, 2, head="adaptive", cutoffs=(20, 100)))
    ids = np.random.default_rng(1).integers(0, 20, size=400)       # head cluster only
    ids[200:] = np.random.default_rng(2).integers(0, 300, size=200)  # then every cluster
    tail = [p.detach().clone() for p in model.head.parameters()]
    nll, count = adapted_cross_entropy(model, ids, seq_len=30, lr=1e-3)
    total, _ = cross_entropy(model, ids, batch_size=1, seq_len=30)
    assert count == 399 and np.isfinite(nll).all() and nll.sum() != pytest.approx(total, rel=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(tail, model.head.parameters()))


def test_evaluation_runs_float32_whatever_dtype_the_run_trained_with(tmp_path):
    """A checkpoint trained with bf16 products is scored with float32 ones: the figure does not
    depend on the training precision, and --adapt's backward pass (no loss scaler) never runs in
    float16 on a GPU."""
    run_dir, text = train_tiny(tmp_path, "--dtype", "bfloat16")
    model, tok, _ = load_model(run_dir)
    assert model.lstm.matmul_dtype is None
    held_out = open(text, encoding="utf-8").read()[:2000]
    ids = tok.encode(held_out)
    total, count = cross_entropy(model, ids, batch_size=1, seq_len=50)
    model.lstm.matmul_dtype = torch.bfloat16
    low, _ = cross_entropy(model, ids, batch_size=1, seq_len=50)
    assert abs(low - total) > 1e-6 * total            # bf16 products give another figure (4e-6 here)
    (tmp_path / "held.txt").write_text(held_out, encoding="utf-8")
    report = evaluate_file(run_dir, str(tmp_path / "held.txt"), batch_size=1, seq_len=50)
    assert report["nats_per_char"] == pytest.approx(total / count, rel=1e-9)


def test_eval_adapt_command_line(trained, tmp_path):
    run_dir, text = trained
    result = run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text, "--adapt", "--json")
    assert result.returncode == 0, result.stderr
    import json
    report = json.loads(result.stdout)
    static = evaluate_file(run_dir, text)
    assert report["streams"] == 1 and report["seq_len"] == 50 and report["adapt_lr"] > 0
    assert report["nats_per_char"] < static["nats_per_char"]   # a text it was trained on, read again
    # How much: benchmarks/README.md's smallest gain at these defaults, against the same checkpoint read
    # as one stream with fixed weights, is 6.2% (Chinese man pages, 2.9915 -> 2.8075, a text that mostly
    # does not repeat; tiny-shakespeare 10.1%). This text is one template over and over: at least that.
    one_stream = evaluate_file(run_dir, text, batch_size=1)
    assert report["nats_per_char"] < (1 - (2.9915 - 2.8075) / 2.9915) * one_stream["nats_per_char"]
    plain = run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text, "--adapt-lr", "1e-3")
    assert plain.returncode == 0 and "learning as it reads (--adapt-lr 0.001)" in plain.stdout
    # Its bad flags are rows of the catalogue in test_bad_inputs.py.


def test_durations():
    assert parse_duration("90s") == 90 and parse_duration("15m") == 900 and parse_duration("2h") == 7200
    assert parse_duration("1h30m") == 5400 and parse_duration("45") == 45
    with pytest.raises(Exception):
        parse_duration("soon")


@pytest.mark.parametrize("slows_down", [False, True], ids=["steady", "slower-late"])
def test_time_budget_stops_near_its_limit_and_saves(tmp_path, monkeypatch, slows_down):
    """On a simulated clock (so no machine is too slow or too busy for it; it used to accept either
    outcome of a real 4 s run, and elapsed > 0): 20 ms steps, a 3 s budget. Steady, the run plans its
    steps from the timed ones and ends at its plan, inside the budget and within its 3% spare of the
    end. Steps 5x slower from four fifths of the plan on (after its last re-timing) run the clock out
    first: the run stops at the step that crosses the budget, says so, validates and saves there."""
    lines, slow_from = [], []

    def seconds(step):
        plans = _plans(lines)
        if slows_down and not slow_from and plans and step >= 0.8 * plans[-1]:
            slow_from.append(step)
        return 0.1 if slow_from else 0.02

    _timed_run(tmp_path, monkeypatch, seconds, lines, budget=3.0)
    ckpt = checkpoint.load(str(tmp_path / "run" / "latest.pt"))
    plans = _plans(lines)
    assert ckpt["planned"] and ckpt["plan"] == plans[-1] and any(line.startswith("time budget 3s:") for line in lines)
    spent = [line for line in lines if line.startswith("time budget of 3s spent")]
    if slows_down:
        assert slow_from and spent == [f"time budget of 3s spent at step {ckpt['step']}"]
        assert ckpt["step"] < ckpt["plan"]
        assert 3.0 <= ckpt["elapsed"] < 3.0 + 0.1 + 0.002 * 2      # the step that crossed it, and a validation
    else:
        assert not spent and ckpt["step"] == ckpt["plan"]
        assert (1 - 2 * schedule.SPARE) * 3.0 < ckpt["elapsed"] <= 3.0
    assert ckpt["best_val_loss"] is not None
    assert ckpt["history"][-1]["step"] == ckpt["step"] and ckpt["history"][-1]["val_loss"] is not None  # validated at the end


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_ngram():
    return load_benchmark("ngram")


def test_ngram_gives_the_exact_entropy_of_toy_texts():
    ngram = load_ngram()
    unigram = ngram.WittenBell("aaab", 1, {"a", "b"})
    # P(a) = (3 + 2 * 1/2) / (4 + 2) = 2/3, P(b) = (1 + 1) / 6 = 1/3
    assert unigram.cross_entropy("ab") == pytest.approx(-(math.log(2 / 3) + math.log(1 / 3)) / 2, abs=1e-12)
    bigram = ngram.WittenBell("abcabcabc", 2, {"a", "b", "c"})
    # P1(b) = (3 + 3/3) / (9 + 3) = 1/3; P(b|a) = (3 + 1 * 1/3) / (3 + 1) = 5/6
    assert bigram.prob("a", "b") == pytest.approx(5 / 6, abs=1e-12)
    assert bigram.cross_entropy("b", context="a") == pytest.approx(-math.log(5 / 6), abs=1e-12)


def test_xz_conditional_figure_codes_the_tail_with_the_head_as_dictionary():
    """A tail that repeats the head costs almost nothing; random letters cost about log(26) nats."""
    import random
    ngram = load_ngram()
    rng = random.Random(0)
    head = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(50_000))
    repeated = ngram.xz_conditional(head, head[10_000:20_000])
    fresh = ngram.xz_conditional(head, "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(10_000)))
    assert repeated < 0.05
    assert math.log(26) * 0.95 < fresh < math.log(26) * 1.15


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(ROOT), "shared", "corpora",
                                                    "tinyshakespeare.txt")), reason="../shared/corpora absent")
def test_ngram_baseline_on_tinyshakespeare_is_the_known_figure():
    ngram = load_ngram()
    with open(os.path.join(os.path.dirname(ROOT), "shared", "corpora", "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    head, tail = ngram.split(text, 0.1)
    nats = ngram.WittenBell(head, 5, set(text)).cross_entropy(tail, context=head)
    assert nats == pytest.approx(1.67, abs=0.01)


def test_a_budgeted_run_stopped_before_its_plan_resumes_and_plans(text_file, tmp_path, monkeypatch):
    """A 3 s budget on a simulated clock of 25 ms a step (it used to need more than 32 real steps in 3 real
    seconds): stopped at step 12, before its plan was made, the run resumes, times its steps again and
    plans, and ends at that plan within the budget."""
    import signal

    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run, loop, train
    _simulate_the_clock(monkeypatch, lambda step: 0.025)
    out = str(tmp_path / "run")
    model = ModelConfig(vocab_size=1, embed_size=8, hidden_size=16, layers=1, dropout=0.0)
    config = TrainConfig(text=text_file, batch_size=4, seq_len=16, time_budget=3.0, eval_every=25, save_every=5,
                         sample_length=0, out=out, quiet=True)
    first = build_run(model, config, log=lambda m: None)
    real_step = loop.train_step

    def step_then_signal(run):
        result = real_step(run)
        if run.progress.step == 12:
            os.kill(os.getpid(), signal.SIGTERM)          # into the trainer's own handler
        return result

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    assert train(first).stopped_by == "SIGTERM"
    saved = checkpoint.load(os.path.join(out, "latest.pt"))
    assert saved["step"] == 12 and not saved["planned"]
    monkeypatch.setattr(loop, "train_step", real_step)
    messages = []
    result = train(build_run(None, TrainConfig(), resume=out, log=messages.append), log=messages.append)
    assert result.stopped_by is None and result.step > 32
    assert any("planning" in m for m in messages)
    ckpt = checkpoint.load(os.path.join(out, "latest.pt"))
    assert ckpt["planned"] and ckpt["step"] == ckpt["plan"] == result.step
    assert (1 - 2 * schedule.SPARE) * 3.0 < ckpt["elapsed"] <= 3.0


def _simulate_the_clock(monkeypatch, seconds_per_step):
    """Replace the trainer's clock: each step takes seconds_per_step(step) and each validation 2 ms, and
    nothing else takes time. Real time made these plans, and where a run stopped, depend on the
    machine's load: a fresh-clone CI run stopped one at 82% of its plan."""
    import types
    from textgen.training import loop
    real_step, real_validate = loop.train_step, loop.validate
    now = [0.0]

    def timed_step(run):
        now[0] += seconds_per_step(run.progress.step)
        return real_step(run)

    def timed_validate(run):
        now[0] += 0.002
        return real_validate(run)

    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    monkeypatch.setattr(loop, "train_step", timed_step)
    monkeypatch.setattr(loop, "validate", timed_validate)


def _timed_run(tmp_path, monkeypatch, seconds_per_step, lines, budget=6.0):
    """Train for budget simulated seconds with each step's time set by seconds_per_step(step), logging into lines."""
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run, train
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    _simulate_the_clock(monkeypatch, seconds_per_step)
    config = TrainConfig(text=str(text), batch_size=2, seq_len=8, time_budget=budget, warmup_steps=2, sample_length=0,
                         out=str(tmp_path / "run"), quiet=True, eval_chars=200, save_every=10_000)
    model = ModelConfig(vocab_size=1, embed_size=4, hidden_size=8, layers=1)
    train(build_run(model, config, explicit={"hidden_size", "layers", "dropout"}, log=lines.append), log=lines.append)


def _plans(lines):
    """The step counts planned, in order, from the log's "planning N steps" lines."""
    return [int(line.split("planning ")[1].split()[0]) for line in lines if "planning " in line]


def test_a_plan_made_from_slow_first_steps_is_made_again_once_they_speed_up(tmp_path, monkeypatch):
    """The first 25 steps take 40 ms more, the rest 5 ms: the plan from the first ones is far too short, and
    the second timing, a tenth of the way in, plans more steps; later timings only adjust it."""
    lines = []
    _timed_run(tmp_path, monkeypatch, lambda step: 0.04 if step < 25 else 0.005, lines)
    plans = _plans(lines)
    assert 2 <= len(plans) <= 1 + len(schedule.REPLAN_AT), lines
    assert plans[1] > 2 * plans[0]
    ckpt = checkpoint.load(str(tmp_path / "run" / "latest.pt"))
    assert ckpt["replans"] == len(schedule.REPLAN_AT) and ckpt["plan"] == plans[-1]


def test_cheap_validations_come_often_and_samples_about_ten_times(tmp_path, monkeypatch):
    """A budgeted run whose validation is cheap validates many times, so best.pt can catch a model
    that peaks early, but samples and plots only about EVALS_PER_RUN times; a resumed run keeps
    the count its plan chose."""
    from textgen.lstm.model import ModelConfig
    from textgen.training import TrainConfig, build_run, train
    monkeypatch.setattr(schedule, "validations_for", lambda budget, seconds: 40)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(), encoding="utf-8")
    lines = []
    _simulate_the_clock(monkeypatch, lambda step: 0.005)
    config = TrainConfig(text=str(text), batch_size=2, seq_len=8, time_budget=4.0, warmup_steps=2, sample_length=20,
                         out=str(tmp_path / "run"), quiet=True, eval_chars=200, save_every=10_000)
    model = ModelConfig(vocab_size=1, embed_size=4, hidden_size=8, layers=1)
    train(build_run(model, config, explicit={"hidden_size", "layers", "dropout"}, log=lines.append), log=lines.append)
    ckpt = checkpoint.load(str(tmp_path / "run" / "latest.pt"))
    validated = [row for row in ckpt["history"] if row["val_loss"] is not None]
    samples = [line for line in lines if line.startswith("--- sample at step")]
    assert ckpt["validations"] == 40 and "(40 in the run)" in next(line for line in lines if "planning" in line)
    # The plan shared among 40 (and the last step); samples at the first validation past each tenth of
    # the plan, and at the last step (a re-plan can move the tenths by one validation).
    assert 39 <= len(validated) <= 41, len(validated)
    assert schedule.EVALS_PER_RUN - 1 <= len(samples) <= schedule.EVALS_PER_RUN + 2, len(samples)
    assert ckpt["best_val_loss"] == min(row["val_loss"] for row in validated)
    assert checkpoint.load(str(tmp_path / "run" / "best.pt"))["best_val_loss"] == ckpt["best_val_loss"]
    monkeypatch.setattr(schedule, "validations_for", lambda budget, seconds: 10)
    # The plan is done, so the resume asks for more steps (a finished run alone is refused: nothing to do).
    resumed = build_run(None, TrainConfig(steps=ckpt["step"] + 10, time_budget=None),
                        resume=str(tmp_path / "run" / "latest.pt"), explicit={"steps", "time_budget"},
                        log=lambda m: None).progress
    assert resumed.budget.validations == 40 and resumed.budget.eval_seconds == ckpt["eval_seconds"] > 0


def test_steps_that_slow_down_partway_shorten_the_plan(tmp_path, monkeypatch):
    """Fast for the first 30% of the plan, then 4x slower: the later timings plan fewer steps, so the
    run reaches (nearly) the end of its learning-rate schedule before its time is up."""
    lines, slow_from = [], []

    def seconds(step):
        if not slow_from:
            plans = _plans(lines)
            if plans and step >= 0.3 * plans[-1]:
                slow_from.append(step)
        return 0.02 if slow_from else 0.005

    _timed_run(tmp_path, monkeypatch, seconds, lines)
    plans = _plans(lines)
    assert slow_from and plans[-1] < plans[1], lines
    ckpt = checkpoint.load(str(tmp_path / "run" / "latest.pt"))
    # The clock stops the run either way; timed only once, it would stop at about half its plan (the
    # learning rate still high), timed again it ends at or near the end of its schedule.
    assert ckpt["step"] >= 0.9 * plans[-1], lines


def test_the_prose_corpus_takes_each_docstring_once_and_no_control_characters(monkeypatch):
    make_corpora = load_benchmark("make_corpora")
    words = " ".join(["words of plain English prose"] * 10)

    def source(doc):
        return f'def f():\n    """{doc}"""\n'

    files = [("a.py", source("First. " + words)), ("b.py", source("First. " + words)),      # a copy
             ("c.py", source("Escaped \\0 here. " + words)), ("d.py", source("Second. " + words))]
    monkeypatch.setattr(make_corpora, "python_sources", lambda: iter(files))
    prose = make_corpora.prose_text(10_000)
    assert prose.count("First.") == 1 and "Second." in prose
    assert "Escaped" not in prose and "\x00" not in prose
