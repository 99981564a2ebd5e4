"""Undo and housekeeping: drop an untrained stack, remove caches and old checkpoints, and what the project uses on disk.

Both change the manifest first (under its lock, with a history record) and delete files after, so a kill in between
leaves at most files the manifest no longer vouches for, which the next ``clean`` removes: never a manifest that
names a missing file.
"""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stackwise_cli.curricula import curriculum_of
from stackwise_cli.errors import ProjectError
from stackwise_cli.store.manifest import CacheEntry, Manifest, StackEntry
from stackwise_cli.store.project import CACHE, CKPT, MANIFEST, PARTS, Project

_STEP_PREFIX = "step-"  # train/checkpoint.py's checkpoint folders (kept here so status never imports torch)
_FINETUNE = "finetune"  # train/finetune.py's CKPT_NAME


def grow_side(m: Manifest) -> str:
    """The side this curriculum grows on: where a new stack goes."""
    return curriculum_of(m.recipe).grows


def dependents(m: Manifest, stack_id: int) -> list[int]:
    """Stacks (outermost first) whose training used stack ``stack_id``: left to right, the trained stacks to its
    right (they learnt on its output); right to left, those to its left (they learnt against it); end to end, every
    other trained stack (one run trained them together)."""
    others = curriculum_of(m.recipe).dependents(m, m.position(stack_id))
    return [s.id for s in others if s.state != "new"]


def stack_fix(project: Project, m: Manifest, entry: StackEntry) -> str:
    """The command(s) that make a stack whose file is missing or corrupt usable again; each one runs as written."""
    p = f"-p {project.root}"
    regrow = f"`stackwise grow {p} --side {grow_side(m)}`"
    if entry.state == "new":
        return f"`stackwise drop {entry.id} {p}`, then {regrow} (an untrained stack holds nothing to lose)"
    deps = dependents(m, entry.id)
    if deps:
        return (
            f"restore it from a backup: stack(s) {', '.join(map(str, deps))} trained on it, so it cannot be retrained "
            f"alone (`stackwise drop {deps[0]} --force {p}` drops the outermost of them)"
        )
    return (
        f"restore it from a backup, or `stackwise drop {entry.id} --force {p}`, then {regrow} and train the new stack"
    )


# --- drop ------------------------------------------------------------------------------------------------------


@dataclass
class Dropped:
    id: int
    state: str
    position: int
    removed: list[str]  # files and folders deleted, relative to the project
    bytes_freed: int
    rack: list[int]  # ids in rack order afterwards


def drop_stack(project: Project, stack_id: int, force: bool = False) -> Dropped:
    """Remove stack ``stack_id`` from the rack, with its file, checkpoints and caches. Ids never change or get
    reused. An untrained stack (state new) drops as asked; a trained (or training, frozen) one only with ``force``
    and only while no other trained stack depends on it (``dependents``): drop those first, outermost first."""
    m = project.load()
    entry = m.stack(stack_id)  # a clear error for an unknown id, before any lock file is made
    with project.job_lock(f"train-stack-{stack_id}", f"training of stack {stack_id}"):
        with project.update(f"drop {stack_id}" + (" --force" if force else "")) as m:
            entry = m.stack(stack_id)
            pos = m.position(stack_id)
            if entry.state != "new" and not force:
                raise ProjectError(
                    f"stack {stack_id} is {entry.state} ({entry.steps} steps, {entry.tokens:,} tokens): dropping it "
                    "deletes that training",
                    hint=f"pass --force to drop it anyway (`stackwise drop {stack_id} --force -p {project.root}`)",
                )
            deps = dependents(m, stack_id) if entry.state != "new" else []
            if deps:
                raise ProjectError(
                    f"stack(s) {', '.join(map(str, deps))} trained on stack {stack_id}: without it they compute "
                    "something they were never trained for",
                    hint=f"drop them first, outermost first: `stackwise drop {deps[0]} --force -p {project.root}`",
                )
            m.rack.remove(entry)
            m.caches = [c for c in m.caches if c.stack != stack_id]
            m.recount_flops()
        targets = [project.path(entry.file), project.ckpt_dir(stack_id), project.cache_dir(stack_id)]
        freed, removed = 0, []
        for t in targets:
            if t.exists():
                freed += _size(t)
                _remove(t)
                removed.append(str(t.relative_to(project.root)))
    return Dropped(stack_id, entry.state, pos, removed, freed, [s.id for s in m.rack])


