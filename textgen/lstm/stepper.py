"""Generation's step: one character at a time through the stacked LSTM, the same function as
CharLSTM.forward (tested against it), with the weights prepared once and the chunk loop's own step
function reused.
"""
from __future__ import annotations

import torch

from .products import recurrent_product, row_stable_product
from .steps import forward_steps
from .heads import AdaptiveHead
from .model import CharLSTM, State, _check_batch, check_state, style_table
from .rows_step import RowsStep


# see Stepper._padded_head
HEAD_ROWS = 4


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

    rows_agree asks for products whose every row has the same bits at any batch size
    (``row_stable_product``), for a server whose batch grows and shrinks with its
    requests; ``self.rows_agree`` says whether this model, device and CPU have them
    (a full output layer, float32 on a CPU where oneDNN packs), checked on batches of up
    to most_rows (and 17) as the stepper is made. Without it, the
    fastest product for each batch size is used, as generation at one size wants.
    """

    @torch.no_grad()
    def __init__(self, model: CharLSTM, rows_agree: bool = False, most_rows: int = 17):
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
        # The whole step in one C call where the kernel runs (rows_step.py): its rows agree by construction.
        self.rows_step = RowsStep.for_weights(self.layers, None if self.head_bias is None else model.head.weight.detach(),
                                              self.head_bias, self.residual)
        self.stable, self.rows_agree = None, False
        if rows_agree and self.head_weight_t is not None and self.rows_step is not None:
            self.rows_agree = self._rows_agree(most_rows)      # checked all the same, as the products below are
            if not self.rows_agree:
                self.rows_step = None
        # Otherwise products whose rows agree at every batch size: per layer one (layer 0: h @ W_hh^T + its
        # token's row; above: [x, h] @ [W_ih, W_hh]^T + bias, one call where the fast path makes two, as a call
        # costs more than its arithmetic at a few rows), and the output layer's.
        if rows_agree and self.head_weight_t is not None and not self.rows_agree:
            products = [row_stable_product(w_hh) if k == 0 else row_stable_product(torch.cat([w_ih, w_hh], 1), bias)
                        for k, (w_ih, w_hh, bias) in enumerate(self.layers)]
            if all(product is not None for product in products):
                for head in (self._padded_head, row_stable_product(model.head.weight, model.head.bias)):
                    self.stable = (products, head)
                    if self._rows_agree(most_rows):
                        break
                    self.stable = None
            self._prepared = {}             # the check's buffers are not the caller's sizes
            self.rows_agree = self.stable is not None

    def _padded_head(self, x: torch.Tensor) -> torch.Tensor:
        """The output layer by MKL with at least HEAD_ROWS rows: from 4 rows up MKL gave a row the same bits
        at every count measured, and at 1 to 3 others (its one-row path is cheaper still, but apart)."""
        n = len(x)
        if n < HEAD_ROWS:
            x = torch.cat([x, x.new_zeros(HEAD_ROWS - n, x.shape[1])])
        return torch.addmm(self.head_bias, x, self.head_weight_t)[:n]

    def _rows_agree(self, most: int) -> bool:
        """Whether each row's logits and state come out with the same bits at every batch size up to most
        (those a server of `most` rows meets first, and a few beyond): the measured property the stable
        products promise, checked here on this model and this CPU."""
        sizes = sorted({n for n in (1, 2, 3, 4, 5, 8, 16, 17, most - 1, most) if 1 <= n <= max(most, 17)})
        g = torch.Generator().manual_seed(0)
        like, N = self.token_gates, max(sizes)
        state = tuple((torch.randn(N, self.hidden_size, generator=g).to(like), torch.randn(N, self.hidden_size,
                       generator=g).to(like)) for _ in self.layers)
        tokens = torch.randint(0, self.vocab_size, (N,), generator=g).to(like.device)
        whole = self(tokens, state)
        for n in sizes[:-1]:
            part = self(tokens[:n].clone(), tuple((h[:n].clone(), c[:n].clone()) for h, c in state))
            if not torch.equal(part[0], whole[0][:n]) or not all(
                    torch.equal(a, b[:n]) for pair, whole_pair in zip(part[1], whole[1]) for a, b in zip(pair, whole_pair)):
                return False
        return True

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
                if self.stable is not None:
                    input_product, hidden_product = None, self.stable[0][k]
                else:
                    input_product = None if k == 0 else recurrent_product(w_ih, N, transposed_copy=True)
                    hidden_product = recurrent_product(w_hh, N, overwrite_add=True, transposed_copy=True)
                layers.append((input_product, hidden_product, bias.expand(N, -1).contiguous(),
                               pre[0], c_prev, hs[0], cs[0], *forward_steps(pre, c_prev, hs, cs)))
            self._prepared[N] = layers
        return self._prepared[N]

    def _layer0_gates(self, tokens: torch.Tensor, styles: torch.Tensor | None, out: torch.Tensor | None = None):
        """Layer 0's input part for these tokens (and styles): rows of the folded table, (N, 4H)."""
        try:
            pre = torch.index_select(self.token_gates, 0, tokens, out=out) if out is not None else \
                self.token_gates.index_select(0, tokens)
        except IndexError:
            raise ValueError(f"tokens must be ids in [0, {self.vocab_size}); got values from "
                             f"{int(tokens.min())} to {int(tokens.max())}") from None
        if styles is not None:
            pre.add_(self.style_gates.index_select(0, self.model._style_rows(styles, tokens.shape)))
        return pre

    @property
    def decodes(self) -> bool:
        """Whether decode runs here: the C step with a full output layer (CPU float32, the kernel built)."""
        return self.rows_step is not None and self.rows_step.vocab_size > 0

    @torch.no_grad()
    def decode(self, logits: torch.Tensor, state: State, styles: torch.Tensor | None, temperature, top_k, top_p,
               u: torch.Tensor, ends: list[int], watch: list[bool]) -> tuple[torch.Tensor, torch.Tensor, State] | None:
        """Many characters in one C call, each what generation's draw (sampling.next_tokens) and then this
        stepper's __call__ give, in that order: for N rows (logits (N, V), the state, the styles as __call__
        takes them), up to len(u) // N characters, the k-th drawn at u[k * N : (k + 1) * N]. It stops early
        after a step where a row whose watch is true drew one of the ids in ends (the last character of a
        stop string). Returns (ids (taken, N), the logits after them, the new state), or None where it does
        not run (not decodes, settings it does not read): nothing was drawn."""
        N, H = logits.shape[0], self.hidden_size
        if not self.decodes or logits.dim() != 2 or N == 0 or len(u) % N:
            return None
        _check_batch(N)
        known = self.rows_step.returned(state, N)
        if not known:
            state = check_state(state, len(self.layers), N, H, self.token_gates.device, self.token_gates.dtype)
        style_rows = None if styles is None else \
            self.style_gates.index_select(0, self.model._style_rows(styles, (N,)))
        return self.rows_step.decode(len(u) // N, self.token_gates, style_rows, logits, state, known, temperature,
                                     top_k, top_p, u, ends, watch)

    def __call__(self, tokens: torch.Tensor, state: State, styles: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, State]:
        """tokens (N,) int64 -> logits (N, V) and the new state; styles (N,) a style id per row (-1: none),
        for a model with styles."""
        if torch.is_grad_enabled():           # (a check, not a decorator: generation calls this per character)
            with torch.no_grad():
                return self(tokens, state, styles)
        H = self.hidden_size
        self.model._check_tokens(tokens, 1, "(batch,)")
        N = len(tokens)
        _check_batch(N)
        weight = self.token_gates
        if self.rows_step is not None:
            known = self.rows_step.returned(state, N)   # what it returned last, untouched, needs no checking
            if not known:
                state = check_state(state, len(self.layers), N, H, weight.device, weight.dtype)
            logits, x, new_state = self.rows_step(self._layer0_gates(tokens, styles), state, known)
            return (self.model.logits(x) if logits is None else logits), new_state
        state = check_state(state, len(self.layers), N, H, weight.device, weight.dtype)
        new_state = []
        x = None
        for k, (input_product, hidden_product, bias_rows, pre, c_prev, h_out, c_out, step, g_scale) in \
                enumerate(self._steps(N)):
            h, c = state[k]
            if k == 0:
                self._layer0_gates(tokens, styles, out=pre)                         # (N, 4H)
                gates = hidden_product(h, pre)      # may be written in place, or a new tensor
            elif input_product is None:             # the stable products: one call for both
                gates = hidden_product(torch.cat([x, h], 1))
            else:
                gates = hidden_product(h, input_product(x, bias_rows))
            if g_scale != 1:
                gates[:, 2 * H : 3 * H].mul_(g_scale)           # as the step function expects (see forward_steps)
            c_prev.copy_(c)
            step(0, gates)
            h, c = h_out.clone(), c_out.clone()
            x = h + x if self.residual and k > 0 else h
            new_state.append((h, c))
        if self.stable is not None:
            return self.stable[1](x), tuple(new_state)
        if self.head_weight_t is None:
            return self.model.logits(x), tuple(new_state)
        return torch.addmm(self.head_bias, x, self.head_weight_t), tuple(new_state)
