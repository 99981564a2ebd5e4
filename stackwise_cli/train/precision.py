"""Device and precision choices, each resolved in one place with a clear error for what cannot be done."""

from __future__ import annotations

import contextlib

import torch

from stackwise_cli.errors import StackwiseError

PRECISIONS = ("fp32", "bf16")


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


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; master weights and optimizer state stay fp32."""
    if precision not in PRECISIONS:
        raise StackwiseError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise StackwiseError(
            f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 support", hint="use fp32"
        )
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
