"""The manifest schema: everything needed to inspect a run by hand, in one YAML file (``stackwise.yaml``).

Strict: unknown keys are rejected and every problem is reported with its key path, so a hand edit that
breaks the file is caught before anything acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from stackwise_cli.curricula import trained_together
from stackwise_cli.objectives import Objective, objective_for, objective_kind
from stackwise_cli.recipe import Recipe

FORMAT_VERSION = 1
HISTORY_LIMIT = 200

StackState = Literal["new", "training", "trained", "frozen"]


@dataclass(kw_only=True)
class ShardEntry:
    file: str  # relative to the project root
    sequences: int
    tokens: int
    sha256: str


@dataclass(kw_only=True)
class SplitEntry:
    sequences: int
    tokens: int
    shards: list[ShardEntry]


@dataclass(kw_only=True)
class TokenizerEntry:
    file: str
    sha256: str
    vocab_size: int  # tokens the tokenizer defines (<= model.vocab_size)
    eos_id: int
    trained: bool  # trained by prepare, or loaded from --tokenizer
    eos_token: str = "<|endoftext|>"  # separates documents: the tokenizer config's eos_token for a loaded one
    mask_id: int | None = None  # [MASK], the input of masked positions (mlm, diffusion)
    pad_id: int | None = None  # [PAD]: pads batches in a Hugging Face fine-tune of the export; never in the data
    special_ids: list[int] = field(default_factory=list)  # every special token (never an mlm random replacement)


@dataclass(kw_only=True)
class HoldoutEntry:
    """How the val split was made (docs/project.md): ``documents`` (whole documents by hash), ``chunks``
    (documents cut into chunks, as whole documents gave too little val) or ``val-input`` (prepare --val-input)."""

    method: str
    val_units: int  # documents or chunks that went to val
    dropped_units: int  # val documents or chunks dropped: their text occurs in train
    dropped_sequences: int  # val sequences dropped: they occur verbatim in the train token stream
    min_val_raised: bool = False  # chunks: val topped up past data.val_fraction to data.min_val_sequences
    source: list[str] = field(default_factory=list)  # val-input: the val input paths


@dataclass(kw_only=True)
class DataEntry:
    source: list[str]
    seq_len: int
    documents: dict[str, int]
    splits: dict[str, SplitEntry]
    holdout: HoldoutEntry | None = None  # None: a project prepared before this was recorded
    warnings: list[str] = field(default_factory=list)  # what prepare warned about (input cut at max_bytes, ...)


@dataclass(kw_only=True)
class EndsEntry:
    file: str
    sha256: str
    input_sha256: str  # digest of the embedding alone: caches depend on it, not on the head


@dataclass(kw_only=True)
class StackEntry:
    id: int
    blocks: int
    file: str
    sha256: str
    state: StackState = "new"
    init: str = "random"
    steps: int = 0
    tokens: int = 0
    last_loss: float | None = None
    precision: str | None = None
    mask_ratio: float | None = None  # mlm: the recipe's ratio; diffusion time-as-depth: this stack's t
    trained_by: str | None = None  # the curriculum that trained it: left-to-right, right-to-left, end-to-end
    # Training FLOPs of its train-stack runs (every run, as steps and tokens add up), by the planner's formulas
    # (docs/memory.md, "FLOPs"); end to end, the whole run's, on every stack of it as its steps and tokens are.
    flops: float = 0.0


@dataclass(kw_only=True)
class StackRef:
    id: int
    sha256: str


@dataclass(kw_only=True)
class Upstream:
    """Checksums of everything that produced an artifact; a mismatch with the current files means stale."""

    data: str  # digest of the split's token shards
    ends_input: str
    stacks: list[StackRef]
    inputs: str = "tokens"  # how the tokens are corrupted before the embedding (objective, mask ratio, seed)


@dataclass(kw_only=True)
class CacheShard:
    file: str
    sequences: int
    sha256: str


@dataclass(kw_only=True)
class CacheEntry:
    stack: int
    split: str
    dtype: str
    seq_len: int
    d_model: int
    complete: bool
    upstream: Upstream
    shards: list[CacheShard] = field(default_factory=list)
    flops: float = 0.0  # the forward passes that computed its shards (each shard written, rewrites included)
    removed: bool = False  # `stackwise clean` deleted its shards (incomplete, none left); its FLOPs still count


@dataclass(kw_only=True)
class FusedEntry:
    dir: str
    sha256: str  # of model.safetensors
    ends: str  # sha256 of the ends file it was built from
    stacks: list[StackRef]
    # End-to-end fine-tuning at fuse time (docs/finetune.md); None = the rack fused as trained.
    finetune: Literal["full", "lora", "qlora"] | None = None
    finetune_steps: int = 0
    lora_rank: int | None = None
    lora_alpha: float | None = None
    finetune_loss: float | None = None  # the mean training loss of the last logged steps
    # The validation loss of fused/ itself, as `eval --fused` scores it (split val, eval.max_sequences, the recipe's
    # objective); written by `eval --fused` and by a fine-tuning fuse. None: not scored yet.
    val_loss: float | None = None
    finetune_flops: float = 0.0  # training FLOPs of the fine-tune that made fused/ (0: none)


@dataclass(kw_only=True)
class FlopsEntry:
    """The training FLOPs that produced the current rack, its train caches and fused/, by stage (the sum of the
    ``flops`` recorded on the stacks, the train-split caches and fused/; an end-to-end run counts once)."""

    train: float = 0.0  # train-stack runs
    cache: float = 0.0  # cache passes over the train split
    finetune: float = 0.0  # the fuse fine-tune
    total: float = 0.0


@dataclass(kw_only=True)
class SourceEntry:
    """Where an imported rack's weights came from (``stackwise import``): the Hugging Face folder, its class, and
    the sha256 of each file read."""

    dir: str
    architecture: str
    files: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class HarnessRun:
    """One `eval --tasks` run of lm-evaluation-harness (docs/harness.md); the full results are in ``file``."""

    time: str
    file: str  # the harness's results JSON, relative to the project root (eval/harness-<time>.json)
    model: str  # what was scored: "fused" (fused/) or "rack" (the rack's files)
    adapter: str  # "hf": the harness's own Hugging Face model on fused/; "stackwise": stackwise's harness model
    scoring: str  # "exact" (clm), "bound" (diffusion: Monte-Carlo ELBO), "score" (mlm: ranks choices, no bound)
    tasks: list[str]
    num_fewshot: int | None = None
    limit: float | None = None
    mc_samples: int | None = None  # Monte-Carlo masks per request (bound, score); None when exact
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)  # task -> metric -> value


@dataclass(kw_only=True)
class HistoryEntry:
    time: str
    command: str
    host: str
    pid: int


@dataclass(kw_only=True)
class Manifest:
    format: int = FORMAT_VERSION
    created: str
    recipe: Recipe
    tokenizer: TokenizerEntry
    data: DataEntry
    ends: EndsEntry | None = None
    next_id: int = 0
    rack: list[StackEntry] = field(default_factory=list)
    caches: list[CacheEntry] = field(default_factory=list)
    fused: FusedEntry | None = None
    flops: FlopsEntry | None = None  # None: nothing counted yet (or a manifest from before FLOPs were recorded)
    harness: list[HarnessRun] = field(default_factory=list)  # `eval --tasks` runs, the latest last
    source: SourceEntry | None = None  # an imported checkpoint's provenance; None: the rack started from random
    history: list[HistoryEntry] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        out = []
        if self.format != FORMAT_VERSION:
            out.append(("format", f"this stackwise reads format {FORMAT_VERSION}, the file says {self.format}"))
        ids = [s.id for s in self.rack]
        if len(set(ids)) != len(ids):
            out.append(("rack", f"stack ids must be unique, got {ids}"))
        if ids and self.next_id <= max(ids):
            out.append(("next_id", f"must be greater than every stack id ({max(ids)}), got {self.next_id}"))
        return out

    def __post_init__(self) -> None:
        from stackwise_cli.schema import check

        check(self)

    # --- lookups -------------------------------------------------------------------------------------------

    def ids(self) -> list[int]:
        return [s.id for s in self.rack]

    def position(self, stack_id: int) -> int:
        """Index of the stack in rack order; ProjectError naming the ids there are."""
        from stackwise_cli.errors import ProjectError

        for i, s in enumerate(self.rack):
            if s.id == stack_id:
                return i
        have = ", ".join(str(i) for i in self.ids()) or "none yet"
        raise ProjectError(
            f"no stack with id {stack_id} in the rack (ids in rack order: {have})", hint="see `stackwise status`"
        )

    def stack(self, stack_id: int) -> StackEntry:
        return self.rack[self.position(stack_id)]

    def require_ends(self) -> EndsEntry:
        from stackwise_cli.errors import ProjectError

        if self.ends is None:
            raise ProjectError("the ends (embedding, norm, head) do not exist yet", hint="run `stackwise grow`")
        return self.ends

    def fused_is_current(self) -> bool:
        """Was ``fused/`` built from exactly the current ends and rack (per the manifest)?"""
        f = self.fused
        return (
            f is not None
            and self.ends is not None
            and f.ends == self.ends.sha256
            and [(r.id, r.sha256) for r in f.stacks] == [(s.id, s.sha256) for s in self.rack]
        )

    def count_flops(self) -> FlopsEntry:
        """The training FLOPs recorded on the stacks, the train caches of stacks in the rack, and fused/."""
        ids = set(self.ids())
        e2e = [s.flops for s in self.rack if trained_together(s.trained_by)]  # one run, recorded on every stack
        train = sum(s.flops for s in self.rack if not trained_together(s.trained_by)) + max(e2e, default=0.0)
        cache = sum(c.flops for c in self.caches if c.split == "train" and c.stack in ids)
        finetune = self.fused.finetune_flops if self.fused is not None else 0.0
        return FlopsEntry(train=train, cache=cache, finetune=finetune, total=train + cache + finetune)

    def recount_flops(self) -> None:
        """Refresh the ``flops`` totals after a stage recorded what it spent."""
        self.flops = self.count_flops()

    def cache(self, stack_id: int, split: str) -> CacheEntry | None:
        for c in self.caches:
            if c.stack == stack_id and c.split == split:
                return c
        return None


def stack_objective(m: Manifest, stack_id: int | None) -> Objective:
    """The objective stack ``stack_id`` trains with (None: the whole rack end to end, t drawn per sequence)."""
    if stack_id is None:
        ratio = objective_kind(m.recipe.objective).rack_ratio(m.recipe)
    else:
        ratio = m.stack(stack_id).mask_ratio
    return objective_for(m.recipe, m.tokenizer.mask_id, m.tokenizer.vocab_size, ratio, tokenizer_special_ids(m))


def tokenizer_special_ids(m: Manifest) -> tuple[int, ...]:
    """The project's special token ids: EOS, PAD and any other the tokenizer declares; the mask token is excluded
    from replacements regardless. A manifest written before ``special_ids`` was recorded gets none: its stacks
    trained with replacements drawn from every id but the mask, and its masks (and caches) stay those."""
    t = m.tokenizer
    if not t.special_ids:
        return ()
    return tuple(sorted({t.eos_id, *t.special_ids} | ({t.pad_id} if t.pad_id is not None else set())))
