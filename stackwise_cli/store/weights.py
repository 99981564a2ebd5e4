"""Tensors as safetensors files: written atomically, checked against the manifest's sha256 when read.

What the tensors are (a stack, the ends) is the model's business: ``model/io.py`` builds the modules and fills
them from here, so the store never imports the model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stackwise_cli.errors import ChecksumMismatch, CorruptFileError
from stackwise_cli.store.files import atomic_write_with, sha256_file


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
    """Save atomically; returns the file's sha256.

    safetensors keeps header metadata in a hash map whose order changes from process to process, so several
    metadata keys would give the same weights different bytes (and checksums). More than one key is therefore
    folded into a single ``stackwise`` key holding sorted JSON: equal weights, equal files.
    """
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    if metadata and len(metadata) > 1:
        metadata = {"stackwise": json.dumps(metadata, sort_keys=True)}
    atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return sha256_file(path)


def load_tensors(path: Path, expect_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a missing, truncated or modified file is a CorruptFileError naming it."""
    if not path.exists():
        raise CorruptFileError(f"{path} is missing", hint="run `stackwise verify` to see what else is")
    if expect_sha256 is not None and sha256_file(path) != expect_sha256:
        raise ChecksumMismatch(
            f"{path} does not match the checksum in the manifest (corrupt, truncated or replaced)",
            hint="restore it from a backup; `stackwise verify` lists every such file",
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({e})", hint="run `stackwise verify`"
        ) from None


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
