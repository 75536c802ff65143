"""Generation: sampling controls, the carried state, and generate.py as a user runs it."""
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, assert_user_error, run, train_tiny
from textgen.checkpoint import load_model
from textgen.generation.generator import Generator
from textgen.generation.sampling import SampleConfig, draw, next_token_probs, uniforms


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    # Longer and in float32, so that the carried state visibly shapes what is sampled.
    out, _ = train_tiny(tmp_path_factory.mktemp("gen"), "--steps", "150", "--eval-every", "150", "--lr", "1e-2",
                        "--dtype", "float32")
    return out


def generator(run_dir, **kwargs):
    model, tok, _ = load_model(run_dir)
    return Generator(model, tok, **kwargs)


def test_same_seed_same_text_and_other_seed_other_text(trained):
    config = SampleConfig(length=200, temperature=1.0)
    texts = []
    for seed in (7, 7, 8):
        gen = generator(trained, seed=seed)
        gen.feed("ANNA:\n")
        texts.append(gen.generate(config)[0])
    assert texts[0] == texts[1] and texts[0] != texts[2] and len(texts[0]) == 200


def test_temperature_zero_follows_the_argmax_path(trained):
    model, tok, _ = load_model(trained)
    gen = Generator(model, tok, seed=1)
    gen.feed("The ")
    greedy = gen.generate(SampleConfig(length=30, temperature=0))[0]
    text = "The "
    for _ in range(30):                                     # re-run the whole context: the slow reference
        logits, _ = model(torch.from_numpy(tok.encode(text).astype("int64"))[None])
        text += tok.chars[int(logits[0, -1].argmax())]
    assert greedy == text[4:]


def test_top_k_one_equals_argmax(trained):
    gen_k, gen_0 = generator(trained, seed=3), generator(trained, seed=4)
    for gen in (gen_k, gen_0):
        gen.feed("BORIS:\n")
    assert gen_k.generate(SampleConfig(length=50, temperature=1.5, top_k=1)) == \
        gen_0.generate(SampleConfig(length=50, temperature=0))


def test_top_p_keeps_exactly_the_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = next_token_probs(logits, 1.0, top_p=0.8)          # 0.5 + 0.3 reaches 0.8
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    kept = next_token_probs(logits, 1.0, top_p=0.81)         # needs the 0.15 too
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95)
    kept = next_token_probs(logits, 1.0, top_k=2)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    draws = torch.cat([draw(kept, uniforms(1, torch.Generator().manual_seed(s))) for s in range(200)])
    assert set(draws.tolist()) == {1, 3}
    edges = torch.tensor([0.0, 0.625 - 1e-9, 0.625, 1 - 1e-12], dtype=torch.float64)  # bin edges
    assert draw(kept.expand(4, -1), edges).tolist() == [1, 1, 3, 3]


def test_draws_follow_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    counts = torch.bincount(draw(probs.expand(40_000, -1), uniforms(40_000, torch.Generator().manual_seed(0))),
                            minlength=4).double() / 40_000
    torch.testing.assert_close(counts, probs[0].double(), atol=0.01, rtol=0)
    assert counts[1] == 0


