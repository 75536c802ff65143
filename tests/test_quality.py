"""Issue 18's model features against references: the adaptive head (exact distribution, the same
answer on every path), the bf16 output layer, and each regulariser doing what it says."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import ran_the_chosen_path, run, small_text, train_here
from textgen import checkpoint
from textgen.lstm import model as model_module
from textgen.lstm import Stepper
from textgen.lstm.config import ADAPTIVE_FROM, adaptive_cutoffs
from textgen.lstm.model import (AdaptiveHead, CharLSTM, ModelConfig, dropout,
                                lstm_layer_reference)


def adaptive_model(vocab=300, hidden=24, cutoffs=(20, 100), seed=0, **settings):
    torch.manual_seed(seed)
    model = CharLSTM(ModelConfig(vocab_size=vocab, embed_size=8, hidden_size=hidden, layers=2, dropout=0.0,
                                 head="adaptive", cutoffs=cutoffs, **settings))
    # A frequency order unlike the id order, so a path that forgot the ranks would give other numbers.
    counts = torch.rand(vocab, generator=torch.Generator().manual_seed(seed + 1))
    model.head.order_by_frequency(counts)
    return model


# ---------------------------------------------------------------------------
# The adaptive head
# ---------------------------------------------------------------------------

def test_frequency_ranks_put_the_commonest_characters_first():
    head = AdaptiveHead(8, 6, [2], 4.0)
    head.order_by_frequency(torch.tensor([5, 50, 0, 7, 50, 1]))
    assert head.rank.tolist() == [3, 0, 5, 2, 1, 4]          # ties keep id order: token 1 before token 4


def test_adaptive_log_probs_are_a_distribution_and_agree_with_the_training_loss():
    """The loss path (clusters touched only where a target is) and the full log_prob path, each mapping
    ids to ranks on its own, give the same negative log-likelihood."""
    model = adaptive_model().eval()
    tokens = torch.randint(0, 300, (3, 17))
    targets = torch.randint(0, 300, (3, 17))
    logits, _ = model(tokens)
    assert torch.allclose(logits.exp().sum(-1), torch.ones(3, 17), atol=1e-5)
    loss, _ = model(tokens, targets=targets)
    exact = F.cross_entropy(logits.reshape(-1, 300), targets.reshape(-1))
    gathered = -logits.gather(-1, targets.unsqueeze(-1)).mean()
    assert torch.allclose(loss, exact, atol=1e-5) and torch.allclose(exact, gathered, atol=1e-5)


def test_the_adaptive_loss_equals_torchs_own_module_with_gradients():
    model = adaptive_model()
    x = torch.randn(200, 24, requires_grad=True)
    targets = torch.randint(0, 300, (200,))
    ours = model.head.loss(x, targets)
    (grad_ours,) = torch.autograd.grad(ours, x)
    theirs = model.head.softmax(x, model.head.rank[targets]).loss
    (grad_theirs,) = torch.autograd.grad(theirs, x)
    assert torch.allclose(ours, theirs, atol=1e-6) and torch.allclose(grad_ours, grad_theirs, atol=1e-6)


def test_every_adaptive_cluster_joins_the_graph_even_when_no_target_falls_in_it():
    """Data-parallel training needs every parameter used on every rank at every step."""
    model = adaptive_model()
    shortlist_tokens = (model.head.rank < 20).nonzero().squeeze(1)
    targets = shortlist_tokens[torch.randint(0, len(shortlist_tokens), (3, 5))]
    loss, _ = model(torch.randint(0, 300, (3, 5)), targets=targets)
    loss.backward()
    tail = list(model.head.softmax.tail.parameters())
    assert tail and all(p.grad is not None and torch.all(p.grad == 0) for p in tail)


def test_adaptive_log_probs_equal_torchs_own_after_the_rank_permutation():
    model = adaptive_model().eval()
    x = torch.randn(5, 24)
    by_rank = model.head.softmax.log_prob(x)
    ours = model.logits(x)
    for token in (0, 7, 150, 299):
        assert torch.equal(ours[:, token], by_rank[:, model.head.rank[token]])


def test_the_stepper_equals_forward_with_an_adaptive_head(pointwise):
    model = adaptive_model().eval()
    tokens = torch.randint(0, 300, (2, 9))
    logits, state = model(tokens)
    stepper, stepped = Stepper(model), model.initial_state(2)
    for t in range(9):
        step_logits, stepped = stepper(tokens[:, t], stepped)
        assert torch.allclose(step_logits, logits[:, t], atol=1e-5)
    assert ran_the_chosen_path(pointwise)


def test_evaluation_scores_the_exact_distribution_without_computing_every_class(monkeypatch):
    """evaluate.cross_entropy over several windows (state carried) equals the full log-probabilities'
    figure, and never asks the adaptive head for all of its classes."""
    from textgen.evaluate import cross_entropy
    model = adaptive_model().eval()
    tokens = torch.randint(0, 300, (1, 90))
    with torch.no_grad():
        log_probs, _ = model(tokens[:, :-1])
    expected = -log_probs[0].gather(-1, tokens[0, 1:, None]).sum().item()
    monkeypatch.setattr(model.head, "log_probs", lambda out: pytest.fail("every class computed"))
    total, count = cross_entropy(model, tokens[0].numpy(), batch_size=1, seq_len=20)
    assert count == 89 and total == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("head", ["full", "adaptive"])
def test_reading_a_prompt_gives_forwards_last_logits_and_state_from_the_last_position_alone(head, monkeypatch):
    model = (adaptive_model() if head == "adaptive" else
             CharLSTM(ModelConfig(vocab_size=300, embed_size=8, hidden_size=16, layers=2))).eval()
    tokens, state = torch.randint(0, 300, (3, 11)), model.initial_state(3)
    logits, full_state = model(tokens, state)
    rows = []
    real_logits = model.logits
    monkeypatch.setattr(model, "logits", lambda out: rows.append(out.shape) or real_logits(out))
    last, read_state = model.read(tokens, state)
    assert rows == [torch.Size([3, model.config.hidden_size])]   # the head ran on the last position only
    assert torch.allclose(last, logits[:, -1], atol=1e-6)
    for (h, c), (h2, c2) in zip(read_state, full_state):
        assert torch.equal(h, h2) and torch.equal(c, c2)


def test_head_auto_picks_the_adaptive_softmax_for_large_vocabularies_only():
    small = CharLSTM(ModelConfig(vocab_size=ADAPTIVE_FROM - 1, embed_size=4, hidden_size=8, layers=1))
    large = CharLSTM(ModelConfig(vocab_size=ADAPTIVE_FROM, embed_size=4, hidden_size=8, layers=1))
    assert small.config.head == "full" and isinstance(small.head, torch.nn.Linear)
    assert large.config.head == "adaptive" and isinstance(large.head, AdaptiveHead)
    assert large.config.cutoffs == adaptive_cutoffs(ADAPTIVE_FROM) and large.config.cutoffs[0] < ADAPTIVE_FROM


def test_the_parameter_count_is_known_before_an_adaptive_model_is_built():
    for config in (ModelConfig(300, 8, 24, 2, head="adaptive", cutoffs=(20, 100)),
                   ModelConfig(5000, 16, 64, 1, head="adaptive", head_div=2.0), ModelConfig(5000, 16, 64, 1)):
        assert config.num_parameters() == CharLSTM(config).num_parameters()


def test_an_adaptive_head_whose_last_cluster_would_have_no_width_is_refused():
    with pytest.raises(ValueError, match="no width"):
        ModelConfig(300, hidden_size=32, head="adaptive", cutoffs=(4, 12, 24), head_div=4.0).validate()
    ModelConfig(300, hidden_size=32, head="adaptive", cutoffs=(4, 12), head_div=4.0).validate()


@pytest.mark.parametrize("cutoffs", [(), (300,), (50, 20), (0, 10)])
def test_bad_cutoffs_are_refused(cutoffs):
    config = ModelConfig(300, head="adaptive", cutoffs=cutoffs)
    if not cutoffs:
        config.resolve_head()                 # empty means "the default ones"
        assert config.cutoffs == (256,)
        return
    with pytest.raises(ValueError, match="cutoffs"):
        config.validate()


def head_reference(model, out, targets):
    """The output layer in float64 as a bf16 run computes it: each product (test_fast_path.Product)
    with its operands and result rounded to bf16, every softmax exact, the weight gradients rounded
    once (each is one bf16 product). Returns each target's negative log-likelihood (B, T), the
    gradients of the mean of them for every head parameter, and for out."""
    from test_fast_path import Product, bf16
    head = model.head
    params = {name: p.detach().double().requires_grad_() for name, p in head.named_parameters()}
    x = out.detach().reshape(-1, out.shape[-1]).double().requires_grad_()
    flat = targets.t().reshape(-1)                           # out is time-major: (T, B, H)
    if not isinstance(head, AdaptiveHead):
        logits = Product.apply(x, params["weight"].t(), True) + params["bias"]
        nll = -torch.log_softmax(logits, 1).gather(1, flat[:, None])[:, 0]
    else:
        # The shortlist's ranks directly; a rarer one: its cluster's entry in the head, then its place in the cluster.
        bounds, shortlist, ranks = head.softmax.cutoffs, head.softmax.shortlist_size, head.rank[flat]
        head_logits = Product.apply(x, params["softmax.head.weight"].t(), True) + params["softmax.head.bias"]
        head_logp = torch.log_softmax(head_logits, 1)
        cluster = torch.bucketize(ranks, torch.tensor(bounds[:-1]), right=True)
        nll = -head_logp.gather(1, torch.where(cluster == 0, ranks, shortlist + cluster - 1)[:, None])[:, 0]
        for i in range(len(bounds) - 1):
            rows = (cluster == i + 1).nonzero()[:, 0]
            projected = Product.apply(x[rows], params[f"softmax.tail.{i}.0.weight"].t(), True)
            logp = torch.log_softmax(Product.apply(projected, params[f"softmax.tail.{i}.1.weight"].t(), True), 1)
            nll = nll.index_add(0, rows, -logp.gather(1, (ranks[rows] - bounds[i])[:, None])[:, 0])
    nll.mean().backward()
    grads = {name: bf16(p.grad) if name.endswith("weight") else p.grad for name, p in params.items()}
    return nll.detach().reshape(targets.shape[::-1]).t(), grads, x.grad.reshape(out.shape)


def test_low_precision_head_stays_close_and_trains_every_head_weight():
    """The output layer alone (fed the same LSTM outputs): bf16 products where the LSTM's run in
    bf16, close to float32, the loss itself float32, and a gradient for every head weight. Each
    target's figure and every gradient against head_reference: a head left in float32, a softmax in
    bf16 or a scaled gradient fail there. The head's weights are scaled up so that the model is sure
    of itself: an untrained head's loss is about ln V whatever its weights."""
    for head in ("full", "adaptive"):
        torch.manual_seed(3)
        model = CharLSTM(ModelConfig(vocab_size=300, embed_size=8, hidden_size=32, layers=1, dropout=0.0,
                                     head=head, cutoffs=(20, 100) if head == "adaptive" else ()))
        if head == "adaptive":
            model.head.order_by_frequency(torch.rand(300, generator=torch.Generator().manual_seed(1)))
        with torch.no_grad():
            for p in model.head.parameters():
                p.mul_(4)
        out, targets = torch.randn(12, 4, 32, requires_grad=True), torch.randint(0, 300, (4, 12))
        full_loss = model._loss(out, targets)
        model.lstm.matmul_dtype = torch.bfloat16
        low_loss = model._loss(out, targets)
        assert low_loss.dtype == torch.float32
        assert abs(low_loss.item() - full_loss.item()) < 0.02, head
        assert low_loss.item() != full_loss.item(), f"{head}: the head did not run in bf16"
        assert abs(low_loss.item() - math.log(300)) > 1.0, head            # far from an untrained head's figure
        low_loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters()), head
        each = model._loss(out, targets, reduction="none")
        ref_nll, ref_grads, ref_out_grad = head_reference(model, out, targets)
        # Seen: every figure within 6e-6, every gradient within 1e-5 of its norm; float32 products are
        # off by 3e-4 to 2e-3 of the norm and up to 0.08 nats on one target.
        torch.testing.assert_close(each.double(), ref_nll, atol=5e-5, rtol=0)
        for name, p in [*model.head.named_parameters(), ("out", out)]:
            reference = ref_out_grad if name == "out" else ref_grads[name]
            assert (p.grad.double() - reference).norm() <= 1e-4 * reference.norm(), (head, name)
            assert abs(p.grad.norm().item() - reference.norm().item()) <= 1e-5 * reference.norm(), (head, name)


