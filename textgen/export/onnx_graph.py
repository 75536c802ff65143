"""The one-character step as a standard ONNX graph, built node by node with onnx.helper.

Inputs: ``tokens`` int64 (batch,) and, for each layer k, ``h_k`` and ``c_k`` float32 (batch, H).
Outputs: ``logits`` float32 (batch, V) (exact log-probabilities with the adaptive head, as
CharLSTM gives them) and ``next_h_k``, ``next_c_k``. ``batch`` is a symbolic dimension, so a runtime
steps several streams at once. Generation starts from zeros, as textgen does, after reading
``textgen.opening_text`` (a newline) when there is no prompt.

Why by hand and not torch.onnx.export: the model's own step is a fused fast path (a C kernel or a
custom autograd function) that no exporter traces, and the step written out here is the four gate
equations of model.lstm_cell, one node each, which is the clearest graph a reader (or a runtime)
can get; it needs onnx alone, not torch's exporter stack (onnxscript), and each name in it is ours.
tests/test_export.py proves it against CharLSTM through onnxruntime, step by step.

The vocabulary (JSON list of characters in id order), the model config (JSON), the opening text
and textgen's version are metadata_props, so the file is all a runtime needs.
"""
from __future__ import annotations

import json

import numpy as np

from . import require, step_tensors

# Opset 21 (IR version 10): onnxruntime has run it since 1.18 (2024) and the current 1.32 runs up to
# 28, so files load in runtimes two years old as well as today's. Every op used here (Gather, MatMul,
# Add, Mul, Sigmoid, Tanh, Split, Slice, Concat, LogSoftmax) means the same from opset 18 on.
OPSET = 21


def onnx_bytes(model, info: dict) -> bytes:
    """The serialized ONNX model of model's one-character step, with info as metadata."""
    onnx = require("onnx", "onnx")
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    H, V, L = config.hidden_size, config.vocab_size, config.layers
    weights = step_tensors(model)
    initializers, nodes = [], []

    def constant(name: str, array: np.ndarray) -> str:
        initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(op: str, inputs: list, output: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attributes))
        return output

    def linear(x: str, weight: str, name: str, bias: str | None = None) -> str:
        """x (batch, in) @ weight^T (+ bias): the weight is stored transposed, (in, out), for MatMul."""
        out = node("MatMul", [x, constant(weight + ".T", np.ascontiguousarray(weights[weight].T))], name)
        return node("Add", [out, constant(bias, weights[bias])], name + "+bias") if bias else out

    x = node("Gather", [constant("embedding", weights["embedding"]), "tokens"], "embedded", axis=0)   # (batch, E)
    for k in range(L):
        p = f"layer{k}"
        gates = node("Add", [linear(x, f"{p}.w_ih", f"{p}/input_product"),
                             linear(f"h_{k}", f"{p}.w_hh", f"{p}/hidden_product")], f"{p}/products")
        gates = node("Add", [gates, constant(f"{p}.bias", weights[f"{p}.bias"])], f"{p}/gates")          # (batch, 4H)
        names = [f"{p}/{gate}_pre" for gate in ("input", "forget", "candidate", "output")]
        nodes.append(helper.make_node("Split", [gates], names, name=f"{p}/split", axis=1, num_outputs=4))
        input_gate = node("Sigmoid", [names[0]], f"{p}/input_gate")      # how much of the candidate to write
        forget_gate = node("Sigmoid", [names[1]], f"{p}/forget_gate")    # how much of the old cell to keep
        candidate = node("Tanh", [names[2]], f"{p}/candidate")           # what to write
        output_gate = node("Sigmoid", [names[3]], f"{p}/output_gate")    # how much of the cell to expose
        c = node("Add", [node("Mul", [forget_gate, f"c_{k}"], f"{p}/kept"),
                         node("Mul", [input_gate, candidate], f"{p}/written")], f"next_c_{k}")
        h = node("Mul", [output_gate, node("Tanh", [c], f"{p}/cell_tanh")], f"next_h_{k}")
        # Residual: a layer after the first hands up its input plus its output; its state is its own.
        x = node("Add", [h, x], f"{p}/residual") if config.residual and k > 0 else h

    if "rank" in weights:
        logits = _adaptive_head(x, weights, node, linear, constant)
    else:
        logits = linear(x, "head.weight", "logits_", "head.bias")
    nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits"))

    batch = "batch"
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, [batch])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, V])]
    for k in range(L):
        for s in "hc":
            inputs.append(helper.make_tensor_value_info(f"{s}_{k}", TensorProto.FLOAT, [batch, H]))
            outputs.append(helper.make_tensor_value_info(f"next_{s}_{k}", TensorProto.FLOAT, [batch, H]))
    graph = helper.make_graph(nodes, "textgen_char_lstm_step", inputs, outputs, initializers,
                              doc_string="One character of a textgen CharLSTM: tokens (batch,) and each layer's "
                                         "(h_k, c_k) in; logits (batch, V) and next_h_k, next_c_k out.")
    opset = [helper.make_opsetid("", OPSET)]
    onnx_model = helper.make_model(graph, opset_imports=opset, producer_name="textgen",
                                   producer_version=info["textgen_version"],
                                   ir_version=helper.find_min_ir_version_for(opset))
    onnx_model.doc_string = (f"textgen character-level LSTM, {L} x {H}, vocabulary of {V}; greedy or sampled "
                             f"generation steps this graph one character at a time from zero state")
    helper.set_model_props(onnx_model, {
        "textgen.vocab": json.dumps(info["vocab"], ensure_ascii=False),
        "textgen.model_config": json.dumps(info["model_config"]),
        "textgen.version": info["textgen_version"],
        "textgen.opening_text": info["opening_text"],
        "textgen.step": str(info["step"]),
    })
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model.SerializeToString()


def _adaptive_head(x: str, weights: dict, node, linear, constant) -> str:
    """nn.AdaptiveLogSoftmaxWithLoss.log_prob, then each token's column by its frequency rank
    (AdaptiveHead.log_probs): the shortlist's log-probabilities, and each tail cluster's
    log-softmax plus the head's log-probability of that cluster."""
    head = node("LogSoftmax", [linear(x, "head.weight", "head/logits", "head.bias")], "head/log_probs", axis=1)
    shortlist = len(weights["head.bias"]) - sum(1 for name in weights if name.endswith(".projection"))

    def columns(start: int, stop: int, name: str) -> str:
        return node("Slice", [head, constant(name + ".start", np.array([start])),
                              constant(name + ".stop", np.array([stop])), constant(name + ".axis", np.array([1]))],
                    name)

    parts = [columns(0, shortlist, "head/shortlist")]
    i = 0
    while f"tail{i}.projection" in weights:
        projected = linear(x, f"tail{i}.projection", f"tail{i}/projected")
        within = node("LogSoftmax", [linear(projected, f"tail{i}.output", f"tail{i}/logits")], f"tail{i}/log_probs",
                      axis=1)
        parts.append(node("Add", [within, columns(shortlist + i, shortlist + i + 1, f"tail{i}/cluster")],
                          f"tail{i}/joint"))
        i += 1
    by_rank = node("Concat", parts, "by_rank", axis=1)                                    # (batch, V)
    return node("Gather", [by_rank, constant("rank", weights["rank"])], "by_token", axis=1)
