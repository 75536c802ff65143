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
  between layers (CharLSTM adds one before the output layer), per step or locked for a chunk;
  DropConnect masks W_hh once per chunk; with ``residual`` each layer after the first adds its
  input to its output.
* ``CharLSTM`` is embedding -> stacked LSTM -> output layer: a linear layer, or for large
  vocabularies an adaptive softmax (``AdaptiveHead``). Embedding and input dropout act on its way in.
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

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .fused_lstm import lstm_layer
from .heads import AdaptiveHead, linear

State = tuple[tuple[torch.Tensor, torch.Tensor], ...]


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
    """Layers of LSTM with dropout between them; parameters named like nn.LSTM.

    With ``residual``, each layer after the first adds its (dropped-out) input to its output:
    layer k >= 1 gives x + LSTM_k(x), so the upper layer learns a correction to the lower
    one's features instead of a replacement for them, and gradients reach the lower layer past
    it. The state a layer carries (h, c) is its LSTM's own; only what it hands upward has the sum.
    """

    def __init__(self, input_size: int, hidden_size: int, layers: int, dropout: float = 0.0,
                 locked_dropout: bool = False, weight_dropout: float = 0.0, residual: bool = False):
        super().__init__()
        self.input_size, self.hidden_size, self.layers, self.dropout = input_size, hidden_size, layers, dropout
        self.locked_dropout, self.weight_dropout, self.residual = locked_dropout, weight_dropout, residual
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
                # Each gate's recurrent matrix orthogonal: it neither shrinks nor stretches the state it
                # reads, so gradients through many steps start out neither vanishing nor exploding. On
                # tiny-shakespeare (2x512, 2,000 steps, one-thread pair side by side) 0.009 nats/char
                # better than the uniform draw, ahead from step 1,200 on (benchmarks/README.md).
                w_hh = getattr(self, f"weight_hh_l{k}")
                for gate in range(4):
                    nn.init.orthogonal_(w_hh[gate * H : (gate + 1) * H])

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
            if k > 0:
                x = dropout(x, self.dropout, self.training, self.locked_dropout)
            x, h, c = self._layer(k, x, *state[k], reference)
            new_state.append((h, c))
        return x, tuple(new_state)

    def _layer(self, k: int, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, reference: bool):
        """Layer k over the chunk: its output (plus its input from the second layer on, where residual), h, c.
        (The fast path adds the input inside the layer: in the memory of its output, and in the backward pass
        into the input's gradient.)"""
        w_ih, w_hh, b_ih, b_hh = self.layer_weights(k)
        if self.training and self.weight_dropout > 0:
            # DropConnect (Wan et al. 2013; AWD-LSTM): one mask on W_hh for the whole chunk, so
            # every step of it loses the same recurrent connections. Masking the matrix once
            # costs one elementwise product per chunk, not one per step.
            w_hh = F.dropout(w_hh, self.weight_dropout, True)
        residual = self.residual and k > 0
        if reference:
            out, h, c = lstm_layer_reference(x, h, c, w_ih, w_hh, b_ih, b_hh)
            return (out + x if residual else out), h, c
        return lstm_layer(x, h, c, w_ih, w_hh, b_ih, b_hh, low_precision=self.matmul_dtype, residual=residual)


def dropout(x: torch.Tensor, rate: float, training: bool, locked: bool) -> torch.Tensor:
    """Dropout on a time-major (T, B, F) tensor. Locked (variational, Gal & Ghahramani 2016):
    one mask per stream and feature, the same at every step of the chunk, so a unit dropped
    is dropped for the whole stretch of text instead of flickering from step to step."""
    if not training or rate == 0:
        return x
    if not locked:
        if x.device.type != "cpu":
            return F.dropout(x, rate, True)
        # On the CPU, F.dropout's Bernoulli draw costs nearly twice a uniform draw (forward and backward
        # of a (50, 64, 512) dropout, two a step: 13.8 ms against 7.7 on an AMD EPYC with AVX512-BF16,
        # interleaved); the same mask, keep with probability 1 - rate.
        mask = torch.rand(x.shape, dtype=x.dtype).ge_(rate).mul_(1 / (1 - rate))
        return x * mask
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - rate).div_(1 - rate)
    return x * mask


