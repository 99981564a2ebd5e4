"""Custom CUDA kernels (sources in ``kernels/``) with their torch references; docs/kernels.md.

- :func:`add_rmsnorm`: fused residual add + RMSNorm (forward and backward);
- :func:`rotary`: rotary embedding on q and k (forward and backward);
- :func:`fp8_quantize` / :func:`fp8_dequantize`: per-token e4m3 codes + fp32 scales for activation caches.

Each runs the kernel on CUDA tensors when the extension loads (:func:`load_extension` builds it lazily) and the
torch reference otherwise.
"""

from stackwise_cli.kernels.build import build_directory, kernel_sources, load_extension, sources_hash
from stackwise_cli.kernels.ops import (
    AddRMSNorm,
    Rotary,
    add_rmsnorm,
    fp8_dequantize,
    fp8_quantize,
    kernels_available,
    rotary,
)
from stackwise_cli.kernels.reference import add_rmsnorm_reference, rotary_backward_reference, rotary_reference
from stackwise_cli.store.e4m3 import E4M3_MAX, fp8_dequantize_reference, fp8_quantize_reference

__all__ = [
    "E4M3_MAX",
    "AddRMSNorm",
    "Rotary",
    "add_rmsnorm",
    "add_rmsnorm_reference",
    "build_directory",
    "fp8_dequantize",
    "fp8_dequantize_reference",
    "fp8_quantize",
    "fp8_quantize_reference",
    "kernel_sources",
    "kernels_available",
    "load_extension",
    "rotary",
    "rotary_backward_reference",
    "rotary_reference",
    "sources_hash",
]
