"""ModelConfig: the only description of the architecture (a checkpoint stores it, and loading rebuilds
the model from it), each field a setting declared once with its default, help and range; and the rules
that complete it (which output layer a vocabulary gets, the adaptive head's cutoffs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..settings import parse_int_list, setting


# The regularisers' rates, each a probability in [0, 1): what they drop and how often.
DROPOUT_FIELDS = {
    "dropout": "between layers and before the output layer",
    "input_dropout": "on the embedded characters going into layer 0",
    "embed_dropout": "whole characters: an embedding row zeroed for a chunk",
    "weight_dropout": "DropConnect on the recurrent weights W_hh, one mask per chunk",
}
HEADS = ("full", "adaptive")


def narrowest_width(hidden_size: int, head_div: float, clusters: int) -> int:
    """The adaptive head's last cluster's projection width: hidden_size / head_div ** clusters, rounded
    down (0 where the power overflows a float: a head_div of 1e308 leaves no width at all)."""
    try:
        return int(hidden_size // head_div ** clusters)
    except OverflowError:
        return 0


@dataclass
class ModelConfig:
    """The architecture, and the only description of it: a checkpoint stores asdict(config). Each
    field but vocab_size is a setting declared once, with the help train.py's flag shows."""
    vocab_size: int
    embed_size: int = setting(64, "character embedding size", group="model")
    hidden_size: int = setting(512, "LSTM units per layer", group="model")
    layers: int = setting(2, "stacked LSTM layers", group="model")
    dropout: float = setting(0.2, "dropout between layers and before the output", group="regularisation")
    locked_dropout: bool = setting(False, "dropout masks held for a whole chunk (variational dropout) instead of "
                                   "drawn per character", group="regularisation", toggle=True)
    input_dropout: float = setting(0.0, "dropout on the embedded characters going into the first layer",
                                   group="regularisation")
    embed_dropout: float = setting(0.0, "chance that a character loses its whole embedding for a chunk",
                                   group="regularisation")
    weight_dropout: float = setting(0.0, "DropConnect on the recurrent weights, one mask per chunk",
                                    group="regularisation")
    residual: bool = setting(True, "layers after the first add their input to their output (a residual "
                             "connection; see StackedLSTM)", group="model", toggle=True)
    head: str = setting("auto", "output layer: a full softmax, or an adaptive softmax (fast for large "
                        "vocabularies; auto: adaptive from a few thousand characters, or where --cutoffs are given)",
                        group="model", choices=("auto", "full", "adaptive"))
    cutoffs: tuple = setting((), "the adaptive head's cluster boundaries in frequency ranks (default: 256, 1024, "
                             "4096, ...)", group="model", parse=parse_int_list, metavar="N,N,...", shown=None)
    head_div: float = setting(4.0, "the adaptive head narrows each rarer cluster's projection by this factor",
                              group="model")
    # The styles the model learnt, one per file of a corpus trained with --styles (styles.py), in id
    # order; () for a model without styles, as every checkpoint written before styles is.
    style_names: tuple = ()

    def resolve_head(self) -> None:
        """Turn head "auto" into the head this vocabulary gets, and give an adaptive head its cutoffs."""
        if self.head == "auto":
            self.head = "adaptive" if self.vocab_size >= ADAPTIVE_FROM or self.cutoffs else "full"   # cutoffs ask for it
        if self.head == "adaptive" and not self.cutoffs:
            cutoffs = adaptive_cutoffs(self.vocab_size)
            while len(cutoffs) > 1 and narrowest_width(self.hidden_size, self.head_div, len(cutoffs)) < 1:
                cutoffs = cutoffs[:-1]          # a small model: fewer, larger clusters, each of some width
            self.cutoffs = cutoffs
        self.cutoffs = tuple(self.cutoffs)

    def validate(self, vocabulary_known: bool = True) -> None:
        """ValueError for a setting out of range; vocabulary_known=False (a command line, before the
        text is read) skips the checks that need the vocabulary's size."""
        for name in ("vocab_size", "embed_size", "hidden_size", "layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in DROPOUT_FIELDS:
            rate = getattr(self, name)
            if not (isinstance(rate, (int, float)) and 0.0 <= rate < 1.0):
                raise ValueError(f"{name} must be in [0, 1), got {rate}")
        if self.head not in (*HEADS, "auto"):
            raise ValueError(f"head must be auto, {' or '.join(HEADS)}, got {self.head!r}")
        cutoffs = list(self.cutoffs)
        if cutoffs and (cutoffs != sorted(set(cutoffs)) or cutoffs[0] < 1):
            raise ValueError(f"cutoffs must be positive and increase strictly, got {cutoffs}")
        if self.head == "adaptive" and vocabulary_known:
            if not cutoffs or cutoffs[-1] >= self.vocab_size:
                raise ValueError(f"cutoffs of the adaptive head must lie below the vocabulary size "
                                 f"{self.vocab_size}, got {cutoffs}")
        if not self.head_div >= 1:
            raise ValueError(f"head_div must be 1 or more, got {self.head_div}")
        if self.head == "adaptive" and cutoffs and narrowest_width(self.hidden_size, self.head_div, len(cutoffs)) < 1:
            raise ValueError(f"head_div {self.head_div:g} leaves the last of the adaptive head's {len(cutoffs)} "
                             f"clusters no width at hidden size {self.hidden_size}; use fewer cutoffs or a "
                             f"smaller head_div")

    def num_parameters(self) -> int:
        """What CharLSTM(self).num_parameters() will be, known before anything is allocated."""
        E, H, V, L = self.embed_size, self.hidden_size, self.vocab_size, self.layers
        per_layer = 4 * H * (H + H) + 8 * H                 # layers after the first read H inputs
        lstm = 4 * H * (E + H) + 8 * H + (L - 1) * per_layer
        return V * E + lstm + self.head_parameters() + len(self.style_names) * E

    def head_parameters(self) -> int:
        H, V = self.hidden_size, self.vocab_size
        if self.head == "auto" or (self.head == "adaptive" and not self.cutoffs):
            resolved = replace(self)
            resolved.resolve_head()
            return resolved.head_parameters()
        if self.head == "full":
            return H * V + V
        bounds = [*self.cutoffs, V]
        count = H * (bounds[0] + len(bounds) - 1) + bounds[0] + len(bounds) - 1   # shortlist + one row a cluster
        for i in range(len(bounds) - 1):
            width = int(H // (self.head_div ** (i + 1)))
            count += H * width + width * (bounds[i + 1] - bounds[i])
        return count


# From this many characters on, head "auto" is the adaptive softmax (benchmarks/bench_vocab.py measures
# where it starts to pay; see benchmarks/README.md).
ADAPTIVE_FROM = 1000


def adaptive_cutoffs(vocab_size: int, first: int = 256, factor: int = 4) -> tuple:
    """Cluster boundaries for an adaptive head: a shortlist of the `first` most frequent
    characters, then clusters `factor` times larger each (256, 1024, 4096, ...)."""
    cutoffs, bound = [], first
    while bound < vocab_size:
        cutoffs.append(bound)
        bound *= factor
    return tuple(cutoffs)


# ---------------------------------------------------------------------------
# The cell: the reference
# ---------------------------------------------------------------------------
