"""Generation: the token filters on hand-made logits, the KV-cached sampler against the recompute-everything loop,
iterative and single-pass unmasking on a random rack, the mode chosen for each objective, and the CLI end to end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import torch
from click.testing import Result
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.errors import StackwiseError
from stackwise_cli.evaluate.causal import masked_next_token_logits
from stackwise_cli.evaluate.generate import (
    check_sampling,
    choose_tokens,
    filter_logits,
    resolve_mode,
    restrict_vocab,
    sample_autoregressive,
    unmask_iterative,
    unmask_single_pass,
)
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.model.model import Ends, Rack, Stack
from stackwise_cli.store.project import Project
from stackwise_cli.train.grow import grow
from stackwise_cli.train.stack import train_stack

V = 64
MASK = V - 1  # the [MASK] id of the hand-built racks


def make_rack(n_stacks: int = 2, seed: int = 0, attention: str = "gqa", **model) -> Rack:
    """A random rack: d=32, one block per stack, fp32 on the CPU."""
    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(
        **{"vocab_size": V, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64, "max_seq_len": 32, **model}
    )
    attn = AttentionConfig(kind=attention)
    ends = Ends(cfg)
    ends.init_weights(g)
    stacks = []
    for _ in range(n_stacks):
        s = Stack(cfg, 1, attn)
        s.init_weights("random", n_stacks, g)
        stacks.append(s)
    return Rack(cfg, ends, stacks, list(range(n_stacks))).eval()


def masked_ids(prompt: list[int], length: int, batch: int = 2) -> torch.Tensor:
    ids = torch.full((batch, length), MASK, dtype=torch.long)
    ids[:, : len(prompt)] = torch.tensor(prompt)
    return ids


def favour(rack: Rack, token: int) -> None:
    """Make ``token`` the argmax at every position, by a wide margin."""
    logits = rack.ends.logits

    def patched(h: torch.Tensor) -> torch.Tensor:
        out = logits(h).clone()
        out[..., token] += 1e4
        return out

    rack.ends.logits = patched


def greedy_reference(rack: Rack, prompt: list[int], n: int) -> list[int]:
    """The plainest greedy loop there is: recompute the whole sequence, take the argmax of the last position."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(rack(torch.tensor([seq]), causal=True)[0, -1].argmax()))
    return seq[len(prompt) :]


# --------------------------------------------------------------------------------------------- filtering logits

# Probabilities 0.5, 0.3, 0.15, 0.05 as logits, in a shuffled order so sorting is exercised.
PROBS = torch.tensor([0.15, 0.5, 0.05, 0.3])
LOGITS = PROBS.log()


def kept(logits: torch.Tensor) -> set[int]:
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


@pytest.mark.parametrize(
    "top_p, expect",
    [
        (0.3, {1}),
        (0.49, {1}),
        (0.51, {1, 3}),
        (0.79, {1, 3}),
        (0.81, {1, 3, 0}),
        (0.96, {0, 1, 2, 3}),
        (1.0, {0, 1, 2, 3}),
    ],
)
def test_top_p_keeps_the_smallest_set_with_enough_mass(top_p, expect):
    assert kept(filter_logits(LOGITS, top_p=top_p)) == expect


def test_top_p_after_temperature_and_renormalised():
    # Temperature 0.5 squares and renormalises the probabilities: 0.5^2 / 0.3725 = 0.671 alone covers 0.6.
    assert kept(filter_logits(LOGITS, top_p=0.6, temperature=0.5)) == {1}
    assert kept(filter_logits(LOGITS, top_p=0.6)) == {1, 3}
    probs = torch.softmax(filter_logits(LOGITS, top_p=0.79), dim=-1)
    assert torch.allclose(probs, torch.tensor([0.0, 0.5 / 0.8, 0.0, 0.3 / 0.8]), atol=1e-6)


def test_top_k_keeps_the_k_largest():
    assert kept(filter_logits(LOGITS, top_k=1)) == {1}
    assert kept(filter_logits(LOGITS, top_k=2)) == {1, 3}
    assert kept(filter_logits(LOGITS, top_k=10)) == {0, 1, 2, 3}
    # top-k then top-p: the nucleus is taken within the k kept tokens (0.5 / 0.8 = 0.625 >= 0.6).
    assert kept(filter_logits(LOGITS, top_k=2, top_p=0.6)) == {1}


