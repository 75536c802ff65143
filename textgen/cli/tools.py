"""`textgen eval`, `info`, `plot` and `export`: reading a run.
"""
from __future__ import annotations

import argparse
import os
import sys

from ..errors import UsageError, check_range
from .common import Formatter, Parser, adapt_lr_of, add_adapt, add_checkpoint, add_common, add_unknown, add_version, run_main


def eval_parser() -> argparse.ArgumentParser:
    from ..evaluate import ADAPT_SEQ_LEN, EVAL_SEQ_LEN, EVAL_STREAMS
    p = Parser(
        prog="textgen-eval", formatter_class=Formatter,
        description="Cross-entropy of a trained model over a whole text file, in nats and bits per character. "
                    "The file is read as a few parallel streams with the state carried from start to end; each "
                    "stream starts from a zero state, a small upward bias that shrinks as the file grows.")
    add_checkpoint(p)
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to evaluate on")
    add_unknown(p, "leave them out and count them")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"parallel streams the file is read as (default {EVAL_STREAMS}; 1 with --adapt)")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"characters per chunk (default {EVAL_SEQ_LEN}, or {ADAPT_SEQ_LEN} with --adapt)")
    add_adapt(p, "dynamic evaluation: read the file as one stream and let the model keep learning from what it "
                 "has read, a step after each chunk is scored (never from text ahead); the figure to set beside a "
                 "compressor's, which also learns from the file as it goes")
    p.add_argument("--match", action="store_true",
                   help="mix in a match model, as compressors do: the character that followed the last time "
                        "the last few characters occurred in the text read so far, weighted by how often such "
                        "matches have come true; the model's own figure is printed beside it")
    p.add_argument("--history", metavar="FILE", default=None,
                   help="with --match: a text read before --text that the match model may copy from too, such "
                        "as the training text (what xz is given for its conditional figure)")
    p.add_argument("--style", metavar="NAME", default=None,
                   help="read the text under this style's label (a model trained with --styles; textgen info lists "
                        "its styles)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_common(p)
    return p


def eval_main(argv=None) -> int:
    return run_main(_eval, argv)


def _eval(argv) -> int:
    import json

    from ..run_folder import latest_run
    from ..evaluate import EVAL_STREAMS, LN2, evaluate_file
    from ..devices import resolve_device
    args = eval_parser().parse_args(argv)
    for name in ("batch_size", "seq_len"):
        check_range(name, getattr(args, name), 1, 10**9, "a whole number from 1 to 1,000,000,000")
    adapt_lr = adapt_lr_of(args)
    if adapt_lr is not None:
        if args.batch_size not in (None, 1):
            raise UsageError("--adapt reads the file as one stream (a step learnt on one stream would predict "
                             "text of another that comes before it); leave out --batch-size")
    if args.history is not None and not args.match:
        raise UsageError("--history is the match model's text; add --match")
    report = evaluate_file(args.checkpoint or latest_run(), args.text, args.unknown, args.batch_size or EVAL_STREAMS,
                           args.seq_len, resolve_device(args.device),
                           progress=not args.quiet and sys.stderr.isatty(), adapt_lr=adapt_lr,
                           match=args.match, history_path=args.history, style=args.style)
    if args.json:
        print(json.dumps(report))
        return 0
    how = (f"as one stream, learning as it reads (--adapt-lr {report['adapt_lr']:g})" if report["adapt_lr"]
           else f"in {report['streams']} streams")
    print(f"{report['text']}: {report['characters']:,} characters, {report['predicted']:,} predicted {how}"
          + (f", style {report['style']}" if report["style"] else ""))
    if report["skipped_unknown"]:
        print(f"left out {report['skipped_unknown']:,} characters the model never saw")
    if report["match"]:
        source = (f"{report['history']} ({report['history_characters']:,} characters) and the text read so far"
                  if report["history"] else "the text read so far")
        print(f"mixed with a match model over {source}")
    print(f"cross-entropy {report['nats_per_char']:.4f} nats/char = {report['bits_per_char']:.4f} bits/char "
          f"({report['seconds']:.1f}s)")
    if report["match"]:
        print(f"the model alone {report['lstm_nats_per_char']:.4f} nats/char = "
              f"{report['lstm_nats_per_char'] / LN2:.4f} bits/char")
    return 0


def info_main(argv=None) -> int:
    return run_main(_info, argv)


def _info(argv) -> int:
    from ..checkpoint import load, summary
    from ..run_folder import resolve
    from ..evaluate import LN2
    from ..tokenizer import escape_char
    p = Parser(prog="textgen info", formatter_class=Formatter,
                                description="Describe a checkpoint without putting its weights on a device.")
    p.add_argument("checkpoint", metavar="RUN_FOLDER_OR_FILE")
    add_version(p)
    args = p.parse_args(argv)
    path = resolve(args.checkpoint, prefer_best=False)
    ckpt = load(path, map_location="cpu")
    info = summary(ckpt, path)
    corpus, best = info["corpus"], info["best_val_loss"]
    print(f"checkpoint   {path} (format {info['version']}, written {info['created'] or '?'})")
    print(f"model        {info['layers']} x LSTM {info['hidden_size']}"
          + (" with residual connections" if info["residual"] and info["layers"] > 1 else "")
          + f", embedding {info['embed_size']}, "
          + ("adaptive softmax (cutoffs " + ", ".join(map(str, info["cutoffs"])) + ")" if info["head"] == "adaptive"
             else "full softmax"))
    regularisers = [f"{name.replace('_', ' ')} {value:g}" for name, value in info["regularisers"].items()]
    print(f"regularised  {', '.join(regularisers) or 'no dropout'}"
          + (" (locked masks)" if info["locked_dropout"] else "")
          + (f"; averaged weights (--ema {info['ema']})" if info["averaged_weights"] else ""))
    print(f"parameters   {info['parameters']:,}")
    print(f"vocabulary   {len(info['vocab'])} characters: {' '.join(escape_char(ch) for ch in info['vocab'])}")
    if info["styles"]:
        print(f"styles       {', '.join(info['styles'])} (generate with --style NAME)")
    if corpus:
        print(f"corpus       {corpus.get('path')} ({corpus.get('size_bytes', 0):,} bytes, "
              f"{corpus.get('characters', 0):,} characters, sha256 {corpus.get('sha256', '')[:16]})")
    print(f"steps        {info['steps']:,} of {info['plan'] or '?'}")
    if best is not None:
        print(f"best val     {best:.4f} nats/char = {best / LN2:.4f} bits/char")
    print(f"train time   {info['elapsed']:.0f}s")
    return 0


def plot_main(argv=None) -> int:
    return run_main(_plot, argv)


def _plot(argv) -> int:
    from ..plot import plot_runs
    p = Parser(prog="textgen plot", formatter_class=Formatter,
                                description="Plot training and validation loss of one or more runs into a PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN_FOLDER")
    p.add_argument("--output", default=None, help="PNG to write (default: loss.png in the first run folder)")
    add_version(p)
    args = p.parse_args(argv)
    out = plot_runs(args.runs, args.output)
    print(out)
    return 0


def export_parser() -> argparse.ArgumentParser:
    from ..export import FORMATS, QUANTIZE
    p = Parser(prog="textgen export", formatter_class=Formatter,
                description="Write a trained model (the weights generation uses) for another runtime: onnx (the "
                            "one-character step as an ONNX graph, for onnxruntime and others), web (one HTML file "
                            "that generates in the browser, offline) or safetensors (a folder of model.safetensors, "
                            "config.json and vocab.json, which textgen.load reads back). See README, Export.",
                epilog="examples:\n  textgen export checkpoints/my-run --format onnx --output model.onnx\n"
                       "  textgen export checkpoints/my-run --format web --output model.html --quantize int8\n"
                       "  textgen export checkpoints/my-run --format safetensors --output my-run-safetensors")
    p.add_argument("run", metavar="RUN_FOLDER_OR_FILE",
                   help="a run folder (uses best.pt, else latest.pt) or a checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--output", default=None,
                   help="the file to write (onnx, web), or a new or empty folder (safetensors); never over a "
                        "checkpoint or a run folder's file (default: the run's name with .onnx, .html or "
                        "-safetensors, in the current folder)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="web: int8 weights with a scale per row, about a quarter of the float32 page")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    add_version(p)
    return p


def export_main(argv=None) -> int:
    return run_main(_export, argv)


def _export(argv) -> int:
    from ..export import export
    args = export_parser().parse_args(argv)
    written = export(args.run, args.format, args.output, args.quantize)
    if not args.quiet:
        for path in written:
            print(f"wrote {path} ({os.path.getsize(path):,} bytes)")
    return 0


