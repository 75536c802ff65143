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
import functools

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
        self.weights = [native_kernel.panels(layers[0][1])]            # layer 0's input part is the token's row
        self.weights += [native_kernel.panels(torch.cat([w_ih, w_hh], 1)) for w_ih, w_hh, _ in layers[1:]]
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
        self._scratch: dict[int, tuple] = {}
        self._returned: tuple = (None, 0, None)     # the state last returned, its buffer's address, the buffer

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

    def returned(self, state, rows: int) -> bool:
        """Whether state is the one this step returned last, still as it was: the same tuple, each tensor
        still (rows, H) at the address it was given (not resized, its storage not replaced). Such a state
        needs no checking (model.check_state) before it is read again."""
        known, out_at, _ = self._returned
        if state is None or state is not known:
            return False
        L, shape, size = len(self.weights), (rows, self.hidden_size), rows * self.hidden_size * 4
        for k, (h, c) in enumerate(state):          # (a loop, not all(...): this runs per character)
            if (h.data_ptr() != out_at + k * size or c.data_ptr() != out_at + (L + k) * size or h.shape != shape
                    or c.shape != shape or not (h.is_contiguous() and c.is_contiguous())):
                return False
        return True

    def __call__(self, layer0_gates: torch.Tensor, state, known: bool = False
                 ) -> tuple[torch.Tensor | None, torch.Tensor, tuple]:
        """layer0_gates (N, 4H): layer 0's input part with both biases; state: per layer (h, c), each (N, H),
        as model.check_state gives it, or known: the state this step returned last (returned() says so).
        Returns the logits (N, V) (None without the output layer), the top layer's output (N, H), and the
        new state, fresh tensors (views of one, allocated per call)."""
        N, H, L = layer0_gates.shape[0], self.hidden_size, len(self.weights)
        pointer = native_kernel.pointer
        if N not in self._scratch:        # per batch size: buffers the kernel overwrites, the state's pointer array
            self._scratch[N] = (layer0_gates.new_empty(N, 4 * H), layer0_gates.new_empty(N, 2 * H),
                                (ctypes.c_void_p * (4 * L))())
        gates, joined, states = self._scratch[N]
        # The kernel's own buffers are made here at their sizes; what comes from outside is checked, but for
        # the state this step returned last, still at the addresses it had (returned()).
        out = layer0_gates.new_empty(2 * L, N, H)                    # h_out[0..L), then c_out[0..L)
        x_out = layer0_gates.new_empty(N, H)
        logits = layer0_gates.new_empty(N, self.vocab_size) if self.vocab_size else None
        out_at, state_bytes = out.data_ptr(), N * H * 4
        if known:
            for k in range(2 * L):
                states[k] = self._returned[1] + k * state_bytes
        else:
            for k, (h, c) in enumerate(state):
                states[k], states[L + k] = pointer(h, (N, H), "h"), pointer(c, (N, H), "c")
        for k in range(2 * L):
            states[2 * L + k] = out_at + k * state_bytes
        self.kernel.rows_step(N, L, H, self.vocab_size, int(self.residual), int(native_kernel.threads_pay_here()),
                              pointer(layer0_gates, (N, 4 * H), "layer 0 gates"), self.weight_array, self.bias_array,
                              states, x_out.data_ptr(), self.head_at[0], self.head_at[1],
                              None if logits is None else logits.data_ptr(), gates.data_ptr(), joined.data_ptr())
        return logits, x_out, self._state_of(out)

    def _state_of(self, out: torch.Tensor) -> tuple:
        """The state held in out (2L, N, H), h then c, as per-layer (h, c) views; remembered as returned."""
        L, parts = len(self.weights), out.unbind(0)
        new_state = tuple((parts[k], parts[L + k]) for k in range(L))
        self._returned = (new_state, out.data_ptr(), out)
        return new_state

    def decode(self, steps: int, token_gates: torch.Tensor, style_rows: torch.Tensor | None, logits: torch.Tensor,
               state, known: bool, temperature, top_k, top_p, u: torch.Tensor, ends: list[int], watch: list[bool]
               ) -> tuple[torch.Tensor, torch.Tensor, tuple] | None:
        """Up to `steps` characters for each of N rows in one C call (lstm_decode_rows): each drawn from the
        logits (N, V) at its number of u (steps * N,) with the settings (as sample_rows draws), then stepped
        (as __call__ steps) with token_gates (V, 4H) its layer 0's input part, plus style_rows (N, 4H) where
        given. The call returns early, after the step where a row whose watch is true drew one of the ids in
        ends. Returns the ids drawn (taken, N), the logits after the last (a new tensor) and the new state; None
        where the settings are of a form the kernel does not read (nothing drawn: the caller steps)"""
        N, V = logits.shape
        H, L, pointer = self.hidden_size, len(self.weights), native_kernel.pointer
        settings = _settings(temperature, top_k, top_p, N, V)
        if settings is None or self.vocab_size != V or u.shape != (steps * N,) or steps < 1:
            return None
        columns = settings[0]                     # (settings holds what they point at until the call returns)
        states = (ctypes.c_void_p * (2 * L))()
        if known:
            for k in range(2 * L):
                states[k] = self._returned[1] + k * N * H * 4
        else:
            for k, (h, c) in enumerate(state):
                states[k], states[L + k] = pointer(h, (N, H), "h"), pointer(c, (N, H), "c")
        logits = logits.to(torch.float32, copy=True).contiguous()       # overwritten step by step
        out, spare = logits.new_empty(2 * L, N, H), logits.new_empty(2 * L, N, H)
        ids = torch.empty(steps, N, dtype=torch.int64)
        u = u.to(torch.float64).contiguous()
        ends_array = (ctypes.c_int64 * max(1, len(ends)))(*ends)
        watch_array = (ctypes.c_int64 * N)(*map(int, watch))
        taken = self.kernel.decode_rows(
            steps, N, L, H, V, int(self.residual), int(native_kernel.threads_pay_here()),
            pointer(token_gates, (V, 4 * H), "token gates"),
            None if style_rows is None else pointer(style_rows, (N, 4 * H), "style gates"),
            self.weight_array, self.bias_array, states, out.data_ptr(), spare.data_ptr(), self.head_at[0],
            self.head_at[1], pointer(logits, (N, V), "logits"), *columns[0], *columns[1], *columns[2],
            pointer(u, (steps * N,), "u", torch.float64), ids.data_ptr(), ends_array, len(ends), watch_array)
        if taken < 1:
            return None
        return ids[:taken], logits, self._state_of(out)


