"""Export a trained model for other runtimes: ONNX, one offline HTML page, safetensors.

Every format carries the weights generation uses (the averaged weights where the run kept them,
through ``checkpoint.load_model``, as generate.py loads them), the vocabulary and the model config,
so the file (or folder) is all a runtime needs:

* ``onnx`` (onnx_graph.py): the one-character step as a standard ONNX graph, tokens and per-layer
  (h, c) in, logits and the new (h, c) out, with a batch dimension; proved against CharLSTM
  through onnxruntime by tests/test_export.py.
* ``web`` (web.py, with page.html, page.css, page.js): one self-contained HTML file that generates
  in the browser, offline, from file://; float32 or int8 weights.
* ``safetensors`` (safetensors_files.py): a folder with model.safetensors, config.json and
  vocab.json, the layout models are shared in; ``textgen.load`` reads it back.

Every file goes through the one writer (files.py). Imports checkpoint, files, errors, model,
sampling and tokenizer; only cli and api import it (api for reading a safetensors folder).
"""
from __future__ import annotations

import os
from dataclasses import asdict

from ..checkpoint import load_model
from ..errors import UsageError
from ..files import check
from ..generation.sampling import opening_text

FORMATS = ("onnx", "web", "safetensors")
QUANTIZE = ("none", "int8")
SUFFIX = {"onnx": ".onnx", "web": ".html", "safetensors": "-safetensors"}
NEEDS = {"onnx": "onnx", "safetensors": "safetensors"}           # the package each format writes with


def run_name(run: str) -> str:
    """The run folder's name, for a run folder or a checkpoint file in one: checkpoints/abc/best.pt -> abc."""
    path = os.path.abspath(run)
    return (os.path.basename(path) if os.path.isdir(path) else os.path.basename(os.path.dirname(path))) or "model"


def default_output(run: str, fmt: str) -> str:
    """RUN's name with the format's suffix, in the current folder: checkpoints/abc -> abc.onnx."""
    return run_name(run) + SUFFIX[fmt]


def check_output(path: str, fmt: str) -> None:
    """Refuse an output the writer would refuse (or, for safetensors, a folder with files in it),
    before a model is loaded."""
    if path == "":
        raise UsageError("--output must name a file or folder (leave it out for the default)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write {path}: the folder {os.path.dirname(path) or '.'} does not exist")
    if fmt == "safetensors":
        if os.path.lexists(path) and not os.path.isdir(path):
            raise UsageError(f"{path} is a file; --format safetensors writes a folder of three files, so name "
                             f"a new or empty folder")
        if os.path.isdir(path) and os.listdir(path):
            raise UsageError(f"{path} is a folder with files in it; name a new or empty folder for the "
                             f"safetensors export (nothing was written)")
        if not os.access(parent if not os.path.isdir(path) else path, os.W_OK):
            raise UsageError(f"cannot write {path}: permission denied")
        return
    check(path)


def require(package: str, fmt: str):
    """The package a format writes with, or one sentence saying how to install it."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError:
        raise UsageError(f"--format {fmt} needs the {package} package; install it with "
                         f"pip install -e \".[export]\" (or pip install {package})") from None


def metadata(model, tokenizer, ckpt: dict) -> dict:
    """What every format records beside the weights: vocabulary, model config, versions, the opening text."""
    from .. import __version__
    config = asdict(model.config)
    config["cutoffs"] = list(config["cutoffs"])
    return {"vocab": list(tokenizer.chars), "model_config": config, "textgen_version": __version__,
            "opening_text": opening_text(tokenizer), "step": ckpt.get("step")}


def step_tensors(model) -> dict:
    """The one-character step's weights as numpy arrays, named as the ONNX graph and the web page name them.

    embedding (V, E); per layer k: layer{k}.w_ih (4H, I), layer{k}.w_hh (4H, H), layer{k}.bias (4H,) =
    b_ih + b_hh, gates in nn.LSTM's order i, f, g, o. Full head: head.weight (V, H), head.bias (V,).
    Adaptive head: head.weight (S + n, H) and head.bias over the shortlist of S characters and one row
    per tail cluster, tail{i}.projection (w_i, H) and tail{i}.output (size_i, w_i), and rank (V,) int64,
    each token's place in that order of frequency. Float32 throughout."""
    import numpy as np
    from ..lstm import AdaptiveHead

    def array(t):
        return t.detach().cpu().float().contiguous().numpy()

    lstm = model.lstm
    tensors = {"embedding": array(model.embedding.weight)}
    for k in range(lstm.layers):
        w_ih, w_hh, b_ih, b_hh = lstm.layer_weights(k)
        tensors.update({f"layer{k}.w_ih": array(w_ih), f"layer{k}.w_hh": array(w_hh),
                        f"layer{k}.bias": array(b_ih + b_hh)})       # summed once, as the Stepper sums them
    if isinstance(model.head, AdaptiveHead):
        softmax = model.head.softmax
        tensors.update({"head.weight": array(softmax.head.weight), "head.bias": array(softmax.head.bias)})
        for i, (projection, output) in enumerate(softmax.tail):
            tensors.update({f"tail{i}.projection": array(projection.weight), f"tail{i}.output": array(output.weight)})
        tensors["rank"] = model.head.rank.detach().cpu().numpy().astype(np.int64)
    else:
        tensors.update({"head.weight": array(model.head.weight), "head.bias": array(model.head.bias)})
    return tensors


def export(run: str, fmt: str, output: str | None = None, quantize: str = "none") -> list[str]:
    """Write RUN (a run folder or checkpoint file) in format fmt; returns the paths written."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose {', '.join(FORMATS)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize must be none or int8, got {quantize!r}")
    if quantize != "none" and fmt != "web":
        raise UsageError(f"--quantize {quantize} is for --format web; the {fmt} export keeps the float32 weights")
    output = default_output(run, fmt) if output is None else output
    check_output(output, fmt)
    if fmt in NEEDS:
        require(NEEDS[fmt], fmt)
    model, tokenizer, ckpt = load_model(run, prefer_best=True, device="cpu")
    if model.config.style_names and fmt in ("onnx", "web"):
        raise UsageError(f"{run} was trained with styles ({', '.join(model.config.style_names)}), which the {fmt} "
                         f"export does not carry yet; export it as safetensors, or generate with --style")
    info = metadata(model, tokenizer, ckpt)
    if fmt == "onnx":
        from ..files import write_bytes
        from .onnx_graph import onnx_bytes
        write_bytes(output, onnx_bytes(model, info))
        return [output]
    if fmt == "web":
        from ..files import write_text
        from .web import page
        info["name"] = run_name(run)
        write_text(output, page(model, info, quantize))
        return [output]
    from .safetensors_files import write
    return write(output, model, info)