# ---------------------------------------------------------------------------
# Regularisers
# ---------------------------------------------------------------------------

def test_locked_dropout_holds_one_mask_per_stream_for_the_whole_chunk():
    torch.manual_seed(0)
    x = torch.ones(40, 6, 50)
    locked = dropout(x, 0.5, True, locked=True)
    assert torch.equal(locked, locked[:1].expand_as(locked))          # the same at every step
    assert not torch.equal(locked[:, 0], locked[:, 1])                 # but not across streams
    assert set(locked.unique().tolist()) == {0.0, 2.0} and 0.35 < (locked == 0).float().mean() < 0.65
    per_step = dropout(x, 0.5, True, locked=False)
    assert not torch.equal(per_step[0], per_step[1])
    assert torch.equal(dropout(x, 0.5, False, locked=True), x)        # evaluation drops nothing


def test_dropout_per_step_keeps_each_unit_with_probability_one_minus_the_rate_and_scales_it():
    """The CPU's own mask (a uniform draw, not F.dropout's Bernoulli): the rate dropped, the rest
    scaled by 1/(1-p), gradients through the kept units only, and the same mask for the same seed."""
    rate = 0.15
    x = torch.randn(50, 64, 512, requires_grad=True)
    torch.manual_seed(3)
    y = dropout(x, rate, True, locked=False)
    kept = y != 0
    assert abs((~kept).float().mean().item() - rate) < 0.002
    torch.testing.assert_close(y[kept], x[kept] / (1 - rate))
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / (1 - rate))
    torch.manual_seed(3)
    assert torch.equal(dropout(x, rate, True, locked=False), y)


