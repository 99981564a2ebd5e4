"""Our tensor names <-> Hugging Face names, in exactly this one place, and the ``fused/`` folder writer.

The export target is ``LlamaForCausalLM``. Our rotary embedding already uses the "rotate half" layout that
transformers' Llama uses (pairs ``(i, i + head_dim/2)``), so q and k are copied as they are, with no row
permutation; ``tests/test_hf.py`` holds that to the logits of the loaded model rather than trusting it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from stackwise_cli.errors import DataError, StackwiseError
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.model.model import Rack
from stackwise_cli.store.files import atomic_replace_dir, atomic_write_bytes, atomic_write_text, sha256_file, tmp_name
from stackwise_cli.store.weights import save_tensors

# Our name inside one Block -> the HF name inside ``model.layers.{g}``. One table, so the reverse mapping (import)
# is ``{v: k for k, v in BLOCK_TO_HF.items()}``.
BLOCK_TO_HF: dict[str, str] = {
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
ENDS_TO_HF: dict[str, str] = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "head.weight": "lm_head.weight",
}

HF_FORMATS = ("llama",)
LLAMA_KINDS = ("mha", "gqa", "mqa")  # attention kinds transformers' Llama computes


def _renamed(tensors: dict[str, torch.Tensor], table: dict[str, str], prefix: str) -> dict[str, torch.Tensor]:
    unmapped = sorted(set(tensors) - set(table))
    # A tensor without an HF name would be silently dropped and left at HF's random init: a model change that
    # forgot this table, not a user error.
    if unmapped:
        raise RuntimeError(
            f"no Hugging Face name for tensors {unmapped}; extend the tables in stackwise_cli/model/hf.py"
        )
    return {prefix + table[k]: v.detach() for k, v in tensors.items()}


def export_problem(attn: AttentionConfig) -> str | None:
    """Why transformers' Llama cannot hold this attention, or None if it can: softmax attention over all positions
    with ``kv_heads`` key/value heads (mha, gqa, mqa). MLA, linear attention and sliding windows have no Llama
    equivalent, and exporting them as if they did would give a model that computes something else."""
    if attn.kind not in LLAMA_KINDS:
        return (
            f"export to Hugging Face Llama supports attention kinds {', '.join(LLAMA_KINDS)}; "
            f"this rack uses {attn.kind!r}, which transformers' Llama cannot hold"
        )
    if attn.window is not None:
        return (
            f"export to Hugging Face Llama needs full attention; this rack uses a sliding window of "
            f"{attn.window}, which transformers' Llama cannot hold"
        )
    return None


def check_exportable(rack: Rack) -> None:
    """Raise unless every stack's attention can be exported (see ``export_problem``)."""
    for stack in rack.stacks:
        problem = export_problem(stack.attn)
        if problem:
            raise StackwiseError(problem, hint="eval works on the rack itself; fuse needs mha, gqa or mqa")


def hf_state_dict(rack: Rack) -> dict[str, torch.Tensor]:
    """The rack's tensors under ``LlamaForCausalLM`` names (same dtype and device, detached).

    Layer ``g`` counts blocks across stacks in rack order: stack 0's blocks are layers 0..n0-1, and so on.
    """
    check_exportable(rack)
    out = _renamed(rack.ends.state_dict(), ENDS_TO_HF, "")
    g = 0
    for stack in rack.stacks:
        for block in stack.blocks:
            out.update(_renamed(block.state_dict(), BLOCK_TO_HF, f"model.layers.{g}."))
            g += 1
    return out


def total_blocks(rack: Rack) -> int:
    """Total blocks in the rack: the exported model's ``num_hidden_layers``."""
    return sum(len(stack.blocks) for stack in rack.stacks)


def hf_config(cfg: ModelConfig, n_layers: int, eos_id: int) -> dict:
    """``config.json`` for ``LlamaForCausalLM``.

    RoPE is written both ways: transformers 5.x reads ``rope_parameters`` (and converts a bare ``rope_theta``),
    4.x reads ``rope_theta`` and ignores the unknown key. Likewise ``dtype`` (5.x) and ``torch_dtype`` (4.x).
    """
    if cfg.family not in HF_FORMATS:
        raise StackwiseError(
            f"export to Hugging Face supports the families {', '.join(HF_FORMATS)}; this model is {cfg.family!r}"
        )
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "num_hidden_layers": n_layers,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        # The corpus separates documents with one end-of-text token, which therefore also serves as BOS.
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def _check_tokenizer(tokenizer_path: Path, cfg: ModelConfig, eos_token: str, eos_id: int) -> None:
    """Fail before writing anything if the tokenizer cannot go with this model."""
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


def _json(obj: dict) -> str:
    return json.dumps(obj, indent=2) + "\n"


def write_fused(out_dir: Path, rack: Rack, tokenizer_path: Path, eos_token: str, eos_id: int) -> str:
    """Write ``out_dir`` as a Hugging Face model folder loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    Everything is written into a temporary folder beside ``out_dir`` and moved into place with one rename, so a
    kill leaves either the previous ``out_dir`` or the new one (plus a stray temporary that ``sweep_tmp``
    removes), never a half-written one. Returns the sha256 of ``model.safetensors``.
    """
    out_dir, tokenizer_path = Path(out_dir), Path(tokenizer_path)
    cfg = rack.cfg
    check_exportable(rack)
    config = hf_config(cfg, total_blocks(rack), eos_id)
    _check_tokenizer(tokenizer_path, cfg, eos_token, eos_id)

    # fp32 on the CPU, whatever the rack trained in, so the file matches the dtype config.json declares.
    tensors = {k: v.to(device="cpu", dtype=torch.float32) for k, v in hf_state_dict(rack).items()}
    special = {"bos_token": eos_token, "eos_token": eos_token, "unk_token": eos_token}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    # pad = eos so generate() on a batch has a pad id without a warning; the model never trains on padding.
    generation_config = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(out_dir)
    tmp.mkdir()
    try:
        save_tensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        atomic_write_text(tmp / "config.json", _json(config))
        atomic_write_text(tmp / "generation_config.json", _json(generation_config))
        atomic_write_bytes(tmp / "tokenizer.json", tokenizer_path.read_bytes())
        atomic_write_text(tmp / "tokenizer_config.json", _json(tokenizer_config))
        atomic_write_text(tmp / "special_tokens_map.json", _json(special))
        atomic_replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return sha256_file(out_dir / "model.safetensors")
