"""Our own stacked LSTM and the character language model built on it.

Owns: the model's configuration, the LSTM cell written gate by gate, the checks on what
goes into the model, the stack, the language model and the one-character stepper. Imports
only its own fast path (fused_lstm.py, which only this module imports); never anything
else of textgen's.

From the inside out:

* ``lstm_cell`` is the classic LSTM cell, gate by gate: input gate, forget gate, tanh
  candidate, output gate, and the cell state they update. It is the reference and the
  documentation: every faster path is tested against it (``lstm_layer_reference`` runs it
  over a chunk).
* ``lstm_layer`` (from fused_lstm.py) computes the same function fast: the input projection
  of all steps in one product, a time loop of small recurrent products and one pointwise
  step function (a C kernel on the CPU, PyTorch ops elsewhere), a hand-written backward
  pass, and optionally bf16 or fp16 products (``StackedLSTM.matmul_dtype``).
* ``StackedLSTM`` owns the parameters, named and shaped exactly like ``torch.nn.LSTM``
  (``weight_ih_l{k}``, ``weight_hh_l{k}``, ``bias_ih_l{k}``, ``bias_hh_l{k}``, gate order
  i, f, g, o), so ``nn.LSTM.load_state_dict`` takes our state dict as it is. Dropout sits
  between layers (CharLSTM adds one before the output layer).
* ``CharLSTM`` is embedding -> stacked LSTM -> linear to the vocabulary.
* ``Stepper`` runs one character at a time for generation, with the embedding folded into
  layer 0's input weights, through the chunk loops' own step function.

State is explicit: a tuple with one ``(h, c)`` pair per layer, each ``(B, H)``, goes into
``forward`` and comes out of it, checked at the door (``check_state``). Nothing is hidden on
the module, so the caller decides when a state carries on (across chunks, prompts, turns)
and when it is detached (``detach_state``) or reset (``None``). Internally the stack runs
time-major, ``(T, B, ...)``, so that the slice for one time step is contiguous memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fused_lstm import KernelUnavailable, describe_step_path, forward_steps, lstm_layer, recurrent_product  # noqa: F401

State = tuple[tuple[torch.Tensor, torch.Tensor], ...]


@dataclass
class ModelConfig:
    vocab_size: int
    embed_size: int = 64
    hidden_size: int = 512
    layers: int = 2
    dropout: float = 0.2

    def validate(self) -> None:
        for name in ("vocab_size", "embed_size", "hidden_size", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def num_parameters(self) -> int:
        """What CharLSTM(self).num_parameters() will be, known before anything is allocated."""
        E, H, V, L = self.embed_size, self.hidden_size, self.vocab_size, self.layers
        per_layer = 4 * H * (H + H) + 8 * H                 # layers after the first read H inputs
        lstm = 4 * H * (E + H) + 8 * H + (L - 1) * per_layer
        return V * E + lstm + H * V + V


# ---------------------------------------------------------------------------
# The cell: the reference
# ---------------------------------------------------------------------------

def lstm_cell(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """One LSTM step. x (B, I), h and c (B, H); returns the new (h, c)."""
    gates = x @ weight_ih.t() + bias_ih + h @ weight_hh.t() + bias_hh  # (B, 4H)
    i, f, g, o = gates.chunk(4, dim=1)
    input_gate = torch.sigmoid(i)     # how much of the candidate to write
    forget_gate = torch.sigmoid(f)    # how much of the old cell to keep
    candidate = torch.tanh(g)         # what to write
    output_gate = torch.sigmoid(o)    # how much of the cell to expose
    c = forget_gate * c + input_gate * candidate
    h = output_gate * torch.tanh(c)
    return h, c


def lstm_layer_reference(x, h, c, weight_ih, weight_hh, bias_ih, bias_hh):
    """One layer over a chunk, one cell call per step. x (T, B, I) -> (T, B, H)."""
    outputs = []
    for x_t in x:
        h, c = lstm_cell(x_t, h, c, weight_ih, weight_hh, bias_ih, bias_hh)
        outputs.append(h)
    return torch.stack(outputs), h, c


# ---------------------------------------------------------------------------
# What goes in: checked at the public edge, on every path
# ---------------------------------------------------------------------------

def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor shaped {tuple(value.shape)} on {value.device}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


def check_state(state, layers: int, batch: int, hidden: int, device: torch.device, dtype: torch.dtype) -> State:
    """The state as the layers take it: one (h, c) pair per layer, each (batch, hidden), on device, in dtype.

    Anything else is a ValueError that names the layer, the expected shape and what came.
    Harmless differences are mended, not refused: another floating dtype is converted
    (float64 gives exactly what its float32 values give) and non-contiguous views are copied.
    """
    if not isinstance(state, (tuple, list)) or len(state) != layers:
        raise ValueError(f"the state must hold one (h, c) pair per layer ({layers}), each tensor shaped "
                         f"(batch, hidden) = ({batch}, {hidden}); got {_describe(state)}")
    checked = []
    for k, pair in enumerate(state):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"the state of layer {k} must be a pair (h, c) of tensors shaped (batch, hidden) = "
                             f"({batch}, {hidden}); got {_describe(pair)}")
        tensors = []
        for name, t in zip("hc", pair):
            if not isinstance(t, torch.Tensor) or t.shape != (batch, hidden) or not t.is_floating_point():
                raise ValueError(f"{name} of layer {k} must be a floating-point tensor shaped (batch, hidden) = "
                                 f"({batch}, {hidden}); got {_describe(t)}")
            if t.device != device:
                raise ValueError(f"{name} of layer {k} is on {t.device}, but the model is on {device}")
            tensors.append(t.to(dtype).contiguous())
        checked.append(tuple(tensors))
    return tuple(checked)


def _check_batch(batch: int, time: int | None = None) -> None:
    if batch < 1:
        raise ValueError("the batch is empty: at least one stream is needed")
    if time is not None and time < 1:
        raise ValueError("the input has no time steps: at least one character is needed")


# ---------------------------------------------------------------------------
# The stack and the language model
# ---------------------------------------------------------------------------

class StackedLSTM(nn.Module):
    """Layers of LSTM with dropout between them; parameters named like nn.LSTM."""

    def __init__(self, input_size: int, hidden_size: int, layers: int, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.layers, self.dropout = input_size, hidden_size, layers, dropout
        # A run-time choice, not architecture: torch.bfloat16 (or torch.float16) runs the
        # matrix products in that dtype (faster on CPUs with avx512_bf16 and on GPUs); None is float32.
        self.matmul_dtype: torch.dtype | None = None
        for k in range(layers):
            in_size = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, in_size)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's own initialisation
        H = self.hidden_size
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)
            for k in range(self.layers):
                # Forget-gate bias 1 (split over the two bias vectors) so that the
                # cell starts out remembering instead of forgetting (Jozefowicz et al. 2015).
                getattr(self, f"bias_ih_l{k}")[H : 2 * H].fill_(0.5)
                getattr(self, f"bias_hh_l{k}")[H : 2 * H].fill_(0.5)

    def layer_weights(self, k: int):
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def initial_state(self, batch_size: int, device=None, dtype=None) -> State:
        zeros = lambda: torch.zeros(batch_size, self.hidden_size, device=device, dtype=dtype)  # noqa: E731
        return tuple((zeros(), zeros()) for _ in range(self.layers))

    def forward(self, x: torch.Tensor, state: State | None = None, reference: bool = False):
        """x (T, B, I) time-major -> outputs (T, B, H) and the new state."""
        weight = self.weight_ih_l0
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != self.input_size or not x.is_floating_point():
            raise ValueError(f"the input must be a floating-point tensor shaped (time, batch, input) = "
                             f"(T, B, {self.input_size}); got {_describe(x)}")
        if x.device != weight.device:
            raise ValueError(f"the input is on {x.device}, but the model is on {weight.device}")
        _check_batch(x.shape[1], x.shape[0])
        x = x.to(weight.dtype)
        if state is None:
            state = self.initial_state(x.shape[1], device=x.device, dtype=x.dtype)
        else:
            state = check_state(state, self.layers, x.shape[1], self.hidden_size, weight.device, weight.dtype)
        new_state = []
        for k in range(self.layers):
            if k > 0 and self.dropout > 0:
                x = F.dropout(x, self.dropout, self.training)
            h, c = state[k]
            if reference:
                x, h, c = lstm_layer_reference(x, h, c, *self.layer_weights(k))
            else:
                x, h, c = lstm_layer(x, h, c, *self.layer_weights(k), low_precision=self.matmul_dtype)
            new_state.append((h, c))
        return x, tuple(new_state)


class CharLSTM(nn.Module):
    """Character language model: embedding -> stacked LSTM -> linear to the vocabulary."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        self.lstm = StackedLSTM(config.embed_size, config.hidden_size, config.layers, config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.dropout = config.dropout

    def forward(self, tokens: torch.Tensor, state: State | None = None, reference: bool = False):
        """tokens (B, T) int64 -> logits (B, T, vocab_size) and the new state."""
        self._check_tokens(tokens, 2, "(batch, time)")      # the stack checks batch and time
        try:
            x = self.embedding(tokens.t())                               # (T, B, E)
        except IndexError:
            raise ValueError(f"tokens must be ids in [0, {self.config.vocab_size}); got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}") from None
        out, state = self.lstm(x, state, reference=reference)           # (T, B, H)
        out = F.dropout(out, self.dropout, self.training)
        logits = self.head(out)                                          # (T, B, V)
        return logits.transpose(0, 1), state

    def _check_tokens(self, tokens, dims: int, shape: str) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.dtype == torch.bool
                or tokens.is_floating_point() or tokens.is_complex()):
            raise ValueError(f"tokens must be an integer tensor shaped {shape}; got {_describe(tokens)}")
        if tokens.device != self.head.weight.device:
            raise ValueError(f"the tokens are on {tokens.device}, but the model is on {self.head.weight.device}")

    def initial_state(self, batch_size: int, device=None) -> State:
        p = self.head.weight
        return self.lstm.initial_state(batch_size, device=device or p.device, dtype=p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State | None) -> State | None:
    """Cut the graph between chunks while keeping the values: truncated BPTT."""
    if state is None:
        return None
    return tuple((h.detach(), c.detach()) for h, c in state)


