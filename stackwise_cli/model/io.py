"""Stacks, ends and racks to and from the project's safetensors files: the model's modules built from the
recipe and filled from ``store/weights.py``'s checked tensors (the store itself never imports the model)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from stackwise_cli.errors import ChecksumMismatch, CorruptFileError
from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack
from stackwise_cli.store.manifest import Manifest
from stackwise_cli.store.project import Project
from stackwise_cli.store.weights import load_tensors, save_tensors, tensor_digest


def embedding_digest(ends: Ends) -> str:
    """Checksum of the embedding alone: the caches depend on it, but not on the head trained later."""
    return tensor_digest(ends.input_parameters())


def _fill(module: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    want = module.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise CorruptFileError(
            f"{path} does not hold the tensors this model expects (missing: {missing[:3]}, unexpected: {extra[:3]})"
        )
    for k, v in want.items():
        if tensors[k].shape != v.shape:
            raise CorruptFileError(
                f"{path}: tensor {k} has shape {list(tensors[k].shape)}, the recipe needs {list(v.shape)}"
            )
    module.load_state_dict(tensors)


def load_stack(
    project: Project, manifest: Manifest, stack_id: int, backend: str | None = None, verify: bool = True
) -> Stack:
    """The stack ``stack_id`` with the recipe's attention; ``backend`` (if given) overrides the recipe's."""
    entry = manifest.stack(stack_id)
    path = project.path(entry.file)
    attn = manifest.recipe.attention
    if backend is not None:
        attn = dataclasses.replace(attn, backend=backend)
    stack = Stack(manifest.recipe.model, entry.blocks, attn)
    _fill(stack, load_tensors(path, entry.sha256 if verify else None), path)
    return stack


def load_ends(project: Project, manifest: Manifest, verify: bool = True) -> Ends:
    path = project.path(manifest.require_ends().file)
    ends = Ends(manifest.recipe.model)
    _fill(ends, load_tensors(path, manifest.ends.sha256 if verify else None), path)
    return ends


def save_stack(project: Project, stack: Stack, stack_id: int) -> str:
    rel = project.stack_file(stack_id)
    meta = {"format": "stackwise-stack", "id": str(stack_id), "blocks": str(len(stack.blocks))}
    return save_tensors(project.path(rel), stack.state_dict(), meta)


def save_ends(project: Project, ends: Ends) -> tuple[str, str]:
    """Returns (file sha256, embedding digest)."""
    sha = save_tensors(project.path(project.ends_file), ends.state_dict(), {"format": "stackwise-ends"})
    return sha, embedding_digest(ends)


def load_rack(project: Project, manifest: Manifest, backend: str | None = None, upto: int | None = None) -> Rack:
    """The ends and the first ``upto`` stacks (all by default), checked against the manifest."""
    cfg: ModelConfig = manifest.recipe.model
    entries = manifest.rack[:upto]
    stacks = [load_stack(project, manifest, s.id, backend) for s in entries]
    return Rack(cfg, load_ends(project, manifest), stacks, [s.id for s in entries])


def load_current_rack(
    project: Project, backend: str | None = None, manifest: Manifest | None = None
) -> tuple[Manifest, Rack]:
    """The manifest and the rack it describes, for readers that may run while a stack finishes training.
    ``manifest``: the one the caller has already read and checked (default: read it now).

    A ``train-stack`` that ends between reading the manifest and hashing the files rewrites a stack or the ends
    and then the manifest: that is not corruption, so on a checksum mismatch the manifest is read again and,
    if it changed, the rack is loaded once more.
    """
    m = manifest if manifest is not None else project.load()
    try:
        return m, load_rack(project, m, backend)
    except ChecksumMismatch:
        now = project.load()
        if now == m:
            raise
        return now, load_rack(project, now, backend)
