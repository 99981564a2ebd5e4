"""Measured peak memory of a training stage against the planner's figure (docs/memory.md, "Measured against the
plan").

A stage runs real optimizer steps on random data with the pieces ``stackwise train-stack`` uses: ``Stack`` and
``Ends`` from ``model/model.py``, ``make_optimizer``, ``autocast`` and ``grad_scaler``, ``to_fp8`` on the trained
stacks, ``checkpoint_blocks`` for activation checkpointing, ``freeze`` for the right-to-left suffix, the recipe's
objective loss, and gradient clipping. The batch is fixed (random token ids; for a cached left-to-right stack also
a random hidden-state input), so the loss goes down as the steps fit it, and the learning rate is the recipe's
``train.lr`` without warm-up.

How the peak is measured:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated before the
  case was built. bitsandbytes' paged 8-bit states live in CUDA unified memory, which this does not see.
- CPU: the peak resident set (VmHWM) above the resident set just before the case was built, in a fresh process
  with exact accounting (``bench.step.exact_rss_accounting``: glibc maps every block of 64 KiB or more on its own
  and unmaps it when freed, so the resident set follows live memory). VmHWM is reset (``/proc/self/clear_refs``)
  once the case is built, so what building alone needs (an fp32 stack being quantised, say) is not counted. A case
  whose plan is under ``REHEARSE_BELOW_BYTES`` is rehearsed once in the same process first, so torch's one-time
  set-up (thread pools, library loads: tens of MiB) is not counted; a larger one is not, and includes it.

The plan is ``bench.plan.plan`` with the same options and no CUDA headroom row (neither measurement includes the
CUDA context), for the stage's variant: ``cached`` left to right (``leftmost`` for a one-stack rack), ``suffix``
right to left, ``whole`` end to end.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field

from stackwise_cli.bench.plan import PlanOptions, Stage, plan
from stackwise_cli.bench.step import _reset_peak_rss, _rss_bytes, exact_rss_accounting
from stackwise_cli.errors import StackwiseError
from stackwise_cli.recipe import Recipe, apply_overrides, recipe_from_data
from stackwise_cli.train.stage import measured

STAGES = ("train-stack-l2r", "train-stack-r2l", "end-to-end")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8")
REHEARSE_BELOW_BYTES = 4 * 2**30  # rehearse a case in its process first when its plan is smaller than this
CPU_HOW = (
    "peak resident set (VmHWM, reset through /proc/self/clear_refs once the case is built) above the resident set "
    "before the case was built, in a fresh process with glibc's mmap threshold fixed at 64 KiB so freed tensors "
    "leave the resident set"
)
CUDA_HOW = "torch.cuda.max_memory_allocated (reset once the case is built) minus what was allocated before it"

# What each measured kind is set against in the plan. The static kinds are counted from the live tensors at the
# end of the last step; "the rest" is the peak minus them: activations, autocast's weight copies, temporaries.
MEASURED_KINDS = {
    "parameters": ("trainable parameters (fp32)", ("weights", "master")),
    "gradients": ("gradients", ("gradients",)),
    "optimizer": ("optimizer state", ("optimizer",)),
    "frozen": ("frozen weights", ("frozen",)),
    "cache_buffers": ("cache buffers", ("cache_buffers",)),
    "rest": ("activations, weight casts, temporaries (peak - the rows above)", ("activations",)),
}


@dataclass
class KindRow:
    kind: str
    label: str
    planned_bytes: int
    measured_bytes: int


@dataclass
class MemoryResult:
    recipe: str
    stage: str
    variant: str  # the plan's variant this is set against
    what: str  # the plan's one line
    device: str
    precision: str
    optimizer: str
    activation_checkpointing: bool
    frozen_dtype: str
    blocks_per_stack: int
    batch_size: int
    seq_len: int
    steps: int
    losses: list[float]
    peak_bytes: int
    planned_bytes: int  # the plan's total without the CUDA headroom row
    memory_how: str
    rehearsed: bool
    params_trainable: int
    wall_s: float  # the whole measurement, fresh processes included
    kinds: list[KindRow] = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.peak_bytes / self.planned_bytes

    @property
    def loss_decreased(self) -> bool:
        return len(self.losses) >= 2 and self.losses[-1] < self.losses[0]

    def to_data(self) -> dict:
        data = asdict(self)
        data.update(ratio=self.ratio, loss_decreased=self.loss_decreased)
        return data


def with_options(
    recipe: Recipe,
    *,
    optimizer: str | None = None,
    activation_checkpointing: bool | None = None,
    frozen_dtype: str | None = None,
    batch_size: int | None = None,
    seq_len: int | None = None,
    blocks: int | None = None,
) -> Recipe:
    """The recipe with the command's explicit flags applied (they win over the file and ``--set``), validated."""
    sets = []
    for key, value in (
        ("train.optimizer", optimizer),
        ("train.activation_checkpointing", activation_checkpointing),
        ("train.frozen_dtype", frozen_dtype),
        ("train.batch_size", batch_size),
        ("data.seq_len", seq_len),
        ("rack.blocks_per_stack", blocks),
    ):
        if value is not None:
            sets.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    if not sets:
        return recipe
    return recipe_from_data(apply_overrides(recipe.to_data(), sets), recipe.name)