class Stepper:
    """One character at a time, for generation: the same function as CharLSTM.forward.

    Weights are prepared once: the embedding is folded into layer 0's input
    projection (a one-hot input times E times W_ih0^T is one row of E W_ih0^T),
    so layer 0 costs a row lookup and one recurrent product per character. Each
    layer's pointwise work is the chunk loops' own step function, prepared once
    per batch size on buffers the stepper owns (as the loop prepares it once per
    chunk); what it returns are fresh tensors, so states a caller keeps are never
    overwritten. One stepper serves one thread at a time. It copies nothing from
    the model's later weight updates: make a new one after training further.
    """

    @torch.no_grad()
    def __init__(self, model: CharLSTM):
        lstm = model.lstm
        self.model, self.hidden_size, self.vocab_size = model, lstm.hidden_size, model.config.vocab_size
        w_ih0, _, b_ih0, b_hh0 = lstm.layer_weights(0)
        self.token_gates = torch.addmm(b_ih0 + b_hh0, model.embedding.weight, w_ih0.t())  # (V, 4H)
        self.layers = []
        for k in range(lstm.layers):
            w_ih, w_hh, b_ih, b_hh = lstm.layer_weights(k)
            self.layers.append((w_ih.detach().clone(), w_hh.detach().clone(), (b_ih + b_hh).detach()))
        self.head_weight_t = model.head.weight.t().contiguous()
        self.head_bias = model.head.bias.detach().clone()
        self._prepared: dict[int, list] = {}

    def _steps(self, N: int) -> list:
        """Per layer, for N streams: the products (weights packed for N rows where that pays, as
        the chunk loop packs them), the bias rows, and the step function bound to buffers the
        stepper owns (pre-activations, c_prev, h, c)."""
        if N not in self._prepared:
            H, like = self.hidden_size, self.token_gates
            layers = []
            for k, (w_ih, w_hh, bias) in enumerate(self.layers):
                pre, c_prev, hs, cs = like.new_empty(1, N, 4 * H), like.new_empty(N, H), like.new_empty(1, N, H), \
                    like.new_empty(1, N, H)
                input_product = None if k == 0 else recurrent_product(w_ih, N, transposed_copy=True)
                hidden_product = recurrent_product(w_hh, N, overwrite_add=True, transposed_copy=True)
                layers.append((input_product, hidden_product, bias.expand(N, -1).contiguous(),
                               pre[0], c_prev, hs[0], cs[0], forward_steps(pre, c_prev, hs, cs)))
            self._prepared[N] = layers
        return self._prepared[N]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """tokens (N,) int64 -> logits (N, V) and the new state."""
        H = self.hidden_size
        self.model._check_tokens(tokens, 1, "(batch,)")
        N = len(tokens)
        _check_batch(N)
        weight = self.token_gates
        state = check_state(state, len(self.layers), N, H, weight.device, weight.dtype)
        new_state = []
        x = None
        for k, (input_product, hidden_product, bias_rows, pre, c_prev, h_out, c_out, step) in \
                enumerate(self._steps(N)):
            h, c = state[k]
            if k == 0:
                try:
                    torch.index_select(self.token_gates, 0, tokens, out=pre)      # (N, 4H)
                except IndexError:
                    raise ValueError(f"tokens must be ids in [0, {self.vocab_size}); got values from "
                                     f"{int(tokens.min())} to {int(tokens.max())}") from None
                gates = pre
            else:
                gates = input_product(x, bias_rows)
            gates = hidden_product(h, gates)       # may be written in place, or a new tensor
            if step.g_scale != 1:
                gates[:, 2 * H : 3 * H].mul_(step.g_scale)      # as the step function expects (see forward_steps)
            c_prev.copy_(c)
            step(0, gates)
            x, c = h_out.clone(), c_out.clone()
            new_state.append((x, c))
        return torch.addmm(self.head_bias, x, self.head_weight_t), tuple(new_state)
