"""Activation caches: the hidden states entering a stack, computed shard by shard and restartable.

A cache shard i holds, row for row, the hidden states of token shard i of the same split. The manifest
records each finished shard as soon as it is written, together with the checksums of everything upstream
(the split's tokens, the embedding, the stacks to the left), so a killed run resumes where it stopped and a
cache whose producers changed is recognised as stale.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from stackwise_cli.curricula import check_left_to_right, curriculum_of
from stackwise_cli.data.pack import SPLITS
from stackwise_cli.device import pick_device
from stackwise_cli.errors import ProjectError, StaleError
from stackwise_cli.model.io import load_ends, load_stack
from stackwise_cli.objectives import CACHE_EPOCH
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.files import sha256_file
from stackwise_cli.store.manifest import CacheEntry, CacheShard, Manifest, stack_objective
from stackwise_cli.store.project import Project, record
from stackwise_cli.store.shards import read_hidden_shard, read_token_shard, write_hidden_shard


def _start_entry(project: Project, stack_id: int, split: str) -> tuple[CacheEntry, bool]:
    """Find or (re)create the manifest entry for this cache. Returns (entry, already complete)."""
    with project.update() as m:
        m.position(stack_id)  # a clear error for an unknown id
        want = project.upstream_for(m, stack_id, split)
        dtype = m.recipe.cache.dtype
        old = m.cache(stack_id, split)
        if old is not None and old.upstream == want and old.dtype == dtype and not project.stale_reasons(m, old):
            # Same producers: the shards already written may be kept (the caller checks their bytes).
            return old, old.complete
        if old is not None:
            m.caches.remove(old)
            m.recount_flops()
        shutil.rmtree(project.cache_dir(stack_id, split), ignore_errors=True)
        entry = CacheEntry(
            stack=stack_id,
            split=split,
            dtype=dtype,
            seq_len=m.data.seq_len,
            d_model=m.recipe.model.d_model,
            complete=False,
            upstream=want,
        )
        m.caches.append(entry)
        return entry, False


def _commit_shard(project: Project, entry: CacheEntry, shard: CacheShard | None, flops: float = 0.0) -> None:
    """Record one finished shard and the FLOPs that computed it (or, with ``shard=None``, that the cache is
    complete) under the lock."""
    with project.update() as m:
        current = m.cache(entry.stack, entry.split)
        if current is None or current.upstream != entry.upstream:
            raise StaleError(
                f"the {entry.split} cache of stack {entry.stack} was replaced by another process while this one wrote",
                hint=f"rerun `stackwise cache {entry.stack} --split {entry.split}`",
            )
        if shard is None:
            current.complete = True
            record(m, f"cache {entry.stack} --split {entry.split}")
        else:
            current.shards = sorted([s for s in current.shards if s.file != shard.file] + [shard], key=lambda s: s.file)
            current.flops += flops
            m.recount_flops()


def is_fresh(project: Project, m: Manifest, stack_id: int, split: str) -> bool:
    """Is the cache entering ``stack_id`` complete and made by the current producers?"""
    c = m.cache(stack_id, split)
    return c is not None and c.complete and not project.stale_reasons(m, c)


def _fresh_left_cache(project: Project, m: Manifest, stack_id: int, split: str) -> CacheEntry | None:
    """The left neighbour's complete, fresh cache of this split, if there is one and it was computed from the same
    corrupted inputs (for the incremental path; diffusion time-as-depth masks each stack's input differently).

    Never an fp8 cache: stack k would read its dequantised codes, and each incremental cache would add one more
    e4m3 rounding to the error of the one before (measured on the tiny model: 2.5% -> 5.5% -> 6.9% over three
    stacks). From the tokens, every fp8 cache is one rounding of the full-precision prefix's output (2.5% at
    every depth), at the compute of the whole prefix (docs/precision.md)."""
    pos = m.position(stack_id)
    if pos == 0 or m.recipe.cache.dtype == "fp8":
        return None
    left = m.rack[pos - 1].id
    if not is_fresh(project, m, left, split):
        return None
    cache = m.cache(left, split)
    if cache.dtype == "fp8":  # made before cache.dtype changed in the recipe: its codes are as lossy as ever
        return None
    return cache if cache.upstream.inputs == project.upstream_for(m, stack_id, split).inputs else None


class _OneStack:
    """Loads prefix stacks onto the device one at a time: asking for another stack frees the one held first, so
    the cache stage never holds two stacks' weights; asking for the one held reuses it (a one-stack prefix, or
    the incremental path, loads its stack once for every shard). A file is checked against the manifest the first
    time it is loaded: hashing a large stack again for every shard would cost more than reading it, and a stack
    rewritten since changes its manifest checksum, which makes the whole cache stale anyway."""

    def __init__(self, project: Project, m: Manifest, dev: torch.device):
        self.project, self.m, self.dev = project, m, dev
        self.id: int | None = None
        self.stack: torch.nn.Module | None = None
        self.verified: set[int] = set()

    def get(self, stack_id: int) -> torch.nn.Module:
        if self.id != stack_id:
            self.id = self.stack = None  # drop the last reference before the next stack is allocated
            verify = stack_id not in self.verified
            self.stack = load_stack(self.project, self.m, stack_id, verify=verify).to(self.dev).eval()
            self.id = stack_id
            self.verified.add(stack_id)
        return self.stack


@torch.inference_mode()
def build_cache(
    project: Project, stack_id: int, split: str = "train", device: str = "auto", reporter: Reporter = QUIET
) -> CacheEntry:
    """Compute (or finish) the cache of the hidden states entering ``stack_id`` for one split."""
    if split not in SPLITS:
        raise ProjectError(f"--split must be one of {', '.join(SPLITS)} or all, got {split!r}")
    dev = pick_device(device)
    project.load().position(stack_id)  # an unknown id is a clear error before any lock file is made
    with project.job_lock(f"cache-{stack_id}-{split}", f"the {split} cache of stack {stack_id}"):
        return _build_cache(project, stack_id, split, dev, reporter)


def _intact(path: Path, sha256: str) -> bool:
    return path.exists() and sha256_file(path) == sha256


def _build_cache(project: Project, stack_id: int, split: str, dev: torch.device, reporter: Reporter) -> CacheEntry:
    recipe = project.load().recipe
    if not curriculum_of(recipe).reads_prefix:
        raise ProjectError(
            f"the recipe's curriculum is {recipe.curriculum}: stacks train from the tokens, so no cache is read",
            hint="caches serve left-to-right training; run `stackwise train-stack` directly",
        )
    check_left_to_right(project.load(), stack_id, right=False)
    entry, complete = _start_entry(project, stack_id, split)
    # Shards already recorded are kept only if their bytes are still the ones recorded: a shard truncated or
    # deleted since is computed again (which is what `stackwise verify` tells the user to run this for).
    done = {
        s.file for s in entry.shards if project.path(s.file).exists() and sha256_file(project.path(s.file)) == s.sha256
    }
    if complete and len(done) == len(entry.shards):
        reporter.info(f"cache {stack_id}/{split} is complete and fresh: nothing to do")
        return entry
    if complete:
        with project.update() as m:
            m.cache(stack_id, split).complete = False
    m = project.load()
    token_shards = m.data.splits[split].shards
    # The stack's own objective corrupts the tokens (its mask ratio, the cache epoch's masks); the stacks to the
    # left then see exactly what they will see in front of it.
    obj = stack_objective(m, stack_id)
    causal = obj.causal

    def corrupt(rows: slice, tokens):
        ids = torch.from_numpy(np.asarray(tokens.tokens[rows], dtype=np.int64)).to(dev)
        return obj.corrupt(ids, np.asarray(tokens.seq_ids[rows]), CACHE_EPOCH)

    prev = _fresh_left_cache(project, m, stack_id, split)
    if prev is not None:
        # Incremental: the cache entering k+1 is the cache entering k passed through stack k.
        ends, prefix = None, [prev.stack]
        reporter.info(f"cache {stack_id}/{split}: from the cache of stack {prev.stack}, through stack {prev.stack}")
    else:
        ends = load_ends(project, m).to(dev).eval()
        prefix = [s.id for s in m.rack[: m.position(stack_id)]]
        reporter.info(f"cache {stack_id}/{split}: from the tokens, through the embedding and {len(prefix)} stack(s)")
    stacks = _OneStack(project, m, dev)
    # FLOPs per cached token: one no-grad forward through every stack this pass runs (flops.py's formula).
    from stackwise_cli.flops import FlopShapes, cache_flops_per_token

    flops_per_token = cache_flops_per_token(
        FlopShapes.of(m.recipe, m.data.seq_len), [m.stack(sid).blocks for sid in prefix]
    )

    batch = m.recipe.cache.batch_size
    T, D = m.data.seq_len, m.recipe.model.d_model
    # One unit per sequence per stack it passes through (per embedding when no stack is to the left).
    passes = max(1, len(prefix))
    total = sum(s.sequences for s in token_shards) * passes
    with reporter.task(f"cache {stack_id} {split}", total=total) as advance:
        for i, tok_entry in enumerate(token_shards):
            out_rel = f"cache/{stack_id}/{split}/{i:05d}.arrow"
            if out_rel in done:
                advance(tok_entry.sequences * passes)
                continue
            tokens = read_token_shard(project.path(tok_entry.file), expect_seq_len=T)
            n = len(tokens.seq_ids)
            batches = [slice(lo, min(lo + batch, n)) for lo in range(0, n, batch)]
            # The shard's states live on the host in fp32 and are updated in place, stack after stack: the
            # device holds one stack (plus the ends) and one batch in and out, whatever the prefix's length.
            hidden = torch.empty((n, T, D), dtype=torch.float32)  # (N, T, D)
            times = []
            if prev is not None:
                src = read_hidden_shard(project.path(prev.shards[i].file), expect_shape=(T, prev.d_model))
                for rows in batches:
                    hidden[rows] = src.hidden[rows]  # as stored (bf16, fp32) -> fp32, exactly
                    times.append(corrupt(rows, tokens).t)
            else:
                for rows in batches:
                    c = corrupt(rows, tokens)
                    hidden[rows] = ends.embed_tokens(c.inputs).float().cpu()
                    times.append(c.t)
                    if not prefix:
                        advance(rows.stop - rows.start)
            for sid in prefix:
                stack = stacks.get(sid)
                for rows, t in zip(batches, times):
                    hidden[rows] = stack(hidden[rows].to(dev), causal, t).float().cpu()
                    advance(rows.stop - rows.start)
                del stack
            sha = write_hidden_shard(project.path(out_rel), hidden, np.asarray(tokens.seq_ids), entry.dtype)
            _commit_shard(project, entry, CacheShard(file=out_rel, sequences=n, sha256=sha), n * T * flops_per_token)
    _commit_shard(project, entry, None)
    return project.load().cache(stack_id, split)
