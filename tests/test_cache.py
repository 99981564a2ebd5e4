"""The cache stage's prefix: one stack on the device at a time, the same bits as the whole prefix at once, and fp8
caches that are one rounding of the full-precision prefix at every depth."""

from __future__ import annotations

import dataclasses
import weakref

import numpy as np
import torch

import stackwise_cli.train.cache as cache_mod
from stackwise_cli.model.io import load_ends, load_stack
from stackwise_cli.model.model import Stack
from stackwise_cli.objectives import CACHE_EPOCH
from stackwise_cli.store.e4m3 import fp8_dequantize_reference, fp8_quantize_reference
from stackwise_cli.store.manifest import stack_objective
from stackwise_cli.store.project import Project
from stackwise_cli.store.shards import read_hidden_shard, read_token_shard
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack


def _recipe(project: Project, stacks: int, objective: str | None = None, cache_dtype: str | None = None) -> None:
    with project.update() as m:
        r = m.recipe
        fields = {"rack": dataclasses.replace(r.rack, stacks=stacks)}
        if objective:
            fields["objective"] = objective
        if cache_dtype:
            fields["cache"] = dataclasses.replace(r.cache, dtype=cache_dtype)
        m.recipe = dataclasses.replace(r, **fields)


def _train_prefix(project: Project, n: int) -> None:
    """Grow n + 1 stacks and train the first n left to right (each on its cache), as `build` would."""
    for _ in range(n + 1):
        grow(project)
    for i in range(n):
        if i:
            cache_mod.build_cache(project, i, "train")
        train_stack(project, i, steps=2)


@torch.no_grad()
def _whole_prefix(project: Project, stack_id: int, shard: int, split: str = "train") -> torch.Tensor:
    """The states entering ``stack_id`` for one token shard, computed as the cache stage did before it streamed
    stacks: the ends and every stack to the left resident at once, batch after batch through all of them."""
    m = project.load()
    ends = load_ends(project, m).eval()
    stacks = [load_stack(project, m, s.id).eval() for s in m.rack[: m.position(stack_id)]]
    obj = stack_objective(m, stack_id)
    tok = read_token_shard(project.path(m.data.splits[split].shards[shard].file))
    out, batch = [], m.recipe.cache.batch_size
    for lo in range(0, len(tok), batch):
        ids = torch.from_numpy(np.asarray(tok.tokens[lo : lo + batch], dtype=np.int64))
        c = obj.corrupt(ids, np.asarray(tok.seq_ids[lo : lo + batch]), CACHE_EPOCH)
        h = ends.embed_tokens(c.inputs)
        for s in stacks:
            h = s(h, obj.causal, c.t)
        out.append(h)
    return torch.cat(out)  # (N, T, D)


def test_time_as_depth_cache_streams_one_stack_at_a_time_with_the_same_bits(project, monkeypatch):
    """Diffusion time-as-depth caches never run incrementally (each stack's input has its own mask ratio), so the
    cache entering position 3 runs the tokens through three stacks: it must load them one at a time, per shard,
    and give exactly the states of the whole prefix run at once."""
    _recipe(project, stacks=4, objective="diffusion")
    _train_prefix(project, 3)
    m = project.load()
    n_shards = len(m.data.splits["train"].shards)
    assert n_shards >= 2, "the fixture must have several train shards for this test"

    live: weakref.WeakSet[Stack] = weakref.WeakSet()
    loads: list[tuple[int, int]] = []  # (stack id, stacks alive when it was asked for)
    verified: list[bool] = []  # whether that load checked the file's checksum
    real = cache_mod.load_stack

    def counted(project_, manifest, stack_id, *a, **k):
        loads.append((stack_id, len(live)))
        verified.append(k.get("verify", True))
        stack = real(project_, manifest, stack_id, *a, **k)
        live.add(stack)
        return stack

    monkeypatch.setattr(cache_mod, "load_stack", counted)
    entry = cache_mod.build_cache(project, 3, "train")
    assert [sid for sid, _ in loads] == [0, 1, 2] * n_shards  # the prefix, in order, for every shard
    assert max(alive for _, alive in loads) == 0  # each stack freed before the next one is loaded
    assert verified == [True] * 3 + [False] * 3 * (n_shards - 1)  # each file hashed once, not once per shard

    for i, shard in enumerate(entry.shards):
        cached = read_hidden_shard(project.path(shard.file)).hidden  # fp32 cache: exact values
        assert torch.equal(cached, _whole_prefix(project, 3, i))


