"""End-to-end fine-tuning of the assembled model at fuse time: full, LoRA, or QLoRA on a 4-bit base (docs/finetune.md).

The rack is read from the project's files, trained as one model for ``steps`` optimizer steps on the train split
with the recipe's objective (the same loss as end-to-end training, ``stack._setup_all``), through ``run.run``:
checkpoints in ``ckpt/finetune``, resume after SIGTERM/SIGUSR1 (exit 75), the NaN check. The result exists only in
``fused/``: the stack and ends files are never written.

- ``full``: every weight trains (embedding, every stack, final norm, head); AdamW as the recipe says.
- ``lora``: each stack frozen with its linear weights in bf16 storage (``frozen.freeze(stack, "bf16")``; compute
  in the input's dtype, fp32 on the CPU), a LoRA adapter on every linear layer of every block; the ends frozen in
  fp32. Only the adapters train.
- ``qlora``: as lora, with the stacks' linear weights in 4-bit NF4 (bitsandbytes).

LoRA and QLoRA end with the merge W' = W + (alpha / r) * B @ A, computed in fp32 from the weights in the stack
files, not from the bf16 or NF4 copy the adapters trained against.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass

import torch

from stackwise_cli.device import pick_device
from stackwise_cli.errors import StackwiseError
from stackwise_cli.model.hf import check_exportable
from stackwise_cli.model.io import load_current_rack, load_ends, load_stack
from stackwise_cli.model.model import Rack, Stack
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.manifest import Manifest, stack_objective
from stackwise_cli.store.project import Project, digest
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train import distributed
from stackwise_cli.train.data import Sequences, token_data, val_data
from stackwise_cli.train.defaults import FINETUNE_BASE_STORAGE, FINETUNE_PRECISIONS
from stackwise_cli.train.lora import Adapters, merge_lora
from stackwise_cli.train.metrics import Metrics, Validation, device_peak, keep_best
from stackwise_cli.train.precision import autocast, resolve_precision
from stackwise_cli.train.run import RESUME, Job, Result, recipe_settings, run
from stackwise_cli.train.stack import OBJECTIVE_SETTINGS, whole_rack_loss, whole_rack_modules
from stackwise_cli.train.transforms import Context, Lora, Modules, apply_transforms

MODES = ("full", "lora", "qlora")
# How the frozen base's linear weights are held, and the precisions a fine-tune computes in: in train/defaults.py,
# which bench plan reads too.
BASE_STORAGE = FINETUNE_BASE_STORAGE
PRECISIONS = FINETUNE_PRECISIONS
DEFAULT_MODE = "full"
DEFAULT_RANK = 16
CKPT_NAME = "finetune"  # ckpt/finetune: its own checkpoint folder, beside the stacks' ckpt/<id>


@dataclass(frozen=True, kw_only=True)
class FinetuneSpec:
    """What to fine-tune and how long; ``rank`` and ``alpha`` only for lora and qlora. Build it with
    ``finetune_spec`` (which validates user input and fills the defaults)."""

    mode: str
    steps: int
    rank: int | None = None
    alpha: float | None = None

    def label(self) -> str:
        lora = f" --lora-rank {self.rank} --lora-alpha {self.alpha:g}" if self.rank is not None else ""
        return f"--finetune {self.mode} --finetune-steps {self.steps}{lora}"


def finetune_spec(
    steps: int | None, mode: str | None = None, rank: int | None = None, alpha: float | None = None
) -> FinetuneSpec | None:
    """The fine-tune the options ask for (None: none, fuse the rack as trained), or a StackwiseError naming the
    option. Defaults: mode full; for lora and qlora rank 16 and alpha = rank (scale 1)."""
    if steps is None:
        given = [f for f, v in (("--finetune", mode), ("--lora-rank", rank), ("--lora-alpha", alpha)) if v is not None]
        if given:
            raise StackwiseError(
                f"{', '.join(given)} set without --finetune-steps: there is no fine-tune to apply them to",
                hint="add --finetune-steps N (optimizer steps), or drop them to fuse the rack as trained",
            )
        return None
    if steps < 1:
        raise StackwiseError(
            f"--finetune-steps must be >= 1, got {steps}",
            hint="leave --finetune-steps out to fuse the rack as trained",
        )
    mode = DEFAULT_MODE if mode is None else mode
    if mode not in MODES:
        raise StackwiseError(f"--finetune must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "full":
        given = [f for f, v in (("--lora-rank", rank), ("--lora-alpha", alpha)) if v is not None]
        if given:
            raise StackwiseError(
                f"{' and '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --finetune lora or qlora; "
                "this fine-tune is full "
                "(every weight trains)",
                hint="add --finetune lora (or qlora), or drop " + " and ".join(given),
            )
        return FinetuneSpec(mode=mode, steps=steps)
    rank = DEFAULT_RANK if rank is None else rank
    if rank < 1:
        raise StackwiseError(f"--lora-rank must be >= 1, got {rank}", hint=f"the default is {DEFAULT_RANK}")
    alpha = float(rank) if alpha is None else float(alpha)
    if alpha <= 0:
        raise StackwiseError(f"--lora-alpha must be > 0, got {alpha:g}", hint="the default is the rank (scale 1)")
    return FinetuneSpec(mode=mode, steps=steps, rank=rank, alpha=alpha)


@dataclass
class Finetuned:
    """What a fine-tune produced: the training result, the model as it trained (adapters in place for lora and
    qlora, on the device), and the merged fp32 rack on the CPU that was written to ``fused/``."""

    result: Result
    model: Rack
    merged: Rack
    flops: float = 0.0  # training FLOPs of the run: its tokens x the planner's FLOPs per token (``flops_per_token``)


def finetune_warmup(tr: TrainRecipe) -> tuple[str, int]:
    """A fine-tune's warmup steps and the key that sets them: ``train.finetune_warmup_steps``, else the stacks'."""
    if tr.finetune_warmup_steps is None:
        return "train.warmup_steps", tr.warmup_steps
    return "train.finetune_warmup_steps", tr.finetune_warmup_steps


def schedule(tr: TrainRecipe, steps: int) -> TrainRecipe:
    """The train settings a fine-tune of ``steps`` runs under: the recipe's, with its own peak learning rate and
    warmup where ``train.finetune_lr`` and ``train.finetune_warmup_steps`` give them."""
    key, warmup = finetune_warmup(tr)
    if steps <= warmup:
        raise StackwiseError(
            f"--finetune-steps {steps} leaves no room for the schedule: {key} is {warmup}",
            hint=f"pass --finetune-steps greater than {warmup}, or lower {key} in the recipe",
        )
    lr = tr.lr if tr.finetune_lr is None else tr.finetune_lr
    # one run of ``steps``: the stacks' step shares are not the fine-tune's
    return dataclasses.replace(tr, steps=steps, lr=lr, warmup_steps=warmup, step_scale=None)


def _fingerprint(project: Project, m: Manifest, spec: FinetuneSpec, objective_key: str) -> str:
    """The inputs of this fine-tune: a checkpoint made from another rack, data or setting is not this run."""
    parts = ["finetune", spec.mode, str(spec.rank), str(spec.alpha), project.split_digest(m, "train"), objective_key]
    parts += [m.require_ends().sha256, *[f"{s.id}:{s.sha256}" for s in m.rack]]
    return digest(parts)


def _check_checkpoint(project: Project, spec: FinetuneSpec, fingerprint: str, resume: str) -> None:
    """A checkpoint in ckpt/finetune from another fine-tune is refused here, in fuse's own words."""
    latest = ckpt.Checkpoints(project.ckpt_dir(CKPT_NAME)).latest()
    if resume != "auto" or latest is None:
        return
    state = ckpt.read_state(latest)
    if state.fingerprint != fingerprint or state.steps_total != spec.steps:
        raise StackwiseError(
            f"{latest} holds an interrupted fine-tune with other settings or of another rack "
            f"({state.steps_total} steps) than `fuse {spec.label()}` asks for",
            hint="rerun the interrupted command to finish it, or pass --resume never to start this one over",
        )


