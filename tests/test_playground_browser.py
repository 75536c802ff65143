"""The playground page in a real browser: headless Chromium driven by Playwright.

Skips where Chromium or Playwright is missing, except under CI (CI=true), where `.ci/run`
installs both and a missing one is a failure.
Set TEXTGEN_SCREENSHOT=path to also write the desktop screenshot there (README's picture).
"""
import json
import math
import os
import shutil
import time

import pytest

from conftest import train_tiny, wait_until
from test_serve import Served

MARKUP = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='owned'\">\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs: alpha (2x32) and beta (1x48) on the usual text, and one trained on nothing but markup."""
    root = tmp_path_factory.mktemp("page")
    folder = root / "served"
    folder.mkdir()
    for name, flags in (("alpha", ()), ("beta", ("--hidden-size", "48", "--layers", "1"))):
        (root / name).mkdir()
        run, _ = train_tiny(root / name, *flags)
        os.rename(run, folder / name)
    if os.path.exists(folder / "beta" / "loss.png"):
        os.remove(folder / "beta" / "loss.png")              # a run without a loss curve (no matplotlib)
    markup_text = root / "markup.txt"
    markup_text.write_text(MARKUP * 300, encoding="utf-8")
    from textgen.cli import train_main
    assert train_main([str(markup_text), "--hidden-size", "64", "--layers", "1", "--batch-size", "8", "--seq-len", "32",
                       "--steps", "150", "--lr", "1e-2", "--warmup-steps", "5", "--out", str(folder / "markup"), "-q",
                       "--sample-length", "0"]) == 0
    return str(folder)


def open_page(browser, runs, bypass_csp: bool, models: int = 3, first: str = "alpha"):
    served = Served(runs, slots=4, max_waiting=4, max_length=2_000_000)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=bypass_csp, accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    # A script, style or request the policy refuses is a console error ("Refused to ..."), as is a failed load.
    # (An answer's status, 400 or 404, is logged as "Failed to load resource": those are the tests' own.)
    page.on("console", lambda m: m.type == "error" and "Failed to load resource" not in m.text
            and errors.append(m.text))
    page.goto(f"http://127.0.0.1:{served.port}/")
    wait_until(page, f"document.querySelectorAll('#model option').length === {models}")
    page.select_option("#model", first)                      # the newest run is chosen at first
    return page, served, context, errors


@pytest.fixture
def page(browser, runs):
    # bypass_csp: the markup test proves that inserting text as text alone keeps script out, without the
    # policy's help.
    page, served, context, errors = open_page(browser, runs, bypass_csp=True)
    yield page, served
    context.close()
    served.close()
    assert errors == []


@pytest.fixture
def strict(browser, runs):
    """The page under its own Content-Security-Policy, as a user gets it: every feature must work there."""
    page, served, context, errors = open_page(browser, runs, bypass_csp=False)
    yield page, served
    context.close()
    served.close()
    assert errors == []


def status_says(page, words: str) -> None:
    wait_until(page, f"document.getElementById('status').textContent.includes({json.dumps(words)})")


def text_of(events) -> str:
    return "".join(e.get("text", "") for e in events)


def invalid(page) -> list:
    return page.evaluate("[...document.querySelectorAll('[aria-invalid=true]')].map(e => e.id)")


def output_length(page) -> int:
    return page.evaluate("document.getElementById('output').textContent.length")


