"""The copy report and --max-copy (copy_index.py), and priming from a document (priming.py).

References: brute-force substring search for the suffix array, the longest verbatim span and the
characters that extend a run; for the guard, every output of a model that has learnt a short text
by heart, over many seeds, checked by brute force."""
import hashlib
import os
import random

import numpy as np
import pytest
import torch

import textgen
from conftest import small_text
from textgen.copy_index import CopyIndex, describe, for_checkpoint, suffix_array
from textgen.tokenizer import CharTokenizer

SHORT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
         "all that glitters is not gold. the early bird catches the worm.\n") * 8


def longest_common_span(output: str, text: str) -> int:
    """Brute force: the longest substring of output that occurs in text."""
    best = 0
    for i in range(len(output)):
        while i + best < len(output) and output[i:i + best + 1] in text:
            best += 1
    return best


@pytest.fixture(scope="module")
def by_heart(tmp_path_factory):
    """A model that has learnt SHORT by heart (its samples copy long stretches of it), and the text's path."""
    from textgen.cli import train_main
    folder = tmp_path_factory.mktemp("byheart")
    text = folder / "short.txt"
    text.write_text(SHORT, encoding="utf-8")
    out = str(folder / "run")
    assert train_main([str(text), "--hidden-size", "64", "--embed-size", "16", "--layers", "1", "--batch-size", "4",
                       "--seq-len", "32", "--steps", "250", "--eval-every", "125", "--dropout", "0", "--ema", "0",
                       "--weight-decay", "0", "--sample-length", "0", "--out", out, "-q"]) == 0
    return out, str(text)


