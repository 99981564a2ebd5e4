"""Training one stack: what trains, the schedule, checkpoints, and exact resume after a stop or SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stackwise_cli.errors import ProjectError, StackwiseError, Stopped
from stackwise_cli.model.io import load_ends, load_stack
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.project import Project
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train.data import Sampler
from stackwise_cli.train.grow import grow
from stackwise_cli.train.optim import lr_at
from stackwise_cli.train.stack import train_stack


def test_schedule_warms_up_then_decays_to_the_floor():
    tr = TrainRecipe(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, tr, 100) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # monotone decay after warmup
    assert lr_at(100, tr, 100) == pytest.approx(0.1)


def test_sampler_covers_every_row_once_per_epoch_and_resumes_exactly():
    s = Sampler(10, 3, seed=0)
    seen = [s.next() for _ in range(10)]  # 30 rows = 3 epochs
    flat = [int(i) for b in seen for i in b]
    for e in range(3):
        assert sorted(flat[e * 10 : (e + 1) * 10]) == list(range(10))
    s2 = Sampler(10, 3, seed=0)
    for _ in range(4):
        s2.next()
    s3 = Sampler(10, 3, seed=0)
    s3.load_state(s2.state())
    assert all((s3.next() == b).all() for b in seen[4:])


@pytest.mark.parametrize("tied", [False, True])
def test_leftmost_stack_trains_embedding_and_head_later_stacks_leave_the_embedding(project, tied):
    # Tied, the head is the embedding matrix, which stays; the output side that is not (the final norm) trains on.
    if tied:
        import dataclasses

        with project.update() as m:
            m.recipe = dataclasses.replace(m.recipe, model=dataclasses.replace(m.recipe.model, tie_embeddings=True))
    grow(project)
    grow(project)
    m0 = project.load()
    train_stack(project, 0, steps=5)
    m1 = project.load()
    assert m1.stack(0).state == "trained" and m1.stack(0).steps == 5 and m1.stack(0).last_loss is not None
    assert m1.ends.input_sha256 != m0.ends.input_sha256  # the embedding trained with the leftmost stack
    assert m1.stack(1).sha256 == m0.stack(1).sha256
    from stackwise_cli.train.cache import build_cache

    build_cache(project, 1, "train")
    train_stack(project, 1, steps=5)
    m2 = project.load()
    assert m2.ends.input_sha256 == m1.ends.input_sha256  # embedding untouched by stack 1
    assert m2.ends.sha256 != m1.ends.sha256  # but the head (tied: the final norm) trained (train.head: train)
    assert m2.stack(0).sha256 == m1.stack(0).sha256  # the prefix is frozen
    assert project.fresh_cache(m2, 1, "train")  # so the cache stays fresh
    assert not project.ckpt_dir(1).exists()  # checkpoints cleared once the result is in the manifest


def test_training_lowers_the_loss(project):
    grow(project)
    r = train_stack(project, 0, steps=30)
    import json

    log = sorted(project.root.glob("logs/train-stack-0-*.jsonl"))[-1]
    losses = [json.loads(line)["loss"] for line in log.read_text().splitlines()]
    assert len(losses) == 30 // 5 and losses[-1] < losses[0] - 0.5
    assert r.last_loss == losses[-1]


def test_retraining_a_stack_with_trained_stacks_to_its_right_is_refused(project):
    grow(project)
    grow(project)
    train_stack(project, 0, steps=2)
    from stackwise_cli.train.cache import build_cache

    build_cache(project, 1, "train")
    train_stack(project, 1, steps=2)
    with pytest.raises(ProjectError, match="trained stacks to its right"):
        train_stack(project, 0, steps=4, resume="never")


def test_already_trained_is_a_no_op(project):
    grow(project)
    train_stack(project, 0, steps=3)
    sha = project.load().stack(0).sha256
    assert train_stack(project, 0, steps=3) is None
    assert project.load().stack(0).sha256 == sha


def _train_copy(project: Project, tmp_path, name: str, **kw):
    root = tmp_path / name
    shutil.copytree(project.root, root)
    p = Project(root)
    train_stack(p, 0, **kw)
    return p


def test_stop_and_resume_gives_bit_identical_weights(project, tmp_path):
    grow(project)
    straight = _train_copy(project, tmp_path, "straight", steps=24)
    p = Project(tmp_path / "stopped")
    shutil.copytree(project.root, p.root)
    with pytest.raises(Stopped):
        train_stack(p, 0, steps=24, stop_at=13)  # between checkpoints (every 10)
    m = p.load()
    assert m.stack(0).state == "training" and m.stack(0).steps == 13
    assert [c.name for c in ckpt.list_checkpoints(p.ckpt_dir(0))] == ["step-00000010", "step-00000013"]
    r = train_stack(p, 0, steps=24)
    assert r.resumed_from == 13
    a, b = straight.load(), p.load()
    assert a.stack(0).sha256 == b.stack(0).sha256 and a.ends.sha256 == b.ends.sha256
    assert a.stack(0).last_loss == b.stack(0).last_loss and a.stack(0).tokens == b.stack(0).tokens
    assert _logged(straight) == _logged(p)  # the same log lines, the one cut at step 13 included


def _logged(p: Project) -> list[tuple]:
    import json

    lines = [json.loads(x) for f in sorted(p.root.glob("logs/*.jsonl")) for x in f.read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in lines]


def test_resume_refuses_a_checkpoint_from_another_run_length(project):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    with pytest.raises(StackwiseError, match="20-step run"):
        train_stack(project, 0, steps=30)


def test_checkpoints_are_pruned_but_at_least_two_kept(project):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=30, stop_at=25)
    names = [c.name for c in ckpt.list_checkpoints(project.ckpt_dir(0))]
    assert names == ["step-00000020", "step-00000025"]


def test_checkpoint_restores_optimizer_moments(project):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=10)
    weights, optim, rng, state = ckpt.load_checkpoint(ckpt.list_checkpoints(project.ckpt_dir(0))[-1])
    assert state.step == 10 and state.sampler == {"epoch": 0, "offset": 80}
    assert any(k.endswith("::exp_avg_sq") and v.abs().sum() > 0 for k, v in optim.items())
    assert optim["stack.blocks.0.attn.q.weight::step"].item() == 10
    assert "torch_cpu" in rng


def _wait_for(path_glob, root, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        logs = list(root.glob(path_glob))
        if logs and logs[0].stat().st_size > 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path_glob} never appeared")


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_resume_matches_uninterrupted(project, tmp_path):
    grow(project)
    steps = 300
    straight = _train_copy(project, tmp_path, "straight", steps=steps)
    p = Project(tmp_path / "killed")
    shutil.copytree(project.root, p.root)
    cmd = [sys.executable, "-m", "stackwise_cli", "train-stack", "0", "-p", str(p.root), "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    _wait_for("logs/train-stack-0-*.jsonl", p.root)  # the loop is running (first log line written)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err.decode()
    assert b"SIGTERM" in err and b"Traceback" not in err
    m = p.load()
    assert m.stack(0).state == "training" and 0 < m.stack(0).steps < steps
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert p.load().stack(0).sha256 == straight.load().stack(0).sha256
    assert p.load().ends.sha256 == straight.load().ends.sha256


def test_loaded_weights_match_what_training_wrote(project):
    grow(project)
    train_stack(project, 0, steps=3)
    m = project.load()
    stack, ends = load_stack(project, m, 0), load_ends(project, m)
    assert not torch.allclose(stack.blocks[0].attn.o.weight, torch.zeros(1))
    assert ends.embed.weight.shape == (512, 32)


def _set_recipe(project: Project, **train) -> None:
    import dataclasses

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, train=dataclasses.replace(m.recipe.train, **train))


def test_frozen_head_still_trains_with_the_leftmost_stack_and_then_stays(project):
    from stackwise_cli.train.cache import build_cache

    _set_recipe(project, head="frozen")
    grow(project)
    grow(project)
    initial = load_ends(project, project.load()).head.weight.clone()
    train_stack(project, 0, steps=4)
    after0 = load_ends(project, project.load()).head.weight.clone()
    assert not torch.equal(initial, after0)  # a random head would make every readout meaningless
    build_cache(project, 1, "train")
    train_stack(project, 1, steps=4)
    assert torch.equal(load_ends(project, project.load()).head.weight, after0)


def test_more_steps_on_a_trained_stack_is_explicit_and_counted(project):
    grow(project)
    train_stack(project, 0, steps=4)
    with pytest.raises(StackwiseError, match="already trained"):
        train_stack(project, 0, steps=6)
    r = train_stack(project, 0, steps=6, resume="never")
    e = project.load().stack(0)
    assert r.steps == 6 and e.steps == 10 and e.tokens == 10 * 8 * 32


def test_steps_must_leave_room_after_warmup(project):
    grow(project)
    _set_recipe(project, warmup_steps=5)
    with pytest.raises(StackwiseError, match="warmup_steps is 5"):
        train_stack(project, 0, steps=5)


def test_divergence_stops_training_before_any_checkpoint_holds_it(project, monkeypatch):
    """A loss that turns NaN stops the run at once; the newest checkpoint predates it and is finite."""
    from stackwise_cli.objectives import Objective

    grow(project)
    real = Objective.loss
    calls = {"n": 0}

    def diverging(self, logits, c, reduction="mean"):
        calls["n"] += 1
        loss = real(self, logits, c, reduction)
        return loss * float("nan") if calls["n"] == 7 else loss

    monkeypatch.setattr(Objective, "loss", diverging)
    _set_recipe(project, checkpoint_every=5)
    with pytest.raises(StackwiseError, match="non-finite at step 7"):
        train_stack(project, 0, steps=20)
    newest = ckpt.list_checkpoints(project.ckpt_dir(0))[-1]
    weights, _, _, state = ckpt.load_checkpoint(newest)
    assert state.step == 5 and all(torch.isfinite(w).all() for w in weights.values())


def test_readers_reload_the_manifest_when_a_training_run_finishes_under_them(project, monkeypatch):
    from stackwise_cli.model.io import load_current_rack

    grow(project)
    stale = project.load()
    train_stack(project, 0, steps=3)  # rewrites the stack, the ends and then the manifest
    fresh = project.load()
    loads = iter([stale, fresh, fresh])
    monkeypatch.setattr(project, "load", lambda: next(loads))  # the reader read the manifest just before
    m, rack = load_current_rack(project)
    assert m == fresh and len(rack.stacks) == 1


# --- precision, optimizer and memory switches ------------------------------------------------------------------


def _trained_copy(project: Project, name: str, steps: int, stop_at: int | None = None, **kwargs) -> Project:
    """A copy of the project, stack 0 trained ``steps`` steps (after a stop at ``stop_at``, if given)."""
    other = Project(project.root.parent / name)
    shutil.copytree(project.root, other.root)
    if stop_at is not None:
        with pytest.raises(Stopped):
            train_stack(other, 0, steps=steps, stop_at=stop_at, **kwargs)
    train_stack(other, 0, steps=steps, **kwargs)
    return other


def test_activation_checkpointing_trains_exactly_the_same_weights(project):
    grow(project)
    plain = _trained_copy(project, "plain", 6)
    _set_recipe(project, activation_checkpointing=True)
    ckpt_run = _trained_copy(project, "ckpt", 6)
    assert plain.load().stack(0).sha256 == ckpt_run.load().stack(0).sha256  # recompute in fp32 is exact


def test_adamw8bit_trains_and_resumes_bit_identically(project):
    grow(project)
    _set_recipe(project, optimizer="adamw8bit")
    straight = _trained_copy(project, "straight", 12)
    resumed = _trained_copy(project, "resumed", 12, stop_at=5)
    assert straight.load().stack(0).sha256 == resumed.load().stack(0).sha256
    newest = straight.load().stack(0)
    assert newest.last_loss < 6.2  # ln(512) = 6.24: it learned something
    _set_recipe(project, optimizer="adamw")
    assert straight.load().stack(0).sha256 != _trained_copy(project, "adamw", 12).load().stack(0).sha256


@pytest.mark.parametrize("precision", ["fp16", "fp8"])
def test_low_precisions_train_with_fp32_master_weights(project, precision):
    grow(project)
    other = _trained_copy(project, precision, 4, precision=precision)
    m = other.load()
    assert m.stack(0).state == "trained" and m.stack(0).precision == precision and m.stack(0).last_loss < 7
    stack = load_stack(other, m, 0)
    assert all(p.dtype == torch.float32 for p in stack.parameters())  # the file holds the fp32 master weights
    fp32 = _trained_copy(project, f"{precision}-ref", 4)
    assert m.stack(0).sha256 != fp32.load().stack(0).sha256  # the precision really changed the arithmetic


def test_fp16_checkpoint_keeps_the_loss_scale(project):
    grow(project)
    other = Project(project.root.parent / "fp16")
    shutil.copytree(project.root, other.root)
    with pytest.raises(Stopped):
        train_stack(other, 0, steps=6, precision="fp16", stop_at=3)
    import json

    state = json.loads((ckpt.list_checkpoints(other.ckpt_dir(0))[-1] / "state.json").read_text())
    assert state["scaler"]["scale"] > 1  # dynamic loss scaling is on, and resumes from where it was


def test_fp8_cache_trains_the_next_stack(project):
    import dataclasses

    import numpy as np

    from stackwise_cli.store.shards import read_hidden_shard, read_token_shard
    from stackwise_cli.train.cache import build_cache

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, cache=dataclasses.replace(m.recipe.cache, dtype="fp8"))
    grow(project)
    grow(project)
    train_stack(project, 0, steps=4)
    entry = build_cache(project, 1, "train")
    assert entry.dtype == "fp8"
    shard = read_hidden_shard(project.path(entry.shards[0].file))
    h = shard.hidden[:8]
    m = project.load()
    tok = read_token_shard(project.path(m.data.splits["train"].shards[0].file))
    tokens = torch.from_numpy(np.asarray(tok.tokens[:8], dtype=np.int64))
    with torch.no_grad():
        want = load_stack(project, m, 0)(load_ends(project, m).embed_tokens(tokens))
    amax = want.abs().amax(-1, keepdim=True)
    assert bool(((h - want).abs() <= amax * 2**-4 + 1e-5).all())
    result = train_stack(project, 1, steps=4)
    assert result.last_loss is not None


def test_an_interrupted_retraining_started_over_counts_from_the_weights_on_disk(project):
    """Retraining a 6-step stack with --resume never, stopped at 3, then started over: the file still holds the
    6-step weights, so the fresh 5-step run ends at 11 steps, not 5 (nor 14)."""
    grow(project)
    train_stack(project, 0, steps=6)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=5, resume="never", stop_at=3)
    assert project.load().stack(0).steps == 9  # progress of the interrupted run, shown as such
    train_stack(project, 0, steps=5, resume="never")
    e = project.load().stack(0)
    assert e.state == "trained" and e.steps == 11 and e.tokens == 11 * 8 * 32


# --- gradient accumulation and resume settings -------------------------------------------------------------------


# Two micro-batches sum a batch's gradient in another order than one big batch: the gradients differ by fp32
# rounding, which AdamW's normalised update lifts to ~1e-5 in the weights where a gradient is near zero (measured up
# to 3e-5 after 6 steps at lr 0.01). A wrong accumulation (the loss not divided by grad_accum) is off by ~6e-3.
ACCUM_TOL = {"rtol": 1e-3, "atol": 2e-4}


def _stack_tensors(p: Project) -> dict[str, torch.Tensor]:
    m = p.load()
    return {**load_stack(p, m, 0).state_dict(), **{f"ends.{k}": v for k, v in load_ends(p, m).state_dict().items()}}


def test_grad_accum_trains_the_weights_of_the_big_batch(project):
    """clm (no masks, equal tokens per row): 2 micro-batches of 4 are one batch of 8, to fp32 rounding (ACCUM_TOL)."""
    grow(project)
    big = _trained_copy(project, "big", 6)  # TINY: batch 8, grad_accum 1
    _set_recipe(project, batch_size=4, grad_accum=2)
    accum = _trained_copy(project, "accum", 6)
    a, b = big.load().stack(0), accum.load().stack(0)
    assert (a.steps, a.tokens) == (b.steps, b.tokens) == (6, 6 * 8 * 32)  # a step's tokens: 2 x 4 x 32
    for name, want in _stack_tensors(big).items():
        torch.testing.assert_close(_stack_tensors(accum)[name], want, **ACCUM_TOL)
    assert b.last_loss == pytest.approx(a.last_loss, rel=1e-5)  # the loss logged is the step's mean
    _set_recipe(project, batch_size=4, grad_accum=1)  # and it is not the same as one micro-batch alone
    half = _stack_tensors(_trained_copy(project, "half", 6))
    assert not torch.allclose(half["blocks.0.attn.q.weight"], _stack_tensors(big)["blocks.0.attn.q.weight"])


def test_grad_accum_resumes_bit_identically(project, tmp_path):
    grow(project)
    _set_recipe(project, batch_size=4, grad_accum=3)
    straight = _train_copy(project, tmp_path, "straight", steps=14)
    p = Project(tmp_path / "stopped")
    shutil.copytree(project.root, p.root)
    with pytest.raises(Stopped):
        train_stack(p, 0, steps=14, stop_at=7)
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(p.ckpt_dir(0))[-1])[3]
    assert state.step == 7 and state.tokens == 7 * 3 * 4 * 32 and state.sampler["offset"] == 7 * 12
    assert train_stack(p, 0, steps=14).resumed_from == 7
    a, b = straight.load().stack(0), p.load().stack(0)
    assert a.sha256 == b.sha256 and a.tokens == b.tokens == 14 * 3 * 4 * 32
    assert _logged(straight) == _logged(p)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 0.02}, "train.lr was 0.01, now 0.02"),
        ({"grad_accum": 2}, "train.grad_accum was 1, now 2"),
        ({"batch_size": 4}, "train.batch_size was 8, now 4"),
        ({"seed": 1}, "train.seed was 0, now 1"),
        ({"embedding": "frozen"}, "train.embedding was 'train', now 'frozen'"),
    ],
)
def test_resume_refuses_changed_settings_naming_them(project, change, message):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    _set_recipe(project, **change)
    with pytest.raises(StackwiseError, match=message) as err:
        train_stack(project, 0, steps=20)
    assert "--resume never" in err.value.hint
    r = train_stack(project, 0, steps=20, resume="never")  # starting again with the new value is allowed
    assert r.resumed_from is None and r.steps == 20


def test_resume_refuses_a_checkpoint_that_trained_other_parameters(project):
    # As a checkpoint made before a rule about what trains changed (e.g. the tied head side): its optimizer state
    # is for other parameters, so it cannot be resumed; one error, not a KeyError, and --resume never still works.
    import json

    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    (newest,) = ckpt.list_checkpoints(project.ckpt_dir(0))[-1:]
    state = json.loads((newest / "state.json").read_text())
    state["trainable"] = [n for n in state["trainable"] if not n.startswith("ends.")]
    (newest / "state.json").write_text(json.dumps(state))
    with pytest.raises(StackwiseError, match="trained other parameters than this run would") as err:
        train_stack(project, 0, steps=20)
    assert "ends.embed.weight" in str(err.value) and "--resume never" in err.value.hint
    assert train_stack(project, 0, steps=20, resume="never").steps == 20


def test_resume_refuses_a_changed_precision(project):
    grow(project)
    with pytest.raises(Stopped):
        train_stack(project, 0, steps=20, stop_at=5)
    with pytest.raises(StackwiseError, match="--precision was 'fp32', now 'fp8'") as err:
        train_stack(project, 0, steps=20, precision="fp8")
    assert "--precision fp32" in err.value.hint
    assert train_stack(project, 0, steps=20).resumed_from == 5  # the old value resumes


def test_grad_accum_end_to_end_counts_every_micro_batch_and_trains_the_big_batch(project):
    import dataclasses

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="end-to-end")
    grow(project)
    grow(project)
    big = Project(project.root.parent / "big")
    shutil.copytree(project.root, big.root)
    train_stack(big, "all", steps=4)  # batch 8
    _set_recipe(project, batch_size=4, grad_accum=2)
    r = train_stack(project, "all", steps=4)
    assert r.steps == 4 and r.tokens == 4 * 2 * 4 * 32 == big.load().stack(1).tokens
    for i in (0, 1):
        want = load_stack(big, big.load(), i).state_dict()
        for name, got in load_stack(project, project.load(), i).state_dict().items():
            torch.testing.assert_close(got, want[name], **ACCUM_TOL)


def test_a_fused_adamw_resumes_from_its_checkpoint_tensors():
    """On CUDA make_optimizer runs AdamW's fused step, which keeps its step count on the parameter's device: the
    checkpoint's tensors load into it and the next step is the uninterrupted one (fused AdamW is built directly on
    a machine without CUDA, to exercise the same loading path)."""
    from stackwise_cli.train.optim import make_optimizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(0)
    init = {"w": torch.randn(8, 4, generator=gen), "b": torch.randn(4, generator=gen)}
    grads = [{n: torch.randn(t.shape, generator=gen) for n, t in init.items()} for _ in range(3)]

    def build():
        params = {n: torch.nn.Parameter(t.clone().to(dev)) for n, t in init.items()}
        if dev.type == "cuda":
            opt = make_optimizer(params, TrainRecipe())
        else:
            opt = torch.optim.AdamW(list(params.values()), lr=1e-2, fused=True)
        assert opt.defaults["fused"] is True
        return params, opt

    def step(params, opt, g):
        for n, p in params.items():
            p.grad = g[n].to(dev)
        opt.step()

    straight, opt = build()
    for g in grads:
        step(straight, opt, g)
    first, opt1 = build()
    for g in grads[:2]:
        step(first, opt1, g)
    saved = ckpt.optimizer_tensors(opt1, {p: n for n, p in first.items()})
    resumed, opt2 = build()
    with torch.no_grad():
        for n, p in resumed.items():
            p.copy_(first[n])
    ckpt.load_optimizer_tensors(opt2, resumed, saved)
    step(resumed, opt2, grads[2])
    for n in init:
        assert torch.equal(resumed[n], straight[n])


def test_precision_auto_is_what_bench_plan_plans_on_a_gpu_and_fp32_on_the_cpu(project, monkeypatch):
    from stackwise_cli.bench.plan import PlanOptions
    from stackwise_cli.train.precision import resolve_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32" and resolve_precision("fp16", cuda) == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", cuda) == PlanOptions().precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", cuda) == "fp32"
    monkeypatch.undo()
    grow(project)
    train_stack(project, 0, steps=4)  # the default, on this CPU: fp32, recorded as such
    assert project.load().stack(0).precision == "fp32"


def test_sampler_computes_one_permutation_per_epoch_not_per_batch():
    s = Sampler(1000, 7, seed=3)
    for _ in range(300):  # 2,100 rows: epochs 0, 1 and 2
        s.next()
    assert s.permutations == 3 and s.state() == {"epoch": 2, "offset": 100}
    resumed = Sampler(1000, 7, seed=3)
    resumed.load_state(s.state())
    assert (resumed.next() == s.next()).all() and resumed.permutations == 1


def test_sampler_start_is_a_position_in_one_stream_of_epochs():
    straight = Sampler(10, 4, seed=0)
    rows = [straight.next() for _ in range(5)]  # 20 rows: epochs 0 and 1
    later = Sampler(10, 4, seed=0, start=8)  # where a run of two batches stops
    got = later.next()
    assert (got == np.concatenate(rows)[8:12]).all()
    assert later.last_epochs.tolist() == [0, 0, 1, 1]  # each row's epoch is the one it was drawn in
    assert straight.last_epochs.tolist() == [1, 1, 1, 1] and later.position() == 12
    with pytest.raises(StackwiseError, match="other data"):
        later.load_state({"epoch": 0, "offset": 10})


def _record_rows(monkeypatch) -> list[list[int]]:
    """Every training batch's sequence ids, one list per train_stack call (a new list at each sampler made)."""
    from stackwise_cli.train import data

    runs: list[list[int]] = []
    init, get = data.Sampler.__init__, data.Sequences.get

    def sampler_init(self, *a, **k):
        runs.append([])
        init(self, *a, **k)

    def recording_get(self, rows, device, epochs=None):
        batch = get(self, rows, device, epochs)
        runs[-1].extend(int(i) for i in batch.seq_ids)
        return batch

    monkeypatch.setattr(data.Sampler, "__init__", sampler_init)
    monkeypatch.setattr(data.Sequences, "get", recording_get)
    return runs


