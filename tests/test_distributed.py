"""train-stack under torchrun (FSDP2, gloo, 2 CPU processes) against the same run in one process.

Each 2-rank run is a real launch: ``python -m torch.distributed.run`` (or, where the test must signal one rank, the
two workers started by hand with torchrun's environment), on a free port, with OMP_NUM_THREADS=1 and a timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stackwise_cli.errors import ProjectError, Stopped
from stackwise_cli.store.project import Project
from stackwise_cli.store.status import status
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

TIMEOUT = 240  # seconds for one launch: far above what it takes on a loaded 2-core machine
# fp32: two half-batch gradients averaged differ from one whole-batch gradient in the last bits, and Adam carries
# that on: after 6 steps each tensor differs by < 1e-5 of its norm, after 60 steps by < 4e-4 (measured). A wrong
# slice of the batch or a wrong reduction differs at once, by far more (and in the logged loss and gradient norm).
RTOL_SHORT, RTOL_LONG = 1e-4, 1e-3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def torchrun(root: Path, args: list[str], **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    cmd += ["-m", "stackwise_cli", "train-stack", *args, "-p", str(root)]
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)


def workers(root: Path, args: list[str]) -> list[subprocess.Popen]:
    """The two ranks torchrun would start, started here so the test holds each one's pid."""
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-m", "stackwise_cli", "train-stack", *args, "-p", str(root)],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]


def tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in [root / "ends.safetensors", *sorted((root / "stacks").glob("*.safetensors"))]:
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def assert_same_weights(a: Path, b: Path, rtol: float = RTOL_LONG) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    off = {k: ((ta[k] - tb[k]).norm() / ta[k].norm().clamp_min(1e-12)).item() for k in ta}
    worst = max(off, key=off.get)
    assert off[worst] < rtol, f"{worst} differs by {off[worst]:.2e} of its norm"


def log_lines(root: Path) -> list[dict]:
    (log,) = (root / "logs").glob("*.jsonl")
    return [json.loads(line) for line in log.read_text().splitlines()]


def assert_intact(root: Path) -> None:
    report = status(Project(root), rehash=True)  # `stackwise verify`: every file against the manifest
    assert not report.problems, report.problems


def copy(project: Project, tmp_path: Path, name: str) -> Project:
    shutil.copytree(project.root, tmp_path / name)
    return Project(tmp_path / name)


@pytest.fixture
def grown(project):
    grow(project)
    grow(project)
    return project


@pytest.fixture
def end_to_end(project):
    import dataclasses

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="end-to-end")
    grow(project)
    grow(project)
    return project