def test_generate_streams_stops_switches_models_and_continues(page, tmp_path):
    page, served = page
    page.select_option("#model", "alpha")
    assert "2 × LSTM 32" in page.text_content("#model-info") and "bits/char" in page.text_content("#model-info")
    page.fill("#prompt", "ANNA:\n")
    page.fill("#length", "2000000")         # (the tiny model decodes 100,000 characters in a fraction of a second)
    page.click("#generate")
    wait_until(page, "document.getElementById('output').textContent.startsWith('ANNA:')")
    seen = []
    deadline = time.monotonic() + 20
    while len(seen) < 5 and time.monotonic() < deadline:      # the text grows while we watch: it streams
        n = output_length(page)
        if not seen or n > seen[-1]:
            seen.append(n)
        time.sleep(0.05)
    assert len(seen) == 5 and seen[0] >= len("ANNA:\n"), seen
    assert served.status()["generations"] == 1
    page.click("#stop")
    wait_until(page, "document.getElementById('status').textContent.includes('stopped')")
    assert served.idle(), served.status()                    # Stop ended it on the server too
    stopped_at = output_length(page)
    assert stopped_at < 2_000_000 and page.is_enabled("#generate") and page.is_disabled("#stop")
    time.sleep(0.3)
    assert output_length(page) == stopped_at

    page.select_option("#model", "beta")                      # another model
    assert "1 × LSTM 48" in page.text_content("#model-info")
    assert page.is_disabled("#continue")                      # the last output was another model's
    page.fill("#prompt", "BORIS:\n")
    page.fill("#length", "300")
    page.fill("#seed", "7")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').textContent.includes('reached the length')")
    assert output_length(page) == len("BORIS:\n") + 300
    assert page.text_content("#meta").startswith("seed 7 · 300 characters in ")
    # The final line's copy report, under the output: a span of the text, from the training text's file.
    report = page.text_content("#copy-report")
    assert report.startswith("copy report: the longest span found verbatim") and "of corpus.txt" in report
    first = page.text_content("#output")
    page.click("#continue")                                   # the state carries on from where it ended
    expected = len("BORIS:\n") + 600
    wait_until(page, f"document.getElementById('output').textContent.length === {expected}")
    both = page.text_content("#output")
    # exactly what one request for 600 characters gives: the state and the random generator carried on
    whole = served.generate(model="beta", prompt="BORIS:\n", length=600, seed=7)
    assert both.startswith(first) and both == "BORIS:\n" + "".join(e.get("text", "") for e in whole)
    assert page.text_content("#meta").startswith("seed 7 · 300 characters in ")   # the chain's seed, as the API says
    shot = tmp_path / "playground.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    target = os.environ.get("TEXTGEN_SCREENSHOT")
    if target:
        shutil.copyfile(shot, target)


def test_generated_markup_is_shown_as_text_and_never_runs(page):
    page, served = page
    title = page.title()
    page.select_option("#model", "markup")
    page.fill("#prompt", "<")
    page.fill("#temperature", "0")
    page.fill("#length", "400")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').textContent.includes('reached the length')")
    shown = page.text_content("#output")
    assert MARKUP in shown                                                               # the model writes markup...
    assert page.title() == title == "textgen playground"                                 # ...and none of it ran
    assert page.evaluate("document.querySelectorAll('#output script, #output img').length") == 0


def test_bad_values_show_the_servers_sentence_in_the_pages_words(page):
    page, _ = page
    page.select_option("#model", "alpha")
    page.fill("#temperature", "-1")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').classList.contains('error')")
    assert page.text_content("#status") == "Temperature must be 0 (greedy) or from 1e-6 to 1e6, got -1"
    assert invalid(page) == ["temperature"]                   # the field it names is marked
    page.fill("#temperature", "0.5")
    assert invalid(page) == []                                # and unmarked once edited


def test_the_page_fits_a_phone(page):
    page, _ = page
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#output").bounding_box()
    assert box["width"] > 300                                  # the output takes the width, below the controls
    assert json.loads(json.dumps(page.locator("#generate").bounding_box()))["y"] < box["y"]


def test_a_refused_request_leaves_the_output_its_seed_and_continue_as_they_were(strict):
    page, served = strict
    page.select_option("#model", "beta")
    page.fill("#prompt", "BORIS:\n")
    page.fill("#length", "100")
    page.fill("#seed", "7")
    page.click("#generate")
    status_says(page, "reached the length")
    before, meta = page.text_content("#output"), page.text_content("#meta")
    page.fill("#prompt", "ANNA:\n")                          # the steps: a new prompt, a bad value
    page.fill("#temperature", "-1")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').classList.contains('error')")
    assert page.text_content("#status") == "Temperature must be 0 (greedy) or from 1e-6 to 1e6, got -1"
    assert invalid(page) == ["temperature"]
    assert page.text_content("#output") == before and page.text_content("#meta") == meta
    assert page.is_enabled("#continue") and page.is_enabled("#generate")
    page.fill("#temperature", "0.8")
    page.click("#continue")                                   # carries on the output on show, not another
    wait_until(page, f"document.getElementById('output').textContent.length === {len(before) + 100}")
    assert page.text_content("#output") == "BORIS:\n" + text_of(
        served.generate(model="beta", prompt="BORIS:\n", length=200, seed=7))


