"""The device a command runs on, resolved in one place for training, eval, generation and the benches."""

from __future__ import annotations

import torch

from stackwise_cli.errors import StackwiseError


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` = the GPU when there is one, else the CPU. An explicit device that is absent is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise StackwiseError(f"--device {name}: no CUDA device is visible to this process", hint="use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise StackwiseError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None
