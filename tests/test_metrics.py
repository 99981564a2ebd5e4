"""Metrics (FLOPs, MFU, grad norm, memory, TensorBoard, eval_every and the best checkpoint), `stackwise plot`,
run-time `--set`, build's recipe changes, and the peft adapter of a LoRA fine-tune."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
import sys

import pytest
import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.errors import RecipeError
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.project import Project
from stackwise_cli.train import metrics
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

runner = CliRunner()


def _set_train(project: Project, **train) -> None:
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, train=dataclasses.replace(m.recipe.train, **train))


def _rows(project: Project, run: str) -> list[dict]:
    logs = sorted(project.path("logs").glob(f"{run}-*.jsonl"))
    return [json.loads(line) for p in logs for line in p.read_text().splitlines()]


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def _evaluated(tmp_path_factory, _prepared):
    """Two stacks trained left to right, 8 steps each with train.eval_every 4, then `stackwise eval` (built once)."""
    from stackwise_cli.train.cache import build_cache

    root = tmp_path_factory.mktemp("metrics") / "proj"
    shutil.copytree(_prepared, root)
    p = Project(root)
    _set_train(p, eval_every=4, log_every=2)
    grow(p)
    train_stack(p, 0, steps=8)
    grow(p)
    build_cache(p, 1, "train")
    train_stack(p, 1, steps=8)
    r = runner.invoke(app, ["eval", "-p", str(root), "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    return root


@pytest.fixture
def evaluated(_evaluated, tmp_path) -> Project:
    shutil.copytree(_evaluated, tmp_path / "proj")
    return Project(tmp_path / "proj")


def test_the_log_carries_throughput_mfu_memory_and_validation(evaluated):
    m = evaluated.load()
    for stack in (0, 1):
        rows = _rows(evaluated, f"train-stack-{stack}")
        train = [r for r in rows if "loss" in r]
        val = [r for r in rows if "val_loss" in r]
        assert [r["step"] for r in train] == [2, 4, 6, 8] and [r["step"] for r in val] == [4, 8]
        last = train[-1]
        assert last["grad_norm"] > 0 and last["peak_memory_bytes"] > 2**20
        assert last["tflops"] == pytest.approx(last["tokens_per_s"] * last["flops"] / last["tokens"] / 1e12)
        assert last["peak_tflops"] == metrics.device_peak(torch.device("cpu"), "fp32").tflops
        assert last["mfu"] == pytest.approx(last["tflops"] / last["peak_tflops"])
        assert last["flops"] == pytest.approx(m.stack(stack).flops)  # the manifest's count, from the same formula
        # The best validation weights are kept, with the step and loss they scored.
        best = min(val, key=lambda r: r["val_loss"])
        with safe_open(str(evaluated.path(f"best/{stack}.safetensors")), "pt") as f:
            assert f.metadata()["step"] == str(best["step"])
            assert float(f.metadata()["val_loss"]) == pytest.approx(best["val_loss"])
            assert any(k.startswith("stack.blocks.0.") for k in f.keys())
        events = list(evaluated.path("logs/tb").glob(f"train-stack-{stack}-*/events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 0
    assert not evaluated.path("ckpt/0").exists()  # the checkpoints went; best/ stays


def test_validation_during_training_is_evals_readout(evaluated):
    """Stack 1 trained on a cache; its val_loss is the readout after it (stack 0 from its file, then stack 1, then
    the head), on eval's rows: at its last step it is what eval scores for it."""
    from stackwise_cli.evaluate.eval import evaluate

    last = [r for r in _rows(evaluated, "train-stack-1") if "val_loss" in r][-1]
    result = evaluate(evaluated, device="cpu")
    assert result.per_stack[1].id == 1
    assert last["val_loss"] == pytest.approx(result.per_stack[1].loss, rel=1e-4)


def test_a_later_run_without_eval_every_removes_the_stale_best(evaluated):
    _set_train(evaluated, eval_every=0)
    train_stack(evaluated, 1, steps=2, resume="never")  # trains stack 1 on from its weights
    assert not evaluated.path("best/1.safetensors").exists() and evaluated.path("best/0.safetensors").exists()
    assert not any("val_loss" in r for r in _rows(evaluated, "train-stack-1")[-1:])


