"""Checkpoints: the typed state.json (TrainState, read with the strict schema), the folder a run keeps them in
(Checkpoints), and resume refused under a changed recipe key, naming it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from stackwise_cli.errors import CorruptFileError, StackwiseError, Stopped
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

# A state.json as train-stack writes it (every key, in the order it writes them).
WRITTEN = {
    "step": 10,
    "steps_total": 30,
    "tokens": 2560,
    "last_loss": 5.25,
    "sampler": {"epoch": 0, "offset": 80},
    "window": [5.5, 5.0],
    "extra": {"prior_steps": 0, "prior_tokens": 0, "prior_flops": 0.0, "best_val": {"step": 10, "val_loss": 5.1}},
    "fingerprint": "abc123",
    "precision": "fp32",
    "settings": {"--precision": "fp32", "train.lr": 0.01, "train.betas": [0.9, 0.95]},
    "trainable": ["ends.embed.weight", "stack.blocks.0.attn.q.weight"],
    "scaler": None,
    "time": 1764633600.5,
}


def _checkpoint(folder, state: dict):
    """One complete checkpoint in ``folder`` whose state.json holds ``state`` as given."""
    path = ckpt.Checkpoints(folder).save(3, {"w": torch.ones(2)}, {}, ckpt.TrainState(**WRITTEN))
    (path / ckpt.STATE).write_text(json.dumps(state))
    return path


def test_a_state_json_as_written_loads_typed_and_saves_back_the_same_keys(tmp_path):
    path = _checkpoint(tmp_path, WRITTEN)
    weights, optim, rng, state = ckpt.load_checkpoint(path)
    assert state.step == 10 and state.sampler == {"epoch": 0, "offset": 80} and state.extra["best_val"]["step"] == 10
    assert state.settings["train.betas"] == [0.9, 0.95] and "torch_cpu" in rng and weights["w"].sum() == 2
    again = ckpt.Checkpoints(tmp_path / "again").save(10, weights, optim, state)
    assert json.loads((again / ckpt.STATE).read_text()) == WRITTEN  # same keys, same order, same values


def test_a_checkpoint_from_before_settings_and_trainable_were_recorded_still_loads(tmp_path):
    old = {k: v for k, v in WRITTEN.items() if k not in ("settings", "trainable", "scaler")}
    state = ckpt.read_state(_checkpoint(tmp_path, old))
    assert state.settings is None and state.trainable is None and state.scaler is None and state.step == 10


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"momentum": 0.9}, "momentum: unknown key"),
        ({"step": "10"}, "step: must be an integer"),
        ({"sampler": {"epoch": "0", "offset": 80}}, "sampler.epoch: must be an integer"),
        ({"fingerprint": 7, "tokens": 1.5}, "tokens: must be an integer"),
    ],
)
def test_a_state_json_with_an_unknown_missing_or_mistyped_key_is_one_error_naming_the_file(tmp_path, change, problem):
    path = _checkpoint(tmp_path, {**WRITTEN, **change})
    with pytest.raises(CorruptFileError, match=problem) as err:
        ckpt.load_checkpoint(path)
    assert str(path / "state.json") in err.value.message and "--resume never" in err.value.hint
    if "fingerprint" in change:  # every problem at once
        assert "fingerprint: must be a string" in err.value.message


def test_a_state_json_missing_a_key_names_it(tmp_path):
    path = _checkpoint(tmp_path, {k: v for k, v in WRITTEN.items() if k != "steps_total"})
    with pytest.raises(CorruptFileError, match="steps_total: required key is missing"):
        ckpt.read_state(path)


def test_a_state_json_that_is_not_json_is_unreadable(tmp_path):
    path = _checkpoint(tmp_path, WRITTEN)
    (path / ckpt.STATE).write_text('{"step": 1,')
    with pytest.raises(CorruptFileError, match="is unreadable"):
        ckpt.Checkpoints(tmp_path).latest_state()


def test_checkpoints_keep_the_newest_and_clear(tmp_path):
    folder = tmp_path / "ckpt" / "0"
    checkpoints = ckpt.Checkpoints(folder, keep=2)
    assert checkpoints.latest() is None and checkpoints.latest_state() is None
    for step in (5, 10, 15):
        checkpoints.save(step, {"w": torch.full((2,), float(step))}, {}, ckpt.TrainState(**{**WRITTEN, "step": step}))
    assert [p.name for p in ckpt.list_checkpoints(folder)] == ["step-00000010", "step-00000015"]
    assert checkpoints.latest().name == "step-00000015" and checkpoints.latest_state().step == 15
    checkpoints.clear()
    assert not folder.exists() and checkpoints.latest() is None


def test_train_stack_refuses_a_corrupt_state_json_with_one_error(project):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    newest = ckpt.Checkpoints(project.ckpt_dir(0)).latest()
    state = json.loads((newest / ckpt.STATE).read_text())
    (newest / ckpt.STATE).write_text(json.dumps({**state, "learning_rate": 0.1}))
    with pytest.raises(CorruptFileError, match="learning_rate: unknown key") as err:
        train_stack(project, 0, steps=20)
    assert str(newest / "state.json") in err.value.message


def _set(project, section: str, **fields) -> None:
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, **{section: dataclasses.replace(getattr(m.recipe, section), **fields)})


@pytest.mark.parametrize(
    ("section", "change", "message"),
    [
        ("train", {"frozen_dtype": "fp32"}, "train.frozen_dtype was 'bf16', now 'fp32'"),
        ("train", {"step_scale": [1.0, 2.0]}, r"train.step_scale was None, now \[1.0, 2.0\]"),
        ("mask", {"mask_token": 0.7}, "mask.mask_token was 0.8, now 0.7"),
        ("diffusion", {"t_max": 0.8}, "diffusion.t_max was 0.9, now 0.8"),
    ],
)
def test_resume_refuses_a_changed_recipe_key_outside_the_loop_naming_it(project, section, change, message):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    _set(project, section, **change)
    with pytest.raises(StackwiseError, match=message) as err:
        train_stack(project, 0, steps=20)
    assert "--resume never" in err.value.hint


def test_resume_names_a_changed_prefix_rather_than_its_changed_inputs(project):
    # train.prefix changes the fingerprint too (the cache or the recomputed prefix): the key is what is named.
    from stackwise_cli.train.cache import build_cache

    grow(project)
    grow(project)
    train_stack(project, 0, steps=5)
    build_cache(project, 1)
    with pytest.raises(Stopped):
        train_stack(project, 1, steps=10, stop_at=3)
    _set(project, "train", prefix="recompute")
    with pytest.raises(StackwiseError, match="train.prefix was 'cache', now 'recompute'"):
        train_stack(project, 1, steps=10)
    _set(project, "train", prefix="cache")
    assert train_stack(project, 1, steps=10).resumed_from == 3  # the old value resumes
