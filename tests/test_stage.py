"""train/stage.py is the one definition of a training stage: the planner's rows, the memory and step benches' random
cases and train-stack's set-up all follow it, so they cannot disagree on what trains."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY

from stackwise_cli.bench.case import random_case
from stackwise_cli.bench.plan import PlanOptions, plan
from stackwise_cli.recipe import apply_overrides, recipe_from_data
from stackwise_cli.train import stage
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack


def _recipe(*sets: str):
    data = copy.deepcopy(TINY)
    data["rack"]["stacks"] = 3
    return recipe_from_data(apply_overrides(data, list(sets)), "test")


@pytest.mark.parametrize(
    "sets",
    [
        (),
        ("train.head=frozen",),
        ("train.embedding=frozen",),
        ("model.tie_embeddings=true",),
        ("model.tie_embeddings=true", "train.head=frozen"),
        ("train.prefix=recompute",),
    ],
)
def test_plan_counts_what_each_stage_trains(sets):
    """Every planned stage's trainable parameter count is what bench/case.py builds for it with train-stack's own
    ``trainable_params``: the planner reads the stage, it does not restate the rules."""
    recipe = _recipe(*sets)
    p = plan(recipe, 10**15, PlanOptions(device="cpu", precision="fp32", headroom_bytes=0))
    for st in stage.planned(recipe):
        case = random_case(recipe, st, "fp32", torch.device("cpu"), batch_size=2)
        built = sum(t.numel() for t in case.trainable.values())
        assert p.stage(st.name, st.variant).params_trainable == built, (st.name, st.variant)
        assert torch.isfinite(case.loss())


def test_the_leftmost_stack_trains_the_head_even_when_later_ones_do_not():
    """train.head: frozen freezes the head for the later stacks only: the first stack trained must train it (a
    random head makes every readout useless), and the plan's leftmost row counts it."""
    recipe = _recipe("train.head=frozen")
    leftmost, later = stage.planned(recipe)[:2]
    assert leftmost.head_trains and not later.head_trains
    p = plan(recipe, 10**15, PlanOptions(device="cpu", precision="fp32", headroom_bytes=0))
    V, d = recipe.model.vocab_size, recipe.model.d_model
    leftmost_trains = p.stage("train-stack-l2r", "leftmost").params_trainable
    # the leftmost trains the stack + embedding (V x d) + final norm (d) + untied head (V x d); a later one the stack
    assert leftmost_trains - p.stage("train-stack-l2r", "cached").params_trainable == 2 * V * d + d


def test_the_stage_of_a_project_is_the_planned_one(project):
    """The stage train-stack builds for a stack of a real rack is the one the plan planned for that place."""
    grow(project, "right")
    grow(project, "right")
    train_stack(project, 0, steps=3)
    m = project.load()
    planned = {(s.name, s.variant): s for s in stage.planned(m.recipe)}
    assert stage.for_stack(m, 0) == planned["train-stack-l2r", "leftmost"]
    assert stage.for_stack(m, 1) == planned["train-stack-l2r", "cached"]
    assert stage.for_stack(m, 1).source == "cache" and stage.for_stack(m, 0).source == "tokens"


def test_recorded_flops_are_the_stage_flops(project):
    """What train-stack records in the manifest is its stage's FLOPs per token times the tokens it trained on."""
    grow(project, "right")
    train_stack(project, 0, steps=3)
    m = project.load()
    e = m.stack(m.rack[0].id)
    from stackwise_cli.flops import FlopShapes

    per_token = stage.flops_per_token(stage.for_stack(m, 0), FlopShapes.of(m.recipe, m.data.seq_len))
    assert e.flops == pytest.approx(per_token * e.tokens)
