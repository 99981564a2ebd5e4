"""``fuse``: ends + rack assembled into one model and written to ``fused/`` in Hugging Face format."""

from __future__ import annotations

from stackwise_cli.data.tokenizer import EOS
from stackwise_cli.errors import ProjectError
from stackwise_cli.model.hf import write_fused
from stackwise_cli.store.manifest import FusedEntry, StackRef
from stackwise_cli.store.project import Project
from stackwise_cli.store.weights import load_current_rack


def is_fused(project: Project) -> bool:
    """Is ``fused/`` present and built from exactly the current ends and rack?"""
    m = project.load()
    return m.fused_is_current() and project.path(f"{m.fused.dir}/model.safetensors").exists()


def fuse(project: Project) -> FusedEntry:
    if not project.load().rack:
        raise ProjectError("the rack is empty: nothing to fuse", hint="run `stackwise build`")
    m, rack = load_current_rack(project)
    sha = write_fused(project.path("fused"), rack, project.path(m.tokenizer.file), EOS, m.tokenizer.eos_id)
    entry = FusedEntry(
        dir="fused", sha256=sha, ends=m.ends.sha256, stacks=[StackRef(id=s.id, sha256=s.sha256) for s in m.rack]
    )
    with project.update(f"fuse -> fused/ ({sum(s.blocks for s in m.rack)} blocks)") as mm:
        mm.fused = entry
    return entry
