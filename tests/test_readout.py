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
    from stackwise_cli.train.loop import train_stack

    tmp = tmp_path_factory.mktemp("alphabet")
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(ALPHABET_MLM))
    project = Project(tmp / "proj")
    prepare(project, load_recipe(tmp / "recipe.yaml"), [alphabet_corpus(tmp / "alphabet.jsonl")])
    grow(project, "right")
    train_stack(project, 0, device="cpu")
    return project


def test_eval_causal_reads_a_masked_rack_through_a_mask_at_the_next_position(alphabet_mlm: Project):
    from stackwise_cli.evaluate.eval import evaluate, val_tokens
    from stackwise_cli.store.weights import load_current_rack

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
    assert r.loss < shifted_loss / 2 and r.accuracy > 0.5 > 0.2 > shifted_accuracy, (r.loss, shifted_loss)
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
