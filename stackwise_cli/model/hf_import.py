"""Hugging Face model folder -> stackwise project: the inverse of ``stackwise_cli/model/hf.py``'s export.

Reads ``config.json``, ``model.safetensors`` (or the shards a ``model.safetensors.index.json`` lists) and the
tokenizer of a LlamaForCausalLM, GPT2LMHeadModel or BertForMaskedLM, and writes a project whose ends and stacks hold
those weights, marked trained. The name tables are hf.py's (``HF_FORMATS``), read backwards: an HF tensor that
several of ours were concatenated into (GPT-2's ``c_attn``) is split along its output dim in table order.

Everything that can be checked is checked before anything is written: the config (each key this module reads, and
the keys that would change the function, against the values it can represent), every safetensors header against
the index, the name and shape of every tensor, the tokenizer against the embedding. Then the weights stream one
stack at a time from the memory-mapped files (``safe_open``), so the peak memory is about one stack (plus the
ends) in fp32, whatever the size of the model. See docs/pretrained.md.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stackwise_cli.errors import CorruptFileError, DataError, ProjectError
from stackwise_cli.model.config import ModelConfig
from stackwise_cli.model.hf import HF_FORMATS, HFFormat, Table

log = logging.getLogger(__name__)

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

# transformers' class -> our family (each family's export target, HF_FORMATS, read backwards).
ARCHITECTURES = {fmt.architecture: family for family, fmt in HF_FORMATS.items()}
# The objective each class was trained with.
OBJECTIVES = {"llama": "clm", "gpt2": "clm", "bert": "mlm"}

# Config keys that change the function, and the values this import represents exactly (absent = the first value,
# transformers' default). Keys not named here (dropout, token ids, caching, ...) do not change the forward pass.
ABSENT = object()
ALLOWED: dict[str, dict[str, tuple]] = {
    "llama": {
        "hidden_act": ("silu",),
        "attention_bias": (False,),
        "mlp_bias": (False,),
        "rope_scaling": (None,),
        "pretraining_tp": (1,),
    },
    "gpt2": {
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),  # both GELU with the tanh approximation
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    },
    "bert": {
        "hidden_act": ("gelu",),
        "position_embedding_type": ("absolute",),
        "is_decoder": (False,),
        "add_cross_attention": (False,),
    },
}
# Tensors a checkpoint may hold that are not part of the function the class computes: old GPT-2 causal-mask
# buffers, rotary tables, position ids, BERT's pooler and next-sentence head (BertForMaskedLM has neither).
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq", "embeddings.position_ids")
IGNORED_PREFIXES = ("bert.pooler.", "cls.seq_relationship.")


def _fail(message: str, hint: str | None = None) -> DataError:
    return DataError(message, hint=hint)


# --- config -> recipe ------------------------------------------------------------------------------------------


def read_config(hf_dir: Path) -> tuple[str, dict[str, Any]]:
    """(our family, the parsed config.json); a folder without one or an unsupported class is one error."""
    path = hf_dir / CONFIG
    if not hf_dir.is_dir():
        raise _fail(f"{hf_dir} is not a folder", hint="give a Hugging Face model folder (config.json, *.safetensors)")
    if not path.is_file():
        raise _fail(f"{hf_dir} has no {CONFIG}", hint="give a Hugging Face model folder saved with save_pretrained")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _fail(f"{path} is not readable JSON ({e})") from None
    archs = config.get("architectures") or []
    family = ARCHITECTURES.get(archs[0]) if len(archs) == 1 else None
    if family is None:
        raise _fail(
            f"{path}: architectures {archs}: import supports {', '.join(ARCHITECTURES)}",
            hint="other architectures have no stackwise family that computes the same function",
        )
    return family, config


def _get(config: dict, path: Path, key: str, default: Any = ABSENT) -> Any:
    if key in config and config[key] is not None:
        return config[key]
    if default is ABSENT:
        raise _fail(f"{path}: {key} is missing")
    return default


def _check_allowed(family: str, config: dict, path: Path) -> None:
    for key, allowed in ALLOWED[family].items():
        value = config.get(key, allowed[0])
        if value not in allowed:
            raise _fail(
                f"{path}: {key} {value!r} cannot be represented exactly: import supports "
                f"{', '.join(repr(a) for a in allowed)}",
                hint="stackwise would compute another function than the checkpoint's; nothing was written",
            )


def _rope_theta(config: dict, path: Path) -> float:
    """RoPE theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (4.x); only the default rope type."""
    params = config.get("rope_parameters")
    if isinstance(params, dict):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _fail(
                f"{path}: rope_parameters.rope_type {kind!r} cannot be represented exactly: import supports 'default'",
                hint="stackwise implements plain RoPE (no scaling); nothing was written",
            )
        extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
        if extra:
            raise _fail(f"{path}: rope_parameters.{extra[0]} cannot be represented exactly (plain RoPE has none)")
        if "rope_theta" in params:
            return float(params["rope_theta"])
    return float(config.get("rope_theta", 10000.0))


def model_fields(family: str, config: dict, path: Path) -> dict[str, Any]:
    """The recipe's ``model:`` section that computes the checkpoint's function (shapes, RoPE, eps, tying, GQA)."""
    _check_allowed(family, config, path)
    tie = bool(config.get("tie_word_embeddings", family != "llama"))
    std = float(config.get("initializer_range", 0.02))
    if family == "llama":
        d, heads = _get(config, path, "hidden_size"), _get(config, path, "num_attention_heads")
        head_dim = config.get("head_dim") or d // heads
        if head_dim * heads != d:
            raise _fail(
                f"{path}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {d}: "
                "stackwise's heads split d_model evenly"
            )
        return dict(
            family=family,
            vocab_size=_get(config, path, "vocab_size"),
            d_model=d,
            n_heads=heads,
            n_kv_heads=_get(config, path, "num_key_value_heads", heads),
            d_ff=_get(config, path, "intermediate_size"),
            max_seq_len=_get(config, path, "max_position_embeddings", 2048),
            norm_eps=float(_get(config, path, "rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(config, path),
            tie_embeddings=tie,
            init_std=std,
        )
    if family == "gpt2":
        d = _get(config, path, "n_embd")
        return dict(
            family=family,
            vocab_size=_get(config, path, "vocab_size"),
            d_model=d,
            n_heads=_get(config, path, "n_head"),
            d_ff=_get(config, path, "n_inner", 4 * d),
            max_seq_len=_get(config, path, "n_positions"),
            norm_eps=float(_get(config, path, "layer_norm_epsilon", 1e-5)),
            tie_embeddings=tie,
            init_std=std,
        )
    return dict(
        family=family,
        vocab_size=_get(config, path, "vocab_size"),
        d_model=_get(config, path, "hidden_size"),
        n_heads=_get(config, path, "num_attention_heads"),
        d_ff=_get(config, path, "intermediate_size"),
        max_seq_len=_get(config, path, "max_position_embeddings"),
        norm_eps=float(_get(config, path, "layer_norm_eps", 1e-12)),
        token_types=_get(config, path, "type_vocab_size", 2),
        tie_embeddings=tie,
        init_std=std,
    )


def n_layers_of(family: str, config: dict, path: Path) -> int:
    return int(_get(config, path, "n_layer" if family == "gpt2" else "num_hidden_layers"))


def import_recipe(
    hf_dir: Path,
    family: str,
    config: dict,
    blocks_per_stack: int | None,
    recipe_path: Path | None,
    overrides: list[str],
    vocab_size: int,
):
    """The project's recipe: the import's defaults < the recipe file < ``--set``, with the ``model:`` section from
    config.json (a recipe file's shapes are replaced; a ``--set model.*`` that disagrees with the checkpoint is an
    error naming both). ``vocab_size``: the embedding rows after any token the objective adds."""
    import yaml

    from stackwise_cli.errors import RecipeError
    from stackwise_cli.recipe import apply_overrides, parse_override, recipe_from_data

    path = hf_dir / CONFIG
    n_layers = n_layers_of(family, config, path)
    model = model_fields(family, config, path) | {"vocab_size": vocab_size}
    data: dict[str, Any] = {"name": f"import-{hf_dir.resolve().name}", "objective": OBJECTIVES[family]}
    data["rack"] = {"init": "identity"}  # a stack grown into a pretrained rack preserves its function
    source = "import"
    if recipe_path is not None:
        try:
            loaded = yaml.safe_load(Path(recipe_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read recipe {recipe_path}: {e}") from None
        if not isinstance(loaded, dict):
            raise RecipeError(f"{recipe_path}: must be a mapping of sections (model:, train:, ...)")
        loaded.pop("name", None)
        loaded.pop("model", None)  # the shapes are the checkpoint's
        for section, value in loaded.items():
            if isinstance(value, dict) and isinstance(data.get(section), dict):
                data[section] = {**data[section], **value}
            else:
                data[section] = value
        source = str(recipe_path)
    set_model = {}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "model" and len(keys) == 2:
            set_model[keys[1]] = value
    data = apply_overrides(data, [o for o in overrides if not o.strip().startswith("model.")])
    for key, value in set_model.items():
        if key in model and model[key] != value:
            raise RecipeError(
                f"--set model.{key}={value}: the checkpoint's {CONFIG} gives model.{key} = {model[key]!r}",
                hint="the model's shape comes from the checkpoint; drop this --set",
            )
        if key not in model and key != "init_std":
            raise RecipeError(
                f"--set model.{key}: an imported model is the checkpoint's {family}; only model.init_std may be set"
            )
        model[key] = value
    data["model"] = model
    attention = data.setdefault("attention", {})
    if attention.get("kind") not in (None, "mha", "gqa", "mqa") or attention.get("window") is not None:
        raise RecipeError(
            f"attention.kind {attention.get('kind')!r} / window {attention.get('window')!r}: the checkpoint's "
            "attention is full softmax attention (kind gqa, no window)"
        )
    attention["kind"] = "gqa"  # takes any n_kv_heads dividing n_heads, mha and mqa included
    bps = blocks_per_stack or (data.get("rack") or {}).get("blocks_per_stack") or 1
    if bps < 1 or n_layers % bps:
        divisors = [k for k in range(1, n_layers + 1) if n_layers % k == 0]
        raise ProjectError(
            f"--blocks-per-stack {bps} does not divide the checkpoint's {n_layers} layers",
            hint=f"use one of {', '.join(map(str, divisors))}",
        )
    data["rack"] = {**data["rack"], "stacks": n_layers // bps, "blocks_per_stack": bps}
    data.setdefault("data", {})
    data["data"].setdefault("seq_len", min(128, model["max_seq_len"]))
    return recipe_from_data(data, source)


# --- safetensors: the index, the headers, the plan -------------------------------------------------------------


@dataclass
class Weights:
    """Where each HF tensor lives (file by name), read from the headers only."""

    files: list[Path]
    where: dict[str, Path]  # HF name -> file
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    used: set[str] = field(default_factory=set)

    def resolve(self, name: str) -> str | None:
        """The name as stored: as transformers saves it, or without the base model's prefix (``transformer.``,
        ``model.``, ``bert.``), as some older checkpoints are."""
        if name in self.where:
            return name
        head, _, rest = name.partition(".")
        if head in ("transformer", "model", "bert") and rest in self.where:
            return rest
        return None


def _header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of one safetensors file, checking that its data is all there (not truncated)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), s.get_dtype())
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(
            f"{path} is not a readable safetensors file ({e})",
            hint="the file is truncated or damaged: download it again",
        ) from None


def read_weights(hf_dir: Path) -> Weights:
    """The safetensors files of ``hf_dir`` and the tensors in each; a shard that is missing, truncated, or does
    not hold what the index says is one error naming the file."""
    index_path = hf_dir / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CorruptFileError(f"{index_path} is not a safetensors index (weight_map: {e})") from None
        files = sorted({hf_dir / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CorruptFileError(f"{index_path} lists {missing[0]}, which is not in {hf_dir}")
    elif (hf_dir / SINGLE).is_file():
        weight_map, files = None, [hf_dir / SINGLE]
    else:
        raise _fail(
            f"{hf_dir} has no {SINGLE} and no {INDEX}",
            hint="import reads safetensors only: save the model with save_pretrained(safe_serialization=True)",
        )
    w = Weights(files=files, where={}, shapes={}, dtypes={})
    for f in files:
        for name, (shape, dtype) in _header(f).items():
            if weight_map is not None and weight_map.get(name) != f.name:
                where = weight_map.get(name)
                raise CorruptFileError(
                    f"{f} does not match {INDEX}: it holds {name}, which the index puts "
                    + (f"in {where}" if where else "nowhere")
                )
            w.where[name], w.shapes[name], w.dtypes[name] = f, shape, dtype
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(w.where))
        if absent:
            raise CorruptFileError(f"{hf_dir / weight_map[absent[0]]} does not match {INDEX}: {absent[0]} is not in it")
    return w


def _groups(table: Table) -> dict[str, list[str]]:
    """HF name -> our names that were concatenated into it, in table order (hf.py's ``_renamed`` read backwards).
    A tuple of HF names (BERT's two decoder biases) is keyed by its first name (see ``plan_module``)."""
    out: dict[str, list[str]] = {}
    for ours, theirs in table.items():
        out.setdefault(theirs if isinstance(theirs, str) else theirs[0], []).append(ours)
    return out


def _alternates(table: Table) -> dict[str, tuple[str, ...]]:
    return {theirs[0]: theirs for theirs in table.values() if isinstance(theirs, tuple)}


@dataclass
class Part:
    """One HF tensor, read into our tensors ``ours`` (split along dim 0 into ``sizes``)."""

    hf: str  # as stored
    ours: list[str]
    sizes: list[int]
    transpose: bool


def plan_module(
    w: Weights, want: dict[str, tuple[int, ...]], table: Table, prefix: str, conv1d: frozenset[str]
) -> list[Part]:
    """How to fill a module whose tensors (our names, shapes) are ``want`` from the checkpoint; every tensor is
    checked by name and shape here, before anything is read."""
    parts = []
    alternates = _alternates(table)
    for theirs, ours in _groups(table).items():
        ours = [o for o in ours if o in want]
        if not ours:
            continue
        names = alternates.get(theirs, (theirs,))
        # BERT's output bias: transformers computes with cls.predictions.decoder.bias (the last name), which holds
        # the other one's value only when tied; read the last one stored.
        found = next((w.resolve(prefix + n) for n in reversed(names) if w.resolve(prefix + n)), None)
        if found is None:
            raise CorruptFileError(f"the checkpoint has no tensor {prefix + theirs} (for our {ours[0]})")
        for n in names:  # BERT's second decoder bias: the same tensor, held twice
            if w.resolve(prefix + n):
                w.used.add(w.resolve(prefix + n))
        shape = w.shapes[found]
        transpose = theirs in conv1d
        if transpose:
            shape = shape[::-1]
        need = (sum(want[o][0] for o in ours), *want[ours[0]][1:])
        if tuple(shape) != need or any(want[o][1:] != want[ours[0]][1:] for o in ours):
            raise CorruptFileError(
                f"tensor {found} has shape {list(w.shapes[found])}, the config gives "
                f"{list(need[::-1] if transpose else need)}"
            )
        if not w.dtypes[found].startswith(("F", "BF")):
            raise CorruptFileError(f"tensor {found} has dtype {w.dtypes[found]}, not a floating-point type")
        parts.append(Part(found, ours, [want[o][0] for o in ours], transpose))
    return parts


def read_parts(w: Weights, parts: list[Part], handles: dict[Path, Any]) -> dict[str, Any]:
    """Our tensors (fp32) from the planned parts, read from the memory-mapped files."""
    import torch

    out = {}
    for p in parts:
        t = handles[w.where[p.hf]].get_tensor(p.hf).to(torch.float32)
        if p.transpose:
            t = t.t()
        for name, piece in zip(p.ours, torch.split(t, p.sizes, dim=0), strict=True):
            out[name] = piece.contiguous()
    return out


def unexpected(w: Weights, fmt: HFFormat, tie: bool) -> list[str]:
    """Stored tensors the plan did not read and that are not known to be outside the function (a bias where the
    family has none, a layer beyond num_hidden_layers, ...). With tied embeddings an explicit head equal to the
    embedding is allowed, as transformers allows it."""
    rest = []
    for name in sorted(set(w.where) - w.used):
        if name.endswith(IGNORED_SUFFIXES) or name.startswith(IGNORED_PREFIXES):
            continue
        if tie and w.resolve(fmt.ends["head.weight"]) == name:
            continue
        rest.append(name)
    return rest


# --- the import -------------------------------------------------------------------------------------------------


@dataclass
class ImportResult:
    project: str
    family: str
    architecture: str
    layers: int
    stacks: list[int]
    blocks_per_stack: int
    params: int
    vocab_size: int
    added_tokens: list[str]
    bytes_read: int
    time_s: float = 0.0  # the whole import, checks and prepare included
    prepare_s: float = 0.0  # of which: the tokenizer and the data shards (prepare)


def _sha256(path: Path) -> str:
    from stackwise_cli.store.files import sha256_file

    return sha256_file(path)


def grow_rows(t, rows: int, added: list[int]):
    """``t`` with ``rows`` more rows along dim 0, and the rows of the ``added`` token ids (appended, or spare rows
    the checkpoint had past its tokenizer) set to the mean of the existing rows: a new token's embedding, head row
    or output bias starts where the average token is."""
    import torch

    if rows <= 0 and not added:
        return t
    mean = t.mean(dim=0, keepdim=True)
    out = torch.cat([t, mean.expand(rows, *t.shape[1:])], dim=0) if rows > 0 else t.clone()
    out[added] = mean
    return out


def import_hf(
    hf_dir: Path,
    project_root: Path,
    blocks_per_stack: int | None = None,
    recipe_path: Path | None = None,
    overrides: list[str] | None = None,
    inputs: list[Path] | None = None,
    reporter=None,
    on_stack: Callable[[int], None] | None = None,
) -> ImportResult:
    """Write the project at ``project_root`` from the Hugging Face folder ``hf_dir``: the tokenizer's train/val
    shards of ``inputs`` (as ``prepare`` makes them; default: the built-in corpus), the ends and one trained stack
    per ``blocks_per_stack`` layers, and the folder's provenance in the manifest.

    Any error leaves nothing behind: a project folder this call created is removed, and in a folder that existed
    only what it wrote."""
    import time

    from stackwise_cli.data.tokenizer import add_specials, id_bound, read_tokenizer, tokenizer_file
    from stackwise_cli.progress import QUIET
    from stackwise_cli.store.project import Project

    start = time.perf_counter()
    hf_dir, project = Path(hf_dir), Project(project_root)
    if project.exists():
        raise ProjectError(
            f"{project.manifest_path} already exists: this folder is a project",
            hint="import into a new -p folder",
        )
    family, config = read_config(hf_dir)
    fmt = HF_FORMATS[family]
    fields = model_fields(family, config, hf_dir / CONFIG)
    embed_rows = fields["vocab_size"]

    tok_path = tokenizer_file(hf_dir)  # a DataError naming the folder when there is no tokenizer.json
    tok, eos = read_tokenizer(hf_dir)
    if id_bound(tok) > embed_rows:
        raise _fail(
            f"{tok_path} has {id_bound(tok)} tokens but the checkpoint's embedding has {embed_rows} rows "
            f"({CONFIG} vocab_size)",
            hint="this tokenizer is not the model's",
        )
    # The recipe at the checkpoint's vocabulary says the objective, hence the tokens to add; then at the grown one.
    at_checkpoint = import_recipe(hf_dir, family, config, blocks_per_stack, recipe_path, overrides or [], embed_rows)
    before = set(tok.get_vocab(with_added_tokens=True))
    add_specials(tok, at_checkpoint.objective, spare_rows=False)
    added = sorted(set(tok.get_vocab(with_added_tokens=True)) - before, key=tok.token_to_id)
    added_ids = [tok.token_to_id(t) for t in added]
    vocab = max(embed_rows, id_bound(tok))
    recipe = import_recipe(hf_dir, family, config, blocks_per_stack, recipe_path, overrides or [], vocab)
    cfg: ModelConfig = recipe.model

    weights = read_weights(hf_dir)
    ends_want, stack_want = _module_shapes(recipe, embed_rows)
    ends_plan = plan_module(weights, ends_want, fmt.ends, "", frozenset())
    n_layers = n_layers_of(family, config, hf_dir / CONFIG)
    block_plans = [
        plan_module(weights, stack_want, fmt.block, fmt.layer_prefix.format(g=g), fmt.conv1d) for g in range(n_layers)
    ]
    extra = unexpected(weights, fmt, cfg.tie_embeddings)
    if extra:
        raise CorruptFileError(
            f"the checkpoint holds {extra[0]}"
            + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
            + f", which stackwise's {family} has no place for: it cannot be represented exactly",
            hint="nothing was written",
        )

    created = not project.root.exists()
    try:
        result = _write(
            hf_dir,
            project,
            recipe,
            weights,
            ends_plan,
            block_plans,
            embed_rows,
            added_ids,
            inputs,
            reporter or QUIET,
            on_stack,
        )
    except BaseException:
        _remove(project, created)
        raise
    result.added_tokens = added
    result.time_s = time.perf_counter() - start
    log.info("imported %s into %s in %.1f s", hf_dir, project.root, result.time_s)
    return result


INIT_FUNCTIONS = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_", "zeros_", "ones_")


@contextlib.contextmanager
def empty_modules():
    """Build modules on the meta device with torch.nn.init's functions as no-ops: no memory, no random init (which on
    the meta device would also pull in torch._dynamo, seconds of imports), as transformers' ``no_init_weights``."""
    import torch

    saved = {name: getattr(torch.nn.init, name) for name in INIT_FUNCTIONS}
    try:
        for name in INIT_FUNCTIONS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def _module_shapes(recipe, embed_rows: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Our tensor names and shapes of the ends (at the checkpoint's ``embed_rows``) and of one block."""
    import dataclasses

    from stackwise_cli.model.model import Block, Ends

    cfg = dataclasses.replace(recipe.model, vocab_size=embed_rows)
    with empty_modules():
        ends = Ends(cfg)
        block = Block(cfg, recipe.attention)
    return (
        {k: tuple(v.shape) for k, v in ends.state_dict().items()},
        {k: tuple(v.shape) for k, v in block.state_dict().items()},
    )


def _remove(project, created: bool) -> None:
    if created:
        shutil.rmtree(project.root, ignore_errors=True)
        return
    from stackwise_cli.store.project import DATA, ENDS, MANIFEST, STACKS, TOKENIZER, TOKENIZER_CONFIG

    for name in (MANIFEST, DATA, STACKS, ENDS, TOKENIZER, TOKENIZER_CONFIG):
        p = project.root / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def _write(hf_dir, project, recipe, weights, ends_plan, block_plans, embed_rows, added_ids, inputs, reporter, on_stack):
    import time
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

    from stackwise_cli.data.prepare import prepare
    from stackwise_cli.model.io import save_ends, save_stack
    from stackwise_cli.model.model import Ends, Stack
    from stackwise_cli.store.files import atomic_write_text
    from stackwise_cli.store.manifest import EndsEntry, SourceEntry, StackEntry
    from stackwise_cli.store.project import TOKENIZER_CONFIG, record

    # Hashing is most of the CPU time (the source files once, each written file once): the source is hashed in one
    # thread and each stack written (serialised, fsynced, hashed) in another while the next one is read; hashlib and
    # safetensors release the GIL. At most one stack waits to be written, so the peak stays about two stacks.
    files = sorted({*weights.files, hf_dir / CONFIG, *(hf_dir / n for n in (INDEX, *TOKENIZER_FILES))})
    files = [f for f in files if f.is_file()]
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as writer:
        source_hashes = [hasher.submit(_sha256, f) for f in files]
        started = time.perf_counter()
        m = prepare(project, recipe, inputs, hf_dir, reporter)
        prepare_s = time.perf_counter() - started
        # The project's tokenizer.json says nothing of its end-of-text token; this beside it does (eos_token_of).
        text = json.dumps({"eos_token": m.tokenizer.eos_token}) + "\n"
        atomic_write_text(project.path(TOKENIZER_CONFIG), text)
        cfg = recipe.model
        handles = {f: safe_open(str(f), framework="pt") for f in weights.files}
        bytes_read = sum(f.stat().st_size for f in weights.files)

        ends_tensors = read_parts(weights, ends_plan, handles)
        rows = cfg.vocab_size - embed_rows
        for name in ("embed.weight", "head.weight", "out_bias"):
            if name in ends_tensors:
                ends_tensors[name] = grow_rows(ends_tensors[name], rows, added_ids)
        with empty_modules():
            ends = Ends(cfg)
        ends.load_state_dict(ends_tensors, assign=True, strict=True)
        ends_saved = writer.submit(save_ends, project, ends)
        del ends, ends_tensors

        bps = recipe.rack.blocks_per_stack
        pending = [ends_saved]
        saved = []
        for stack_id in range(recipe.rack.stacks):
            tensors = {}
            for i in range(bps):
                block = read_parts(weights, block_plans[stack_id * bps + i], handles)
                tensors.update({f"blocks.{i}.{k}": v for k, v in block.items()})
            with empty_modules():
                stack = Stack(cfg, bps, recipe.attention)
            stack.load_state_dict(tensors, assign=True, strict=True)
            while len(pending) > 1:  # one write in flight at most
                pending.pop(0).result()
            future = writer.submit(save_stack, project, stack, stack_id)
            pending.append(future)
            saved.append(future)
            del stack, tensors
            if on_stack is not None:
                on_stack(stack_id)
        ends_sha, input_sha = ends_saved.result()
        entries = [
            StackEntry(
                id=stack_id,
                blocks=bps,
                file=project.stack_file(stack_id),
                sha256=future.result(),
                state="trained",
                init="pretrained",
                trained_by="pretrained",
            )
            for stack_id, future in enumerate(saved)
        ]
        handles.clear()
        source = SourceEntry(
            dir=str(hf_dir.resolve()),
            architecture=HF_FORMATS[cfg.family].architecture,
            files={f.name: h.result() for f, h in zip(files, source_hashes, strict=True)},
        )
    with project.update() as m:
        m.ends = EndsEntry(file=project.ends_file, sha256=ends_sha, input_sha256=input_sha)
        m.rack = entries
        m.next_id = len(entries)
        m.source = source
        record(m, f"import {hf_dir} ({source.architecture}, {len(entries)} stacks of {bps} block(s))")
    return ImportResult(
        project=str(project.root),
        family=cfg.family,
        architecture=source.architecture,
        layers=len(block_plans),
        stacks=[e.id for e in entries],
        blocks_per_stack=bps,
        params=cfg.ends_params() + cfg.stack_params(bps, recipe.attention) * len(entries),
        vocab_size=cfg.vocab_size,
        added_tokens=[],
        bytes_read=bytes_read,
        prepare_s=prepare_s,
    )
