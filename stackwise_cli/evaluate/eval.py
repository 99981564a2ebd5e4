"""Validation loss, perplexity, and the per-stack readout (the loss when the head reads the state after each stack)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.device import pick_device
from stackwise_cli.errors import ProjectError
from stackwise_cli.evaluate.causal import masked_next_token_logits, require_mask_id
from stackwise_cli.evaluate.trained import require_trained, trained_prefix
from stackwise_cli.model.io import load_current_rack
from stackwise_cli.model.model import Rack
from stackwise_cli.objectives import NEXT_TOKEN, Objective, objective_for, objective_kind
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.manifest import Manifest, StackEntry, tokenizer_special_ids
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import read_token_shard


@dataclass
class Readout:
    id: int
    blocks: int
    loss: float
    perplexity: float
    mask_ratio: float | None = None  # the corruption this readout was scored at (mlm, diffusion)


@dataclass
class TimePoint:
    """Diffusion: the rack at one noise level t."""

    t: float
    masked_loss: float  # mean cross-entropy over the masked positions
    accuracy: float  # share of masked positions predicted exactly (argmax)
    elbo_term: float  # (1/t) * (cross-entropy summed over masked positions) / (all positions): the ELBO integrand


@dataclass
class EvalResult:
    split: str
    loss: float  # the headline: clm next-token loss, mlm masked loss, diffusion ELBO bound (nats per token)
    perplexity: float  # exp(loss); for diffusion an upper bound on the perplexity
    tokens: int  # positions scored by the headline loss
    sequences: int
    per_stack: list[Readout]
    objective: str = "clm"
    accuracy: float | None = None  # mlm / diffusion: share of scored positions predicted exactly
    per_t: list[TimePoint] = field(default_factory=list)  # diffusion: the rack at each t of the ELBO grid
    attention: str = "causal"
    # Causal scoring: how token i+1 is read. "shifted": from position i (clm training); "mask": from a [MASK] at
    # position i+1 that sees 0..i (mlm and diffusion are trained to predict the token under a [MASK]). None: not causal.
    causal_readout: str | None = "shifted"
    # Stacks not scored (left to right: the untrained stacks after the trained prefix, in rack order); empty when
    # the whole rack was scored.
    left_out: list[int] = field(default_factory=list)
    model: str = "rack"  # what was scored: the rack's files, or the model in fused/ (--fused)

    def to_data(self) -> dict:
        return asdict(self)


def scored_stacks(project: Project, m: Manifest) -> list[StackEntry]:
    """The stacks eval scores: all of them when all are trained; left to right, the trained prefix (each of its
    stacks was trained with the head reading its output, so it is a model of its own); else a ProjectError naming
    the untrained stacks and the command that trains them (docs/objectives.md)."""
    k = trained_prefix(m)
    if k < len(m.rack) and (k == 0 or not curriculum_of(m.recipe).head_reads_each_stack):
        require_trained(project, m, "eval would score")
    return m.rack[:k]


def val_tokens(project: Project, m: Manifest, split: str, max_sequences: int | None) -> np.ndarray:
    """The first ``max_sequences`` sequences of a split (deterministic), as one (N, T) array."""
    return val_sequences(project, m, split, max_sequences)[0]


def val_sequences(
    project: Project, m: Manifest, split: str, max_sequences: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``max_sequences`` sequences of a split (deterministic): tokens (N, T) and their ids (N,)."""
    parts, ids, n = [], [], 0
    for s in m.data.splits[split].shards:
        shard = read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len)
        take = len(shard.seq_ids) if max_sequences is None else min(len(shard.seq_ids), max_sequences - n)
        parts.append(np.asarray(shard.tokens[:take]))
        ids.append(np.asarray(shard.seq_ids[:take]))
        n += take
        if max_sequences is not None and n >= max_sequences:
            break
    return np.concatenate(parts), np.concatenate(ids)


def elbo_grid(points: int) -> list[float]:
    """Midpoints of ``points`` equal bins of (0, 1]: the t at which the ELBO integral over t is estimated."""
    return [(i + 0.5) / points for i in range(points)]


