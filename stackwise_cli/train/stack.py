"""The train-stack stage: one stack at a time by the recipe's curriculum (or the whole rack end to end), set up
as a ``Job`` for ``train/run.py``, its result written to the stack files and the manifest.

Left-to-right causal training of stack k (at rack position p):
- p = 0: tokens -> embedding -> stack -> final norm -> head; the embedding trains with the stack.
- p > 0: cached hidden states entering the stack -> stack -> final norm -> head; the stacks to its left are not
  touched (their work is frozen in the cache).
The final norm and the head train with every stack (``train.head: train``) or stay frozen (``frozen``). With tied
embeddings the head *is* the embedding, so it only trains together with the leftmost stack: changing it later
would make every cache stale.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.device import pick_device
from stackwise_cli.errors import ProjectError, StackwiseError, Stopped
from stackwise_cli.flops import FlopShapes
from stackwise_cli.model.io import load_ends, load_stack, save_ends, save_stack
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.objectives import CACHE_EPOCH, Objective
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.manifest import Manifest, stack_objective
from stackwise_cli.store.project import Project, digest
from stackwise_cli.store.shards import read_hidden_shard
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train import distributed, stage
from stackwise_cli.train.curriculum import frozen_suffix, lr_span, planned_steps
from stackwise_cli.train.data import Batch, Sequences, stream_start, token_data, val_data
from stackwise_cli.train.frozen import checkpoint_blocks, freeze
from stackwise_cli.train.metrics import (
    Metrics,
    Validation,
    device_peak,
    keep_best,
)
from stackwise_cli.train.precision import autocast, resolve_precision
from stackwise_cli.train.run import RESUME, Job, Result, recipe_settings, run
from stackwise_cli.train.transforms import Context, Modules, apply_transforms

ALL = "all"
# The recipe keys outside the loop's own (``run.run_settings``) that change what a run computes, held by its
# checkpoints: the objective's corruption (its masks and noise levels) and, for a stack, what it reads (the cache or
# the prefix recomputed), how its frozen stacks are stored, and its steps (which also place it in a whole-rack
# schedule). A key that does nothing in this run (mask.* under clm) is held too: a refused resume names the key and
# the way back, a resume under a changed one would silently be neither run.
OBJECTIVE_SETTINGS = (
    "mask.ratio",
    "mask.mask_token",
    "mask.random_token",
    "diffusion.time",
    "diffusion.t_min",
    "diffusion.t_max",
)
STACK_SETTINGS = ("train.prefix", "train.frozen_dtype", "train.step_scale", *OBJECTIVE_SETTINGS)


def train_stack(
    project: Project,
    stack_id: int | str,
    steps: int | None = None,
    precision: str = "auto",
    resume: str = "auto",
    device: str = "auto",
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
    checkpoint_every_min: float | None = None,
) -> Result | None:
    """Train one stack by the recipe's curriculum, or (``stack_id`` = "all", curriculum end-to-end) the whole
    rack. Returns None when it is already trained to ``steps``.

    Holds the training lock throughout: a second process asked to train the same thing fails at once, naming the
    holder; a killed holder's lock is free again.
    """
    target = None if stack_id == ALL else int(stack_id)
    if target is not None:
        project.load().position(target)  # an unknown id is a clear error before any lock file is made
    name = "all" if target is None else str(target)
    what = "end-to-end training of the rack" if target is None else f"training of stack {target}"
    distributed.init(pick_device(device))  # under torchrun: join the other ranks; rank 0 alone takes the lock
    reporter = reporter if distributed.is_main() else QUIET
    with project.job_lock(f"train-stack-{name}", what):
        return _train(project, target, steps, precision, resume, device, reporter, stop_at, checkpoint_every_min)


@dataclass
class Setup:
    """What one curriculum trains, on what, and with which loss."""

    modules: dict[str, nn.Module]
    trainable: dict[str, nn.Parameter]
    loss: Callable[[Batch], torch.Tensor]
    data: Sequences
    fingerprint: str


def _freeze(modules: list[nn.Module]) -> None:
    for mod in modules:
        for p in mod.parameters():
            p.requires_grad_(False)


def _setup_one(
    project: Project, m: Manifest, stack_id: int, pos: int, stack: Stack, ends: Ends, dev: torch.device
) -> Setup:
    """One stack as its stage says (train/stage.py): from the tokens (leftmost, or right to left), from its cache,
    or from its prefix recomputed on every batch, reading out through any frozen suffix."""
    recipe, tr = m.recipe, m.recipe.train
    st = stage.for_stack(m, pos)
    obj = stack_objective(m, stack_id)
    suffix = frozen_suffix(m, pos)
    modules: dict[str, nn.Module] = {"stack": stack, "ends": ends}
    trainable = trainable_params(st, modules)
    tokens = token_data(project, m)
    frozen = [freeze(load_stack(project, m, s.id), tr.frozen_dtype).to(dev) for s in suffix]
    if st.suffix_checkpointing:  # the gradient passes through the suffix: keep only its block inputs
        for s in frozen:
            checkpoint_blocks(s)
    # The frozen inputs: a checkpoint made against another suffix or head is not this run.
    suffix_key = [m.ends.sha256, *[f"{s.id}:{s.sha256}" for s in suffix], tr.frozen_dtype] if suffix else []
    prefix: list[nn.Module] = []
    if st.source == "tokens":
        data = Sequences(tokens)
        fingerprint = digest(["tokens", project.split_digest(m, "train"), obj.key(), *suffix_key])
    elif st.source == "recompute":
        prefix = [freeze(load_stack(project, m, s.id), tr.frozen_dtype).to(dev) for s in m.rack[:pos]]
        prefix_key = [m.ends.sha256, *[f"{s.id}:{s.sha256}" for s in m.rack[:pos]], tr.frozen_dtype]
        data = Sequences(tokens)
        fingerprint = digest(["recompute", project.split_digest(m, "train"), obj.key(), *prefix_key, *suffix_key])
    else:
        cache = project.fresh_cache(m, stack_id, "train")
        hidden = [
            read_hidden_shard(project.path(s.file), expect_shape=(m.data.seq_len, recipe.model.d_model))
            for s in cache.shards
        ]
        data = Sequences(tokens, hidden)
        fingerprint = digest(["cache", *[s.sha256 for s in cache.shards], *suffix_key])
    return Setup(modules, trainable, stage_loss(st, obj, [stack], ends, prefix, frozen), data, fingerprint)


def trainable_params(st: stage.Stage, modules: dict[str, nn.Module]) -> dict[str, nn.Parameter]:
    """What trains in stage ``st``, by checkpoint name (``<module key>.<parameter name>``): every parameter of the
    trained stacks, and of the ends the input side where ``st.embedding_trains`` and the output side where
    ``st.head_trains`` (train/stage.py says which and why). End to end the ends come first, as the whole rack's
    modules list them."""
    ends = modules["ends"]
    if st.end_to_end:
        trainable = {f"{k}.{n}": p for k, mod in modules.items() for n, p in mod.named_parameters()}
        if not st.embedding_trains:
            for n in ends.named_input_parameters():
                trainable.pop(f"ends.{n}")
        return trainable
    trainable = {f"{k}.{n}": p for k, mod in modules.items() if k != "ends" for n, p in mod.named_parameters()}
    if st.embedding_trains:
        trainable.update({f"ends.{n}": p for n, p in ends.named_input_parameters().items()})
    if st.head_trains:
        trainable.update({f"ends.{n}": p for n, p in ends.named_output_parameters().items()})
    return trainable


def stage_loss(
    st: stage.Stage,
    obj: Objective,
    stacks: list[Stack],
    ends: Ends,
    prefix: list[nn.Module],
    suffix: list[nn.Module],
) -> Callable[[Batch], torch.Tensor]:
    """The loss of stage ``st`` on a batch: corrupt the tokens by the objective (a cache holds the masks of
    ``CACHE_EPOCH``), then read the cache, or embed and run the frozen ``prefix`` without grad (what the cache would
    hold, for this batch only), then the trained ``stacks``, the frozen ``suffix`` (the gradient passes through
    it), the head and the objective's loss."""
    causal = obj.causal

    def loss_fn(b: Batch) -> torch.Tensor:
        if st.source == "cache":
            c = obj.corrupt(b.tokens, b.seq_ids, CACHE_EPOCH)
            h = b.hidden
        else:
            c = obj.corrupt(b.tokens, b.seq_ids, b.epochs)
            with torch.no_grad() if st.source == "recompute" else contextlib.nullcontext():
                h = ends.embed_tokens(c.inputs)
                for s in prefix:
                    h = s(h, causal, c.t)
        for s in [*stacks, *suffix]:  # activation checkpointing, where on, is in their blocks (train/transforms.py)
            h = s(h, causal, c.t)
        return obj.loss(ends.logits(h), c)

    return loss_fn


