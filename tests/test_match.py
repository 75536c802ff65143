"""The match model (textgen/match.py) and `textgen-eval --match`: what it predicts, that it never
sees the character it predicts, that the mixture only ever costs what matches have earned, and
the per-position figures evaluation hands it."""
import math

import numpy as np
import pytest
import torch

from conftest import assert_user_error, run
from textgen.checkpoint import load_model
from textgen.evaluate import adapted_cross_entropy, cross_entropy, evaluate_file, match_mixed
from textgen.match import MAX_WEIGHT, match_predictions, mix
from textgen.lstm.model import CharLSTM, ModelConfig


def reference_predictions(seq, start, k):
    """The same rule, searched for by brute force: where no match runs, take the latest earlier
    end j (k <= j < i) whose k elements before it equal the k before i; follow it while it is right."""
    seq = list(seq)
    predicted, length = [-1] * len(seq), [0] * len(seq)
    pointer = run_length = 0
    for i in range(max(start, k), len(seq)):
        if run_length == 0:
            for j in range(i - 1, k - 1, -1):
                if seq[j - k:j] == seq[i - k:i]:
                    pointer, run_length = j, k
                    break
        if run_length:
            predicted[i], length[i] = seq[pointer], run_length
            if seq[pointer] == seq[i]:
                pointer, run_length = pointer + 1, run_length + 1
            else:
                run_length = 0
    return predicted, length