def test_filters_work_row_by_row():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])  # (2, 4)
    out = filter_logits(logits, top_k=1)
    assert kept(out[0]) == {1} and kept(out[1]) == {2}


def test_top_k_one_is_greedy():
    logits = torch.randn(50, V, generator=torch.Generator().manual_seed(0))
    greedy, _ = choose_tokens(logits)
    for seed in range(3):
        sampled, conf = choose_tokens(logits, 1.5, top_k=1, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(sampled, greedy)
        assert torch.allclose(conf, torch.ones(50))  # one token left: it has all the mass


def test_temperature_to_zero_is_greedy_and_large_is_uniform():
    logits = torch.randn(50, V, generator=torch.Generator().manual_seed(1))
    greedy, _ = choose_tokens(logits)
    cold = torch.softmax(filter_logits(logits, temperature=1e-4), dim=-1)
    assert torch.allclose(cold, torch.nn.functional.one_hot(greedy, V).float(), atol=1e-6)
    sampled, _ = choose_tokens(logits, 1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, greedy)
    hot = torch.softmax(filter_logits(logits, temperature=1e4), dim=-1)
    assert torch.allclose(hot, torch.full_like(hot, 1 / V), atol=1e-5)


def test_sampling_follows_the_distribution():
    logits = LOGITS.expand(20000, 4)
    tokens, conf = choose_tokens(logits, 1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert torch.allclose(freq, PROBS, atol=0.015)
    assert torch.allclose(conf, PROBS[tokens], atol=1e-6)  # confidence = probability of the token drawn


def test_restrict_vocab_bans_ids():
    out = restrict_vocab(torch.zeros(2, 10), vocab_size=8, banned=(3,))
    assert kept(out[0]) == {0, 1, 2, 4, 5, 6, 7}


@pytest.mark.parametrize(
    "temperature, top_k, top_p, needle",
    [
        (1.0, None, 0.0, "--top-p must be in (0, 1]"),
        (1.0, None, 1.5, "--top-p must be in (0, 1]"),
        (1.0, None, -0.2, "--top-p must be in (0, 1]"),
        (1.0, 0, None, "--top-k must be >= 1"),
        (-1.0, None, None, "--temperature must be >= 0"),
        (math.nan, None, None, "--temperature must be >= 0"),
        (0.0, 5, None, "--temperature 0 decodes greedily"),
    ],
)
def test_bad_sampling_settings_are_clear_errors(temperature, top_k, top_p, needle):
    with pytest.raises(StackwiseError, match=re.escape(needle)):
        check_sampling(temperature, top_k, top_p)


# ------------------------------------------------------------------------------------------------ autoregressive


@pytest.mark.parametrize(
    "attention, model",
    [("gqa", {}), ("mla", {}), ("linear", {}), ("gqa", {"family": "gpt2"}), ("gqa", {"tie_embeddings": True})],
)
def test_cached_greedy_equals_the_recompute_everything_loop(attention, model):
    rack = make_rack(attention=attention, **model)
    prompt = [5, 17, 3]
    n = 32 - len(prompt)  # to the end of the context: the last steps use the highest positions
    cached = sample_autoregressive(rack, prompt, n)
    assert cached.tokens == [greedy_reference(rack, prompt, n)]
    assert cached.tokens == sample_autoregressive(rack, prompt, n, use_cache=False).tokens
    assert cached.steps == n and cached.stopped_at_eos == [False]


ARCHITECTURES = [
    ("gqa", {}),
    ("mla", {}),
    ("linear", {}),
    ("gqa", {"family": "gpt2"}),
    ("gqa", {"family": "modernbert", "local_window": 4}),
]


@pytest.mark.parametrize("attention, model", ARCHITECTURES)
def test_masked_causal_readout_reads_a_mask_that_sees_only_the_prefix(attention, model):
    """Token p's logits come from a [MASK] at position p seeing only tokens 0..p-1: the causal forward of the
    sequence with token p replaced by [MASK] (and anything after it), read at p, after every stack."""
    rack = make_rack(3, attention=attention, **model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, MASK, (2, 12), generator=g)
    got = dict(masked_next_token_logits(rack, tokens, MASK, read=range(3)))
    assert sorted(got) == list(range(1, 12))
    for p, logits in got.items():
        x = tokens.clone()
        x[:, p] = MASK
        x[:, p + 1 :] = torch.randint(0, MASK, (2, 12 - p - 1), generator=g)  # the future: never seen
        states = rack.hidden_states(x, causal=True)[1:]
        for i in range(3):
            torch.testing.assert_close(logits[i], rack.ends.logits(states[i])[:, p], atol=1e-4, rtol=1e-4)
    shifted = rack(tokens, causal=True)[:, 4]  # the old, one-off readout of token 5
    assert not torch.allclose(got[5][2], shifted, atol=1e-3)


@pytest.mark.parametrize("attention, model", ARCHITECTURES[:4])
def test_masked_causal_generation_probes_a_mask_and_cached_equals_uncached(attention, model):
    rack = make_rack(attention=attention, **model)
    prompt, n = [5, 17, 3], 32 - 3
    cached = sample_autoregressive(rack, prompt, n, probe_id=MASK, banned=(MASK,))
    uncached = sample_autoregressive(rack, prompt, n, probe_id=MASK, banned=(MASK,), use_cache=False)
    assert cached.tokens == uncached.tokens
    seq = list(prompt)  # the plainest loop: append [MASK], take its argmax, put the token in its place
    with torch.no_grad():
        for _ in range(n):
            logits = restrict_vocab(rack(torch.tensor([seq + [MASK]]), causal=True)[0, -1], banned=(MASK,))
            seq.append(int(logits.argmax()))
    assert cached.tokens == [seq[len(prompt) :]]
    assert cached.tokens != sample_autoregressive(rack, prompt, n, banned=(MASK,)).tokens  # not the shifted readout


def test_cached_sampling_equals_uncached_with_the_same_seed():
    rack = make_rack()
    kw = dict(temperature=1.0, top_k=20, top_p=0.95, samples=3)
    a = sample_autoregressive(rack, [1, 2], 20, generator=torch.Generator().manual_seed(7), **kw)
    b = sample_autoregressive(rack, [1, 2], 20, generator=torch.Generator().manual_seed(7), use_cache=False, **kw)
    assert a.tokens == b.tokens


def test_same_seed_same_tokens_different_seeds_differ():
    rack = make_rack()

    def run(seed: int) -> list[list[int]]:
        return sample_autoregressive(
            rack, [1], 16, temperature=1.0, samples=2, generator=torch.Generator().manual_seed(seed)
        ).tokens

    assert run(3) == run(3)
    assert run(3) != run(4)
    a, b = run(3)
    assert a != b  # the samples of one batch are independent draws


def test_stops_at_eos_without_it_and_not_when_told():
    rack = make_rack()
    first = sample_autoregressive(rack, [5, 17, 3], 12).tokens[0]
    eos = first[-1]
    at = first.index(eos)
    assert at > 0, first  # the test needs a sequence that does not start with its last token
    stopped = sample_autoregressive(rack, [5, 17, 3], 12, eos_id=eos)
    assert stopped.tokens == [first[:at]] and stopped.stopped_at_eos == [True] and stopped.steps == at + 1


def test_never_samples_banned_or_undefined_ids():
    rack = make_rack()
    favour(rack, MASK)
    assert set(sample_autoregressive(rack, [1], 10).tokens[0]) == {MASK}
    out = sample_autoregressive(rack, [1], 10, temperature=1.0, vocab_size=40, banned=(MASK,)).tokens[0]
    assert out and all(t < 40 for t in out)


# ---------------------------------------------------------------------------------------------------- unmasking


def test_iterative_unmasks_the_scheduled_count_per_step_and_keeps_the_prompt():
    rack = make_rack()
    prompt = [4, 8, 15]
    ids = masked_ids(prompt, 16)  # 13 to generate
    out = unmask_iterative(rack, ids, MASK, 5)
    # k_s = ceil(remaining / (S - s)): 13 -> 3, 10 -> 3, 7 -> 3, 4 -> 2, 2 -> 2
    assert [(out.step[0] == s).sum().item() for s in range(5)] == [3, 3, 3, 2, 2]
    assert out.steps == 5
    assert not (out.ids == MASK).any()
    assert out.ids[:, :3].tolist() == [prompt, prompt]
    assert (out.step[:, :3] == -1).all() and (out.step[:, 3:] >= 0).all()


def test_iterative_with_more_steps_than_tokens_unmasks_one_per_step():
    out = unmask_iterative(make_rack(), masked_ids([1], 6), MASK, 20)
    assert out.steps == 5
    assert sorted(out.step[0, 1:].tolist()) == [0, 1, 2, 3, 4]


def test_iterative_commits_the_most_confident_first():
    rack = make_rack()
    ids = masked_ids([2, 3], 12, batch=1)
    out = unmask_iterative(rack, ids, MASK, 4)
    with torch.no_grad():
        probs = torch.softmax(restrict_vocab(rack(ids, causal=False), banned=(MASK,)), dim=-1)[0]
    conf = probs.max(dim=-1).values  # (L,)
    first = (out.step[0] == 0).nonzero().flatten()
    later = (out.step[0] > 0).nonzero().flatten()
    assert conf[first].min() >= conf[later].max()
    assert out.ids[0, first].tolist() == probs[first].argmax(dim=-1).tolist()


def test_unmasking_never_outputs_the_mask_token():
    rack = make_rack()
    favour(rack, MASK)
    with torch.no_grad():
        assert (rack(masked_ids([1], 10), causal=False).argmax(-1) == MASK).all()  # it would win everywhere
    for out in (
        unmask_iterative(rack, masked_ids([1], 10), MASK, 3),
        unmask_iterative(rack, masked_ids([1], 10), MASK, 3, temperature=1.0, generator=torch.Generator()),
        unmask_single_pass(rack, masked_ids([1], 10), MASK, [0.9, 0.3]),
    ):
        assert not (out.ids == MASK).any()


def test_iterative_sampling_is_seeded():
    rack = make_rack()

    def run(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return unmask_iterative(rack, masked_ids([1], 20), MASK, 4, temperature=1.0, generator=g).ids

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_iterative_passes_the_masked_share_as_time():
    rack = make_rack(time_embedding=True)
    seen = []
    forward = rack.forward

    def spy(tokens, causal=True, t=None):
        seen.append(t.clone())
        assert not causal
        return forward(tokens, causal, t)

    rack.forward = spy
    unmask_iterative(rack, masked_ids([1, 2, 3], 16), MASK, 5, time_input=True, t_range=(0.15, 0.7))
    # The share of the whole sequence (16) still masked, as in training, clamped to the trained range.
    want = [min(max(r / 16, 0.15), 0.7) for r in (13, 10, 7, 4, 2)]
    assert [t.tolist() for t in seen] == [[pytest.approx(w)] * 2 for w in want]


def test_single_pass_unmasks_each_stack_share():
    rack = make_rack(n_stacks=3)
    ids = masked_ids([7, 7, 7, 7], 24)  # 20 to generate
    out = unmask_single_pass(rack, ids, MASK, [0.9, 0.5, 0.2])
    # masked after stack 0: round(0.5 * 20) = 10, after stack 1: round(0.2 * 20) = 4, after stack 2: 0
    assert [(out.step[0] == i).sum().item() for i in range(3)] == [10, 6, 4]
    assert out.steps == 3
    assert out.ids[:, :4].tolist() == [[7] * 4] * 2
    assert not (out.ids == MASK).any()


def test_single_pass_is_one_pass_and_keeps_each_stack_prediction():
    """The reference: embed once, run the stacks in order, read the head after each. Tokens committed at stack i
    are stack i's argmax there, computed without re-embedding anything."""
    rack = make_rack(n_stacks=3, seed=5)
    ids = masked_ids([3, 1, 4], 20, batch=1)
    out = unmask_single_pass(rack, ids, MASK, [0.8, 0.6, 0.3])
    with torch.no_grad():
        h = rack.ends.embed_tokens(ids)
        for i, stack in enumerate(rack.stacks):
            h = stack(h, causal=False)
            pred = restrict_vocab(rack.ends.logits(h), banned=(MASK,)).argmax(-1)[0]
            at = out.step[0] == i
            assert at.any()
            assert torch.equal(out.ids[0, at], pred[at])


def test_single_pass_ratio_rounding_and_checks():
    rack = make_rack(n_stacks=2)
    out = unmask_single_pass(rack, masked_ids([], 5), MASK, [0.9, 0.5])  # 2.5 rounds half up: 3 stay masked
    assert [(out.step[0] == i).sum().item() for i in range(2)] == [2, 3]
    with pytest.raises(StackwiseError, match="must not increase"):
        unmask_single_pass(rack, masked_ids([], 5), MASK, [0.2, 0.5])
    with pytest.raises(StackwiseError, match="one mask ratio per stack"):
        unmask_single_pass(rack, masked_ids([], 5), MASK, [0.5])


# --------------------------------------------------------------------------------------------------------- modes


@pytest.mark.parametrize(
    "objective, time, causal, single_pass, mode",
    [
        ("clm", "depth", False, None, "autoregressive"),
        ("mlm", "depth", False, None, "iterative"),
        ("mlm", "depth", True, None, "autoregressive"),
        ("diffusion", "depth", False, None, "single-pass"),
        ("diffusion", "depth", False, False, "iterative"),
        ("diffusion", "input", False, None, "iterative"),
        ("diffusion", "depth", True, None, "autoregressive"),
    ],
)
def test_mode_for_each_objective(objective, time, causal, single_pass, mode):
    assert resolve_mode(objective, time, causal, single_pass) == mode


def test_single_pass_only_for_racks_grown_left_to_right():
    """Right to left and end to end the head was fitted to the last stack only: its readout after an earlier stack
    is untrained, so the single pass would commit tokens from it."""
    for curriculum in ("right-to-left", "end-to-end"):
        assert resolve_mode("diffusion", "depth", False, None, curriculum) == "iterative"
        with pytest.raises(StackwiseError, match="head was fitted"):
            resolve_mode("diffusion", "depth", False, True, curriculum)


@pytest.mark.parametrize(
    "objective, time, causal, single_pass",
    [
        ("clm", "depth", False, True),
        ("clm", "depth", False, False),
        ("mlm", "depth", False, True),
        ("diffusion", "input", False, True),
        ("diffusion", "depth", True, True),
    ],
)
def test_modes_that_do_not_fit_the_objective_are_errors(objective, time, causal, single_pass):
    with pytest.raises(StackwiseError):
        resolve_mode(objective, time, causal, single_pass)


# ----------------------------------------------------------------------------------------------------------- CLI

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def snapshot(root: Path) -> dict[str, str]:
    """Every file in the project, locks and logs included: generation writes nothing at all."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def user_error(result: Result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, result.stderr
    assert needle in result.stderr, result.stderr


def set_objective(project: Project, objective: str) -> None:
    """Switch the (still empty) tiny project to another objective, as if prepared with it (same data)."""
    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, objective=objective)


def hand_trained(project: Project) -> None:
    """Mark every stack trained, as a hand edit of the manifest would: these tests are about the modes, not the
    weights (generate refuses stacks that are not trained)."""
    with project.update() as m:
        for s in m.rack:
            s.state = "trained"


@pytest.fixture
def clm_project(project: Project) -> Project:
    grow(project, "right")
    train_stack(project, project.load().rack[0].id, steps=3, device="cpu")
    return project


def test_cli_autoregressive(clm_project: Project):
    root = clm_project.root
    before = snapshot(root)
    r = cli("generate", "-p", root, "--prompt", "def ", "--max-new-tokens", "8", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["mode"] == "autoregressive" and data["prompt"] == "def "
    assert data["text"].startswith("def ") and data["text"] == "def " + data["completion"]
    assert 1 <= len(data["tokens"]) <= 8 and data["steps"] <= 8 and data["stop"] in ("eos", "length")
    assert len(data["samples"]) == 1 and data["samples"][0]["tokens"] == data["tokens"]
    # Plain output is the text itself; greedy is deterministic.
    plain = cli("generate", "-p", root, "--prompt", "def ", "--max-new-tokens", "8", "--device", "cpu")
    assert plain.exit_code == 0 and plain.stdout == data["text"] + "\n"
    assert snapshot(root) == before


def test_cli_sampling_samples_and_seeds(clm_project: Project):
    root = clm_project.root
    args = ["generate", "-p", root, "--temperature", "2", "--top-k", "100", "--max-new-tokens", "12", "--json"]

    def run(*more: object) -> dict:
        r = cli(*args, *more)
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    a = run("--samples", "3", "--seed", "1", "--ignore-eos")
    assert len(a["samples"]) == 3 and all(len(s["tokens"]) == 12 for s in a["samples"])
    assert a["samples"] == run("--samples", "3", "--seed", "1", "--ignore-eos")["samples"]
    assert a["samples"] != run("--samples", "3", "--seed", "2", "--ignore-eos")["samples"]
    m = clm_project.load()
    assert all(m.tokenizer.eos_id not in s["tokens"] and m.tokenizer.mask_id not in s["tokens"] for s in a["samples"])


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--top-p", "1.5", "--temperature", "1"], "--top-p must be in (0, 1]"),
        (["--length", "10"], "--length does not apply to autoregressive"),
        (["--single-pass"], "objective is clm"),
        (["--prompt", "x " * 40], "longer than model.max_seq_len"),
        (["--max-new-tokens", "100"], "exceeds model.max_seq_len"),
    ],
)
def test_cli_bad_input_is_one_clear_error(clm_project: Project, args, needle):
    before = snapshot(clm_project.root)
    user_error(cli("generate", "-p", clm_project.root, *args), needle)
    assert snapshot(clm_project.root) == before


def test_cli_empty_rack_is_an_error(project: Project):
    before = snapshot(project.root)
    user_error(cli("generate", "-p", project.root), "the rack is empty")
    assert snapshot(project.root) == before


def test_cli_diffusion_single_pass_iterative_and_causal(project: Project):
    set_objective(project, "diffusion")  # time-as-depth: each grown stack gets its schedule ratio
    grow(project, "right")
    grow(project, "right")
    hand_trained(project)
    root = project.root
    m = project.load()
    assert [s.mask_ratio for s in m.rack] == [0.9, 0.15]
    before = snapshot(root)

    one = json.loads(cli("generate", "-p", root, "--prompt", "import", "--length", "20", "--json").stdout)
    assert one["mode"] == "single-pass" and one["steps"] == 2 and one["ratios"] == [0.9, 0.15]
    n_prompt = len(one["prompt_tokens"])
    assert len(one["tokens"]) == 20 - n_prompt and m.tokenizer.mask_id not in one["tokens"]
    assert one["text"].startswith("import")

    it = cli("generate", "-p", root, "--iterative", "--length", "16", "--steps", "4", "--json")
    assert it.exit_code == 0, it.output
    it = json.loads(it.stdout)
    assert it["mode"] == "iterative" and it["steps"] == 4 and len(it["tokens"]) == 16 and it["prompt_tokens"] == []

    ar = json.loads(cli("generate", "-p", root, "--causal", "--max-new-tokens", "5", "--json").stdout)
    assert ar["mode"] == "autoregressive" and len(ar["tokens"]) <= 5 and ar["causal_readout"] == "mask"

    user_error(cli("generate", "-p", root, "--steps", "3"), "--steps does not apply to single-pass")
    user_error(cli("generate", "-p", root, "--prompt", "import", "--length", "1"), "leaves nothing to generate")
    user_error(cli("generate", "-p", root, "--max-new-tokens", "3"), "--max-new-tokens does not apply")
    assert snapshot(root) == before


def test_cli_mlm_iterates_and_refuses_the_single_pass(project: Project):
    set_objective(project, "mlm")
    grow(project, "right")
    hand_trained(project)
    r = cli("generate", "-p", project.root, "--length", "12", "--steps", "3", "--temperature", "1", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["mode"] == "iterative" and data["steps"] == 3 and len(data["tokens"]) == 12
    user_error(cli("generate", "-p", project.root, "--single-pass"), "--single-pass needs a time-as-depth model")


def test_cli_time_as_input_passes_t_and_refuses_causal(project: Project):
    with project.update() as m:
        r = m.recipe
        m.recipe = dataclasses.replace(
            r,
            objective="diffusion",
            diffusion=dataclasses.replace(r.diffusion, time="input"),
            model=dataclasses.replace(r.model, time_embedding=True),
        )
    grow(project, "right")
    hand_trained(project)
    r = cli("generate", "-p", project.root, "--length", "10", "--steps", "2", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["mode"] == "iterative" and data["time_input"] is True and len(data["tokens"]) == 10
    user_error(cli("generate", "-p", project.root, "--causal"), "cannot generate left to right")