def test_dropconnect_masks_the_recurrent_weights_once_per_chunk(monkeypatch):
    """The layer receives W_hh with a fixed mask for the chunk: the outputs are the gate-by-gate
    reference's with that one masked matrix, and the mask drops about the rate, scaled by 1/(1-p)."""
    seen = []
    real = model_module.lstm_layer

    def recording(x, h, c, w_ih, w_hh, b_ih, b_hh, low_precision=None, residual=False):
        seen.append((x, h, c, w_ih, w_hh.detach().clone(), b_ih, b_hh))
        return real(x, h, c, w_ih, w_hh, b_ih, b_hh, low_precision=low_precision, residual=residual)

    monkeypatch.setattr(model_module, "lstm_layer", recording)
    torch.manual_seed(1)
    model = CharLSTM(ModelConfig(vocab_size=12, embed_size=6, hidden_size=40, layers=2, dropout=0.0,
                                 weight_dropout=0.3)).train()
    tokens = torch.randint(0, 12, (3, 11))
    model(tokens)
    assert len(seen) == 2
    for k, (x, h, c, w_ih, masked, b_ih, b_hh) in enumerate(seen):
        w_hh = getattr(model.lstm, f"weight_hh_l{k}").detach()
        kept = masked != 0
        assert 0.2 < 1 - kept.float().mean() < 0.4
        assert torch.allclose(masked[kept], w_hh[kept] / 0.7)
        out, _, _ = real(x.detach(), h, c, w_ih.detach(), masked, b_ih.detach(), b_hh.detach())
        ref, _, _ = lstm_layer_reference(x.detach(), h, c, w_ih.detach(), masked, b_ih.detach(), b_hh.detach())
        assert torch.allclose(out, ref, atol=1e-5)
    seen.clear()
    model.eval()(tokens)
    assert all(torch.equal(masked, getattr(model.lstm, f"weight_hh_l{k}")) for k, (*_, masked, _, _) in
               enumerate((s[:5] + s[5:] for s in seen)))


