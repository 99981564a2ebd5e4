"""``fuse``: ends + rack assembled into one model and written to ``fused/`` in Hugging Face format."""

from __future__ import annotations

from stackwise_cli.data.tokenizer import EOS
from stackwise_cli.errors import ProjectError
from stackwise_cli.model.hf import write_fused
from stackwise_cli.store.manifest import FusedEntry, StackRef
from stackwise_cli.store.project import Project
from stackwise_cli.store.weights import load_rack


def is_fused(project: Project) -> bool:
    """Is ``fused/`` present and built from exactly the current ends and rack?"""
    m = project.load()
    f = m.fused
    return (
        f is not None
        and m.ends is not None
        and f.ends == m.ends.sha256
        and [(r.id, r.sha256) for r in f.stacks] == [(s.id, s.sha256) for s in m.rack]
        and project.path(f"{f.dir}/model.safetensors").exists()
    )


def fuse(project: Project) -> FusedEntry:
    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to fuse", hint="run `stackwise build`")
    rack = load_rack(project, m)
    sha = write_fused(project.path("fused"), rack, project.path(m.tokenizer.file), EOS, m.tokenizer.eos_id)
    entry = FusedEntry(
        dir="fused", sha256=sha, ends=m.ends.sha256, stacks=[StackRef(id=s.id, sha256=s.sha256) for s in m.rack]
    )
    with project.update(f"fuse -> fused/ ({sum(s.blocks for s in m.rack)} blocks)") as mm:
        mm.fused = entry
    return entry
