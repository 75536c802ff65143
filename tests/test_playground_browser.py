"""The playground page in a real browser: headless Chromium driven by Playwright.

Skips where Chromium or Playwright is missing, except under CI (CI=true), where `.ci/run`
installs both and a missing one is a failure.
Set TEXTGEN_SCREENSHOT=path to also write the desktop screenshot there (README's picture).
"""
import json
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
    markup_text = root / "markup.txt"
    markup_text.write_text(MARKUP * 300, encoding="utf-8")
    from textgen.cli import train_main
    assert train_main([str(markup_text), "--hidden-size", "64", "--layers", "1", "--batch-size", "8", "--seq-len", "32",
                       "--steps", "150", "--lr", "1e-2", "--warmup-steps", "5", "--out", str(folder / "markup"), "-q",
                       "--sample-length", "0"]) == 0
    return str(folder)


@pytest.fixture
def page(browser, runs):
    served = Served(runs, slots=4, max_waiting=4, max_length=100_000)
    # bypass_csp: the page's policy forbids the evaluated snippets Playwright waits with; it also means the
    # markup test proves that inserting text as text alone keeps script out, without the policy's help.
    context = browser.new_context(viewport={"width": 1280, "height": 800}, bypass_csp=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    page.goto(f"http://127.0.0.1:{served.port}/")
    wait_until(page, "document.querySelectorAll('#model option').length === 3")
    yield page, served
    context.close()
    served.close()
    assert errors == []


def output_length(page) -> int:
    return page.evaluate("document.getElementById('output').textContent.length")


def test_generate_streams_stops_switches_models_and_continues(page, tmp_path):
    page, served = page
    page.select_option("#model", "alpha")
    assert "2 × LSTM 32" in page.text_content("#model-info") and "bits/char" in page.text_content("#model-info")
    page.fill("#prompt", "ANNA:\n")
    page.fill("#length", "100000")
    page.click("#generate")
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
    assert stopped_at < 100_000 and page.is_enabled("#generate") and page.is_disabled("#stop")
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
    assert page.text_content("#meta") == "seed 7"
    # The final line's copy report, under the output: a span of the text, from the training text's file.
    report = page.text_content("#copy")
    assert report.startswith("copy report: the longest span found verbatim") and "of corpus.txt" in report
    first = page.text_content("#output")
    page.click("#continue")                                   # the state carries on from where it ended
    expected = len("BORIS:\n") + 600
    wait_until(page, f"document.getElementById('output').textContent.length === {expected}")
    both = page.text_content("#output")
    # exactly what one request for 600 characters gives: the state and the random generator carried on
    whole = served.generate(model="beta", prompt="BORIS:\n", length=600, seed=7)
    assert both.startswith(first) and both == "BORIS:\n" + "".join(e.get("text", "") for e in whole)
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


def test_bad_values_show_the_servers_sentence(page):
    page, _ = page
    page.select_option("#model", "alpha")
    page.fill("#temperature", "-1")
    page.click("#generate")
    wait_until(page, "document.getElementById('status').classList.contains('error')")
    assert page.text_content("#status") == '"temperature" must be 0 (greedy) or from 1e-6 to 1e6, got -1'


def test_the_page_fits_a_phone(page):
    page, _ = page
    page.set_viewport_size({"width": 390, "height": 844})
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    box = page.locator("#output").bounding_box()
    assert box["width"] > 300                                  # the output takes the width, below the controls
    assert json.loads(json.dumps(page.locator("#generate").bounding_box()))["y"] < box["y"]
