"""Recipes: every shipped recipe validates and builds its model on the meta device; errors name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stackwise_cli.errors import RecipeError
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.recipe import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_recipes_are_shipped():
    names = {p.relative_to(p.parent.parent).as_posix() for p in RECIPES}
    assert {"llama/tiny.yaml", "llama/small.yaml", "llama/7b.yaml", "llama/70b.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(p.parent.parent).as_posix())
def test_every_shipped_recipe_validates_and_builds(path):
    recipe = load_recipe(path)
    cfg = recipe.model
    with torch.device("meta"):  # shapes only: the 70B recipe allocates nothing
        stack = Stack(cfg, recipe.rack.blocks_per_stack, recipe.attention)
        ends = Ends(cfg)
    n_stack = sum(p.numel() for p in stack.parameters())
    assert n_stack == cfg.block_params(recipe.attention) * recipe.rack.blocks_per_stack
    assert sum(p.numel() for p in ends.parameters()) == cfg.ends_params()


def test_70b_recipe_has_the_published_shape():
    r = load_recipe(Path(__file__).parent.parent / "recipes/llama/70b.yaml")
    m = r.model
    assert (m.d_model, m.n_heads, m.n_kv_heads, m.d_ff) == (8192, 64, 8, 28672)
    assert r.rack.stacks * r.rack.blocks_per_stack == 80
    total = m.block_params() * 80 + m.ends_params()
    assert 68e9 < total < 70e9  # LLaMA-2 70B: 68.98B parameters


def test_overrides_take_precedence_and_are_validated(tiny_recipe_path):
    r = load_recipe(tiny_recipe_path, ["train.steps=7", "model.d_model=64", "train.betas=[0.8, 0.9]"])
    assert r.train.steps == 7 and r.model.d_model == 64 and r.train.betas == (0.8, 0.9)
    with pytest.raises(RecipeError, match=r"train\.warmup_steps: must be >= 0 and < train\.steps \(1\)"):
        load_recipe(tiny_recipe_path, ["train.steps=1"])


def test_every_problem_is_reported_at_once_with_file_and_key_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel:\n  d_modle: 3\n  n_heads: two\ntrain:\n  lr: -1\nobjective: gan\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(bad)
    lines = str(e.value.message).splitlines()
    assert all(line.startswith(f"{bad}: ") for line in lines)
    text = str(e.value)
    for expected in (
        "model.d_modle: unknown key",
        "model.n_heads: must be an integer",
        "train.lr: must be > 0",
        "objective: must be one of 'clm'",
    ):
        assert expected in text


def test_missing_recipe_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    (tmp_path / "ok.yaml").write_text("name: ok\n")
    with pytest.raises(RecipeError, match="expected key=value"):
        load_recipe(tmp_path / "ok.yaml", ["train.steps"])


def test_grad_accum_defaults_to_one_and_must_be_positive(tiny_recipe_path):
    assert load_recipe(tiny_recipe_path).train.grad_accum == 1
    assert load_recipe(tiny_recipe_path, ["train.grad_accum=8"]).train.grad_accum == 8
    with pytest.raises(RecipeError, match=r"train\.grad_accum: must be >= 1, got 0"):
        load_recipe(tiny_recipe_path, ["train.grad_accum=0"])
