"""Left to right without a cache (`train.prefix: recompute`) and per-stack steps (`train.step_scale`)."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from stackwise_cli.bench.plan import plan
from stackwise_cli.build import stack_by_stack
from stackwise_cli.errors import RecipeError
from stackwise_cli.flops import FlopShapes, cache_flops_per_token, train_stack_flops_per_token
from stackwise_cli.model.io import load_stack
from stackwise_cli.recipe import load_recipe
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack


def _set_train(project: Project, **train) -> None:
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, train=dataclasses.replace(m.recipe.train, **train))


def _copy(project: Project, name: str) -> Project:
    other = Project(project.root.parent / name)
    shutil.copytree(project.root, other.root)
    return other


def test_recompute_trains_the_stack_the_cache_trains(project):
    """The frozen prefix run on each batch gives the states the fp32 cache holds: the same weights after training."""
    grow(project)
    grow(project)
    train_stack(project, 0, steps=6)
    cached, recomputed = _copy(project, "cached"), _copy(project, "recomputed")
    build_cache(cached, 1, "train")
    train_stack(cached, 1, steps=6)
    _set_train(recomputed, prefix="recompute", frozen_dtype="fp32")
    train_stack(recomputed, 1, steps=6)
    a, b = load_stack(cached, cached.load(), 1), load_stack(recomputed, recomputed.load(), 1)
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    assert not recomputed.load().caches  # nothing was cached
    # its FLOPs: the stack's training plus a no-grad forward of the prefix on every token it read
    m = recomputed.load()
    f = FlopShapes.of(m.recipe, m.data.seq_len)
    per_token = train_stack_flops_per_token(f, 1, head_trains=True, checkpointing=False) + cache_flops_per_token(f, [1])
    assert m.stack(1).flops == pytest.approx(m.stack(1).tokens * per_token, rel=1e-9)
    assert cached.load().stack(1).flops < m.stack(1).flops  # the cached stack paid its forward in the cache pass


def test_build_skips_the_cache_and_step_scale_sets_each_stack_steps(project):
    _set_train(project, prefix="recompute", frozen_dtype="fp32", steps=8, step_scale=[1.5, 0.5])
    ran: list[str] = []
    stack_by_stack(project, 2, "right", device="cpu", ran=ran)
    assert not any(r.startswith("cache") for r in ran), ran
    assert [e.steps for e in project.load().rack] == [12, 4]


def test_the_planner_plans_the_recomputed_prefix(tiny_recipe_path):
    r = load_recipe(tiny_recipe_path, ["rack.stacks=3", "train.prefix=recompute"])
    stage = plan(r, 1 << 40).stage("train-stack-l2r", "recompute")
    cached = plan(load_recipe(tiny_recipe_path, ["rack.stacks=3"]), 1 << 40).stage("train-stack-l2r", "cached")
    assert stage.bytes["frozen"] > cached.bytes["frozen"]  # the prefix's weights are on the device
    f = FlopShapes.of(r)
    assert stage.flops_per_token == pytest.approx(cached.flops_per_token + cache_flops_per_token(f, [1, 1]))


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["train.prefix=recompute", "curriculum=right-to-left"], "train.prefix"),
        (["train.step_scale=[1.0, 1.0, 1.0]"], "train.step_scale"),
        (["train.step_scale=[1.0, 0.01]"], "train.step_scale"),
        (["train.step_scale=[1.0, 1.0]", "curriculum=end-to-end"], "train.step_scale"),
    ],
)
def test_bad_prefix_and_step_scale_name_the_key(tiny_recipe_path, overrides, key):
    with pytest.raises(RecipeError) as e:
        load_recipe(tiny_recipe_path, overrides)
    assert key in e.value.message


def test_a_whole_rack_schedule_gives_each_stack_its_slice_of_one_cosine(project):
    import json

    from stackwise_cli.train.optim import lr_at

    _set_train(
        project,
        prefix="recompute",
        frozen_dtype="fp32",
        steps=8,
        step_scale=[1.5, 0.5],
        warmup_steps=2,
        log_every=1,
        lr_schedule="whole-rack",
    )
    stack_by_stack(project, 2, "right", device="cpu")
    tr = project.load().recipe.train
    for label, offset in (("0", 0), ("1", 12)):
        (log,) = (project.root / "logs").glob(f"train-stack-{label}-*.jsonl")
        logged = [json.loads(line) for line in log.read_text().splitlines()]
        lrs = [r["lr"] for r in logged if "lr" in r]
        want = [lr_at(s + offset, tr, 16) for s in range(len(lrs))]
        assert lrs == pytest.approx(want), label
    # stack 1 starts low where stack 0 stopped, and ends at the floor
    assert lrs[0] < tr.lr * 0.5 and lrs[-1] == pytest.approx(lr_at(15, tr, 16))
