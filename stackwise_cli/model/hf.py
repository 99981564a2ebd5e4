"""Our tensor names <-> Hugging Face names, in exactly this one place, and the ``fused/`` folder writer.

Export targets, one per family (``HF_FORMATS``; docs/models.md):

- llama -> ``LlamaForCausalLM``. Our rotary embedding already uses the "rotate half" layout that transformers'
  Llama uses (pairs ``(i, i + head_dim/2)``), so q and k are copied as they are, with no row permutation.
- gpt2 -> ``GPT2LMHeadModel``. GPT-2's linear layers are ``Conv1D``, whose weight is (in, out): our Linear weight
  transposed; q, k and v go into one fused ``c_attn`` (concatenated in that order along the output).
- bert -> ``BertForMaskedLM`` (bidirectional). The MLM decoder's bias is held twice by transformers
  (``cls.predictions.bias`` and ``cls.predictions.decoder.bias``, tied only with tied embeddings): both are written.
- modernbert has no export.

``tests/test_hf.py`` holds every format to the logits of the loaded model rather than trusting these tables.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from stackwise_cli.errors import DataError, StackwiseError
from stackwise_cli.model.config import FAMILY_DEFAULTS, AttentionConfig, ModelConfig
from stackwise_cli.model.model import Rack
from stackwise_cli.store.files import atomic_replace_dir, atomic_write_bytes, atomic_write_text, sha256_file, tmp_name
from stackwise_cli.store.weights import save_tensors

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# A table maps our name (inside one Block, or inside Ends) to its HF name. Several of ours with the same HF name are
# concatenated along the output dim in table order (GPT-2's c_attn); a tuple of HF names writes one tensor under
# each (BERT's decoder bias). The reverse mapping (import) is the inverse of these tables.
Table = dict[str, "str | tuple[str, ...]"]

# LLaMA: our name inside one Block -> the HF name inside ``model.layers.{g}``.
BLOCK_TO_HF: Table = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}

# Our name inside Ends -> the full HF name. ``head.weight`` is absent with tied embeddings, and HF then omits
# ``lm_head.weight`` too (it ties it to the embedding on load).
ENDS_TO_HF: Table = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}

GPT2_BLOCK_TO_HF: Table = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn.q.weight": "attn.c_attn.weight",
    "attn.k.weight": "attn.c_attn.weight",
    "attn.v.weight": "attn.c_attn.weight",
    "attn.q.bias": "attn.c_attn.bias",
    "attn.k.bias": "attn.c_attn.bias",
    "attn.v.bias": "attn.c_attn.bias",
    "attn.o.weight": "attn.c_proj.weight",
    "attn.o.bias": "attn.c_proj.bias",
    "mlp_norm.weight": "ln_2.weight",
    "mlp_norm.bias": "ln_2.bias",
    "mlp.up.weight": "mlp.c_fc.weight",
    "mlp.up.bias": "mlp.c_fc.bias",
    "mlp.down.weight": "mlp.c_proj.weight",
    "mlp.down.bias": "mlp.c_proj.bias",
}
GPT2_ENDS_TO_HF: Table = {
    "embed.weight": "transformer.wte.weight",
    "pos.weight": "transformer.wpe.weight",
    "norm.weight": "transformer.ln_f.weight",
    "norm.bias": "transformer.ln_f.bias",
    "head.weight": "lm_head.weight",
}

# BERT is post-norm: our attn_norm follows the attention residual, HF's attention.output.LayerNorm likewise.
BERT_BLOCK_TO_HF: Table = {
    "attn.q.weight": "attention.self.query.weight",
    "attn.q.bias": "attention.self.query.bias",
    "attn.k.weight": "attention.self.key.weight",
    "attn.k.bias": "attention.self.key.bias",
    "attn.v.weight": "attention.self.value.weight",
    "attn.v.bias": "attention.self.value.bias",
    "attn.o.weight": "attention.output.dense.weight",
    "attn.o.bias": "attention.output.dense.bias",
    "attn_norm.weight": "attention.output.LayerNorm.weight",
    "attn_norm.bias": "attention.output.LayerNorm.bias",
    "mlp.up.weight": "intermediate.dense.weight",
    "mlp.up.bias": "intermediate.dense.bias",
    "mlp.down.weight": "output.dense.weight",
    "mlp.down.bias": "output.dense.bias",
    "mlp_norm.weight": "output.LayerNorm.weight",
    "mlp_norm.bias": "output.LayerNorm.bias",
}
BERT_ENDS_TO_HF: Table = {
    "embed.weight": "bert.embeddings.word_embeddings.weight",
    "pos.weight": "bert.embeddings.position_embeddings.weight",
    "types.weight": "bert.embeddings.token_type_embeddings.weight",
    "embed_norm.weight": "bert.embeddings.LayerNorm.weight",
    "embed_norm.bias": "bert.embeddings.LayerNorm.bias",
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_norm.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_norm.bias": "cls.predictions.transform.LayerNorm.bias",
    "head.weight": "cls.predictions.decoder.weight",
    "out_bias": ("cls.predictions.bias", "cls.predictions.decoder.bias"),
}


@dataclass(frozen=True)
class HFFormat:
    """One export target: the transformers class, its tables, and how it attends."""

    architecture: str
    model_type: str
    label: str  # for messages: "transformers' {label} cannot hold ..."
    block: Table
    ends: Table
    layer_prefix: str  # HF prefix of layer g, with {g}
    bidirectional: bool  # the only mode the HF class computes
    conv1d: frozenset[str] = field(default_factory=frozenset)  # HF names (inside a layer) stored as (in, out)
    full_heads: bool = False  # no grouped-query attention: kv_heads must equal n_heads


HF_FORMATS: dict[str, HFFormat] = {
    "llama": HFFormat(
        "LlamaForCausalLM", "llama", "Llama", BLOCK_TO_HF, ENDS_TO_HF, "model.layers.{g}.", bidirectional=False
    ),
    "gpt2": HFFormat(
        "GPT2LMHeadModel",
        "gpt2",
        "GPT-2",
        GPT2_BLOCK_TO_HF,
        GPT2_ENDS_TO_HF,
        "transformer.h.{g}.",
        bidirectional=False,
        conv1d=frozenset({"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"}),
        full_heads=True,
    ),
    "bert": HFFormat(
        "BertForMaskedLM",
        "bert",
        "BERT",
        BERT_BLOCK_TO_HF,
        BERT_ENDS_TO_HF,
        "bert.encoder.layer.{g}.",
        bidirectional=True,
        full_heads=True,
    ),
}
EXPORT_KINDS = ("mha", "gqa", "mqa")  # attention kinds the HF classes compute (softmax over kv_heads heads)


def _renamed(
    tensors: dict[str, torch.Tensor], table: Table, prefix: str, conv1d: frozenset[str] = frozenset()
) -> dict[str, torch.Tensor]:
    unmapped = sorted(set(tensors) - set(table))
    # A tensor without an HF name would be silently dropped and left at HF's random init: a model change that
    # forgot this table, not a user error.
    if unmapped:
        raise RuntimeError(
            f"no Hugging Face name for tensors {unmapped}; extend the tables in stackwise_cli/model/hf.py"
        )
    groups: dict[str, list[torch.Tensor]] = {}
    for ours, theirs in table.items():  # table order: q, k, v concatenate in that order
        if ours in tensors:
            for name in (theirs,) if isinstance(theirs, str) else theirs:
                groups.setdefault(name, []).append(tensors[ours].detach())
    out = {}
    for name, parts in groups.items():
        t = parts[0].clone() if len(parts) == 1 else torch.cat(parts, dim=0)  # clone: no shared storage on save
        out[prefix + name] = t.t().contiguous() if name in conv1d else t  # Conv1D: (in, out)
    return out


def export_problem(
    attn: AttentionConfig, model: ModelConfig | None = None, *, bidirectional: bool = False
) -> str | None:
    """Why this model cannot be exported to Hugging Face, or None if it can.

    ``model`` (default: the default llama config) gives the family, its switches and ``time_embedding``;
    ``bidirectional`` says how the rack was trained (True for the mlm and diffusion objectives). Exported are: llama
    and gpt2 trained causally (clm), bert trained bidirectionally, each with its family's own switches, softmax
    attention over all positions (mha, gqa, mqa; gqa only for llama), and no time embedding. Anything else has no
    equivalent in the transformers class, and exporting it as if it had would give a model computing something else.
    """
    model = model or ModelConfig()
    fmt = HF_FORMATS.get(model.family)
    if fmt is None:
        return f"export to Hugging Face supports the families {', '.join(HF_FORMATS)}; this model is {model.family!r}"
    target = f"Hugging Face {fmt.architecture}"
    if model.time_embedding:
        return f"export to {target} cannot hold model.time_embedding (a diffusion time input)"
    if bidirectional != fmt.bidirectional:
        trained, computes = ("bidirectionally", "causal") if bidirectional else ("causally", "bidirectional")
        return f"this rack was trained {trained}, but {target} computes {computes} attention"
    family = FAMILY_DEFAULTS[model.family]
    for name, value in model.switches().items():
        if value != family[name]:
            return f"export to {target} needs model.{name} {family[name]!r} ({model.family}'s), got {value!r}"
    if attn.kind not in EXPORT_KINDS:
        return (
            f"export to {target} supports attention kinds {', '.join(EXPORT_KINDS)}; "
            f"this rack uses {attn.kind!r}, which transformers' {fmt.label} cannot hold"
        )
    if fmt.full_heads and model.kv_heads != model.n_heads:
        return f"export to {target} needs n_kv_heads = n_heads ({model.n_heads}), got {model.kv_heads}"
    if attn.window is not None:
        return (
            f"export to {target} needs full attention; this rack uses a sliding window of "
            f"{attn.window}, which transformers' {fmt.label} cannot hold"
        )
    return None


def check_exportable(rack: Rack, bidirectional: bool | None = None) -> HFFormat:
    """The rack's export format; raises unless every stack can be exported (see ``export_problem``).
    ``bidirectional`` None: as the family's HF class attends."""
    fmt = HF_FORMATS.get(rack.cfg.family)
    if bidirectional is None:
        bidirectional = fmt.bidirectional if fmt else False
    for stack in rack.stacks:
        problem = export_problem(stack.attn, rack.cfg, bidirectional=bidirectional)
        if problem:
            raise StackwiseError(problem, hint="eval works on the rack itself; fuse needs an exportable model")
    if fmt is None:  # only without stacks: export_problem names the family otherwise
        raise StackwiseError(f"export to Hugging Face supports the families {', '.join(HF_FORMATS)}")
    return fmt