def test_a_number_the_browser_cannot_read_is_marked_and_nothing_is_sent(strict):
    page, _ = strict
    sent = []
    page.on("request", lambda r: r.url.endswith("/api/generate") and sent.append(r.post_data))
    page.fill("#temperature", "")
    page.click("#temperature")
    page.keyboard.type("1e")                                  # not a number: the field's value reads ""
    page.fill("#top_k", "2.5")
    page.click("#generate")
    status_says(page, "is not a number")
    assert page.text_content("#status") == "Temperature is not a number; Top-k must be a whole number"
    assert invalid(page) == ["temperature", "top_k"] and sent == []
    page.fill("#temperature", "0")
    page.fill("#top_k", "")
    page.fill("#length", "20")
    page.click("#generate")
    status_says(page, "reached the length")
    assert invalid(page) == [] and json.loads(sent[0])["temperature"] == 0


def test_an_unknown_character_names_the_pages_control_for_it(strict):
    page, _ = strict
    page.fill("#prompt", "ANNA:\nжуй")
    page.fill("#length", "20")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').classList.contains('error')")
    said = page.text_content("#status")
    assert "not in the model's vocabulary" in said and said.endswith(
        "pass “Unknown characters: leave out” to leave them out"), said
    assert invalid(page) == ["unknown"]
    page.select_option("#unknown", "skip")
    page.click("#generate")
    status_says(page, "reached the length")
    assert "warning: leaving out character(s) the model never saw: ж й у" in page.text_content("#output")


def test_continue_shows_the_seed_of_the_chain(strict):
    page, served = strict
    page.select_option("#model", "alpha")
    page.fill("#prompt", "CLÉO:\n")
    page.fill("#length", "60")                                # no seed: the server draws one
    page.click("#generate")
    status_says(page, "reached the length")
    seed = page.text_content("#meta").split(" ")[1]
    page.click("#continue")
    wait_until(page, f"document.getElementById('output').textContent.length === {len('CLÉO:') + 1 + 120}")
    assert page.text_content("#meta").startswith(f"seed {seed} · 60 characters in ")
    assert page.text_content("#output") == "CLÉO:\n" + text_of(
        served.generate(model="alpha", prompt="CLÉO:\n", length=120, seed=int(seed)))


def test_ctrl_enter_generates(strict):
    page, _ = strict
    page.fill("#length", "30")
    page.click("#prompt")
    page.keyboard.type("ANNA:")
    page.keyboard.press("Control+Enter")
    status_says(page, "reached the length")
    assert page.input_value("#prompt") == "ANNA:"            # no newline typed into the prompt
    assert page.text_content("#output").startswith("ANNA:") and output_length(page) == len("ANNA:") + 30
    page.keyboard.press("Meta+Enter")                         # ⌘+Enter on a Mac
    wait_until(page, "document.getElementById('meta').textContent.includes('30 characters')"
                     " && !document.getElementById('generate').disabled")


def test_history_survives_a_reload_and_the_address_restores_the_settings(strict):
    page, served = strict
    page.select_option("#model", "beta")
    page.fill("#prompt", "DMITRI:\n")
    page.fill("#length", "40")
    page.fill("#top_k", "5")
    page.select_option("#unknown", "skip")
    page.click("#generate")
    status_says(page, "reached the length")
    first, seed = page.text_content("#output"), page.text_content("#meta").split(" ")[1]
    link = page.url
    page.fill("#prompt", "ANNA:\n")
    page.fill("#seed", "5")
    page.click("#generate")
    status_says(page, "reached the length")
    second = page.text_content("#output")

    page.reload()
    wait_until(page, "document.querySelectorAll('#model option').length === 3")
    assert page.text_content("#history-count") == "2"
    page.click("summary:has-text('History')")
    entries = page.locator("#history .history-entry")
    assert entries.nth(0).text_content().startswith("beta · seed 5") and "ANNA:" in entries.nth(0).text_content()
    entries.nth(1).click()                                    # the older one: its text and its settings return
    assert page.text_content("#output") == first and page.text_content("#meta") == f"seed {seed}"
    assert page.input_value("#prompt") == "DMITRI:\n" and page.input_value("#seed") == seed
    entries.nth(0).click()
    assert page.text_content("#output") == second

    other = page.context.new_page()                           # the link, opened afresh, restores the settings
    other.goto(link)
    wait_until(other, "document.getElementById('status').textContent.includes('ready')")
    assert {k: other.input_value(f"#{k}") for k in ("model", "prompt", "length", "top_k", "seed", "unknown")} == {
        "model": "beta", "prompt": "DMITRI:\n", "length": "40", "top_k": "5", "seed": seed, "unknown": "skip"}
    other.click("#generate")                                  # and with its seed, the same text
    status_says(other, "reached the length")
    assert other.text_content("#output") == first
    other.goto(f"http://127.0.0.1:{served.port}/#model=gone&temperature=warm&prompt=hi")
    status_says(other, "is not available here")
    assert other.text_content("#status") == "the link's Model “gone”, Temperature “warm” is not available here"
    assert other.input_value("#prompt") == "hi" and invalid(other) == ["temperature"]
    other.close()


