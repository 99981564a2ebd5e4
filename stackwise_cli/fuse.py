"""``fuse``: ends + rack assembled into one model, optionally fine-tuned end to end (``train/finetune.py``),
written to ``fused/`` in Hugging Face format, and scored there (``evaluate/``). A stage above training and
evaluation, as ``build`` is: it refuses untrained stacks, runs the fine-tune and scores what it wrote."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stackwise_cli.errors import ProjectError
from stackwise_cli.evaluate.trained import require_trained
from stackwise_cli.model.hf import write_fused
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.manifest import FusedEntry, Manifest, StackRef
from stackwise_cli.store.project import FUSED, Project

if TYPE_CHECKING:
    from stackwise_cli.model.model import Rack
    from stackwise_cli.train.finetune import FinetuneSpec


def _finetune_fields(spec: FinetuneSpec | None) -> dict:
    """The manifest fields of ``FusedEntry`` that say which fine-tune (if any) made fused/, loss aside."""
    if spec is None:
        return {"finetune": None, "finetune_steps": 0, "lora_rank": None, "lora_alpha": None}
    return {"finetune": spec.mode, "finetune_steps": spec.steps, "lora_rank": spec.rank, "lora_alpha": spec.alpha}


ANY = "any"  # is_fused: fine-tuned or not


def is_fused(project: Project, finetune: FinetuneSpec | str | None = None) -> bool:
    """Is ``fused/`` present, built from exactly the current ends and rack, and fine-tuned as ``finetune`` says
    (None: not fine-tuned; ``ANY``: however it was)? A fused/ made with other fine-tune settings is not current."""
    m = project.load()
    if not (m.fused_is_current() and project.path(f"{m.fused.dir}/model.safetensors").exists()):
        return False
    return finetune == ANY or all(getattr(m.fused, k) == v for k, v in _finetune_fields(finetune).items())


def fuse(
    project: Project,
    finetune: FinetuneSpec | None = None,
    device: str = "auto",
    precision: str = "auto",
    resume: str = "auto",
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
) -> FusedEntry | None:
    """Write ``fused/`` from the current ends and rack; with ``finetune``, first fine-tune the assembled model end to
    end (see ``train/finetune.py``; ``device``, ``precision``, ``resume`` and ``stop_at`` apply to it), then score
    fused/ on the validation split (``fused.val_loss``, as ``eval --fused``). The project's stack and ends files are
    never changed. Under torchrun the fine-tune runs on every rank (``train/distributed.py``) and rank 0 alone
    writes fused/ and the manifest; the other ranks return None."""
    from stackwise_cli.device import pick_device
    from stackwise_cli.train import distributed

    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to fuse", hint="run `stackwise build`")
    require_trained(project, m, "fuse would export")
    if finetune is None:
        from stackwise_cli.model.io import load_current_rack

        if distributed.launched() > 1 and not distributed.is_main():
            return None  # nothing to train: rank 0 writes fused/
        m, rack = load_current_rack(project, manifest=m)
        return _write(project, m, rack, None, None, "")

    from stackwise_cli.errors import Stopped
    from stackwise_cli.train.finetune import clear_checkpoints
    from stackwise_cli.train.finetune import finetune as run

    distributed.init(pick_device(device))  # under torchrun: join the other ranks; rank 0 alone takes the lock
    reporter = reporter if distributed.is_main() else QUIET
    with project.job_lock("fuse-finetune", "the fine-tune of the fused model"):
        try:
            m, done = run(project, finetune, device, precision, resume, reporter, stop_at)
        except Stopped:
            distributed.barrier()  # rank 0 has written the checkpoint: every rank stops
            raise
        if not distributed.is_main():  # rank 0 writes fused/ and the manifest; the others wait for it
            distributed.barrier()
            return None
        entry = _write(project, m, done.merged, finetune, done.result.last_loss, f" {finetune.label()}", done.flops)
        if finetune.rank is not None:
            _write_adapter(project, m, done.model, finetune, reporter)
        clear_checkpoints(project)  # fused/ and the manifest now hold the result
    # The fine-tuned model is no longer the rack: score it as fused/ holds it (the merged rack written there, not
    # read back), which records fused.val_loss. The fine-tune held its base in bf16 or NF4; the fp32 model may not
    # fit the device, and fused/ is already safe on disk, so that is a line saying how to score it, not a failure.
    import torch

    from stackwise_cli.evaluate.eval import evaluate

    try:
        evaluate(project, device=device, reporter=reporter, fused=True, fused_rack=done.merged)
    except torch.OutOfMemoryError:
        reporter.info(
            "fused.val_loss not recorded: the fp32 fused model does not fit the device; "
            f"score it with `stackwise eval --fused --device cpu -p {project.root}`"
        )
    distributed.barrier()
    return project.load().fused or entry


def _write_adapter(project: Project, m: Manifest, model: Rack, spec: FinetuneSpec, reporter: Reporter) -> None:
    """lora, qlora: the adapters also in fused/adapter, as peft saves them, for the rack exported unmerged (what
    ``stackwise fuse`` without a fine-tune writes). A family peft cannot name the layers of is one line, not a
    failure: fused/ holds the merged model either way."""
    from stackwise_cli.errors import StackwiseError
    from stackwise_cli.model.hf import HF_FORMATS
    from stackwise_cli.train.lora import PEFT_DIR, write_peft_adapter

    out = project.fused_dir / PEFT_DIR
    try:
        write_peft_adapter(out, model, HF_FORMATS[m.recipe.model.family], spec.rank, spec.alpha)
    except StackwiseError as e:
        reporter.info(f"{e.message}; fused/ holds the merged model")
        return
    reporter.info(f"peft adapter: {out} (PeftModel.from_pretrained on the rack fused without a fine-tune)")


def _write(
    project: Project,
    m: Manifest,
    rack: Rack,
    spec: FinetuneSpec | None,
    loss: float | None,
    label: str,
    flops: float = 0.0,
) -> FusedEntry:
    sha = write_fused(
        project.fused_dir,
        rack,
        project.path(m.tokenizer.file),
        m.tokenizer.eos_token,
        m.tokenizer.eos_id,
        bidirectional=m.recipe.bidirectional,
    )
    entry = FusedEntry(
        dir=FUSED,
        sha256=sha,
        ends=m.ends.sha256,
        stacks=[StackRef(id=s.id, sha256=s.sha256) for s in m.rack],
        **_finetune_fields(spec),
        finetune_loss=loss,
        finetune_flops=flops,
    )
    with project.update(f"fuse{label} -> fused/ ({sum(s.blocks for s in m.rack)} blocks)") as mm:
        mm.fused = entry
        mm.recount_flops()
    return entry
