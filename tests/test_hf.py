"""Exported model = Hugging Face model: the fused folder loads in transformers with the rack's logits."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from stackwise_cli.errors import DataError
from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.hf import BLOCK_TO_HF, hf_config, hf_state_dict, write_fused
from stackwise_cli.model.model import Ends, Rack, Stack
from stackwise_cli.store.files import TMP_MARK, sha256_file

# No network: everything is loaded from the folder the test writes. Set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")

EOS = "<|endoftext|>"
TOL = 1e-4
DETECT = 0.1  # a mapping mistake must move some logit by at least this much (1000x TOL)
SENTENCE = "The quick brown fox jumps over the lazy dog, twice!"


def _tiny_bpe(folder: Path, specials: list[str]) -> Path:
    """A byte-level BPE tokenizer with < 300 tokens and these special tokens (ids 0, 1, ...), trained in ms."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=290,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = ["the quick brown fox jumps over the lazy dog", "a stack of blocks, trained one at a time"] * 20
    tok.train_from_iterator(text, trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    assert [tok.token_to_id(t) for t in specials] == list(range(len(specials))) and tok.get_vocab_size() <= 300
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _tiny_bpe(tmp_path_factory.mktemp("tok"), [EOS])


def assert_every_mistake_shows(model, good: dict, mistakes: dict, diff) -> None:
    """Each wrong state dict in ``mistakes`` moves some logit by more than DETECT; the right one stays within TOL."""
    try:
        for what, sd in mistakes.items():
            model.load_state_dict(sd, strict=False)
            assert diff() > DETECT, what
    finally:
        model.load_state_dict(good, strict=False)
    assert diff() < TOL


def random_rack(cfg: ModelConfig) -> Rack:
    """Two stacks (1 and 2 blocks, ids 5 and 9) so that global layer numbering crosses a stack boundary."""
    ends = Ends(cfg)
    ends.init_weights()
    stacks = [Stack(cfg, n) for n in (1, 2)]
    for s in stacks:
        s.init_weights("random", total_blocks=3)
    return Rack(cfg, ends, stacks, [5, 9]).eval()


def make_rack(tie: bool, n_kv_heads: int, seed: int = 0) -> Rack:
    """Two stacks (1 and 2 blocks) so that global layer numbering crosses a stack boundary.

    init_std is 5x the usual 0.02: with tiny weights q.k is near zero, attention is near uniform, and a wrong
    rotary layout or a swapped q would barely move the logits; larger weights make every tensor matter.
    """
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=300,
        d_model=64,
        n_heads=4,
        n_kv_heads=n_kv_heads,
        d_ff=160,
        max_seq_len=64,
        tie_embeddings=tie,
        init_std=0.1,
    )
    rack = random_rack(cfg)
    # Norms away from 1 and distinct per norm, so swapping the two norms of a layer (or the final norm) shows.
    with torch.no_grad():
        for name, p in rack.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return rack


