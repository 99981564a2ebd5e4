"""A project directory: its paths, the locked read-modify-write of the manifest, and staleness checks."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import yaml

from stackwise_cli.errors import ManifestError, ProjectError, StaleError
from stackwise_cli.schema import SchemaError, from_data, to_data
from stackwise_cli.store.files import atomic_write_text, exclusive_lock, holder_lock, sweep_tmp
from stackwise_cli.store.manifest import (
    HISTORY_LIMIT,
    CacheEntry,
    HistoryEntry,
    Manifest,
    StackRef,
    Upstream,
    stack_objective,
)

MANIFEST = "stackwise.yaml"
# The project's layout below its root. Code reaches each place through ``Project``'s path methods, never by name.
DATA = "data"  # token shards, data/<split>/
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"  # an imported tokenizer's end-of-text token, beside it
ENDS = "ends.safetensors"
STACKS = "stacks"  # stacks/<id>.safetensors
CACHE = "cache"  # activation caches, cache/<stack>/<split>/
CKPT = "ckpt"  # checkpoints, ckpt/<stack | all | finetune>/
BEST = "best"  # a run's best-validation weights, best/<run>.safetensors
FUSED = "fused"  # the fused model, in Hugging Face format
LOGS = "logs"
LOCKS = "locks"
PLOTS = "plots"
# The top-level parts, in the order ``status`` lists their disk use.
PARTS = (DATA, TOKENIZER, ENDS, STACKS, CACHE, CKPT, BEST, FUSED, LOGS)


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def worker_rank() -> bool:
    """This process is a rank other than 0 of a torchrun job (RANK, WORLD_SIZE): rank 0 speaks for the job, so
    this one takes no job lock and writes no manifest."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and os.environ.get("RANK", "0") != "0"


def digest(parts: list[str]) -> str:
    """One checksum standing for an ordered list of checksums."""
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