def test_tensorboard_missing_is_one_notice_not_a_failure(project, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    monkeypatch.setattr(metrics, "_notified", set())
    said = []

    class Listening(metrics.Reporter):
        def info(self, message: str) -> None:
            said.append(message)

    grow(project)
    train_stack(project, 0, steps=3, reporter=Listening())
    assert project.load().stack(0).state == "trained"
    assert sum("tensorboard is not installed" in s for s in said) == 1
    assert not project.path("logs/tb").exists()
    assert all("grad_norm" in r for r in _rows(project, "train-stack-0"))


def test_epochs_are_said_up_front_and_more_than_four_warn():
    line, warning = metrics.epochs_line("train-stack 0", 300, 16, 4800)
    assert "= 1.00 epochs of the train split (4800 sequences)" in line and warning is None
    line, warning = metrics.epochs_line("train-stack 0", 300, 16, 530)
    assert "9.06 epochs" in line and warning.startswith("warning: train-stack 0 reads the train split 9.1 times")


def test_device_peaks_are_stated(monkeypatch):
    cpu = metrics.device_peak(torch.device("cpu"), "fp32")
    assert cpu.tflops == pytest.approx(0.1 * torch.get_num_threads()) and "assumption" in cpu.what
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert metrics.device_peak(torch.device("cuda"), "bf16").tflops == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert metrics.device_peak(torch.device("cuda"), "bf16").tflops == 989.0
    assert metrics.device_peak(torch.device("cuda"), "fp32").tflops == 494.7
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert metrics.device_peak(torch.device("cuda"), "bf16").tflops is None


def test_eval_every_must_not_be_negative():
    with pytest.raises(Exception, match="eval_every: must be >= 0"):
        TrainRecipe(eval_every=-1)


# --- plot -----------------------------------------------------------------------------------------------------


def test_plot_writes_the_three_pngs(evaluated, tmp_path):
    out = tmp_path / "plots"
    r = runner.invoke(app, ["plot", "-p", str(evaluated.root), "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["runs"] == ["train-stack 0", "train-stack 1"] and data["readout"].endswith(".json")
    for name in ("loss_vs_steps.png", "loss_vs_flops.png", "readout.png"):
        assert _png_size(out / name) == (900, 540)  # 7.5 x 4.5 in at 120 dpi
        assert (out / name).stat().st_size > 10_000  # drawn, not blank


def test_plot_without_logs_is_one_error(project):
    r = runner.invoke(app, ["plot", "-p", str(project.root)])
    assert r.exit_code == 1 and "no training logs" in r.output and "Traceback" not in r.output


# --- --set and build -----------------------------------------------------------------------------------------


def test_set_changes_run_time_settings_and_records_them(project):
    grow(project)
    r = runner.invoke(
        app, ["train-stack", "0", "-p", str(project.root), "--steps", "4", "--set", "train.log_every=1", "--json"]
    )
    assert r.exit_code == 0, r.output
    m = project.load()
    assert m.recipe.train.log_every == 1
    assert any(h.command == "train-stack --set train.log_every=1" for h in m.history)
    assert [row["step"] for row in _rows(project, "train-stack-0")] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "command, key, message",
    [
        (["eval"], "model.d_model=64", "--set model.d_model: not a setting `eval` can change on a prepared project"),
        (["eval"], "train.log_every=3", "--set train.log_every: not a setting of `eval`"),
        (["train-stack", "0"], "data.seq_len=16", "--set data.seq_len: not a setting `train-stack` can change"),
        (["train-stack", "0"], "train.lr=0.1", "--set train.lr: the run it would shape has begun or is done"),
        (["fuse"], "rack.stacks=3", "--set rack.stacks: not a setting `fuse` can change"),
        (["fuse"], "train.steps=9", "--set train.steps: not a setting of `fuse`"),
    ],
)
def test_set_refuses_what_would_change_computed_work(evaluated, command, key, message):
    before = evaluated.manifest_path.read_bytes()
    r = runner.invoke(app, [*command, "-p", str(evaluated.root), "--set", key])
    assert r.exit_code == 1 and message in r.output and "Traceback" not in r.output
    assert evaluated.manifest_path.read_bytes() == before


def test_set_lr_for_a_stack_not_yet_trained(project):
    from stackwise_cli.settings import apply_settings, schedule_open

    grow(project)
    assert schedule_open(project, 0, "auto")
    apply_settings(project, ["train.lr=0.002"], "train-stack", schedule_open(project, 0, "auto"))
    assert project.load().recipe.train.lr == 0.002


def test_build_names_the_keys_that_differ_and_grows_the_rack(project, tmp_path):
    from stackwise_cli.build import build
    from stackwise_cli.schema import to_data

    with project.update() as m:
        train = dataclasses.replace(m.recipe.train, steps=3, checkpoint_every=0)
        m.recipe = dataclasses.replace(m.recipe, train=train, rack=dataclasses.replace(m.recipe.rack, stacks=1))
    path = tmp_path / "test-tiny.yaml"  # the project's own recipe (its name is the file's stem)
    path.write_text(yaml.safe_dump(to_data(project.load().recipe)))
    build(project, path, device="cpu")
    assert [e.state for e in project.load().rack] == ["trained"]
    r = runner.invoke(
        app,
        ["build", "-p", str(project.root), "--recipe", str(path), "--set", "model.d_ff=128", "--set", "train.lr=0.5"],
    )
    assert r.exit_code == 1, r.output
    assert "model.d_ff (64 -> 128), train.lr (0.01 -> 0.5)" in r.output
    result = build(project, path, ["rack.stacks=2", "train.log_every=1"], device="cpu")
    m = project.load()
    assert [e.state for e in m.rack] == ["trained", "trained"] and m.recipe.rack.stacks == 2
    assert "train-stack 1" in result.ran and "fuse" in result.ran
    assert any("--set rack.stacks=2 --set train.log_every=1" in h.command for h in m.history)


def test_with_settings_validates_the_value():
    from stackwise_cli.recipe import Recipe
    from stackwise_cli.settings import with_settings

    with pytest.raises(RecipeError, match="train.log_every: must be >= 1"):
        with_settings(Recipe(name="x"), ["train.log_every=0"], "train-stack", True)
    with pytest.raises(RecipeError, match="train.finetune_lr: must be > 0"):
        with_settings(Recipe(name="x"), ["train.finetune_lr=0"], "fuse", True)


def test_the_finetune_schedule_is_fuse_s_and_fixed_once_a_finetune_has_begun():
    from stackwise_cli.recipe import Recipe
    from stackwise_cli.settings import with_settings

    new, changes = with_settings(Recipe(name="x"), ["train.finetune_lr=0.001"], "fuse", True)
    assert new.train.finetune_lr == 0.001 and new.train.lr == Recipe(name="x").train.lr
    assert [c.key for c in changes] == ["train.finetune_lr"]
    with pytest.raises(RecipeError, match="train.finetune_warmup_steps: the run it would shape has begun"):
        with_settings(Recipe(name="x"), ["train.finetune_warmup_steps=3"], "fuse", False)
    with pytest.raises(RecipeError, match="not a setting of `train-stack`.*pass it to `stackwise fuse`"):
        with_settings(Recipe(name="x"), ["train.finetune_lr=0.001"], "train-stack", True)


# --- peft ----------------------------------------------------------------------------------------------------


def test_lora_adapter_loads_in_peft_on_the_unmerged_export(evaluated, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from stackwise_cli.fuse import fuse
    from stackwise_cli.train.finetune import finetune_spec

    fuse(evaluated)  # the rack exported as trained: the adapter's base
    shutil.copytree(evaluated.path("fused"), tmp_path / "base")
    fuse(evaluated, finetune_spec(4, "lora", 4, 8.0), device="cpu")
    adapter = evaluated.path("fused/adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert "model.layers.1.mlp.down_proj" in config["target_modules"] and len(config["target_modules"]) == 14

    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    with torch.no_grad():
        plain = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, adapter).eval()(x).logits
        merged = AutoModelForCausalLM.from_pretrained(evaluated.path("fused")).eval()(x).logits
    assert (tuned - plain).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(tuned, merged, atol=1e-4, rtol=1e-4)