def test_settings_per_row_give_each_row_what_it_would_get_alone():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)) * 3
    settings = [(0.8, None, None), (0.0, None, None), (1.3, 5, None), (0.7, None, 0.6), (1.0, 3, 0.5), (2.0, 50, 1.0)]
    temperature = torch.tensor([t for t, _, _ in settings])
    top_k = torch.tensor([k or 50 for _, k, _ in settings])
    top_p = torch.tensor([p or 1.0 for _, _, p in settings])
    together = next_token_probs(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(settings):
        assert torch.equal(together[row], next_token_probs(logits[row:row + 1], t, k, p)[0]), settings[row]
    assert (together[2] > 0).sum() == 5 and (together[1] > 0).sum() == 1


def test_temperature_divides_the_logits_as_a_float64_softmax_does():
    """softmax(logits / T) written out in float64 is the reference, for one temperature for every row
    and for one per row (the server's batch), sharpening below 1 and flattening above it; then top-k
    and top-p cut that tempered distribution and renormalise it. (Comparing the per-row path with
    the single-row one alone compares the function with itself: logits * T passed that.)"""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(5)) * 3
    temperatures = [0.05, 0.3, 0.8, 1.7, 4.0, 40.0]

    def reference(row, t):
        return torch.softmax(logits[row].double() / t, dim=-1)

    per_row = next_token_probs(logits, torch.tensor(temperatures))
    for row, t in enumerate(temperatures):
        expected = reference(row, t)
        alone = next_token_probs(logits[row:row + 1], t)[0]
        every_row = next_token_probs(logits, t)[row]
        for probs in (alone, every_row, per_row[row]):
            torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-5)
        # top-k 5: the five most likely of the tempered distribution, renormalised
        kept = next_token_probs(logits[row:row + 1], t, top_k=5)[0].double()
        top = expected.topk(5).indices
        cut = torch.zeros_like(expected)
        cut[top] = expected[top] / expected[top].sum()
        torch.testing.assert_close(kept, cut, atol=1e-6, rtol=1e-5)
    entropy = [-(reference(0, t) * reference(0, t).log()).sum().item() for t in (0.3, 1.0, 4.0)]
    assert entropy[0] < entropy[1] < entropy[2]              # the reference itself: below 1 sharper, above flatter


def test_carried_state_equals_feeding_everything_as_one_sequence(trained):
    gen = generator(trained, seed=11)
    gen.feed("CLÉO:\n")
    first = gen.generate(SampleConfig(length=60, temperature=1.0))[0]
    rng_after_first = gen.rng.get_state()
    second = gen.generate(SampleConfig(length=60, temperature=1.0))[0]

    fresh = generator(trained, seed=0)
    fresh.feed("CLÉO:\n" + first)                            # prompt and first paragraph, one pass
    fresh.rng.set_state(rng_after_first)
    assert fresh.generate(SampleConfig(length=60, temperature=1.0))[0] == second


def test_stop_string_ends_the_output(trained):
    gen = generator(trained, seed=5)
    gen.feed("ANNA:\n")
    text = gen.generate(SampleConfig(length=2000, temperature=1.0, stop="\n\n"))[0]
    assert text.endswith("\n\n") and text.count("\n\n") == 1


def test_num_samples_are_drawn_as_a_batch_and_differ(trained, monkeypatch):
    gen = generator(trained, seed=2, num_samples=3)
    gen.feed("DMITRI:\n")
    texts = gen.generate(SampleConfig(length=80, temperature=1.0, num_samples=3))
    assert len(texts) == 3 and len(set(texts)) == 3
    # Each row is the sample one generator alone draws from the same prompt with that row's random
    # numbers (the i-th of each step's three): the rows share nothing but the prompt.
    import textgen.generation.sampling as sampling
    real_uniforms = sampling.uniforms
    for row in range(3):
        # (n: one number a step, for n steps at once: each step's three, this row's taken)
        monkeypatch.setattr(sampling, "uniforms", lambda n, rng: real_uniforms(3 * n, rng).view(n, 3)[:, row])
        alone = generator(trained, seed=2)
        alone.feed("DMITRI:\n")
        assert alone.generate(SampleConfig(length=80, temperature=1.0))[0] == texts[row], row


def test_cli_num_samples_prints_each_sample_after_the_prompt_separated_by_dashes(trained, capsys):
    """generate.py --num-samples 3: the prompt and each sample, the samples separated by a line of
    `---`, exactly the texts the batched Generator draws for that seed."""
    from textgen.cli import generate_main
    assert generate_main(["--checkpoint", trained, "--prompt", "ANNA:\n", "--length", "40", "--seed", "4",
                          "--num-samples", "3", "-q"]) == 0
    printed = capsys.readouterr().out
    gen = generator(trained, seed=4, num_samples=3)
    gen.feed("ANNA:\n")
    texts = gen.generate(SampleConfig(length=40, num_samples=3))
    assert len(set(texts)) == 3 and all(len(t) == 40 for t in texts)
    assert printed == "ANNA:\n" + texts[0] + "\n---\n" + "ANNA:\n" + texts[1] + "\n---\n" + "ANNA:\n" + texts[2] + "\n"