def finetune(
    project: Project,
    spec: FinetuneSpec,
    device: str = "auto",
    precision: str = "auto",
    resume: str = "auto",
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
) -> tuple[Manifest, Finetuned]:
    """Fine-tune the current rack end to end as ``spec`` says and return the manifest it was read from and the
    merged rack (nothing is written here but the checkpoints; ``fuse`` writes ``fused/``). Raises ``Stopped``
    (exit 75) after checkpointing on SIGTERM/SIGUSR1 or at ``stop_at`` (tests): rerun to resume."""
    if spec.mode not in MODES:
        raise StackwiseError(f"--finetune must be one of {', '.join(MODES)}, got {spec.mode!r}")
    if precision not in (*PRECISIONS, "auto"):
        raise StackwiseError(
            f"--precision for a fine-tune must be one of auto, {', '.join(PRECISIONS)}, got {precision!r}"
        )
    if resume not in RESUME:
        raise StackwiseError(f"--resume must be one of {', '.join(RESUME)}, got {resume!r}")
    m, rack = load_current_rack(project)  # fp32, checked against the manifest's checksums
    check_exportable(rack, m.recipe.bidirectional)  # refuse before training what fused/ cannot hold
    tr = schedule(m.recipe.train, spec.steps)
    dev = distributed.local_device(pick_device(device))
    precision = resolve_precision(precision, dev)
    autocast(precision, dev)  # a precision the device cannot do fails here, before any work
    distributed.check(precision, tr.batch_size, tr.optimizer)  # and so does what several ranks cannot run
    obj = stack_objective(m, None)
    fingerprint = _fingerprint(project, m, spec, obj.key())
    _check_checkpoint(project, spec, fingerprint, resume)

    ends, stacks = rack.ends, list(rack.stacks)
    full = spec.mode == "full"
    ctx = Context(
        device=dev,
        precision=precision,
        checkpointing=tr.finetune_checkpointing,
        compile=tr.compile,
        storage=None if full else BASE_STORAGE[spec.mode],
        lora=None if full else Lora(rank=spec.rank, alpha=spec.alpha, seed=tr.seed),
    )
    transformed = Modules({str(e.id): s for e, s in zip(m.rack, stacks)}, ends)
    apply_transforms(transformed, ctx)
    if full:
        modules, trainable = whole_rack_modules(m, stacks, ends)
    else:
        adapters = Adapters(transformed.adapters)
        modules = {"lora": adapters}
        trainable = {f"lora.{n}": p for n, p in adapters.named_parameters()}
    for p in trainable.values():
        p.requires_grad_(True)
    loss_fn = whole_rack_loss(obj, ends, stacks)

    data = Sequences(token_data(project, m))
    settings = recipe_settings(m.recipe, OBJECTIVE_SETTINGS)
    job = Job(f"fuse {spec.mode} fine-tune", modules, trainable, loss_fn, data, fingerprint, settings=settings)
    ckpt_dir = project.ckpt_dir(CKPT_NAME)
    per_token = flops_per_token(m, spec, sum(p.numel() for p in trainable.values()))
    ev = m.recipe.eval
    validation = Validation(tr.eval_every, loss_fn, val_data(project, m), ev.max_sequences, ev.batch_size)
    metrics = Metrics(per_token, device_peak(dev, precision), validation if tr.eval_every else None)
    result = run(
        job,
        tr,
        spec.steps,
        dev,
        precision,
        ckpt_dir,
        resume,
        project.log_path(f"fuse-finetune-{spec.mode}"),
        reporter,
        stop_at,
        tr.checkpoint_every_min,
        metrics,
    )
    rack.eval()
    flops = result.tokens * per_token
    if spec.mode == "full" and distributed.active():  # rank 0 merges and writes the stacks, gathered whole
        whole = [distributed.whole_copy(s, lambda s=s: Stack(s.cfg, len(s.blocks), s.attn)) for s in stacks]
        rack = Rack(m.recipe.model, ends, whole, [e.id for e in m.rack]) if distributed.is_main() else rack
    merged = _merged(project, m, spec, rack) if distributed.is_main() else None  # under torchrun rank 0 writes
    return m, Finetuned(result, rack, merged, flops)


