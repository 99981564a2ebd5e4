"""One training step of a stack against one step of the same model trained end to end: the real stages
(train/stage.py, built by bench/case.py as train-stack builds them, objective included) on random data.

Each case runs in a fresh subprocess so its peak memory is its own: on CUDA the peak allocated bytes; on the
CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set the process had
just before the case built its model, so the interpreter and torch's own footprint are not counted. On the CPU
the memory comes from a second fresh process with exact accounting (see ``exact_rss_accounting``), which slows
allocation, so the timed process keeps the default allocator.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import statistics
import time
from dataclasses import asdict, dataclass

from stackwise_cli.recipe import Recipe


@dataclass
class StepMeasure:
    case: str  # "stack" or "end-to-end"
    blocks: int
    params_trained: int
    batch_size: int
    seq_len: int
    step_s: float  # median over repeats
    tokens_per_s: float
    peak_bytes: int
    memory_how: str
    stage: str = ""  # the planned stage measured, as name/variant (train/stage.py), objective included


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def exact_rss_accounting() -> None:
    """Make the resident set follow live CPU memory: glibc otherwise keeps freed blocks (its mmap threshold grows
    as memory is freed), so a case that reuses them would show no growth. A fixed 64 KiB threshold maps every
    tensor-sized block on its own and returns it to the system when freed."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD (fixing it also stops the dynamic adjustment)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD: give back heap tops promptly
    except (OSError, AttributeError):
        pass  # not glibc: the figures may then undercount reuse


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _measure(
    case: str,
    recipe_data: dict,
    device: str,
    batch_size: int,
    warmup: int,
    repeats: int,
    memory: bool,
    rehearsed: bool = False,
) -> dict:
    """One case in a fresh process: timed with the default allocator, or (``memory``) a short run with exact
    CPU memory accounting, which slows allocation and so must not be timed. The memory run is rehearsed once
    first, so torch's one-time set-up (thread pools, kernel workspaces) is not counted as the case's memory."""
    if memory and not rehearsed:
        _measure(case, recipe_data, device, batch_size, warmup, repeats, True, rehearsed=True)
    import gc

    import torch

    from stackwise_cli.bench.case import random_case
    from stackwise_cli.recipe import recipe_from_data
    from stackwise_cli.train.optim import make_optimizer
    from stackwise_cli.train.stage import measured

    if memory:
        exact_rss_accounting()
        warmup, repeats = 0, 2
    recipe = recipe_from_data(recipe_data, "recipe")
    tr = recipe.train
    dev = torch.device(device)
    T = recipe.data.seq_len
    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()

    stage = measured(recipe, "train-stack-l2r" if case == "stack" else "end-to-end")
    c = random_case(recipe, stage, "fp32", dev, batch_size)
    params, blocks = c.trainable, sum(stage.blocks)
    opt = make_optimizer(params, tr)
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        loss = c.loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if cuda:
        peak, how = torch.cuda.max_memory_allocated(dev) - base, "CUDA peak allocated above the start of the case"
    else:
        peak, how = _rss_bytes("VmHWM") - base, "peak RSS (VmHWM) above the RSS before the case was built"
    step_s = statistics.median(times)
    return asdict(
        StepMeasure(
            case,
            blocks,
            sum(p.numel() for p in params.values()),
            batch_size,
            T,
            step_s,
            batch_size * T / step_s,
            peak,
            how,
            f"{stage.name}/{stage.variant}",
        )
    )


def bench_step(
    recipe: Recipe, device: str = "cpu", batch_size: int | None = None, warmup: int = 2, repeats: int = 5
) -> list[StepMeasure]:
    """Measure the stack case and the end-to-end case, each in its own fresh process."""
    batch_size = batch_size or recipe.train.batch_size
    ctx = mp.get_context("spawn")
    out = []
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        for case in ("stack", "end-to-end"):
            timed = pool.apply(_measure, (case, recipe.to_data(), device, batch_size, warmup, repeats, False))
            if device.startswith("cpu"):
                mem = pool.apply(_measure, (case, recipe.to_data(), device, batch_size, warmup, repeats, True))
                timed["peak_bytes"], timed["memory_how"] = mem["peak_bytes"], mem["memory_how"]
            out.append(StepMeasure(**timed))
    return out