@pytest.mark.parametrize("alphabet", [2, 3, 7, 300])
def test_predictions_match_a_brute_force_search(alphabet):
    rng = np.random.default_rng(alphabet)
    for _ in range(60):
        n = int(rng.integers(0, 80))
        seq = rng.integers(0, alphabet, n)
        if n and rng.random() < 0.5:        # repeats, so that long matches occur
            seq = np.concatenate([seq, seq[: n // 2], seq])
        start, k = int(rng.integers(0, len(seq) + 1)), int(rng.integers(1, 6))
        predicted, length = match_predictions(seq, start, k)
        want_predicted, want_length = reference_predictions(seq, start, k)
        assert predicted.tolist() == want_predicted and length.tolist() == want_length


def test_a_prediction_never_depends_on_the_element_it_predicts_or_later():
    rng = np.random.default_rng(1)
    for _ in range(40):
        n = int(rng.integers(5, 60))
        seq = np.tile(rng.integers(0, 3, 7), 10)[:n]
        start, k = int(rng.integers(0, n)), int(rng.integers(1, 4))
        predicted, length = match_predictions(seq, start, k)
        for i in range(n):
            changed = seq.copy()
            changed[i:] = rng.integers(10, 13, n - i)          # values never seen before i
            p, l = match_predictions(changed, start, k)
            assert p[i] == predicted[i] and l[i] == length[i]


def test_the_history_is_copied_from():
    history, text = np.array([5, 6, 7, 8, 9, 1, 2, 3]), np.array([5, 6, 7, 8, 9, 1])
    predicted, length = match_predictions(np.concatenate([history, text]), len(history), 4)
    assert predicted[len(history):].tolist() == [-1, -1, -1, -1, 9, 1]
    assert length[len(history):].tolist() == [0, 0, 0, 0, 4, 5]
    alone, _ = match_predictions(text, 0, 4)
    assert (alone == -1).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="min_len"):
        match_predictions(np.arange(5), 0, 0)
    with pytest.raises(ValueError, match="start"):
        match_predictions(np.arange(5), 6, 2)
    with pytest.raises(ValueError, match="equally long"):
        mix(np.zeros(3), np.zeros(2, bool), np.zeros(3, int))


def test_the_mixture_costs_nothing_without_matches_or_after_misses():
    nll = np.random.default_rng(2).uniform(0.5, 3.0, 200)
    out, weights = mix(nll, np.zeros(200, bool), np.zeros(200, int))
    assert np.array_equal(out, nll) and not weights.any()
    # Matches that are always wrong never earn a weight: the mixture stays the model's.
    out, weights = mix(nll, np.zeros(200, bool), np.full(200, 9))
    assert np.allclose(out, nll) and not weights.any()


def test_the_mixture_learns_to_trust_matches_that_come_true_and_skips_unscored_positions():
    nll = np.full(400, math.log(50))                  # a model that knows nothing: uniform over 50
    nll[::7] = np.nan                                 # positions the model did not predict
    out, weights = mix(nll, np.ones(400, bool), np.full(400, 12))
    assert np.isnan(out[::7]).all()
    scored = ~np.isnan(out)
    assert out[scored][-50:].mean() < 0.1 * math.log(50)
    assert 0 < weights.max() <= MAX_WEIGHT
    # Each step learns only from positions already scored: the first is the model's own figure.
    assert out[1] == pytest.approx(math.log(50))


def test_the_mixture_is_a_distribution():
    """p(c) = (1 - w) q(c) + w [c == predicted] sums to 1: checked by scoring every candidate
    target against the same weights."""
    rng = np.random.default_rng(3)
    q = rng.dirichlet(np.ones(6))
    history_nll, history_hit = np.full(30, 1.0), rng.random(30) < 0.7
    length = np.full(31, 8)
    total = 0.0
    for target in range(6):
        nll = np.append(history_nll, -math.log(q[target]))
        hit = np.append(history_hit, target == 2)              # the match predicts character 2
        total += math.exp(-mix(nll, hit, length)[0][-1])
    assert total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("head", ["full", "adaptive"])
def test_per_position_losses_are_the_mean_losses_parts(head):
    torch.manual_seed(0)
    model = CharLSTM(ModelConfig(vocab_size=40, embed_size=8, hidden_size=16, layers=2, head=head,
                                 cutoffs=(8, 20) if head == "adaptive" else ())).eval()
    tokens = torch.randint(0, 40, (3, 11))
    targets = torch.randint(0, 40, (3, 11))
    with torch.no_grad():
        mean, _ = model(tokens, targets=targets)
        each, _ = model(tokens, targets=targets, reduction="none")
        logits, _ = model(tokens)
    assert each.shape == (3, 11)
    assert each.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    direct = -torch.log_softmax(logits, -1).gather(2, targets[..., None])[..., 0]
    assert torch.allclose(each, direct, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        model(tokens, targets=targets, reduction="sum")


def test_evaluation_hands_over_each_characters_loss(tiny_run):
    run_dir, text = tiny_run
    model, tok, _ = load_model(run_dir)
    ids = tok.encode(open(text, encoding="utf-8").read()[:2000])
    positions = np.full(len(ids), np.nan)
    total, count = cross_entropy(model, ids, batch_size=3, seq_len=41, positions=positions)
    assert (~np.isnan(positions)).sum() == count and np.nansum(positions) == pytest.approx(total, rel=1e-6)
    assert cross_entropy(model, ids, batch_size=3, seq_len=41)[0] == pytest.approx(total, rel=1e-5)
    positions = np.full(len(ids), np.nan)
    chunk_nll, count = adapted_cross_entropy(model, ids, seq_len=37, positions=positions)
    assert np.isnan(positions[0]) and not np.isnan(positions[1:]).any()
    assert np.nansum(positions) == pytest.approx(chunk_nll.sum(), rel=1e-6)
    assert adapted_cross_entropy(model, ids, seq_len=37)[0].sum() == pytest.approx(chunk_nll.sum(), rel=1e-4)
    # Each figure lands on the character it scores: one stream read with fixed weights gives the
    # same figure at every index as reading it without a step, and none for the first character.
    one_stream, still = np.full(len(ids), np.nan), np.full(len(ids), np.nan)
    cross_entropy(model, ids, batch_size=1, seq_len=41, positions=one_stream)
    adapted_cross_entropy(model, ids, seq_len=37, lr=0.0, positions=still)
    assert np.isnan(one_stream[0]) and np.allclose(one_stream[1:], still[1:], atol=1e-4)


def slowest_mixture_cost(nll, first_hit, length_at):
    """An upper bound on what the mixture pays for nll (the LSTM's figure at each position) when the
    match model predicts every position from first_hit on, with a match length_at(i), and nothing
    before. From README's rule alone: p = (1 - w) q + w on a hit, and each hit's weight, one per length
    bucket (4-7, 8-15, ...; starting at 0), steps by 0.01 d log p / d w = 0.01 (1 - q) / p. With Q the
    largest q of the hits, that step is at least 0.01 (1 - Q) / (Q + w): the weights grow at least as
    the b of this loop do (by induction: w + c / (Q + w) increases in w from b's first value on), and a
    hit costs -log((1 - w) q + w), which falls as w grows."""
    q = np.exp(-nll[first_hit:])
    step = 0.01 * (1 - q.max())
    total, weights = float(np.nansum(nll[:first_hit])), {}
    for i in range(first_hit, len(nll)):
        bucket = int(math.log2(length_at(i) // 4))
        b = weights.get(bucket, 0.0)
        total += -math.log(b + (1 - b) * math.exp(-nll[i]))
        weights[bucket] = min(MAX_WEIGHT, b + step / (q.max() + b))
    return total


def test_matching_helps_on_a_text_that_repeats_and_the_history_helps_more(tiny_run, tmp_path):
    run_dir, _ = tiny_run
    model, tok, _ = load_model(run_dir)
    rng = np.random.default_rng(4)
    chars = np.array(list(tok.chars))
    passage = "".join(rng.choice(chars, 400))                  # nothing the model could have learnt
    held_out, history = tmp_path / "held.txt", tmp_path / "history.txt"
    held_out.write_text(passage + passage, encoding="utf-8")
    history.write_text(passage, encoding="utf-8")
    plain = evaluate_file(run_dir, str(held_out), batch_size=1)
    alone = evaluate_file(run_dir, str(held_out), batch_size=1, match=True)
    both = evaluate_file(run_dir, str(held_out), batch_size=1, match=True, history_path=str(history))
    assert alone["lstm_nats_per_char"] == pytest.approx(plain["nats_per_char"], rel=1e-5)
    assert alone["nats_per_char"] < 0.75 * plain["nats_per_char"]       # the second copy is copied
    assert both["nats_per_char"] < 0.5 * alone["nats_per_char"]         # and the first, from history
    assert both["history_characters"] == 400 and both["match"]
    # How much: no 4 characters of the passage (or across its seam with itself) occur twice, so the
    # match model first predicts at the second copy's 5th character (at the first copy's 5th, read
    # after the history) and then rightly at every one, the match as long as the text it has copied.
    grams = [(passage + passage[:3])[i:i + 4] for i in range(403)]
    assert len(set(grams)) == len(grams)
    ids = tok.encode(passage + passage)
    nll = np.full(len(ids), np.nan)
    cross_entropy(model, ids, batch_size=1, positions=nll)   # what evaluate_file hands the mixture
    count = len(ids) - 1
    assert np.nanmean(nll) == pytest.approx(plain["nats_per_char"], rel=1e-5)
    assert alone["nats_per_char"] <= slowest_mixture_cost(nll, 404, lambda i: i - 400) / count
    assert both["nats_per_char"] <= slowest_mixture_cost(nll, 4, lambda i: i) / count


def test_match_mixed_keeps_unscored_positions_out():
    positions = np.array([np.nan, 1.0, 1.0, np.nan, 1.0])
    mixed = match_mixed(positions, np.array([1, 2, 1, 2, 1]))
    assert np.isnan(mixed[[0, 3]]).all() and not np.isnan(mixed[[1, 2, 4]]).any()


def test_eval_command_line_with_match(tiny_run, tmp_path):
    run_dir, text = tiny_run
    result = run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text, "--match", "--history", text)
    assert result.returncode == 0, result.stderr
    assert "match model over" in result.stdout and "the model alone" in result.stdout
    figures = [float(line.split()[1 if line.startswith("cross") else 3]) for line in result.stdout.splitlines()
               if line.startswith(("cross-entropy", "the model alone"))]
    assert figures[0] < figures[1]               # the text itself as history: nearly all copied
    assert_user_error(run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text, "--history", text),
                      "add --match")
    assert_user_error(run("-m textgen", "eval", "--checkpoint", run_dir, "--text", text, "--match",
                          "--history", str(tmp_path / "missing.txt")), "missing.txt")
