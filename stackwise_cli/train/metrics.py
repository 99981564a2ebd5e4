"""What a training run reports beyond its loss: throughput in FLOPs, MFU, gradient norm, peak memory, the
validation loss during training (``train.eval_every``), TensorBoard event files, and how many epochs it reads.

The numbers go three ways from one place (``Metrics.logged``): the JSONL log line, the progress line, and (when
the ``tensorboard`` package is installed: the ``metrics`` extra) event files under ``logs/tb/<run>``. Without
tensorboard one notice says so and training goes on: metrics never fail a run.

MFU is the model FLOPs (the per-token formulas the planner uses too, ``flops.py``, recomputation by activation
checkpointing included) per second over a stated peak of the device (``PEAK_TFLOPS``): dense tensor-core peaks
from the vendors' data sheets, and for the CPU an assumption, stated in ``CPU_TFLOPS_PER_CORE``.
"""

from __future__ import annotations

import math
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stackwise_cli.progress import Reporter

# Dense peak TFLOP/s per device, (bf16/fp16, fp32): the fp32 column is TF32 where the GPU runs fp32 matmuls on its
# tensor cores (torch's default for convolutions; set torch.backends.cuda.matmul.allow_tf32 for matmuls), else
# plain fp32. Matched against torch.cuda.get_device_name() by substring, first match wins (so "H100 PCIe" before
# "H100"). fp8 runs are measured against the bf16 column (their matmuls are fp8, the rest is not).
PEAK_TFLOPS: list[tuple[str, float, float]] = [
    ("H200", 989.0, 494.7),
    ("H100 PCIe", 756.0, 378.0),
    ("H100", 989.0, 494.7),  # SXM
    ("GH200", 989.0, 494.7),
    ("A100", 312.0, 156.0),
    ("L40S", 362.0, 183.0),
    ("L4", 121.0, 60.0),
    ("A10", 125.0, 62.5),  # A10 and A10G
    ("RTX 4090", 165.2, 82.6),
    ("RTX 3090", 71.0, 35.6),
    ("V100", 125.0, 15.7),
    ("T4", 65.0, 8.1),
    ("MI300X", 1307.0, 163.4),
    ("MI250X", 383.0, 47.9),
]
# The CPU: an assumption, not a measurement. One core with two AVX2/AVX-512 FMA units at ~3 GHz does ~0.1 TFLOP/s
# of fp32 at best (2 units x 8-16 lanes x 2 FLOPs x 3e9); the peak is that times the threads torch uses.
CPU_TFLOPS_PER_CORE = 0.1
EPOCHS_WARNING = 4.0  # more epochs than this of the train split: the stack mostly memorises it


@dataclass(frozen=True)
class Peak:
    tflops: float | None  # None: unknown device, no MFU
    what: str  # how it was found, for the log: "NVIDIA H100 80GB HBM3, bf16 989 TFLOP/s (data sheet)"


def device_peak(device: torch.device, precision: str) -> Peak:
    """The peak MFU is measured against on ``device`` at ``precision``."""
    low = precision in ("bf16", "fp16", "fp8")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, half, full in PEAK_TFLOPS:
            if key in name:
                value = half if low else full
                return Peak(value, f"{name}, {'bf16' if low else 'fp32/tf32'} {value:g} TFLOP/s (data sheet)")
        return Peak(None, f"{name}: no peak known (stackwise_cli/train/metrics.py PEAK_TFLOPS), MFU not shown")
    if device.type == "cpu":
        cores = torch.get_num_threads()
        value = CPU_TFLOPS_PER_CORE * cores
        return Peak(value, f"cpu, {cores} threads x {CPU_TFLOPS_PER_CORE:g} TFLOP/s (an assumption, not measured)")
    return Peak(None, f"{device.type}: no peak known, MFU not shown")


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """The peak of the run so far: on CUDA the allocator's peak since the run began; on the CPU the process's peak
    resident set (ru_maxrss: the whole process, since it started)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # bytes on macOS, KiB on Linux


def epochs_of(steps: int, sequences_per_step: int, split_sequences: int) -> float:
    """How many times over the train split a run of ``steps`` optimizer steps reads it."""
    return steps * sequences_per_step / max(split_sequences, 1)


def epochs_line(name: str, steps: int, sequences_per_step: int, split_sequences: int) -> tuple[str, str | None]:
    """The line said when a run starts, and a warning line when it reads the split more than EPOCHS_WARNING times."""
    epochs = epochs_of(steps, sequences_per_step, split_sequences)
    line = (
        f"{name}: {steps} steps x {sequences_per_step} sequences = {epochs:.2f} epochs of the train split "
        f"({split_sequences} sequences)"
    )
    warning = None
    if epochs > EPOCHS_WARNING:
        warning = (
            f"warning: {name} reads the train split {epochs:.1f} times (more than {EPOCHS_WARNING:g}): expect it to "
            "memorise rather than generalise; prepare more text, lower train.steps, or watch val_loss with "
            "train.eval_every"
        )
    return line, warning


_notified: set[str] = set()  # notices said once per process


def _notice_once(reporter: Reporter, key: str, message: str) -> None:
    if key not in _notified:
        _notified.add(key)
        reporter.info(message)


class EventWriter:
    """TensorBoard event files under ``directory``, or nothing (one notice) when tensorboard is not installed."""

    def __init__(self, directory: Path, reporter: Reporter):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's writer needs the tensorboard package
            _notice_once(
                reporter,
                "tensorboard",
                "tensorboard is not installed: no event files under logs/tb (the JSONL log is kept); "
                "pip install 'stackwise[metrics]' to get them",
            )
            return
        self.writer = SummaryWriter(log_dir=str(directory))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


@dataclass
class Validation:
    """Scores a run's model on a fixed subset of the validation split (``train.eval_every``): ``score()`` is the
    mean of ``loss`` over the first ``max_sequences`` rows of ``data`` (``data.Sequences`` of the val split), with
    the masks of epoch 0 (every call scores the same corruption)."""

    every: int  # steps between scores; 0 = off
    loss: Callable  # Batch -> scalar tensor: the run's loss, or the readout after the stack (``run_validation``)
    data: object  # data.Sequences
    max_sequences: int | None
    batch_size: int

    def score(self, modules: dict, device: torch.device, precision: str) -> float:
        """The mean loss, ``batch_size`` rows at a time, with ``modules`` in eval mode and no gradient (they go
        back to train mode after), under the run's autocast."""
        import numpy as np

        from stackwise_cli.train.precision import autocast

        n = len(self.data) if self.max_sequences is None else min(len(self.data), self.max_sequences)
        for mod in modules.values():
            mod.eval()
        total, rows = 0.0, 0
        try:
            with torch.no_grad():
                for lo in range(0, n, self.batch_size):
                    idx = np.arange(lo, min(lo + self.batch_size, n))
                    with autocast(precision, device):
                        value = self.loss(self.data.get(idx, device))
                    total += float(value.float()) * len(idx)
                    rows += len(idx)
        finally:
            for mod in modules.values():
                mod.train()
        return total / max(rows, 1)


