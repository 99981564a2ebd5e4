"""stackwise import: a Hugging Face folder -> a project whose stacks hold its weights; import -> fuse loads in
transformers with the original logits; bad input is one error that writes nothing; grow --after into it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

from stackwise_cli.app import app  # noqa: E402
from stackwise_cli.store.project import Project  # noqa: E402

ENV = {"COLUMNS": "120", "NO_COLOR": "1", "TERM": "dumb", "STACKWISE_DEBUG": None}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RUNNER = CliRunner()
TOL = 1e-4  # fp32: the same arithmetic in another order (our fused q/k/v split, sdpa vs eager)
VOCAB = 300  # the model's embedding rows; the tokenizer below has <= 290
TEXT = ["the quick brown fox jumps over the lazy dog", "a stack of blocks, trained one at a time"]
SET = [
    "--set",
    "data.seq_len=16",
    "--set",
    "data.val_fraction=0.2",
    "--set",
    "data.min_val_sequences=2",
    "--set",
    "data.max_bytes=20000",
    "--set",
    "train.steps=4",
    "--set",
    "train.warmup_steps=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "cache.dtype=fp32",
]
SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "gpt2": ["<|endoftext|>"], "bert": ["[PAD]", "[UNK]", "[SEP]"]}
EOS_KEY = {"llama": {"eos_token": "</s>"}, "gpt2": {"eos_token": "<|endoftext|>"}, "bert": {"sep_token": "[SEP]"}}


def cli(*args: object):
    return RUNNER.invoke(app, [str(a) for a in args], env=ENV)


def user_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output, result.output
    lines = [line for line in ANSI.sub("", result.stderr).splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def write_tokenizer(folder: Path, family: str) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=SPECIALS[family],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 20, trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast"} | EOS_KEY[family]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def hf_model(family: str, tie: bool = False, layers: int = 2, vocab: int = VOCAB, seed: int = 0):
    """A tiny random model of the family, with every weight (norms and biases too) away from its init."""
    torch.manual_seed(seed)
    if family == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, rope_theta=500.0,
            rms_norm_eps=1e-5,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=64, tie_word_embeddings=tie
        )
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, tie_word_embeddings=tie,
        )  # fmt: skip
        model = transformers.BertForMaskedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_hf(folder: Path, family: str, tie: bool = False, shard: bool = False, **kw) -> torch.nn.Module:
    model = hf_model(family, tie, **kw)
    model.save_pretrained(folder, max_shard_size="20KB" if shard else "10GB")
    write_tokenizer(folder, family)
    return model


def logits_of(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def load_fused(folder: Path, family: str):
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    return auto.from_pretrained(folder, attn_implementation="eager").eval()


def tokens_for(vocab: int = 290) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


CASES = [("llama", False, False), ("llama", True, True), ("gpt2", True, False), ("gpt2", False, True)]
CASES += [("bert", True, False), ("bert", False, True)]


@pytest.mark.parametrize(("family", "tie", "shard"), CASES)
def test_import_then_fuse_gives_the_original_logits(tmp_path: Path, family: str, tie: bool, shard: bool) -> None:
    hf_dir = tmp_path / "hf"
    original = save_hf(hf_dir, family, tie, shard)
    assert shard == (hf_dir / "model.safetensors.index.json").exists()
    proj = tmp_path / "proj"
    r = cli("import", hf_dir, "-p", proj, "--json", *SET)
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["stacks"] == [0, 1] and result["architecture"] == original.config.architectures[0]

    m = Project(proj).load()
    assert [s.state for s in m.rack] == ["trained", "trained"]
    assert m.recipe.model.tie_embeddings is tie and m.recipe.model.family == family
    assert m.source is not None and m.source.files["config.json"]
    assert m.recipe.objective == ("mlm" if family == "bert" else "clm")
    eos = {"llama": "</s>", "gpt2": "<|endoftext|>", "bert": "[SEP]"}[family]
    assert m.tokenizer.eos_token == eos and m.tokenizer.eos_id == SPECIALS[family].index(eos)
    # [MASK] only where the objective needs it (bert's tokenizer had none: it went into a spare row).
    assert (m.tokenizer.mask_id is not None) == (family == "bert")
    assert m.recipe.model.vocab_size == VOCAB

    r = cli("fuse", "-p", proj, "--json")
    assert r.exit_code == 0, r.output
    fused = load_fused(proj / "fused", family)
    tokens = tokens_for()
    want, got = logits_of(original, tokens), logits_of(fused, tokens)
    keep = [i for i in range(VOCAB) if i != m.tokenizer.mask_id]  # an added token's row is new
    assert (got[..., keep] - want[..., keep]).abs().max().item() < TOL


def test_llama_gqa_rope_and_eps_come_from_the_config(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    save_hf(hf_dir, "llama", layers=4)
    r = cli("import", hf_dir, "-p", tmp_path / "proj", "--blocks-per-stack", "2", "--json", *SET)
    assert r.exit_code == 0, r.output
    m = Project(tmp_path / "proj").load().recipe
    assert (m.model.n_kv_heads, m.model.rope_theta, m.model.norm_eps, m.model.d_ff) == (2, 500.0, 1e-5, 64)
    assert (m.rack.stacks, m.rack.blocks_per_stack, m.rack.init) == (2, 2, "identity")


@pytest.mark.parametrize("spare", [0, 3])
def test_added_mask_rows_start_at_the_mean_row(tmp_path: Path, spare: int) -> None:
    """bert's tokenizer here has no [MASK]: it is added, in a spare row of the embedding or in a new one."""
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    n = write_tokenizer(hf_dir, "bert")
    original = hf_model("bert", tie=False, vocab=n + spare)
    original.save_pretrained(hf_dir)
    assert cli("import", hf_dir, "-p", tmp_path / "proj", "--json", *SET).exit_code == 0
    from safetensors.torch import load_file

    m = Project(tmp_path / "proj").load()
    assert m.tokenizer.mask_id == n and m.recipe.model.vocab_size == n + max(spare, 1)
    ends = load_file(str(tmp_path / "proj" / "ends.safetensors"))
    embed = original.bert.embeddings.word_embeddings.weight.detach()
    head = original.cls.predictions.decoder.weight.detach()
    assert ends["embed.weight"].shape[0] == n + max(spare, 1)
    assert torch.allclose(ends["embed.weight"][n], embed.mean(0), atol=1e-6)
    assert torch.allclose(ends["head.weight"][n], head.mean(0), atol=1e-6)
    assert torch.equal(ends["embed.weight"][:n], embed[:n])  # every token the tokenizer had keeps its row