# --- clean -----------------------------------------------------------------------------------------------------


@dataclass
class Item:
    path: str  # relative to the project
    bytes: int
    why: str  # why it can go (or, if ``needed``, what needs it)
    needed: bool = False  # a later stage reads it: removed only when asked (--caches / --checkpoints), and said so
    removed: bool = False


@dataclass
class Cleaned:
    items: list[Item] = field(default_factory=list)
    kept: list[Item] = field(default_factory=list)  # what was found but kept, and why
    dry_run: bool = False

    @property
    def bytes_freed(self) -> int:
        return sum(i.bytes for i in self.items)

    def to_data(self) -> dict:
        return {
            "dry_run": self.dry_run,
            "bytes_freed": self.bytes_freed,
            "removed": [asdict(i) for i in self.items],
            "kept": [asdict(i) for i in self.kept],
        }


def cache_need(m: Manifest, c: CacheEntry) -> str | None:
    """What still reads cache ``c`` (None: nothing; it can be recomputed with ``stackwise cache``). Left to right: the
    stack's own training, and the cache of the stack to its right, built from it in one stack's pass."""
    if c.stack not in m.ids() or not curriculum_of(m.recipe).reads_prefix:
        return None
    pos = m.position(c.stack)
    s = m.rack[pos]
    if s.state not in ("trained", "frozen"):
        return f"`stackwise train-stack {c.stack}` reads it (stack {c.stack} is {s.state})"
    if pos == len(m.rack) - 1:
        return f"the next stack grown on the right gets its {c.split} cache from it, one stack's pass instead of all"
    after = m.rack[pos + 1]
    theirs = m.cache(after.id, c.split)
    if after.state not in ("trained", "frozen") and (theirs is None or not theirs.complete):
        return f"`stackwise cache {after.id} --split {c.split}` builds stack {after.id}'s cache from it"
    return None


def _stale(project: Project, m: Manifest, c: CacheEntry) -> bool:
    return c.stack not in m.ids() or bool(project.stale_reasons(m, c))


def plan_clean(project: Project, caches: bool = False, checkpoints: bool = False) -> Cleaned:
    """What ``clean`` would remove: stray temporaries, files the manifest does not know, caches that are stale or
    that nothing reads any more, checkpoints no run resumes from and every one but the newest of a run that can
    resume. ``caches`` / ``checkpoints``: also those a later stage needs (the caller says so)."""
    m = project.load()
    plan = Cleaned()
    # Caches: one folder per (stack, split); those of ids no longer in the manifest are strays.
    known = {f"cache/{c.stack}/{c.split}" for c in m.caches}
    for c in m.caches:
        rel = f"cache/{c.stack}/{c.split}"
        folder = project.path(rel)
        if c.removed and not c.complete and not c.shards:
            continue  # already cleaned; the entry stays for the FLOPs that computed it
        size = _size(folder) if folder.exists() else 0
        if _stale(project, m, c):
            plan.items.append(Item(rel, size, "stale: its producers changed"))
            continue
        need = cache_need(m, c)
        if need is None:
            plan.items.append(Item(rel, size, "no stage reads it any more (`stackwise cache` recomputes it)"))
        elif caches:
            plan.items.append(Item(rel, size, f"needed: {need}", needed=True))
        else:
            plan.kept.append(Item(rel, size, f"kept: {need} (--caches removes it too)", needed=True))
    for folder in sorted(project.cache_root.glob("*/*")):
        if folder.is_dir() and _rel(project, folder) not in known:
            plan.items.append(Item(_rel(project, folder), _size(folder), "not in the manifest"))
    # Checkpoints: ckpt/<id>, ckpt/all (end to end), ckpt/finetune (fuse's fine-tune).
    for folder in sorted(project.ckpt_root.glob("*")):
        if not folder.is_dir():
            continue
        steps = sorted(
            p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_STEP_PREFIX) and ".tmp" not in p.name
        )
        resumable = _resumable(m, folder.name)
        if resumable is None:
            plan.items.append(Item(_rel(project, folder), _size(folder), "no run resumes from it"))
            continue
        for old in steps[:-1]:
            plan.items.append(
                Item(_rel(project, old), _size(old), "older than the newest checkpoint, which resume uses")
            )
        if steps:
            newest = steps[-1]
            need = f"needed: the resume point of {resumable}; without it the rerun starts over"
            if checkpoints:
                plan.items.append(Item(_rel(project, newest), _size(newest), need, needed=True))
            else:
                plan.kept.append(
                    Item(
                        _rel(project, newest),
                        _size(newest),
                        "kept: " + need[8:] + " (--checkpoints removes it too)",
                        needed=True,
                    )
                )
    # Stack files the manifest no longer lists (a drop killed between the manifest and the delete).
    listed = {s.file for s in m.rack}
    for f in sorted(project.stacks_dir.glob("*.safetensors")):
        if _rel(project, f) not in listed:
            plan.items.append(Item(_rel(project, f), _size(f), "not in the manifest"))
    return plan