class _Scores:
    """Running sums of one readout: loss, correct predictions, counted positions."""

    def __init__(self) -> None:
        self.loss, self.correct, self.count = 0.0, 0, 0

    def add(self, obj: Objective, logits: torch.Tensor, c) -> None:
        self.loss += float(obj.loss(logits, c, reduction="sum").double())
        if c.weight is None:
            pred, target = logits[:, :-1].argmax(-1), c.targets[:, 1:]
        else:
            pred, target = logits[c.weight].argmax(-1), c.targets[c.weight]
        self.correct += int((pred == target).sum())
        self.count += obj.counted(c)

    def add_next(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """One position of every row: logits (B, V) scored against the tokens ``target`` (B,)."""
        self.loss += float(F.cross_entropy(logits.float(), target, reduction="sum").double())
        self.correct += int((logits.argmax(-1) == target).sum())
        self.count += target.shape[0]

    def mean(self) -> float:
        return self.loss / max(self.count, 1)

    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


@torch.inference_mode()
def evaluate(
    project: Project,
    split: str = "val",
    max_sequences: int | None = None,
    device: str = "auto",
    reporter: Reporter = QUIET,
    causal: bool = False,
    fused: bool = False,
    fused_rack: Rack | None = None,
) -> EvalResult:
    """The rack's validation loss by its objective, with the readout after each stack.

    clm: next-token loss. mlm: loss and accuracy on the selected positions at ``mask.ratio``. diffusion: the masked
    loss, accuracy and ELBO term at each t of a grid, and the ELBO bound (their mean) as the headline. Masks are
    those of epoch 0 of each validation sequence: every eval of every project scores the same corruption.
    ``causal``: score a bidirectionally trained rack as a causal LM (next-token loss, causal attention). An mlm or
    diffusion rack predicts the token under a ``[MASK]``, so token i+1 is read from a ``[MASK]`` at position i+1
    that sees tokens 0..i (``evaluate/causal.py``: about twice the work of a causal forward, position by position).
    ``fused``: score the model in fused/ (what `fuse --finetune-steps` fine-tuned, and what users load) instead of
    the rack's files; scored on split val with the defaults, its loss is recorded as the manifest's
    ``fused.val_loss``. ``fused_rack``: the fused model already in memory (``fuse``, right after writing fused/ from
    it: the same weights, without reading them back).
    """
    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to evaluate", hint="run `stackwise grow --side right`")
    if split not in m.data.splits:
        raise ProjectError(f"no split {split!r} (have: {', '.join(m.data.splits)})")
    if max_sequences is not None and max_sequences < 1:
        raise ProjectError(f"--max-sequences must be >= 1, got {max_sequences}")
    dev = pick_device(device)
    if fused:
        from stackwise_cli.evaluate.fused import load_fused

        rack = fused_rack if fused_rack is not None else load_fused(project, m)
        entries = m.rack  # fused/ is whole: fuse refuses untrained stacks
    else:
        scored_stacks(project, m)  # refuses before any weights are read
        m, rack = load_current_rack(project, manifest=m)
        entries = scored_stacks(project, m)  # the manifest may have moved on while the files were read
        if len(entries) < len(m.rack):
            rack = Rack(rack.cfg, rack.ends, list(rack.stacks[: len(entries)]), rack.ids[: len(entries)])
    rack = rack.to(dev).eval()
    recipe = m.recipe
    if causal and recipe.model.time_embedding:
        raise ProjectError("--causal scores a next-token model; this rack needs a diffusion time t as input")
    kind = NEXT_TOKEN if causal else recipe.objective
    scored = objective_kind(kind)
    # A masked objective trains position i to predict token i: read causally, token i+1 comes from a [MASK] there.
    from_mask = causal and not objective_kind(recipe.objective).causal
    if from_mask:
        require_mask_id(m.tokenizer.mask_id, "--causal on an mlm or diffusion rack reads each next token from one")
    max_sequences = max_sequences if max_sequences is not None else recipe.eval.max_sequences
    tokens, seq_ids = val_sequences(project, m, split, max_sequences)
    batch = recipe.eval.batch_size
    mask_id, vocab = m.tokenizer.mask_id, m.tokenizer.vocab_size

    # The readout after each stack: clm uncorrupted, mlm at its ratio, diffusion at each stack's own ratio
    # (time-as-depth: the objective the stack was given) or t = 0.5 (t drawn per sequence).
    scored_as = dataclasses.replace(recipe, objective=kind)

    special = tokenizer_special_ids(m)  # replacements skip them, as in training: the masks are training's masks

    def at(ratio: float | None) -> Objective:
        return objective_for(scored_as, mask_id, vocab, ratio, special)

    readout = [at(scored.readout_ratio(e.mask_ratio)) for e in entries]
    # Stacks read out at the same corruption share one pass through the rack (clm and mlm: all of them).
    readers_of: dict[Objective, list[int]] = {}
    for i, obj in enumerate(readout):
        readers_of.setdefault(obj, []).append(i)
    grid = elbo_grid(recipe.diffusion.eval_points) if scored.scores_elbo else []
    grid_objectives = [at(ratio) for ratio in grid]
    per_stack = [_Scores() for _ in entries]
    per_t = [_Scores() for _ in grid]
    attn_causal = scored.causal
    with reporter.task(f"eval {split}", total=len(tokens)) as advance:
        for lo in range(0, len(tokens), batch):
            t = torch.from_numpy(tokens[lo : lo + batch].astype(np.int64)).to(dev)
            ids = seq_ids[lo : lo + batch]
            if from_mask:
                for p, logits in masked_next_token_logits(rack, t, mask_id, range(len(rack.stacks))):
                    for i, x in logits.items():
                        per_stack[i].add_next(x, t[:, p])
                advance(len(t))
                continue
            for obj, readers in readers_of.items():
                c = obj.corrupt(t, ids, 0)
                h = rack.ends.embed_tokens(c.inputs)
                for i, stack in enumerate(rack.stacks[: readers[-1] + 1]):
                    h = stack(h, attn_causal, c.t)
                    if i in readers:
                        per_stack[i].add(obj, rack.ends.logits(h), c)
            for j, (ratio, obj) in enumerate(zip(grid, grid_objectives)):
                c = obj.corrupt(t, ids, 0)
                if c.t is not None:
                    c.t = torch.full_like(c.t, ratio)
                per_t[j].add(obj, rack(c.inputs, False, c.t), c)
            advance(len(t))

    positions = tokens.shape[0] * tokens.shape[1]
    points = [TimePoint(ratio, s.mean(), s.accuracy(), s.loss / ratio / positions) for ratio, s in zip(grid, per_t)]
    readouts = [
        Readout(e.id, e.blocks, s.mean(), math.exp(min(s.mean(), 700.0)), obj.ratio)
        for e, s, obj in zip(entries, per_stack, readout)
    ]
    if scored.scores_elbo:
        loss = sum(p.elbo_term for p in points) / len(points)
        scored, accuracy = (
            sum(s.count for s in per_t),
            sum(s.correct for s in per_t) / max(sum(s.count for s in per_t), 1),
        )
    else:
        loss, scored = per_stack[-1].mean(), per_stack[-1].count
        accuracy = per_stack[-1].accuracy()
    result = EvalResult(
        split,
        loss,
        math.exp(min(loss, 700.0)),
        scored,
        len(tokens),
        readouts,
        objective=kind,
        accuracy=accuracy,
        per_t=points,
        attention="causal" if attn_causal else "bidirectional",
        causal_readout=("mask" if from_mask else "shifted") if attn_causal else None,
        left_out=[e.id for e in m.rack[len(entries) :]],
        model="fused" if fused else "rack",
    )
    if fused and split == "val" and not causal and max_sequences == recipe.eval.max_sequences:
        with project.update(f"eval --fused -> fused.val_loss {loss:.4f}") as mm:
            if mm.fused is not None and mm.fused.sha256 == m.fused.sha256:  # still the fused/ that was scored
                mm.fused.val_loss = loss
    return result


def unigram_entropy(project: Project, split: str = "val", max_sequences: int | None = None) -> float:
    """Entropy (nats) of the split's tokens under the train split's unigram distribution: the loss of a model
    that ignores context. A trained LM must beat it. Scored on the sequences ``eval`` scores: the first
    ``max_sequences`` of the split (default the recipe's ``eval.max_sequences``), so the two compare on the same
    tokens."""
    m = project.load()
    max_sequences = m.recipe.eval.max_sequences if max_sequences is None else max_sequences
    counts = np.zeros(m.recipe.model.vocab_size, dtype=np.float64)
    for s in m.data.splits["train"].shards:
        shard = read_token_shard(project.path(s.file))
        counts += np.bincount(np.asarray(shard.tokens).ravel(), minlength=len(counts))
    probs = (counts + 1) / (counts.sum() + len(counts))  # add-one so unseen val tokens have finite loss
    val = val_tokens(project, m, split, max_sequences)[:, 1:].ravel()
    return float(-np.log(probs[val]).mean())