def whole_rack_loss(obj: Objective, ends: Ends, stacks: list[Stack]) -> Callable[[Batch], torch.Tensor]:
    """The loss of the whole rack on a batch: corrupt, embed, every stack in order, head, objective."""

    def loss_fn(b: Batch) -> torch.Tensor:
        c = obj.corrupt(b.tokens, b.seq_ids, b.epochs)
        h = ends.embed_tokens(c.inputs)
        for s in stacks:
            h = s(h, obj.causal, c.t)
        return obj.loss(ends.logits(h), c)

    return loss_fn


def whole_rack_modules(
    m: Manifest, stacks: list[Stack], ends: Ends
) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter]]:
    """The whole rack as checkpointed modules (``ends``, ``stack<id>``) and every parameter of it by name."""
    modules: dict[str, nn.Module] = {"ends": ends} | {f"stack{e.id}": s for e, s in zip(m.rack, stacks)}
    return modules, {f"{k}.{n}": p for k, mod in modules.items() for n, p in mod.named_parameters()}


def _setup_all(project: Project, m: Manifest, stacks: list[Stack], ends: Ends) -> Setup:
    """The whole rack end to end (train/stage.py's end-to-end stage): every stack and the head train together, and
    the embedding unless ``train.embedding: frozen``."""
    st = stage.for_rack(m)
    obj = stack_objective(m, None)
    modules, _ = whole_rack_modules(m, stacks, ends)
    loss_fn = stage_loss(st, obj, stacks, ends, [], [])
    fingerprint = digest(["tokens", project.split_digest(m, "train"), obj.key(), "end-to-end"])
    return Setup(modules, trainable_params(st, modules), loss_fn, Sequences(token_data(project, m)), fingerprint)