def planned_stage(recipe: Recipe, stage: str, precision: str, device: str = "cpu") -> Stage:
    """The plan's figure for what ``bench_memory`` runs: the same options, no CUDA headroom row."""
    tr = recipe.train
    options = PlanOptions(
        batch_size=tr.batch_size,
        seq_len=recipe.data.seq_len,
        precision=precision,
        optimizer=tr.optimizer,
        activation_checkpointing=tr.activation_checkpointing,
        frozen_dtype=tr.frozen_dtype,
        headroom_bytes=0,
        device="cuda" if device.startswith("cuda") else "cpu",
    )
    p = plan(recipe, 10**15, options)
    return p.stage(stage, measured(recipe, stage).variant)


def check_options(recipe: Recipe, stage: str, precision: str, steps: int, device: str) -> None:
    """Every problem with the options at once, as one StackwiseError."""
    problems = []
    if stage not in STAGES:
        problems.append(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    if precision not in PRECISIONS:
        problems.append(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if steps < 2:
        problems.append(f"--steps must be >= 2 (the loss must be seen to go down), got {steps}")
    if not (device == "cpu" or device.startswith("cuda")):
        problems.append(f"--device must be cpu or cuda[:N], got {device!r}")
    if stage == "train-stack-r2l" and not recipe.train.suffix_checkpointing:
        problems.append("train.suffix_checkpointing must be true: the plan counts a checkpointed suffix")
    if problems:
        raise StackwiseError("; ".join(problems), hint="see `stackwise bench memory --help`")


def bench_memory(
    recipe: Recipe, stage: str, precision: str = "fp32", steps: int = 3, device: str = "cpu"
) -> MemoryResult:
    """Run ``steps`` optimizer steps of ``stage`` in a fresh process and set its peak memory against the plan."""
    check_options(recipe, stage, precision, steps, device)
    planned = planned_stage(recipe, stage, precision, device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise StackwiseError(
                f"--device {device}: no CUDA device is visible to this process", hint="use --device cpu"
            )
    rehearse = planned.total_bytes < REHEARSE_BELOW_BYTES
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        m = pool.apply(_measure, (recipe.to_data(), stage, precision, steps, device, rehearse))
    wall_s = time.perf_counter() - t0
    kinds = [
        KindRow(kind, label, sum(planned.bytes[k] for k in plan_kinds), m["counted"].get(kind, 0))
        for kind, (label, plan_kinds) in MEASURED_KINDS.items()
    ]
    kinds[-1].measured_bytes = m["peak_bytes"] - sum(r.measured_bytes for r in kinds[:-1])
    if precision != "fp32":  # autocast's / fp8's weight copies are in "the rest", not with the fp32 parameters
        kinds[0].planned_bytes = planned.bytes["master"]
        kinds[-1].planned_bytes += planned.bytes["weights"]
    tr = recipe.train
    return MemoryResult(
        recipe=recipe.name,
        stage=stage,
        variant=planned.variant,
        what=planned.what,
        device=device,
        precision=precision,
        optimizer=tr.optimizer,
        activation_checkpointing=tr.activation_checkpointing,
        frozen_dtype=tr.frozen_dtype,
        blocks_per_stack=recipe.rack.blocks_per_stack,
        batch_size=tr.batch_size,
        seq_len=recipe.data.seq_len,
        steps=steps,
        losses=m["losses"],
        peak_bytes=m["peak_bytes"],
        planned_bytes=planned.total_bytes - planned.bytes["headroom"],
        memory_how=m["how"] + (", after one rehearsal of the case" if rehearse else ", not rehearsed"),
        rehearsed=rehearse,
        params_trainable=m["params_trainable"],
        wall_s=wall_s,
        kinds=kinds,
    )


# ----------------------------------------------------------------------------------------------------------------
# The case, in its own process


def _tensor_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage counted once."""
    import torch

    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        key = t.untyped_storage().data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _build(recipe: Recipe, stage: str, precision: str, dev):
    """The trainable parameters, loss, frozen bytes and buffers of ``stage`` as train-stack sets it up, on random
    data: the planned stage (train/stage.py) that ``planned_stage`` plans, built by bench/case.py."""
    from stackwise_cli.bench.case import random_case
    from stackwise_cli.train.frozen import frozen_bytes

    c = random_case(recipe, measured(recipe, stage), precision, dev)
    held = {id(p) for p in c.trainable.values()}
    frozen_count = sum(frozen_bytes(m) for m in c.frozen) + _tensor_bytes(
        p for m in [*c.stacks, c.ends] for p in m.parameters() if id(p) not in held
    )
    return c.trainable, c.loss, frozen_count, c.buffers


def _measure(recipe_data: dict, stage: str, precision: str, steps: int, device: str, rehearse: bool) -> dict:
    """One case in this (fresh) process: build it, run ``steps`` optimizer steps, return the peak and the losses."""
    if rehearse:
        _measure(recipe_data, stage, precision, steps, device, False)
    import gc

    import torch

    from stackwise_cli.train.optim import make_optimizer
    from stackwise_cli.train.precision import autocast, grad_scaler

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if not cuda:
        exact_rss_accounting()
    recipe = recipe_from_data(recipe_data, "recipe")
    tr = recipe.train
    gc.collect()
    base = torch.cuda.memory_allocated(dev) if cuda else _rss_bytes("VmRSS")

    trainable, loss_fn, frozen_count, buffers = _build(recipe, stage, precision, dev)
    opt = make_optimizer(trainable, tr)
    for g in opt.param_groups:
        g["lr"] = tr.lr
    scaler = grad_scaler(precision, dev)
    params = list(trainable.values())
    gc.collect()
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        _reset_peak_rss()

    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for _ in range(tr.grad_accum):  # as run.run: grad_accum micro-batches (here the same one) per step
            with autocast(precision, dev):
                loss = loss_fn()
            part = loss / tr.grad_accum if tr.grad_accum > 1 else loss
            if scaler is not None:
                scaler.scale(part).backward()
            else:
                part.backward()
            del part
        if scaler is not None:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, tr.grad_clip or float("inf"))
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        losses.append(loss.item())
        del loss
    if cuda:
        torch.cuda.synchronize(dev)
        peak, how = torch.cuda.max_memory_allocated(dev) - base, CUDA_HOW
    else:
        peak, how = _rss_bytes("VmHWM") - base, CPU_HOW
    counted = {
        "parameters": _tensor_bytes(params),
        "gradients": _tensor_bytes(p.grad for p in params),
        "optimizer": _tensor_bytes(t for s in opt.state.values() for t in s.values()),
        "frozen": frozen_count,
        "cache_buffers": _tensor_bytes(buffers),
    }
    return {
        "peak_bytes": int(peak),
        "how": how,
        "losses": losses,
        "counted": counted,
        "params_trainable": sum(p.numel() for p in params),
    }
