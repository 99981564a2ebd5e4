"""One stack trained by several processes under ``torchrun``: FSDP2 (``fully_shard``) over the trained stacks' blocks.

Everything the loop needs to know about the other ranks is here; with one process (no ``WORLD_SIZE`` above 1 in the
environment) every function is the identity or a no-op, so a single-process run computes exactly what it did before.

- ``init`` joins the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
  (NCCL for CUDA tensors and gloo for CPU ones on a GPU; gloo alone on the CPU).
- ``shard`` applies ``fully_shard`` once, before the optimizer is built: each block of each trained stack is one
  FSDP unit and the stack is the unit over them (its own parameters, e.g. a time embedding). On CUDA under bf16 the
  blocks compute in bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``); on the CPU everything stays fp32.
  The ends (embedding, final norm, head) and a frozen suffix are not sharded: each rank holds them whole, and the
  gradients of the ends that train are averaged over the ranks (``clip_grad_norm``).
- ``local_rows``: the sampler draws the global batch on every rank; each rank trains on its contiguous slice of it,
  so N ranks see exactly the rows one process would.
- ``any_rank``: the stop flag (a signal, or ``stop_at``) all-reduced each step, so every rank stops at one step.
- ``gathered`` / ``sharded_like``: checkpoints hold whole tensors, gathered to rank 0 (which alone writes files) and
  cut again into this run's shards on load, so a checkpoint resumes at any world size.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from stackwise_cli.errors import StackwiseError

# What the ranks can run: fp16 needs a sharded gradient scaler and fp8 its own weight storage, neither done here.
PRECISIONS = ("fp32", "bf16")
TIMEOUT = dt.timedelta(minutes=30)  # a rank that waits longer on the others than this fails rather than hangs


def launched() -> int:
    """How many ranks torchrun started (its WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """How many ranks train together: the process group's size once joined (``init``), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank: the process group's once joined, else torchrun's RANK (0 alone, whatever RANK says)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() > 1 else 0


def active() -> bool:
    """Several ranks train together (the process group is joined and holds more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Rank 0: the one rank that takes the job lock and writes the manifest, the stack files, checkpoints and logs."""
    return rank() == 0


def init(device: torch.device) -> None:
    """Join torchrun's process group when the environment says there are several ranks (idempotent)."""
    if launched() <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise StackwiseError("WORLD_SIZE is above 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise StackwiseError(
            f"WORLD_SIZE is {os.environ['WORLD_SIZE']} but {', '.join(missing)} is not set",
            hint="launch with `torchrun --nproc-per-node N -m stackwise_cli train-stack ID`",
        )
    if device.type == "cuda":
        torch.cuda.set_device(local_device(device))
        backend = "cpu:gloo,cuda:nccl"  # the stop flag and the loss travel on the CPU side
    else:
        backend = "gloo"
    dist.init_process_group(backend, timeout=TIMEOUT)


def local_device(device: torch.device) -> torch.device:
    """This rank's GPU: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun; anything else is kept."""
    if device.type == "cuda" and device.index is None and launched() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def check(precision: str, batch_size: int, optimizer: str) -> None:
    """Refuse, before anything is written, what several ranks cannot run."""
    if not active():
        return
    if optimizer != "adamw":
        raise StackwiseError(
            f"train.optimizer {optimizer} is not supported under torchrun (its 8-bit states are not sharded)",
            hint="set train.optimizer: adamw",
        )
    if precision not in PRECISIONS:
        raise StackwiseError(
            f"--precision {precision} is not supported under torchrun (only {', '.join(PRECISIONS)})",
            hint="pass --precision bf16 or fp32",
        )
    if batch_size % world_size():
        raise StackwiseError(
            f"train.batch_size {batch_size} does not split over {world_size()} ranks",
            hint=f"set train.batch_size to a multiple of {world_size()}",
        )


def shard(stacks: list[nn.Module], device: torch.device, precision: str) -> None:
    """``fully_shard`` each block of each stack, then each stack, over all ranks (no-op with one process). Call it
    before the trainable parameters are collected: FSDP2 replaces each parameter by its sharded DTensor."""
    if not active():
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    if device.type == "cuda" and precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()  # fp32 compute and reduction: the CPU tests compare it with one process
    for stack in stacks:
        for block in stack.blocks:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(stack, mesh=mesh, mp_policy=policy)


def is_sharded(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(rows: np.ndarray, epochs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """This rank's contiguous slice of the global batch (``rows`` and their epochs); all of it with one process."""
    if not active():
        return rows, epochs
    n = len(rows) // world_size()
    part = slice(rank() * n, (rank() + 1) * n)
    return rows[part], epochs[part]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on any (one all-reduce): they stop at the same step."""
    if not active():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(value: torch.Tensor) -> torch.Tensor:
    """The mean over the ranks of a scalar each computed on its slice (the loss of the global batch)."""
    if not active():
        return value
    t = value.detach().float().reshape(1).cpu()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world_size()).reshape(()).to(value.device)


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over every trained parameter. Across ranks: first average the gradients
    of the parameters every rank holds whole (the ends; FSDP has already averaged the sharded ones), then take the
    norm of the whole gradient (the shards' squares summed over the ranks, the whole ones counted once)."""
    if not active():
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if is_sharded(g)]
    whole = [g for g in grads if not is_sharded(g)]
    for g in whole:
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        g.div_(world_size())
    square = torch.zeros((), dtype=torch.float32)
    for g in sharded:
        square += g.to_local().detach().float().pow(2).sum().cpu()
    dist.all_reduce(square, op=dist.ReduceOp.SUM)
    for g in whole:
        square += g.detach().float().pow(2).sum().cpu()
    norm = square.sqrt()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        (g.to_local() if is_sharded(g) else g).mul_(coef.to(g.device))
    return norm


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (an all-gather every rank joins); any other tensor as it is."""
    return t.full_tensor() if is_sharded(t) else t


def gathered(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """With several ranks: the whole tensors, on the CPU of rank 0 (every rank joins each gather in turn, so at most
    one whole tensor is on a GPU at a time), and nothing on the other ranks. With one process: ``tensors``."""
    if not active():
        return tensors
    out = {}
    for name, t in tensors.items():
        whole = full(t).detach()
        if is_main():
            out[name] = whole.cpu()
    return out


def sharded_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, e.g. read from a checkpoint) cut as ``like`` is: this rank's shard when ``like`` is
    a DTensor (no communication: every rank read the whole tensor), else ``value`` unchanged."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    whole = value.detach().to(like.device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def sharded_state(weights: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A whole state dict for ``module`` cut into this rank's shards where ``module``'s own tensors are sharded."""
    if not active():
        return weights
    own = module.state_dict()
    return {n: sharded_like(t, own[n]) if n in own else t for n, t in weights.items()}


@torch.no_grad()
def whole_copy(stack: nn.Module, build) -> nn.Module | None:
    """A plain copy of a sharded stack on rank 0's CPU (``build()`` makes an empty one of its shape), None on the
    other ranks; the stack itself with one process. Every rank must call it: it gathers each tensor."""
    if not active():
        return stack
    tensors = gathered(stack.state_dict())
    if not is_main():
        return None
    with torch.device("meta"):
        copy = build()
    copy.load_state_dict(tensors, assign=True)
    return copy


def log_file(path: Path) -> Path | str:
    """Where this rank writes its log lines: ``path`` on rank 0, nowhere (the null device) on the others."""
    return path if is_main() else os.devnull


class NoEvents:
    """The TensorBoard writer of a rank other than 0: it writes nothing."""

    def scalars(self, values: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


def barrier() -> None:
    """Wait for every rank (rank 0 finishing its writes, before the others exit and torchrun tears them down)."""
    if active():
        dist.barrier()


@contextlib.contextmanager
def main_only(cm: contextlib.AbstractContextManager) -> Iterator[None]:
    """``cm`` (a lock) entered on rank 0 only: the other ranks of one job are not a second job."""
    if is_main():
        with cm:
            yield
    else:
        yield