class Project:
    """Paths inside the project directory, and the manifest's load / locked update."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / MANIFEST
        self.lock_path = self.root / f".{MANIFEST}.lock"

    # --- paths ---------------------------------------------------------------------------------------------

    def path(self, relative: str) -> Path:
        return self.root / relative

    # Relative names, as the manifest records them:

    def split_dir(self, split: str) -> str:
        return f"{DATA}/{split}"

    @property
    def tokenizer_file(self) -> str:
        return TOKENIZER

    @property
    def ends_file(self) -> str:
        return ENDS

    def stack_file(self, stack_id: int) -> str:
        return f"{STACKS}/{stack_id}.safetensors"

    # Places on disk:

    @property
    def stacks_dir(self) -> Path:
        return self.root / STACKS

    @property
    def ckpt_root(self) -> Path:
        return self.root / CKPT

    def ckpt_dir(self, stack_id: int | str) -> Path:
        return self.ckpt_root / str(stack_id)

    @property
    def cache_root(self) -> Path:
        return self.root / CACHE

    def cache_dir(self, stack_id: int, split: str | None = None) -> Path:
        """The cache entering ``stack_id`` for ``split``; without a split, the folder of all its splits."""
        folder = self.cache_root / str(stack_id)
        return folder if split is None else folder / split

    def best_file(self, run: str) -> Path:
        return self.root / BEST / f"{run}.safetensors"

    @property
    def fused_dir(self) -> Path:
        return self.root / FUSED

    @property
    def logs_dir(self) -> Path:
        return self.root / LOGS

    @property
    def plots_dir(self) -> Path:
        return self.root / PLOTS

    def job_lock(self, job: str, what: str):
        """Held for the whole of a long job (training a stack, writing a cache) so two processes never do the
        same one at once; see ``holder_lock``. Under torchrun only rank 0 takes it: the other ranks are that job."""
        if worker_rank():
            return contextlib.nullcontext()
        return holder_lock(self.root / LOCKS / f"{job}.lock", what)

    def log_path(self, command: str) -> Path:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
        return self.logs_dir / f"{command}-{stamp}-{os.getpid()}.jsonl"

    # --- manifest ------------------------------------------------------------------------------------------

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def load(self) -> Manifest:
        """Read and validate the manifest. Safe without the lock: the file is only ever replaced by rename."""
        if not self.manifest_path.exists():
            raise ProjectError(
                f"no project at {self.root} ({MANIFEST} not found)",
                hint=f"create one with `stackwise prepare -p {self.root} --recipe recipes/llama/tiny.yaml`",
            )
        try:
            data = yaml.safe_load(self.manifest_path.read_text())
        except yaml.YAMLError as e:
            raise ManifestError(f"{self.manifest_path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except OSError as e:
            raise ManifestError(f"cannot read {self.manifest_path}: {e.strerror}") from None
        try:
            return from_data(Manifest, data)
        except SchemaError as e:
            lines = [f"{self.manifest_path}: {p}: {m}" if p else f"{self.manifest_path}: {m}" for p, m in e.problems]
            raise ManifestError("\n".join(lines)) from None

    def save(self, manifest: Manifest) -> None:
        """Write the manifest atomically. Call under the lock (``update``) unless the project is new."""
        if worker_rank():  # a bug, not a user error: only rank 0 of a torchrun job may write the manifest
            raise ProjectError(
                f"rank {os.environ['RANK']} of a torchrun job tried to write {self.manifest_path}: only rank 0 may",
                hint="run this command as one process, without torchrun",
            )
        text = yaml.safe_dump(to_data(manifest), sort_keys=False, width=120, allow_unicode=True)
        atomic_write_text(
            self.manifest_path, f"# stackwise project manifest: edit with care, `stackwise verify` checks it\n{text}"
        )

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        with exclusive_lock(self.lock_path):
            yield

    @contextlib.contextmanager
    def update(self, command: str | None = None) -> Iterator[Manifest]:
        """Read-modify-write of the manifest under the exclusive lock; saved only if the block succeeds."""
        with self.lock():
            manifest = self.load()
            yield manifest
            if command:
                record(manifest, command)
            self.save(manifest)

    def sweep(self, min_age_s: float = 3600.0) -> int:
        """Remove temporaries left by killed writers (never the only copy of anything; see ``sweep_tmp``)."""
        return sweep_tmp(self.root, min_age_s)

    # --- upstream checksums and staleness ------------------------------------------------------------------

    def split_digest(self, manifest: Manifest, split: str) -> str:
        return digest([s.sha256 for s in manifest.data.splits[split].shards])

    def upstream_for(self, manifest: Manifest, stack_id: int, split: str) -> Upstream:
        """What the cache entering ``stack_id`` depends on: the split's tokens, the embedding, the stacks left of it."""
        pos = manifest.position(stack_id)
        return Upstream(
            data=self.split_digest(manifest, split),
            ends_input=manifest.require_ends().input_sha256,
            stacks=[StackRef(id=s.id, sha256=s.sha256) for s in manifest.rack[:pos]],
            inputs=stack_objective(manifest, stack_id).key(),
        )

    def stale_reasons(self, manifest: Manifest, cache: CacheEntry) -> list[str]:
        """Why a cache no longer matches its producers (empty = fresh)."""
        want = self.upstream_for(manifest, cache.stack, cache.split)
        have = cache.upstream
        reasons = []
        if have.data != want.data:
            reasons.append(f"the {cache.split} token shards changed")
        if have.ends_input != want.ends_input:
            reasons.append("the embedding changed")
        if have.inputs != want.inputs:
            reasons.append(f"the stack's input corruption changed (was {have.inputs!r}, now {want.inputs!r})")
        have_stacks = {s.id: s.sha256 for s in have.stacks}
        want_stacks = {s.id: s.sha256 for s in want.stacks}
        if [s.id for s in have.stacks] != [s.id for s in want.stacks]:
            reasons.append(
                f"the stacks to its left are now {[s.id for s in want.stacks]}, not {[s.id for s in have.stacks]}"
            )
        else:
            changed = [i for i in want_stacks if have_stacks[i] != want_stacks[i]]
            if changed:
                reasons.append(f"stack(s) {', '.join(map(str, changed))} changed since the cache was written")
        if cache.seq_len != manifest.data.seq_len or cache.d_model != manifest.recipe.model.d_model:
            reasons.append(
                f"it holds sequences of {cache.seq_len} x {cache.d_model}, the project needs "
                f"{manifest.data.seq_len} x {manifest.recipe.model.d_model}"
            )
        return reasons

    def fresh_cache(self, manifest: Manifest, stack_id: int, split: str) -> CacheEntry:
        """The complete, fresh cache entering ``stack_id``, or a StaleError/ProjectError naming the fix."""
        fix = f"`stackwise cache {stack_id} --split {split} -p {self.root}`"
        cache = manifest.cache(stack_id, split)
        if cache is None:
            raise ProjectError(
                f"stack {stack_id} has no {split} cache (the hidden states entering it)", hint=f"run {fix}"
            )
        if not cache.complete:
            raise ProjectError(f"the {split} cache of stack {stack_id} is incomplete", hint=f"run {fix} to finish it")
        reasons = self.stale_reasons(manifest, cache)
        if reasons:
            raise StaleError(f"the {split} cache of stack {stack_id} is stale: {'; '.join(reasons)}", hint=f"run {fix}")
        return cache


def record(manifest: Manifest, command: str) -> None:
    """Append to the manifest's short command history."""
    manifest.history.append(HistoryEntry(time=now(), command=command, host=socket.gethostname(), pid=os.getpid()))
    del manifest.history[:-HISTORY_LIMIT]
