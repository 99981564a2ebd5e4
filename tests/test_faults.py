"""Fault injection with real `kill -9`: every stage killed inside every write it makes, and at random instants.

After each kill: the manifest loads, every file under its final name is complete (it parses), and every file
that exists both before and after the stage is either its old version or its new version, byte for byte.
Then the same command, rerun, finishes the job with exactly the result of an uninterrupted run, and
`stackwise verify` finds nothing wrong.

The default suite kills each stage once inside every write (STACKWISE_FAULT_KILL_AT=1, 2, ... until the
command completes) plus a few random instants; `STACKWISE_SOAK_TRIALS=N` adds N random-instant kills per stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.store.faults import ENV
from stackwise_cli.store.files import TMP_MARK
from stackwise_cli.store.project import Project

pytestmark = pytest.mark.slow
SOAK = int(os.environ.get("STACKWISE_SOAK_TRIALS", "0"))
COUNTS = {"trials_killed": 0, "trials_completed_before_kill": 0, "files_checked": 0, "corrupt_files": 0}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print(f"\nfault injection: {json.dumps(COUNTS)}")


def _skip(rel: Path) -> bool:
    return TMP_MARK in str(rel) or rel.parts[0] in ("logs", "locks") or rel.name == ".stackwise.yaml.lock"


def shas(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not _skip(p.relative_to(root))
    }


def _complete(path: Path) -> bool:
    """Does this file parse as what its name says it is?"""
    try:
        if path.suffix == ".safetensors":
            load_file(str(path))
        elif path.suffix == ".arrow":
            with pa.memory_map(str(path)) as src:
                pa.ipc.open_file(src).read_all()
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text())
        return True
    except Exception:
        return False


def check_after_kill(root: Path, before: dict[str, str], after: dict[str, str], exact: bool) -> None:
    """``exact``: each file must be byte-equal to its version before or after the command (for commands that
    write each file once; a multi-stage build legitimately passes through versions in between)."""
    if (root / "stackwise.yaml").exists():
        Project(root).load()  # a complete, valid manifest (raises otherwise)
    now = shas(root)
    for rel, sha in now.items():
        COUNTS["files_checked"] += 1
        ok = _complete(root / rel)
        if exact and rel != "stackwise.yaml" and not rel.startswith("ckpt/") and (rel in before or rel in after):
            ok = ok and sha in (before.get(rel), after.get(rel))  # the old version or the new one, nothing else
        if not ok:
            COUNTS["corrupt_files"] += 1
        assert ok, f"{rel} is neither complete-old nor complete-new after the kill"


def manifest_facts(root: Path) -> dict:
    """The manifest without the parts that depend on when commands ran (creation time, history)."""
    from stackwise_cli.schema import to_data

    data = to_data(Project(root).load())
    del data["created"], data["history"]
    return data


def cli(root: Path, args: list[str]) -> None:
    result = CliRunner().invoke(app, [*args, "-p", str(root)], env={"COLUMNS": "120", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output


def subprocess_cmd(root: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "stackwise_cli", *args, "-p", str(root)]


def run_scenario(
    tmp_path: Path, start: Path, args: list[str], outputs: list[str], random_kills: int = 0, every_write: bool = True
) -> int:
    """Kill ``stackwise ARGS`` inside each of its writes, then at random instants; check and rerun each time.
    Returns how many write points were killed."""
    ref = tmp_path / "ref"
    shutil.copytree(start, ref)
    before = shas(start)
    t0 = time.monotonic()
    subprocess.run(subprocess_cmd(ref, args), check=True, capture_output=True)
    duration = time.monotonic() - t0
    after = shas(ref)
    assert all(o in after for o in outputs)

    def trial(name: str, kill) -> bool:
        root = tmp_path / name
        shutil.copytree(start, root)
        killed = kill(root)
        if killed:
            COUNTS["trials_killed"] += 1
            check_after_kill(root, before, after, exact=every_write)
            # Rerun to finish the job, unless the kill came after the command's last write (then it is done:
            # rerunning a non-idempotent command like grow would do it twice).
            if not (root / "stackwise.yaml").exists() or manifest_facts(root) != manifest_facts(ref):
                cli(root, args)
        else:
            COUNTS["trials_completed_before_kill"] += 1
        final = shas(root)
        for o in outputs:
            assert final[o] == after[o], f"{o} differs from the uninterrupted run after a kill ({name})"
        assert manifest_facts(root) == manifest_facts(ref), f"the manifests differ ({name})"
        cli(root, ["verify"])
        shutil.rmtree(root)
        return killed

    def kill_at_write(n: int):
        def kill(root: Path) -> bool:
            proc = subprocess.run(subprocess_cmd(root, args), capture_output=True, env={**os.environ, ENV: str(n)})
            assert proc.returncode in (0, -9), proc.stderr.decode()
            return proc.returncode == -9

        return kill

    n = 1
    while every_write and trial(f"write{n}", kill_at_write(n)):
        n += 1
    assert n > 2 or not every_write, "the stage should make several writes"

    rng = random.Random(0)

    def kill_at_random(root: Path) -> bool:
        proc = subprocess.Popen(subprocess_cmd(root, args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, duration))
        proc.kill()
        return proc.wait() == -9

    for i in range(random_kills + SOAK):
        trial(f"random{i}", kill_at_random)
    return n - 1


@pytest.fixture
def grown(project, tmp_path):
    """Two stacks, the first trained, the second's val cache computed: a project mid-rack."""
    cli(project.root, ["grow"])
    cli(project.root, ["grow"])
    cli(project.root, ["train-stack", "0", "--steps", "5"])
    return project.root