def test_copy_and_download_take_the_text_on_show(strict):
    page, _ = strict
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    assert page.is_disabled("#copy") and page.is_disabled("#download")
    page.fill("#prompt", "ANNA:\n")
    page.fill("#length", "50")
    page.click("#generate")
    status_says(page, "reached the length")
    shown = page.text_content("#output")
    page.click("#copy")
    status_says(page, "copied")
    assert page.evaluate("navigator.clipboard.readText()") == shown
    with page.expect_download() as download:
        page.click("#download")
    assert open(download.value.path(), encoding="utf-8").read() == shown
    assert download.value.suggested_filename.endswith(".txt")


def test_dark_mode_follows_the_system(strict):
    page, _ = strict
    colours = "[getComputedStyle(document.body).backgroundColor, getComputedStyle(document.body).color]"

    def luminance(colour: str) -> float:
        r, g, b = (int(x) for x in colour[colour.index("(") + 1:-1].split(",")[:3])
        return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255

    page.emulate_media(color_scheme="light")
    back, ink = page.evaluate(colours)
    assert luminance(back) > 0.9 and luminance(ink) < 0.2
    page.emulate_media(color_scheme="dark")
    back, ink = page.evaluate(colours)
    assert luminance(back) < 0.15 and luminance(ink) > 0.8
    assert luminance(page.evaluate("getComputedStyle(document.getElementById('output').parentElement"
                                   ".parentElement.parentElement).backgroundColor")) < 0.2


def test_the_loss_curve_of_each_run(strict, runs):
    page, served = strict
    assert os.path.isfile(os.path.join(runs, "alpha", "loss.png")), "matplotlib draws loss.png: pip install -e .[plot]"
    page.select_option("#model", "alpha")
    page.click("summary:has-text('Loss curve')")
    wait_until(page, "document.getElementById('loss-curve').complete")
    assert page.evaluate("document.getElementById('loss-curve').naturalWidth") > 200
    assert page.is_visible("#loss-curve")
    page.select_option("#model", "beta")                      # its loss.png was taken away
    assert page.is_hidden("#loss-curve") and "no loss curve" in page.text_content("#loss-none")

    status, headers, payload = served.request("GET", "/api/models/alpha/loss.png")
    assert status == 200 and headers["Content-Type"] == "image/png" and payload[:8] == b"\x89PNG\r\n\x1a\n"
    for path, says in (("/api/models/beta/loss.png", "the run 'beta' has no loss curve"),
                       ("/api/models/nobody/loss.png", "there is no model 'nobody' here"),
                       ("/api/models/..%2Falpha/loss.png", "there is no model '../alpha' here"),
                       ("/api/models/alpha%2Floss.png/loss.png", "there is no model 'alpha/loss.png' here")):
        status, headers, payload = served.request("GET", path)
        assert status == 404 and json.loads(payload)["error"].startswith(says), (path, payload)


def test_two_models_side_by_side_with_one_prompt_and_seed(strict):
    page, served = strict
    sent = []
    page.on("request", lambda r: r.url.endswith("/api/generate") and sent.append(json.loads(r.post_data)))
    page.select_option("#model", "alpha")
    page.select_option("#compare", "beta")
    page.fill("#prompt", "BORIS:\n")
    page.fill("#length", "80")                                # no seed: the page picks one for both
    page.click("#generate")
    status_says(page, "beta: 80 characters")
    assert page.is_visible("#output-b")
    assert page.text_content("#title") == "alpha" and page.text_content("#title-b") == "beta"
    seed = int(page.text_content("#meta").split(" ")[1])
    assert page.text_content("#meta-b").startswith(f"seed {seed} · 80 characters in ")
    assert [(r["model"], r["seed"], r["prompt"]) for r in sent] == [("alpha", seed, "BORIS:\n"), ("beta", seed, "BORIS:\n")]
    page.click("#continue")                                   # both carry on
    wait_until(page, "document.getElementById('output-b').textContent.length === 7 + 160"
                     " && document.getElementById('output').textContent.length === 7 + 160")
    for model, pane in (("alpha", "#output"), ("beta", "#output-b")):
        whole = served.generate(model=model, prompt="BORIS:\n", length=160, seed=seed)
        assert page.text_content(pane) == "BORIS:\n" + text_of(whole)
    page.select_option("#compare", "")
    page.click("#generate")
    status_says(page, "80 characters; reached")
    assert page.is_hidden("#output-b") and page.is_hidden("#title")


