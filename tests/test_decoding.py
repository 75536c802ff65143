"""One generation loop: the single-prompt Generator and the batching engine both generate through
sampling.Decoding, so a stop string ends each sample alike, one sample or several, alone or served."""
import pytest
import torch

from conftest import train_tiny
from textgen.generation.batching import BatchingEngine
from textgen.generation.jobs import Job
from textgen.checkpoint import load_model
from textgen.generation.generator import Generator
from textgen.generation.sampling import Decoding, SampleConfig


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    run, _ = train_tiny(tmp_path_factory.mktemp("decoding"))
    return load_model(run)[:2]


def test_decoding_ends_each_sample_at_its_own_stop_and_the_request_when_all_have():
    config = SampleConfig(length=10, stop="ab", num_samples=2)
    decoding = Decoding(config, torch.Generator().manual_seed(1), 2)
    assert decoding.advance(["a", "x"]) == ["a", "x"] and decoding.ended is None
    assert decoding.advance(["b", "a"]) == ["b", "a"] and decoding.stopped == [True, False]
    assert decoding.advance(["q", "b"]) == [None, "b"] and decoding.ended == "stop"
    short = Decoding(SampleConfig(length=2, stop="zz"), torch.Generator(), 1)
    short.advance(["z"])
    short.advance(["y"])
    assert short.ended == "length"


def test_several_samples_stop_alike_in_the_generator_and_in_the_server(model):
    model, tokenizer = model
    config = SampleConfig(length=300, temperature=1.0, seed=11, num_samples=3, stop="\n")
    gen = Generator(model, tokenizer, num_samples=3, seed=11)
    gen.feed("ANNA: ")
    texts = gen.generate(config)
    # Each sample ends at its first newline (or runs to the length without one), and only there.
    for text in texts:
        assert text.count("\n") <= 1 and (text.endswith("\n") or len(text) == 300), repr(text)
    # Without the stop string the same seed draws the same characters: each sample is that text, cut.
    gen = Generator(model, tokenizer, num_samples=3, seed=11)
    gen.feed("ANNA: ")
    whole = gen.generate(SampleConfig(length=300, temperature=1.0, seed=11, num_samples=3))
    for text, full in zip(texts, whole):
        assert text == (full[: full.index("\n") + 1] if "\n" in full else full)
    engine = BatchingEngine(model, tokenizer, slots=4, max_waiting=4)
    try:
        job = engine.submit(Job("ANNA: ", config))
        assert job.finished.wait(60)
        served = ["", "", ""]
        end = None
        while not job.events.empty():
            kind, value = job.events.get()
            if kind == "end":
                end = value
            elif isinstance(kind, int):
                served[kind] += value
        assert served == texts, (served, texts)          # the server stopped each sample where --stop did
        assert end == ("stop" if all(t.endswith("\n") for t in texts) else "length")
    finally:
        engine.close()
        engine.scheduler.stop()


def test_a_continued_request_reports_the_seed_its_random_stream_carries_on_from(model):
    """Continue without a seed carries the session's generator on; the seed it reports is the chain's
    (a new random number there reproduced nothing), and that seed given again reproduces the whole."""
    model, tokenizer = model
    engine = BatchingEngine(model, tokenizer, slots=2, max_waiting=4)

    def run(prompt, seed=None, session=None):
        job = engine.submit(Job(prompt, SampleConfig(length=40, temperature=1.0, seed=seed), session=session))
        assert job.finished.wait(60)
        text = ""
        while not job.events.empty():
            kind, value = job.events.get()
            text += value if kind == 0 else ""
        return job, text
    try:
        first, text1 = run("BORIS: ", seed=7)
        second, text2 = run("", session=first.id)
        assert second.seed == 7
        again, again1 = run("BORIS: ", seed=second.seed)
        _, again2 = run("", session=again.id)
        assert (again1, again2) == (text1, text2)
    finally:
        engine.close()
        engine.scheduler.stop()