def test_cli_prints_prompt_then_text_only_and_is_reproducible(trained):
    args = ["--checkpoint", trained, "--prompt", "ANNA:\n", "--length", "100", "--seed", "9"]
    a, b = run("generate.py", *args), run("generate.py", *args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("ANNA:\n") and len(a.stdout) == len("ANNA:\n") + 101
    assert "seed 9" in a.stderr


def test_cli_streams_before_it_ends(trained):
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "generate.py"), "--checkpoint", trained,
                             "--length", "10000000", "--seed", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        first = proc.stdout.read(20)
        assert len(first) == 20
        assert proc.poll() is None, "the output should appear while generation is still running"
    finally:
        proc.kill()
        proc.wait()


def test_cli_output_file_and_paragraphs_continue_the_state(trained, tmp_path):
    """Greedy decoding: from the same state a paragraph would repeat itself exactly, so a second
    paragraph that differs from the first shows that the state carried on."""
    out = tmp_path / "out.txt"
    result = run("generate.py", "--checkpoint", trained, "--paragraphs", "3", "--length", "120", "--temperature", "0",
                 "--output", str(out))
    assert result.returncode == 0 and result.stdout == ""
    three = out.read_text(encoding="utf-8")
    one = run("generate.py", "--checkpoint", trained, "--paragraphs", "1", "--length", "120", "--temperature", "0",
              "-q").stdout
    assert three.startswith(one) and one.endswith("\n\n")     # each paragraph is closed with a blank line
    second = three[len(one):]
    assert second and not second.startswith(one), (one, second)


def test_interactive_keeps_state_across_turns_and_reset_forgets(trained):
    # Long replies that never stop early (no "@@" in the text): a difference of state shows.
    carried = run("generate.py", "--checkpoint", trained, "--interactive", "--temperature", "1", "--seed", "3",
                  "--length", "300", "--stop", "@@", input="ANNA:\nBORIS:\n\n")
    assert carried.returncode == 0, carried.stderr
    reset = run("generate.py", "--checkpoint", trained, "--interactive", "--temperature", "1", "--seed", "3",
                "--length", "300", "--stop", "@@", input="ANNA:\n/reset\nBORIS:\n")
    assert reset.returncode == 0, reset.stderr
    # Same seed and the same first turn: the first replies agree. The second turns read the same
    # line with the same random draws, so they differ only if one carried the conversation's state.
    first = carried.stdout[:301]
    assert len(carried.stdout) > 310 and reset.stdout.startswith(first)
    assert carried.stdout != reset.stdout


def test_unknown_prompt_characters(trained):
    result = run("generate.py", "--checkpoint", trained, "--prompt", "ANNA Ωλ", "--length", "5")
    assert_user_error(result, "not in the model's vocabulary", "Ω", "λ", "--unknown skip")
    skipped = run("generate.py", "--checkpoint", trained, "--prompt", "ANNA Ω", "--length", "5", "--unknown", "skip",
                  "--seed", "1")
    assert skipped.returncode == 0 and "warning" in skipped.stderr and "Ω" in skipped.stderr


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-0.5"], "--temperature must be 0"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--top-k", "0"], "--top-k must be at least 1"),
    (["--length", "0"], "--length must be from 1 to"),
])
def test_bad_sampling_flags(trained, flags, message, capsys):
    from textgen.cli import generate_main
    assert generate_main(["--checkpoint", trained, *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_checkpoints_from_the_command_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(1000))
    assert_user_error(run("generate.py", "--checkpoint", str(junk)), "not a textgen checkpoint")
    assert_user_error(run("generate.py", "--checkpoint", str(tmp_path / "none")), "no such checkpoint")
    assert_user_error(run("generate.py", cwd=str(tmp_path)), "no trained run found")


def test_sampling_mid_training_ignores_dropout_and_keeps_the_mode(trained):
    from textgen.generation.generator import sample
    model, tok, _ = load_model(trained)
    model.eval()
    expected = sample(model, tok, "ANNA:\n", SampleConfig(length=50, seed=1))
    model.train()                                           # as during training, dropout on
    model.lstm.dropout = model.dropout = 0.9
    assert sample(model, tok, "ANNA:\n", SampleConfig(length=50, seed=1)) == expected
    assert model.training