def random_text(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


@pytest.mark.parametrize("alphabet", ["ab", "abc\n", "aβγδ€😀" + "".join(map(chr, range(0x4e00, 0x4e00 + 300)))])
def test_index_answers_as_brute_force_search_does(alphabet):
    # The last alphabet has more than 256 characters: two-byte ids, compared as big-endian bytes.
    rng = random.Random(len(alphabet))
    for trial in range(60):
        text = random_text(rng, alphabet[: 3 + trial % len(alphabet)] if len(alphabet) > 4 else alphabet,
                           rng.randrange(1, 80))
        index = CopyIndex.from_text(text, CharTokenizer(alphabet))
        assert list(index.sa) == sorted(range(len(text)), key=lambda i: text[i:])
        output = random_text(rng, alphabet[:6], rng.randrange(1, 40))
        found = index.longest_copy(index.tokenizer.encode(output))
        best = longest_common_span(output, text)
        assert found["length"] == best
        if best:
            span = output[found["start"]:found["start"] + best]
            assert text[found["offset"]:found["offset"] + best] == span
            assert found["offset"] == text.find(span)                      # its first occurrence
            assert found["occurrences"] == sum(text.startswith(span, i) for i in range(len(text)))
        for k in (1, 2, 3):
            window = output[-k:]
            k = len(window)
            ext = index.tokenizer.decode(index.extensions(index.tokenizer.encode(window)))
            assert sorted(ext) == sorted({text[i + k] for i in range(len(text) - k) if text[i:i + k] == window})


def test_suffix_array_of_long_repeats_and_edge_sizes():
    for tokens in ([], [0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 1] * 40 + [0]):
        t = np.array(tokens, dtype=np.uint8)
        assert list(suffix_array(t)) == sorted(range(len(t)), key=lambda i: tokens[i:])


def test_report_line_names_span_line_and_file(tmp_path):
    text = "one\ntwo three\nfour five six\n"
    index = CopyIndex.from_text(text)
    index.info["path"] = "corpus.txt"
    report = index.report(["xx five sixty", "zz\ntwo three"])
    assert (report["length"], report["sample"], report["text"], report["line"]) == (10, 1, "\ntwo three", 1)
    assert index.report(["xx five sixty"])["line"] == 3
    line = describe(report, samples=2)
    assert '10 characters, "\\ntwo three"' in line and "line 1 of corpus.txt" in line and "(sample 2)" in line


def test_guard_keeps_every_run_at_most_n_over_many_seeds(by_heart):
    run, text_path = by_heart
    model = textgen.load(run)
    copied = [longest_common_span(model.generate("the ", length=150, temperature=1.0, seed=s), SHORT)
              for s in range(6)]
    assert min(copied) > 8 and max(copied) > 30         # unguarded, this model copies long stretches
    for n in (3, 8):
        for seed in range(25):
            out = model.generate("the ", length=150, temperature=1.0, seed=seed, max_copy=n)
            assert longest_common_span(out, SHORT) <= n, (n, seed, out)
    greedy = model.generate("the ", length=150, temperature=0, max_copy=8)
    assert longest_common_span(greedy, SHORT) <= 8
    two = model.generate("", length=100, seed=3, num_samples=2, top_k=3, max_copy=5)
    assert all(longest_common_span(t, SHORT) <= 5 for t in two)


def test_guard_holds_across_paragraphs(by_heart, capsys):
    from textgen.cli import generate_main
    # Paragraphs cut at --length are closed with newlines that are part of the output: a run goes on through them.
    run, _ = by_heart
    for seed in range(4):
        assert generate_main(["--checkpoint", run, "--paragraphs", "8", "--length", "12", "--seed", str(seed),
                              "--max-copy", "6", "-q"]) == 0
        assert longest_common_span(capsys.readouterr().out, SHORT) <= 6


def test_guard_in_the_batching_engine(by_heart):
    from textgen.generation.batching import BatchingEngine
    from textgen.generation.jobs import Job
    from textgen.checkpoint import load_model
    from textgen.generation.sampling import SampleConfig
    run, _ = by_heart
    model, tokenizer, ckpt = load_model(run)
    engine = BatchingEngine(model, tokenizer, slots=4)
    engine.copy_index, engine.copy_note = for_checkpoint(ckpt, tokenizer)
    jobs = [engine.submit(Job("the ", SampleConfig(length=120, seed=s, max_copy=None if s == 0 else 6)))
            for s in range(4)]
    texts = []
    for job in jobs:
        assert job.finished.wait(60)
        got = []
        while not job.events.empty():
            kind, value = job.events.get()
            if isinstance(kind, int):
                got.append(value)
        texts.append("".join(got))
    engine.close()
    assert longest_common_span(texts[0], SHORT) > 6      # the unguarded row beside them copies
    assert all(longest_common_span(t, SHORT) <= 6 for t in texts[1:]), texts


def test_cli_report_matches_brute_force_and_a_changed_text_is_one_line(by_heart, tmp_path, capsys):
    from textgen.cli import generate_main
    run, text_path = by_heart
    assert generate_main(["--checkpoint", run, "--prompt", "a ", "--length", "120", "--seed", "5"]) == 0
    captured = capsys.readouterr()
    output = captured.out[len("a "):-1]
    report = [line for line in captured.err.splitlines() if line.startswith("copy report")]
    assert len(report) == 1 and f"is {longest_common_span(output, SHORT)} characters" in report[0]
    assert f"of {text_path}" in report[0]
    original = open(text_path, encoding="utf-8").read()
    try:
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(original.replace("fox", "cat"))                      # same size, other content
        assert generate_main(["--checkpoint", run, "--length", "20", "--seed", "5"]) == 0
        err = capsys.readouterr().err
        assert "has changed since training" in err and "no copy report" in err and "copy report:" not in err
        assert generate_main(["--checkpoint", run, "--length", "20", "--max-copy", "5"]) == 2
        assert "--max-copy needs the training text" in capsys.readouterr().err
    finally:
        with open(text_path, "w", encoding="utf-8") as f:
            f.write(original)


def test_cached_index_is_reused_and_a_damaged_one_rebuilt(tmp_path):
    from textgen import copy_index
    from textgen.corpus import prepare
    text = tmp_path / "t.txt"
    text.write_text(small_text(50), encoding="utf-8")
    corpus = prepare(str(text), str(tmp_path / "cache"))
    said = []
    first = copy_index.cached(corpus.info["cache"], corpus.tokens, corpus.sha256, said.append)
    assert any("indexing" in s for s in said)
    said.clear()
    again = copy_index.cached(corpus.info["cache"], corpus.tokens, corpus.sha256, said.append)
    assert said == [] and np.array_equal(first, again)
    path = os.path.join(corpus.info["cache"], "suffix.bin")
    with open(path, "r+b") as f:                                         # swap two entries: still a permutation
        data = bytearray(f.read())
        data[0:4], data[4:8] = data[4:8], data[0:4]
        f.seek(0)
        f.write(data)
    rebuilt = copy_index.cached(corpus.info["cache"], corpus.tokens, corpus.sha256, said.append)
    assert any("damaged" in s for s in said) and np.array_equal(rebuilt, first)


def test_server_final_line_carries_the_report(by_heart, tmp_path):
    from test_serve import Served
    run, _ = by_heart
    served = Served(run, slots=2)
    try:
        events = served.generate(prompt="the ", length=80, seed=1, max_copy=6)
        end = events[-1]
        text = "".join(e.get("text", "") for e in events)
        assert end["copy"]["length"] == longest_common_span(text, SHORT) <= 6
        assert end["copy"]["file"] == "short.txt" and end["copy"]["text"] in SHORT
        # Unguarded, two samples: the report is the longer of the two, found in the text that sample sent.
        events = served.generate(prompt="the ", length=120, seed=2, num_samples=2)
        texts = ["".join(e["text"] for e in events if "text" in e and e.get("sample") == k) for k in range(2)]
        report = events[-1]["copy"]
        assert report["length"] == max(longest_common_span(t, SHORT) for t in texts) > 6
        assert report["text"] in texts[report["sample"]] and len(report["text"]) == report["length"]
        primed = served.generate(prime="all that glitters ", prompt="is", length=20, seed=1)
        assert primed[-1]["end"] == "length"
    finally:
        served.close()


# ---------------------------------------------------------------------------
# Priming
# ---------------------------------------------------------------------------

def continuation_nll(gen, text: str) -> float:
    """Mean -log p of text read on from gen's state, with gen's current model."""
    ids = torch.from_numpy(gen.tokenizer.encode(text).astype("int64"))[None]
    with torch.no_grad():
        logp = torch.log_softmax(gen.logits[:1].float(), -1)[0, ids[0, 0]]
        nll, _ = gen.model(ids[:, :-1], tuple((h[:1], c[:1]) for h, c in gen.state), targets=ids[:, 1:],
                           reduction="none")
    return float((nll.sum() - logp) / ids.shape[1])


def test_priming_reads_the_document_before_the_prompt(by_heart):
    model = textgen.load(by_heart[0])
    primed = model.generate("the ", prime="a stitch in time. ", length=60, seed=4)
    gen = model.generator(seed=4)
    gen.feed("a stitch in time. ")
    gen.feed("the ")
    from textgen.generation.sampling import SampleConfig
    assert [primed] == gen.generate(SampleConfig(length=60, seed=4))
    assert primed != model.generate("the ", length=60, seed=4)


def test_adapting_lowers_the_loss_on_the_documents_continuation_and_leaves_the_checkpoint(by_heart):
    from textgen.generation.priming import prime
    run, _ = by_heart
    best = os.path.join(run, "best.pt")
    before = hashlib.sha256(open(best, "rb").read()).hexdigest()
    model = textgen.load(run)
    # A document in the model's characters but unlike its text, and its held-out continuation.
    document = "gold fox saves nine worms. " * 12
    continuation = "gold fox saves nine worms. gold fox saves nine worms. "
    plain, adapted = model.generator(seed=0), model.generator(seed=0)
    prime(plain, document)
    done = prime(adapted, document, adapt=True, lr=3e-3)
    assert done["adapted"] and done["characters"] == len(document)
    assert continuation_nll(adapted, continuation) < 0.5 * continuation_nll(plain, continuation)
    assert adapted.model is not model.model
    assert hashlib.sha256(open(best, "rb").read()).hexdigest() == before
    # The loaded model's weights are as they were too: the steps went to a copy.
    again = model.generator(seed=0)
    prime(again, document)
    assert continuation_nll(again, continuation) == pytest.approx(continuation_nll(plain, continuation), abs=1e-6)


def test_cli_prime_file_and_adapt(by_heart, tmp_path, capsys):
    from textgen.cli import generate_main
    run, _ = by_heart
    doc = tmp_path / "doc.txt"
    doc.write_text("gold fox saves nine worms. " * 4, encoding="utf-8")
    assert generate_main(["--checkpoint", run, "--prime-file", str(doc), "--adapt", "--length", "30",
                          "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "adapted in" in err and f"primed with {doc}" in err
    for flags, says in ((["--adapt"], "--adapt adapts the weights on the --prime-file document"),
                        (["--prime-file", str(tmp_path / "none.txt")], "--prime-file"),
                        (["--prime-file", str(tmp_path)], "is a folder"),
                        (["--prime-file", str(doc), "--adapt-lr", "0"], "--adapt-lr must be")):
        assert generate_main(["--checkpoint", run, "--length", "5", *flags]) == 2
        assert says in capsys.readouterr().err
