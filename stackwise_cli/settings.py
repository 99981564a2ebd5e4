"""Run-time settings: recipe keys that may change after ``prepare`` because they change nothing already computed.

``train-stack``, ``eval`` and ``fuse`` take ``--set key=value`` for them; the new value is written into the
manifest's recipe (so the next command and a reproduction from the manifest see it) with a history entry naming
the command. Any other key is refused, by name: it would make the project's data, stacks or caches something the
recipe no longer describes. ``build`` uses the same tables to say which keys of a changed recipe differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stackwise_cli.errors import RecipeError
from stackwise_cli.recipe import Recipe, apply_overrides, parse_override, recipe_from_data
from stackwise_cli.schema import to_data

# Cadence and sizes: how often a run checkpoints, logs and scores, and how much eval reads. No weight depends on
# them (a resumed run draws the same batches whatever they are).
CADENCE = (
    "train.checkpoint_every",
    "train.checkpoint_every_min",
    "train.keep_checkpoints",
    "train.log_every",
    "train.eval_every",
)
EVAL_SIZES = ("eval.max_sequences", "eval.batch_size")
# The schedule: it shapes the weights a run computes, so it may change only before that run has begun (no stack
# it applies to trained or checkpointed). It is the recipe's: every later run reads the new value too.
SCHEDULE = ("train.lr", "train.steps", "train.warmup_steps", "train.min_lr_ratio")
# A fuse fine-tune's own schedule (null: train.lr, train.warmup_steps): fixed once a fine-tune checkpoint exists.
FINETUNE_SCHEDULE = ("train.finetune_lr", "train.finetune_warmup_steps")

COMMAND_KEYS = {
    "train-stack": (*CADENCE, *EVAL_SIZES, *SCHEDULE),
    "fuse": (*CADENCE, *EVAL_SIZES, "train.lr", "train.warmup_steps", "train.min_lr_ratio", *FINETUNE_SCHEDULE),
    "eval": EVAL_SIZES,
}


@dataclass
class Change:
    key: str
    old: Any
    new: Any


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Plain recipe data as ``{"train.lr": 0.003, ...}`` (lists stay values)."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def differences(old: Recipe, new: Recipe) -> list[Change]:
    """Every key whose value differs between two recipes, in the recipe's order."""
    a, b = flatten(to_data(old)), flatten(to_data(new))
    return [Change(k, a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)]


def with_settings(recipe: Recipe, overrides: list[str], command: str, schedule_open: bool) -> tuple[Recipe, list]:
    """``recipe`` with the ``--set`` overrides of ``command`` applied, and what changed. Refuses a key that is not a
    run-time setting of the command, naming it and the settable ones; a schedule key when ``schedule_open`` is
    False (the run it would shape has begun or is done)."""
    allowed = COMMAND_KEYS[command]
    for text in overrides:
        key = ".".join(parse_override(text)[0])
        others = [c for c, keys in COMMAND_KEYS.items() if key in keys and c != command]
        if key not in allowed and others:
            raise RecipeError(
                f"--set {key}: not a setting of `{command}`, which can set: {', '.join(allowed)}",
                hint=f"pass it to {' or '.join(f'`stackwise {c}`' for c in others)}",
            )
        if key not in allowed:
            raise RecipeError(
                f"--set {key}: not a setting `{command}` can change on a prepared project (it would change what "
                f"was already computed); {command} can set: {', '.join(allowed)}",
                hint="make a new project for other values (`stackwise build --recipe ... --set ...` into a new folder)",
            )
        if key in (*SCHEDULE, *FINETUNE_SCHEDULE) and not schedule_open:
            raise RecipeError(
                f"--set {key}: the run it would shape has begun or is done (trained, or a checkpoint to resume); "
                "its schedule is fixed",
                hint="it can change for a stack not yet trained; one with a checkpoint starts over with --resume never",
            )
    data = apply_overrides(to_data(recipe), list(overrides))
    new = recipe_from_data(data, "--set")
    return new, differences(recipe, new)


def apply_settings(project, overrides: list[str] | None, command: str, schedule_open: bool = False) -> list[Change]:
    """Write the ``--set`` overrides of ``command`` into the project's recipe (``with_settings``), recorded in the
    manifest's history as ``<command> --set key=value ...``. Returns what changed (nothing: nothing written)."""
    if not overrides:
        return []
    new, changes = with_settings(project.load().recipe, overrides, command, schedule_open)
    if changes:
        what = " ".join(f"--set {c.key}={c.new}" for c in changes)
        with project.update(f"{command} {what}") as m:
            m.recipe = new
    return changes


def schedule_open(project, stack_id: int | str, resume: str) -> bool:
    """May ``train-stack stack_id`` still take a new schedule? Yes when every stack it trains is new and no
    checkpoint of it is left to resume (or ``--resume never`` discards that checkpoint)."""
    from stackwise_cli.train import checkpoint as ckpt

    m = project.load()
    entries = m.rack if stack_id == "all" else [m.stack(int(stack_id))]
    fresh = resume == "never" or not ckpt.list_checkpoints(project.ckpt_dir(str(stack_id)))
    return fresh and all(e.state == "new" for e in entries)


def finetune_schedule_open(project, resume: str) -> bool:
    """May ``fuse --finetune-steps`` still take a new schedule? Yes unless a fine-tune checkpoint is to resume."""
    from stackwise_cli.train import checkpoint as ckpt
    from stackwise_cli.train.finetune import CKPT_NAME

    return resume == "never" or not ckpt.list_checkpoints(project.ckpt_dir(CKPT_NAME))
