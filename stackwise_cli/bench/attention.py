"""Attention kinds and backends against sequence length: tokens/s and peak memory of forward + backward.

One attention layer (no MLP, no norm) of the recipe's model shape, causal, on random input. Peak memory: on
CUDA the peak allocated bytes above the case's start; on the CPU the peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set when the case began, measured in a fresh process with glibc
told to return every tensor-sized block when it is freed (that slows allocation, so timing runs apart).
"""

from __future__ import annotations

import dataclasses
import gc
import multiprocessing as mp
import statistics
import time

import torch

from stackwise_cli.bench.step import _reset_peak_rss, _rss_bytes, exact_rss_accounting
from stackwise_cli.errors import StackwiseError
from stackwise_cli.model.attention import make_attention, resolve_backend
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.model.rope import rope_tables
from stackwise_cli.schema import SchemaError

KINDS = ("mha", "gqa", "mqa", "mla", "linear")
BACKENDS = ("reference", "sdpa", "xformers")


def _config_for(
    cfg: ModelConfig, attn: AttentionConfig, kind: str, backend: str
) -> tuple[ModelConfig, AttentionConfig]:
    """The recipe's shape with the kind's head layout: mha = every head its own KV, mqa = one KV head."""
    kv = {"mha": cfg.n_heads, "mqa": 1}.get(kind, cfg.n_kv_heads)
    if kind == "gqa" and kv in (None, cfg.n_heads):
        kv = max(1, cfg.n_heads // 4)  # a real grouping, even if the recipe's model is MHA
    model = dataclasses.replace(cfg, n_kv_heads=kv)
    return model, dataclasses.replace(attn, kind=kind, backend=backend, window=None)


def _measure(
    model: ModelConfig, attn: AttentionConfig, dev: torch.device, batch: int, T: int, warmup: int, repeats: int
) -> tuple[float, int]:
    gc.collect()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    else:
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
    layer = make_attention(model, attn).to(dev)
    cos, sin = rope_tables(model, T, dev, attn.rope_dim_for(model))
    x = torch.randn(batch, T, model.d_model, device=dev, requires_grad=True)
    times = []
    for i in range(warmup + repeats):
        if cuda:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        layer(x, cos, sin, causal=True).sum().backward()
        if cuda:
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) if cuda else _rss_bytes("VmHWM")) - base
    return statistics.median(times), max(0, peak)  # RSS can dip below the start by a page or two


def _peak_in_this_process(model: ModelConfig, attn: AttentionConfig, batch: int, T: int) -> int:
    exact_rss_accounting()
    _measure(model, attn, torch.device("cpu"), batch, T, 0, 1)  # rehearsal: torch's one-time set-up is not the case's
    return _measure(model, attn, torch.device("cpu"), batch, T, 0, 1)[1]


def _cpu_peak(model: ModelConfig, attn: AttentionConfig, batch: int, T: int) -> int:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_in_this_process, (model, attn, batch, T))


def bench_attention(
    cfg: ModelConfig,
    attn: AttentionConfig,
    device: str,
    seq_lens: list[int],
    batch_size: int = 4,
    warmup: int = 1,
    repeats: int = 3,
) -> list[dict]:
    """One row per (kind, backend, sequence length); unavailable combinations get a row saying why."""
    dev = torch.device(device)
    rows = []
    for kind in KINDS:
        for backend in BACKENDS:
            try:
                model, a = _config_for(cfg, attn, kind, backend)
                resolve_backend(backend, kind, dev)
            except (StackwiseError, SchemaError) as e:
                why = e.message if isinstance(e, StackwiseError) else "; ".join(m for _, m in e.problems)
                rows.append({"kind": kind, "backend": backend, "seq_len": None, "unavailable": why})
                continue
            for T in seq_lens:
                step_s, peak = _measure(model, a, dev, batch_size, T, warmup, repeats)
                if dev.type == "cpu":  # exact accounting slows allocation: memory comes from its own process
                    peak = _cpu_peak(model, a, batch_size, T)
                rows.append(
                    {
                        "kind": kind,
                        "backend": backend,
                        "seq_len": T,
                        "batch_size": batch_size,
                        "tokens_per_s": batch_size * T / step_s,
                        "step_s": step_s,
                        "peak_bytes": peak,
                    }
                )
    return rows