def train_flops_per_token(m: Manifest, pos: int | None) -> float:
    """The training FLOPs per token of the stage that trains the stack at ``pos`` (None: the whole rack), by the
    planner's formulas (``flops.py``) for the rack as it is (``stage.flops_per_token``)."""
    st = stage.for_rack(m) if pos is None else stage.for_stack(m, pos)
    return stage.flops_per_token(st, FlopShapes.of(m.recipe, m.data.seq_len))


def _train(
    project: Project,
    stack_id: int | None,
    steps: int | None,
    precision: str,
    resume: str,
    device: str,
    reporter: Reporter,
    stop_at: int | None,
    checkpoint_every_min: float | None,
) -> Result | None:
    m = project.load()
    tr = m.recipe.train
    curriculum = curriculum_of(m.recipe)
    pos = curriculum.check(m, stack_id)
    ids = m.ids() if stack_id is None else [stack_id]
    span = None  # the stack's slice of a whole-rack schedule, for the planned run only (not for --steps N)
    if steps is None:  # end to end: the same token budget as training every stack for train.steps
        steps = tr.steps * len(ids) if stack_id is None else planned_steps(m, pos)
        span = None if stack_id is None else lr_span(m, pos)
    if steps <= tr.warmup_steps:
        raise StackwiseError(
            f"--steps {steps} leaves no room for the schedule: train.warmup_steps is {tr.warmup_steps}",
            hint=f"pass --steps greater than {tr.warmup_steps}, or lower train.warmup_steps in the recipe",
        )
    if resume not in RESUME:
        raise StackwiseError(f"--resume must be one of {', '.join(RESUME)}, got {resume!r}")
    dev = distributed.local_device(pick_device(device))
    precision = resolve_precision(precision, dev)
    autocast(precision, dev)  # an impossible precision fails here, before the manifest is touched
    distributed.check(precision, tr.batch_size, tr.optimizer)  # and so does what several ranks cannot run
    label = "all" if stack_id is None else str(stack_id)
    entries = [m.stack(i) for i in ids]
    states = {e.state for e in entries}
    if states == {"trained"} and resume == "auto":
        done = min(e.steps for e in entries)
        if done >= steps:
            reporter.info(f"stack {label} is already trained ({done} steps): nothing to do")
            return None
        raise StackwiseError(
            f"stack {label} is already trained ({done} steps); {steps} steps would be a second run with a "
            "new schedule, not a continuation",
            hint="pass --resume never to train it further from its weights (its steps and tokens add up)",
        )
    if stack_id is None and "trained" in states and states != {"trained"}:
        raise ProjectError(
            "end to end trains every stack together, and some are trained already: "
            f"{', '.join(str(e.id) for e in entries if e.state == 'trained')}",
            hint="make a new project for the baseline (`stackwise build` with `curriculum: end-to-end`)",
        )
    # Training a trained stack again (--resume never) continues from its weights: the counts add up. The counts
    # of the weights in the stack file are the entry's, unless an interrupted run already moved the entry on: then
    # its checkpoints remember what the file held when that run began.
    ckpt_dir = project.ckpt_dir(label)
    checkpoints = ckpt.Checkpoints(ckpt_dir, tr.keep_checkpoints)
    latest = checkpoints.latest()
    prior_steps, prior_tokens, prior_flops = entries[0].steps, entries[0].tokens, entries[0].flops
    if states != {"trained"} and latest is not None:
        extra = ckpt.read_state(latest).extra
        prior_steps, prior_tokens = extra["prior_steps"], extra["prior_tokens"]
        prior_flops = extra.get("prior_flops", 0.0)  # a checkpoint from before FLOPs were counted: none before it
    have_ckpt = resume == "auto" and latest is not None

    # With a checkpoint to resume from, the weights come from it: the files may be one step ahead or behind.
    stacks = [load_stack(project, m, i, verify=not have_ckpt).to(dev) for i in ids]
    ends = load_ends(project, m, verify=not have_ckpt).to(dev)
    # Frozen, then fp8, kernels, activation checkpointing, FSDP2 and compile as the run asks, before what trains is
    # listed (FSDP2 replaces each parameter by its sharded DTensor) and before the optimizer exists.
    ctx = Context(device=dev, precision=precision, checkpointing=tr.activation_checkpointing, compile=tr.compile)
    apply_transforms(Modules({str(i): s for i, s in zip(ids, stacks)}, ends), ctx)
    if stack_id is None:
        setup = _setup_all(project, m, stacks, ends)
    else:
        setup = _setup_one(project, m, stack_id, pos, stacks[0], ends, dev)
    for p in setup.trainable.values():
        p.requires_grad_(True)

    if distributed.is_main():
        with project.update(f"train-stack {label} --steps {steps} --precision {precision}") as mm:
            for i in ids:
                mm.stack(i).state = "training"

    # The stacks trained before this one (left to right: those to its left; right to left: its suffix) drew the
    # start of the stream, and an earlier run of this stack (--resume never) what follows: this run reads on.
    before = [] if stack_id is None else curriculum.before(m, pos)
    start = stream_start(m, before) + prior_tokens // m.data.seq_len
    job = Job(
        f"train-stack {label}",
        setup.modules,
        setup.trainable,
        setup.loss,
        setup.data,
        setup.fingerprint,
        {"prior_steps": prior_steps, "prior_tokens": prior_tokens, "prior_flops": prior_flops},
        start,
        span if prior_steps == 0 else None,  # a second run (--resume never) has a schedule of its own
        recipe_settings(m.recipe, STACK_SETTINGS),
    )
    flops_per_token = train_flops_per_token(m, pos)
    metrics = Metrics(flops_per_token, device_peak(dev, precision), run_validation(project, m, stack_id, setup, dev))
    try:
        result = run(
            job,
            tr,
            steps,
            dev,
            precision,
            ckpt_dir,
            resume,
            project.log_path(f"train-stack-{label}"),
            reporter,
            stop_at,
            tr.checkpoint_every_min if checkpoint_every_min is None else checkpoint_every_min,
            metrics,
        )
    except Stopped:
        if not distributed.is_main():
            distributed.barrier()  # rank 0 records the stop in the manifest; the others wait for it, then stop
            raise
        state = checkpoints.latest_state()
        with project.update() as mm:
            for i in ids:
                e = mm.stack(i)
                e.steps = state.extra["prior_steps"] + state.step
                e.tokens = state.extra["prior_tokens"] + state.tokens
                e.last_loss, e.precision = state.last_loss, precision
                e.flops = state.extra.get("prior_flops", 0.0) + state.tokens * flops_per_token
            mm.recount_flops()
        distributed.barrier()
        raise

    trained_ends = ends if any(n.startswith("ends.") for n in setup.trainable) else None
    flops = result.tokens * flops_per_token
    stacks = [distributed.whole_copy(s, lambda s=s: Stack(s.cfg, len(s.blocks), s.attn)) for s in stacks]
    if not distributed.is_main():  # rank 0 alone writes the result; the others wait for it
        distributed.barrier()
        return result
    _finish(project, dict(zip(ids, stacks)), trained_ends, result, precision, job.extra, curriculum.name, flops)
    keep_best(ckpt_dir, project.best_file(label))  # train.eval_every: the best-validation weights
    checkpoints.clear()  # the stack files and the manifest now hold the result
    distributed.barrier()
    return result


