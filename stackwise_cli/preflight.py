"""Preflight: refuse a recipe whose training cannot fit this machine before anything large is allocated or written.

``prepare``, ``grow`` and ``train-stack`` ask the memory planner (``bench/plan.py``) what the recipe's training
stage needs (train-stack for the stacked curricula, the whole model for end-to-end) and set it against the memory
the device has free now: ``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` from /proc/meminfo on the CPU.
One line names the need and the have; ``--force`` runs anyway (the planner is an estimate, docs/memory.md says how
close). The planner models the llama family; other families are not checked.
"""

from __future__ import annotations

import logging
import os

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.errors import StackwiseError
from stackwise_cli.recipe import Recipe

log = logging.getLogger(__name__)


class DoesNotFit(StackwiseError):
    """The planner says the recipe's training needs more memory than the device has free."""


def _device(device: str) -> str:
    """``cpu`` or ``cuda[:N]`` for a --device value (auto: a GPU when torch sees one)."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def available_bytes(device: str) -> int:
    """Memory free for this process now on ``device`` (cpu, cuda or cuda:N)."""
    if device.startswith("cuda"):
        import torch

        index = int(device.partition(":")[2] or 0)
        return int(torch.cuda.mem_get_info(index)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(recipe: Recipe, command: str, device: str = "auto", force: bool = False) -> None:
    """Raise DoesNotFit when the recipe's training stage needs more than ``device`` has free (``force``: only log)."""
    from stackwise_cli.bench.plan import OPTIMIZERS, PlanOptions, plan
    from stackwise_cli.train.defaults import GPU_PRECISION

    if recipe.model.family != "llama":
        return  # the planner models the llama block only
    dev = _device(device)
    kind = "cuda" if dev.startswith("cuda") else "cpu"
    if kind == "cuda" and not _cuda_present():
        return  # --device cuda on a machine without one: the command's own device check says so, in its words
    options = PlanOptions(
        device=kind,
        precision=GPU_PRECISION if kind == "cuda" else "fp32",  # what --precision auto runs there
        optimizer=recipe.train.optimizer if recipe.train.optimizer in OPTIMIZERS else "adamw",
        shards=max(1, int(os.environ.get("WORLD_SIZE", "1"))),  # under torchrun: one rank's share (FSDP2)
    )
    have = available_bytes(dev)
    try:
        # The stage the curriculum trains with: what must fit for the project to get anywhere.
        stage = plan(recipe, max(have, 1), options).stage(curriculum_of(recipe).plan_stage)
    except StackwiseError as e:  # a shape the planner does not model: nothing to check against
        log.debug("preflight skipped: %s", e.message)
        return
    need = stage.total_bytes
    if need <= have:
        return
    message = (
        f"recipe {recipe.name} does not fit: {stage.name} needs {_gib(need)} of {kind.upper()} memory by the "
        f"planner, this machine has {_gib(have)} free on {dev}"
    )
    if force:
        log.warning("--force: %s", message)
        return
    raise DoesNotFit(
        message,
        hint=f"run on a larger device, or shrink the recipe (`stackwise bench plan --recipe <yaml>` shows what each "
        f"stage needs); `{command} --force` runs anyway",
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"
