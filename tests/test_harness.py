"""``eval --tasks``: lm-evaluation-harness on stackwise models, offline.

Every task here is local: a YAML with ``dataset_path: json`` over a JSONL written by the test (a multiple-choice
task and a rolling-loglikelihood task, as wikitext is). The numbers are checked against direct computations from
the model's own logits: the multiple-choice accuracy, and (clm) the rolling log-likelihood against ``stackwise
eval``'s loss on the same text.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tokenizers import Tokenizer
from typer.testing import CliRunner

from stackwise_cli.app import app
from stackwise_cli.store.project import Project

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None, "HF_HUB_OFFLINE": "1"}


def cli(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def user_error(result, needle: str) -> None:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("error:") for line in result.stderr.splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr


# --- local tasks ------------------------------------------------------------------------------------------------


def write_task(folder: Path, name: str, rows: list[dict], **config) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump({**spec, "test_split": "test", **config}))


def write_mc(folder: Path, name: str, rows: list[dict]) -> None:
    """A multiple-choice task: context ``q``, continuations " " + each of ``choices``, answer ``gold``."""
    write_task(
        folder, name, rows, output_type="multiple_choice", doc_to_text="q", doc_to_choice="choices",
        doc_to_target="gold", metric_list=[{"metric": "acc"}],
    )  # fmt: skip


def write_rolling(folder: Path, name: str, texts: list[str]) -> None:
    """A perplexity task like wikitext: each document's log-likelihood (loglikelihood_rolling)."""
    write_task(
        folder, name, [{"text": t} for t in texts], output_type="loglikelihood_rolling", doc_to_text="",
        doc_to_target="text", metric_list=[{"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
    )  # fmt: skip


def encode_pair(tok: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split of (context, continuation) into tokens: encode the whole, cut at the context's length."""
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    ctx = tok.encode(context, add_special_tokens=False).ids
    return ctx, whole[len(ctx) :]


def mc_rows(tok: Tokenizer, tokens: np.ndarray, n: int) -> list[dict]:
    """Contexts of 16 tokens from ``tokens`` rows; three 4-token choices, the row's own continuation among them."""
    rows = []
    for i in range(n):
        q = tok.decode(tokens[i, :16].tolist()).rstrip()
        choices = [tok.decode(tokens[(i + j) % len(tokens), 16:20].tolist()).strip() for j in range(3)]
        rows.append({"q": q, "choices": choices, "gold": i % 3})
    return rows


@torch.no_grad()
def clm_logprob(rack, tok: Tokenizer, context: str, continuation: str) -> float:
    ctx, cont = encode_pair(tok, context, continuation)
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(rack(ids, causal=True)[0].float(), dim=-1)  # position j predicts token j + 1
    return float(logp[len(ctx) - 1 : -1].gather(-1, torch.tensor(cont)[:, None]).sum())


def accuracy(rows: list[dict], logprob) -> float:
    right = [int(np.argmax([logprob(r["q"], " " + c) for c in r["choices"]])) == r["gold"] for r in rows]
    return sum(right) / len(right)


# --- projects ---------------------------------------------------------------------------------------------------


def trained(project: Project, objective: str, steps: int = 10) -> Project:
    from stackwise_cli.train.grow import grow
    from stackwise_cli.train.stack import train_stack

    with project.update() as m:
        m.recipe = dataclasses.replace(m.recipe, objective=objective)
    grow(project, "right")
    train_stack(project, 0, steps=steps, device="cpu")
    return project


def val_starting_at_eos(project: Project, tok: Tokenizer, n: int = 8) -> list[str]:
    """Rewrite the val split as ``n`` of its sequences with the first token replaced by end-of-text, and return
    each one's text after it: the harness conditions a document on end-of-text, so the harness's rolling
    log-likelihood of these texts and eval's loss on these sequences score the same predictions."""
    from stackwise_cli.evaluate.eval import val_tokens
    from stackwise_cli.store.manifest import ShardEntry
    from stackwise_cli.store.shards import write_token_shard

    m = project.load()
    eos = m.tokenizer.eos_id
    rows, texts = [], []
    for row in val_tokens(project, m, "val", None):
        body = row[1:].tolist()
        text = tok.decode(body, skip_special_tokens=False)
        if eos not in body and tok.encode(text, add_special_tokens=False).ids == body:  # round-trips
            rows.append([eos, *body])
            texts.append(text)
        if len(rows) == n:
            break
    assert len(rows) == n
    with project.update() as m:
        split = m.data.splits["val"]
        file = split.shards[0].file
        sha = write_token_shard(project.path(file), np.array(rows), 0)
        split.shards = [ShardEntry(file=file, sequences=n, tokens=n * len(rows[0]), sha256=sha)]
        split.sequences, split.tokens = n, n * len(rows[0])
    return texts


@pytest.fixture(scope="module")
def clm(tmp_path_factory, _prepared):
    """A trained one-stack clm rack (not fused), its tokenizer, the local tasks, and the numbers to check."""
    import shutil

    from stackwise_cli.evaluate.eval import evaluate, val_tokens

    root = tmp_path_factory.mktemp("clm") / "proj"
    shutil.copytree(_prepared, root)
    project = trained(Project(root), "clm", steps=5)
    m = project.load()
    tok = Tokenizer.from_file(str(project.path(m.tokenizer.file)))
    rows = mc_rows(tok, val_tokens(project, m, "val", None), 9)
    texts = val_starting_at_eos(project, tok)
    tasks = tmp_path_factory.mktemp("tasks")
    write_mc(tasks, "tiny_mc", rows)
    write_rolling(tasks, "tiny_roll", texts)
    e = evaluate(project, device="cpu")
    return project, tok, rows, texts, tasks, e


def rolling_loglikelihood(metrics: dict, texts: list[str]) -> float:
    """The summed log-likelihood of the documents, from the byte perplexity: exp(-sum ll / sum bytes)."""
    return -math.log(metrics["byte_perplexity"]) * sum(len(t.encode("utf-8")) for t in texts)


def test_clm_rack_then_fused_match_direct_accuracy_and_eval_loss(clm):
    from stackwise_cli.fuse import fuse
    from stackwise_cli.model.io import load_current_rack

    project, tok, rows, texts, tasks, e = clm
    _, rack = load_current_rack(project)
    rack.eval()
    want_acc = accuracy(rows, lambda c, x: clm_logprob(rack, tok, c, x))
    eval_ll = -e.loss * e.tokens  # eval's mean next-token loss over its scored positions
    assert e.tokens == len(texts) * 31

    r = cli("eval", "-p", project.root, "--tasks", "tiny_mc,tiny_roll", "--include-path", tasks, "--json")
    assert r.exit_code == 0, r.output
    unfused = json.loads(r.stdout)
    assert (unfused["model"], unfused["adapter"], unfused["scoring"]) == ("rack", "stackwise", "exact")
    assert unfused["metrics"]["tiny_mc"]["acc"] == pytest.approx(want_acc)
    assert rolling_loglikelihood(unfused["metrics"]["tiny_roll"], texts) == pytest.approx(eval_ll, rel=1e-5)
    assert unfused["requests"] == 3 * len(rows) + len(texts)

    fuse(project)
    r = cli("eval", "-p", project.root, "--tasks", "tiny_mc,tiny_roll", "--include-path", tasks, "--json")
    assert r.exit_code == 0, r.output
    hf = json.loads(r.stdout)
    assert (hf["model"], hf["adapter"]) == ("fused", "hf")  # the harness's own HFLM on fused/
    assert hf["metrics"]["tiny_mc"]["acc"] == pytest.approx(want_acc)
    assert rolling_loglikelihood(hf["metrics"]["tiny_roll"], texts) == pytest.approx(eval_ll, rel=1e-5)

    # Both runs are recorded: the harness's JSON in eval/, the headline metrics in the manifest.
    m = project.load()
    assert [h.adapter for h in m.harness] == ["stackwise", "hf"]
    assert m.harness[-1].metrics == hf["metrics"] and m.harness[-1].tasks == ["tiny_mc", "tiny_roll"]
    saved = json.loads(project.path(hf["file"]).read_text())
    assert saved["results"]["tiny_mc"]["acc,none"] == hf["metrics"]["tiny_mc"]["acc"]
    assert saved["stackwise"]["adapter"] == "hf"


def test_diffusion_rack_scores_single_token_choices_exactly_and_bounds_perplexity(project: Project):
    """A one-token continuation has one mask to draw (k = L = 1): the Monte-Carlo estimate is exactly log p of the
    token under a [MASK] after the context, which the test computes from the rack's logits."""
    from stackwise_cli.evaluate.eval import val_tokens
    from stackwise_cli.model.io import load_current_rack

    trained(project, "diffusion", steps=5)
    m = project.load()
    tok = Tokenizer.from_file(str(project.path(m.tokenizer.file)))
    _, rack = load_current_rack(project)
    rack.eval()
    tokens = val_tokens(project, m, "val", None)
    words = [w for w in ("the", "a", "of", "and", "in", "is", "to", "for", "if", "return")]
    rows = []
    for i in range(10):
        q = tok.decode(tokens[i, :12].tolist()).rstrip()
        single = [w for w in words if len(encode_pair(tok, q, " " + w)[1]) == 1]
        assert len(single) >= 3, single
        rows.append({"q": q, "choices": single[i % 3 : i % 3 + 3], "gold": i % 3})

    @torch.no_grad()
    def logprob(context: str, continuation: str) -> float:
        ctx, cont = encode_pair(tok, context, continuation)
        ids = torch.tensor([ctx + [m.tokenizer.mask_id]])
        return float(torch.log_softmax(rack(ids, causal=False)[0, -1].float(), dim=-1)[cont[0]])

    tasks = project.root.parent / "tasks"
    tasks.mkdir()
    write_mc(tasks, "tiny_mc1", rows)
    write_rolling(tasks, "tiny_roll", [tok.decode(t.tolist()) for t in tokens[:4]])
    r = cli("eval", "-p", project.root, "--tasks", "tiny_mc1,tiny_roll", "--include-path", tasks, "--json",
            "--mc-samples", 4)  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert (data["adapter"], data["scoring"], data["settings"]["mc_samples"]) == ("stackwise", "bound", 4)
    assert data["metrics"]["tiny_mc1"]["acc"] == pytest.approx(accuracy(rows, logprob))
    # A bound on the perplexity: finite, and worse than nothing can be (> 1 per byte).
    assert 1 < data["metrics"]["tiny_roll"]["byte_perplexity"] < math.inf
    assert project.load().harness[-1].scoring == "bound"


# --- the Monte-Carlo estimator and generation, on a random rack ------------------------------------------------

V = 64


def random_rack(seed: int = 0, **model):
    from stackwise_cli.model.config import AttentionConfig, ModelConfig
    from stackwise_cli.model.model import Ends, Rack, Stack

    g = torch.Generator().manual_seed(seed)
    cfg = ModelConfig(vocab_size=V, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32, **model)
    ends = Ends(cfg)
    ends.init_weights(g)
    stacks = [Stack(cfg, 1, AttentionConfig()) for _ in range(2)]
    for s in stacks:
        s.init_weights("random", 2, g)
    return Rack(cfg, ends, stacks, [0, 1]).eval()


class _Tok:
    """Ids are characters: 'a' = 10, ..."""

    def encode(self, s, add_special_tokens=False):
        return type("E", (), {"ids": [ord(c) - 87 for c in s]})()

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i + 87) if i >= 10 else "|" for i in ids)


def lm(objective: str, rack, **kw):
    from stackwise_cli.evaluate.harness import StackwiseLM

    args = dict(rack=rack, tokenizer=_Tok(), objective=objective, eos_id=0, mask_id=1, vocab=V, max_length=32)
    return StackwiseLM(**{**args, **kw})


@torch.no_grad()
def test_masked_estimate_is_the_elbo_by_enumeration_and_batch_independent():
    """The estimator's expectation, enumerated over every k and every k-subset of a 3-token continuation:
    E = sum_k 1/L sum_{|S| = k} 1/C(L, k) (L / k) sum_{i in S} log p(x_i | context, x outside S masked)."""
    rack = random_rack(init_std=0.3)  # peaked: log-probs from -1 to -5, so a position off by one shows
    ctx, cont = [12, 13, 14, 15], [20, 21, 22]
    L = len(cont)
    exact = 0.0
    for k in range(1, L + 1):
        for S in itertools.combinations(range(L), k):
            x = torch.tensor([ctx + cont])
            pos = [len(ctx) + i for i in S]
            x[0, pos] = 1
            logp = torch.log_softmax(rack(x, causal=False)[0].float(), dim=-1)
            term = sum(float(logp[p, (ctx + cont)[p]]) for p in pos)
            exact += (1 / L) * (1 / math.comb(L, k)) * (L / k) * term
    est, _ = lm("diffusion", rack, mc_samples=1000, batch_size=512)._masked([(ctx, cont)])[0]
    assert est == pytest.approx(exact, rel=0.03), (est, exact)  # measured: sd 0.1 of -13.4 over seeds
    # Batch independence: the masks are a function of (seed, the request's tokens), not of its batch.
    few = lm("diffusion", rack, mc_samples=8, batch_size=3)
    alone = few._masked([(ctx, cont)])[0]
    together = few._masked([([12, 12, 12], [30, 31]), (ctx, cont), ([9] * 6, [40])])[1]
    assert alone == pytest.approx(together)
    # is_greedy (lambada's acc): every continuation token is the argmax when the whole continuation is masked.
    x = torch.tensor([ctx + [1] * L])
    logits = rack(x, causal=False)[0, len(ctx) :].float()
    logits[:, 1] = -math.inf  # never [MASK]
    best = logits.argmax(-1).tolist()
    assert few._masked([(ctx, best)])[0][1] is True
    assert few._masked([(ctx, [*best[:-1], (best[-1] + 1) % V])])[0][1] is False


@torch.no_grad()
def test_clm_adapter_equals_direct_logits_with_padding_and_truncation():
    rack = random_rack(seed=1)
    model = lm("clm", rack, batch_size=2)
    pairs = [([10, 11, 12], [13, 14]), ([10] * 40, [20]), ([15], [16, 17, 18, 19])]  # the second is truncated
    got = model._exact(pairs)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        ids = (ctx + cont)[-33:]
        logp = torch.log_softmax(rack(torch.tensor([ids[:-1]]), causal=True)[0].float(), dim=-1)
        want = sum(float(logp[len(ids) - 1 - len(cont) + j, t]) for j, t in enumerate(cont))
        assert ll == pytest.approx(want, abs=1e-4)


@torch.no_grad()
def test_generate_until_is_greedy_decoding_and_iterative_unmasking_batched():
    from lm_eval.api.instance import Instance

    from stackwise_cli.evaluate.generate import sample_autoregressive, unmask_iterative

    rack = random_rack(seed=2, init_std=0.3)
    prompts = ["abc", "bcd", "abcd"]
    reqs = [Instance("generate_until", {}, (p, {"until": ["zzz"], "max_gen_toks": 5}), 0) for p in prompts]
    clm_out = lm("clm", rack, batch_size=4).generate_until(reqs)
    diff_out = lm("diffusion", rack, batch_size=4).generate_until(reqs)
    tok = _Tok()
    for p, a, d in zip(prompts, clm_out, diff_out):
        ids = tok.encode(p).ids
        want = sample_autoregressive(rack, ids, 5, vocab_size=V, banned=(1,)).tokens[0]
        want = want[: want.index(0)] if 0 in want else want
        assert a == tok.decode(want)
        x = torch.tensor([ids + [1] * 5])
        made = unmask_iterative(rack, x, 1, 5, vocab_size=V).ids[0, len(ids) :].tolist()
        made = made[: made.index(0)] if 0 in made else made
        assert d == tok.decode(made)


# --- bad input --------------------------------------------------------------------------------------------------


def test_bad_input_is_one_error_line_and_changes_nothing(project: Project, tmp_path: Path):
    trained(project, "mlm", steps=2)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_rolling(tasks, "tiny_roll", ["some text to score"])
    write_rolling(tasks, "gone", ["its data file is deleted below"])
    (tasks / "gone.jsonl").unlink()
    root = project.root
    before = snapshot(root)
    user_error(cli("eval", "-p", root, "--tasks", "hellaswagg"), "unknown task(s) hellaswagg")
    user_error(cli("eval", "-p", root, "--tasks", "arc_easy"), "task arc_easy: its dataset allenai/ai2_arc")
    r = cli("eval", "-p", root, "--tasks", "arc_easy")
    assert "not on this machine, and this machine is offline" in r.stderr
    r = cli("eval", "-p", root, "--tasks", "gone", "--include-path", tasks)
    user_error(r, "task gone: its dataset json could not be loaded")  # a missing local file is not "offline"
    user_error(
        cli("eval", "-p", root, "--tasks", "tiny_roll", "--include-path", tasks),
        "an mlm rack defines no likelihood of a document",
    )
    user_error(cli("eval", "-p", root, "--limit", "3"), "--limit applies to lm-evaluation-harness runs")
    user_error(cli("eval", "-p", root, "--tasks", "tiny_roll", "--set", "eval.batch_size=4"), "--set does not apply")
    assert snapshot(root) == before


# --- encoders: the exported BertForMaskedLM fine-tuned for classification ---------------------------------------


def test_exported_bert_fine_tunes_for_sequence_classification(project: Project, tmp_path: Path):
    """docs/harness.md's recipe: BertForSequenceClassification.from_pretrained(fused/, num_labels=2) on a CSV of
    (text, label). The task (does the text say "good" or "bad") is one a working pipeline learns in a few steps."""
    import csv

    from transformers import AutoTokenizer, BertForSequenceClassification

    from stackwise_cli.data.tokenizer import EOS
    from stackwise_cli.model.config import ModelConfig
    from stackwise_cli.model.hf import write_fused
    from stackwise_cli.model.model import Ends, Rack, Stack

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    cfg = ModelConfig(family="bert", vocab_size=512, d_model=32, n_heads=4, d_ff=64, max_seq_len=32)
    ends, stack = Ends(cfg), Stack(cfg, 1)
    ends.init_weights(g)
    stack.init_weights("random", 1, g)
    rack = Rack(cfg, ends, [stack], [0])
    m = project.load()
    fused = tmp_path / "fused"
    write_fused(fused, rack, project.path(m.tokenizer.file), EOS, m.tokenizer.eos_id, bidirectional=True)

    rows = [(f"this one is {w} {n}", int(w == "good")) for n in range(16) for w in ("good", "bad")]
    with (tmp_path / "train.csv").open("w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *rows])

    tok = AutoTokenizer.from_pretrained(fused)
    model = BertForSequenceClassification.from_pretrained(fused, num_labels=2)
    with (tmp_path / "train.csv").open() as f:
        data = list(csv.DictReader(f))
    batch = tok([r["text"] for r in data], padding=True, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in data])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    first = None
    for _ in range(40):
        loss = model(**batch, labels=labels).loss
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1)
    assert float(loss) < 0.5 * first and float((pred == labels).float().mean()) == 1.0
