"""What a project holds, and what is stale, missing or corrupt (``status`` checks cheaply, ``verify`` re-hashes)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stackwise_cli.store.files import sha256_file
from stackwise_cli.store.project import Project
from stackwise_cli.store.tidy import cache_need, disk_use, stack_fix


@dataclass
class Problem:
    what: str  # missing | corrupt | stale | incomplete
    file: str
    detail: str
    fix: str


@dataclass
class Report:
    rack: list[dict] = field(default_factory=list)
    caches: list[dict] = field(default_factory=list)
    fused: dict | None = None
    flops: dict = field(default_factory=dict)  # training FLOPs by stage and in total (``Manifest.count_flops``)
    problems: list[Problem] = field(default_factory=list)
    files_checked: int = 0
    disk: dict = field(default_factory=dict)  # bytes by part of the project (data, stacks, cache, ckpt, ...), total

    def to_data(self) -> dict:
        return asdict(self)


def _tracked_files(project: Project) -> list[tuple[str, str, str]]:
    """(file, expected sha256, command that recreates it) for every file the manifest vouches for. Every command
    named runs as written (tests/test_friendly.py runs them)."""
    m = project.load()
    p = f"-p {project.root}"
    files = [(m.tokenizer.file, m.tokenizer.sha256, "restore it; it cannot be regenerated without changing the data")]
    for split in m.data.splits.values():
        files += [(s.file, s.sha256, "restore it, or `stackwise prepare` into a new project") for s in split.shards]
    if m.ends is not None:
        files.append((m.ends.file, m.ends.sha256, "restore it from a backup"))
    files += [(s.file, s.sha256, stack_fix(project, m, s)) for s in m.rack]
    for c in m.caches:
        files += [(s.file, s.sha256, f"`stackwise cache {c.stack} --split {c.split} {p}`") for s in c.shards]
    if m.fused is not None:
        files.append((f"{m.fused.dir}/model.safetensors", m.fused.sha256, f"`stackwise fuse {p}`"))
    return files


def status(project: Project, rehash: bool = False) -> Report:
    """The rack in order, the caches, the fused model, and every problem found. ``rehash`` = verify."""
    m = project.load()
    report = Report()
    for pos, s in enumerate(m.rack):
        # flops: its train-stack runs; cache_flops: the train cache feeding it; total_flops: the two together
        train_cache = m.cache(s.id, "train")
        cache_flops = train_cache.flops if train_cache is not None else 0.0
        report.rack.append(
            {"position": pos, **asdict(s), "cache_flops": cache_flops, "total_flops": s.flops + cache_flops}
        )
    report.flops = asdict(m.count_flops())
    p = f"-p {project.root}"
    for c in m.caches:
        in_rack = c.stack in m.ids()
        reasons = project.stale_reasons(m, c) if in_rack else ["its stack is no longer in the rack"]
        removed = c.removed and not c.complete and not c.shards  # by `stackwise clean`: its FLOPs still count
        report.caches.append(
            {
                "stack": c.stack,
                "split": c.split,
                "dtype": c.dtype,
                "shards": len(c.shards),
                "complete": c.complete,
                "stale": reasons,
                "removed": removed,
            }
        )
        fix = f"`stackwise cache {c.stack} --split {c.split} {p}`" if in_rack else f"`stackwise clean {p}`"
        need = cache_need(m, c)
        if removed:
            if need is not None:
                report.problems.append(
                    Problem("removed", f"cache/{c.stack}/{c.split}", f"removed by `stackwise clean`, and {need}", fix)
                )
        elif reasons:
            report.problems.append(Problem("stale", f"cache/{c.stack}/{c.split}", "; ".join(reasons), fix))
        elif not c.complete:
            report.problems.append(
                Problem("incomplete", f"cache/{c.stack}/{c.split}", "interrupted while writing", fix)
            )
    if m.fused is not None:
        fused_stale = not m.fused_is_current()
        report.fused = {"dir": m.fused.dir, "stale": fused_stale}
        if fused_stale:
            report.problems.append(
                Problem("stale", m.fused.dir, "the rack changed since it was fused", f"`stackwise fuse {p}`")
            )
    for file, sha, fix in _tracked_files(project):
        path = project.path(file)
        report.files_checked += 1
        if not path.exists():
            report.problems.append(Problem("missing", file, "listed in the manifest but not on disk", fix))
        elif rehash and sha256_file(path) != sha:
            report.problems.append(Problem("corrupt", file, "its sha256 differs from the manifest", fix))
    report.disk = disk_use(project)
    return report
