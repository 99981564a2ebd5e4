"""Validation loss, perplexity, and the per-stack readout (the loss when the head reads the state after each stack)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from stackwise_cli.errors import ProjectError
from stackwise_cli.model.model import causal_lm_loss
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.manifest import Manifest
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import read_token_shard
from stackwise_cli.store.weights import load_current_rack
from stackwise_cli.train.precision import pick_device


@dataclass
class Readout:
    id: int
    blocks: int
    loss: float
    perplexity: float


@dataclass
class EvalResult:
    split: str
    loss: float  # after the whole rack
    perplexity: float
    tokens: int  # predicted tokens scored
    sequences: int
    per_stack: list[Readout]

    def to_data(self) -> dict:
        return asdict(self)


def val_tokens(project: Project, m: Manifest, split: str, max_sequences: int | None) -> np.ndarray:
    """The first ``max_sequences`` sequences of a split (deterministic), as one (N, T) array."""
    parts, n = [], 0
    for s in m.data.splits[split].shards:
        shard = read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len)
        take = len(shard.seq_ids) if max_sequences is None else min(len(shard.seq_ids), max_sequences - n)
        parts.append(np.asarray(shard.tokens[:take]))
        n += take
        if max_sequences is not None and n >= max_sequences:
            break
    return np.concatenate(parts)


@torch.inference_mode()
def evaluate(
    project: Project,
    split: str = "val",
    max_sequences: int | None = None,
    device: str = "auto",
    reporter: Reporter = QUIET,
) -> EvalResult:
    """Causal LM loss of the rack on a split, with the readout after each stack."""
    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to evaluate", hint="run `stackwise grow --side right`")
    if split not in m.data.splits:
        raise ProjectError(f"no split {split!r} (have: {', '.join(m.data.splits)})")
    if max_sequences is not None and max_sequences < 1:
        raise ProjectError(f"--max-sequences must be >= 1, got {max_sequences}")
    dev = pick_device(device)
    m, rack = load_current_rack(project)
    rack = rack.to(dev).eval()
    max_sequences = max_sequences if max_sequences is not None else m.recipe.eval.max_sequences
    tokens = val_tokens(project, m, split, max_sequences)
    batch = m.recipe.eval.batch_size
    sums = torch.zeros(len(rack.stacks), dtype=torch.float64)
    count = 0
    with reporter.task(f"eval {split}", total=len(tokens)) as advance:
        for lo in range(0, len(tokens), batch):
            t = torch.from_numpy(tokens[lo : lo + batch].astype(np.int64)).to(dev)
            states = rack.hidden_states(t)[1:]  # after each stack
            for i, h in enumerate(states):
                sums[i] += causal_lm_loss(rack.ends.logits(h), t, reduction="sum").double().cpu()
            count += t.shape[0] * (t.shape[1] - 1)
            advance(len(t))
    losses = (sums / count).tolist()
    per_stack = [Readout(e.id, e.blocks, loss, math.exp(loss)) for e, loss in zip(m.rack, losses)]
    return EvalResult(split, losses[-1], math.exp(losses[-1]), count, len(tokens), per_stack)


def unigram_entropy(project: Project, split: str = "val") -> float:
    """Entropy (nats) of the split's tokens under the train split's unigram distribution: the loss of a model
    that ignores context. A trained LM must beat it."""
    m = project.load()
    counts = np.zeros(m.recipe.model.vocab_size, dtype=np.float64)
    for s in m.data.splits["train"].shards:
        shard = read_token_shard(project.path(s.file))
        counts += np.bincount(np.asarray(shard.tokens).ravel(), minlength=len(counts))
    probs = (counts + 1) / (counts.sum() + len(counts))  # add-one so unseen val tokens have finite loss
    val = val_tokens(project, m, split, None)[:, 1:].ravel()
    return float(-np.log(probs[val]).mean())
