"""Reading a trained rack: the causal readout of a masked (mlm) rack on text whose next token is certain.

The corpus is the alphabet written cyclically ("f g h i ..."), so a model that reads position i+1 through a
``[MASK]`` there predicts the next letter, while the one-off readout (position i as token i+1) does not.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from stackwise_cli.store.project import Project

LETTERS = "abcdefghijklmnopqrstuvwxyz"
ALPHABET_MLM = {
    "name": "alphabet-mlm",
    "objective": "mlm",
    "mask": {"ratio": 0.3},
    "model": {"vocab_size": 320, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32},
    "rack": {"stacks": 1, "blocks_per_stack": 2},
    "data": {"seq_len": 32, "val_fraction": 0.1, "sequences_per_shard": 512},
    "train": {"steps": 300, "batch_size": 16, "lr": 0.01, "warmup_steps": 1, "checkpoint_every": 1000},
    "eval": {"max_sequences": 32, "batch_size": 32},
}


def alphabet_corpus(path: Path, documents: int = 400, letters: int = 60) -> Path:
    """JSONL documents of ``letters`` consecutive letters of the cyclic alphabet, each from a random start."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(documents):
            s = rng.randrange(26)
            f.write(json.dumps({"text": " ".join(LETTERS[(s + k) % 26] for k in range(letters))}) + "\n")
    return path


@pytest.fixture(scope="module")
def alphabet_mlm(tmp_path_factory) -> Project:
    """A one-stack mlm rack trained for 300 steps on the cyclic alphabet (a few seconds on 2 cores). Read only."""
    from stackwise_cli.data.prepare import prepare
    from stackwise_cli.recipe import load_recipe
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    tmp = tmp_path_factory.mktemp("alphabet")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(ALPHABET_MLM))
    project = Project(tmp / "proj")
    prepare(project, load_recipe(tmp / "recipe.yaml"), [alphabet_corpus(tmp / "alphabet.jsonl")])
    grow(project, "right")
    train_stack(project, 0, device="cpu")
    return project


def test_eval_causal_reads_a_masked_rack_through_a_mask_at_the_next_position(alphabet_mlm: Project):
    from stackwise_cli.evaluate.eval import evaluate, val_tokens
    from stackwise_cli.model.io import load_current_rack

    r = evaluate(alphabet_mlm, device="cpu", causal=True)
    assert r.objective == "clm" and r.attention == "causal" and r.causal_readout == "mask"
    assert r.tokens == 32 * 31  # every token but the first of each sequence, as the clm loss counts
    # The one-off readout of the seed project: position i's logits read as token i+1.
    m, rack = load_current_rack(alphabet_mlm)
    t = torch.from_numpy(val_tokens(alphabet_mlm, m, "val", 32).astype("int64"))
    with torch.no_grad():
        logits = rack.eval()(t, causal=True)[:, :-1]
    shifted_loss = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t[:, 1:].ravel()))
    shifted_accuracy = float((logits.argmax(-1) == t[:, 1:]).float().mean())
    # Measured: ~2.5 nats / accuracy ~0.6 against ~6.3 / ~0.01; the bounds leave room for other CPUs and seeds.
    assert r.loss < 0.6 * shifted_loss and r.accuracy > 0.4 > 0.15 > shifted_accuracy, (r.loss, shifted_loss)
    assert r.per_stack[-1].loss == pytest.approx(r.loss)
    bidirectional = evaluate(alphabet_mlm, device="cpu")
    assert bidirectional.causal_readout is None and bidirectional.objective == "mlm"


def test_generate_causal_continues_the_alphabet_without_stuttering(alphabet_mlm: Project):
    from stackwise_cli.evaluate.generate import generate

    steps = repeats = total = 0
    for start in range(0, 26, 2):
        prompt = " ".join(LETTERS[(start + k) % 26] for k in range(8))
        g = generate(alphabet_mlm, prompt, causal=True, max_new_tokens=10, ignore_eos=True, device="cpu")
        assert g.settings["causal_readout"] == "mask"
        seq = [prompt[-1], *g.samples[0].completion.split()]
        pairs = list(zip(seq, seq[1:]))
        steps += sum(a in LETTERS and b == LETTERS[(LETTERS.index(a) + 1) % 26] for a, b in pairs)
        repeats += sum(a == b for a, b in pairs)
        total += len(pairs)
    assert total >= 13 * 8
    assert steps / total > 0.75 and repeats / total < 0.05, (steps / total, repeats / total)


