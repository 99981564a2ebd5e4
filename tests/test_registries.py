"""An objective and a curriculum are each one class in a registry: a toy one registered from here, touching no other
file, is accepted by the recipe and used by the code that trains, scores, grows and tidies (docs/architecture.md,
"Adding things")."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.curricula import CURRICULA, Curriculum
from stackwise_cli.data.tokenizer import needs_mask
from stackwise_cli.errors import RecipeError
from stackwise_cli.evaluate.eval import evaluate
from stackwise_cli.evaluate.generate import resolve_mode
from stackwise_cli.evaluate.trained import train_command
from stackwise_cli.objectives import OBJECTIVES, ObjectiveKind
from stackwise_cli.objectives.base import masked
from stackwise_cli.recipe import recipe_from_data
from stackwise_cli.store.manifest import stack_objective
from stackwise_cli.store.tidy import dependents, grow_side
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack


class EveryOther(ObjectiveKind):
    """Masks every odd position, whatever the ratio: the loss counts exactly those."""

    name = "every-other"
    scored = "masked loss on the odd positions"

    def problems(self, recipe):
        return [] if recipe.mask.ratio == 0.5 else [("mask.ratio", "every-other masks half: must be 0.5")]

    def corrupt(self, o, tokens, seq_ids, epochs):
        selected = np.zeros(tuple(tokens.shape), dtype=bool)
        selected[:, 1::2] = True
        inputs = tokens.clone()
        inputs[torch.from_numpy(selected)] = o.mask_id
        return masked(o, inputs, tokens, np.full(len(tokens), 0.5), selected)


class FromTheTop(Curriculum):
    """Grows on the left and trains the stack grown first (the rightmost untrained one) next."""

    name = "from-the-top"
    grows = "left"
    plan_stage = "train-stack-r2l"

    def check(self, m, stack_id):
        return m.position(stack_id)

    def dependents(self, m, pos):
        return m.rack[:pos]

    def next_to_train(self, entries):
        return entries[-1]


@pytest.fixture
def toy_objective(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, EveryOther.name, EveryOther())


@pytest.fixture
def toy_curriculum(monkeypatch):
    monkeypatch.setitem(CURRICULA, FromTheTop.name, FromTheTop())


def test_the_recipe_accepts_exactly_the_registered_names(monkeypatch):
    data = {"name": "x", "objective": "every-other", "curriculum": "from-the-top", "mask": {"ratio": 0.5}}
    with pytest.raises(RecipeError) as e:
        recipe_from_data(data, "toy.yaml")
    assert "toy.yaml: objective: must be one of 'clm', 'mlm', 'diffusion', got 'every-other'" in str(e.value)
    assert "toy.yaml: curriculum: must be one of 'left-to-right', 'right-to-left', 'end-to-end'" in str(e.value)

    monkeypatch.setitem(OBJECTIVES, EveryOther.name, EveryOther())
    monkeypatch.setitem(CURRICULA, FromTheTop.name, FromTheTop())
    r = recipe_from_data(data, "toy.yaml")
    assert (r.objective, r.curriculum, r.bidirectional) == ("every-other", "from-the-top", True)
    with pytest.raises(RecipeError, match="toy.yaml: mask.ratio: every-other masks half"):  # its own check runs
        recipe_from_data({**data, "mask": {"ratio": 0.15}}, "toy.yaml")


def test_a_registered_objective_trains_and_is_scored(project, toy_objective):
    assert needs_mask("every-other") and resolve_mode("every-other", "depth", False, None) == "iterative"
    with project.update() as m:
        m.recipe = dataclasses.replace(
            m.recipe, objective="every-other", mask=dataclasses.replace(m.recipe.mask, ratio=0.5)
        )
    grow(project)
    m = project.load()
    obj = stack_objective(m, 0)
    assert obj.key().startswith("every-other seed=0")  # a cache of its inputs is keyed by it
    c = obj.corrupt(torch.arange(2, 10).reshape(1, 8), np.array([0]), 0)
    assert c.inputs[0, 1::2].eq(m.tokenizer.mask_id).all() and torch.equal(c.inputs[0, ::2], torch.arange(2, 10, 2))
    assert obj.counted(c) == 4

    result = train_stack(project, 0, steps=3)
    assert result is not None and project.load().stack(0).state == "trained"
    scored = evaluate(project)
    assert scored.objective == "every-other" and scored.attention == "bidirectional"
    assert scored.tokens == scored.sequences * m.data.seq_len // 2  # the odd positions of every sequence


def test_a_registered_curriculum_grows_and_orders_the_rack(project, toy_curriculum):
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="from-the-top")
    env = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
    for _ in range(2):  # `grow` with no --side grows on the curriculum's side
        result = CliRunner().invoke(app, ["grow", "-p", str(project.root)], env=env)
        assert result.exit_code == 0 and "on the left" in result.output, result.output
    m = project.load()
    first, second = m.stack(0), m.stack(1)
    assert m.ids() == [second.id, first.id]  # grown on the left
    assert grow_side(m) == "left"  # what tidy tells a user to regrow with
    assert train_command(project, m, m.rack).startswith(f"stackwise train-stack {first.id} ")
    with project.update() as mm:
        mm.stack(second.id).state = "trained"
    assert dependents(project.load(), first.id) == [second.id]  # the stacks to its left read it
    assert dependents(project.load(), second.id) == []