def interleave_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's output rows from (first half, second half) to interleaved pairs, as HF's
    convert_llama_weights_to_hf.permute does the other way round."""
    out_dim, in_dim = w.shape
    return w.view(n_heads, 2, out_dim // n_heads // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def max_diff(hf_model: torch.nn.Module, rack: Rack, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return (hf_model(tokens).logits - rack(tokens)).abs().max().item()


CASES = [
    pytest.param((False, 2), id="untied-gqa"),
    pytest.param((True, 2), id="tied-gqa"),
    pytest.param((False, 4), id="untied-mha"),
    pytest.param((True, 4), id="tied-mha"),
]


@pytest.fixture(scope="module", params=CASES)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tokenizer_file: Path):
    """(rack, fused folder, returned sha256, loaded HF model, loading info), once per case."""
    tie, n_kv = request.param
    rack = make_rack(tie, n_kv)
    out = tmp_path_factory.mktemp("proj") / "fused"
    sha = write_fused(out, rack, tokenizer_file, EOS, 0)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    return rack, out, sha, model.eval(), info


def test_loads_as_llama_with_the_same_logits(exported) -> None:
    rack, _, _, model, _ = exported
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_key_value_heads == rack.cfg.kv_heads
    assert model.config.num_hidden_layers == 3
    assert model.config.tie_word_embeddings == rack.cfg.tie_embeddings
    assert model.config.rope_parameters["rope_theta"] == rack.cfg.rope_theta
    assert next(model.parameters()).dtype == torch.float32
    tokens = torch.randint(0, rack.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    assert max_diff(model, rack, tokens) < TOL


def test_mapping_covers_every_tensor(exported) -> None:
    rack, _, _, model, info = exported
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = hf_state_dict(rack)
    theirs = model.state_dict()
    # Every rack parameter is exported exactly once...
    assert sum(t.numel() for t in ours.values()) == sum(p.numel() for p in rack.parameters())
    # ...and every HF tensor was loaded from it (none left at random init); tied HF models list lm_head.weight too.
    expected = set(ours) | ({"lm_head.weight"} if rack.cfg.tie_embeddings else set())
    assert set(theirs) == expected
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k
    if rack.cfg.tie_embeddings:
        assert torch.equal(theirs["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_swapped_mapping_is_detected(exported) -> None:
    """The parity check is not vacuous: each plausible mapping mistake moves the logits well past the tolerance."""
    rack, _, _, model, _ = exported
    tokens = torch.randint(0, rack.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    good = hf_state_dict(rack)

    def swapped(a: str, b: str) -> dict[str, torch.Tensor]:
        sd = dict(good)
        sd[a], sd[b] = good[b], good[a]
        return sd

    mistakes = {
        # layers 0 and 1 come from different stacks: a wrong global layer order, tensor by tensor
        **{f"layer order: {s}": swapped(f"model.layers.0.{s}", f"model.layers.1.{s}") for s in BLOCK_TO_HF.values()},
        "norms": swapped("model.layers.1.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"),
        "gate/up": swapped("model.layers.2.mlp.gate_proj.weight", "model.layers.2.mlp.up_proj.weight"),
    }
    if rack.cfg.kv_heads == rack.cfg.n_heads:  # q and k have the same shape only without GQA
        mistakes["q/k"] = swapped("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight")
    # The permutation Meta-checkpoint converters apply to q and k (interleaved pairs -> rotate-half). Our rotary
    # layout already is rotate-half, so applying it must break parity; this is what shows none is needed.
    for g in range(3):
        sd = dict(good)
        for proj, heads in (("q", rack.cfg.n_heads), ("k", rack.cfg.kv_heads)):
            key = f"model.layers.{g}.self_attn.{proj}_proj.weight"
            sd[key] = interleave_rows(good[key], heads)
        mistakes[f"interleaved rope, layer {g}"] = sd
    assert_every_mistake_shows(model, good, mistakes, lambda: max_diff(model, rack, tokens))


def test_tokenizer_matches_the_tokenizers_file(exported, tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    _, out, _, _, _ = exported
    want = Tokenizer.from_file(str(tokenizer_file)).encode(SENTENCE).ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(SENTENCE)["input_ids"] == want
    assert hf_tok.eos_token == EOS and hf_tok.eos_token_id == 0
    assert hf_tok.decode(want) == SENTENCE


def test_fused_folder_contents(exported) -> None:
    rack, out, sha, _, _ = exported
    assert {p.name for p in out.iterdir()} == {
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    assert sha == hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert not [p for p in out.parent.iterdir() if TMP_MARK in p.name]
    pad = json.loads((out / "tokenizer.json").read_text())["added_tokens"][-1]  # [PAD], appended by the export
    assert pad["content"] == "[PAD]"
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(hf_config(rack.cfg, 3, 0, pad["id"])))
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 0


def test_rewrite_replaces_and_failed_write_leaves_old_folder(tmp_path: Path, tokenizer_file: Path) -> None:
    out = tmp_path / "fused"
    first = write_fused(out, make_rack(False, 2, seed=0), tokenizer_file, EOS, 0)
    second = write_fused(out, make_rack(False, 2, seed=1), tokenizer_file, EOS, 0)
    assert first != second
    with pytest.raises(DataError, match="has id"):
        write_fused(out, make_rack(False, 2, seed=2), tokenizer_file, EOS, 7)
    with pytest.raises(DataError, match="missing"):
        write_fused(out, make_rack(False, 2, seed=2), tmp_path / "nope.json", EOS, 0)
    # The failed writes touched nothing: the second export is still there, complete, and no temporary is left.
    assert sha256_file(out / "model.safetensors") == second
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]


# ---------------------------------------------------------------------------------------------------------------
# GPT-2 (GPT2LMHeadModel) and BERT (BertForMaskedLM)

MASK = "[MASK]"


@pytest.fixture(scope="module")
def mask_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``tokenizer_file``, with the masked-LM objective's [MASK] special token."""
    return _tiny_bpe(tmp_path_factory.mktemp("tokm"), [EOS, MASK])