def flops_per_token(m: Manifest, spec: FinetuneSpec, trainable_params: int) -> float:
    """Training FLOPs per token of a fine-tune of the rack, by the planner's formulas (``flops.py``): the whole
    model trained (full), or the frozen base with the ``trainable_params`` adapter weights (lora, qlora)."""
    from stackwise_cli.flops import FlopShapes, lora_flops_per_token, whole_model_flops_per_token

    f = FlopShapes.of(m.recipe, m.data.seq_len)
    blocks, stacks, on = sum(e.blocks for e in m.rack), len(m.rack), m.recipe.train.finetune_checkpointing
    if spec.mode == "full":
        return whole_model_flops_per_token(f, blocks, stacks, checkpointing=on)
    return lora_flops_per_token(f, blocks, stacks, trainable_params, checkpointing=on)


@torch.no_grad()
def _merged(project: Project, m: Manifest, spec: FinetuneSpec, model: Rack) -> Rack:
    """The fine-tuned model as plain fp32 weights on the CPU: full = the trained weights themselves; lora, qlora =
    each stack read again from its file (fp32, checksum-checked) with its adapters added."""
    if spec.mode == "full":
        ends = model.ends.cpu()
        stacks = [s.cpu() for s in model.stacks]
    else:
        ends = load_ends(project, m)  # frozen during the fine-tune: the file's weights are its weights
        stacks = [merge_lora(load_stack(project, m, e.id), s) for e, s in zip(m.rack, model.stacks)]
    for p in [*ends.parameters(), *(p for s in stacks for p in s.parameters())]:
        p.requires_grad_(False)
    return Rack(m.recipe.model, ends, stacks, [e.id for e in m.rack]).eval()


def clear_checkpoints(project: Project) -> None:
    """The fine-tune is in fused/ and the manifest: its checkpoints are no longer needed (the best-validation
    weights, with ``train.eval_every``, move to best/finetune.safetensors)."""
    keep_best(project.ckpt_dir(CKPT_NAME), project.best_file(CKPT_NAME))
    shutil.rmtree(project.ckpt_dir(CKPT_NAME), ignore_errors=True)
