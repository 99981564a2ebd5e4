"""Several processes on one project: serialised manifest updates, one trainer per stack, stale locks taken over."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import pytest

from stackwise_cli.errors import ProjectError
from stackwise_cli.store.files import holder_lock
from stackwise_cli.store.project import Project
from stackwise_cli.train.grow import grow

FORK = mp.get_context("fork")


def run_all(procs: list) -> None:
    """Start every process, then wait for all; each must exit cleanly."""
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def _bump(root: str, n: int, tag: int) -> None:
    project = Project(root)
    for i in range(n):
        with project.update(f"writer {tag} update {i}") as m:
            m.next_id += 1


def test_many_concurrent_manifest_updates_lose_none(project):
    writers, each = 4, 50
    start = project.load()
    run_all([FORK.Process(target=_bump, args=(str(project.root), each, t)) for t in range(writers)])
    m = project.load()
    assert m.next_id == start.next_id + writers * each
    # every update's history line is there (the history keeps the last 200: exactly these)
    tags = {h.command for h in m.history}
    assert tags == {f"writer {t} update {i}" for t in range(writers) for i in range(each)}


def _grow(root: str) -> None:
    grow(Project(root))


def test_concurrent_grows_get_distinct_ids(project):
    run_all([FORK.Process(target=_grow, args=(str(project.root),)) for _ in range(4)])
    m = project.load()
    assert sorted(m.ids()) == [0, 1, 2, 3] and m.next_id == 4
    for s in m.rack:
        assert project.path(s.file).exists()


def _hold(path: str, ready, release) -> None:
    with holder_lock(__import__("pathlib").Path(path), "the job"):
        ready.set()
        release.wait(60)


def test_holder_lock_names_the_holder_and_is_free_after_it_dies(tmp_path):
    path = tmp_path / "locks" / "job.lock"
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold, args=(str(path), ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(ProjectError) as e:
        with holder_lock(path, "the job"):
            pass
    assert f"pid {holder.pid}" in str(e.value) and "is already running" in str(e.value)
    os.kill(holder.pid, signal.SIGKILL)  # dies holding the lock: the kernel releases it
    holder.join(30)
    with holder_lock(path, "the job"):  # taken over at once
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_second_trainer_of_the_same_stack_is_refused(project):
    from typer.testing import CliRunner

    from stackwise_cli.app import app

    grow(project)
    cmd = [sys.executable, "-m", "stackwise_cli", "train-stack", "0", "-p", str(project.root), "--steps", "100000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = project.root / "locks" / "train-stack-0.lock"
        end = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()):
            assert time.monotonic() < end and proc.poll() is None, "the first trainer never took its lock"
            time.sleep(0.05)
        second = CliRunner().invoke(app, ["train-stack", "0", "-p", str(project.root), "--steps", "3"])
        assert second.exit_code == 1
        assert "training of stack 0 is already running" in second.stderr and f"pid {proc.pid}" in second.stderr
    finally:
        proc.kill()
        proc.wait()
    # the holder was killed with -9: its lock is stale, and the next trainer takes it over
    third = CliRunner().invoke(app, ["train-stack", "0", "-p", str(project.root), "--steps", "3", "--resume", "never"])
    assert third.exit_code == 0, third.output
    assert project.load().stack(0).state == "trained"


def test_a_cache_and_a_training_run_update_the_manifest_side_by_side(project):
    """train-stack 1 in one process while another writes the val cache of stack 1: both updates land."""
    from stackwise_cli.train.cache import build_cache
    from stackwise_cli.train.stack import train_stack

    grow(project)
    grow(project)
    train_stack(project, 0, steps=3)
    build_cache(project, 1, "train")
    cmd = [sys.executable, "-m", "stackwise_cli", "train-stack", "1", "-p", str(project.root), "--steps", "400"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.monotonic() + 60
    while project.load().stack(1).state != "training":
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.05)
    build_cache(project, 1, "val")  # while stack 1 trains: the head trains, but the cache's inputs do not change
    overlapped = proc.poll() is None
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert overlapped, "the training run finished before the cache: the test did not exercise sharing"
    m = project.load()
    assert m.stack(1).state == "trained" and m.stack(1).steps == 400
    assert m.cache(1, "val").complete and project.fresh_cache(m, 1, "val")


def test_slurm_stage_script_forwards_the_preemption_signal_and_reports_resumable(project, tmp_path):
    """examples/slurm/stage.sh: Slurm signals the batch shell; the shell must pass it to stackwise, which
    checkpoints and exits 75, and the script must exit 75 too (it would requeue under Slurm)."""
    from pathlib import Path

    grow(project)
    script = Path(__file__).parent.parent / "examples" / "slurm" / "stage.sh"
    bin_dir = tmp_path / "bin"  # put this interpreter's stackwise first on PATH
    bin_dir.mkdir()
    (bin_dir / "stackwise").write_text(f'#!/bin/sh\nexec {sys.executable} -m stackwise_cli "$@"\n')
    (bin_dir / "stackwise").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    args = ["bash", str(script), "train-stack", "0", "-p", str(project.root), "--steps", "100000"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.monotonic() + 60
    while (
        not list(project.root.glob("logs/train-stack-0-*.jsonl"))
        or not next(project.root.glob("logs/train-stack-0-*.jsonl")).stat().st_size
    ):
        assert time.monotonic() < end and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # to the batch shell, as --signal=B:USR1 does
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err.decode()
    assert b"SIGUSR1" in err
    m = project.load()
    assert m.stack(0).state == "training" and m.stack(0).steps > 0
