"""One self-contained HTML page that generates in the browser, offline, from file://.

The page (page.html, page.css, page.js beside this module) holds the weights as base64 of
little-endian float32 (or, with ``quantize="int8"``, int8 with one float32 scale per row of each
matrix, biases kept in float32), the vocabulary and the config in a JSON block, and a small
JavaScript LSTM step: the four gate equations over Float32Array weights, with textgen's sampling
(temperature 0 greedy, top-k, top-p, the most likely always kept) and a seeded generator of its own.

Why a JavaScript step and not onnxruntime-web: the step is ~40 lines of matrix-vector products,
where onnxruntime-web is megabytes of WebAssembly and JavaScript to inline (and base64) into every
page, more than the weights of the default model, and a WebAssembly runtime loaded from a page
needs 'wasm-unsafe-eval' in its Content-Security-Policy. The page's policy allows its one inline
script (by hash) and style (by hash), and nothing else: connect-src 'none', so it cannot send or
fetch anything. Text goes into the page as text nodes, never as HTML.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import re

import numpy as np
import torch

from . import step_tensors

HERE = os.path.dirname(os.path.abspath(__file__))


def int8_rows(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per row: row r is q[r] * scale[r], |q| <= 127 (scale 1 for a zero row)."""
    matrix = np.asarray(matrix, dtype=np.float32)
    scale = (np.abs(matrix).max(axis=1) / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.clip(np.rint(matrix / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def dequantized(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The float32 weights an int8 page computes with (q * scale, rounded once to float32, as the page does)."""
    return q.astype(np.float32) * scale[:, None]


def int8_model(model):
    """A copy of model whose matrices are their int8 round trips: the weights of an int8 page, for
    textgen-eval to score (benchmarks/bench_export.py). Biases stay float32, as in the page."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.from_numpy(dequantized(*int8_rows(parameter.detach().cpu().numpy()))))
    return model


def pack(tensors: dict, quantize: str) -> tuple[dict, bytes]:
    """The tensors as one little-endian blob and where each lies in it: {name: {dtype, shape, offset
    (, scale: the offset of an int8 matrix's row scales)}}. Offsets are multiples of 4."""
    blob, layout = bytearray(), {}

    def put(data: bytes) -> int:
        blob.extend(b"\0" * (-len(blob) % 4))
        offset = len(blob)
        blob.extend(data)
        return offset

    for name, array in tensors.items():
        entry = {"shape": list(array.shape)}
        if array.dtype == np.int64:                                   # the adaptive head's ranks
            entry.update(dtype="int32", offset=put(array.astype("<i4").tobytes()))
        elif quantize == "int8" and array.ndim == 2:
            q, scale = int8_rows(array)
            entry.update(dtype="int8", offset=put(q.tobytes()), scale=put(scale.astype("<f4").tobytes()))
        else:
            entry.update(dtype="float32", offset=put(array.astype("<f4").tobytes()))
        layout[name] = entry
    return layout, bytes(blob)


def _script_json(value) -> str:
    """JSON safe inside a <script> element: no '<' can close it or open a comment."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def _read(name: str) -> str:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


def page(model, info: dict, quantize: str = "none") -> str:
    """The HTML page for model, as one string."""
    from html import escape
    tensors = step_tensors(model)
    layout, blob = pack(tensors, quantize)
    spec = {"name": info.get("name", "model"), "vocab": info["vocab"], "config": info["model_config"],
            "opening_text": info["opening_text"], "textgen_version": info["textgen_version"], "step": info["step"],
            "quantize": quantize, "parameters": sum(int(np.prod(a.shape)) for n, a in tensors.items() if n != "rank"),
            "tensors": layout}
    script, style = _read("page.js"), _read("page.css")
    csp = (f"default-src 'none'; script-src {_sha256(script)}; style-src {_sha256(style)}; connect-src 'none'; "
           f"img-src 'none'; base-uri 'none'; form-action 'none'")
    name = escape(spec["name"])
    values = {"CSP": csp, "TITLE": f"textgen: {name}", "NAME": name, "STYLE": style, "SCRIPT": script,
              "MODEL": _script_json(spec), "WEIGHTS": base64.b64encode(blob).decode("ascii")}
    # One pass over the template, so that nothing inserted is read as a marker in its turn.
    return re.sub(r"%([A-Z]+)%", lambda m: values[m[1]], _read("page.html"))