# --- bad input: one error line naming the file or key, exit 1, nothing written ----------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama")
    save_hf(folder, "llama", shard=True)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_bad_input_is_one_error_and_writes_nothing(tmp_path: Path, llama_dir: Path) -> None:
    proj = tmp_path / "proj"

    def refused(folder: Path, *needles: str, args: tuple = ()) -> None:
        user_error(cli("import", folder, "-p", proj, *args, *SET), *needles)
        assert not proj.exists(), sorted(p.name for p in proj.iterdir())

    no_config = _copy(llama_dir, tmp_path / "no-config")
    (no_config / "config.json").unlink()
    refused(no_config, "config.json")

    other = _copy(llama_dir, tmp_path / "other")
    _edit_config(other, architectures=["MistralForCausalLM"])
    refused(other, "MistralForCausalLM")

    scaled = _copy(llama_dir, tmp_path / "scaled")
    _edit_config(scaled, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    refused(scaled, "rope_type", "'linear'")
    biased = _copy(llama_dir, tmp_path / "biased")
    _edit_config(biased, attention_bias=True)
    refused(biased, "attention_bias")

    shards = sorted(llama_dir.glob("model-*.safetensors"))
    truncated = _copy(llama_dir, tmp_path / "truncated")
    data = (truncated / shards[1].name).read_bytes()
    (truncated / shards[1].name).write_bytes(data[: len(data) - 100])
    refused(truncated, shards[1].name)

    mismatched = _copy(llama_dir, tmp_path / "mismatched")
    index = json.loads((mismatched / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = shards[-1].name if index["weight_map"][name] != shards[-1].name else shards[0].name
    (mismatched / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(mismatched, "does not match", "model.safetensors.index.json")

    small = tmp_path / "small"
    save_hf(small, "llama", vocab=280)
    refused(small, "tokenizer.json", "280")

    # A project that exists is refused, and left as it was.
    assert cli("import", llama_dir, "-p", proj, "--json", *SET).exit_code == 0
    before = (proj / "stackwise.yaml").read_bytes()
    user_error(cli("import", llama_dir, "-p", proj, *SET), "already exists")
    assert (proj / "stackwise.yaml").read_bytes() == before


def test_a_tensor_with_no_place_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    hf_dir = tmp_path / "hf"
    save_hf(hf_dir, "llama")
    tensors = load_file(str(hf_dir / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    user_error(cli("import", hf_dir, "-p", tmp_path / "proj", *SET), "model.layers.0.self_attn.q_proj.bias")
    assert not (tmp_path / "proj").exists()


def test_set_model_key_that_contradicts_the_checkpoint(tmp_path: Path, llama_dir: Path) -> None:
    user_error(cli("import", llama_dir, "-p", tmp_path / "p", "--set", "model.d_model=64"), "model.d_model", "32")
    user_error(cli("import", llama_dir, "-p", tmp_path / "p", "--blocks-per-stack", "3"), "--blocks-per-stack 3")
    assert not (tmp_path / "p").exists()


def test_prepare_takes_a_hugging_face_folder_as_tokenizer(tmp_path: Path, llama_dir: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {vocab_size: 320, d_model: 32, n_heads: 4, max_seq_len: 32}\n")
    r = cli("prepare", "--recipe", recipe, "--tokenizer", llama_dir, "-p", tmp_path / "p", "--json", *SET)
    assert r.exit_code == 0, r.output
    m = Project(tmp_path / "p").load()
    assert (m.tokenizer.eos_token, m.tokenizer.eos_id, m.tokenizer.mask_id) == ("</s>", 2, None)
    from stackwise_cli.store.shards import read_token_shard

    shard = read_token_shard(tmp_path / "p" / m.data.splits["train"].shards[0].file, expect_seq_len=16)
    assert 2 in shard.tokens.flatten().tolist()  # documents are separated by </s>


# --- growing a pretrained rack -----------------------------------------------------------------------------------


def test_identity_insert_keeps_the_logits_and_trains_only_the_new_stack(tmp_path: Path, llama_dir: Path) -> None:
    proj = tmp_path / "proj"
    assert cli("import", llama_dir, "-p", proj, "--json", *SET, "--set", "train.frozen_dtype=fp32").exit_code == 0
    r = cli("grow", "--after", "0", "--init", "identity", "-p", proj, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["id"] == 2
    m = Project(proj).load()
    assert [s.id for s in m.rack] == [0, 2, 1] and m.rack[1].state == "new"

    # Before training, the grown rack exports (fuse's writer; fuse itself wants every stack trained) to the original
    # function at the new depth.
    from stackwise_cli.model.hf import write_fused
    from stackwise_cli.model.io import load_rack

    write_fused(tmp_path / "grown", load_rack(Project(proj), m), proj / "tokenizer.json", "</s>", m.tokenizer.eos_id)
    original = transformers.AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    fused = load_fused(tmp_path / "grown", "llama")
    assert fused.config.num_hidden_layers == 3
    tokens = tokens_for()
    assert (logits_of(fused, tokens) - logits_of(original, tokens)).abs().max().item() < TOL

    # Only the inserted stack trains: from the cache of stack 0, through the frozen stack 1 and head.
    before = {s.id: s.sha256 for s in m.rack} | {"ends": m.ends.sha256}
    assert cli("cache", "2", "-p", proj, "--json").exit_code == 0
    r = cli("train-stack", "2", "--steps", "3", "-p", proj, "--json")
    assert r.exit_code == 0, r.output
    m = Project(proj).load()
    after = {s.id: s.sha256 for s in m.rack} | {"ends": m.ends.sha256}
    assert after[2] != before[2] and m.stack(2).state == "trained"
    assert {k: after[k] for k in (0, 1, "ends")} == {k: before[k] for k in (0, 1, "ends")}
    user_error(cli("train-stack", "1", "--steps", "3", "-p", proj), "stack 1")  # a pretrained stack stays as it is
    assert cli("fuse", "-p", proj, "--json").exit_code == 0
    assert load_fused(proj / "fused", "llama").config.num_hidden_layers == 3


def test_grow_refuses_the_side_the_curriculum_does_not_grow(tmp_path: Path, llama_dir: Path) -> None:
    proj = tmp_path / "proj"
    assert cli("import", llama_dir, "-p", proj, "--json", *SET).exit_code == 0
    hint = user_error(cli("grow", "--side", "left", "-p", proj), "left-to-right")
    assert "--after" in cli("grow", "--side", "left", "-p", proj).stderr and hint
    user_error(cli("grow", "--after", "7", "-p", proj), "no stack with id 7")
    user_error(cli("grow", "--after", "0", "--side", "right", "-p", proj), "--after")
    r2l = tmp_path / "r2l"
    assert cli("import", llama_dir, "-p", r2l, "--json", *SET, "--set", "curriculum=right-to-left").exit_code == 0
    user_error(cli("grow", "--side", "right", "-p", r2l), "right-to-left")
    user_error(cli("grow", "--after", "0", "-p", r2l), "right-to-left")
    assert [s.id for s in Project(r2l).load().rack] == [0, 1]  # nothing was grown
    r = cli("grow", "--side", "left", "-p", r2l, "--json")
    assert r.exit_code == 0 and Project(r2l).load().ids() == [2, 0, 1]


def test_a_tokenizer_that_fills_the_embedding_gets_no_pad(tmp_path: Path) -> None:
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    n = write_tokenizer(hf_dir, "llama")
    hf_model("llama", vocab=n).save_pretrained(hf_dir)
    r = cli("import", hf_dir, "-p", tmp_path / "proj", "--json", *SET)
    assert r.exit_code == 0, r.output
    m = Project(tmp_path / "proj").load()
    assert (m.recipe.model.vocab_size, m.tokenizer.pad_id, m.tokenizer.mask_id) == (n, None, None)
