"""Resumable training state: weights, optimizer moments, step, data position and RNG, in safetensors + JSON.

A checkpoint is a folder ``ckpt/<id>/step-00000100`` written under a temporary name and renamed into place
once every file in it is complete, so a folder with the final name always holds a whole checkpoint. Its
``state.json`` is a ``TrainState``, read with the strict schema the manifest is read with; ``Checkpoints`` owns a
run's folder of them (which is newest, how many are kept). Nothing else reads the layout.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stackwise_cli.errors import CorruptFileError
from stackwise_cli.schema import SchemaError, from_data, to_data
from stackwise_cli.store import faults
from stackwise_cli.store.files import TMP_MARK, WRITE_ERRORS, atomic_replace_dir, disk_error, tmp_name
from stackwise_cli.train import distributed

PREFIX = "step-"
STATE = "state.json"
UNUSABLE_HINT = "delete it to resume from the one before, or use --resume never"


@dataclass(kw_only=True)
class TrainState:
    """A checkpoint's ``state.json``: where the run stands and what it was made with, each checked on resume."""

    step: int
    steps_total: int  # the run's length: its learning-rate schedule depends on it
    tokens: int
    last_loss: float | None
    sampler: dict[str, int]  # ``Sampler.state()``: the data position
    window: list[float]  # the losses since the last log line, so a resumed log is the uninterrupted one
    extra: dict[str, Any]  # the caller's own state (``Job.extra``: prior counts, the best validation so far)
    fingerprint: str  # the inputs the run trains on (``Job.fingerprint``)
    precision: str
    # The settings the numbers depend on (``run.run_settings``) and the parameters that train; None in a checkpoint
    # from before they were recorded (then the precision and the optimizer tensors' names stand in for them).
    settings: dict[str, Any] | None = None
    trainable: list[str] | None = None
    scaler: dict[str, Any] | None = None  # fp16's loss scaler
    time: float


def read_state(path: Path) -> TrainState:
    """The ``state.json`` of checkpoint ``path``; an unreadable one, or one with an unknown, missing or mistyped key,
    is one error naming the file and every problem in it."""
    file = path / STATE
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CorruptFileError(f"checkpoint {path} is unreadable ({e})", hint=UNUSABLE_HINT) from None
    try:
        return from_data(TrainState, data)
    except SchemaError as e:
        what = "; ".join(f"{p}: {m}" if p else m for p, m in e.problems)
        message = f"{file} is not a training state this version can resume: {what}"
        raise CorruptFileError(message, hint=UNUSABLE_HINT) from None


def _dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.exists():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and TMP_MARK not in p.name]
    return sorted(found, key=lambda p: p.name)


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state keyed by parameter name (no pickles: plain tensors). Each tensor is its
    own copy: bitsandbytes' 8-bit AdamW shares its quantisation maps between parameters, which safetensors refuses
    to store as two names of one buffer. Under torchrun each sharded tensor is gathered whole to rank 0 (every rank
    joins each gather; the others get nothing), so the checkpoint resumes at any world size."""
    out = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            t = distributed.full(value if torch.is_tensor(value) else torch.tensor(value))
            if distributed.is_main():
                out[f"{names[p]}::{key}"] = t.detach().cpu().clone()
    return out


def load_optimizer_tensors(
    opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    # torch keeps AdamW's step count on the CPU, except for its fused (and capturable) step, which reads it on the
    # parameter's device (as torch.optim.Optimizer.load_state_dict does).
    step_on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))
    for key, value in tensors.items():
        name, _, field = key.partition("::")
        p = params[name]
        on_device = field != "step" or step_on_device
        opt.state[p][field] = distributed.sharded_like(value.to(p.device), p) if on_device else value.clone()


def save_checkpoint(
    folder: Path, step: int, weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], state: TrainState
) -> Path:
    """Write one complete checkpoint into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / _dir_name(step)
    tmp = tmp_name(final)
    try:  # a full disk (safetensors raises its own error for it) leaves the older checkpoints as they were
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        faults.point()  # a half-written checkpoint folder: only its temporary name exists
        rng = {"torch_cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["torch_cuda"] = torch.cuda.get_rng_state()
        save_file({**optim, **{f"rng::{k}": v for k, v in rng.items()}}, str(tmp / "optimizer.safetensors"))
        (tmp / STATE).write_text(json.dumps(to_data(state), indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        atomic_replace_dir(tmp, final)
    except WRITE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise disk_error(final, e) from None
    return final


def load_checkpoint(
    path: Path,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor], TrainState]:
    """Returns (weights, optimizer tensors, rng tensors, state)."""
    state = read_state(path)
    try:
        weights = load_file(str(path / "weights.safetensors"))
        both = load_file(str(path / "optimizer.safetensors"))
    except Exception as e:  # any unreadable part makes the checkpoint unusable; say which
        raise CorruptFileError(f"checkpoint {path} is unreadable ({e})", hint=UNUSABLE_HINT) from None
    rng = {k.removeprefix("rng::"): v for k, v in both.items() if k.startswith("rng::")}
    optim = {k: v for k, v in both.items() if not k.startswith("rng::")}
    return weights, optim, rng, state


def restore_rng(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch_cpu"])
    if "torch_cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["torch_cuda"])


class Checkpoints:
    """One run's checkpoint folder (``Project.ckpt_dir``): the newest ``keep`` complete checkpoints, oldest first.
    A run resumes from the newest; a finished or restarted run clears the folder."""

    def __init__(self, folder: Path, keep: int = 2):
        self.folder, self.keep = folder, keep

    def latest(self) -> Path | None:
        found = list_checkpoints(self.folder)
        return found[-1] if found else None

    def latest_state(self) -> TrainState | None:
        """The newest checkpoint's state alone (no tensors read), or None without one."""
        path = self.latest()
        return read_state(path) if path is not None else None

    def save(
        self, step: int, weights: dict[str, torch.Tensor], optim: dict[str, torch.Tensor], state: TrainState
    ) -> Path:
        """Write a complete checkpoint, then prune older ones keeping the newest ``keep``."""
        final = save_checkpoint(self.folder, step, weights, optim, state)
        for old in list_checkpoints(self.folder)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
