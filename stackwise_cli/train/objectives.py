"""Objectives: what the model reads, what it must predict, and the loss (docs/objectives.md).

- ``clm``: causal attention; the input is the tokens; position i predicts token i+1.
- ``mlm``: bidirectional; each position is *selected* with probability ``mask.ratio``; a selected position reads
  ``[MASK]`` (80%), a random token (10%) or itself (10%); the loss is the cross-entropy on selected positions only.
- ``diffusion`` (masked diffusion, MDLM / LLaDA): bidirectional; each position reads ``[MASK]`` with probability
  t and the loss is the cross-entropy on the masked positions. t is the stack's ratio (time-as-depth) or drawn per
  sequence in [t_min, t_max] (time-as-input, and the end-to-end baseline of time-as-depth).

Every random choice is a hash of (seed, epoch, sequence id, position, stream), never a draw from a global RNG, so
a mask is a deterministic function of (sequence id, ratio, seed, epoch): two runs agree, a resumed run sees the
masks the uninterrupted run saw, a cache of hidden states computed from masked inputs stays valid, and different
sequences and epochs get different masks. Position p is masked at ratio r when u(p) < r for one uniform u per
position: the masks of one (sequence, epoch) at a lower ratio are a subset of those at a higher ratio, like one
path of the forward diffusion process.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stackwise_cli.errors import ProjectError
from stackwise_cli.recipe import Recipe
from stackwise_cli.store.manifest import Manifest

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
    weight: torch.Tensor | None  # (B, T) bool: positions the loss counts (None: clm, next-token on every position)
    t: torch.Tensor | None  # (B,) float32: the noise level fed to the time embedding, or None


@dataclass(frozen=True)
class Objective:
    """One objective with everything fixed: ``ratio`` is the mask ratio (mlm; diffusion with a fixed t), or None
    for a diffusion t drawn per sequence in ``t_range``."""

    kind: str  # clm | mlm | diffusion
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
    def causal(self) -> bool:
        return self.kind == "clm"

    def key(self) -> str:
        """Everything the corruption of the cache epoch depends on: part of a cache's upstream."""
        if self.kind == "clm":
            return "tokens"
        parts = [self.kind, f"seed={self.seed}", f"epoch={CACHE_EPOCH}", f"mask_id={self.mask_id}"]
        if self.ratio is not None:
            parts.append(f"ratio={self.ratio}")
        else:
            parts.append(f"t=[{self.t_range[0]},{self.t_range[1]}]")
        if self.kind == "mlm":
            parts += [f"mask_token={self.mask_token}", f"random_token={self.random_token}", f"vocab={self.vocab}"]
            if self.special_ids:  # the ids random replacements skip (keys without them predate the rule)
                parts.append(f"special={','.join(map(str, self.excluded_ids()))}")
        return " ".join(parts)

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
        if self.kind == "clm":
            return Corrupted(tokens, tokens, None, None)
        B, T = tokens.shape
        seq_ids = np.asarray(seq_ids)
        epochs = np.broadcast_to(np.asarray(epochs), (B,))
        t = self.times(seq_ids, epochs)  # (B,)
        selected = uniform(self.seed, epochs, seq_ids, T, SELECT) < t[:, None]  # (B, T)
        inputs = tokens.clone()
        dev = tokens.device
        if self.kind == "diffusion":
            mask = torch.from_numpy(selected).to(dev)
            inputs[mask] = self.mask_id
        else:  # mlm: 80% [MASK], 10% a random token, 10% unchanged
            how = uniform(self.seed, epochs, seq_ids, T, HOW)
            to_mask = selected & (how < self.mask_token)
            to_random = selected & (how >= self.mask_token) & (how < self.mask_token + self.random_token)
            # A random ordinary token (never [MASK], <|endoftext|> or another special token): draw from the
            # vocab - n_excluded ordinary ids, then step over each excluded id in ascending order, which maps
            # 0, 1, 2, ... onto the ordinary ids one to one.
            excluded = self.excluded_ids()
            n = self.vocab - len(excluded)
            r = np.floor(uniform(self.seed, epochs, seq_ids, T, RANDOM_TOKEN) * n).astype(np.int64)
            for e in excluded:
                r = r + (r >= e)
            inputs[torch.from_numpy(to_mask).to(dev)] = self.mask_id
            rand = torch.from_numpy(to_random).to(dev)
            inputs[rand] = torch.from_numpy(r).to(dev)[rand]
        weight = torch.from_numpy(selected).to(dev)
        t_in = torch.from_numpy(t.astype(np.float32)).to(dev) if self.time_input else None
        return Corrupted(inputs, tokens, weight, t_in)

    def loss(self, logits: torch.Tensor, c: Corrupted, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy where it counts: the next token (clm), the selected or masked positions (mlm, diffusion).
        ``mean`` over the counted positions (0 when a batch has none), or their ``sum``."""
        V = logits.shape[-1]
        if c.weight is None:
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, V).float(), c.targets[:, 1:].reshape(-1), reduction=reduction
            )
        picked = logits[c.weight].float()  # (N, V): only the counted positions reach the softmax
        if picked.shape[0] == 0:
            return logits.sum() * 0.0
        return F.cross_entropy(picked, c.targets[c.weight], reduction=reduction)

    def counted(self, c: Corrupted) -> int:
        """Positions the loss counts in this batch."""
        if c.weight is None:
            return c.targets.shape[0] * (c.targets.shape[1] - 1)
        return int(c.weight.sum())


def objective_for(
    recipe: Recipe, mask_id: int | None, vocab: int, ratio: float | None, special_ids: tuple[int, ...] = ()
) -> Objective:
    """The recipe's objective at one stack's ``ratio`` (its manifest ``mask_ratio``; None = t drawn per sequence).

    ``vocab`` is the tokenizer's size and ``special_ids`` its special tokens (``tokenizer_special_ids``): random
    replacement tokens are real, ordinary tokens."""
    kind = recipe.objective
    if kind != "clm" and mask_id is None:
        raise ProjectError(
            f"objective {kind!r} needs a [MASK] token, and this project's tokenizer has none in the manifest",
            hint="prepare the project again with this version of stackwise (it adds [MASK] to the tokenizer)",
        )
    d = recipe.diffusion
    return Objective(
        kind=kind,
        seed=recipe.train.seed,
        mask_id=mask_id,
        vocab=vocab,
        special_ids=tuple(special_ids),
        ratio=None if kind == "clm" else ratio,
        t_range=(d.t_min, d.t_max),
        time_input=kind == "diffusion" and d.time == "input",
        mask_token=recipe.mask.mask_token,
        random_token=recipe.mask.random_token,
    )


def planned_ratio(recipe: Recipe, index: int) -> float | None:
    """The mask ratio of the stack at ``index`` (0 = leftmost) of the planned rack: the recipe's mlm ratio; the
    diffusion schedule's t for time-as-depth; None for clm and for time-as-input (t is drawn per sequence)."""
    if recipe.objective == "mlm":
        return recipe.mask.ratio
    if recipe.objective != "diffusion" or recipe.diffusion.time == "input":
        return None
    ratios = recipe.diffusion.ratios(recipe.rack.stacks)
    if not 0 <= index < len(ratios):
        raise ProjectError(
            f"the diffusion schedule has {len(ratios)} ratios, one per planned stack (rack.stacks = "
            f"{recipe.rack.stacks}); a stack at planned position {index} has none",
            hint="plan a bigger rack: raise rack.stacks (and the schedule's length, if it is a list)",
        )
    return ratios[index]


def stack_objective(m: Manifest, stack_id: int | None) -> Objective:
    """The objective stack ``stack_id`` trains with (None: the whole rack end to end, t drawn per sequence)."""
    ratio = m.stack(stack_id).mask_ratio if stack_id is not None else None
    if stack_id is None and m.recipe.objective == "mlm":
        ratio = m.recipe.mask.ratio
    return objective_for(m.recipe, m.tokenizer.mask_id, m.tokenizer.vocab_size, ratio, tokenizer_special_ids(m))


def tokenizer_special_ids(m: Manifest) -> tuple[int, ...]:
    """The project's special token ids: EOS, PAD and any other the tokenizer declares; the mask token is excluded
    from replacements regardless. A manifest written before ``special_ids`` was recorded gets none: its stacks
    trained with replacements drawn from every id but the mask, and its masks (and caches) stay those."""
    t = m.tokenizer
    if not t.special_ids:
        return ()
    return tuple(sorted({t.eos_id, *t.special_ids} | ({t.pad_id} if t.pad_id is not None else set())))
