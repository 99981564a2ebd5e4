"""The CLI through typer's CliRunner: every command on the tiny project, and every kind of bad input.

Bad input must give exit code 1, exactly one ``error:`` line (plus at most one ``hint:`` line), no traceback,
and lose nothing: the manifest and the weight files are byte-for-byte what they were before the command.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import Result
from typer.testing import CliRunner

from stackwise_cli import __version__
from stackwise_cli.app import app
from stackwise_cli.errors import ProjectError
from stackwise_cli.store.project import Project
from stackwise_cli.train.cache import build_cache
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

# Fixed width, no colour, and never the debug switch unless a test sets it (None unsets a variable).
ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RUNNER = CliRunner()


def cli(*args: object, env: dict[str, str | None] | None = None) -> Result:
    return RUNNER.invoke(app, [str(a) for a in args], env={**ENV, **(env or {})})


def ok_json(*args: object):
    """Run a command that must succeed with --json; its stdout must be one JSON document."""
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def user_error(result: Result, *needles: str, one_line: bool = True) -> str:
    """Assert the shape of a user-facing error and return its text (the ``error:`` line onwards, hint included).

    ``one_line``: the message itself must fit on the ``error:`` line (only a ``hint:`` line may follow).
    """
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # typer.Exit, not an escaped error
    lines = ANSI.sub("", result.stderr).splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    tail = lines[errors[0] + 1 :]
    assert sum(line.startswith("hint:") for line in tail) <= 1, result.stderr
    if one_line:
        assert all(line.startswith("hint:") for line in tail), result.stderr
    text = "\n".join(lines[errors[0] :])
    for needle in needles:
        assert needle in text, f"{needle!r} not in:\n{text}"
    return text


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file in the project except lock files (they hold no data) and the logs."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".stackwise.yaml.lock" and p.relative_to(root).parts[0] not in ("logs", "locks")
    }


def assert_unchanged(before: dict[str, str], root: Path) -> None:
    after = snapshot(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"a failed command changed these files: {changed}"


def corrupt(path: Path) -> None:
    path.write_bytes(b"\x00garbage, not a safetensors file\xff" * 8)


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def two_stacks(project: Project) -> Project:
    """The tiny project with two new stacks, ids 0 and 1 (grown through the core: setup, not under test)."""
    grow(project, "right")
    grow(project, "right")
    return project


# ------------------------------------------------------------------------------------ every command, happy path


@pytest.fixture(scope="module")
def pipeline(_prepared, tmp_path_factory) -> tuple[Path, dict[str, Result]]:
    """One project taken through grow, train-stack, cache, train-stack, eval, fuse, status, verify by the CLI.

    Run once for the module (training is the slow part); each test below checks one command's result.
    """
    root = tmp_path_factory.mktemp("pipeline") / "proj"
    shutil.copytree(_prepared, root)
    steps = [
        ("grow0", ["grow", "--side", "right", "--json"]),
        ("grow1", ["grow", "--side", "right", "--json"]),
        ("train0", ["train-stack", "0", "--steps", "5", "--json"]),
        ("cache1", ["cache", "1", "--split", "train", "--json"]),
        ("train1", ["train-stack", "1", "--steps", "5", "--json"]),
        ("eval", ["eval", "--json"]),
        ("fuse", ["fuse", "--json"]),
        ("status", ["status", "--json"]),
        ("verify", ["verify"]),
    ]
    return root, {name: cli(*args, "-p", root) for name, args in steps}


def _ok(result: Result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_grow_right_gives_sequential_stable_ids(pipeline):
    root, runs = pipeline
    first, second = _ok(runs["grow0"]), _ok(runs["grow1"])
    assert first == {"id": 0, "blocks": 1, "init": "random", "side": "right"}
    assert second["id"] == 1 and second["side"] == "right"


def test_train_stack_json(pipeline):
    _, runs = pipeline
    for name, stack_id in (("train0", 0), ("train1", 1)):
        data = _ok(runs[name])
        assert data["id"] == stack_id and data["trained"] is True
        assert data["steps"] == 5
        assert data["tokens"] == 5 * 8 * 32  # steps x train.batch_size x seq_len
        assert math.isfinite(data["loss"]) and data["loss"] > 0


def test_cache_json(pipeline):
    root, runs = pipeline
    data = _ok(runs["cache1"])
    train = Project(root).load().data.splits["train"]
    assert data == [
        {"stack": 1, "split": "train", "dtype": "fp32", "shards": len(train.shards), "sequences": train.sequences}
    ]
    assert len(list((root / "cache" / "1" / "train").glob("*.arrow"))) == len(train.shards)


def test_eval_json(pipeline):
    _, runs = pipeline
    data = _ok(runs["eval"])
    assert {"loss", "perplexity", "tokens", "per_stack"} <= data.keys()
    assert [r["id"] for r in data["per_stack"]] == [0, 1]  # one readout per stack, in rack order
    assert all(math.isfinite(r["loss"]) for r in data["per_stack"])
    assert data["per_stack"][-1]["loss"] == pytest.approx(data["loss"])  # the last readout is the whole rack
    assert math.exp(data["loss"]) == pytest.approx(data["perplexity"], rel=1e-6)
    assert data["tokens"] == data["sequences"] * (32 - 1) > 0  # predicted tokens: every position but the first


def test_fuse_json_writes_hugging_face_files(pipeline):
    root, runs = pipeline
    data = _ok(runs["fuse"])
    fused = root / "fused"
    assert Path(data["dir"]) == fused
    assert data["stacks"] == [0, 1]
    assert data["sha256"] == hashlib.sha256((fused / "model.safetensors").read_bytes()).hexdigest()
    config = json.loads((fused / "config.json").read_text())
    assert config["num_hidden_layers"] == 2


def test_status_json_lists_rack_in_order_with_states(pipeline):
    _, runs = pipeline
    data = _ok(runs["status"])
    assert [(r["position"], r["id"], r["state"], r["steps"]) for r in data["rack"]] == [
        (0, 0, "trained", 5),
        (1, 1, "trained", 5),
    ]
    assert [(c["stack"], c["split"], c["complete"], c["stale"]) for c in data["caches"]] == [(1, "train", True, [])]
    assert data["fused"] == {"dir": "fused", "stale": False}
    assert data["problems"] == []


def test_verify_clean_project_exits_0(pipeline):
    _, runs = pipeline
    assert runs["verify"].exit_code == 0, runs["verify"].output
    assert "no problems" in runs["verify"].stdout


def test_grow_left_prepends_with_a_new_id(project: Project):
    assert ok_json("grow", "--side", "right", "--json", "-p", project.root)["id"] == 0
    assert ok_json("grow", "--side", "right", "--json", "-p", project.root)["id"] == 1
    before = snapshot(project.root)
    left = ok_json("grow", "--side", "left", "--json", "-p", project.root)
    assert left["id"] == 2 and left["side"] == "left"
    rack = ok_json("status", "--json", "-p", project.root)["rack"]
    assert [(r["position"], r["id"], r["file"], r["state"]) for r in rack] == [
        (0, 2, "stacks/2.safetensors", "new"),
        (1, 0, "stacks/0.safetensors", "new"),
        (2, 1, "stacks/1.safetensors", "new"),
    ]
    after = snapshot(project.root)
    # Never renumbered: the existing stacks' files are untouched and the new one has its own file.
    assert after["stacks/0.safetensors"] == before["stacks/0.safetensors"]
    assert after["stacks/1.safetensors"] == before["stacks/1.safetensors"]
    assert "stacks/2.safetensors" in after


def test_bench_step_json(tiny_recipe_path: Path):
    data = ok_json("bench", "step", "--recipe", tiny_recipe_path, "--repeats", "1", "--warmup", "0", "--json")
    assert data["device"] == "cpu"
    assert [c["case"] for c in data["cases"]] == ["stack", "end-to-end"]
    assert [c["blocks"] for c in data["cases"]] == [1, 2]
    stack, e2e = data["cases"]
    assert data["stack_over_end_to_end_tokens_per_s"] == pytest.approx(stack["tokens_per_s"] / e2e["tokens_per_s"])


def test_bench_attention_json(tiny_recipe_path: Path):
    data = ok_json(
        "bench",
        "attention",
        "--recipe",
        tiny_recipe_path,
        "--seq-lens",
        "16,32",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--json",
    )
    measured = {(r["kind"], r["backend"], r["seq_len"]) for r in data["rows"] if r["seq_len"]}
    for kind in ("mha", "gqa", "mqa", "mla"):
        for backend in ("reference", "sdpa"):
            assert {(kind, backend, 16), (kind, backend, 32)} <= measured
    assert {("linear", "reference", 16), ("linear", "reference", 32)} <= measured
    unavailable = {(r["kind"], r["backend"]) for r in data["rows"] if not r["seq_len"]}
    assert ("gqa", "xformers") in unavailable and ("linear", "sdpa") in unavailable  # said, not silently skipped
    assert all(r["tokens_per_s"] > 0 for r in data["rows"] if r["seq_len"])
    user_error(cli("bench", "attention", "--recipe", tiny_recipe_path, "--seq-lens", "a,b"), "--seq-lens")


def test_bench_kernels_json():
    data = ok_json("bench", "kernels", "--repeats", "1", "--warmup", "0", "--json")
    timed = [r for r in data["rows"] if "time_ms" in r]
    assert {r["kernel"] for r in timed} >= {"add_rmsnorm fwd", "rotary fwd", "fp8 quantize", "fp8 dequantize"}
    assert all(r["impl"] == "reference" and r["gb_per_s"] > 0 for r in timed)  # no CUDA here: references only
    fp8 = [r for r in data["rows"] if "size_saved_vs_bf16" in r]
    assert fp8 and all(r["max_err_over_row_amax"] <= 1 / 28 + 1e-6 for r in fp8)


def test_prepare_creates_a_project(tiny_recipe_path: Path, tmp_path: Path):
    root = tmp_path / "new"
    data = ok_json("prepare", "--recipe", tiny_recipe_path, "-p", root, "--json", "--set", "data.max_bytes=200000")
    assert data["recipe"] == "test-tiny" and data["seq_len"] == 32
    assert set(data["splits"]) == {"train", "val"}
    assert all(s["sequences"] > 0 and s["tokens"] == 32 * s["sequences"] for s in data["splits"].values())
    m = Project(root).load()
    assert m.recipe.data.max_bytes == 200_000  # the override is part of the recorded recipe
    assert m.rack == [] and (root / "tokenizer.json").exists()
    assert all((root / s.file).exists() for split in m.data.splits.values() for s in split.shards)


COMMANDS = [
    "prepare",
    "grow",
    "cache",
    "train-stack",
    "fuse",
    "eval",
    "status",
    "verify",
    "build",
    "bench",
    "bench step",
]


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str):
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout


def test_version():
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"stackwise {__version__}"


# ------------------------------------------------------------------------------------------------ bad input


def test_prepare_unknown_recipe_key_names_key_and_file(tiny_recipe_path: Path, tmp_path: Path):
    root = tmp_path / "new"
    result = cli("prepare", "--recipe", tiny_recipe_path, "-p", root, "--set", "train.bogus=1")
    user_error(result, "train.bogus", str(tiny_recipe_path), "unknown key")
    assert not root.exists()


def test_prepare_reports_every_bad_key_at_once(tiny_recipe_path: Path, tmp_path: Path):
    root = tmp_path / "new"
    result = cli(
        "prepare", "--recipe", tiny_recipe_path, "-p", root, "--set", "model.n_heads=5", "--set", "train.nope=1"
    )
    user_error(result, "model.n_heads", "train.nope", one_line=False)
    assert not root.exists()


@pytest.mark.parametrize("command", ["train-stack", "cache"])
def test_unknown_stack_id_names_the_ids_there_are(two_stacks: Project, command: str):
    before = snapshot(two_stacks.root)
    text = user_error(cli(command, "99", "-p", two_stacks.root), "99")
    assert re.search(r"\b0, 1\b", text), text
    assert_unchanged(before, two_stacks.root)


@pytest.mark.parametrize(
    "args", [["eval"], ["train-stack", "0", "--resume", "never", "--steps", "2"], ["fuse"]], ids=" ".join
)
def test_corrupt_stack_file_names_it(two_stacks: Project, args: list[str]):
    if args[0] != "train-stack":  # eval and fuse refuse untrained stacks before they read a file: mark them trained
        with two_stacks.update() as m:
            for s in m.rack:
                s.state = "trained"
    corrupt(two_stacks.root / "stacks" / "0.safetensors")
    before = snapshot(two_stacks.root)
    user_error(cli(*args, "-p", two_stacks.root), "stacks/0.safetensors")
    assert_unchanged(before, two_stacks.root)
    assert not (two_stacks.root / "fused").exists()


def test_truncated_token_shard_names_it(two_stacks: Project):
    truncate_half(two_stacks.root / "data" / "train" / "00000.arrow")
    before = snapshot(two_stacks.root)
    user_error(cli("train-stack", "0", "--steps", "2", "-p", two_stacks.root), "data/train/00000.arrow")
    assert_unchanged(before, two_stacks.root)


@pytest.mark.parametrize("file, damage", [("stacks/0.safetensors", corrupt), ("data/train/00000.arrow", truncate_half)])
def test_verify_lists_corrupt_file(two_stacks: Project, file: str, damage):
    damage(two_stacks.root / file)
    result = cli("verify", "--json", "-p", two_stacks.root)
    assert result.exit_code == 1, result.output
    problems = json.loads(result.stdout)["problems"]
    assert [(p["what"], p["file"]) for p in problems] == [("corrupt", file)]
    text = cli("verify", "-p", two_stacks.root)
    assert text.exit_code == 1
    assert f"corrupt: {file}" in ANSI.sub("", text.stdout)


def test_stale_cache_names_the_cache_command(two_stacks: Project):
    root = two_stacks.root
    train_stack(two_stacks, 0, steps=3, device="cpu")
    build_cache(two_stacks, 1, "train", "cpu")
    result = cli("train-stack", "0", "--resume", "never", "--steps", "3", "-p", root)
    assert result.exit_code == 0, result.output
    before = snapshot(root)
    user_error(cli("train-stack", "1", "--steps", "2", "-p", root), "stale", "stackwise cache 1")
    assert_unchanged(before, root)


def test_missing_cache_names_the_cache_command(two_stacks: Project):
    train_stack(two_stacks, 0, steps=2)
    before = snapshot(two_stacks.root)
    user_error(cli("train-stack", "1", "--steps", "2", "-p", two_stacks.root), "cache", "stackwise cache 1")
    assert_unchanged(before, two_stacks.root)


@pytest.mark.parametrize("command", [["train-stack", "1", "--steps", "2"], ["cache", "1"]])
def test_nothing_learns_from_an_untrained_stack(two_stacks: Project, command):
    before = snapshot(two_stacks.root)
    user_error(cli(*command, "-p", two_stacks.root), "not trained yet", "stackwise train-stack 0")
    assert_unchanged(before, two_stacks.root)


def test_no_manifest_suggests_prepare(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    user_error(cli("status", "-p", empty), "stackwise.yaml", "stackwise prepare")
    assert list(empty.iterdir()) == []


def test_manifest_invalid_yaml(two_stacks: Project):
    path = two_stacks.manifest_path
    path.write_text(path.read_text().replace("rack:\n", "rack: [unclosed\n", 1))
    before = snapshot(two_stacks.root)
    for args in (["status"], ["grow"]):
        user_error(cli(*args, "-p", two_stacks.root), "stackwise.yaml", "not valid YAML")
    assert_unchanged(before, two_stacks.root)


def test_manifest_unknown_key_names_its_path(two_stacks: Project):
    path = two_stacks.manifest_path
    data = yaml.safe_load(path.read_text())
    data["rack"][0]["colour"] = "red"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    before = snapshot(two_stacks.root)
    for args in (["status"], ["grow"], ["eval"]):
        user_error(cli(*args, "-p", two_stacks.root), "stackwise.yaml", "rack[0].colour", "unknown key")
    assert_unchanged(before, two_stacks.root)


@pytest.mark.parametrize(
    "option, value, valid",
    [("--precision", "int4", ["fp32", "bf16", "fp16", "fp8"]), ("--resume", "sometimes", ["auto", "never"])],
)
def test_invalid_choice_lists_the_valid_values(two_stacks: Project, option: str, value: str, valid: list[str]):
    before = snapshot(two_stacks.root)
    user_error(cli("train-stack", "0", "--steps", "2", option, value, "-p", two_stacks.root), option, value, *valid)
    assert_unchanged(before, two_stacks.root)


def test_prepare_into_existing_project_refuses(project: Project, tiny_recipe_path: Path):
    before = snapshot(project.root)
    user_error(cli("prepare", "--recipe", tiny_recipe_path, "-p", project.root), "already exists")
    assert_unchanged(before, project.root)


def test_debug_env_lets_the_error_propagate(tmp_path: Path):
    result = cli("status", "-p", tmp_path, env={"STACKWISE_DEBUG": "1"})
    assert isinstance(result.exception, ProjectError)
    assert result.exit_code == 1
    assert "error:" not in result.stderr
    # And a real process prints the traceback.
    proc = subprocess.run(
        [sys.executable, "-m", "stackwise_cli", "status", "-p", str(tmp_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "STACKWISE_DEBUG": "1"},
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ProjectError" in proc.stderr


# ------------------------------------------------------------------------------ bad input: disks, data, devices


def test_disk_full_during_a_write_keeps_the_previous_files(two_stacks, monkeypatch):
    import errno

    root = two_stacks.root
    before = snapshot(root)

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    user_error(cli("grow", "-p", root), "disk full", "previous version is untouched")
    monkeypatch.undo()
    assert_unchanged(before, root)
    assert not [p for p in root.rglob("*.tmp-*")]  # no temporary left behind either


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, tiny_recipe_path):
    from stackwise_cli.data.tokenizer import train_tokenizer

    big = tmp_path / "big.json"
    words = " ".join(f"w{i}x{i * 7}" for i in range(4000))
    big.write_text(train_tokenizer([words] * 3, 2000).to_str())
    dest = tmp_path / "proj"
    text = user_error(cli("prepare", "--recipe", tiny_recipe_path, "--tokenizer", big, "-p", dest), "512")
    assert "--set model.vocab_size=" in text
    assert not (dest / "stackwise.yaml").exists()


def test_empty_input_corpus(tmp_path, tiny_recipe_path):
    empty = tmp_path / "texts"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    user_error(cli("prepare", "--recipe", tiny_recipe_path, "--input", empty, "-p", tmp_path / "proj"), "no text found")
    missing = cli("prepare", "--recipe", tiny_recipe_path, "--input", tmp_path / "nope", "-p", tmp_path / "p2")
    user_error(missing, "nope")


def test_a_cache_for_another_sequence_length_is_refused(two_stacks):
    import numpy as np
    import torch

    from stackwise_cli.store.files import sha256_file
    from stackwise_cli.store.shards import write_hidden_shard

    root = two_stacks.root
    train_stack(two_stacks, 0, steps=2)
    build_cache(two_stacks, 1, "train")
    shard = two_stacks.load().cache(1, "train").shards[0]
    # a shard of 16-token sequences in place of 32-token ones, with its checksum made to look right
    write_hidden_shard(root / shard.file, torch.zeros(shard.sequences, 16, 32), np.arange(shard.sequences), "fp32")
    with two_stacks.update() as m:
        m.cache(1, "train").shards[0].sha256 = sha256_file(root / shard.file)
    before = snapshot(root)
    user_error(cli("train-stack", "1", "-p", root), shard.file, "32")
    assert_unchanged(before, root)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a CUDA machine --device cuda is valid")
def test_a_device_this_machine_does_not_have(two_stacks):
    before = snapshot(two_stacks.root)
    user_error(cli("train-stack", "0", "--device", "cuda", "--precision", "bf16", "-p", two_stacks.root), "no CUDA")
    user_error(cli("cache", "1", "--device", "tpu", "-p", two_stacks.root), "--device must be")
    assert_unchanged(before, two_stacks.root)