class CharLSTM(nn.Module):
    """Character language model: embedding -> stacked LSTM -> output layer over the vocabulary.

    The output layer is a linear layer ("full" head), or for large vocabularies an adaptive
    softmax ("adaptive", see AdaptiveHead); either way ``forward`` without targets gives logits
    whose softmax is the model's exact distribution (the adaptive head's are log-probabilities),
    so evaluation, sampling, temperature, top-k and top-p treat both alike.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.resolve_head()
        config.validate()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size)
        self.lstm = StackedLSTM(config.embed_size, config.hidden_size, config.layers, config.dropout,
                                config.locked_dropout, config.weight_dropout, config.residual)
        if config.head == "adaptive":
            self.head = AdaptiveHead(config.hidden_size, config.vocab_size, config.cutoffs, config.head_div)
        else:
            self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.dropout = config.dropout
        if config.style_names:
            # One learned vector per style, added to every character's embedding (see _embed). Made last, so
            # the rest of the model draws the same initial weights as it would without styles.
            self.style_embedding = nn.Embedding(len(config.style_names), config.embed_size)

    def forward(self, tokens: torch.Tensor, state: State | None = None, reference: bool = False,
                targets: torch.Tensor | None = None, reduction: str = "mean", styles: torch.Tensor | None = None):
        """tokens (B, T) int64 -> logits (B, T, vocab_size) and the new state.

        styles, for a model with styles: the style id of each token (B, T) or of each row (B,), -1 for
        none; None reads every row with no style.

        With targets (B, T), the mean cross-entropy over them comes back instead of the logits:
        training's path, which lets the adaptive head skip the clusters no target is in, and runs
        the output layer's products in the LSTM's low precision (``lstm.matmul_dtype``) where set.
        reduction "none" gives each target's negative log-likelihood instead, shaped (B, T).
        """
        out, state = self.lstm(self._embed(tokens, styles), state, reference=reference)   # (T, B, H)
        out = dropout(out, self.dropout, self.training, self.config.locked_dropout)
        if targets is None:
            return self.logits(out).transpose(0, 1), state
        return self._loss(out, targets, reduction), state

    def read(self, tokens: torch.Tensor, state: State | None = None, styles: torch.Tensor | None = None):
        """Read a prompt: tokens (B, T) -> logits of the last position only (B, vocab_size), new state.

        Same state as ``forward``, but the output layer runs on the last position alone: a long
        prompt read by a large head (the adaptive one computes every class) costs B x V, not B x T x V.
        """
        out, state = self.lstm(self._embed(tokens, styles), state)
        out = dropout(out, self.dropout, self.training, self.config.locked_dropout)[-1]
        return self.logits(out), state

    def read_scored(self, tokens: torch.Tensor, state: State | None = None, styles: torch.Tensor | None = None):
        """Read a prompt and keep what each position predicted: tokens (B, T) -> the logits of every
        position but the last (B, T-1, V), those of the last (B, V) exactly as ``read`` gives them (the
        output layer runs on that one row alone, as there), and the new state."""
        out, state = self.lstm(self._embed(tokens, styles), state)
        out = dropout(out, self.dropout, self.training, self.config.locked_dropout)
        return self.logits(out[:-1]).transpose(0, 1), self.logits(out[-1]), state

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        """The output layer: LSTM outputs (..., H) -> (..., V) logits (log-probabilities for the adaptive head)."""
        if isinstance(self.head, AdaptiveHead):
            return self.head.log_probs(out)
        return self.head(out)

    def _loss(self, out: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        if not isinstance(targets, torch.Tensor) or targets.shape != out.shape[1::-1]:
            raise ValueError(f"targets must be shaped like the tokens, (batch, time) = {tuple(out.shape[1::-1])}; "
                             f"got {_describe(targets)}")
        flat_targets = targets.t().reshape(-1)
        flat = out.reshape(-1, out.shape[-1])
        low = self.lstm.matmul_dtype
        # The head's products in the LSTM's low precision, its softmax and loss in float32; float16
        # on a CPU stays float32 (CPUs emulate it).
        if low == torch.float16 and flat.device.type == "cpu":
            low = None
        if isinstance(self.head, AdaptiveHead):
            nll = self.head.loss(flat, flat_targets, low, reduction)
        else:
            nll = F.cross_entropy(linear(flat, self.head.weight, self.head.bias, low), flat_targets,
                                  reduction=reduction)
        return nll if reduction == "mean" else nll.reshape(targets.shape[::-1]).t()

    def _embed(self, tokens: torch.Tensor, styles: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) -> the LSTM's input (T, B, E): each character's embedding plus its style's (where
        the model has styles and styles are given), with embedding and input dropout in training."""
        self._check_tokens(tokens, 2, "(batch, time)")      # the stack checks batch and time
        cfg = self.config
        weight = self.embedding.weight
        if self.training and cfg.embed_dropout > 0:
            # Embedding dropout (Gal & Ghahramani 2016): a character loses its whole embedding for
            # the chunk, wherever it occurs, so the model cannot lean on any one character.
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1 - cfg.embed_dropout)
            weight = weight * keep.div_(1 - cfg.embed_dropout)
        try:
            x = F.embedding(tokens.t(), weight)                          # (T, B, E)
        except IndexError:
            raise ValueError(f"tokens must be ids in [0, {cfg.vocab_size}); got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}") from None
        if styles is not None:
            x = x + F.embedding(self._style_rows(styles, tokens.shape).t(), style_table(self))
        return dropout(x, cfg.input_dropout, self.training, cfg.locked_dropout)

    def _style_rows(self, styles, shape) -> torch.Tensor:
        """styles (B,) or (B, T), checked, as (B, T) rows into style_table (-1, no style, the last row)."""
        count = len(self.config.style_names)
        if not count:
            raise ValueError("this model was trained without styles; give styles=None")
        if (not isinstance(styles, torch.Tensor) or styles.dtype == torch.bool or styles.is_floating_point()
                or styles.is_complex() or tuple(styles.shape) not in (tuple(shape), tuple(shape[:1]))):
            raise ValueError(f"styles must be an integer tensor shaped (batch,) or (batch, time) = {tuple(shape)}; "
                             f"got {_describe(styles)}")
        if styles.numel() and (int(styles.min()) < -1 or int(styles.max()) >= count):
            raise ValueError(f"styles must be ids in [0, {count}) or -1 (none); got values from {int(styles.min())} "
                             f"to {int(styles.max())}")
        styles = torch.where(styles < 0, count, styles).to(self.embedding.weight.device)
        return styles.expand(shape[::-1]).t() if styles.dim() == 1 else styles

    def _check_tokens(self, tokens, dims: int, shape: str) -> None:
        if (not isinstance(tokens, torch.Tensor) or tokens.dim() != dims or tokens.dtype == torch.bool
                or tokens.is_floating_point() or tokens.is_complex()):
            raise ValueError(f"tokens must be an integer tensor shaped {shape}; got {_describe(tokens)}")
        if tokens.device != self.embedding.weight.device:
            raise ValueError(f"the tokens are on {tokens.device}, but the model is on {self.embedding.weight.device}")

    def initial_state(self, batch_size: int, device=None) -> State:
        p = self.embedding.weight
        return self.lstm.initial_state(batch_size, device=device or p.device, dtype=p.dtype)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def style_table(model: CharLSTM) -> torch.Tensor:
    """The style embeddings (S, E) with a row of zeros after them: the row of "no style" (-1)."""
    return F.pad(model.style_embedding.weight, (0, 0, 0, 1))


def detach_state(state: State | None) -> State | None:
    """Cut the graph between chunks while keeping the values: truncated BPTT."""
    if state is None:
        return None
    return tuple((h.detach(), c.detach()) for h, c in state)
