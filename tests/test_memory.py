"""``stackwise bench memory`` (stackwise_cli/bench/memory.py): a stage's measured peak memory against the plan.

Each measurement runs in a fresh process (a few seconds). The one memory assertion is the feature's contract:
measured within 15% of the plan for a small fp32 model, with AdamW and with 8-bit AdamW. The model is the tiny
recipe widened to d 256 so the peak (~30 MiB) is well above the resident-set noise (< 1 MiB run to run)."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from stackwise_cli.app import handled
from stackwise_cli.bench.memory import bench_memory, check_options, planned_stage, with_options
from stackwise_cli.commands import bench
from stackwise_cli.errors import StackwiseError
from stackwise_cli.recipe import load_recipe

ENV = {"COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
TINY = "recipes/llama/tiny.yaml"
SETS = [
    "model.d_model=256",
    "model.d_ff=704",
    "model.vocab_size=2048",
    "rack.stacks=2",
    "data.seq_len=64",
    "train.batch_size=8",
]


def recipe(**options):
    return with_options(load_recipe(TINY, SETS), **options)


@pytest.fixture(scope="module")
def by_batch():
    return {b: bench_memory(recipe(batch_size=b), "train-stack-l2r", "fp32", steps=3) for b in (4, 8)}


def test_peak_is_positive_and_grows_with_the_batch(by_batch):
    small, big = by_batch[4], by_batch[8]
    assert 0 < small.peak_bytes < big.peak_bytes
    assert "VmHWM" in small.memory_how and small.rehearsed
    # what is counted from live tensors does not depend on the batch, except the cached input batch
    kinds = {k.kind: (k.measured_bytes, b.measured_bytes) for k, b in zip(small.kinds, big.kinds, strict=True)}
    for kind in ("parameters", "gradients", "optimizer", "frozen"):
        assert kinds[kind][0] == kinds[kind][1] > 0 or kind == "frozen"
    assert kinds["cache_buffers"][1] == 2 * kinds["cache_buffers"][0] > 0


def test_fp32_adamw_is_within_15_percent_of_the_plan(by_batch):
    r = by_batch[8]
    assert r.planned_bytes == planned_stage(recipe(), "train-stack-l2r", "fp32").total_bytes  # no CUDA headroom
    assert r.ratio == pytest.approx(1.0, abs=0.15), (r.peak_bytes, r.planned_bytes)


def test_loss_goes_down_over_the_steps(by_batch):
    for r in by_batch.values():
        assert len(r.losses) == 3
        assert r.losses[-1] < r.losses[0] and r.loss_decreased


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.command("memory")(handled(bench.memory))
    app.command("other")(lambda: None)  # two commands, so typer keeps the "memory" name
    return app


def test_cli_adamw8bit_json_is_within_15_percent_of_the_plan():
    args = ["memory", "--recipe", TINY, "--optimizer", "adamw8bit", "--steps", "3", "--json"]
    for s in SETS:
        args += ["--set", s]
    res = CliRunner().invoke(cli_app(), args, env=ENV)
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["optimizer"] == "adamw8bit" and data["stage"] == "train-stack-l2r" and data["variant"] == "cached"
    assert data["ratio"] == pytest.approx(1.0, abs=0.15), (data["peak_bytes"], data["planned_bytes"])
    assert data["loss_decreased"]
    opt = next(k for k in data["kinds"] if k["kind"] == "optimizer")
    assert opt["measured_bytes"] == pytest.approx(opt["planned_bytes"], rel=0.02)  # 8-bit states + absmax


def test_bad_options_are_one_error_naming_the_valid_values():
    with pytest.raises(StackwiseError) as e:
        check_options(recipe(), "train-stack-sideways", "fp64", 1, "tpu")
    msg = str(e.value)
    for words in ("train-stack-l2r, train-stack-r2l, end-to-end", "fp32, bf16, fp16, fp8", "--steps", "--device"):
        assert words in msg


@pytest.mark.parametrize(
    "args, words",
    [
        (["--stage", "cache"], "--stage must be one of"),
        (["--optimizer", "sgd"], "train.optimizer"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
    ],
)
def test_cli_bad_input_is_one_error_line(args, words):
    res = CliRunner().invoke(cli_app(), ["memory", "--recipe", TINY, *args], env=ENV)
    assert res.exit_code == 1
    assert words in res.output and "Traceback" not in res.output


def test_grad_accum_peak_is_one_micro_batch_and_within_the_plan(by_batch):
    """Two micro-batches of 4 per step: the plan is that of batch 4, not 8. The second micro-batch builds its
    activations while the first one's gradients are all live, which the plan's sum already holds: the peak rises by
    about the gradients (measured 28.3 -> 33.3 MiB, gradients 4.8, plan 33.0) and meets the plan."""
    accum = with_options(load_recipe(TINY, [*SETS, "train.grad_accum=2"]), batch_size=4)
    r = bench_memory(accum, "train-stack-l2r", "fp32", steps=2)
    assert r.planned_bytes == by_batch[4].planned_bytes < by_batch[8].planned_bytes
    assert r.ratio == pytest.approx(1.0, abs=0.15), (r.peak_bytes, r.planned_bytes)
    gradients = {k.kind: k.measured_bytes for k in r.kinds}["gradients"]
    assert r.peak_bytes - by_batch[4].peak_bytes > gradients / 2  # the micro-batches really accumulated
    assert r.peak_bytes < by_batch[8].peak_bytes
