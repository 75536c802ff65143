"""The exported web page (`textgen export RUN --format web`) in a real browser: headless Chromium driven by
Playwright, the page opened from file:// with every request refused, as it must work offline.

Skips where Chromium or Playwright is missing, except under CI (CI=true), where a missing one is a failure.
"""
import os
import time

import pytest

from conftest import wait_until

from test_export import MARKUP, trained


PROMPT = "ANNA:\n"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny residual run of test_export.py (its text has markup in it), and its float32 and int8 pages."""
    from textgen.cli import textgen_main
    run = trained("residual", tmp_path_factory)
    root = tmp_path_factory.mktemp("web")
    pages = {}
    for quantize in ("none", "int8"):
        pages[quantize] = root / f"model-{quantize}.html"
        assert textgen_main(["export", run, "--format", "web", "--output", str(pages[quantize]),
                             "--quantize", quantize, "-q"]) == 0
    return run, pages


def greedy(run, prompt, length, capsys) -> str:
    """generate.py --temperature 0's text after the prompt."""
    from textgen.cli import generate_main
    capsys.readouterr()
    assert generate_main(["--checkpoint", run, "--prompt", prompt, "--length", str(length), "--temperature", "0",
                          "-q"]) == 0
    return capsys.readouterr().out[len(prompt):-1]


@pytest.fixture
def open_page(browser):
    """open_page(path) -> a Playwright page of that file, offline: every request but the file's own is aborted
    and recorded, and the test fails at the end if there was one, or a script error."""
    contexts, errors, refused, requested, opened = [], [], [], [], []

    def refuse(route):
        if route.request.url in opened:
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    def open_page(path):
        opened.append(path.resolve().as_uri())
        context = browser.new_context(viewport={"width": 1280, "height": 800})   # the page's own CSP stays on
        context.route("**/*", refuse)
        context.on("request", lambda request: requested.append(request.url))
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)   # e.g. a CSP refusal
        page.goto(opened[-1])
        wait_until(page, "window.textgen !== undefined")
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert errors == [] and refused == [] and sorted(requested) == sorted(opened), (errors, refused, requested)


def generate(page, **options) -> str:
    return page.evaluate("options => window.textgen.generate(options)", options)


def test_greedy_page_text_equals_generate_py_and_the_page_is_smaller_than_the_checkpoint(exported, open_page,
                                                                                        capsys):
    run, pages = exported
    expected = greedy(run, PROMPT, 300, capsys)
    assert len(set(expected)) >= 8, expected                  # words, not one letter repeated
    page = open_page(pages["none"])
    policy = page.get_attribute("meta[http-equiv='Content-Security-Policy']", "content")
    assert "default-src 'none'" in policy and "connect-src 'none'" in policy and "unsafe" not in policy
    assert generate(page, prompt=PROMPT, length=300, temperature=0) == expected
    assert page.text_content("#output") == PROMPT + expected
    assert page.text_content("#status") == "reached the length (300 characters)"
    # No prompt: the page reads the opening text (a newline) first, as generate.py does.
    assert generate(page, prompt="", length=120, temperature=0) == greedy(run, "", 120, capsys)

    checkpoint = os.path.getsize(os.path.join(run, "best.pt"))
    float_page, int8_page = (os.path.getsize(pages[q]) for q in ("none", "int8"))
    print(f"\nsizes: checkpoint {checkpoint:,} bytes, float32 page {float_page:,}, int8 page {int8_page:,}")
    assert float_page < checkpoint          # one set of weights, no optimizer moments (the page adds ~20 KB of code)
    assert int8_page < 0.6 * float_page


def test_int8_page_text_at_temperature_0_is_reported_beside_float32(exported, open_page, capsys):
    run, pages = exported
    from textgen.checkpoint import load_model
    _, tokenizer, _ = load_model(run)
    texts = {q: generate(open_page(pages[q]), prompt=PROMPT, length=300, temperature=0) for q in ("none", "int8")}
    same = next((i for i, (a, b) in enumerate(zip(texts["none"], texts["int8"])) if a != b), 300)
    with capsys.disabled():
        print(f"\nfloat32 page, temperature 0: {texts['none']!r}\nint8 page, temperature 0:    {texts['int8']!r}\n"
              f"the first {same} of 300 characters agree")
    assert len(texts["int8"]) == 300 and set(texts["int8"]) <= set(tokenizer.chars)


def test_the_page_streams_stops_and_continues_the_state(exported, open_page, capsys):
    run, pages = exported
    page = open_page(pages["none"])
    page.fill("#prompt", PROMPT)
    page.fill("#length", "100000")
    page.fill("#seed", "11")
    page.click("#generate")
    seen, deadline = [], time.monotonic() + 20
    while len(seen) < 5 and time.monotonic() < deadline:        # the text grows while we watch: it streams
        n = len(page.text_content("#output"))
        if not seen or n > seen[-1]:
            seen.append(n)
        time.sleep(0.05)
    assert len(seen) == 5 and seen[0] >= len(PROMPT), seen
    assert page.is_disabled("#generate") and page.is_enabled("#stop")
    page.click("#stop")
    wait_until(page, "document.getElementById('status').textContent.startsWith('stopped after')")
    stopped = page.text_content("#output")
    assert len(stopped) < 100_000 and page.is_enabled("#continue") and page.is_disabled("#stop")
    time.sleep(0.3)
    assert page.text_content("#output") == stopped
    assert page.text_content("#meta") == "seed 11"

    page.fill("#length", "50")
    page.click("#continue")                                     # carries on from where it stopped
    wait_until(page, "document.getElementById('status').textContent === 'reached the length (50 characters)'")
    assert page.text_content("#output").startswith(stopped) and len(page.text_content("#output")) == len(stopped) + 50

    # Greedy: N characters, then Continue for N more, is the greedy text of 2N.
    first = generate(page, prompt=PROMPT, length=150, temperature=0)
    second = page.evaluate("window.textgen.continue({length: 150})")
    assert first + second == greedy(run, PROMPT, 300, capsys)
    # A seed gives the page's own text again, with top-k and top-p applied.
    sampled = [generate(page, prompt=PROMPT, length=200, temperature=0.9, topK=5, topP=0.9, seed=7) for _ in range(2)]
    assert sampled[0] == sampled[1] and sampled[0] != (first + second)[:200]


def test_characters_the_model_never_saw_are_one_sentence_in_the_page(exported, open_page):
    _, pages = exported
    page = open_page(pages["none"])
    generate(page, prompt=PROMPT, length=20, temperature=0)
    before = page.text_content("#output")
    page.fill("#prompt", "ANNA ☃ saw Ω")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').classList.contains('error')")
    assert page.text_content("#status") == ("the prompt has 2 characters the model never saw (Ω ☃); "
                                            "remove them to generate")
    assert page.text_content("#output") == before and page.is_enabled("#generate")
    page.fill("#temperature", "-1")
    page.fill("#prompt", PROMPT)
    page.click("#generate")
    wait_until(page, "document.getElementById('status').textContent.startsWith('temperature')")
    assert page.text_content("#status") == "temperature must be 0 (greedy) or from 1e-6 to 1e6, got -1"


def test_markup_in_the_prompt_and_the_output_is_shown_as_text(exported, open_page):
    _, pages = exported
    page = open_page(pages["none"])
    title = page.title()
    text = generate(page, prompt=MARKUP, length=300, temperature=0)
    assert page.text_content("#output") == MARKUP + text and "<" in MARKUP + text
    assert page.evaluate("document.querySelectorAll('#output *').length") == 1      # the prompt's span alone
    assert page.title() == title
