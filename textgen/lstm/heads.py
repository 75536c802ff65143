"""The adaptive output layer for large vocabularies, and the product both heads share.

A full head is CharLSTM's own nn.Linear; this module is the adaptive softmax, whose loss is written
out so that its products can run in low precision while every softmax stays float32.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .products import low_precision_mm


class AdaptiveHead(nn.Module):
    """nn.AdaptiveLogSoftmaxWithLoss over the characters in order of frequency.

    The adaptive softmax (Grave et al. 2017) gives the most frequent characters a full-width
    output and puts the rare ones in clusters behind narrower projections, so a training step
    pays for the shortlist plus the clusters its targets fall in, not for every class. It
    needs frequent classes first: ``rank[token]`` is the token's frequency rank in the
    training text (set by the trainer before the first step, then saved with the weights), so
    the tokenizer's ids stay as they are. ``log_prob`` is exact over every character.
    """

    def __init__(self, hidden_size: int, vocab_size: int, cutoffs, div_value: float):
        super().__init__()
        self.softmax = nn.AdaptiveLogSoftmaxWithLoss(hidden_size, vocab_size, list(cutoffs), div_value=div_value,
                                                     head_bias=True)
        self.register_buffer("rank", torch.arange(vocab_size))

    @torch.no_grad()
    def order_by_frequency(self, counts: torch.Tensor) -> None:
        """counts (V,) of each token in the training text; ties keep id order."""
        order = torch.sort(-counts.to(torch.float64), stable=True).indices      # token of each rank
        self.rank.copy_(torch.argsort(order))

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., H) -> log-probabilities (..., V) of every character, in token order."""
        flat = x.reshape(-1, x.shape[-1])
        by_rank = self.softmax.log_prob(flat)
        return by_rank.index_select(1, self.rank).reshape(*x.shape[:-1], -1)

    def loss(self, x: torch.Tensor, targets: torch.Tensor, low_precision: torch.dtype | None = None,
             reduction: str = "mean") -> torch.Tensor:
        """Mean negative log-likelihood of targets (N,) given x (N, H), touching only the clusters hit
        (reduction "none": each target's, shape (N,)).

        The same arithmetic as nn.AdaptiveLogSoftmaxWithLoss's forward (tested against it), written
        out so that the products can run in low_precision while every softmax stays float32."""
        softmax, ranks = self.softmax, self.rank[targets]
        shortlist = softmax.shortlist_size
        head_logp = F.log_softmax(linear(x, softmax.head.weight, softmax.head.bias, low_precision), dim=1)
        bounds = softmax.cutoffs                                   # [shortlist, ..., vocab]
        cluster = torch.bucketize(ranks, ranks.new_tensor(bounds[:-1]), right=True)     # 0: the shortlist
        in_head = torch.where(cluster == 0, ranks, shortlist + cluster - 1)
        nll = -head_logp.gather(1, in_head.unsqueeze(1)).squeeze(1)
        for i, (projection, output) in enumerate(softmax.tail):
            rows = (cluster == i + 1).nonzero().squeeze(1)
            if rows.numel() == 0:
                # No target in this cluster: its weights still join the graph (with zero gradients), so
                # that data-parallel training finds every parameter used on every rank at every step.
                nll = nll + 0.0 * (projection.weight.sum() + output.weight.sum())
                continue
            hidden = linear(x.index_select(0, rows), projection.weight, None, low_precision)
            logp = F.log_softmax(linear(hidden, output.weight, None, low_precision), dim=1)
            local = (ranks.index_select(0, rows) - bounds[i]).unsqueeze(1)
            nll = nll.index_add(0, rows, -logp.gather(1, local).squeeze(1))
        return nll.mean() if reduction == "mean" else nll


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
            low_precision: torch.dtype | None) -> torch.Tensor:
    """x @ weight^T + bias, the product in low_precision where given (the LSTM's own low-precision
    product), the bias added and the result in float32."""
    if low_precision is None:
        return F.linear(x, weight, bias)
    out = low_precision_mm(x, weight.t(), low_precision, torch.float32)
    return out if bias is None else out + bias
