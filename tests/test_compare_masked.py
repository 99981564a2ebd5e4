"""`stackwise bench compare` for the masked objectives: mlm and diffusion arms scored by one transformers evaluator
at masks drawn from the seed alone, held to stackwise's own forward, and a masked peer."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from test_compare import cli, error_text

from stackwise_cli.bench import compare as cmp
from stackwise_cli.bench.peer import (
    MaskedScoring,
    bidirectional_llama,
    eval_masks,
    hf_logits,
    load_masked_lm,
    masked_loss,
    peer_model,
    train_peer,
)
from stackwise_cli.build import build
from stackwise_cli.evaluate.eval import val_tokens
from stackwise_cli.model.io import load_current_rack
from stackwise_cli.recipe import recipe_from_data
from stackwise_cli.store.project import Project

CPU = torch.device("cpu")


def bert_tiny() -> dict:
    r = copy.deepcopy(TINY)
    r["model"] = {
        "family": "bert", "vocab_size": 512, "d_model": 32, "n_heads": 4, "d_ff": 64, "max_seq_len": 32,
        "tie_embeddings": True,
    }  # fmt: skip
    r["attention"] = {"kind": "mha"}
    return {**r, "name": "test-bert", "objective": "mlm"}


def masked_spec(tmp_path, recipe: dict, arms: list[dict], **eval_keys):
    recipe = copy.deepcopy(recipe)
    recipe["train"].update(steps=10, warmup_steps=1)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "budget": {"like": arms[0]["name"]},
        "out": str(tmp_path / "out"),
        "eval": {"max_sequences": 32, "batch_size": 32, "peer_points": 2, **eval_keys},
        "arms": [{"recipe": "r.yaml", **a} for a in arms],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _with_recipe(_prepared, tmp_path, data: dict) -> Project:
    root = tmp_path / "proj"
    shutil.copytree(_prepared, root)
    project = Project(root)
    with project.update() as m:
        m.recipe = recipe_from_data(data, "test")
    return project


# --- the masks and the evaluator -------------------------------------------------------------------------------


def test_eval_masks_depend_on_the_ratio_and_seed_only():
    a = eval_masks((5, 40), 0.15)
    assert a.shape == (5, 40) and (a.sum(axis=1) == 6).all()  # round(0.15 * 40) in every row
    assert (eval_masks((5, 40), 0.15) == a).all()  # the same for every arm, every run
    assert (eval_masks((5, 40), 0.5).sum(axis=1) == 20).all()
    assert not (eval_masks((5, 40), 0.15, seed=1) == a).all()
    assert eval_masks((3, 8), 0.01).sum() == 3  # at least one position a row


@pytest.mark.parametrize("objective", ["diffusion", "mlm"])
def test_a_masked_llama_rack_in_transformers_equals_stackwise_with_a_full_mask(objective, _prepared, tmp_path):
    """No transformers class computes a bidirectional llama: the evaluator runs LlamaForCausalLM on its weights with
    a full 4-D attention mask. Held to stackwise's forward at the same masks; without the mask it is causal and
    scores something else."""
    data = {**copy.deepcopy(TINY), "objective": objective}
    data["train"]["steps"] = 15
    project = _with_recipe(_prepared, tmp_path, data)
    build(project, device="cpu")
    m, rack = load_current_rack(project)
    val = val_tokens(project, m, "val", 32)
    how = MaskedScoring.of(objective, m.tokenizer.mask_id, 0.15, 4)
    ours = masked_loss(lambda x: rack.eval()(x, False, None), val, how, 16, CPU)
    model = bidirectional_llama(rack, m.tokenizer.eos_id, m.tokenizer.pad_id)
    theirs = masked_loss(hf_logits(model, bidirectional_mask=True), val, how, 16, CPU)
    assert theirs == pytest.approx(ours, abs=1e-4)
    causal = masked_loss(hf_logits(model), val, how, 16, CPU)
    assert abs(causal - ours) > 1e-3  # ten times the tolerance above
    assert cmp.score_arm(project, val, how, 16, CPU) == pytest.approx(theirs, abs=1e-6)


def test_a_bert_export_in_transformers_equals_stackwise_at_the_same_masks(_prepared, tmp_path):
    project = _with_recipe(_prepared, tmp_path, bert_tiny())
    build(project, device="cpu")
    m, rack = load_current_rack(project)
    val = val_tokens(project, m, "val", 32)
    how = MaskedScoring.of("mlm", m.tokenizer.mask_id, 0.15, 8)
    ours = masked_loss(lambda x: rack.eval()(x, False, None), val, how, 16, CPU)
    theirs = masked_loss(hf_logits(load_masked_lm(project.fused_dir)), val, how, 16, CPU)
    assert theirs == pytest.approx(ours, abs=1e-4)
    # the ELBO is the grid's mean of each t's summed masked loss over t, per position
    grid = MaskedScoring.of("diffusion", m.tokenizer.mask_id, 0.15, 2)
    per_t = [masked_loss(lambda x: rack(x, False, None), val, MaskedScoring(grid.mask_id, (t,), False), 16, CPU)
             for t in grid.ratios]  # fmt: skip
    counts = [eval_masks(val.shape, t).sum() for t in grid.ratios]
    want = np.mean([loss * n / t / val.size for loss, n, t in zip(per_t, counts, grid.ratios)])
    assert masked_loss(lambda x: rack(x, False, None), val, grid, 16, CPU) == pytest.approx(want, rel=1e-6)


def test_the_masked_peer_is_a_masked_lm_and_learns(project):
    m = project.load()
    recipe = recipe_from_data(bert_tiny(), "bert")
    stream = val_tokens(project, m, "train", 200).reshape(-1)
    val = val_tokens(project, m, "val", 32)
    how = MaskedScoring.of("mlm", m.tokenizer.mask_id, 0.15, 8)
    score = lambda mod: masked_loss(hf_logits(mod), val, how, 32, CPU)  # noqa: E731
    runs = []
    for _ in range(2):
        model = peer_model(recipe, m.tokenizer.eos_id, m.tokenizer.pad_id, seed=0)
        before = score(model)
        masking = (0.15, m.tokenizer.mask_id, m.tokenizer.vocab_size)
        runs.append(train_peer(model, stream, recipe.train, 32, 20, CPU, {20}, score, masking))
    assert type(model).__name__ == "BertForMaskedLM"
    assert runs[0].losses == runs[1].losses  # seeded windows and masks
    assert runs[0].points[-1][1] < before - 0.5


# --- the spec --------------------------------------------------------------------------------------------------


def test_masked_arms_bad_input_names_the_arm_and_the_key(tmp_path):
    diff = {**copy.deepcopy(TINY), "objective": "diffusion"}
    text = error_text(
        cli("bench", "compare", masked_spec(tmp_path, diff, [{"name": "a"}, {"name": "p", "kind": "peer"}]))
    )
    assert "arms[1] 'p': kind: peer" in text and "diffusion" in text
    arms = [{"name": "a"}, {"name": "b", "set": {"objective": "clm"}}]
    text = error_text(cli("bench", "compare", masked_spec(tmp_path, diff, arms)))
    assert "arms[1] 'b': objective: 'clm' differs from arm 'a''s 'diffusion'" in text
    text = error_text(cli("bench", "compare", masked_spec(tmp_path, bert_tiny(), [{"name": "a"}], mask_ratio=1.5)))
    assert "eval.mask_ratio" in text
    arms = [{"name": "a"}, {"name": "ft", "finetune": {"share": 0.3}}]
    text = error_text(cli("bench", "compare", masked_spec(tmp_path, diff, arms)))
    assert "arms[1] 'ft': finetune: the fine-tune writes fused/" in text
    time_input = {**diff, "diffusion": {"time": "input"}}
    text = error_text(cli("bench", "compare", masked_spec(tmp_path, time_input, [{"name": "a"}])))
    assert "arms[0] 'a'" in text and "time" in text


def test_the_masked_eval_keys_are_part_of_a_masked_arms_fingerprint_only(tmp_path):
    clm = cmp.load_comparison(masked_spec(tmp_path, TINY, [{"name": "a"}]))
    mlm = cmp.load_comparison(masked_spec(tmp_path, bert_tiny(), [{"name": "a"}]))
    for c, changes in ((clm, False), (mlm, True)):
        (ap,) = cmp.plan_arms(c, train_tokens=100_000)
        other = cmp.EvalSpec(**{**cmp.to_data(c.spec.eval), "mask_ratio": 0.3})
        assert (ap.fingerprint(other) != ap.fingerprint(c.spec.eval)) == changes


# --- a run -----------------------------------------------------------------------------------------------------


def test_mlm_arms_run_and_report_with_the_masked_evaluator(tmp_path):
    arms = [{"name": "l2r"}, {"name": "e2e", "set": {"curriculum": "end-to-end"}}, {"name": "peer", "kind": "peer"}]
    spec = masked_spec(tmp_path, bert_tiny(), arms)
    result = cli("bench", "compare", spec, "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "masked positions (0.15" in data["scored_as"]
    by = {a["name"]: a for a in data["arms"]}
    for a in data["arms"]:
        assert a["flops"] == pytest.approx(a["flops_planned"], rel=1e-9), a["name"]
        assert abs(a["flops"] / data["budget_flops"] - 1) < 0.1, a["name"]
        assert np.isfinite(a["val_loss"]) and a["val_loss"] < np.log(512), a["name"]
        assert a["planned_peak_bytes"] is None and a["peak_bytes"] > 0  # the planner models llama only
    assert len(by["l2r"]["points"]) == 2 and len(by["peer"]["points"]) == 2
    # the parameters as built: a bert rack and the BertForMaskedLM of the same shape (which adds no weights)
    assert by["l2r"]["params"] == by["e2e"]["params"] == by["peer"]["params"]
    # the last curve point is the rack's own forward at the evaluator's masks: transformers' score to 1e-4
    assert by["l2r"]["points"][-1]["loss"] == pytest.approx(by["l2r"]["val_loss"], abs=1e-4)
    md = (tmp_path / "out" / "results.md").read_text()
    assert "masked positions" in md and "| peer |" in md


def test_diffusion_arms_run_and_are_scored_as_the_elbo(tmp_path, monkeypatch):
    import stackwise_cli.build as build_mod
    import stackwise_cli.train.stack as stack_mod

    # every arm's peak is measured around its training alone: no meter is open while build fuses and evaluates
    open_meters, real_enter, real_exit = [0], cmp.PeakMemory.__enter__, cmp.PeakMemory.__exit__
    seen = {"train": [], "eval": []}

    def enter(self):
        open_meters[0] += 1
        return real_enter(self)

    def leave(self, *exc):
        open_meters[0] -= 1
        return real_exit(self, *exc)

    def watched(fn, what):
        def call(*a, **k):
            seen[what].append(open_meters[0])
            return fn(*a, **k)

        return call

    monkeypatch.setattr(cmp.PeakMemory, "__enter__", enter)
    monkeypatch.setattr(cmp.PeakMemory, "__exit__", leave)
    monkeypatch.setattr(build_mod, "train_stack", watched(stack_mod.train_stack, "train"))
    monkeypatch.setattr(build_mod, "evaluate", watched(build_mod.evaluate, "eval"))
    # three stacks: time as depth, the cache before the third runs both stacks from the tokens (each stack's input
    # is masked at its own ratio), which the planned FLOPs must count as the cache pass records them
    diff = {**copy.deepcopy(TINY), "objective": "diffusion"}
    diff["rack"] = {**diff["rack"], "stacks": 3}
    arms = [{"name": "l2r"}, {"name": "e2e", "set": {"curriculum": "end-to-end"}}]
    r = cmp.compare(masked_spec(tmp_path, diff, arms, elbo_points=4), device="cpu")
    assert seen["train"] == [1, 1, 1, 1] and seen["eval"] == [0, 0]  # three stacks and the whole rack; build's evals
    assert "ELBO" in r.scored_as and [a["name"] for a in r.arms] == ["l2r", "e2e"]
    for a in r.arms:
        assert a["flops"] == pytest.approx(a["flops_planned"], rel=1e-9)
        assert 0 < a["val_loss"] < 2 * np.log(512) and a["planned_peak_bytes"] > 0
        assert a["points"][-1]["loss"] == pytest.approx(a["val_loss"], abs=1e-4)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "compare"
SPECS = sorted(p.stem for p in EXAMPLES.glob("*.yaml") if "arms" in yaml.safe_load(p.read_text()))


def test_the_example_specs_are_found():
    assert {"small", "curricula", "outside", "outside-4x", "masked-mlm", "masked-diffusion"} <= set(SPECS)


@pytest.mark.parametrize("name", SPECS)
def test_every_example_spec_validates_from_the_repository_root(name, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent.parent)  # as docs/science.md runs them
    c = cmp.load_comparison(Path("examples/compare") / f"{name}.yaml")
    objectives = {a.recipe.objective for a in c.arms}
    assert len(objectives) == 1 and len(c.arms) >= 3
