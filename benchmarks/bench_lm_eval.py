"""lm-evaluation-harness against `textgen serve`'s OpenAI-compatible API, on two small local tasks.

A run (given, or trained here on the first 90% of tinyshakespeare) is served over loopback with an API
key; lm_eval's `local-completions` model reads it, with the server's own character vocabulary as its
tokenizer (`tokenizer_backend=remote`: /tokenize, /detokenize and /tokenizer_info, nothing fetched from
a hub), on two tasks written here from the held-out last 10% of the text as local JSON files:

* `tinyshakespeare_next_line` (multiple choice, loglikelihood): which of four lines follows a line;
* `tinyshakespeare_passages` (loglikelihood_rolling): bits per byte of held-out passages, which the
  script sets beside `textgen-eval`'s figure for the same passages, each read as one stream.

    python -m venv --system-site-packages /work/lmeval-venv && /work/lmeval-venv/bin/pip install "lm_eval[api]"
    python benchmarks/bench_lm_eval.py --lm-eval /work/lmeval-venv/bin/lm_eval [--run RUN] [--train-time 180]

Not part of CI: lm_eval is a large install, and the figures take minutes.
"""
import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
CORPUS = os.path.join(os.path.dirname(ROOT), "shared", "corpora", "tinyshakespeare.txt")

LINES_TASK = """task: tinyshakespeare_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
PASSAGES_TASK = """task: tinyshakespeare_passages
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


def held_out(text: str) -> str:
    return text[int(len(text) * 0.9):]             # training's validation tail (val_fraction 0.1)


def write_tasks(folder: str, tail: str, docs: int, seed: int = 0) -> list[str]:
    """The two tasks' YAML and JSON-lines files in folder; the passages, for textgen-eval's figure."""
    rng = random.Random(seed)
    lines = [line for line in tail.split("\n") if len(line) > 20 and not line.endswith(":")]
    pairs = [(a, b) for a, b in zip(tail.split("\n"), tail.split("\n")[1:]) if len(a) > 20 and len(b) > 20]
    with open(os.path.join(folder, "next_line.jsonl"), "w", encoding="utf-8") as f:
        for context, truth in rng.sample(pairs, docs):
            choices = [truth] + rng.sample([line for line in lines if line != truth], 3)
            rng.shuffle(choices)
            f.write(json.dumps({"context": context + "\n", "choices": choices, "gold": choices.index(truth)}) + "\n")
    passages = [p.strip("\n") for p in re.split(r"\n\n+", tail) if 200 <= len(p) <= 1500]
    passages = rng.sample(passages, min(docs // 2, len(passages)))
    with open(os.path.join(folder, "passages.jsonl"), "w", encoding="utf-8") as f:
        for passage in passages:
            f.write(json.dumps({"text": passage}) + "\n")
    for name, template, data in (("next_line.yaml", LINES_TASK, "next_line.jsonl"),
                                 ("passages.yaml", PASSAGES_TASK, "passages.jsonl")):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(template.format(data=os.path.join(folder, data)))
    return passages


def textgen_eval_bits(run: str, passages: list[str]) -> float:
    """textgen-eval's cross-entropy of each passage read as one stream after the opening newline (what
    lm_eval's rolling loglikelihood conditions the first character on here), in bits per character."""
    from textgen.checkpoint import load_model
    from textgen.evaluate import LN2, cross_entropy
    model, tokenizer, _ = load_model(run)
    nats = sum(cross_entropy(model, tokenizer.encode("\n" + p), batch_size=1, seq_len=4096)[0] for p in passages)
    return nats / sum(len(p) for p in passages) / LN2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval command (e.g. in its own virtualenv)")
    parser.add_argument("--run", help="a trained run to serve (default: train one here)")
    parser.add_argument("--train-time", type=float, default=180, help="seconds of training when no --run is given")
    parser.add_argument("--docs", type=int, default=100, help="multiple-choice documents (half as many passages)")
    parser.add_argument("--corpus", default=CORPUS)
    parser.add_argument("--output", default=None, help="folder for lm_eval's results (default: a temporary one)")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-lm-eval-")
    with open(args.corpus, encoding="utf-8") as f:
        text = f.read()
    run = args.run
    if run is None:
        import textgen
        head = os.path.join(folder, "train.txt")
        with open(head, "w", encoding="utf-8") as f:
            f.write(text[: int(len(text) * 0.9)])
        run = os.path.join(folder, "run")
        textgen.train(head, out=run, time_budget=args.train_time, hidden_size=256, layers=2, val_fraction=0.05,
                      log=lambda line: None)
    passages = write_tasks(folder, held_out(text), args.docs)
    key = "bench-" + os.urandom(12).hex()
    server = subprocess.Popen([sys.executable, "-m", "textgen", "serve", run, "--port", "0"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "TEXTGEN_API_KEY": key})
    try:
        port = int(re.search(r":(\d+)/", server.stdout.readline())[1])
        base = f"http://127.0.0.1:{port}"
        request = urllib.request.Request(f"{base}/tokenize", json.dumps({"prompt": "\n"}).encode(),
                                         {"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
        newline = json.loads(urllib.request.urlopen(request).read())["tokens"][0]
        name = os.path.basename(os.path.normpath(run))
        # lm_eval takes the beginning-of-text token as bos_token_id `or` eos_token_id, which loses an id of 0
        # (the newline's, in a sorted vocabulary): it is given explicitly.
        # The completions carry OPENAI_API_KEY, the remote tokenizer's requests auth_token.
        model_args = (f"model={name},base_url={base}/v1/completions,tokenizer_backend=remote,auth_token={key},"
                      f"custom_prefix_token_id={newline},num_concurrent=1,max_retries=1")
        output = args.output or os.path.join(folder, "results")
        start = time.perf_counter()
        result = subprocess.run([args.lm_eval, "run", "--model", "local-completions", "--model_args", model_args,
                                 "--tasks", "tinyshakespeare_next_line", "tinyshakespeare_passages",
                                 "--include_path", folder, "--batch_size", "1", "--output_path", output],
                                env={**os.environ, "OPENAI_API_KEY": key, "HF_HUB_OFFLINE": "1",
                                     "HF_DATASETS_OFFLINE": "1"}, capture_output=True, text=True)
        seconds = time.perf_counter() - start
    finally:
        server.terminate()
        server.wait(30)
    if result.returncode != 0:
        print(result.stdout, result.stderr, sep="\n")
        raise SystemExit(f"lm_eval failed (exit {result.returncode})")
    table = result.stdout[result.stdout.index("|"):] if "|" in result.stdout else result.stdout
    print(f"run {run}; lm_eval took {seconds:.0f} s\n")
    print(table.strip())
    bits = textgen_eval_bits(run, passages)
    print(f"\ntextgen-eval over the same {len(passages)} passages, each one stream after a newline: "
          f"{bits:.4f} bits/char (lm_eval's bits_per_byte above; the passages are ASCII, a byte a character)")
    print(f"chance on the next-line task: {0.25:.2f}; {math.log2(65):.2f} bits/char is a uniform guess over 65")


if __name__ == "__main__":
    main()