def test_the_c_draw_is_the_reference_draw():
    """The C kernel's draw (lstm.sample_rows, which next_tokens uses) against next_token_probs + draw, its
    reference, on 3000 random steps: temperatures 0 to 2.5, top-k and top-p cuts (one for every row and
    one per row), tokens at -inf (what --max-copy forbids). The two may only part where u falls within a
    last bit of the boundary between two tokens (the kernel's exp is its own); here they never do."""
    from conftest import c_kernel_or_skip
    from textgen.generation.sampling import draw, next_token_probs
    from textgen.lstm import sample_rows
    c_kernel_or_skip()
    g = torch.Generator().manual_seed(0)
    rows = parted = 0
    for trial in range(3000):
        N, V = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 300, (1,), generator=g))
        logits = torch.randn(N, V, generator=g) * float(torch.rand(1, generator=g) * 8)
        if trial % 7 == 0:
            logits[:, : V // 3] = float("-inf")
        T, top_k = (0.0, 0.3, 0.8, 1.0, 2.5)[trial % 5], (None, 1, 5, V, V + 3)[trial % 4]
        top_p = (None, 0.5, 0.9, 1e-300, 1e-30)[trial % 5 if trial % 3 else 0]       # 1e-300: 0 in float32
        if trial % 11 == 0:
            T, top_k, top_p = torch.rand(N, generator=g) * 2, torch.randint(1, V + 2, (N,), generator=g), \
                torch.rand(N, generator=g)
        u = torch.rand(N, generator=g, dtype=torch.float64)
        probs = next_token_probs(logits, T, top_k, top_p)
        ours, reference = sample_rows(logits, T, top_k, top_p, u), draw(probs, u)
        rows += N
        for r in (ours != reference).nonzero().flatten().tolist():
            cdf = probs[r].double().cumsum(0)
            assert (cdf - u[r] * cdf[-1]).abs().min() < 1e-6 * cdf[-1], (trial, r)   # only at a boundary
            parted += 1
        assert bool((probs.gather(1, ours.unsqueeze(1)) > 0).all())      # never a token the cuts removed
    assert rows > 7000 and parted <= rows // 1000


def test_a_top_k_past_the_vocabulary_is_no_cut_however_large():
    """A top-k of the vocabulary or more cuts nothing, up to the largest number a setting may hold (a C int64
    would wrap 2**63 to a negative number, which is greedy)."""
    from textgen.generation.sampling import next_tokens
    g = torch.Generator().manual_seed(2)
    logits, u = torch.randn(8, 40, generator=g), torch.rand(8, generator=g, dtype=torch.float64)
    uncut = next_tokens(logits, 2.0, None, None, u)
    assert not torch.equal(uncut, logits.argmax(1))          # a cut to one token would show
    for top_k in (40, 41, 10**12, 2**63, 2**70):
        assert torch.equal(next_tokens(logits, 2.0, top_k, None, u), uncut), top_k


def _streamed(gen, configs, read=None):
    """What gen.stream yields for each config in turn (a reader taking only `read` lists of the first),
    then the state, logits and random state the generator is left with."""
    shown = []
    for number, config in enumerate(configs):
        for count, chars in enumerate(gen.stream(config), 1):
            shown.append(chars)
            if number == 0 and count == read:
                break
    return shown, gen.state, gen.logits, gen.rng.get_state()


def _same_leftovers(a, b):
    (_, state_a, logits_a, rng_a), (_, state_b, logits_b, rng_b) = a, b
    return (all(torch.equal(x, y) for pa, pb in zip(state_a, state_b) for x, y in zip(pa, pb))
            and torch.equal(logits_a, logits_b) and torch.equal(rng_a, rng_b))


@pytest.mark.parametrize("block", [7, 256])
@pytest.mark.parametrize("samples, settings", [
    (1, dict(temperature=1.0)),
    (1, dict(temperature=0.8, stop="\n")),              # a stop met mid-call: the call returns there
    (3, dict(temperature=1.2, top_k=5, top_p=0.9, stop="e ")),
    (2, dict(temperature=0.0)),
    (4, dict(temperature=0.7, top_p=0.5, stop="\n\n"))])
def test_many_characters_per_call_give_what_one_at_a_time_gives(model, monkeypatch, samples, settings, block):
    """Generator.stream decodes many characters per C call (Stepper.decode): every character yielded, the
    stop strings met (within a call and across calls), the state, the logits and the random stream left for
    the next request are those of one character at a time, the reference, bit for bit. A reader who stops
    reading mid-call leaves the generator where one step at a time would have."""
    from conftest import CountingKernel, c_kernel_or_skip
    from textgen.lstm import native_kernel
    model, tokenizer = model
    counting = CountingKernel(c_kernel_or_skip())
    monkeypatch.setattr(native_kernel, "load", lambda: counting)
    monkeypatch.setattr(Generator, "DECODE_STEPS", block)
    configs = [SampleConfig(length=length, seed=5, num_samples=samples, **settings) for length in (600, 90, 333)]

    def run(read=None, one_at_a_time=False):
        gen = Generator(model, tokenizer, num_samples=samples, seed=5)
        if one_at_a_time:
            gen._decoded = lambda decoding: iter(())
        gen.feed("ANNA: ")
        counting.slices.clear()
        return _streamed(gen, configs, read), counting.calls
    (fast, calls), (reference, _) = run(), run(one_at_a_time=True)
    total = sum(map(len, (fast[0], reference[0])))
    assert fast[0] == reference[0] and _same_leftovers(fast, reference), settings
    assert 0 < calls < total / 2                 # many characters per call, not one step each
    for read in (block // 2 + 1, 10):
        (fast, _), (reference, _) = run(read), run(read, one_at_a_time=True)
        assert fast[0] == reference[0] and _same_leftovers(fast, reference), (settings, read)


def test_many_characters_per_call_with_styles_give_what_one_at_a_time_gives(monkeypatch):
    """A model with styles (their share of layer 0's gates added to each row's), residual layers, rows in
    different styles: the decoded text and state are the per-step path's."""
    from conftest import c_kernel_or_skip
    from textgen.lstm import CharLSTM, ModelConfig
    from textgen.tokenizer import CharTokenizer
    c_kernel_or_skip()
    torch.manual_seed(3)
    tokenizer = CharTokenizer("abcdefgh \n")
    model = CharLSTM(ModelConfig(vocab_size=10, embed_size=8, hidden_size=37, layers=3, dropout=0.0,
                                 style_names=("x", "y"))).eval()
    with torch.no_grad():
        model.style_embedding.weight.normal_()
    results = []
    for one_at_a_time in (False, True):
        gen = Generator(model, tokenizer, num_samples=3, seed=9, style="y")
        if one_at_a_time:
            gen._decoded = lambda decoding: iter(())
        gen.feed("abc")
        gen.styles = torch.tensor([0, 1, -1])
        results.append(_streamed(gen, [SampleConfig(length=500, temperature=1.0, stop="h\n")]))
    assert results[0][0] == results[1][0] and _same_leftovers(*results)
    assert len({"".join(ch or "" for ch in column) for column in zip(*results[0][0])}) == 3


def test_the_server_decodes_many_characters_as_it_steps_one(model, monkeypatch):
    """The batching engine decodes its busy rows many characters per call (decode_many: several jobs, each
    with its own settings, random stream and stop strings). Each job's text, where it ended, and the session
    it leaves (state, logits, random state) are those the engine gives stepping one character at a time."""
    from conftest import CountingKernel, c_kernel_or_skip
    from textgen.lstm import native_kernel
    model, tokenizer = model
    counting = CountingKernel(c_kernel_or_skip())
    monkeypatch.setattr(native_kernel, "load", lambda: counting)
    settings = [dict(temperature=1.0, stop="\n"), dict(temperature=0.6, top_k=4, stop="e"),
                dict(temperature=1.3, top_p=0.8, num_samples=2, stop=" the"), dict(temperature=0.0),
                dict(temperature=0.9, length=77)]

    def serve(decodes: bool):
        engine = BatchingEngine(model, tokenizer, slots=6, max_waiting=8)
        if not decodes:
            monkeypatch.setattr(engine.stepper, "decode", lambda *arguments: None)
        try:
            jobs = [engine.submit(Job("ANNA: ", SampleConfig(**{"length": 500, "seed": 20 + k, **kw})))
                    for k, kw in enumerate(settings)]
            out = []
            for job in jobs:
                assert job.finished.wait(60)
                texts, events = {}, []
                while not job.events.empty():
                    events.append(job.events.get())
                for kind, value in events:
                    if isinstance(kind, int):
                        texts[kind] = texts.get(kind, "") + value
                session = engine.sessions[job.id]
                out.append((texts, events[-1], session.state, session.logits, session.rng_state))
            return out
        finally:
            engine.close()
            engine.scheduler.stop()
    counting.slices.clear()
    decoded = serve(True)
    calls = counting.calls
    stepped = serve(False)
    for (texts, end, state, logits, rng), (texts1, end1, state1, logits1, rng1) in zip(decoded, stepped):
        assert texts == texts1 and end == end1
        assert all(torch.equal(a, b) for pair, pair1 in zip(state, state1) for a, b in zip(pair, pair1))
        assert torch.equal(logits, logits1) and torch.equal(rng, rng1)
    assert {end for _, end, *_ in decoded} == {("end", "stop"), ("end", "length")}
    assert 0 < calls < sum(len(t) for texts, *_ in decoded for t in texts.values()) / 4


def test_a_stream_held_open_leaves_the_generator_where_its_reader_stopped(model):
    """A reader who stops reading a stream without closing it (it stays referenced) and then feeds and
    generates again gets what one character at a time gives: the decode call is taken back to what was
    handed out the moment the generator is used again; a stream read on after that goes on from there, and
    closing it later changes nothing."""
    model, tokenizer = model

    def session(one_at_a_time):
        gen = Generator(model, tokenizer, seed=3)
        if one_at_a_time:
            gen._decoded = lambda decoding: iter(())
        gen.feed("ANNA: ")
        stream = gen.stream(SampleConfig(length=500, temperature=1.0))
        first = [chars[0] for _, chars in zip(range(5), stream)]    # five read; the stream stays open
        gen.feed("\n")
        second = gen.generate(SampleConfig(length=40, temperature=1.0))[0]
        more = [chars[0] for _, chars in zip(range(30), stream)]      # the held stream read on
        del stream                                                    # closed now
        third = gen.generate(SampleConfig(length=40, temperature=1.0))[0]
        return first, second, more, third, gen.state, gen.rng.get_state()
    decoded, stepped = session(False), session(True)
    assert decoded[:4] == stepped[:4]
    assert all(torch.equal(a, b) for pa, pb in zip(decoded[4], stepped[4]) for a, b in zip(pa, pb))
    assert torch.equal(decoded[5], stepped[5])


def test_a_cancelled_request_stops_at_the_next_call(model):
    """A job cancelled before it is first stepped ends after one character at most, not a decode call's
    worth; one cancelled while running ends at the next call (here: at all)."""
    model, tokenizer = model
    engine = BatchingEngine(model, tokenizer, slots=2, max_waiting=4)
    engine.scheduler.stop()                  # stepped by hand below
    try:
        job = engine.submit(Job("ANNA: ", SampleConfig(length=2000, seed=4, temperature=1.0)))
        engine.tick()                        # admitted and stepped
        produced = job.produced
        job.cancel()
        engine.tick()
        assert job.finished.is_set() and job.reason == "stopped"
        assert job.produced <= produced + 1
    finally:
        engine.close()
