"""Lazy build of the CUDA extension in ``kernels/`` with ``torch.utils.cpp_extension``.

The extension is compiled on first use on a CUDA machine into a per-user cache folder,
``$XDG_CACHE_HOME/stackwise/kernels/<sha>`` (``~/.cache`` when XDG_CACHE_HOME is unset), where ``<sha>`` hashes
every source file: a changed source gets a new folder and a rebuild, and an unchanged one loads the library
built before (torch's own ninja build is incremental too). The module name carries the same hash so two
versions can never be confused within one process.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from pathlib import Path

from stackwise_cli.errors import StackwiseError

log = logging.getLogger(__name__)

# The sources live at the repository root (kernels/), beside the package: an editable install finds them.
KERNELS_DIR = Path(__file__).resolve().parents[2] / "kernels"
SOURCE_SUFFIXES = (".cu", ".cuh", ".cpp")


def kernel_sources() -> list[Path]:
    """Every source file of the extension (binding + kernels + shared header), sorted by name."""
    if not KERNELS_DIR.is_dir():
        raise StackwiseError(
            f"the CUDA kernel sources are missing: expected the folder {KERNELS_DIR}",
            hint="install stackwise from a source checkout: pip install -e .",
        )
    return sorted(p for p in KERNELS_DIR.iterdir() if p.suffix in SOURCE_SUFFIXES)


def sources_hash() -> str:
    """sha256 over the names and bytes of every source: the cache key of a build."""
    digest = hashlib.sha256()
    for path in kernel_sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_directory(sha: str) -> Path:
    """The per-user folder one build of the sources with hash ``sha`` lives in."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "stackwise" / "kernels" / sha


def load_extension():
    """The compiled extension module, built on first call (minutes) and cached per user.

    Raises a one-line :class:`StackwiseError` where CUDA is absent (no GPU, or a CPU build of torch), or when
    the build fails.
    """
    import torch

    if not torch.cuda.is_available():
        raise StackwiseError(
            "the stackwise CUDA kernels need a CUDA device and a CUDA build of torch; CUDA is absent here",
            hint="the torch references in stackwise_cli.kernels run instead",
        )
    return _load()


@functools.cache
def _load():
    from torch.utils import cpp_extension

    sha = sources_hash()
    folder = build_directory(sha)
    folder.mkdir(parents=True, exist_ok=True)
    cu_sources = [str(p) for p in kernel_sources() if p.suffix in (".cu", ".cpp")]
    log.info("loading the stackwise CUDA kernels from %s (built on first use)", folder)
    try:
        return cpp_extension.load(
            name=f"stackwise_kernels_{sha}",
            sources=cu_sources,
            build_directory=str(folder),
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            extra_include_paths=[str(KERNELS_DIR)],
            verbose=False,
        )
    except Exception as err:  # a compiler error is many lines: keep the first, point at the log folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise StackwiseError(
            f"building the stackwise CUDA kernels failed: {first}",
            hint=f"see the build folder {folder}; STACKWISE_DEBUG=1 shows the traceback",
        ) from err