def hf_state_dict(rack: Rack, bidirectional: bool | None = None) -> dict[str, torch.Tensor]:
    """The rack's tensors under the HF class's names (same dtype and device, detached).

    Layer ``g`` counts blocks across stacks in rack order: stack 0's blocks are layers 0..n0-1, and so on.
    """
    fmt = check_exportable(rack, bidirectional)
    out = _renamed(rack.ends.state_dict(), fmt.ends, "")
    g = 0
    for stack in rack.stacks:
        for block in stack.blocks:
            out.update(_renamed(block.state_dict(), fmt.block, fmt.layer_prefix.format(g=g), fmt.conv1d))
            g += 1
    return out


def total_blocks(rack: Rack) -> int:
    """Total blocks in the rack: the exported model's ``num_hidden_layers``."""
    return sum(len(stack.blocks) for stack in rack.stacks)


def hf_config(cfg: ModelConfig, n_layers: int, eos_id: int, pad_id: int | None = None) -> dict:
    """``config.json`` for the family's HF class, such that transformers computes exactly our function.

    ``pad_token_id`` is the tokenizer's ``[PAD]`` (``pad_id``), a row no training step touched: HF makes it the
    embedding's ``padding_idx`` (llama, bert), whose gradient is zero in a fine-tune. Without one it is left out
    (bert: null, not HF's default of 0, which is our end-of-text token), so no real token's row is frozen.

    Llama: RoPE is written both ways: transformers 5.x reads ``rope_parameters`` (and converts a bare
    ``rope_theta``), 4.x reads ``rope_theta`` and ignores the unknown key. Likewise ``dtype`` (5.x) and
    ``torch_dtype`` (4.x). Dropout is 0 everywhere: the export is for inference and parity.
    """
    fmt = HF_FORMATS.get(cfg.family)
    if fmt is None:
        raise StackwiseError(
            f"export to Hugging Face supports the families {', '.join(HF_FORMATS)}; this model is {cfg.family!r}"
        )
    common = {
        "architectures": [fmt.architecture],
        "model_type": fmt.model_type,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        # The corpus separates documents with one end-of-text token, which therefore also serves as BOS.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }
    if pad_id is not None:
        common["pad_token_id"] = pad_id
    if cfg.family == "gpt2":
        return {
            **common,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_heads,
            "n_layer": n_layers,
            "n_inner": cfg.ffn_dim,
            "n_positions": cfg.max_seq_len,
            "activation_function": "gelu_new",  # GELU, tanh approximation
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    if cfg.family == "bert":
        return {
            **common,
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_heads,
            "num_hidden_layers": n_layers,
            "intermediate_size": cfg.ffn_dim,
            "hidden_act": "gelu",  # exact (erf) GELU, in the blocks and the MLM transform
            "layer_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len,
            "type_vocab_size": cfg.type_vocab,
            "position_embedding_type": "absolute",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "is_decoder": False,
            "pad_token_id": pad_id,
        }
    return {
        **common,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": n_layers,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }


MASK_TOKEN = "[MASK]"  # the masked-LM objective's special token, when the tokenizer has one


def _check_tokenizer(tokenizer_path: Path, cfg: ModelConfig, eos_token: str, eos_id: int) -> Tokenizer:
    """Fail before writing anything if the tokenizer cannot go with this model; returns it."""
    from tokenizers import Tokenizer

    if not tokenizer_path.is_file():
        raise DataError(f"tokenizer {tokenizer_path} is missing", hint="run `stackwise prepare`")
    try:
        tok = Tokenizer.from_file(str(tokenizer_path))
    except Exception as e:  # the tokenizers library raises plain Exception on a bad file
        raise DataError(f"{tokenizer_path} is not a readable tokenizers file ({e})") from None
    found = tok.token_to_id(eos_token)
    if found != eos_id:
        raise DataError(f"{tokenizer_path}: end-of-text token {eos_token!r} has id {found}, the manifest says {eos_id}")
    if tok.get_vocab_size() > cfg.vocab_size:
        raise DataError(
            f"{tokenizer_path} has {tok.get_vocab_size()} tokens but the model's vocab_size is {cfg.vocab_size}"
        )
    return tok


def export_pad(tok: Tokenizer, cfg: ModelConfig) -> tuple[str | None, int | None, str | None]:
    """(pad token, its id, the tokenizer JSON to write if it differs from the project's) for the export.

    The project's ``[PAD]`` when it has one (every tokenizer ``prepare`` makes or loads does). A tokenizer from a
    project prepared before that gets ``[PAD]`` appended when the model has a spare embedding row (ids past the
    tokenizer's are rows no data ever indexed, so no trained id moves); with no spare row the tokenizer pads with
    end-of-text, as GPT-2 does, and the config names no pad id: (None, None, None)."""
    from stackwise_cli.data.tokenizer import PAD, id_bound

    found = tok.token_to_id(PAD)
    if found is not None and found < cfg.vocab_size:
        return PAD, found, None
    if found is None and id_bound(tok) < cfg.vocab_size:
        from tokenizers import Tokenizer

        out = Tokenizer.from_str(tok.to_str())
        out.add_special_tokens([PAD])
        if out.token_to_id(PAD) < cfg.vocab_size:
            return PAD, out.token_to_id(PAD), out.to_str()
    return None, None, None


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_fused(
    out_dir: Path,
    rack: Rack,
    tokenizer_path: Path,
    eos_token: str,
    eos_id: int,
    bidirectional: bool | None = None,
) -> str:
    """Write ``out_dir`` as a Hugging Face model folder loadable with ``AutoModelForCausalLM`` (llama, gpt2) or
    ``AutoModelForMaskedLM`` (bert), and ``AutoTokenizer``. ``bidirectional``: how the rack was trained (None: as
    the family's HF class attends); a mismatch is refused (``export_problem``).

    Everything is written into a temporary folder beside ``out_dir`` and moved into place with one rename, so a
    kill leaves either the previous ``out_dir`` or the new one (plus a stray temporary that ``sweep_tmp``
    removes), never a half-written one. Returns the sha256 of ``model.safetensors``.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    cfg = rack.cfg
    fmt = check_exportable(rack, bidirectional)
    tok = _check_tokenizer(tokenizer_path, cfg, eos_token, eos_id)
    has_mask = tok.token_to_id(MASK_TOKEN) is not None
    pad_token, pad_id, tokenizer_json = export_pad(tok, cfg)
    config = hf_config(cfg, total_blocks(rack), eos_id, pad_id)

    # fp32 on the CPU, whatever the rack trained in, so the file matches the dtype config.json declares.
    tensors = {k: v.to(device="cpu", dtype=torch.float32) for k, v in hf_state_dict(rack, bidirectional).items()}
    # pad_token: what AutoTokenizer(..., padding=True) pads with ([PAD], or end-of-text when there is no spare row).
    special = {
        "bos_token": eos_token,
        "eos_token": eos_token,
        "unk_token": eos_token,
        "pad_token": pad_token or eos_token,
    }
    if fmt.bidirectional and has_mask:  # fill-mask pipelines look for the mask token here
        special["mask_token"] = MASK_TOKEN
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    # A pad id so generate() on a batch needs no warning; the model never trains on padding.
    pad_or_eos = pad_id if pad_id is not None else eos_id
    generation_config = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_or_eos}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out_dir)
    tmp.mkdir()
    try:
        save_tensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        atomic_write_text(tmp / "config.json", _json(config))
        atomic_write_text(tmp / "generation_config.json", _json(generation_config))
        if tokenizer_json is None:
            atomic_write_bytes(tmp / "tokenizer.json", tokenizer_path.read_bytes())
        else:
            atomic_write_text(tmp / "tokenizer.json", tokenizer_json)
        atomic_write_text(tmp / "tokenizer_config.json", _json(tokenizer_config))
        atomic_write_text(tmp / "special_tokens_map.json", _json(special))
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha256_file(out_dir / "model.safetensors")
