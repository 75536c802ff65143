"""Serving throughput: `textgen serve`'s continuous batching against one batch-1 generator per client.

A 2x256 model (random weights: speed does not depend on them) is served over loopback HTTP by a
server process; this process is the clients, N threads each asking for --chars characters at once
and reading the stream to its end, on both protocols: the native one (POST /api/generate, JSON
lines) and OpenAI's (POST /v1/completions with "stream": true, server-sent events). Aggregate chars/s
= all characters received / wall time from the first request to the last end. Two servers, side by
side in one run, rounds interleaved:

* batched: the real server (`textgen.serving.server`), every request stepped together in one batch;
* unbatched: the same HTTP server, but each request gets its own `generator.Generator` at batch 1
  in its own thread, as a server without batching would do (for one client: generation at batch 1).

    python benchmarks/bench_serve.py [--clients 1 4 16] [--chars 2000] [--rounds 3]
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def make_run(folder: str, hidden: int, layers: int) -> str:
    from dataclasses import asdict

    import torch

    from textgen.checkpoint import FORMAT, FORMAT_VERSION, atomic_save
    from textgen.lstm.model import CharLSTM, ModelConfig
    from textgen.tokenizer import CharTokenizer
    torch.manual_seed(0)
    tokenizer = CharTokenizer("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")  # tinyshakespeare's 65
    config = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, layers=layers)
    model = CharLSTM(config)
    run = os.path.join(folder, f"bench-{layers}x{hidden}")
    atomic_save({"format": FORMAT, "version": FORMAT_VERSION, "model_config": asdict(config),
                 "vocab": tokenizer.to_dict(), "model": model.state_dict(), "step": 0}, os.path.join(run, "latest.pt"))
    return run


def serve(run: str, mode: str, slots: int) -> None:
    """The server process: print the port, serve until killed."""
    from textgen.generation import jobs
    from textgen.serving import server
    from textgen.checkpoint import load_model
    from textgen.serving.http_server import PlaygroundServer
    from textgen.generation.generator import Generator

    class Unbatched:
        """One batch-1 Generator per request, each in a thread of its own: serving without batching."""

        def __init__(self):
            self.model, self.tokenizer, _ = load_model(run)
            # no copy report here (the batched server computes one at the end of each request, a few ms)
            self.copy_index, self.copy_note = None, "not measured"

        def submit(self, job):
            def work():
                gen = Generator(self.model, self.tokenizer, seed=job.seed, unknown=job.unknown)
                gen.feed(job.prompt)
                for chars in gen.stream(job.config):
                    if job.cancelled:
                        break
                    job.produced += 1
                    job.events.put((0, chars[0]))
                job.events.put(("end", "length"))
            threading.Thread(target=work, daemon=True).start()
            return job

    limits = server.Limits(slots=slots, max_waiting=256, max_length=100_000)
    if mode == "batched":                       # the real thing, as `textgen serve` runs it
        port = lambda message: re.search(r":(\d+)/", message) and print(re.search(r":(\d+)/", message)[1], flush=True)  # noqa: E731
        server.serve(run, port=0, limits=limits, say=port)
        return
    scheduler = jobs.Scheduler()
    catalogue = server.Catalogue(run, "cpu", limits, scheduler)
    engine = Unbatched()
    catalogue.engine = lambda name: (engine, name)
    httpd = PlaygroundServer(("127.0.0.1", 0), catalogue, limits)
    httpd.start()
    print(httpd.port, flush=True)
    httpd.wait()


def one_client(port: int, seed: int, chars: int, received: list, protocol: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    if protocol == "native":
        path, body = "/api/generate", {"prompt": "The ", "length": chars, "temperature": 0.8, "seed": seed}
    else:
        path, body = "/v1/completions", {"prompt": "The ", "max_tokens": chars, "temperature": 0.8, "seed": seed,
                                         "stream": True}
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    count = 0
    for line in response:
        if protocol == "native":
            count += len(json.loads(line).get("text", ""))
        elif line.startswith(b"data: {"):
            count += sum(len(choice["text"]) for choice in json.loads(line[6:])["choices"])
    received.append(count)
    conn.close()


def measure(port: int, clients: int, chars: int, protocol: str = "native") -> float:
    received: list[int] = []
    threads = [threading.Thread(target=one_client, args=(port, seed, chars, received, protocol))
               for seed in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    assert sum(received) == clients * chars, received
    return sum(received) / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--chars", type=int, default=2000, help="characters each client asks for")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--_serve", nargs=2, metavar=("RUN", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._serve:
        return serve(args._serve[0], args._serve[1], args.slots)
    folder = tempfile.mkdtemp(prefix="bench-serve-")
    run = make_run(folder, args.hidden_size, args.layers)
    servers = {}
    try:
        for mode in ("batched", "unbatched"):
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--slots", str(args.slots),
                                     "--_serve", run, mode], stdout=subprocess.PIPE, text=True)
            servers[mode] = (proc, int(proc.stdout.readline()))
        protocols = ("native", "openai")
        for mode, (_, port) in servers.items():
            for n in args.clients:
                measure(port, n, 100)                              # warm-up: load, first products at each size
        results = {(mode, protocol, n): [] for mode in servers for protocol in protocols for n in args.clients}
        for _ in range(args.rounds):
            for n in args.clients:
                for protocol in protocols:
                    for mode, (_, port) in servers.items():
                        results[mode, protocol, n].append(measure(port, n, args.chars, protocol))
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                   "unknown CPU")
        print(f"{args.layers}x{args.hidden_size} model, {args.chars} chars per client, median of {args.rounds} "
              f"rounds; {cpu}, {os.cpu_count()} cores")
        print(f"{'protocol':>8}  {'clients':>7}  {'batched chars/s':>15}  {'unbatched chars/s':>17}  {'ratio':>5}")
        for protocol in protocols:
            for n in args.clients:
                batched = statistics.median(results["batched", protocol, n])
                unbatched = statistics.median(results["unbatched", protocol, n])
                print(f"{protocol:>8}  {n:>7}  {batched:>15,.0f}  {unbatched:>17,.0f}  {batched / unbatched:>5.2f}")
    finally:
        for proc, _ in servers.values():
            proc.kill()


if __name__ == "__main__":
    main()