def make_family_rack(family: str, tie: bool, seed: int = 0) -> Rack:
    """Two stacks (1 and 2 blocks), weights 5x the usual scale, and every norm weight and bias away from its init
    (1 and 0), distinct per tensor, so that a swapped or dropped one moves the logits."""
    torch.manual_seed(seed)
    cfg = ModelConfig(
        family=family,
        vocab_size=300,
        d_model=64,
        n_heads=4,
        d_ff=160,
        max_seq_len=64,
        tie_embeddings=tie,
        init_std=0.1,
        norm_eps=1e-6 if family == "gpt2" else 1e-12,
    )
    rack = random_rack(cfg)
    with torch.no_grad():
        for name, p in rack.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    return rack


FAMILY_CASES = [
    pytest.param(("gpt2", False), id="gpt2-untied"),
    pytest.param(("gpt2", True), id="gpt2-tied"),
    pytest.param(("bert", False), id="bert-untied"),
    pytest.param(("bert", True), id="bert-tied"),
]
HF_CLASS = {"gpt2": ("GPT2LMHeadModel", "AutoModelForCausalLM"), "bert": ("BertForMaskedLM", "AutoModelForMaskedLM")}


def family_diff(model: torch.nn.Module, rack: Rack, tokens: torch.Tensor) -> float:
    causal = rack.cfg.family != "bert"
    with torch.no_grad():
        if causal:
            theirs = model(tokens).logits
        else:
            theirs = model(tokens, attention_mask=torch.ones_like(tokens)).logits
        return (theirs - rack(tokens, causal=causal)).abs().max().item()


@pytest.fixture(scope="module", params=FAMILY_CASES)
def exported_family(request, tmp_path_factory: pytest.TempPathFactory, mask_tokenizer_file: Path):
    family, tie = request.param
    rack = make_family_rack(family, tie)
    out = tmp_path_factory.mktemp(family) / "fused"
    write_fused(out, rack, mask_tokenizer_file, EOS, 0)
    auto = getattr(transformers, HF_CLASS[family][1])
    model, info = auto.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    return rack, out, model.eval(), info


def test_family_loads_as_its_hf_class_with_the_same_logits(exported_family) -> None:
    rack, _, model, info = exported_family
    assert type(model).__name__ == HF_CLASS[rack.cfg.family][0]
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.tie_word_embeddings == rack.cfg.tie_embeddings
    tokens = torch.randint(0, rack.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1))
    assert family_diff(model, rack, tokens) < TOL


def test_family_mapping_covers_every_tensor(exported_family) -> None:
    rack, _, model, _ = exported_family
    ours = hf_state_dict(rack)
    theirs = model.state_dict()
    dup = rack.cfg.vocab_size if rack.cfg.family == "bert" else 0  # BERT's decoder bias is written twice
    assert sum(t.numel() for t in ours.values()) == sum(p.numel() for p in rack.parameters()) + dup
    tied = {"gpt2": {"lm_head.weight"}, "bert": {"cls.predictions.decoder.weight"}}[rack.cfg.family]
    assert set(theirs) == set(ours) | (tied if rack.cfg.tie_embeddings else set())
    for k, v in ours.items():
        assert torch.equal(theirs[k], v), k