def test_embedding_dropout_drops_a_character_everywhere_in_the_chunk_or_nowhere():
    torch.manual_seed(2)
    model = CharLSTM(ModelConfig(vocab_size=10, embed_size=5, hidden_size=8, layers=1, dropout=0.0,
                                 embed_dropout=0.5)).train()
    inputs = []
    model.lstm.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    tokens = torch.arange(10).repeat(4, 3)                        # every character 12 times
    model(tokens)
    x = inputs[0].transpose(0, 1)                                  # (B, T, E)
    weight = model.embedding.weight.detach()
    dropped = set()
    for token in range(10):
        rows = x[tokens == token]
        if torch.all(rows == 0):
            dropped.add(token)
        else:
            assert torch.allclose(rows, weight[token] * 2), token      # kept rows scaled by 1/(1-p)
    assert 0 < len(dropped) < 10


@pytest.mark.parametrize("settings", [dict(weight_dropout=0.4), dict(locked_dropout=True, dropout=0.3, input_dropout=0.2),
                                      dict(embed_dropout=0.3)])
def test_every_regulariser_gives_the_reference_path_s_outputs_and_gradients(pointwise, settings):
    """The fused layer and the gate-by-gate reference, fed the same masks (same seed), agree."""
    results = []
    for reference in (False, True):
        torch.manual_seed(5)
        model = CharLSTM(ModelConfig(vocab_size=15, embed_size=6, hidden_size=20, layers=2, **settings)).train()
        tokens, targets = torch.randint(0, 15, (4, 13)), torch.randint(0, 15, (4, 13))
        torch.manual_seed(6)
        loss, _ = model(tokens, reference=reference, targets=targets)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss, grads), (ref_loss, ref_grads) = results
    assert torch.allclose(loss, ref_loss, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5)
    assert ran_the_chosen_path(pointwise)


def test_regularisers_are_off_in_evaluation():
    torch.manual_seed(4)
    model = CharLSTM(ModelConfig(vocab_size=15, embed_size=6, hidden_size=20, layers=2, dropout=0.3,
                                 locked_dropout=True, input_dropout=0.3, embed_dropout=0.3, weight_dropout=0.3)).eval()
    tokens = torch.randint(0, 15, (2, 9))
    a, _ = model(tokens)
    b, _ = model(tokens)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# Through train.py: a large vocabulary, the averaged weights, exact resume
# ---------------------------------------------------------------------------

def large_vocabulary_text(n: int = 6000, vocab: int = 1200) -> str:
    """Zipf-distributed characters from a block of CJK ideographs, in short lines."""
    gen = torch.Generator().manual_seed(0)
    weights = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    ids = torch.multinomial(weights, n, replacement=True, generator=gen).tolist() + list(range(vocab))
    chars = [chr(0x4E00 + i) for i in ids]
    return "\n".join("".join(chars[i:i + 24]) for i in range(0, len(chars), 24))


TRAIN = ["--hidden-size", "32", "--embed-size", "8", "--layers", "2", "--batch-size", "4", "--seq-len", "16",
         "--eval-every", "10", "--save-every", "5", "--log-every", "5", "--sample-length", "20", "--warmup-steps", "3",
         "-q"]