# --- untrained stacks are never scored, sampled or exported silently --------------------------------------------

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}


def cli(*args: object):
    from typer.testing import CliRunner

    from stackwise_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def refused(result, *needles: str) -> str:
    """A one-line user error (exit 1, no traceback) holding every needle; returns stderr."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and result.stderr.count("error:") == 1, result.output
    for needle in needles:
        assert needle in result.stderr, result.stderr
    return result.stderr


def set_states(project: Project, **states: str) -> None:
    """Hand-edit stack states in the manifest: ``set_states(p, s1="training")``."""
    with project.update() as m:
        for key, state in states.items():
            m.stack(int(key[1:])).state = state


@pytest.fixture
def half_trained(project: Project) -> Project:
    """Left to right, two stacks: 0 trained (3 steps), 1 new."""
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    grow(project, "right")
    train_stack(project, 0, steps=3, device="cpu")
    grow(project, "right")
    return project


def test_eval_scores_the_trained_prefix_of_a_left_to_right_rack_and_says_so(half_trained: Project):
    import json

    from stackwise_cli.evaluate.eval import evaluate

    root = half_trained.root
    r = cli("eval", "-p", root, "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert [s["id"] for s in data["per_stack"]] == [0] and data["left_out"] == [1]
    assert data["loss"] == pytest.approx(data["per_stack"][0]["loss"])
    plain = cli("eval", "-p", root)
    assert plain.exit_code == 0, plain.output
    assert "scored the trained prefix only (stacks 0)" in plain.stdout and f"train-stack 1 -p {root}" in plain.stdout
    set_states(half_trained, s1="training")  # a run of stack 1 began and has not finished: still left out
    assert evaluate(half_trained, device="cpu").left_out == [1]
    set_states(half_trained, s0="training")  # nothing trained left to score
    refused(cli("eval", "-p", root), "eval would score untrained weights", "0 (training), 1 (training)")


def test_eval_of_a_fully_trained_rack_leaves_nothing_out(half_trained: Project):
    from stackwise_cli.evaluate.eval import evaluate

    set_states(half_trained, s1="frozen")  # frozen holds finished weights: accepted
    r = evaluate(half_trained, device="cpu")
    assert [s.id for s in r.per_stack] == [0, 1] and r.left_out == []


@pytest.mark.parametrize(
    "args, what",
    [
        (["fuse"], "fuse would export"),
        (["fuse", "--finetune-steps", "2"], "fuse would export"),
        (["generate", "--max-new-tokens", "4"], "generate would sample from"),
    ],
)
def test_fuse_and_generate_refuse_untrained_stacks_naming_the_command(half_trained: Project, args, what):
    root = half_trained.root
    refused(cli(*args, "-p", root), f"{what} untrained weights: stack(s) 1 (new)", f"stackwise train-stack 1 -p {root}")
    set_states(half_trained, s1="training")
    refused(cli(*args, "-p", root), "1 (training)", "a run has not finished", f"stackwise train-stack 1 -p {root}")
    assert not (root / "fused").exists() and half_trained.load().fused is None
    assert not (root / "ckpt" / "finetune").exists()  # refused before a fine-tune began


def test_other_curricula_refuse_to_score_a_partly_trained_rack(project: Project):
    import dataclasses

    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, curriculum="right-to-left")
    grow(project, "left")
    train_stack(project, 0, steps=2, device="cpu")
    grow(project, "left")  # id 1, in front of the trained suffix
    root = project.root
    refused(cli("eval", "-p", root), "eval would score untrained weights: stack(s) 1 (new)", "train-stack 1 -p")


# --- eval --fused: the model users load after a fine-tune -------------------------------------------------------


@pytest.mark.parametrize(
    "model, bidirectional",
    [({}, False), ({"family": "gpt2", "n_kv_heads": 4}, False), ({"family": "bert", "n_kv_heads": 4}, True)],
)
def test_fused_tensors_read_back_into_the_rack_exactly(model, bidirectional):
    from test_generate import make_rack

    from stackwise_cli.errors import CorruptFileError
    from stackwise_cli.evaluate.fused import load_hf_tensors_into
    from stackwise_cli.model.hf import hf_state_dict
    from stackwise_cli.model.model import Ends, Rack, Stack

    rack = make_rack(2, **model)
    exported = hf_state_dict(rack, bidirectional)

    def blank() -> Rack:
        return Rack(rack.cfg, Ends(rack.cfg), [Stack(rack.cfg, 1, s.attn) for s in rack.stacks], [0, 1])

    back = load_hf_tensors_into(blank(), exported, bidirectional, "fused/model.safetensors").state_dict()
    assert back.keys() == rack.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in rack.state_dict().items())
    missing = dict(exported)
    name = sorted(missing)[0]
    del missing[name]
    with pytest.raises(CorruptFileError, match=f"fused/model.safetensors: tensor {name} is missing"):
        load_hf_tensors_into(blank(), missing, bidirectional, "fused/model.safetensors")


def test_eval_fused_scores_the_fine_tuned_model_as_transformers_does(project: Project):
    import json

    from transformers import AutoModelForCausalLM

    from stackwise_cli.evaluate.eval import evaluate, val_tokens
    from stackwise_cli.fuse import fuse
    from stackwise_cli.train.finetune import finetune_spec
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    root = project.root
    grow(project, "right")
    train_stack(project, 0, steps=3, device="cpu")
    rack = evaluate(project, device="cpu")
    refused(cli("eval", "--fused", "-p", root), "no fused model", "stackwise fuse")
    fuse(project, finetune_spec(5), device="cpu")
    recorded = project.load().fused.val_loss  # the fine-tuning fuse scored fused/ itself
    r = cli("eval", "--fused", "--json", "-p", root)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["model"] == "fused" and data["tokens"] == rack.tokens
    assert abs(data["loss"] - rack.loss) > 1e-3, (data["loss"], rack.loss)  # fine-tuned: not the rack
    assert recorded == pytest.approx(data["loss"]) and project.load().fused.val_loss == pytest.approx(data["loss"])
    assert evaluate(project, device="cpu").loss == pytest.approx(rack.loss)  # eval without --fused: the rack
    # transformers' own model on the fused folder, scored on the same sequences: the same next-token loss.
    m = project.load()
    tokens = torch.from_numpy(val_tokens(project, m, "val", m.recipe.eval.max_sequences).astype("int64"))
    hf = AutoModelForCausalLM.from_pretrained(root / "fused").float().eval()
    with torch.no_grad():
        logits = hf(tokens).logits[:, :-1]
    theirs = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    assert data["loss"] == pytest.approx(float(theirs), rel=1e-4, abs=1e-5)
    # A rack changed since the fuse makes fused/ stale: refused rather than scored as if current.
    train_stack(project, 0, steps=2, device="cpu", resume="never")
    refused(cli("eval", "--fused", "-p", root), "fused from an earlier rack", "stackwise fuse")


def test_a_fused_model_too_big_for_the_device_leaves_val_loss_unset_and_says_how(project: Project, monkeypatch):
    # fused/ is written before it is scored: an fp32 model the GPU cannot hold is a line, not a lost fine-tune.
    import stackwise_cli.evaluate.eval as ev
    from stackwise_cli.fuse import fuse
    from stackwise_cli.progress import Reporter
    from stackwise_cli.train.finetune import finetune_spec
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    class Lines(Reporter):
        said: list[str] = []

        def info(self, message: str) -> None:
            self.said.append(message)

    def no_room(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    grow(project, "right")
    train_stack(project, 0, steps=3, device="cpu")
    monkeypatch.setattr(ev, "evaluate", no_room)
    fuse(project, finetune_spec(5), device="cpu", reporter=(lines := Lines()))
    m = project.load()
    assert m.fused is not None and m.fused.finetune_steps == 5 and m.fused.val_loss is None
    assert (project.root / "fused" / "model.safetensors").exists()
    assert any("eval --fused --device cpu" in s for s in lines.said)


def test_causal_readout_of_a_masked_rack_without_a_mask_token_is_refused(project: Project):
    import dataclasses

    from stackwise_cli.train.grow import grow

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, objective="mlm")
    grow(project, "right")
    set_states(project, s0="trained")
    with project.update() as m:  # a hand-edited (or very old) manifest
        m.tokenizer.mask_id = None
    for args in (["eval", "--causal"], ["generate", "--causal", "--prompt", "a", "--max-new-tokens", "2"]):
        refused(cli(*args, "-p", project.root), "no [MASK] token", "prepare")
