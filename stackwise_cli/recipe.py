"""Recipes: the schema, loading from YAML, ``--set key=value`` overrides, and validation.

Precedence: schema defaults < recipe file < ``--set`` < explicit command flags. The resolved recipe is
written into the manifest, so a run can be reproduced from the manifest alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml

from stackwise_cli.curricula import CURRICULA, curriculum_of
from stackwise_cli.errors import RecipeError
from stackwise_cli.model.config import AttentionConfig, ModelConfig
from stackwise_cli.objectives import OBJECTIVES, objective_kind
from stackwise_cli.schema import OneOf, SchemaError, check, from_data, to_data

Objective = Annotated[str, OneOf(OBJECTIVES)]  # a registered objective's name (stackwise_cli/objectives/)
Curriculum = Annotated[str, OneOf(CURRICULA)]  # a registered curriculum's name (stackwise_cli/curricula.py)
Init = Literal["random", "copy", "identity"]
CacheDtype = Literal["bf16", "fp32", "fp8"]  # fp8: e4m3 codes with one fp32 scale per token
FrozenDtype = Literal["fp32", "bf16", "fp8", "nf4", "fp4"]
Schedule = Literal["linear", "cosine"]


@dataclass(frozen=True, kw_only=True)
class RackRecipe:
    """The planned rack that ``stackwise build`` grows towards."""

    stacks: int = 4
    blocks_per_stack: int = 1
    init: Init = "random"
    # The depth a random init scales output projections for (N(0, init_std / sqrt(2 x depth)), GPT-2's residual
    # scaling); null: the planned rack's blocks. Set it to give two racks of different depths the same init.
    init_depth: int | None = None

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.stacks < 1:
            out.append(("stacks", f"must be >= 1, got {self.stacks}"))
        if self.init_depth is not None and self.init_depth < 1:
            out.append(("init_depth", f"must be >= 1 (null: the planned rack's blocks), got {self.init_depth}"))
        if self.blocks_per_stack < 1:
            out.append(("blocks_per_stack", f"must be >= 1, got {self.blocks_per_stack}"))
        return out


@dataclass(frozen=True, kw_only=True)
class DataRecipe:
    seq_len: int = 128  # tokens per packed sequence
    val_fraction: float = 0.02  # share of documents held out, chosen by a hash of their text
    # Fewer val sequences than this from whole documents: documents are cut into chunks instead (docs/project.md)
    min_val_sequences: int = 64
    max_bytes: int | None = 8_000_000  # cap on the input text read (None = all of it)
    sequences_per_shard: int = 2048
    min_frequency: int = 2  # tokenizer training: merges need this many occurrences
    text_field: str = "text"  # the JSONL field / Parquet, Arrow, CSV column holding the text

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not self.text_field:
            out.append(("text_field", "must name a field or column, got an empty string"))
        if self.seq_len < 2:
            out.append(("seq_len", f"must be >= 2, got {self.seq_len}"))
        if not 0 < self.val_fraction < 1:
            out.append(("val_fraction", f"must be between 0 and 1 (exclusive), got {self.val_fraction}"))
        if self.max_bytes is not None and self.max_bytes < 1:
            out.append(("max_bytes", f"must be >= 1 or null, got {self.max_bytes}"))
        if self.min_val_sequences < 1:
            out.append(("min_val_sequences", f"must be >= 1, got {self.min_val_sequences}"))
        if self.sequences_per_shard < 1:
            out.append(("sequences_per_shard", f"must be >= 1, got {self.sequences_per_shard}"))
        return out


@dataclass(frozen=True, kw_only=True)
class MaskRecipe:
    """``objective: mlm``: BERT masking. Each position is selected with probability ``ratio``; a selected position
    becomes ``[MASK]`` with probability ``mask_token``, a random token with ``random_token``, and stays as it is
    otherwise. The loss is on the selected positions only."""

    ratio: float = 0.15
    mask_token: float = 0.8
    random_token: float = 0.1

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0 < self.ratio < 1:
            out.append(("ratio", f"must be between 0 and 1 (exclusive), got {self.ratio}"))
        for name in ("mask_token", "random_token"):
            if not 0 <= getattr(self, name) <= 1:
                out.append((name, f"must be between 0 and 1, got {getattr(self, name)}"))
        if self.mask_token + self.random_token > 1:
            out.append(
                ("random_token", f"mask_token + random_token must be <= 1, got {self.mask_token + self.random_token}")
            )
        return out


@dataclass(frozen=True, kw_only=True)
class DiffusionRecipe:
    """``objective: diffusion`` (masked diffusion): each token becomes ``[MASK]`` with probability t; the loss is the
    cross-entropy on the masked tokens.

    ``time: depth``: stack i of the planned rack owns the mask ratio ``t_i`` of ``schedule`` (``linear`` or ``cosine``
    from ``t_max`` at the left to ``t_min`` at the right, or an explicit list, one ratio per planned stack).
    ``time: input``: t is drawn per sequence, uniform in [t_min, t_max], and fed to every stack through its time
    embedding (``model.time_embedding: true``). ``time: drawn``: t drawn per sequence the same way for every stack,
    and not fed in (the network reads the noise level off the masks, as MDLM and LLaDA do, and as end to end trains
    a time-as-depth recipe)."""

    time: Literal["depth", "input", "drawn"] = "depth"
    schedule: Schedule | list[float] = "linear"
    t_max: float = 0.9
    t_min: float = 0.15
    eval_points: int = 8  # t grid (midpoints of equal bins of (0, 1]) for the ELBO in eval

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if not 0 < self.t_min <= self.t_max < 1:
            out.append(("t_min", f"need 0 < t_min <= t_max < 1, got t_min {self.t_min}, t_max {self.t_max}"))
        if isinstance(self.schedule, list):
            if not self.schedule:
                out.append(("schedule", "an explicit schedule needs one ratio per planned stack, got []"))
            if any(not 0 < t < 1 for t in self.schedule):
                out.append(("schedule", f"every ratio must be between 0 and 1 (exclusive), got {self.schedule}"))
            elif any(a < b for a, b in zip(self.schedule, self.schedule[1:])):
                out.append(("schedule", f"ratios must not increase from left to right, got {self.schedule}"))
        if self.eval_points < 1:
            out.append(("eval_points", f"must be >= 1, got {self.eval_points}"))
        return out

    def ratios(self, stacks: int) -> list[float]:
        """The mask ratio of each planned stack, left to right (highest first)."""
        if isinstance(self.schedule, list):
            return list(self.schedule)
        if stacks == 1:
            return [self.t_max]
        out = []
        for i in range(stacks):
            x = i / (stacks - 1)  # 0 at the left, 1 at the right
            w = x if self.schedule == "linear" else 0.5 * (1 - math.cos(math.pi * x))
            out.append(round(self.t_max + (self.t_min - self.t_max) * w, 6))
        return out


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    steps: int = 300  # optimizer steps per stack
    # Each stack's steps as a multiple of train.steps, in the order the stacks are grown (left to right: from the
    # input; right to left: from the output), e.g. [2.2, 0.6, 0.6, 0.6]; null = train.steps for every stack.
    step_scale: list[float] | None = None
    # per-stack: every stack warms up and decays on its own; whole-rack: one warmup and cosine over the planned
    # steps of every stack, each stack training on its slice (the first stacks at the high learning rates).
    lr_schedule: Literal["per-stack", "whole-rack"] = "per-stack"
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step: a step trains on grad_accum * batch_size sequences
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    head: Literal["train", "frozen"] = "train"  # final norm + LM head trained with each stack, or frozen
    embedding: Literal["train", "frozen"] = "train"  # the embedding trains with the leftmost stack, or stays at init
    frozen_dtype: FrozenDtype = "bf16"  # right-to-left: storage precision of the frozen suffix
    # Left to right, what a stack after the first reads: `cache` (the hidden states of the whole train split, computed
    # once by `stackwise cache`) or `recompute` (the frozen prefix run forward, no grad, on every batch: no cache
    # pass, no cache on disk; cheaper when the stack reads fewer sequences x prefix stacks than the split holds).
    prefix: Literal["cache", "recompute"] = "cache"
    suffix_checkpointing: bool = True  # right-to-left: recompute the suffix in backward instead of keeping it
    activation_checkpointing: bool = False  # recompute each trained block in backward (keeps only block inputs)
    finetune_checkpointing: bool = True  # the same for every block of a fuse fine-tune (full, lora, qlora)
    # A fuse fine-tune's own schedule: its peak learning rate and warmup (null: train.lr, train.warmup_steps), then
    # a cosine to that peak x min_lr_ratio over its --finetune-steps.
    finetune_lr: float | None = None
    finetune_warmup_steps: int | None = None
    compile: bool = False  # torch.compile the trained stacks (traced at the first step: minutes on a large model)
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit: bitsandbytes 8-bit states (paged on CUDA)
    checkpoint_every: int = 100  # steps between checkpoints; 0 = off
    checkpoint_every_min: float = 0.0  # minutes of wall time between checkpoints; 0 = off
    keep_checkpoints: int = 2
    log_every: int = 10
    eval_every: int = 0  # steps between validation scores during training (eval.max_sequences of val); 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                out.append((name, f"must be >= 1, got {getattr(self, name)}"))
        if self.lr <= 0:
            out.append(("lr", f"must be > 0, got {self.lr}"))
        if self.finetune_lr is not None and self.finetune_lr <= 0:
            out.append(("finetune_lr", f"must be > 0 (null: train.lr), got {self.finetune_lr}"))
        if self.finetune_warmup_steps is not None and self.finetune_warmup_steps < 0:
            got = self.finetune_warmup_steps
            out.append(("finetune_warmup_steps", f"must be >= 0 (null: train.warmup_steps), got {got}"))
        if not 0 <= self.min_lr_ratio <= 1:
            out.append(("min_lr_ratio", f"must be between 0 and 1, got {self.min_lr_ratio}"))
        if self.warmup_steps < 0 or self.warmup_steps >= max(self.steps, 1):
            out.append(("warmup_steps", f"must be >= 0 and < train.steps ({self.steps}), got {self.warmup_steps}"))
        if not all(0 <= b < 1 for b in self.betas):
            out.append(("betas", f"must both be in [0, 1), got {list(self.betas)}"))
        if self.grad_clip < 0:
            out.append(("grad_clip", f"must be >= 0, got {self.grad_clip}"))
        if self.checkpoint_every < 0:
            out.append(("checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"))
        if self.eval_every < 0:
            out.append(("eval_every", f"must be >= 0 (0 = off), got {self.eval_every}"))
        if self.checkpoint_every_min < 0:
            out.append(("checkpoint_every_min", f"must be >= 0, got {self.checkpoint_every_min}"))
        if self.keep_checkpoints < 2:
            out.append(
                ("keep_checkpoints", f"must be >= 2 (a crash mid-write must leave one), got {self.keep_checkpoints}")
            )
        if self.log_every < 1:
            out.append(("log_every", f"must be >= 1, got {self.log_every}"))
        if self.step_scale is not None:
            if any(x <= 0 for x in self.step_scale):
                out.append(("step_scale", f"must be > 0 each, got {self.step_scale}"))
            elif any(round(self.steps * x) <= self.warmup_steps for x in self.step_scale):
                out.append(
                    (
                        "step_scale",
                        f"gives a stack {min(round(self.steps * x) for x in self.step_scale)} steps, not more than "
                        f"train.warmup_steps ({self.warmup_steps})",
                    )
                )
        return out


@dataclass(frozen=True, kw_only=True)
class CacheRecipe:
    dtype: CacheDtype = "bf16"
    batch_size: int = 32  # sequences per forward pass while computing a cache

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        return [("batch_size", f"must be >= 1, got {self.batch_size}")] if self.batch_size < 1 else []


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    max_sequences: int | None = 256  # validation sequences scored (None = the whole split)
    batch_size: int = 32

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.max_sequences is not None and self.max_sequences < 1:
            out.append(("max_sequences", f"must be >= 1 or null, got {self.max_sequences}"))
        if self.batch_size < 1:
            out.append(("batch_size", f"must be >= 1, got {self.batch_size}"))
        return out


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    objective: Objective = "clm"
    curriculum: Curriculum = "left-to-right"
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    rack: RackRecipe = field(default_factory=RackRecipe)
    data: DataRecipe = field(default_factory=DataRecipe)
    train: TrainRecipe = field(default_factory=TrainRecipe)
    cache: CacheRecipe = field(default_factory=CacheRecipe)
    eval: EvalRecipe = field(default_factory=EvalRecipe)
    mask: MaskRecipe = field(default_factory=MaskRecipe)
    diffusion: DiffusionRecipe = field(default_factory=DiffusionRecipe)

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.data.seq_len > self.model.max_seq_len:
            out.append(
                ("data.seq_len", f"must be <= model.max_seq_len ({self.model.max_seq_len}), got {self.data.seq_len}")
            )
        out.extend(self.attention.model_problems(self.model))
        objective = objective_kind(self.objective)
        out.extend(objective.problems(self))
        curriculum = curriculum_of(self)
        if self.train.prefix == "recompute" and not curriculum.reads_prefix:
            out.append(("train.prefix", f"recompute applies to left-to-right only, not {self.curriculum}"))
        scale = self.train.step_scale
        if scale is not None and (curriculum.whole_rack or len(scale) != self.rack.stacks):
            why = "end to end trains every stack together" if curriculum.whole_rack else ""
            out.append(
                (
                    "train.step_scale",
                    why or f"needs one factor per planned stack (rack.stacks = {self.rack.stacks}), got {len(scale)}",
                )
            )
        if self.model.tie_embeddings and self.train.embedding == "frozen":
            out.append(
                (
                    "train.embedding",
                    "must be 'train' with model.tie_embeddings: the tied head is the embedding, and the first stack "
                    "must train its head",
                )
            )
        if objective.time_input(self) != getattr(self.model, "time_embedding", False):
            out.append(
                (
                    "model.time_embedding",
                    "must be true exactly when objective is diffusion with diffusion.time 'input' "
                    f"(objective {self.objective!r}, diffusion.time {self.diffusion.time!r})",
                )
            )
        return out

    @property
    def bidirectional(self) -> bool:
        """mlm and diffusion attend both ways; clm is causal."""
        return not objective_kind(self.objective).causal

    def to_data(self) -> dict[str, Any]:
        return to_data(self)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"--set {text!r}: expected key=value, e.g. --set train.steps=200")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``--set`` overrides to plain recipe data (before validation, so typos are caught by the schema)."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise RecipeError(f"--set {text}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return data


def recipe_from_data(data: Any, source: str) -> Recipe:
    """Validate plain recipe data; every problem is reported at once, prefixed by ``source``."""
    try:
        return from_data(Recipe, data)
    except SchemaError as e:
        lines = [f"{source}: {p}: {m}" if p else f"{source}: {m}" for p, m in e.problems]
        raise RecipeError("\n".join(lines)) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a recipe file, apply ``--set`` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(
            f"cannot read recipe {path}: {e.strerror}", hint="see recipes/ for the shipped ones"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: must be a mapping of sections (model:, train:, ...)")
    data.setdefault("name", path.stem)
    return recipe_from_data(apply_overrides(data, overrides or []), str(path))
