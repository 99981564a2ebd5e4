"""What the training commands run by default, in one torch-free place that the planner (``bench/plan.py``) reads too,
so a plan assumes exactly what a command does (docs/memory.md).

Nothing here imports torch: ``bench plan`` answers for a 70B recipe on a laptop.
"""

from __future__ import annotations

# How the frozen base of a LoRA / QLoRA fine-tune holds its block linear weights (``train/frozen.py`` storage names).
# The ends (embedding, final norm, head) and the norms stay fp32, as ``load_current_rack`` loads them.
FINETUNE_BASE_STORAGE = {"lora": "bf16", "qlora": "nf4"}
FINETUNE_ENDS_DTYPE = "fp32"
FINETUNE_PRECISIONS = ("fp32", "bf16")  # a fine-tune computes in fp32, or under bf16 autocast (fp32 master weights)


# What ``--precision auto`` (the default of train-stack and fuse) computes in on a GPU that has bf16, and what
# ``bench plan`` plans by default: mixed bf16 with fp32 master weights. Elsewhere (the CPU) ``auto`` is fp32.
GPU_PRECISION = "bf16"


def adamw_step(device_type: str) -> str:
    """Which AdamW step ``train.optimizer: adamw`` runs on a device: ``fused`` on CUDA (one multi-tensor kernel that
    updates parameters and moments in place, no per-parameter temporaries), ``foreach`` elsewhere (torch's default
    on the CPU, whose step allocates temporaries: docs/memory.md)."""
    return "fused" if device_type == "cuda" else "foreach"