def test_two_ranks_train_what_one_process_trains(grown, tmp_path):
    one = copy(grown, tmp_path, "one")
    ref = train_stack(one, 0, steps=6)
    done = torchrun(grown.root, ["0", "--steps", "6"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_weights(one.root, grown.root, RTOL_SHORT)
    for a, b in zip(log_lines(one.root), log_lines(grown.root), strict=True):  # steps 5 and 6
        assert (a["step"], a["tokens"]) == (b["step"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(
            a["grad_norm"], rel=1e-5
        )
    e1, e2 = one.load().stack(0), grown.load().stack(0)
    assert (e2.state, e2.steps, e2.tokens) == ("trained", 6, ref.tokens)  # every rank's rows counted once
    assert e2.last_loss == pytest.approx(e1.last_loss, rel=1e-5)  # the loss of the global batch
    assert_intact(grown.root)
    # Rank 0 alone wrote: one log (log_lines), one result line, one lock file (rank 1 took no lock).
    assert done.stdout.count("stack 0: 6 steps") == 1
    assert [p.name for p in (grown.root / "locks").iterdir()] == ["train-stack-0.lock"]
    assert not ckpt.list_checkpoints(grown.ckpt_dir(0))


def test_a_signal_to_one_rank_stops_both_at_one_step_and_resumes_on_one_process(grown, tmp_path):
    one = copy(grown, tmp_path, "one")
    train_stack(one, 0, steps=40)
    procs = workers(grown.root, ["0", "--steps", "40"])
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any(p.read_text() for p in (grown.root / "logs").glob("*.jsonl")):  # rank 0 is at step 5
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no step was logged"
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGUSR1)  # rank 1 only: the all-reduced flag stops rank 0 too
        results = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [75, 75], results
    stopped = [re.findall(r"checkpoint saved at step (\d+)/40", err) for _, err in results]
    assert stopped[0] == stopped[1] and len(stopped[0]) == 1, stopped
    step = int(stopped[0][0])
    assert 5 <= step < 40 and grown.load().stack(0).steps == step
    assert_intact(grown.root)
    r = train_stack(grown, 0, steps=40)  # the 2-rank checkpoint, resumed by one process
    assert r.resumed_from == step
    assert_same_weights(one.root, grown.root)


def test_end_to_end_checkpoint_of_one_process_resumes_on_two_ranks(end_to_end, tmp_path):
    one = copy(end_to_end, tmp_path, "one")
    train_stack(one, "all", steps=12)
    with pytest.raises(Stopped):
        train_stack(end_to_end, "all", steps=12, stop_at=5)
    done = torchrun(end_to_end.root, ["all", "--steps", "12"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 5" in done.stdout + done.stderr
    assert_same_weights(one.root, end_to_end.root)
    assert_intact(end_to_end.root)


def test_fuse_finetune_on_two_ranks_writes_what_one_process_writes(end_to_end, tmp_path):
    train_stack(end_to_end, "all", steps=4)
    one = copy(end_to_end, tmp_path, "one")
    from stackwise_cli.fuse import fuse
    from stackwise_cli.train.finetune import finetune_spec

    fuse(one, finetune_spec(6, "full", None, None))
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
        + ["-m", "stackwise_cli", "fuse", "--finetune-steps", "6", "-p", str(end_to_end.root)],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (load_file(p.root / "fused/model.safetensors") for p in (one, end_to_end))
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)).item() for k in a)
    assert worst < RTOL_SHORT
    f1, f2 = one.load().fused, end_to_end.load().fused
    assert f2.finetune_loss == pytest.approx(f1.finetune_loss, rel=1e-5) and f2.finetune_steps == 6
    assert done.stdout.count("fused 2 stack(s)") == 1  # rank 0 alone reports
    assert_intact(end_to_end.root)


def test_a_rank_killed_inside_a_write_leaves_nothing_corrupt(grown, tmp_path):
    # Stack 1 reads its cache: each rank reads its own rows of it.
    from stackwise_cli.train.cache import build_cache

    train_stack(grown, 0, steps=6)
    build_cache(grown, 1, "train")
    one = copy(grown, tmp_path, "one")
    train_stack(one, 1, steps=20)
    # Only rank 0 writes, so only it reaches write points (store/faults.py): the 1st is the manifest, the 2nd the
    # checkpoint at step 10, the 3rd the final one at step 20, half-written when rank 0 dies. torchrun stops rank 1.
    done = torchrun(grown.root, ["1", "--steps", "20"], STACKWISE_FAULT_KILL_AT="3")
    assert done.returncode != 0
    assert "exitcode  : -9" in done.stderr  # rank 0 died by SIGKILL inside the write
    assert [c.name for c in ckpt.list_checkpoints(grown.ckpt_dir(1))] == ["step-00000010"]
    assert_intact(grown.root)
    r = train_stack(grown, 1, steps=20)  # one process finishes the job from what the kill left
    assert r.resumed_from == 10
    assert r.steps == 20
    assert_same_weights(one.root, grown.root)
    assert_intact(grown.root)


def test_a_rank_other_than_0_takes_no_lock_and_cannot_write_the_manifest(project, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with project.job_lock("train-stack-0", "training of stack 0"), project.job_lock("train-stack-0", "again"):
        pass  # a second holder at once: rank 1 holds nothing
    assert not (project.root / "locks").exists()
    before = project.manifest_path.read_bytes()
    with pytest.raises(ProjectError, match="only rank 0"):
        with project.update("grow"):
            pass
    assert project.manifest_path.read_bytes() == before


def test_bench_plan_shards_gives_per_rank_bytes():
    from stackwise_cli.bench.plan import GPUS, IN_FLIGHT_BLOCKS, PlanOptions, plan
    from stackwise_cli.recipe import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes/llama/70b.yaml")
    whole = plan(recipe, GPUS["h200"], PlanOptions(batch_size=8))
    assert plan(recipe, GPUS["h200"], PlanOptions(batch_size=8, shards=1)).to_data() == whole.to_data()
    ranks = plan(recipe, GPUS["h200"], PlanOptions(batch_size=8, shards=8))
    one_row = plan(recipe, GPUS["h200"], PlanOptions(batch_size=1))  # what each of 8 ranks trains on
    n = whole.params
    for name in ("train-stack-l2r", "train-stack-r2l", "end-to-end", "fuse-full", "fuse-lora", "fuse-qlora"):
        a, b = whole.stage(name), ranks.stage(name)
        assert b.bytes["activations"] == one_row.stage(name).bytes["activations"]  # 1 of the 8 sequences
        assert b.total_bytes < a.total_bytes and b.tokens_per_day == pytest.approx(8 * a.tokens_per_day)
    for name in ("fuse-lora", "fuse-qlora"):  # data parallel: the base and the adapters whole on every rank
        a, b = whole.stage(name), ranks.stage(name)
        assert {k: v for k, v in b.bytes.items() if k != "activations"} == {
            k: v for k, v in a.bytes.items() if k != "activations"
        }
    # End to end every parameter trains in bf16 with AdamW: the blocks' fp32 master, gradient and two moments are
    # cut 8 ways, the ends are whole on every rank, and two blocks are whole in flight (bf16 weights, fp32 grads).
    a, b = whole.stage("end-to-end"), ranks.stage("end-to-end")
    ends = n["total"] - n["blocks"]
    assert b.bytes["master"] == round(4 * (n["blocks"] / 8 + ends))
    assert b.bytes["optimizer"] == round(8 * (n["blocks"] / 8 + ends))
    assert b.bytes["gradients"] == round(4 * (n["blocks"] / 8 + ends) + IN_FLIGHT_BLOCKS * 4 * n["block"])
    assert ranks.stage("cache").bytes == whole.stage("cache").bytes  # one process: the same bytes
