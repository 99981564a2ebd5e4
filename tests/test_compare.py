"""`stackwise bench compare`: the spec's bad input, FLOP-matched steps, a tiny three-arm run that resumes, and the
evaluator held to `stackwise eval`."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.bench import compare as cmp
from stackwise_cli.bench.peer import next_token_loss, peer_model, score_folder, train_peer
from stackwise_cli.bench.plan import PlanOptions, plan
from stackwise_cli.build import build
from stackwise_cli.evaluate.eval import evaluate, val_tokens
from stackwise_cli.recipe import recipe_from_data

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def write_spec(tmp_path, arms, budget=None, **extra):
    """A recipe (the tiny one, 10 steps a stack) and a spec over it in tmp_path; returns the spec's path."""
    recipe = copy.deepcopy(TINY)
    recipe["train"].update(steps=10, warmup_steps=1)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(recipe))
    spec = {
        "budget": budget or {"like": arms[0]["name"]},
        "out": str(tmp_path / "out"),
        "eval": {"max_sequences": 32, "batch_size": 32, "peer_points": 3},
        "arms": [{"recipe": "tiny.yaml", **a} for a in arms],
        **extra,
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def error_text(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    text = ANSI.sub("", result.stderr)
    assert sum(line.startswith("error:") for line in text.splitlines()) == 1, text
    return text


# --- bad input -------------------------------------------------------------------------------------------------


def test_unknown_keys_name_the_arm_and_the_key(tmp_path):
    spec = write_spec(tmp_path, [{"name": "l2r"}, {"name": "e2e", "sett": {"curriculum": "end-to-end"}}])
    text = error_text(cli("bench", "compare", spec))
    assert "arms[1] 'e2e'.sett: unknown key" in text
    spec = write_spec(tmp_path, [{"name": "l2r"}, {"name": "e2e", "set": {"train.lrr": 0.1}}])
    text = error_text(cli("bench", "compare", spec))
    assert "arms[1] 'e2e'" in text and "train.lrr: unknown key" in text
    spec = write_spec(tmp_path, [{"name": "l2r"}], extra_top=1)
    assert "extra_top: unknown key" in error_text(cli("bench", "compare", spec))
    assert not (tmp_path / "out").exists()  # refused before anything was made


def test_a_recipe_that_does_not_validate_names_the_arm(tmp_path):
    spec = write_spec(tmp_path, [{"name": "l2r"}, {"name": "bad", "set": {"train.lr": -1}}])
    text = error_text(cli("bench", "compare", spec))
    assert "arms[1] 'bad'" in text and "train.lr: must be > 0" in text


def test_arms_with_different_tokenizers_or_data_are_refused(tmp_path):
    arms = [{"name": "a"}, {"name": "b", "set": {"model.vocab_size": 1024}}, {"name": "c", "set": {"data.seq_len": 16}}]
    with pytest.raises(cmp.CompareError) as e:
        cmp.load_comparison(write_spec(tmp_path, arms))
    lines = e.value.message.splitlines()
    assert any("arms[1] 'b'" in x and "model.vocab_size: 1024 differs from arm 'a''s 512" in x for x in lines)
    assert any("arms[2] 'c'" in x and "data.seq_len: 16 differs" in x for x in lines)
    # set alike for every arm under data.set, the data keys are shared and the spec is fine
    ok = write_spec(tmp_path, [{"name": "a"}, {"name": "b"}], data={"set": {"seq_len": 16}})
    assert {a.recipe.data.seq_len for a in cmp.load_comparison(ok).arms} == {16}


def test_budget_like_must_name_an_arm_and_budget_needs_one_of_flops_or_like(tmp_path):
    with pytest.raises(cmp.CompareError, match=r"budget.like: no arm named 'nope'"):
        cmp.load_comparison(write_spec(tmp_path, [{"name": "a"}], budget={"like": "nope"}))
    with pytest.raises(cmp.CompareError, match="exactly one of flops"):
        cmp.load_comparison(write_spec(tmp_path, [{"name": "a"}], budget={"like": "a", "flops": 1e9}))


def test_a_budget_too_small_for_one_step_names_the_arm_and_keeps_the_data(tmp_path):
    spec = write_spec(tmp_path, [{"name": "e2e", "set": {"curriculum": "end-to-end"}}], budget={"flops": 1e6})
    text = error_text(cli("bench", "compare", spec))
    assert "arms[0] 'e2e'" in text and "budget.flops 1e+06 is too small for one step" in text
    assert (tmp_path / "out" / "data-project" / "stackwise.yaml").exists()  # prepared once, kept for the rerun
    assert not (tmp_path / "out" / "arms").exists()


# --- FLOPs -----------------------------------------------------------------------------------------------------


def test_like_gives_every_arm_the_reference_flops_within_one_step(tmp_path):
    arms = [
        {"name": "l2r"},
        {"name": "e2e", "set": {"curriculum": "end-to-end"}},
        {"name": "r2l", "set": {"curriculum": "right-to-left"}},
        {"name": "peer", "kind": "peer"},
        {"name": "wide", "set": {"curriculum": "end-to-end", "model.d_model": 64, "model.d_ff": 128}},
    ]
    c = cmp.load_comparison(write_spec(tmp_path, arms))
    plans = {p.arm.name: p for p in cmp.plan_arms(c, train_tokens=150_000)}
    ref = plans["l2r"]
    assert ref.steps == 10 and ref.fixed_steps  # the reference runs at its recipe's steps
    for name, p in plans.items():
        step = cmp.total_flops(p.stages, p.steps + 1) - cmp.total_flops(p.stages, p.steps)
        assert abs(p.flops - ref.flops) <= 0.5 * step + 1, name  # nearest whole step
        assert p.steps >= 1
    # the FLOPs are the planner's: end to end runs rack.stacks x train.steps steps of its whole-model stage
    e2e = plans["e2e"]
    per_step = plan(e2e.recipe, 1 << 50).stage("end-to-end").flops_per_step
    assert e2e.flops == pytest.approx(e2e.recipe.rack.stacks * e2e.steps * per_step)
    assert e2e.recipe.train.steps == e2e.steps  # written into the arm's recipe
    assert plans["wide"].steps < e2e.steps  # a wider model gets fewer steps for the same FLOPs


def test_step_scale_and_a_finetune_share_spend_the_budget_as_planned(tmp_path):
    arms = [
        {"name": "l2r", "set": {"train.steps": 40}},
        {"name": "front", "set": {"train.step_scale": [1.5, 0.5]}, "finetune": {"share": 0.2}},
    ]
    c = cmp.load_comparison(write_spec(tmp_path, arms))
    plans = {p.arm.name: p for p in cmp.plan_arms(c, train_tokens=150_000)}
    front = plans["front"]
    ft = front.finetune_steps * cmp.finetune_flops_per_step(front.recipe)
    assert front.finetune_steps >= 2 and ft == pytest.approx(0.2 * plans["l2r"].flops, rel=0.1)
    assert abs(front.flops / plans["l2r"].flops - 1) < 0.1

    r = cmp.compare(c.spec_path, arm="front", device="cpu")
    (res,) = r.arms
    m = cmp.Project(c.arm_dir("front") / "project").load()
    n = front.steps
    assert [e.steps for e in m.rack] == [round(1.5 * n), round(0.5 * n)]  # in growth order: the leftmost first
    assert m.fused.finetune_steps == front.finetune_steps
    # the recorded FLOPs (stacks, cache, fine-tune) are what the budget was solved with
    assert res["flops"] == pytest.approx(res["flops_planned"], rel=1e-9)
    assert [p["after"] for p in res["points"]][-1] == "fine-tune"


def test_plan_shows_what_each_arm_will_run_and_runs_nothing(tmp_path):
    wide = {"model.d_model": 128, "model.d_ff": 512}  # blocks, not the head, set the peaks (nothing trains)
    arms = [
        {"name": "l2r", "set": {"train.steps": 40, **wide}},
        {"name": "front", "set": {"train.step_scale": [1.5, 0.5], **wide}, "finetune": {"share": 0.2}},
        {"name": "e2e", "set": {"curriculum": "end-to-end", **wide}},
    ]
    spec = write_spec(tmp_path, arms)
    r = cli("bench", "compare", spec, "--plan", "--json")
    assert r.exit_code == 0, r.output
    got = {a["name"]: a for a in json.loads(r.stdout)["arms"]}
    c = cmp.load_comparison(spec)
    plans = {p.arm.name: p for p in cmp.plan_arms(c, cmp.train_tokens(c.data_project))}
    n = plans["front"].steps
    assert [s["steps"] for s in got["front"]["stages"]] == [round(1.5 * n), round(0.5 * n)]
    assert got["front"]["finetune_steps"] == plans["front"].finetune_steps > 0
    assert [s["steps"] for s in got["l2r"]["stages"]] == [40, 40] and got["l2r"]["at_recipe_steps"]
    assert got["e2e"]["stages"] == [{"stage": "all", "steps": 2 * plans["e2e"].steps, "cache_flops": 0.0}]
    assert got["l2r"]["cache_flops"] > 0 and got["l2r"]["flops"] == pytest.approx(plans["l2r"].flops)
    # the fine-tune trains the whole fused rack, checkpointed as train.finetune_checkpointing says (by default on)
    fused = plan(plans["front"].recipe, 1 << 50, PlanOptions(precision="fp32", device="cpu")).stage("fuse-full")
    assert got["front"]["planned_peak_bytes"] == max(fused.total_bytes, got["l2r"]["planned_peak_bytes"])
    assert fused.total_bytes > got["l2r"]["planned_peak_bytes"]
    assert got["e2e"]["planned_peak_bytes"] > fused.total_bytes  # end to end keeps every block's activations
    assert all(a["state"] == "to run" for a in got.values())
    assert not any((c.arm_dir(name) / "project").exists() for name in got)  # the data prepared, no arm run
    table = cli("bench", "compare", spec, "--plan")
    assert table.exit_code == 0 and "steps a stage" in table.stdout and "+ " in table.stdout
    text = error_text(cli("bench", "compare", spec, "--plan", "--report"))
    assert "--report and --plan: --arm runs one arm, --report and --plan run none" in text


def test_step_scale_is_checked_against_the_rack_and_the_curriculum(tmp_path):
    arms = [{"name": "a", "set": {"train.step_scale": [1.0, 1.0, 1.0]}}]
    text = error_text(cli("bench", "compare", write_spec(tmp_path, arms)))
    assert "arms[0] 'a'" in text and "train.step_scale" in text and "rack.stacks = 2" in text
    arms = [{"name": "a"}, {"name": "b", "set": {"curriculum": "end-to-end"}, "finetune": {"share": 0.2}}]
    text = error_text(cli("bench", "compare", write_spec(tmp_path, arms)))
    assert "arms[1] 'b': finetune: only a stack-wise arm" in text


def test_an_end_to_end_arm_whose_train_steps_its_warmup_fills_is_refused_in_one_line(tmp_path):
    """End to end runs rack.stacks x n steps, but the recipe's rule is on n (train.steps): a warmup between the two
    is one error line naming the arm, not a traceback."""
    arms = [{"name": "l2r"}, {"name": "e2e", "set": {"curriculum": "end-to-end", "train.steps": 1000}}]
    c = cmp.load_comparison(write_spec(tmp_path, arms))
    n = {p.arm.name: p for p in cmp.plan_arms(c, train_tokens=150_000)}["e2e"].steps
    arms[1]["set"]["train.warmup_steps"] = n  # below rack.stacks x n, not below n
    spec = write_spec(tmp_path, arms)
    text = error_text(cli("bench", "compare", spec))
    assert f"arms[1] 'e2e': train.warmup_steps: {n} is not below the {n} steps" in text
    assert error_text(cli("bench", "compare", spec, "--plan"))


def test_a_finetune_share_its_warmup_fills_is_refused_before_any_arm_runs(tmp_path):
    """fuse --finetune-steps refuses a fine-tune no longer than train.warmup_steps: the spec is refused for it at
    once, naming the arm and the key, not after the arm's stacks have trained."""
    arms = [
        {"name": "l2r", "set": {"train.steps": 40}},
        {"name": "short", "set": {"train.warmup_steps": 8}, "finetune": {"share": 0.02}},
    ]
    spec = write_spec(tmp_path, arms)
    text = error_text(cli("bench", "compare", spec))
    assert "arms[1] 'short': finetune.share: 0.02" in text and "train.warmup_steps (8)" in text
    c = cmp.load_comparison(spec)
    assert not (c.arm_dir("l2r") / "project").exists() and not (c.arm_dir("short") / "project").exists()

    # the fine-tune's own warmup (train.finetune_warmup_steps) is the one it must exceed
    arms[1]["set"]["train.finetune_warmup_steps"] = 1
    c = cmp.load_comparison(write_spec(tmp_path, arms))
    short = {p.arm.name: p for p in cmp.plan_arms(c, train_tokens=150_000)}["short"]
    assert 1 < short.finetune_steps <= 8
    arms[1]["set"]["train.finetune_warmup_steps"] = short.finetune_steps
    text = error_text(cli("bench", "compare", write_spec(tmp_path, arms)))
    assert "arms[1] 'short': finetune.share: 0.02" in text
    assert f"train.finetune_warmup_steps ({short.finetune_steps})" in text


# --- a run -----------------------------------------------------------------------------------------------------


def test_three_arms_run_report_and_resume_without_retraining(tmp_path, monkeypatch):
    arms = [{"name": "l2r"}, {"name": "e2e", "set": {"curriculum": "end-to-end"}}, {"name": "peer", "kind": "peer"}]
    spec = write_spec(tmp_path, arms)
    out = tmp_path / "out"

    # one arm, as one Slurm array task would
    r = cmp.compare(spec, arm="l2r", device="cpu")
    assert [a["name"] for a in r.arms] == ["l2r"] and r.missing == ["e2e", "peer"]

    import stackwise_cli.bench.peer as peer_mod
    import stackwise_cli.train.stack as stack_mod

    trained = []
    real_train_stack = stack_mod.train_stack

    def counting(project, stack_id, *a, **k):
        trained.append((project.root.parent.name, stack_id))
        return real_train_stack(project, stack_id, *a, **k)

    import stackwise_cli.build as build_mod

    monkeypatch.setattr(stack_mod, "train_stack", counting)
    monkeypatch.setattr(build_mod, "train_stack", counting)
    r = cmp.compare(spec, device="cpu")
    assert trained == [("e2e", "all")]  # l2r finished earlier: skipped, not retrained
    assert [a["name"] for a in r.arms] == ["l2r", "e2e", "peer"] and not r.missing

    data = json.loads((out / "results.json").read_text())
    by = {a["name"]: a for a in data["arms"]}
    budget = data["budget_flops"]
    assert budget == pytest.approx(by["l2r"]["flops"], rel=1e-9)
    for a in data["arms"]:
        assert abs(a["flops"] / budget - 1) < 0.05, a["name"]
        # what the budget was solved with is what the trainers recorded in the manifest (the peer: its own steps)
        assert a["flops"] == pytest.approx(a["flops_planned"], rel=1e-9), a["name"]
        assert np.isfinite(a["val_loss"]) and a["val_loss"] < np.log(512)  # learned something
        assert a["peak_bytes"] > 0 and a["planned_peak_bytes"] > 0
        assert a["peak_rss_bytes"] is not None  # on the CPU, the whole resident set too
        assert a["val_sequences"] == 32
    # the curve: one point per stack (cumulative FLOPs, rising, ending at the arm's total), e2e's final point, the
    # peer's own eval points
    xs = [p["flops"] for p in by["l2r"]["points"]]
    assert len(xs) == 2 and xs[0] < xs[1] == pytest.approx(by["l2r"]["flops"])
    assert len(by["e2e"]["points"]) == 1 and len(by["peer"]["points"]) == 3
    # every arm's last point is its score: the spec's val sequences (32), not the recipe's eval.max_sequences (64)
    for name in ("l2r", "e2e", "peer"):
        assert by[name]["points"][-1]["loss"] == pytest.approx(by[name]["val_loss"], abs=1e-4), name
    assert by["peer"]["points"][-1]["flops"] == pytest.approx(by["peer"]["flops"])
    md = (out / "results.md").read_text()
    assert all(f"| {name} |" in md for name in by)
    assert (out / "loss_vs_flops.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # rerun: nothing trains again, the results are the same files
    stamps = {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in by}
    monkeypatch.setattr(peer_mod, "train_peer", lambda *a, **k: pytest.fail("the peer trained again"))
    trained.clear()
    result = cli("bench", "compare", spec, "--json")
    assert result.exit_code == 0, result.output
    assert trained == []
    assert {n: (out / "arms" / n / "result.json").stat().st_mtime_ns for n in by} == stamps
    assert [a["name"] for a in json.loads(result.stdout)["arms"]] == ["l2r", "e2e", "peer"]
    table = cli("bench", "compare", spec, "--report")
    assert table.exit_code == 0 and "peer" in table.stdout and "val loss" in table.stdout

    # an arm finished by an earlier version, whose recipe lacks a key added since (at its default), is still done
    path = out / "arms" / "e2e" / "result.json"
    res = json.loads(path.read_text())
    del res["fingerprint"]["recipe"]["train"]["finetune_lr"]
    path.write_text(json.dumps(res))
    assert cli("bench", "compare", spec, "--report").exit_code == 0

    # a spec changed under a finished arm is refused, naming the arm and what changed; nothing is removed
    arms[1]["set"]["train.lr"] = 0.02
    spec = write_spec(tmp_path, arms)
    text = error_text(cli("bench", "compare", spec, "--report"))
    assert "arm 'e2e' finished under another spec" in text and "train.lr was 0.01, now 0.02" in text
    assert (out / "arms" / "e2e" / "result.json").exists()
    planned = json.loads(cli("bench", "compare", spec, "--plan", "--json").stdout)
    assert [a["state"] for a in planned["arms"]] == ["finished", "finished under another spec", "finished"]


# --- the evaluator and the peer --------------------------------------------------------------------------------


def test_the_hf_evaluator_on_a_fused_export_equals_stackwise_eval(project):
    build(project, device="cpu")
    m = project.load()
    tokens = val_tokens(project, m, "val", 64)
    ours = evaluate(project, max_sequences=64, device="cpu").loss
    theirs = score_folder(project.path("fused"), tokens, 16, torch.device("cpu"))
    assert theirs == pytest.approx(ours, abs=1e-4)


def test_the_peer_is_deterministic_and_learns(project):
    m = project.load()
    recipe = recipe_from_data({**copy.deepcopy(TINY), "name": "peer"}, "tiny")
    stream = np.concatenate([np.asarray(s) for s in val_tokens(project, m, "train", 200)]).reshape(-1)
    val = val_tokens(project, m, "val", 32)
    dev = torch.device("cpu")
    runs = []
    for _ in range(2):
        model = peer_model(recipe, m.tokenizer.eos_id, m.tokenizer.pad_id, seed=0)
        before = next_token_loss(model, val, 32, dev)
        score = lambda mod: next_token_loss(mod, val, 32, dev)  # noqa: B023
        runs.append(train_peer(model, stream, recipe.train, 32, 12, dev, {6, 12}, score))
    assert runs[0].losses == runs[1].losses and runs[0].points == runs[1].points
    assert [s for s, _ in runs[0].points] == [6, 12]
    assert runs[0].points[-1][1] < before - 0.5
    assert runs[0].tokens == 12 * recipe.train.batch_size * 32
    n_layers = recipe.rack.stacks * recipe.rack.blocks_per_stack
    assert model.config.num_hidden_layers == n_layers and model.config.hidden_size == recipe.model.d_model