def run_validation(
    project: Project, m: Manifest, stack_id: int | None, setup: Setup, dev: torch.device
) -> Validation | None:
    """``train.eval_every``: the run's loss on a fixed subset of the validation split. A run that reads tokens
    scores its own loss; a stack trained on a cache (left to right, not leftmost) has no val cache to read, so it
    scores the readout after it: the trained stacks to its left (frozen, read from their files), then it, then the
    head."""
    tr, ev = m.recipe.train, m.recipe.eval
    if not tr.eval_every:
        return None
    loss = setup.loss
    if setup.data.hidden is not None:
        pos = m.position(stack_id)
        left = [load_stack(project, m, e.id).to(dev) for e in m.rack[:pos]]
        _freeze(left)
        stack, ends = setup.modules["stack"], setup.modules["ends"]
        loss = whole_rack_loss(stack_objective(m, stack_id), ends, [*left, stack])
    return Validation(tr.eval_every, loss, val_data(project, m), ev.max_sequences, ev.batch_size)


def _finish(
    project: Project,
    stacks: dict[int, Stack],
    ends: Ends | None,
    result: Result,
    precision: str,
    prior: dict,
    curriculum: str,
    flops: float,
) -> None:
    shas = {i: save_stack(project, stack.cpu(), i) for i, stack in stacks.items()}
    ends_sha = save_ends(project, ends.cpu()) if ends is not None else None
    label = "all" if len(stacks) > 1 else str(next(iter(stacks)))
    with project.update(f"train-stack {label}: trained to step {result.steps}, loss {result.last_loss}") as m:
        for i, sha in shas.items():
            e = m.stack(i)
            e.sha256, e.state, e.last_loss, e.precision = sha, "trained", result.last_loss, precision
            e.steps = prior["prior_steps"] + result.steps
            e.tokens = prior["prior_tokens"] + result.tokens
            e.flops = prior.get("prior_flops", 0.0) + flops
            e.trained_by = curriculum
        m.recount_flops()
        if ends_sha is not None:
            m.ends.sha256, m.ends.input_sha256 = ends_sha