@dataclass
class Metrics:
    """What a run reports, set up by the caller of ``run.run``: its training FLOPs per token (0: unknown), the
    device peak, the event writer, and the validation scorer (or None)."""

    flops_per_token: float = 0.0
    peak: Peak = field(default_factory=lambda: Peak(None, "unknown"))
    validation: Validation | None = None
    events: EventWriter | None = None

    def logged(
        self,
        step: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens: int,
        tokens_per_s: float,
        device: torch.device,
    ) -> dict[str, float | int | None]:
        """The log line's metrics beyond step and loss (also sent to TensorBoard)."""
        tflops = tokens_per_s * self.flops_per_token / 1e12 if self.flops_per_token else None
        mfu = tflops / self.peak.tflops if tflops is not None and self.peak.tflops else None
        out = {
            "grad_norm": grad_norm,
            "tflops": tflops,
            "mfu": mfu,
            "peak_tflops": self.peak.tflops,  # what mfu is measured against (PEAK_TFLOPS; the CPU's is assumed)
            "peak_memory_bytes": peak_memory_bytes(device),
            "flops": tokens * self.flops_per_token,
        }
        if self.events is not None:
            scalars = {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm}
            scalars |= {"train/tokens_per_s": tokens_per_s, "train/peak_memory_gib": out["peak_memory_bytes"] / 2**30}
            if tflops is not None:
                scalars["train/tflops"] = tflops
            if mfu is not None:
                scalars["train/mfu"] = mfu
            self.events.scalars(scalars, step)
        return out

    def validation_due(self, step: int, steps: int) -> bool:
        v = self.validation
        return v is not None and v.every > 0 and (step % v.every == 0 or step == steps)

    def close(self) -> None:
        if self.events is not None:
            self.events.close()


def progress_fields(loss: float, lr: float, logged: dict, tokens_per_s: float) -> dict[str, object]:
    """The progress line's fields, formatted: loss, lr, grad norm, tokens/s, TFLOP/s, MFU, peak memory."""
    fields: dict[str, object] = {"loss": loss, "lr": f"{lr:.2e}", "gnorm": f"{logged['grad_norm']:.3f}"}
    fields["tok_s"] = f"{tokens_per_s:,.0f}"
    if logged["tflops"] is not None:
        fields["tflop_s"] = f"{logged['tflops']:.3g}"
    if logged["mfu"] is not None:
        fields["mfu"] = f"{100 * logged['mfu']:.1f}%"
    fields["mem"] = f"{logged['peak_memory_bytes'] / 2**30:.2f}GiB"
    return fields


def tb_dir(log_path: Path) -> Path:
    """A run's TensorBoard folder: ``logs/tb/<the JSONL log's name>``, one run per log file."""
    return log_path.parent / "tb" / log_path.stem


BEST = "best.safetensors"  # in the run's checkpoint folder while it runs; kept in best/ after (``keep_best``)


def save_best(ckpt_dir: Path, weights: dict[str, torch.Tensor], step: int, val_loss: float) -> None:
    """The best-validation weights so far (the run's checkpointed modules), written atomically."""
    from safetensors.torch import save_file

    from stackwise_cli.store.files import atomic_write_with

    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    meta = {"step": str(step), "val_loss": repr(val_loss)}
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_with(ckpt_dir / BEST, lambda p: save_file(tensors, str(p), metadata=meta))


def keep_best(ckpt_dir: Path, dest: Path) -> Path | None:
    """Move a finished run's best-validation weights out of its checkpoint folder (about to be removed) to
    ``dest``; None when the run kept none (``train.eval_every`` off): then an older ``dest``, the best of weights
    this run has replaced, goes too."""
    import os

    src = ckpt_dir / BEST
    if not src.exists():
        dest.unlink(missing_ok=True)
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dest)
    return dest