def test_stacks_trained_left_to_right_read_what_end_to_end_reads_at_the_same_budget(project, tmp_path, monkeypatch):
    import dataclasses

    from stackwise_cli.train.cache import build_cache

    e2e = Project(tmp_path / "e2e")
    shutil.copytree(project.root, e2e.root)
    with e2e.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="end-to-end")
    runs = _record_rows(monkeypatch)
    grow(project)
    grow(project)
    train_stack(project, 0, steps=5)
    build_cache(project, 1, "train")
    train_stack(project, 1, steps=5)
    grow(e2e)
    grow(e2e)
    train_stack(e2e, "all", steps=10)
    first, second, whole = runs
    n = sum(s.sequences for s in project.load().data.splits["train"].shards)
    assert len(first) == len(second) == 5 * 8 and 2 * 5 * 8 < n  # the budget is under one epoch
    assert not set(first) & set(second)  # the second stack reads new rows
    assert first + second == whole  # and together they are what end to end reads, in order


def test_a_retrained_stack_reads_on_after_its_first_run(project, monkeypatch):
    runs = _record_rows(monkeypatch)
    grow(project)
    train_stack(project, 0, steps=3)
    train_stack(project, 0, steps=3, resume="never")
    assert len(runs[0]) == len(runs[1]) == 24 and not set(runs[0]) & set(runs[1])


def test_right_to_left_the_new_stack_reads_on_after_its_suffix(project, monkeypatch):
    import dataclasses

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="right-to-left")
    runs = _record_rows(monkeypatch)
    grow(project)
    train_stack(project, 0, steps=3)
    new = grow(project, side="left")
    train_stack(project, new.id, steps=3)
    assert len(runs[0]) == len(runs[1]) == 24 and not set(runs[0]) & set(runs[1])