def test_a_click_on_a_character_shows_the_models_alternatives(strict):
    page, served = strict
    page.fill("#prompt", "ANNA:\n")
    page.fill("#length", "40")
    page.fill("#seed", "3")
    page.select_option("#logprobs", "5")
    page.click("#generate")
    status_says(page, "reached the length")
    events = served.generate(model="alpha", prompt="ANNA:\n", length=40, seed=3, logprobs=5)
    text, scored = text_of(events), [s for e in events for s in e.get("logprobs", [])]
    assert page.text_content("#output") == "ANNA:\n" + text and len(scored) == 40
    i = next(k for k in range(5, 40) if not text[k].isspace())            # a character with a box to click
    middle = page.evaluate(f"""(() => {{
        const node = document.getElementById('output').childNodes[1], range = document.createRange();
        range.setStart(node, {i}); range.setEnd(node, {i + 1});
        const box = range.getBoundingClientRect();
        return [box.left + box.width / 2, box.top + box.height / 2]; }})()""")
    assert page.is_hidden("#alternatives")
    page.mouse.click(*middle)
    assert page.is_visible("#alternatives")
    percent = lambda logprob: f"{math.exp(logprob) * 100:.1f}%"       # noqa: E731
    assert page.text_content("#alternatives p") == f"character {i + 1}: {text[i]}, p = {percent(scored[i]['logprob'])}"
    rows = page.evaluate("[...document.querySelectorAll('#alternatives tr')].map(r => "
                         "[r.cells[0].textContent, r.cells[2].textContent, r.className])")
    shown = {"\n": "↵ (newline)", " ": "␣ (space)"}
    assert rows == [[shown.get(ch, ch), percent(lp), "chosen" if ch == text[i] else ""] for ch, lp in scored[i]["top"]]
    page.keyboard.press("Escape")
    assert page.is_hidden("#alternatives")
    page.click("#prompt")                                     # not a generated character: nothing to show
    page.mouse.click(*page.evaluate("(() => { const b = document.querySelector('#output .prompt')"
                                    ".getBoundingClientRect(); return [b.left + 3, b.top + 3]; })()"))
    assert page.is_hidden("#alternatives")


def test_a_styled_model_offers_its_styles_and_the_text_keeps_to_the_one_chosen(browser, tmp_path):
    """The Style menu appears for a model trained with styles (and only for it), lists its styles, and what
    it generates under one keeps to that file's letters; Max copy goes with the request, as its field says."""
    import textgen
    from test_styles import LOWER, TINY, UPPER, share, words
    corpus, served_runs = tmp_path / "corpus", tmp_path / "served"
    corpus.mkdir()
    served_runs.mkdir()
    (corpus / "lower.txt").write_text(words(LOWER, 3000, 1), encoding="utf-8")
    (corpus / "upper.txt").write_text(words(UPPER, 3000, 2), encoding="utf-8")
    textgen.train(str(corpus), styles=True, steps=150, out=str(served_runs / "styled"),
                  cache_dir=str(tmp_path / "cache"), log=lambda m: None, **TINY)
    (tmp_path / "plain").mkdir()
    run, _ = train_tiny(tmp_path / "plain")
    os.rename(run, served_runs / "plain")
    page, served, context, errors = open_page(browser, str(served_runs), bypass_csp=False, models=2, first="plain")
    try:
        page.select_option("#model", "plain")
        assert page.is_hidden("#style-box")
        page.select_option("#model", "styled")
        assert page.is_visible("#style-box")
        assert [o.strip() for o in page.eval_on_selector_all("#style option", "os => os.map(o => o.textContent)")] \
            == ["(none)", "lower", "upper"]
        for style, alphabet in (("upper", UPPER), ("lower", LOWER)):
            page.select_option("#style", style)
            page.fill("#prompt", "")
            page.fill("#length", "300")
            page.fill("#seed", "3")
            page.click("#generate")
            status_says(page, "300 characters")
            assert share(page.text_content("#output"), alphabet) >= 0.95, style
        page.fill("#max_copy", "0")                       # out of its range: the server's sentence, the field marked
        page.click("#generate")
        status_says(page, "Max copy must be")
        assert invalid(page) == ["max_copy"]
    finally:
        context.close()
        served.close()
    assert errors == []
