"""What the exported web page weighs, and what its int8 weights cost in bits per character.

For a trained run: writes the float32 and the int8 page (`textgen export RUN --format web [--quantize
int8]`) and the ONNX file into a temporary folder and prints their sizes beside the checkpoint's; then
scores the held-out tail of the run's text (the same split training validated on) with textgen-eval,
once with the run's weights and once with their int8 round trips (a copy of the checkpoint whose
matrices are what the int8 page computes with), side by side; where Chromium and Playwright are
installed, also times the float32 page's greedy generation in the browser.

    python benchmarks/bench_export.py RUN TEXT
    # e.g. after: python train.py ../shared/corpora/tinyshakespeare.txt --size 2x512 --steps 150 --out /tmp/b512
    python benchmarks/bench_export.py /tmp/b512 ../shared/corpora/tinyshakespeare.txt

Without arguments it prints only the page sizes of untrained default-sized models (2x512, and 2x256,
the size --size auto picks for the embedded corpus), which depend on the architecture alone.
"""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from textgen import run_folder  # noqa: E402
from textgen import checkpoint  # noqa: E402
from textgen.cli import eval_main  # noqa: E402
from textgen.export import export, metadata  # noqa: E402
from textgen.export.web import int8_model, page  # noqa: E402


def cpu() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def untrained_sizes() -> None:
    from textgen.lstm.model import CharLSTM, ModelConfig
    from textgen.tokenizer import CharTokenizer
    tokenizer = CharTokenizer("".join(chr(c) for c in range(32, 97)))          # 65 characters, as tiny-shakespeare
    for hidden in (512, 256):
        model = CharLSTM(ModelConfig(65, hidden_size=hidden, layers=2, dropout=0.0))
        info = metadata(model, tokenizer, {"step": 0})
        sizes = {q: len(page(model, info, q).encode("utf-8")) for q in ("none", "int8")}
        print(f"2x{hidden}, 65 characters, {model.num_parameters():,} weights: float32 page {sizes['none']:,} bytes, "
              f"int8 page {sizes['int8']:,} bytes")


def textgen_eval(run: str, text: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert eval_main(["--checkpoint", run, "--text", text, "--json", "-q", "--device", "cpu"]) == 0
    return json.loads(out.getvalue())


def browser_speed(path: str, length: int = 2000) -> float | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto("file://" + os.path.abspath(path))
        page.wait_for_function("window.textgen !== undefined")
        page.evaluate("window.textgen.generate({prompt: '', length: 50, temperature: 0})")       # warm up
        started = time.perf_counter()
        page.evaluate(f"window.textgen.generate({{prompt: '', length: {length}, temperature: 0}})")
        seconds = time.perf_counter() - started
        browser.close()
    return length / seconds


def main(run: str, text_path: str) -> None:
    print(f"CPU: {cpu()}")
    file = run_folder.resolve(run, prefer_best=True)
    ckpt = checkpoint.load(file)
    model, tokenizer = checkpoint.build_model(ckpt, file)
    config = model.config
    print(f"run {run}: {config.layers}x{config.hidden_size}, vocabulary {config.vocab_size}, step {ckpt['step']}, "
          f"{model.num_parameters():,} weights; {os.path.basename(file)} is {os.path.getsize(file):,} bytes")
    with tempfile.TemporaryDirectory() as folder:
        for fmt, quantize, name in (("web", "none", "page.html"), ("web", "int8", "page-int8.html"),
                                    ("onnx", "none", "model.onnx")):
            path = os.path.join(folder, name)
            export(run, fmt, path, quantize)
            print(f"{fmt}{' ' + quantize if quantize != 'none' else ''}: {os.path.getsize(path):,} bytes")
        speed = browser_speed(os.path.join(folder, "page.html"))
        if speed:
            print(f"float32 page in headless Chromium: {speed:,.0f} characters/s, greedy, one stream")

        with open(text_path, encoding="utf-8") as f:
            text = f.read()
        fraction = ckpt.get("train_config", {}).get("val_fraction", 0.1)
        tail = os.path.join(folder, "tail.txt")
        with open(tail, "w", encoding="utf-8") as f:
            f.write(text[len(text) - int(len(text) * fraction):])       # data.split_tokens' validation tail
        # The same checkpoint with the matrices of the weights generation uses replaced by their int8 round trips.
        key = "averaged_model" if ckpt.get("averaged_model") is not None else "model"
        quantized = dict(ckpt, **{key: int8_model(model).state_dict()})
        quantized.pop("integrity", None)
        int8_run = os.path.join(folder, "int8-run")
        os.mkdir(int8_run)
        checkpoint.atomic_save(quantized, os.path.join(int8_run, run_folder.BEST))
        reports = {name: textgen_eval(path, tail) for name, path in (("float32", file), ("int8", int8_run))}
    for name, report in reports.items():
        print(f"textgen-eval, {name} weights, held-out tail ({report['characters']:,} characters): "
              f"{report['bits_per_char']:.4f} bits/char")
    cost = reports["int8"]["bits_per_char"] - reports["float32"]["bits_per_char"]
    print(f"int8 costs {cost:+.4f} bits/char ({cost / reports['float32']['bits_per_char']:+.2%})")


if __name__ == "__main__":
    if len(sys.argv) == 1:
        print(f"CPU: {cpu()}")
        untrained_sizes()
    elif len(sys.argv) == 3:
        main(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
