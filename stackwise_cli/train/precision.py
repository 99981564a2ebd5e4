"""Precision choices, each resolved in one place with a clear error for what cannot be done (the device is
``device.pick_device``'s)."""

from __future__ import annotations

import contextlib

import torch

from stackwise_cli.errors import StackwiseError
from stackwise_cli.train.defaults import GPU_PRECISION

PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` = ``GPU_PRECISION`` (bf16, what ``bench plan`` plans) on a CUDA device with bf16 support, else fp32
    (the CPU computes bf16 ~100x slower than fp32). Any other value is returned as it is, to be checked by
    ``autocast``."""
    if precision != "auto":
        return precision
    return GPU_PRECISION if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; master weights and optimizer state stay fp32.

    bf16 and fp16 autocast the matmuls (fp16 needs loss scaling: ``grad_scaler``). fp8 runs the trained stack's
    linear layers as scaled e4m3 matmuls (``train/fp8.py``), with the rest in bf16 on a GPU and in fp32 on the
    CPU, where fp8 is an exact quantise-dequantise emulation. A precision the device cannot do is an error here."""
    if precision not in PRECISIONS:
        raise StackwiseError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "fp8":
        from stackwise_cli.train.fp8 import resolve_fp8_path

        resolve_fp8_path(device)  # raises, naming the GPU, where fp8 cannot run
        if device.type != "cuda":
            return contextlib.nullcontext()
    if device.type == "cuda" and precision in ("bf16", "fp8") and not torch.cuda.is_bf16_supported():
        raise StackwiseError(
            f"--precision {precision}: {torch.cuda.get_device_name(device)} has no bf16 support", hint="use fp32"
        )
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 has 5 exponent bits: small gradients underflow unless the loss is scaled up (and the step skipped
    when the scaled gradients overflow). Other precisions need no scaler."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None