def _resumable(m: Manifest, name: str) -> str | None:
    """Which run a checkpoint folder can resume (None: none can, so it can go)."""
    if name == _FINETUNE:
        return "the fuse fine-tune"
    if name == "all":
        training = m.rack and curriculum_of(m.recipe).whole_rack and any(s.state == "training" for s in m.rack)
        return "`train-stack all`" if training else None
    if name.isdigit() and int(name) in m.ids() and m.stack(int(name)).state == "training":
        return f"`train-stack {name}`"
    return None


def clean(project: Project, caches: bool = False, checkpoints: bool = False, dry_run: bool = False) -> Cleaned:
    """Remove what ``plan_clean`` lists (nothing with ``dry_run``), plus stray temporaries of killed writers."""
    plan = plan_clean(project, caches, checkpoints)
    plan.dry_run = dry_run
    if dry_run:
        return plan
    with contextlib.ExitStack() as held:
        # Every job that writes what goes is locked out first: one running (a cache being written, a stack
        # training) fails here, naming its holder, before anything is removed.
        for name in sorted({_job_of(i.path) for i in plan.items} - {None}):
            held.enter_context(project.job_lock(*name))
        with project.lock():
            project.sweep()
        cache_rels = {i.path for i in plan.items if i.path.startswith(f"{CACHE}/")}
        command = "clean" + (" --caches" if caches else "") + (" --checkpoints" if checkpoints else "")
        # Marked in the manifest first: it never vouches for deleted shards. The entry stays, emptied, so the FLOPs
        # that computed it still count (``Manifest.count_flops``) and `stackwise cache` rebuilds it as any other.
        with project.update(command) as m:
            for c in m.caches:
                if _rel(project, project.cache_dir(c.stack, c.split)) in cache_rels:
                    c.shards, c.complete, c.removed = [], False, True
        for item in plan.items:
            _remove(project.path(item.path))
            item.removed = True
    for parent in (project.cache_root, project.ckpt_root):  # empty per-stack folders left behind
        for folder in sorted(parent.glob("*"), reverse=True) if parent.exists() else []:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return plan


def _job_of(rel: str) -> tuple[str, str] | None:
    """(job lock name, what) of the job that writes ``rel`` (see ``Project.job_lock``); None for none."""
    parts = Path(rel).parts
    if parts[0] == CACHE and len(parts) >= 3:
        return f"cache-{parts[1]}-{parts[2]}", f"the {parts[2]} cache of stack {parts[1]}"
    if parts[0] == CKPT and len(parts) >= 2:
        if parts[1] == _FINETUNE:
            return "fuse-finetune", "the fine-tune of the fused model"
        return f"train-stack-{parts[1]}", f"training of stack {parts[1]}"
    return None


# --- disk use ----------------------------------------------------------------------------------------------------


def disk_use(project: Project) -> dict[str, int]:
    """Bytes on disk by top-level part of the project (``PARTS``; ``other`` for the rest), and ``total``."""
    use = {p: 0 for p in PARTS}
    use["other"] = 0
    for child in project.root.iterdir() if project.root.exists() else []:
        key = child.name if child.name in use else "other"
        if child.name in (MANIFEST,) or child.name.startswith("."):
            key = "other"
        use[key] += _size(child)
    use["total"] = sum(use.values())
    return use


def human_bytes(n: float) -> str:
    """1.3 GB, 716.0 kB, 12 B (decimal units, as `df -H` and `du --si` print them)."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000 or unit == "GB":
            break
    return f"{n:.1f} {unit}"


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _rel(project: Project, path: Path) -> str:
    return path.relative_to(project.root).as_posix()
