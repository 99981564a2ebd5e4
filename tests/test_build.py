"""End to end: `stackwise build` on the tiny recipe, then the fused model in transformers."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.evaluate.eval import unigram_entropy
from stackwise_cli.store.project import Project

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb"}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_recipe_path):
    root = tmp_path_factory.mktemp("build") / "proj"
    args = ["build", "-p", str(root), "--recipe", str(tiny_recipe_path), "--set", "train.steps=60", "--json"]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    return root, json.loads(result.stdout), args


def test_build_runs_every_stage_and_the_loss_falls_stack_by_stack(built):
    root, out, _ = built
    assert out["ran"] == ["prepare", "grow -> 0", "train-stack 0", "grow -> 1", "cache 1", "train-stack 1", "fuse"]
    per_stack = out["eval"]["per_stack"]
    assert [s["id"] for s in per_stack] == [0, 1]
    assert per_stack[-1]["loss"] < per_stack[0]["loss"]
    assert out["eval"]["loss"] == per_stack[-1]["loss"]
    # a model that has learned anything beats the context-free unigram model of the same data
    assert out["eval"]["loss"] < unigram_entropy(Project(root))
    m = Project(root).load()
    assert [s.state for s in m.rack] == ["trained", "trained"]


def test_build_again_does_nothing(built, tmp_path):
    root, first, args = built
    copy = tmp_path / "proj"
    shutil.copytree(root, copy)
    before = {p: p.read_bytes() for p in (copy / "stacks").iterdir()}
    args = [a if a != str(root) else str(copy) for a in args]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    again = json.loads(result.stdout)
    assert again["ran"] == [] and again["eval"]["loss"] == first["eval"]["loss"]
    assert before == {p: p.read_bytes() for p in (copy / "stacks").iterdir()}


def test_build_resumes_after_a_half_finished_run(built, tmp_path):
    """Simulate a kill after stack 1 was grown and cached but before it trained: build finishes the job."""
    root, first, args = built
    copy = tmp_path / "proj"
    shutil.copytree(root, copy)
    p = Project(copy)
    with p.update() as m:  # roll stack 1 back to "grown, not trained"
        m.rack[1].state, m.rack[1].steps = "new", 0
        m.fused = None
    args = [a if a != str(root) else str(copy) for a in args]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ran"] == ["train-stack 1", "fuse"]


def test_fused_model_loads_in_transformers_with_the_same_logits(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stackwise_cli.model.io import load_rack

    root, _, _ = built
    p = Project(root)
    rack = load_rack(p, p.load()).eval()
    hf = AutoModelForCausalLM.from_pretrained(root / "fused", dtype=torch.float32).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tok = AutoTokenizer.from_pretrained(root / "fused")
    ids = torch.tensor([tok.encode("def main():\n    return 0\n")[:32]])
    with torch.no_grad():
        diff = (hf(ids).logits - rack(ids)).abs().max().item()
    assert diff < 1e-4


def test_build_of_a_rack_llama_cannot_hold_skips_fuse_and_says_why(tmp_path, tiny_recipe_path):
    args = [
        "build",
        "-p",
        str(tmp_path / "mla"),
        "--recipe",
        str(tiny_recipe_path),
        "--json",
        "--set",
        "attention.kind=mla",
        "--set",
        "train.steps=8",
        "--set",
        "data.max_bytes=100000",
    ]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert "fuse" not in out["ran"] and "'mla'" in out["no_fuse"]
    assert len(out["eval"]["per_stack"]) == 2 and not (tmp_path / "mla" / "fused").exists()


EXPECTED_STAGES = {
    "left-to-right": ["prepare", "grow -> 0", "train-stack 0", "grow -> 1", "cache 1", "train-stack 1"],
    "right-to-left": ["prepare", "grow --side left -> 0", "train-stack 0", "grow --side left -> 1", "train-stack 1"],
    "end-to-end": ["prepare", "grow -> 0", "grow -> 1", "train-stack all"],
}


@pytest.mark.parametrize("curriculum", list(EXPECTED_STAGES))
@pytest.mark.parametrize("objective", ["clm", "mlm", "diffusion"])
def test_build_runs_every_objective_and_curriculum(objective, curriculum, _prepared, tiny_recipe_path, tmp_path):
    """Each pair through `stackwise build`, from a copy of the prepared tiny project with the recipe changed."""
    import dataclasses

    root = tmp_path / "proj"
    shutil.copytree(_prepared, root)
    project = Project(root)
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, objective=objective, curriculum=curriculum)
    args = ["build", "-p", str(root), "--json"]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    expected = EXPECTED_STAGES[curriculum][1:]  # prepared already
    assert out["ran"][: len(expected)] == expected
    assert ("fuse" in out["ran"]) == (objective == "clm")  # llama exports only a causal model
    ev = out["eval"]
    assert ev["objective"] == objective and ev["attention"] == ("causal" if objective == "clm" else "bidirectional")
    assert 0 < ev["loss"] < 10 and 0 <= ev["accuracy"] <= 1
    assert len(ev["per_t"]) == (project.load().recipe.diffusion.eval_points if objective == "diffusion" else 0)
    m = project.load()
    assert all(s.state == "trained" and s.trained_by == curriculum for s in m.rack)
    ratios = [s.mask_ratio for s in m.rack]
    assert ratios == {"clm": [None, None], "mlm": [0.15, 0.15], "diffusion": [0.9, 0.15]}[objective]
    again = CliRunner().invoke(app, args, env=ENV)
    assert json.loads(again.stdout)["ran"] == []  # idempotent


def _stack_weights(root) -> dict[int, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {int(p.stem): load_file(p) for p in (root / "stacks").glob("*.safetensors")}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_with_rack_init_copy_starts_random_then_copies(_prepared, tmp_path, monkeypatch):
    """`rack.init: copy` is how the rack grows: the first stack has nothing to copy and starts random; the second
    starts as its left neighbour, trained, at the time it is grown."""
    import dataclasses

    import stackwise_cli.build as build_mod
    from stackwise_cli.train.grow import grow

    root, fresh = tmp_path / "proj", tmp_path / "random"
    shutil.copytree(_prepared, root)
    shutil.copytree(_prepared, fresh)
    project = Project(root)
    with project.update() as m:
        r = m.recipe
        m.recipe = dataclasses.replace(
            r, rack=dataclasses.replace(r.rack, init="copy"), train=dataclasses.replace(r.train, steps=4)
        )
    before = {}  # stack id -> every stack's weights just before that stack trains
    real = build_mod.train_stack

    def snapshot(p, stack_id, **kw):
        before[stack_id] = _stack_weights(root)
        return real(p, stack_id, **kw)

    monkeypatch.setattr(build_mod, "train_stack", snapshot)
    result = build_mod.build(project)
    assert result.ran[:5] == ["grow -> 0", "train-stack 0", "grow -> 1", "cache 1", "train-stack 1"]
    m = project.load()
    assert [s.init for s in m.rack] == ["random", "copy"]
    grow(Project(fresh), init="random")  # the random init depends only on (train.seed, id)
    assert _equal(before[0][0], _stack_weights(fresh)[0])
    assert _equal(before[1][1], before[1][0])  # as grown: a copy of stack 0, trained
    assert not _equal(before[1][0], before[0][0])  # (which training had changed from its random start)
    assert not _equal(_stack_weights(root)[1], before[1][1])  # and then trained on its own


@pytest.mark.parametrize("init", ["copy", "identity"])
def test_the_first_stack_of_a_recipe_init_is_random(project, init):
    import dataclasses

    from stackwise_cli.train.grow import grow

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, rack=dataclasses.replace(m.recipe.rack, init=init))
    assert grow(project).init == "random"
    assert grow(project).init == init


def test_rack_init_depth_gives_a_shallower_rack_the_first_stack_of_a_deeper_one(project, tmp_path):
    """The first stack of a 2-stack plan and the only stack of a 1-stack plan start from the same weights exactly
    when the 1-stack plan sets rack.init_depth to the 2-stack plan's blocks (GPT-2's output-projection scaling)."""
    import dataclasses

    from stackwise_cli.model.io import load_stack
    from stackwise_cli.train.grow import grow

    def first_stack(stacks: int, init_depth: int | None) -> dict[str, torch.Tensor]:
        root = tmp_path / f"p{stacks}-{init_depth}"
        shutil.copytree(project.root, root)
        p = Project(root)
        with p.update() as m:
            rack = dataclasses.replace(m.recipe.rack, stacks=stacks, init_depth=init_depth)
            m.recipe = dataclasses.replace(m.recipe, rack=rack)
        grow(p)
        return load_stack(p, p.load(), 0).state_dict()

    deep = first_stack(2, None)  # TINY: 1 block a stack, so 2 planned blocks
    same, own = first_stack(1, 2), first_stack(1, None)
    assert all(torch.equal(deep[k], same[k]) for k in deep)
    out = [k for k in deep if not torch.equal(deep[k], own[k])]
    assert out and all(k.endswith(("attn.o.weight", "mlp.down.weight")) for k in out)  # the output projections
    assert float(own[out[0]].std() / deep[out[0]].std()) == pytest.approx(2**0.5, rel=0.1)


def test_an_init_error_names_where_the_init_came_from(project):
    """A recipe's rack.init is named by its key; grow's --init by the flag."""
    import dataclasses

    from stackwise_cli.errors import ProjectError
    from stackwise_cli.train.grow import grow

    with pytest.raises(ProjectError, match="--init copy needs a neighbouring stack") as e:
        grow(project, init="copy")
    assert "rack.init" not in str(e.value)
    grow(project)
    with pytest.raises(ProjectError, match="^--init copy duplicates stack 0") as e:
        grow(project, blocks=3, init="copy")
    assert "rack.init" not in str(e.value) and "--blocks 1" in e.value.hint
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, rack=dataclasses.replace(m.recipe.rack, init="copy"))
    with pytest.raises(ProjectError, match="^rack.init copy duplicates stack 0") as e:
        grow(project, blocks=3)
    assert "rack.init: random" in e.value.hint


def test_build_takes_val_from_val_input(tmp_path, tiny_recipe_path):
    from stackwise_cli.data.corpus import iter_documents

    text = "\n".join(d.text for d in iter_documents([], 80_000))
    (tmp_path / "train.txt").write_text(text[: len(text) // 2])
    (tmp_path / "val.txt").write_text(text[len(text) // 2 :])
    root = tmp_path / "proj"
    args = ["build", "-p", str(root), "--recipe", str(tiny_recipe_path), "--set", "train.steps=4", "--json"]
    args += ["--input", str(tmp_path / "train.txt"), "--val-input", str(tmp_path / "val.txt")]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    m = Project(root).load()
    assert m.data.holdout.method == "val-input" and m.data.documents == {"train": 1, "val": 1}


def test_build_trains_in_the_precision_it_is_given(tmp_path, tiny_recipe_path):
    # A stage build reruns after a kill resumes a checkpoint only in the precision it was made with.
    root = tmp_path / "proj"
    args = ["build", "-p", str(root), "--recipe", str(tiny_recipe_path), "--precision", "fp8", "--json"]
    args += ["--set", "train.steps=4", "--set", "data.max_bytes=100000"]
    result = CliRunner().invoke(app, args, env=ENV)
    assert result.exit_code == 0, result.output
    assert {s.precision for s in Project(root).load().rack} == {"fp8"}


def test_unigram_baseline_scores_the_sequences_eval_scores(project):
    """The context-free baseline is scored on the first eval.max_sequences sequences, as eval is: on a split whose
    files differ in difficulty, the whole split's entropy is another number, and a loss compared with it misleads."""
    from stackwise_cli.evaluate.eval import val_tokens

    m = project.load()
    n = m.recipe.eval.max_sequences
    assert len(val_tokens(project, m, "val", None)) > n  # the split is larger than what eval scores
    assert unigram_entropy(project) == unigram_entropy(project, max_sequences=n)
    assert unigram_entropy(project) != unigram_entropy(project, max_sequences=n // 2)