def test_a_one_stack_prefix_is_loaded_once_for_every_shard(project, monkeypatch):
    _recipe(project, stacks=2, objective="diffusion")
    _train_prefix(project, 1)
    real, loads = cache_mod.load_stack, []
    monkeypatch.setattr(cache_mod, "load_stack", lambda p, m, sid, *a, **k: loads.append(sid) or real(p, m, sid))
    entry = cache_mod.build_cache(project, 1, "val")
    assert loads == [0]
    cached = read_hidden_shard(project.path(entry.shards[0].file)).hidden
    assert torch.equal(cached, _whole_prefix(project, 1, 0, "val"))


def _relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def test_fp8_caches_are_one_rounding_of_the_full_precision_prefix_at_every_depth(project):
    """An fp8 cache k+1 made from the dequantised fp8 cache k would add one e4m3 rounding per stack (the error
    compounds with depth); from the tokens, every fp8 cache is the quantised full-precision prefix output, within
    the bound docs/precision.md states: |error| <= 2^-4 x the token's largest |value|, at any depth."""
    _recipe(project, stacks=4, cache_dtype="fp8")
    _train_prefix(project, 3)
    entry = cache_mod.build_cache(project, 3, "val")
    errors = []
    for k in (1, 2, 3):
        e = entry if k == 3 else cache_mod.build_cache(project, k, "val")
        shard = read_hidden_shard(project.path(e.shards[0].file)).hidden
        exact = _whole_prefix(project, k, 0, "val")  # (N, T, D) fp32
        codes, scales = fp8_quantize_reference(exact)
        assert torch.equal(shard.codes.view(torch.uint8), codes) and torch.equal(shard.scales, scales)
        got = fp8_dequantize_reference(shard.codes, shard.scales, torch.float32)
        amax = exact.abs().amax(-1, keepdim=True)
        assert bool(((got - exact).abs() <= amax * 2**-4).all())
        errors.append(_relative_error(got, exact))
    assert max(errors) < 0.05, errors  # one rounding each: no growth with depth


def test_mlm_bf16_caches_stay_incremental_and_load_one_stack(project, monkeypatch):
    """Caches that hold the same corruption (mlm) are still built from the left neighbour's cache: one stack."""
    _recipe(project, stacks=3, objective="mlm", cache_dtype="bf16")
    _train_prefix(project, 2)
    real, loads = cache_mod.load_stack, []
    monkeypatch.setattr(cache_mod, "load_stack", lambda p, m, sid, *a, **k: loads.append(sid) or real(p, m, sid))
    cache_mod.build_cache(project, 2, "train")
    assert loads == [1]


def test_a_bf16_cache_is_never_built_from_an_fp8_neighbour(project, monkeypatch):
    """After cache.dtype changes from fp8 to bf16, the left neighbour's fp8 cache may still be fresh; building on its
    codes would carry their rounding into the bf16 cache, so it is computed from the tokens."""
    _recipe(project, stacks=3, cache_dtype="fp8")
    _train_prefix(project, 2)
    _recipe(project, stacks=3, cache_dtype="bf16")
    m = project.load()
    assert m.cache(m.rack[1].id, "train").dtype == "fp8" and cache_mod.is_fresh(project, m, m.rack[1].id, "train")
    real, loads = cache_mod.load_stack, []
    monkeypatch.setattr(cache_mod, "load_stack", lambda p, m, sid, *a, **k: loads.append(sid) or real(p, m, sid))
    cache_mod.build_cache(project, 2, "train")
    assert set(loads) == {0, 1}  # the whole prefix, streamed per shard (incremental would load stack 1 alone)
