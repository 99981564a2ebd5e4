"""Which stacks hold trained weights: eval, generate and fuse never score or export random weights silently.

A stack's manifest state says what its file holds:

- ``trained``, ``frozen``: the weights its training ended with. Accepted.
- ``new``: its initial weights (random, or copied / identity at grow time). Refused.
- ``training``: a run started and has not finished (it is running, or it was stopped and can resume); the file
  still holds the weights from before that run, and the run's progress is only in its checkpoints. Refused.

``fuse`` and ``generate`` refuse any rack with an untrained stack; ``eval`` of a left-to-right rack scores its
trained prefix and says which stacks it left out (each stack was trained with the head reading its output, so the
prefix is a model of its own), and refuses otherwise.
"""

from __future__ import annotations

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.errors import ProjectError
from stackwise_cli.store.manifest import Manifest, StackEntry
from stackwise_cli.store.project import Project

TRAINED_STATES = ("trained", "frozen")


def untrained(m: Manifest) -> list[StackEntry]:
    """The stacks whose file does not hold the weights of a finished training, in rack order."""
    return [s for s in m.rack if s.state not in TRAINED_STATES]


def trained_prefix(m: Manifest) -> int:
    """How many stacks, from the left, are trained before the first that is not."""
    n = 0
    while n < len(m.rack) and m.rack[n].state in TRAINED_STATES:
        n += 1
    return n


def train_command(project: Project, m: Manifest, entries: list[StackEntry]) -> str:
    """The command that trains the next of ``entries`` under the recipe's curriculum."""
    where = f" -p {project.root}"
    nxt = curriculum_of(m.recipe).next_to_train(entries)
    return f"stackwise train-stack {'all' if nxt is None else nxt.id}{where}"


def describe(entries: list[StackEntry]) -> str:
    """``1 (new), 2 (training)``."""
    return ", ".join(f"{s.id} ({s.state})" for s in entries)


def require_trained(project: Project, m: Manifest, what: str) -> None:
    """A ProjectError naming the untrained stacks and the command that trains them, unless every stack is trained.
    ``what``: the command's action, as in "fuse would export"."""
    missing = untrained(m)
    if not missing:
        return
    running = any(s.state == "training" for s in missing)
    why = " (`training`: a run has not finished; its file holds the weights from before it)" if running else ""
    raise ProjectError(
        f"{what} untrained weights: stack(s) {describe(missing)} are not trained{why}",
        hint=f"run `{train_command(project, m, missing)}` (`stackwise build -p {project.root}` trains every "
        "planned stack)",
    )
