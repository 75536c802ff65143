"""Generation's step: one character at a time through the stacked LSTM, the same function as
CharLSTM.forward (tested against it), with the weights prepared once and the chunk loop's own step
function reused.
"""
from __future__ import annotations

import torch

from .fused_lstm import forward_steps, recurrent_product
from .heads import AdaptiveHead
from .model import CharLSTM, State, _check_batch, check_state, style_table


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
        self.residual = lstm.residual
        w_ih0, _, b_ih0, b_hh0 = lstm.layer_weights(0)
        self.token_gates = torch.addmm(b_ih0 + b_hh0, model.embedding.weight, w_ih0.t())  # (V, 4H)
        # A style's embedding is added to the character's, so its share of layer 0's gates is one row too.
        self.style_gates = style_table(model) @ w_ih0.t() if model.config.style_names else None  # (S + 1, 4H)
        self.layers = []
        for k in range(lstm.layers):
            w_ih, w_hh, b_ih, b_hh = lstm.layer_weights(k)
            self.layers.append((w_ih.detach().clone(), w_hh.detach().clone(), (b_ih + b_hh).detach()))
        if isinstance(model.head, AdaptiveHead):
            self.head_weight_t = self.head_bias = None
        else:
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
                               pre[0], c_prev, hs[0], cs[0], *forward_steps(pre, c_prev, hs, cs)))
            self._prepared[N] = layers
        return self._prepared[N]

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, state: State, styles: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, State]:
        """tokens (N,) int64 -> logits (N, V) and the new state; styles (N,) a style id per row (-1: none),
        for a model with styles."""
        H = self.hidden_size
        self.model._check_tokens(tokens, 1, "(batch,)")
        N = len(tokens)
        _check_batch(N)
        weight = self.token_gates
        state = check_state(state, len(self.layers), N, H, weight.device, weight.dtype)
        new_state = []
        x = None
        for k, (input_product, hidden_product, bias_rows, pre, c_prev, h_out, c_out, step, g_scale) in \
                enumerate(self._steps(N)):
            h, c = state[k]
            if k == 0:
                try:
                    torch.index_select(self.token_gates, 0, tokens, out=pre)      # (N, 4H)
                except IndexError:
                    raise ValueError(f"tokens must be ids in [0, {self.vocab_size}); got values from "
                                     f"{int(tokens.min())} to {int(tokens.max())}") from None
                if styles is not None:
                    rows = self.model._style_rows(styles, tokens.shape)
                    pre.add_(self.style_gates.index_select(0, rows))
                gates = pre
            else:
                gates = input_product(x, bias_rows)
            gates = hidden_product(h, gates)       # may be written in place, or a new tensor
            if g_scale != 1:
                gates[:, 2 * H : 3 * H].mul_(g_scale)           # as the step function expects (see forward_steps)
            c_prev.copy_(c)
            step(0, gates)
            h, c = h_out.clone(), c_out.clone()
            x = h + x if self.residual and k > 0 else h
            new_state.append((h, c))
        if self.head_weight_t is None:
            return self.model.logits(x), tuple(new_state)
        return torch.addmm(self.head_bias, x, self.head_weight_t), tuple(new_state)