def test_prepare_survives_kill_9_anywhere(tmp_path, tiny_recipe_path):
    empty = tmp_path / "start"
    empty.mkdir()
    args = ["prepare", "--recipe", str(tiny_recipe_path), "--set", "data.max_bytes=60000"]
    writes = run_scenario(tmp_path, empty, args, ["tokenizer.json", "data/train/00000.arrow", "data/val/00000.arrow"])
    assert writes >= 3


def test_grow_survives_kill_9_anywhere(project, tmp_path):
    run_scenario(tmp_path, project.root, ["grow"], ["stacks/0.safetensors", "ends.safetensors"])


def test_cache_survives_kill_9_anywhere(grown, tmp_path):
    run_scenario(tmp_path, grown, ["cache", "1", "--split", "val"], ["cache/1/val/00000.arrow"], random_kills=2)


def test_train_stack_survives_kill_9_anywhere(grown, tmp_path):
    cli(grown, ["cache", "1"])
    run_scenario(
        tmp_path,
        grown,
        ["train-stack", "1", "--steps", "20"],
        ["stacks/1.safetensors", "ends.safetensors"],
        random_kills=3,
    )


def test_fuse_survives_kill_9_anywhere(grown, tmp_path):
    cli(grown, ["cache", "1"])
    cli(grown, ["train-stack", "1", "--steps", "3"])
    cli(grown, ["fuse"])  # an older fused/ exists: the kill may land while it is being replaced
    cli(grown, ["train-stack", "1", "--steps", "3", "--resume", "never"])  # so the fuse below writes other weights
    run_scenario(tmp_path, grown, ["fuse"], ["fused/model.safetensors", "fused/config.json"])


def test_build_survives_kill_9_at_random_instants(tmp_path, tiny_recipe_path):
    empty = tmp_path / "start"
    empty.mkdir()
    args = ["build", "--recipe", str(tiny_recipe_path), "--set", "data.max_bytes=60000", "--set", "train.steps=10"]
    outputs = ["stacks/0.safetensors", "stacks/1.safetensors", "fused/model.safetensors"]
    run_scenario(tmp_path, empty, args, outputs, random_kills=4, every_write=False)


def test_ctrl_c_checkpoints_at_the_step_boundary_exits_130_and_resumes(project):
    """SIGINT (Ctrl-C) is SIGTERM's twin: a checkpoint at the step boundary, the manifest moved on, exit 130
    (app.py's hint: rerun the same command to resume), and the rerun resumes from that checkpoint."""
    import signal

    from stackwise_cli.errors import Stopped
    from stackwise_cli.train.stack import train_stack

    cli(project.root, ["grow"])
    cmd = subprocess_cmd(project.root, ["train-stack", "0", "--steps", "5000"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ})
    end = time.monotonic() + 120
    while not list(project.path("logs").glob("train-stack-0-*.jsonl")) or not any(
        p.stat().st_size for p in project.path("logs").glob("train-stack-0-*.jsonl")
    ):
        assert time.monotonic() < end and proc.poll() is None, "the run never logged a step"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"SIGINT; checkpoint saved at step" in err and b"Traceback" not in err
    m = Project(project.root).load()
    (saved,) = sorted(project.path("ckpt/0").glob("step-*"))[-1:]
    step = json.loads((saved / "state.json").read_text())["step"]
    assert m.stack(0).state == "training" and m.stack(0).steps == step > 0
    with pytest.raises(Stopped, match=f"checkpoint saved at step {step + 2}/5000"):
        train_stack(Project(project.root), 0, steps=5000, stop_at=step + 2)  # resumes from it, not from 0
