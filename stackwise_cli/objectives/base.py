"""What every objective shares: the deterministic hash its masks are drawn from, the batch it makes, the
configured ``Objective`` one stack trains with, and ``ObjectiveKind``, the base of the one class per objective.

Every random choice is a hash of (seed, epoch, sequence id, position, stream), never a draw from a global RNG, so
a mask is a deterministic function of (sequence id, ratio, seed, epoch): two runs agree, a resumed run sees the
masks the uninterrupted run saw, a cache of hidden states computed from masked inputs stays valid, and different
sequences and epochs get different masks. Position p is masked at ratio r when u(p) < r for one uniform u per
position: the masks of one (sequence, epoch) at a lower ratio are a subset of those at a higher ratio, like one
path of the forward diffusion process.

Nothing here imports torch at load time: the recipe, the tokenizer, eval's labels, the harness and generate read
an objective's description without it; ``corrupt`` and ``loss`` import it when they run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch

# A stackwise_cli.recipe.Recipe. recipe.py imports this package (its objective names and checks), so the type is
# named here, not imported back.
Recipe = Any

# Independent streams of the hash: which positions, how each selected position is corrupted, the random
# replacement token, and the per-sequence time.
SELECT, HOW, RANDOM_TOKEN, TIME = 1, 2, 3, 4
CACHE_EPOCH = 0  # the epoch whose masks a cache of hidden states holds

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent for neighbouring inputs."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, epochs: np.ndarray, seq_ids: np.ndarray, length: int, stream: int) -> np.ndarray:
    """(B, length) floats in [0, 1), a pure function of (seed, epoch, sequence id, position, stream).
    ``length`` 1 gives one number per sequence."""
    with np.errstate(over="ignore"):
        key = _mix(np.full(len(seq_ids), seed * 8 + stream, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        key = _mix(key ^ np.asarray(epochs, dtype=np.uint64))
        key = _mix(key ^ np.asarray(seq_ids, dtype=np.uint64))  # (B,)
        x = _mix(key[:, None] ^ np.arange(length, dtype=np.uint64)[None, :])  # (B, length)
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclass
class Corrupted:
    """One batch as the model sees it."""

    inputs: torch.Tensor  # (B, T) int64: what the embedding reads
    targets: torch.Tensor  # (B, T) int64: the original tokens
    weight: torch.Tensor | None  # (B, T) bool: positions the loss counts (None: next-token on every position)
    t: torch.Tensor | None  # (B,) float32: the noise level fed to the time embedding, or None


@dataclass(frozen=True)
class Objective:
    """One objective with everything fixed: ``kind`` names its class in the registry (objectives/__init__.py);
    ``ratio`` is the mask ratio (mlm; diffusion with a fixed t), or None for a diffusion t drawn per sequence in
    ``t_range``."""

    kind: str
    seed: int
    mask_id: int | None = None
    vocab: int = 0  # random replacement tokens are drawn from [0, vocab) minus the special ids
    special_ids: tuple[int, ...] = ()  # never a random replacement (EOS, PAD, ...); the mask token never is either
    ratio: float | None = None
    t_range: tuple[float, float] = (0.15, 0.9)
    time_input: bool = False
    mask_token: float = 0.8  # mlm
    random_token: float = 0.1  # mlm

    @property
    def of(self) -> ObjectiveKind:
        from stackwise_cli.objectives import objective_kind  # the registry imports this module

        return objective_kind(self.kind)

    @property
    def causal(self) -> bool:
        return self.of.causal

    def key(self) -> str:
        """Everything the corruption of the cache epoch depends on: part of a cache's upstream."""
        return self.of.key(self)

    def excluded_ids(self) -> list[int]:
        """The ids in [0, vocab) a random replacement is never: the mask token and every special id, ascending."""
        return sorted({i for i in (self.mask_id, *self.special_ids) if i is not None and 0 <= i < self.vocab})

    def times(self, seq_ids: np.ndarray, epochs: np.ndarray) -> np.ndarray:
        """(B,) the noise level of each sequence: the fixed ratio, or uniform in ``t_range`` per (sequence, epoch)."""
        if self.ratio is not None:
            return np.full(len(seq_ids), self.ratio)
        lo, hi = self.t_range
        return lo + (hi - lo) * uniform(self.seed, epochs, seq_ids, 1, TIME)[:, 0]

    def corrupt(self, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int) -> Corrupted:
        """tokens (B, T) -> the batch the model reads. ``epochs``: one per row, or one for all."""
        return self.of.corrupt(self, tokens, seq_ids, epochs)

    def loss(self, logits: torch.Tensor, c: Corrupted, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy where this objective counts it; ``mean`` over the counted positions (0 when a batch has
        none), or their ``sum``."""
        return self.of.loss(logits, c, reduction)

    def counted(self, c: Corrupted) -> int:
        """Positions the loss counts in this batch."""
        if c.weight is None:
            return c.targets.shape[0] * (c.targets.shape[1] - 1)
        return int(c.weight.sum())


class ObjectiveKind:
    """One objective: what it is (read without torch by the recipe, eval, generate and the harness) and what it
    does to a batch (``key``, ``corrupt``, ``loss``). A new objective subclasses this in its own module and adds one
    line to the registry (objectives/__init__.py). The defaults are a masked objective's: bidirectional, scored
    through ``[MASK]``, the loss on the masked positions."""

    name: ClassVar[str]
    causal: ClassVar[bool] = False  # attends one way and predicts the next token (else both ways, through [MASK])
    needs_mask_token: ClassVar[bool] = True  # the tokenizer gets [MASK]; a mask ratio applies
    scored: ClassVar[str]  # what eval's loss after each stack measures, for its table
    headline: ClassVar[str] = "loss"  # the name of eval's headline number
    harness_scoring: ClassVar[str] = "score"  # how the harness scores a continuation: exact | score | bound
    document_likelihood: ClassVar[bool] = True  # defines a likelihood of a document (the harness's perplexities)
    scores_elbo: ClassVar[bool] = False  # eval's headline is an ELBO over a grid of noise levels t

    def problems(self, recipe: Recipe) -> list[tuple[str, str]]:
        """Cross-field checks this objective adds to the recipe's, as (key path, message)."""
        return []

    def time_input(self, recipe: Recipe) -> bool:
        """Whether every stack reads the noise level t through a time embedding (``model.time_embedding``)."""
        return False

    def ratio_per_stack(self, recipe: Recipe) -> bool:
        """Whether each planned stack has its own mask ratio, from its place in the planned rack: a cache entering
        a stack holds the tokens, not the hidden states the stack before it read; the planned rack's size is fixed
        once grown; and grow refuses a side or an insert whose stack would have no place."""
        return False

    def planned_ratio(self, recipe: Recipe, index: int) -> float | None:
        """The mask ratio of the stack at ``index`` (0 = leftmost) of the planned rack (None: no fixed ratio)."""
        return None

    def rack_ratio(self, recipe: Recipe) -> float | None:
        """The mask ratio of the whole rack trained at once (None: none, or t drawn per sequence)."""
        return None

    def readout_ratio(self, ratio: float | None) -> float | None:
        """The ratio eval reads a stack out at, given the one it trained with."""
        return ratio

    def single_pass(self, time: str) -> bool:
        """Whether generate can unmask in one pass through the rack, each stack at its own noise level."""
        return False

    def describe(self, time: str) -> str:
        """The objective as an error names it."""
        return self.name

    def key(self, o: Objective) -> str:
        parts = [o.kind, f"seed={o.seed}", f"epoch={CACHE_EPOCH}", f"mask_id={o.mask_id}"]
        if o.ratio is not None:
            parts.append(f"ratio={o.ratio}")
        else:
            parts.append(f"t=[{o.t_range[0]},{o.t_range[1]}]")
        return " ".join(parts)

    def corrupt(self, o: Objective, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int) -> Corrupted:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, c: Corrupted, reduction: str) -> torch.Tensor:
        """The cross-entropy on the selected positions only."""
        import torch.nn.functional as F

        picked = logits[c.weight].float()  # (N, V): only the counted positions reach the softmax
        if picked.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(picked, c.targets[c.weight], reduction=reduction)


def select(o: Objective, tokens: torch.Tensor, seq_ids: np.ndarray, epochs: np.ndarray | int):
    """The masked objectives' first step: (seq_ids, epochs (B,), t (B,), selected (B, T) bool numpy)."""
    B, T = tokens.shape
    seq_ids = np.asarray(seq_ids)
    epochs = np.broadcast_to(np.asarray(epochs), (B,))
    t = o.times(seq_ids, epochs)  # (B,)
    selected = uniform(o.seed, epochs, seq_ids, T, SELECT) < t[:, None]  # (B, T)
    return seq_ids, epochs, t, selected


def masked(o: Objective, inputs: torch.Tensor, tokens: torch.Tensor, t: np.ndarray, selected: np.ndarray) -> Corrupted:
    """The masked objectives' batch: the loss counts the selected positions; t goes in when the model reads it."""
    import torch

    dev = tokens.device
    weight = torch.from_numpy(selected).to(dev)
    t_in = torch.from_numpy(t.astype(np.float32)).to(dev) if o.time_input else None
    return Corrupted(inputs, tokens, weight, t_in)
