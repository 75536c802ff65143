"""Generation's step in C: every layer and the output layer for a few rows, in one call of lstm_rows_step.

Only stepper.py imports this; it imports native_kernel, which builds the C kernel. At one to a few
rows a step's products read each weight once per character, and the twenty-odd PyTorch calls that
compute a step the other way cost more than that arithmetic. lstm_rows_step computes each output
element as one weight row's dot product with one input row, in an order of operations that does not
depend on how many rows there are: a row gets the same bits alone or in a crowd, which the batching
server needs, by construction. The arithmetic is the gate-by-gate cell's (tested against it through
the Stepper), with the C kernel's sigmoid and tanh.
"""
from __future__ import annotations

import ctypes
import threading

import torch

from . import native_kernel


class RowsStep:
    """lstm_rows_step bound to one model's weights, prepared once (layer 0's W_hh; above it [W_ih | W_hh]
    joined, and the biases; the output layer's weight where it is a full one)."""

    def __init__(self, kernel: native_kernel.Kernel, layers: list, head_weight: torch.Tensor | None,
                 head_bias: torch.Tensor | None, residual: bool):
        self.kernel, self.residual = kernel, residual
        self.hidden_size = layers[0][1].shape[1]
        H = self.hidden_size
        self.weights = [native_kernel.panels(layers[0][1])] + [native_kernel.panels(torch.cat([w_ih, w_hh], 1)) for w_ih, w_hh, _ in layers[1:]]
        self.biases = [None] + [bias.contiguous() for _, _, bias in layers[1:]]
        pointer = native_kernel.pointer
        weight_at = [pointer(w, tuple(w.shape), "packed weight") for w in self.weights]
        bias_at = [None] + [pointer(b, (4 * H,), "bias") for b in self.biases[1:]]
        self.weight_array = (ctypes.c_void_p * len(layers))(*weight_at)
        self.bias_array = (ctypes.c_void_p * len(layers))(*bias_at)
        self.head_weight = None if head_weight is None else native_kernel.panels(head_weight)
        self.head_bias = None if head_bias is None else head_bias.contiguous()
        self.vocab_size = 0 if head_weight is None else head_weight.shape[0]
        self.head_at = (None, None) if head_weight is None else (
            pointer(self.head_weight, tuple(self.head_weight.shape), "head weight"),
            pointer(self.head_bias, (self.vocab_size,), "head bias"))
        self._scratch: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def for_weights(cls, layers: list, head_weight: torch.Tensor | None, head_bias: torch.Tensor | None,
                    residual: bool) -> RowsStep | None:
        """The C step for these weights (per layer (W_ih, W_hh, b_ih + b_hh); the output layer's, or None
        for one the caller computes), or None where the kernel does not run: not CPU float32, no kernel."""
        tensors = [t for layer in layers for t in layer] + [t for t in (head_weight, head_bias) if t is not None]
        if torch.compiler.is_compiling() or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
            return None
        kernel = native_kernel.load()
        return None if kernel is None else cls(kernel, layers, head_weight, head_bias, residual)

    @staticmethod
    def _threaded() -> bool:
        """Whether the products share the work among OpenMP's threads: on the main thread only. On another
        (a server's), a second team of OpenMP threads makes libgomp stop spinning between parallel regions,
        and waking its threads at every product costs more than they save: one row 5,745 chars/s against
        10,207 one-threaded, 16 rows 60k rows/s against 59k (2x256 on 2 cores; benchmarks/README.md)."""
        return threading.current_thread() is threading.main_thread()

    def __call__(self, layer0_gates: torch.Tensor, state) -> tuple[torch.Tensor | None, torch.Tensor, tuple]:
        """layer0_gates (N, 4H): layer 0's input part with both biases; state: per layer (h, c), each (N, H),
        as model.check_state gives it. Returns the logits (N, V) (None without the output layer), the top
        layer's output (N, H), and the new state, fresh tensors (views of one, allocated per call)."""
        N, H, L = layer0_gates.shape[0], self.hidden_size, len(self.weights)
        pointer = native_kernel.pointer
        if N not in self._scratch:        # per batch size: buffers the kernel overwrites, the state's pointer array
            self._scratch[N] = (layer0_gates.new_empty(N, 4 * H), layer0_gates.new_empty(N, 2 * H),
                                (ctypes.c_void_p * (4 * L))())
        gates, joined, states = self._scratch[N]
        # The kernel's own buffers are made here at their sizes; what comes from outside is checked.
        out = layer0_gates.new_empty(2, L, N, H)
        x_out = layer0_gates.new_empty(N, H)
        logits = layer0_gates.new_empty(N, self.vocab_size) if self.vocab_size else None
        for k, (h, c) in enumerate(state):
            states[k], states[L + k] = pointer(h, (N, H), "h"), pointer(c, (N, H), "c")
        out_at, state_bytes = out.data_ptr(), N * H * 4
        for k in range(2 * L):
            states[2 * L + k] = out_at + k * state_bytes               # h_out[0..L), then c_out[0..L)
        self.kernel.rows_step(N, L, H, self.vocab_size, int(self.residual), int(self._threaded()),
                              pointer(layer0_gates, (N, 4 * H), "layer 0 gates"), self.weight_array, self.bias_array,
                              states, x_out.data_ptr(), self.head_at[0], self.head_at[1],
                              None if logits is None else logits.data_ptr(), gates.data_ptr(), joined.data_ptr())
        hs, cs = out.unbind(0)
        return logits, x_out, tuple(zip(hs.unbind(0), cs.unbind(0)))