def test_family_swapped_mapping_is_detected(exported_family) -> None:
    rack, _, model, _ = exported_family
    tokens = torch.randint(0, rack.cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    good = hf_state_dict(rack)
    d = rack.cfg.d_model

    def changed(key: str, fn) -> dict[str, torch.Tensor]:
        return {**good, key: fn(good[key])}

    def swapped(a: str, b: str) -> dict[str, torch.Tensor]:
        return {**good, a: good[b], b: good[a]}

    if rack.cfg.family == "gpt2":
        layer = "transformer.h.1."
        mistakes = {
            "c_proj not transposed": changed(layer + "attn.c_proj.weight", lambda w: w.t().contiguous()),
            "c_attn as k, q, v": changed(
                layer + "attn.c_attn.weight",
                lambda w: torch.cat((w[:, d : 2 * d], w[:, :d], w[:, 2 * d :]), 1),  # (in, 3 d): q, k swapped
            ),
            "ln_1/ln_2": swapped(layer + "ln_1.bias", layer + "ln_2.bias"),
            "layer order": swapped("transformer.h.0.mlp.c_fc.weight", "transformer.h.1.mlp.c_fc.weight"),
        }
    else:
        layer = "bert.encoder.layer.1."
        mistakes = {
            "post-norms": swapped(layer + "attention.output.LayerNorm.bias", layer + "output.LayerNorm.bias"),
            "q/k": swapped(layer + "attention.self.query.weight", layer + "attention.self.key.weight"),
            "embedding norm": changed("bert.embeddings.LayerNorm.bias", torch.zeros_like),
            "decoder bias": changed("cls.predictions.decoder.bias", torch.zeros_like),
            "layer order": swapped(
                "bert.encoder.layer.0.output.dense.weight", "bert.encoder.layer.1.output.dense.weight"
            ),
        }
    assert_every_mistake_shows(model, good, mistakes, lambda: family_diff(model, rack, tokens))


def test_family_tokenizer_and_special_tokens(exported_family, mask_tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    rack, out, _, _ = exported_family
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(SENTENCE)["input_ids"] == Tokenizer.from_file(str(mask_tokenizer_file)).encode(SENTENCE).ids
    assert hf_tok.eos_token_id == 0
    if rack.cfg.family == "bert":
        assert hf_tok.mask_token == MASK and hf_tok.mask_token_id == 1
    else:
        assert json.loads((out / "tokenizer_config.json").read_text()).get("mask_token") is None


def test_export_problem_names_what_cannot_be_exported() -> None:
    from stackwise_cli.model.config import AttentionConfig
    from stackwise_cli.model.hf import export_problem

    gqa, mha = AttentionConfig(), AttentionConfig(kind="mha")
    assert export_problem(gqa) is None  # the default llama, causal
    assert export_problem(gqa, ModelConfig(n_kv_heads=2)) is None
    assert export_problem(mha, ModelConfig(family="gpt2")) is None
    assert export_problem(mha, ModelConfig(family="bert"), bidirectional=True) is None
    refused = {
        "bidirectionally": (gqa, ModelConfig(), True),
        "causal": (mha, ModelConfig(family="bert"), False),
        "modernbert": (gqa, ModelConfig(family="modernbert"), True),
        "time_embedding": (gqa, ModelConfig(time_embedding=True), False),
        "'mla'": (AttentionConfig(kind="mla"), ModelConfig(), False),
        "'linear'": (AttentionConfig(kind="linear"), ModelConfig(), False),
        "sliding window": (AttentionConfig(window=8), ModelConfig(), False),
        "n_kv_heads": (gqa, ModelConfig(family="gpt2", n_kv_heads=2), False),
        "model.mlp 'swiglu'": (gqa, ModelConfig(family="llama", mlp="gelu"), False),
        "model.bias": (mha, ModelConfig(family="gpt2", bias=False), False),
    }
    for what, (attn, model, bidirectional) in refused.items():
        problem = export_problem(attn, model, bidirectional=bidirectional)
        assert problem is not None and what in problem, (what, problem)


# ---------------------------------------------------------------------------------------------------------------
# Padding: the export pads batches with a token that is no real token


PAD = "[PAD]"


@pytest.fixture(scope="module")
def project_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """As ``prepare`` trains it: <|endoftext|>, [MASK] and [PAD] are ids 0, 1 and 2."""
    return _tiny_bpe(tmp_path_factory.mktemp("tokp"), [EOS, MASK, PAD])


def _pads(out: Path) -> transformers.PreTrainedTokenizerBase:
    """The exported tokenizer, after checking that batch padding works and pads with its pad token."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    batch = hf_tok(["a", "a b c"], padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert len(ids[0]) == len(ids[1]) > 1 and mask[0][-1] == 0 and ids[0][-1] == hf_tok.pad_token_id
    return hf_tok


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_export_pads_with_pad_not_end_of_text(tmp_path: Path, project_tokenizer_file: Path, family: str) -> None:
    rack = make_rack(False, 2) if family == "llama" else make_family_rack(family, tie=False)
    out = tmp_path / "fused"
    write_fused(out, rack, project_tokenizer_file, EOS, 0)
    hf_tok = _pads(out)
    assert hf_tok.pad_token == PAD and hf_tok.pad_token_id == 2 != hf_tok.eos_token_id
    assert (out / "tokenizer.json").read_bytes() == project_tokenizer_file.read_bytes()  # nothing to add
    config = json.loads((out / "config.json").read_text())
    assert config["pad_token_id"] == 2  # BERT's padding_idx row: [PAD]'s, which no training step touched
    auto = transformers.AutoModelForMaskedLM if family == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_pretrained(out, dtype=torch.float32).eval()
    if family != "gpt2":  # GPT-2 has no padding_idx
        emb = model.get_input_embeddings()
        assert emb.padding_idx == 2
    if family == "llama":  # right padding changes nothing at the real positions of a causal model
        batch = hf_tok(["a", "a b c"], padding=True, return_tensors="pt")
        with torch.no_grad():
            padded = model(**batch).logits[0, :1]
            alone = model(hf_tok(["a"], return_tensors="pt")["input_ids"]).logits[0]
        assert (padded - alone).abs().max().item() < TOL


def test_export_of_a_tokenizer_without_pad(tmp_path: Path, tokenizer_file: Path) -> None:
    from tokenizers import Tokenizer

    from stackwise_cli.model.hf import export_pad

    # A spare embedding row (the tokenizer has fewer ids than the model): [PAD] goes there, no trained id moves.
    out = tmp_path / "spare"
    rack = make_family_rack("bert", tie=False)
    write_fused(out, rack, tokenizer_file, EOS, 0)
    hf_tok = _pads(out)
    source = Tokenizer.from_file(str(tokenizer_file))
    bound = max(source.get_vocab(with_added_tokens=True).values()) + 1
    assert hf_tok.pad_token == PAD and hf_tok.pad_token_id == bound < rack.cfg.vocab_size
    assert hf_tok(SENTENCE)["input_ids"] == source.encode(SENTENCE).ids
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == bound

    # No spare row: pad with end-of-text (batch padding still works), and BERT's config names no pad id, so HF
    # does not freeze the end-of-text row (its default, 0, is our end-of-text id).
    full = Tokenizer.from_file(str(tokenizer_file))
    full.add_tokens([f"w{i}" for i in range(rack.cfg.vocab_size - bound)])
    full_file = tmp_path / "full.json"
    full.save(str(full_file))
    assert export_pad(full, rack.cfg) == (None, None, None)
    out = tmp_path / "full"
    write_fused(out, rack, full_file, EOS, 0)
    hf_tok = _pads(out)
    assert hf_tok.pad_token == EOS
    assert json.loads((out / "config.json").read_text())["pad_token_id"] is None
    model = transformers.AutoModelForMaskedLM.from_pretrained(out, dtype=torch.float32)
    assert model.get_input_embeddings().padding_idx is None
