"""Objectives (clm, mlm, diffusion) and curricula (left-to-right, right-to-left, end-to-end): the semantics.

Each test is written so that the wrong version the seed project had (masks never applied to the input, one mask
for every batch, the wrong stack trained right to left) fails it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stackwise_cli.errors import ProjectError, StaleError
from stackwise_cli.model.io import load_ends, load_stack
from stackwise_cli.objectives import CACHE_EPOCH, Objective, objective_for, uniform
from stackwise_cli.recipe import DiffusionRecipe, Recipe
from stackwise_cli.store.files import sha256_file
from stackwise_cli.store.manifest import stack_objective
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

MASK, VOCAB = 1, 512


def _set(project: Project, train: dict | None = None, **fields) -> None:
    """Change the project's recipe (objective, curriculum, ...) before anything is grown."""
    with project.update() as m:
        r = m.recipe
        if train:
            fields["train"] = dataclasses.replace(r.train, **train)
        if fields.get("objective") == "diffusion" and fields.get("diffusion", r.diffusion).time == "input":
            fields["model"] = dataclasses.replace(r.model, time_embedding=True)
        m.recipe = dataclasses.replace(r, **fields)


def _tokens(B: int = 64, T: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def _files(project: Project) -> dict[str, str]:
    """sha256 of every weight file in the project."""
    return {p.name: sha256_file(p) for p in sorted(project.root.glob("*.safetensors"))} | {
        f"stacks/{p.name}": sha256_file(p) for p in sorted((project.root / "stacks").glob("*.safetensors"))
    }


# --- masks ---------------------------------------------------------------------------------------------------


def test_masks_are_a_function_of_sequence_ratio_seed_and_epoch():
    obj = Objective("diffusion", seed=3, mask_id=MASK, vocab=VOCAB, ratio=0.4)
    x, ids = _tokens(), np.arange(100, 164)
    a = obj.corrupt(x, ids, 0)
    assert torch.equal(a.inputs, obj.corrupt(x.clone(), ids, 0).inputs)  # two runs agree
    # Different epochs, sequences and seeds give different masks; the share masked is the ratio.
    assert not torch.equal(a.weight, obj.corrupt(x, ids, 1).weight)
    assert not torch.equal(a.weight, obj.corrupt(x, ids + 1000, 0).weight)
    assert not torch.equal(a.weight, dataclasses.replace(obj, seed=4).corrupt(x, ids, 0).weight)
    assert abs(a.weight.float().mean().item() - 0.4) < 0.03
    # A row's mask depends on its own sequence id only, not on the batch it is in or its place there.
    alone = obj.corrupt(x[5:6], ids[5:6], 0)
    assert torch.equal(alone.weight[0], a.weight[5])
    # Rows of one batch do not share one mask (the seed project's bug).
    assert len({tuple(r.tolist()) for r in a.weight}) == len(ids)
    # Lower ratios mask a subset of the positions of higher ratios (one path of the forward process).
    low = dataclasses.replace(obj, ratio=0.15).corrupt(x, ids, 0).weight
    assert bool((low <= a.weight).all()) and low.sum() < a.weight.sum()


def test_uniform_hash_is_uniform_and_independent_across_streams():
    u = uniform(0, np.zeros(2000), np.arange(2000), 64, 1)
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    v = uniform(0, np.zeros(2000), np.arange(2000), 64, 2)
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 0.01


def test_diffusion_hides_every_token_it_must_predict():
    obj = Objective("diffusion", seed=0, mask_id=MASK, vocab=VOCAB, ratio=0.5)
    x = _tokens()
    c = obj.corrupt(x, np.arange(len(x)), 0)
    assert bool((c.inputs[c.weight] == MASK).all())  # the model never sees a token it is scored on
    assert torch.equal(c.inputs[~c.weight], x[~c.weight])  # and sees every other one
    assert torch.equal(c.targets, x)


def test_mlm_selects_the_ratio_and_replaces_80_10_10():
    obj = Objective("mlm", seed=0, mask_id=MASK, vocab=VOCAB, ratio=0.15)
    x = _tokens(B=512)
    c = obj.corrupt(x, np.arange(len(x)), 0)
    sel = c.weight
    assert abs(sel.float().mean().item() - 0.15) < 0.01
    masked = (c.inputs == MASK) & sel
    changed = (c.inputs != x) & (c.inputs != MASK) & sel
    kept = (c.inputs == x) & sel
    n = sel.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(changed.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (a random draw equal to the token counts here, rarely)
    assert not bool((c.inputs[~sel] != x[~sel]).any())  # unselected positions are untouched
    assert int(c.inputs[changed].max()) < VOCAB and not bool((c.inputs[changed] == MASK).any())


def test_mlm_random_replacements_are_ordinary_tokens_only():
    # A small vocabulary, so every id is drawn many times: EOS (0), [MASK] (1), [PAD] (2) and a special id in the
    # middle (7) must never be a replacement, and every other id must be (the draw maps onto them one to one).
    vocab, specials = 12, (0, 2, 7)
    obj = Objective(
        "mlm", seed=5, mask_id=MASK, vocab=vocab, ratio=0.5, special_ids=specials, mask_token=0.5, random_token=0.5
    )
    x = torch.randint(3, vocab, (256, 32), generator=torch.Generator().manual_seed(0))
    c = obj.corrupt(x, np.arange(len(x)), 0)
    again = obj.corrupt(x, np.arange(len(x)), 0)
    assert torch.equal(c.inputs, again.inputs)  # still a pure function of (sequence, ratio, seed, epoch)
    drawn = c.inputs[c.weight & (c.inputs != MASK)].unique().tolist()
    assert set(drawn) == set(range(vocab)) - {0, 1, 2, 7}
    assert "special=0,1,2,7" in obj.key()  # a cache made with other replacements is stale


def test_stack_objective_skips_the_projects_special_tokens(project: Project):
    _set(project, objective="mlm")
    m = project.load()
    t = m.tokenizer
    assert t.pad_id is not None and {t.eos_id, t.mask_id, t.pad_id} <= set(t.special_ids)
    obj = stack_objective(m, None)
    assert obj.excluded_ids() == sorted({t.eos_id, t.mask_id, t.pad_id})


def test_masked_loss_counts_only_the_selected_positions():
    obj = Objective("mlm", seed=0, mask_id=MASK, vocab=VOCAB, ratio=0.15)
    x = _tokens(B=8)
    c = obj.corrupt(x, np.arange(8), 0)
    logits = torch.randn(8, 32, VOCAB)
    base = obj.loss(logits, c)
    noisy = logits.clone()
    noisy[~c.weight] = torch.randn_like(noisy[~c.weight]) * 100  # change every unscored position
    assert obj.loss(noisy, c) == pytest.approx(base.item())
    assert obj.loss(logits, c, "sum").item() == pytest.approx(base.item() * c.weight.sum().item(), rel=1e-5)


def test_a_model_that_copies_its_input_cannot_score_on_masked_positions():
    """If masks were not applied to the input, copying the input would be a perfect masked-token model."""
    obj = Objective("diffusion", seed=0, mask_id=MASK, vocab=VOCAB, ratio=0.5)
    x = _tokens()
    c = obj.corrupt(x, np.arange(len(x)), 0)
    copy = torch.nn.functional.one_hot(c.inputs, VOCAB).float() * 50  # logits that repeat the input
    assert obj.loss(copy, c).item() > 10  # it predicts [MASK], never the token
    leak = torch.nn.functional.one_hot(x, VOCAB).float() * 50
    assert obj.loss(leak, c).item() < 1e-6  # what an unmasked input would have allowed


def test_time_input_draws_t_per_sequence_in_range():
    obj = Objective("diffusion", seed=0, mask_id=MASK, vocab=VOCAB, ratio=None, t_range=(0.2, 0.8), time_input=True)
    x = _tokens(B=256)
    c = obj.corrupt(x, np.arange(256), 0)
    assert c.t.shape == (256,) and float(c.t.min()) >= 0.2 and float(c.t.max()) <= 0.8
    share = c.weight.float().mean(1)  # each row is masked at its own t
    assert float(torch.corrcoef(torch.stack([share, c.t]))[0, 1]) > 0.9


def test_time_drawn_masks_every_stack_at_t_drawn_per_sequence_and_feeds_no_t(project, monkeypatch):
    """diffusion.time: drawn: no stack owns a ratio, each row of every stack's batches (the cached stack's too) is
    masked at its own t in [t_min, t_max], and the model reads no t (the rack has no time embedding)."""
    from stackwise_cli.evaluate.eval import evaluate
    from stackwise_cli.evaluate.generate import resolve_mode
    from stackwise_cli.model.io import load_current_rack

    _set(project, objective="diffusion", diffusion=DiffusionRecipe(time="drawn", t_min=0.2, t_max=0.8))
    seen = []
    real = Objective.corrupt

    def spy(self, tokens, seq_ids, epochs):
        c = real(self, tokens, seq_ids, epochs)
        seen.append(c)
        return c

    monkeypatch.setattr(Objective, "corrupt", spy)
    grow(project)
    train_stack(project, 0, steps=3)
    grow(project)
    build_cache(project, 1, "train")
    train_stack(project, 1, steps=3)
    m = project.load()
    assert [s.mask_ratio for s in m.rack] == [None, None]
    assert stack_objective(m, 1).ratio is None and stack_objective(m, 1).t_range == (0.2, 0.8)
    _, rack = load_current_rack(project)
    assert all(s.time is None for s in rack.stacks)
    rows = torch.cat([c.weight.float().mean(1) for c in seen])  # each row's masked share: its t
    # t uniform in [0.2, 0.8]: mean 0.5, spread ~0.19; one ratio of 0.5 would spread ~0.09 over 32 positions
    assert abs(float(rows.mean()) - 0.5) < 0.05 and float(rows.std()) > 0.14
    assert all(c.t is None for c in seen)
    assert resolve_mode("diffusion", "drawn", False, None) == "iterative"
    grow(project, after=0)  # no place sets a stack's t, so a stack may be inserted (time as depth refuses it)
    assert [s.mask_ratio for s in project.load().rack] == [None, None, None]
    assert evaluate(project, max_sequences=16).per_t  # the ELBO over t, as for every diffusion rack
    from stackwise_cli.errors import RecipeError
    from stackwise_cli.recipe import recipe_from_data

    embedded = {"name": "x", "objective": "diffusion", "diffusion": {"time": "drawn"}}
    embedded["model"] = {"time_embedding": True}
    with pytest.raises(RecipeError, match="model.time_embedding"):  # t is not fed in: no time embedding to train
        recipe_from_data(embedded, "r.yaml")


def test_schedules_go_from_high_on_the_left_to_low_on_the_right():
    lin = DiffusionRecipe(schedule="linear", t_max=0.9, t_min=0.15).ratios(4)
    cos = DiffusionRecipe(schedule="cosine", t_max=0.9, t_min=0.15).ratios(4)
    assert lin[0] == cos[0] == 0.9 and lin[-1] == cos[-1] == 0.15
    assert lin == pytest.approx([0.9, 0.65, 0.4, 0.15])
    assert all(a > b for a, b in zip(cos, cos[1:])) and cos[1] > lin[1]  # cosine stays high longer
    assert DiffusionRecipe(schedule=[0.8, 0.5]).ratios(2) == [0.8, 0.5]
    with pytest.raises(Exception, match="must not increase"):
        DiffusionRecipe(schedule=[0.2, 0.5])
    with pytest.raises(Exception, match="one ratio per planned stack"):
        Recipe(name="x", objective="diffusion", diffusion=DiffusionRecipe(schedule=[0.8, 0.5]))


# --- curricula on a project ----------------------------------------------------------------------------------


def test_time_as_depth_ratios_are_in_the_manifest_by_planned_place(project):
    _set(project, objective="diffusion", curriculum="right-to-left")
    grow(project, "left")
    grow(project, "left")
    m = project.load()
    # Right to left the first stack grown is the rightmost: it owns the lowest ratio.
    assert [(s.id, s.mask_ratio) for s in m.rack] == [(1, 0.9), (0, 0.15)]
    assert "mask_ratio: 0.9" in project.manifest_path.read_text()


def test_ratio_follows_the_curriculum_not_the_side_of_the_first_grow(project):
    _set(project, objective="diffusion", curriculum="right-to-left")
    grow(project, "right")  # the first stack may be grown with the default side: it is still the rightmost
    grow(project, "left")
    assert [s.mask_ratio for s in project.load().rack] == [0.9, 0.15]


def test_left_growth_of_a_diffusion_rack_grown_left_to_right_is_refused(project):
    _set(project, objective="diffusion")
    grow(project)
    with pytest.raises(ProjectError, match="fills from the left"):
        grow(project, "left")


def test_a_tied_head_cannot_be_frozen_with_the_embedding():
    from stackwise_cli.errors import RecipeError
    from stackwise_cli.recipe import recipe_from_data

    with pytest.raises(RecipeError, match="train.embedding: must be 'train' with model.tie_embeddings"):
        recipe_from_data({"name": "x", "model": {"tie_embeddings": True}, "train": {"embedding": "frozen"}}, "r.yaml")


def test_training_reads_masked_inputs_with_new_masks_each_batch(project, monkeypatch):
    _set(project, objective="diffusion", train={"batch_size": 8})
    grow(project)
    seen = []
    real = Objective.corrupt

    def spy(self, tokens, seq_ids, epochs):
        c = real(self, tokens, seq_ids, epochs)
        seen.append((c, np.asarray(seq_ids).copy()))
        return c

    monkeypatch.setattr(Objective, "corrupt", spy)
    train_stack(project, 0, steps=6)
    assert len(seen) == 6
    for c, _ in seen:
        assert bool((c.inputs[c.weight] == MASK).all()) and c.weight.any()
        assert abs(c.weight.float().mean().item() - 0.9) < 0.1  # stack 0 of the 2 planned: t = 0.9
    masks = {tuple(c.weight.flatten().tolist()) for c, _ in seen}
    assert len(masks) == 6


def test_cache_holds_the_states_of_the_masked_inputs_and_goes_stale_with_the_mask(project):
    _set(project, objective="mlm")
    grow(project)
    grow(project)
    train_stack(project, 0, steps=3)
    entry = build_cache(project, 1, "train")
    m = project.load()
    from stackwise_cli.store.shards import read_hidden_shard, read_token_shard

    tok = read_token_shard(project.path(m.data.splits["train"].shards[0].file))
    cached = read_hidden_shard(project.path(entry.shards[0].file))
    rows = slice(0, 4)
    obj = stack_objective(m, 1)
    c = obj.corrupt(torch.from_numpy(np.asarray(tok.tokens[rows], dtype=np.int64)), tok.seq_ids[rows], CACHE_EPOCH)
    with torch.no_grad():
        want = load_stack(project, m, 0)(load_ends(project, m).embed_tokens(c.inputs), False)
    assert torch.allclose(torch.as_tensor(np.asarray(cached.hidden[rows])).float(), want, atol=1e-5)
    # A cache of the unmasked tokens would differ.
    with torch.no_grad():
        clean = load_stack(project, m, 0)(load_ends(project, m).embed_tokens(c.targets), False)
    assert not torch.allclose(clean, want, atol=1e-3)

    with project.update() as mm:  # another mask ratio: the cache no longer holds the stack's inputs
        mm.stack(1).mask_ratio = 0.3
    assert any("corruption" in r for r in project.stale_reasons(project.load(), project.load().cache(1, "train")))
    with pytest.raises(StaleError):
        train_stack(project, 1, steps=3)


def test_right_to_left_changes_only_the_new_stack(project):
    _set(project, curriculum="right-to-left", train={"embedding": "frozen", "frozen_dtype": "nf4"})
    grow(project, "left")
    train_stack(project, 0, steps=4)  # the first stack trains with the head
    grow(project, "left")
    before = _files(project)
    suffix_before = load_stack(project, project.load(), 0).state_dict()
    result = train_stack(project, 1, steps=6)
    after = _files(project)
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["stacks/" + project.stack_file(1).split("/")[-1]]
    m = project.load()
    assert m.stack(1).state == "trained" and m.stack(1).trained_by == "right-to-left"
    suffix_after = load_stack(project, m, 0).state_dict()
    assert all(torch.equal(suffix_before[k], suffix_after[k]) for k in suffix_before)
    assert result.last_loss is not None and math.isfinite(result.last_loss)


def test_right_to_left_trains_the_embedding_with_the_leftmost_stack_not_the_head(project):
    _set(project, curriculum="right-to-left")
    grow(project, "left")
    train_stack(project, 0, steps=4)
    grow(project, "left")
    e0 = load_ends(project, project.load())
    train_stack(project, 1, steps=4)
    e1 = load_ends(project, project.load())
    assert not torch.equal(e0.embed.weight, e1.embed.weight)  # the embedding trained with the new leftmost stack
    assert torch.equal(e0.head.weight, e1.head.weight) and torch.equal(e0.norm.weight, e1.norm.weight)


def test_right_to_left_gradient_reaches_the_new_stack_through_the_frozen_suffix(project):
    """The new stack learns through the suffix and head: its gradient is what backprop through the (checkpointed,
    4-bit) suffix gives, and differs from the gradient of the new stack read out directly by the head."""
    from stackwise_cli.train.stack import _freeze, _setup_one

    _set(project, curriculum="right-to-left", train={"frozen_dtype": "fp32"})
    grow(project, "left")
    train_stack(project, 0, steps=6)
    grow(project, "left")
    m = project.load()
    dev = torch.device("cpu")

    def grads(suffix_checkpointing: bool, frozen_dtype: str, suffix: bool) -> dict[str, torch.Tensor]:
        mm = dataclasses.replace(m, rack=m.rack if suffix else m.rack[:1])
        tr = dataclasses.replace(m.recipe.train, suffix_checkpointing=suffix_checkpointing, frozen_dtype=frozen_dtype)
        mm.recipe = dataclasses.replace(m.recipe, train=tr)
        stack, ends = load_stack(project, mm, 1), load_ends(project, mm)
        _freeze([stack, ends])
        setup = _setup_one(project, mm, 1, 0, stack, ends, dev)
        for p in setup.trainable.values():
            p.requires_grad_(True)
        setup.loss(setup.data.get(np.arange(8), dev)).backward()
        return {n: p.grad.clone() for n, p in setup.trainable.items() if n.startswith("stack.")}

    plain = grads(False, "fp32", True)
    assert all(g.abs().sum() > 0 for g in plain.values())
    checkpointed = grads(True, "fp32", True)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)  # recompute, same gradient
    nf4 = grads(True, "nf4", True)
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert torch.nn.functional.cosine_similarity(flat(plain), flat(nf4), dim=0) > 0.8
    assert not torch.allclose(flat(plain), flat(nf4))  # the 4-bit suffix is really in the path
    direct = grads(False, "fp32", False)  # no suffix: the head reads the new stack directly
    assert torch.nn.functional.cosine_similarity(flat(plain), flat(direct), dim=0) < 0.99
    with pytest.raises(ProjectError, match="only the leftmost stack"):
        train_stack(project, 0, steps=30, resume="never")


def test_curricula_refuse_the_wrong_moves(project):
    _set(project, curriculum="right-to-left")
    grow(project, "left")
    with pytest.raises(ProjectError, match="--side left"):
        grow(project, "right")
    with pytest.raises(ProjectError, match="end to end"):
        train_stack(project, "all")
    with pytest.raises(ProjectError, match="no cache is read"):
        build_cache(project, 0, "train")
    _set(project, curriculum="end-to-end")
    with pytest.raises(ProjectError, match="train-stack all"):
        train_stack(project, 0)


def test_end_to_end_trains_everything_at_the_same_token_budget(project):
    _set(project, curriculum="end-to-end", objective="mlm")
    grow(project)
    grow(project)
    before = _files(project)
    result = train_stack(project, "all")
    after = _files(project)
    assert all(before[k] != after[k] for k in before)  # the embedding, head and every stack trained
    m = project.load()
    tr = m.recipe.train
    assert result.steps == 2 * tr.steps  # = training each of the 2 stacks for train.steps
    assert result.tokens == 2 * tr.steps * tr.batch_size * m.data.seq_len
    assert all(s.state == "trained" and s.trained_by == "end-to-end" for s in m.rack)
    assert train_stack(project, "all") is None  # done: nothing to do


def test_masked_training_resumes_bit_identically(project):
    from stackwise_cli.errors import Stopped

    _set(project, objective="diffusion")
    grow(project)
    other = Project(project.root.parent / "copy")
    import shutil

    shutil.copytree(project.root, other.root)
    train_stack(project, 0, steps=12)
    with pytest.raises(Stopped):
        train_stack(other, 0, steps=12, stop_at=7)
    train_stack(other, 0, steps=12)
    assert project.load().stack(0).sha256 == other.load().stack(0).sha256


def test_eval_reports_each_objectives_numbers(project):
    from stackwise_cli.evaluate.eval import evaluate

    _set(project, objective="diffusion", diffusion=DiffusionRecipe(eval_points=4))
    grow(project)
    train_stack(project, 0, steps=4)
    r = evaluate(project, max_sequences=16)
    assert r.objective == "diffusion" and r.attention == "bidirectional"
    assert [p.t for p in r.per_t] == [0.125, 0.375, 0.625, 0.875]
    assert r.loss == pytest.approx(sum(p.elbo_term for p in r.per_t) / 4)
    for p in r.per_t:  # the ELBO term is the masked loss weighted by (share masked) / t, about 1
        assert p.elbo_term == pytest.approx(p.masked_loss, rel=0.35) and 0 <= p.accuracy <= 1
    causal = evaluate(project, max_sequences=16, causal=True)
    assert causal.objective == "clm" and causal.attention == "causal" and causal.per_t == []


def test_objective_needs_a_mask_token():
    r = Recipe(name="x", objective="mlm")
    with pytest.raises(ProjectError, match=r"\[MASK\]"):
        objective_for(r, None, VOCAB, 0.15)


def test_eval_masks_as_training_does(project: Project, monkeypatch):
    # eval's mlm readout must corrupt with the objective a stack trained with: the same ids never drawn as
    # random replacements, so its masked loss is the training objective's on held-out text.
    import stackwise_cli.evaluate.eval as ev

    _set(project, objective="mlm")
    grow(project)
    train_stack(project, 0, steps=2)
    made: list[Objective] = []

    def recording(*args, **kwargs):
        made.append(objective_for(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(ev, "objective_for", recording)
    ev.evaluate(project, max_sequences=4)
    trained = stack_objective(project.load(), 0)
    assert made and all(o.excluded_ids() == trained.excluded_ids() for o in made)


def test_a_project_from_before_special_ids_keeps_its_masks(project: Project):
    # Its stacks and caches were made with replacements drawn from every id but [MASK]: the objective (and so
    # every cache key) must stay that one, or an upgrade would call all its mlm caches stale.
    _set(project, objective="mlm")
    with project.update() as m:
        m.tokenizer.special_ids, m.tokenizer.pad_id = [], None
    m = project.load()
    old = Objective(
        "mlm",
        seed=m.recipe.train.seed,
        mask_id=m.tokenizer.mask_id,
        vocab=m.tokenizer.vocab_size,
        ratio=m.recipe.mask.ratio,
    )
    assert stack_objective(m, None).key() == old.key() and "special" not in old.key()