def test_a_large_vocabulary_trains_with_the_adaptive_head_then_evaluates_and_generates(tmp_path, capsys):
    text = tmp_path / "poems.txt"
    text.write_text(large_vocabulary_text(), encoding="utf-8")
    out = tmp_path / "run"
    result = run("train.py", str(text), *TRAIN, "--steps", "20", "--out", str(out))
    assert result.returncode == 0, result.stderr
    ckpt = checkpoint.load(str(out / "latest.pt"))
    assert ckpt["model_config"]["head"] == "adaptive" and ckpt["model_config"]["vocab_size"] >= ADAPTIVE_FROM
    model, tokenizer = checkpoint.build_model(ckpt)
    counts = torch.bincount(torch.tensor(tokenizer.encode(text.read_text(encoding="utf-8")[:5400]).astype("int64")),
                            minlength=tokenizer.vocab_size)
    assert counts[model.head.rank == 0].item() == counts.max().item()     # rank 0 is the commonest character
    # textgen eval (in this process: the command, not a subprocess's import) gives the text's figure under
    # the exact distribution over every character: the best model's own log-probabilities, state carried.
    # (This used to run `python -m textgen.evaluate`, a module with no main, which exits 0 doing nothing.)
    from textgen.checkpoint import load_model
    from textgen.cli import generate_main, textgen_main
    from textgen.generation.generator import Generator
    from textgen.generation.sampling import SampleConfig
    content = text.read_text(encoding="utf-8")
    capsys.readouterr()
    assert textgen_main(["eval", "--checkpoint", str(out), "--text", str(text), "--json", "--batch-size", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    best, tokenizer, _ = load_model(str(out))
    ids = torch.from_numpy(tokenizer.encode(content).astype("int64"))[None]
    with torch.no_grad():
        log_probs, _ = best(ids[:, :-1])
    expected = -log_probs[0].gather(-1, ids[0, 1:, None]).mean().item()
    assert report["predicted"] == len(content) - 1 and report["nats_per_char"] == pytest.approx(expected, rel=1e-5)
    assert report["nats_per_char"] < math.log(tokenizer.vocab_size) - 0.5        # it learnt the Zipf frequencies
    # generate.py: the prompt, then exactly 40 characters, those the Generator draws with these settings.
    assert generate_main(["--checkpoint", str(out), "--length", "40", "--top-k", "50", "--top-p", "0.9", "--seed", "3",
                          "--prompt", content[:3], "-q"]) == 0
    generated = capsys.readouterr().out
    gen = Generator(best, tokenizer, seed=3)
    gen.feed(content[:3])
    sample = gen.generate(SampleConfig(length=40, temperature=0.8, top_k=50, top_p=0.9))[0]
    assert len(sample) == 40 and generated == content[:3] + sample + "\n"


def test_the_averaged_weights_are_validated_saved_and_generated_from(tmp_path, monkeypatch, capsys):
    """--ema 0.9 through train.py's main: the training weights after every step, recorded, give the
    average by its formula (averaged += (1 - decay)(weights - averaged), decay ramping as
    min(ema, (1 + t) / (10 + t)) at step t), recomputed here in float64; best.pt holds that average
    of its own step, its validation figure is the average's, and generate.py samples from it."""
    from textgen import training
    from textgen.cli import generate_main
    from textgen.data import split_tokens
    from textgen.evaluate import cross_entropy
    from textgen.generation.generator import Generator
    from textgen.generation.sampling import SampleConfig
    from textgen.tokenizer import CharTokenizer
    weights = {}                                     # step -> the training weights after it, float64
    real_step = training.loop.train_step

    def recording_step(run):
        if not weights:
            weights[0] = [p.detach().double().clone() for p in run.model.parameters()]   # what the average starts as
        result = real_step(run)
        weights[run.progress.step] = [p.detach().double().clone() for p in run.model.parameters()]
        return result

    monkeypatch.setattr(training.loop, "train_step", recording_step)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(300), encoding="utf-8")
    out = tmp_path / "run"
    result = train_here(str(text), *TRAIN, "--steps", "20", "--eval-every", "5", "--ema", "0.9", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(weights) == list(range(21))
    expected = {0: weights[0]}
    for t in range(1, 21):
        decay = min(0.9, (1 + t) / (10 + t))
        expected[t] = [decay * a + (1 - decay) * w for a, w in zip(expected[t - 1], weights[t])]

    ckpt = checkpoint.load(str(out / "latest.pt"))
    best = checkpoint.load(str(out / "best.pt"))
    names = [name for name, _ in CharLSTM(checkpoint.model_config_of(ckpt)).named_parameters()]
    for saved in (ckpt, best):
        for name, reference in zip(names, expected[saved["step"]]):
            torch.testing.assert_close(saved["averaged_model"][name].double(), reference, atol=1e-6, rtol=1e-5)
        for name, trained in zip(names, weights[saved["step"]]):
            assert torch.equal(saved["model"][name].double(), trained), name      # training weights kept to resume
    averaged, _ = checkpoint.build_model(ckpt)
    trained, _ = checkpoint.build_model(ckpt, averaged=False)
    assert not torch.equal(averaged.head.weight, trained.head.weight)
    # The last validation scored the averaged weights: evaluate.cross_entropy of them gives its figure.
    tokenizer = CharTokenizer.from_dict(ckpt["vocab"])
    _, val = split_tokens(tokenizer.encode(text.read_text(encoding="utf-8")), 0.1)
    total, count = cross_entropy(averaged, val, 4, 16)
    assert math.isclose(total / count, ckpt["history"][-1]["val_loss"], rel_tol=1e-5)
    # ... and best.pt's figure is its average's: the one validation the average of its step was given.
    best_averaged, _ = checkpoint.build_model(best)
    total, count = cross_entropy(best_averaged, val, 4, 16)
    assert math.isclose(total / count, best["best_val_loss"], rel_tol=1e-5)
    # generate.py on the run folder samples from best.pt's averaged weights, not its training weights.
    capsys.readouterr()
    assert generate_main(["--checkpoint", str(out), "--prompt", "ANNA:\n", "--length", "80", "--seed", "3", "-q"]) == 0
    printed = capsys.readouterr().out
    texts = {}
    for which in (True, False):
        model, tok = checkpoint.build_model(best, averaged=which)
        gen = Generator(model.eval(), tok, seed=3)
        gen.feed("ANNA:\n")
        texts[which] = "ANNA:\n" + gen.generate(SampleConfig(length=80))[0] + "\n"
    assert printed == texts[True] and texts[True] != texts[False]


REGULARISED = ["--weight-dropout", "0.3", "--locked-dropout", "--input-dropout", "0.1", "--embed-dropout", "0.1",
               "--ema", "0.95"]


def test_exact_resume_with_every_regulariser_and_the_averaged_weights(tmp_path):
    """Killed mid-run and resumed: the same weights and averaged weights, bit for bit."""
    from test_resume import assert_same_run, kill_and_resume
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(300), encoding="utf-8")
    flags = [*TRAIN, *REGULARISED, "--steps", "40", "--save-every", "5"]
    whole = run("train.py", str(text), *flags, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr
    ckpt = kill_and_resume(str(text), str(tmp_path / "stopped"), flags, step_at_least=10, steps=40)
    ref = checkpoint.load(str(tmp_path / "whole" / "latest.pt"))
    assert_same_run(ckpt, ref)
    for name, tensor in ref["averaged_model"].items():
        assert torch.equal(ckpt["averaged_model"][name], tensor), name


# ---------------------------------------------------------------------------
# --size auto
# ---------------------------------------------------------------------------

from textgen.training import sizing  # noqa: E402


def budget_of(chars_per_unit_cost: float):
    """A machine that reads chars_per_unit_cost / cost_per_char characters in the budget."""
    return lambda config: chars_per_unit_cost / sizing.cost_per_char(config)


def test_a_small_text_gets_a_small_model_and_a_large_one_a_larger_model():
    base = ModelConfig(vocab_size=65)
    plenty = budget_of(1e18)
    small = sizing.choose(base, 100_000, plenty, {})
    medium = sizing.choose(base, 1_000_000, plenty, {})
    large = sizing.choose(base, 100_000_000, plenty, {})
    assert small.hidden_size < medium.hidden_size < large.hidden_size
    for choice, chars in ((small, 100_000), (medium, 1_000_000)):
        params = ModelConfig(65, hidden_size=choice.hidden_size, layers=choice.layers).num_parameters()
        limit = sizing.STRONG_PARAMETERS_PER_CHAR if choice.regularisers else sizing.PARAMETERS_PER_CHAR
        assert params <= limit * chars and "the text limits it" in choice.reason


def test_the_strong_regularisers_loosen_the_texts_limit_unless_one_is_turned_off():
    base = ModelConfig(vocab_size=65)
    chars = 100_000
    read_long = sizing.choose(base, chars, budget_of(1e18), {})
    read_ten_times = sizing.choose(base, chars, lambda config: 10 * chars, {})
    without_dropconnect = sizing.choose(base, chars, budget_of(1e18), {"weight_dropout": 0.0})

    def params(choice):
        return ModelConfig(65, hidden_size=choice.hidden_size, layers=choice.layers).num_parameters()

    assert read_long.regularisers == sizing.STRONG and not read_ten_times.regularisers
    assert sizing.PARAMETERS_PER_CHAR * chars < params(read_long) <= sizing.STRONG_PARAMETERS_PER_CHAR * chars
    assert read_long.hidden_size == 256                     # where 4 a character gives 2x128 (measured at 0.1 MB)
    for choice in (read_ten_times, without_dropconnect):
        assert params(choice) <= sizing.PARAMETERS_PER_CHAR * chars < params(read_long)
    assert "(2x384, read " in read_long.reason and "more than 16 parameters a training character" in read_long.reason
    assert "more than 4 parameters a training character" in read_ten_times.reason


def test_a_short_budget_gets_a_model_it_can_train_in_time():
    base = ModelConfig(vocab_size=65)
    long_run = sizing.choose(base, 100_000_000, budget_of(1e16), {})
    short_run = sizing.choose(base, 100_000_000, budget_of(1e14), {})
    assert short_run.hidden_size < long_run.hidden_size and "budget limits" in short_run.reason
    config = ModelConfig(65, hidden_size=short_run.hidden_size, layers=short_run.layers)
    assert budget_of(1e14)(config) >= sizing.CHARS_PER_PARAMETER * config.num_parameters()


def test_a_text_read_several_times_gets_the_same_model_on_a_slower_or_faster_machine():
    """tiny-shakespeare's 15 minutes read 2x512 about 9 times on AMD EPYC, 5-7 on an Intel Xeon and
    3.8 on an AMD EPYC Zen 3;
    the budget's limit once turned the slower machine's choice down to 2x384 (1.5005 nats/char
    against 2x512's 1.4668 there). Where the text is read several times its own limit decides;
    where it is read less than once (100 MB), the budget's still does."""
    base = ModelConfig(vocab_size=65)
    chars = 1_003_855
    reference = ModelConfig(65, hidden_size=512, layers=2)
    assert reference.num_parameters() > 2 * chars             # 2x512 reads under 2.5 a parameter at 7 passes
    for passes in (3.2, 3.8, 4.5, 6, 7, 9, 12, 20):       # 3.8: an AMD EPYC Zen 3's 15 minutes
        per_unit_cost = passes * chars * sizing.cost_per_char(reference)
        choice = sizing.choose(base, chars, budget_of(per_unit_cost), {})
        assert (choice.layers, choice.hidden_size) == (2, 512), (passes, choice.reason)
        assert "the text limits it" in choice.reason
    large = 100 * chars
    per_unit_cost = 2 * reference.num_parameters() * sizing.cost_per_char(reference)   # 2 a parameter
    choice = sizing.choose(base, large, budget_of(per_unit_cost), {})
    assert choice.hidden_size < 512 and "(2x512 would read fewer than 2.5 characters a parameter" in choice.reason
    per_unit_cost = 2.5 * chars * sizing.cost_per_char(reference)      # 2.5 passes: still held back
    choice = sizing.choose(base, chars, budget_of(per_unit_cost), {})
    assert choice.hidden_size < 512 and "the text fewer than 3 times" in choice.reason


def test_dropout_grows_with_the_passes_over_the_text_and_given_settings_win():
    assert sizing.dropout_for(0.5) < sizing.dropout_for(8) < sizing.dropout_for(500) <= 0.5
    base = ModelConfig(vocab_size=65)
    fixed = sizing.choose(base, 100_000, budget_of(1e18), {"hidden_size": 300, "dropout": 0.0})
    assert (fixed.hidden_size, fixed.dropout, fixed.layers) == (300, 0.0, 2)


def test_a_text_read_many_times_gets_the_strong_regularisers_and_given_ones_win():
    base = ModelConfig(vocab_size=65)
    few = sizing.choose(base, 1_000_000, lambda config: 5_000_000, {})
    many = sizing.choose(base, 100_000, lambda config: 100_000 * sizing.MANY_PASSES, {})
    assert not few.regularisers and many.regularisers == sizing.STRONG and "many passes" in many.reason
    given = sizing.choose(base, 100_000, lambda config: 100_000 * sizing.MANY_PASSES, {"weight_dropout": 0.1})
    assert "weight_dropout" not in given.regularisers and given.regularisers["locked_dropout"] is True


def test_a_large_vocabulary_read_many_times_gets_embedding_dropout_too():
    many_passes = lambda config: 100_000 * sizing.MANY_PASSES      # noqa: E731
    small = sizing.choose(ModelConfig(vocab_size=ADAPTIVE_FROM - 1), 100_000, many_passes, {})
    large = sizing.choose(ModelConfig(vocab_size=ADAPTIVE_FROM), 100_000, many_passes, {})
    few = sizing.choose(ModelConfig(vocab_size=ADAPTIVE_FROM), 1_000_000, lambda config: 5_000_000, {})
    assert "embed_dropout" not in small.regularisers and not few.regularisers
    assert large.regularisers == {**sizing.STRONG, **sizing.STRONG_LARGE_VOCABULARY}
    assert "embed dropout 0.3" in large.reason
    given = sizing.choose(ModelConfig(vocab_size=ADAPTIVE_FROM), 100_000, many_passes, {"embed_dropout": 0.05})
    assert "embed_dropout" not in given.regularisers and given.regularisers["weight_dropout"] == 0.5


def test_the_trainer_gives_a_large_vocabulary_embedding_dropout_unless_the_user_set_it(tmp_path, monkeypatch):
    from textgen.training import TrainConfig, build_run
    monkeypatch.setattr(sizing, "measure", lambda *args, **kwargs: 1e-12)   # every size fast: many passes
    text = tmp_path / "poems.txt"
    text.write_text(large_vocabulary_text(), encoding="utf-8")

    def chosen(**given):
        config = TrainConfig(text=str(text), batch_size=4, seq_len=16, time_budget=600.0,
                             out=str(tmp_path / f"run{len(given)}"))
        return build_run(ModelConfig(vocab_size=1, **given), config, explicit=set(given), log=lambda m: None).model_config

    assert chosen().embed_dropout == sizing.STRONG_LARGE_VOCABULARY["embed_dropout"]
    assert chosen(embed_dropout=0.0).embed_dropout == 0.0


def test_models_smaller_than_the_reference_are_timed_themselves(tmp_path, monkeypatch):
    """The reference's time scaled by multiply-adds reads small models fast; those are timed
    themselves, each once, and the size line's characters read come from their own time."""
    from textgen.training import TrainConfig, build_run
    timed = []

    def fake_measure(config, batch, matmul_dtype, device, steps=3, untimed=2):
        timed.append((config.layers, config.hidden_size))
        return 1e-9 * (3.0 if config.hidden_size < 512 else 1.0)      # small ones: 3x slower a unit of cost

    monkeypatch.setattr(sizing, "measure", fake_measure)
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(300), encoding="utf-8")
    lines = []
    config = TrainConfig(text=str(text), batch_size=4, seq_len=16, time_budget=60.0, out=str(tmp_path / "run"))
    chosen = build_run(ModelConfig(vocab_size=1), config, log=lines.append).model_config
    reference = (sizing.REFERENCE[0], sizing.REFERENCE[1])
    assert len(timed) == len(set(timed)) and reference not in timed            # each once; none as large
    assert (chosen.layers, chosen.hidden_size) in timed
    expected = sizing.TRAINING_SHARE * 60.0 / (3e-9 * sizing.cost_per_char(chosen))
    line = next(line for line in lines if line.startswith("size auto:"))
    assert f"about {expected:,.0f} characters read" in line, line


def test_the_warm_up_timing_takes_the_fastest_step_not_the_first_slow_ones(monkeypatch):
    """Steps of 9, 7, 5, 2 and 3 clock units (the first two untimed): the step costs 2 units."""
    ticks = iter([0, 9, 16, 21, 21, 23, 23, 26])   # an untimed step reads only its start
    monkeypatch.setattr(sizing, "time", type("Clock", (), {"perf_counter": staticmethod(lambda: next(ticks))}))
    config = ModelConfig(30, hidden_size=16, layers=1)
    x = torch.zeros(2, 5, dtype=torch.long)
    seconds = sizing.measure(config, (x, x), None, torch.device("cpu"), steps=3, untimed=2)
    assert seconds == pytest.approx(2 / x.numel() / sizing.cost_per_char(config))


def test_parse_size():
    assert sizing.parse_size("auto") is None and sizing.parse_size("3x256") == (3, 256)
    for bad in ("3y", "0x512", "x512", "big"):
        with pytest.raises(ValueError, match="size must be auto"):
            sizing.parse_size(bad)


def test_train_py_sizes_the_model_for_its_budget_and_says_why(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(small_text(300), encoding="utf-8")
    flags = ["--batch-size", "4", "--seq-len", "16", "--sample-length", "0", "--warmup-steps", "2"]
    timed = run("train.py", str(text), *flags, "--time", "4s", "--out", str(tmp_path / "timed"))
    assert timed.returncode == 0, timed.stderr
    line = next(line for line in timed.stdout.splitlines() if line.startswith("size auto:"))
    config = checkpoint.load(str(tmp_path / "timed" / "latest.pt"))["model_config"]
    assert line.startswith(f"size auto: {config['layers']}x{config['hidden_size']}, dropout {config['dropout']:g}; ")
    assert "training characters" in line and "passes" in line
    if "many passes" in line:                      # a small text for 4 s: read many times over
        assert config["weight_dropout"] == sizing.STRONG["weight_dropout"] and config["locked_dropout"]
    fixed = train_here(str(text), *flags, "--steps", "3", "--size", "1x40", "--dropout", "0.3",
                "--out", str(tmp_path / "fixed"))
    assert fixed.returncode == 0, fixed.stderr
    config = checkpoint.load(str(tmp_path / "fixed" / "latest.pt"))["model_config"]
    assert (config["layers"], config["hidden_size"], config["dropout"]) == (1, 40, 0.3)
    assert "size " not in fixed.stdout.split("run folder")[0]          # nothing left to choose, nothing said