def _settings(temperature, top_k, top_p, rows: int, V: int) -> tuple[tuple, list] | None:
    """The draw's settings as the kernel reads them: per setting (address, stride) (see _column), and what
    must stay alive through the call; None where one is of a form the kernel does not read."""
    if isinstance(top_k, int):
        top_k = max(0, min(top_k, V))        # as the reference cuts (no cut from V on); a C int64 could wrap
    keep = []
    columns = (_column(temperature, ctypes.c_float, torch.float32, rows, keep),
               _column(V if top_k is None else top_k, ctypes.c_int64, torch.int64, rows, keep),
               _column(1.0 if top_p is None else top_p, ctypes.c_float, torch.float32, rows, keep))
    return None if None in columns else (columns, keep)


def _column(value, ctype, dtype: torch.dtype, rows: int, keep: list):
    """A setting as lstm_sample_rows reads it: (address, stride), one number (stride 0) or one per row;
    None for any other form (the reference then draws)."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "cpu" or value.shape not in ((), (1,), (rows,)):
            return None
        column = value.to(dtype).expand(rows).contiguous()
        keep.append(column)
        return native_kernel.pointer(column, (rows,), "setting", dtype), 1
    if not isinstance(value, (int, float)):
        return None
    number = _number(ctype, value)
    keep.append(number)                          # alive through the call, whatever the cache drops meanwhile
    return ctypes.addressof(number), 0


@functools.lru_cache(maxsize=256)
def _number(ctype, value):
    """A C number holding value, made once per value (the kernel only reads it): a request's settings repeat
    at every character."""
    return ctype(value)


def sample_rows(logits: torch.Tensor, temperature, top_k, top_p, u: torch.Tensor) -> torch.Tensor | None:
    """One token per row of logits (N, V), drawn at u (N,) as generation/sampling.py's next_tokens draws it
    (its reference), in one C call; None where the kernel does not run (another device or dtype, none built).
    Each setting is one number for every row or an (N,) tensor; top_k None (no cut) or an int, top_p None or
    a float. A draw within a last bit of a boundary between two tokens may fall the other way than the
    reference's (the kernel's exp is its own)."""
    if (logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2
            or torch.compiler.is_compiling()):
        return None
    kernel = native_kernel.load()
    if kernel is None:
        return None
    N, V = logits.shape
    if not isinstance(u, torch.Tensor) or u.device.type != "cpu" or u.shape != (N,):
        return None
    if u.dtype != torch.float64 or not u.is_contiguous():
        u = u.to(torch.float64).contiguous()
    logits = logits if logits.is_contiguous() else logits.contiguous()
    settings = _settings(temperature, top_k, top_p, N, V)
    if settings is None:
        return None
    columns = settings[0]
    ids = torch.empty(N, dtype=torch.int64)
    done = kernel.sample_rows(N, V, native_kernel.pointer(logits, (N, V), "logits"), *columns[0], *columns[1],
                              *columns[2], native_kernel.pointer(u, (N,), "u", torch.float64),
                              native_kernel.pointer(ids, (N,), "ids", torch.int64))
    return ids if done == 0 else None
