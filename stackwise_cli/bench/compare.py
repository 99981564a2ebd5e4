"""``stackwise bench compare SPEC.yaml``: several arms trained at one FLOP budget, scored alike (docs/science.md).

A spec lists arms (a recipe plus overrides each, of kind ``stackwise`` or ``peer``) and one budget, in FLOPs or as
the FLOPs of a named arm at its recipe's steps. The data is prepared once (``OUT/data-project``) and every arm's
project gets a copy of its tokenizer and shards, so all arms train on the same split and are scored on the same val
sequences. Each arm's ``train.steps`` is solved so that its FLOPs, counted with the planner's per-stage formulas
(``bench/plan.py``), come nearest the budget. Each arm runs in ``OUT/arms/NAME/`` and counts as done once its
``result.json`` is written (atomically), so a rerun skips it; ``--arm NAME`` runs one arm (one Slurm array task).
Every arm is scored by one evaluator, Hugging Face's forward of its exported model (``bench/peer.py``), and the
report is a table (``results.json``, ``results.md``) and a plot of val loss against cumulative FLOPs.

Layering: this is a pipeline over ``build`` (it runs each stack-wise arm's stages, then ``build`` fuses and scores),
so it imports the build core like a command would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from stackwise_cli.bench.plan import PlanOptions, plan
from stackwise_cli.bench.step import _reset_peak_rss, _rss_bytes, exact_rss_accounting
from stackwise_cli.build import export_problem_for
from stackwise_cli.curricula import curriculum_of
from stackwise_cli.errors import RecipeError, StackwiseError
from stackwise_cli.flops import FlopShapes, cache_flops_per_token, whole_model_flops_per_token
from stackwise_cli.objectives import objective_kind
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import DataRecipe, Recipe, load_recipe, recipe_from_data
from stackwise_cli.schema import SchemaError, check, from_data, to_data
from stackwise_cli.store.files import atomic_write_text, exclusive_lock
from stackwise_cli.store.project import Project

log = logging.getLogger(__name__)

ArmKind = Literal["stackwise", "peer"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_BIG_DEVICE = 1 << 50  # the plan is asked for FLOPs and bytes, not for a fit


class CompareError(StackwiseError):
    """A comparison spec that does not validate, or an arm that cannot run as the spec says."""


# --- the spec --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class BudgetSpec:
    flops: float | None = None  # the FLOPs every arm spends
    like: str | None = None  # ... or: the FLOPs arm ``like`` spends at its recipe's train.steps

    def __post_init__(self) -> None:
        from stackwise_cli.schema import check

        check(self)

    def problems(self) -> list[tuple[str, str]]:
        if (self.flops is None) == (self.like is None):
            return [("", "give exactly one of flops: (a number) or like: (an arm's name)")]
        if self.flops is not None and not self.flops > 0:
            return [("flops", f"must be > 0, got {self.flops}")]
        return []


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """What ``prepare`` gets, once for every arm."""

    input: list[str] = field(default_factory=list)  # text / JSONL / Parquet / Arrow paths (default: built-in corpus)
    val_input: list[str] = field(default_factory=list)
    tokenizer: str | None = None  # a tokenizer.json to use instead of training one
    set: dict[str, Any] = field(default_factory=dict)  # recipe data.* keys, applied to every arm


@dataclass(frozen=True, kw_only=True)
class EvalSpec:
    max_sequences: int = 256  # the first N val sequences, the same for every arm
    batch_size: int = 32
    peer_points: int = 4  # val evaluations during the peer's training (the plot's points)
    mask_ratio: float = 0.15  # mlm arms: the share of positions masked when scoring (the same for every arm)
    elbo_points: int = 8  # diffusion arms: the t grid of the ELBO bound

    def __post_init__(self) -> None:
        from stackwise_cli.schema import check

        check(self)

    def problems(self) -> list[tuple[str, str]]:
        out = [
            (k, f"must be >= 1, got {getattr(self, k)}")
            for k in ("max_sequences", "batch_size", "peer_points", "elbo_points")
            if getattr(self, k) < 1
        ]
        if not 0 < self.mask_ratio < 1:
            out.append(("mask_ratio", f"must be between 0 and 1, got {self.mask_ratio}"))
        return out

    def key(self, objective: str) -> dict:
        """What of the eval settings an arm's score depends on (its fingerprint): the masked keys only for the
        masked objectives, so a clm arm's result stays valid whatever they are."""
        data = to_data(self)
        if objective != "mlm":
            data.pop("mask_ratio")
        if objective != "diffusion":
            data.pop("elbo_points")
        return data


@dataclass(frozen=True, kw_only=True)
class FinetuneArm:
    """A full fine-tune of the fused rack after the last stack (``fuse --finetune-steps N``), given ``share`` of the
    budget."""

    share: float

    def __post_init__(self) -> None:
        check(self)

    def problems(self) -> list[tuple[str, str]]:
        return [] if 0 < self.share < 1 else [("share", f"must be between 0 and 1 (of the budget), got {self.share}")]


@dataclass(frozen=True, kw_only=True)
class ArmSpec:
    name: str
    recipe: str
    kind: ArmKind = "stackwise"
    set: dict[str, Any] = field(default_factory=dict)  # recipe overrides, as --set key=value: {train.lr: 0.003}
    finetune: FinetuneArm | None = None  # stack-wise arms: a fine-tune of the fused rack inside the budget


@dataclass(frozen=True, kw_only=True)
class Spec:
    budget: BudgetSpec
    arms: list[ArmSpec]
    data: DataSpec = field(default_factory=DataSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    out: str | None = None  # the output folder (relative to the current directory); -o overrides it


@dataclass
class Arm:
    """One arm, resolved: its recipe (before the budget sets train.steps) and the overrides that made it."""

    name: str
    kind: ArmKind
    recipe_path: Path
    overrides: list[str]
    recipe: Recipe
    finetune: FinetuneArm | None = None


@dataclass
class Comparison:
    spec_path: Path
    spec: Spec
    arms: list[Arm]
    out: Path

    def arm(self, name: str) -> Arm:
        for a in self.arms:
            if a.name == name:
                return a
        raise CompareError(
            f"{self.spec_path}: no arm {name!r} (arms: {', '.join(a.name for a in self.arms)})",
            hint="pass --arm with one of the spec's arm names",
        )

    def arm_dir(self, name: str) -> Path:
        return self.out / "arms" / name

    @property
    def data_project(self) -> Project:
        return Project(self.out / "data-project")


def _resolve_path(text: str, spec_dir: Path) -> Path:
    """A relative path is looked up in the current directory, then beside the spec."""
    p = Path(text).expanduser()
    if p.is_absolute() or p.exists() or not (spec_dir / p).exists():
        return p
    return spec_dir / p


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the value parses back as written


def load_comparison(spec_path: Path, out: Path | None = None) -> Comparison:
    """Read and validate a spec: its schema, every arm's recipe, one tokenizer and data split for all arms. Every
    problem is reported at once, one line each, naming the arm and the key."""
    spec_path = Path(spec_path)
    try:
        data = yaml.safe_load(spec_path.read_text())
    except OSError as e:
        raise CompareError(f"cannot read comparison spec {spec_path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CompareError(f"{spec_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        spec = from_data(Spec, data)
    except SchemaError as e:
        raise CompareError("\n".join(_spec_line(spec_path, data, p, m) for p, m in e.problems)) from None

    problems: list[str] = []
    names = [a.name for a in spec.arms]
    if not spec.arms:
        problems.append(f"{spec_path}: arms: list at least one arm")
    for i, a in enumerate(spec.arms):
        where = f"{spec_path}: arms[{i}] {a.name!r}"
        if not _NAME.match(a.name):
            problems.append(f"{where}: name: must be letters, digits, '_', '.' or '-' (it names a folder)")
        if names.count(a.name) > 1 and names.index(a.name) != i:
            problems.append(f"{where}: name: another arm has this name")
    if spec.budget.like is not None and spec.budget.like not in names:
        problems.append(f"{spec_path}: budget.like: no arm named {spec.budget.like!r} (arms: {', '.join(names)})")
    data_fields = {f.name for f in dataclasses.fields(DataRecipe)}
    for k in spec.data.set:
        if k not in data_fields:
            problems.append(f"{spec_path}: data.set.{k}: unknown key (known keys: {', '.join(sorted(data_fields))})")
    if problems:
        raise CompareError("\n".join(problems))

    spec_dir = spec_path.parent
    data_overrides = [_override(f"data.{k}", v) for k, v in spec.data.set.items()]
    arms: list[Arm] = []
    for i, a in enumerate(spec.arms):
        where = f"{spec_path}: arms[{i}] {a.name!r}"
        path = _resolve_path(a.recipe, spec_dir)
        overrides = data_overrides + [_override(k, v) for k, v in a.set.items()]
        try:
            recipe = load_recipe(path, overrides)
        except RecipeError as e:
            problems.extend(f"{where}: {line}" for line in e.message.splitlines())
            continue
        problem = _scoring_problem(recipe, a.kind)
        if problem:
            problems.append(f"{where}: {problem}")
        if a.finetune is not None and (a.kind == "peer" or curriculum_of(recipe).whole_rack):
            problems.append(f"{where}: finetune: only a stack-wise arm fine-tunes its fused rack")
        if a.finetune is not None and hf_scored_bidirectionally(recipe):
            problems.append(
                f"{where}: finetune: the fine-tune writes fused/, which cannot hold a {recipe.objective} llama"
            )
        if a.finetune is not None and a.name == spec.budget.like:
            problems.append(f"{where}: finetune: the budget's reference arm runs its recipe's steps, with no fine-tune")
        arms.append(Arm(a.name, a.kind, path, overrides, recipe, a.finetune))
    if problems:
        raise CompareError("\n".join(problems))
    problems.extend(_shared_data_problems(spec_path, spec, arms))
    if problems:
        raise CompareError("\n".join(problems))

    out_dir = out if out is not None else (Path(spec.out) if spec.out else None)
    if out_dir is None:
        raise CompareError(f"{spec_path}: no output folder", hint="pass -o DIR, or set out: in the spec")
    return Comparison(spec_path, spec, arms, Path(out_dir))


def hf_scored_bidirectionally(recipe: Recipe) -> bool:
    """A masked llama rack: no transformers class computes it, so the evaluator runs ``LlamaForCausalLM`` on its
    weights with a full attention mask (``bench/peer.bidirectional_llama``)."""
    return not objective_kind(recipe.objective).causal and recipe.model.family == "llama"


def _scoring_problem(recipe: Recipe, kind: ArmKind) -> str | None:
    """Why the one evaluator (a transformers forward) cannot score this arm, or None."""
    if kind == "peer" and recipe.objective == "diffusion":
        return "kind: peer: transformers has no masked-diffusion model to train; compare it with stack-wise arms"
    if kind == "peer" and hf_scored_bidirectionally(recipe):
        return (
            f"kind: peer: transformers has no bidirectional llama to train for {recipe.objective}; "
            "use model.family bert"
        )
    if hf_scored_bidirectionally(recipe):
        from stackwise_cli.model.hf import export_problem

        problem = export_problem(recipe.attention, recipe.model, bidirectional=False)  # the HF class holds it
        if problem:
            return f"attention: the evaluator scores the rack in transformers' LlamaForCausalLM, and {problem}"
        return None
    problem = export_problem_for(recipe)
    return f"attention: the evaluator scores the Hugging Face export, and {problem}" if problem else None


def _spec_line(spec_path: Path, data: Any, path: str, message: str) -> str:
    """A schema problem as one line, with the arm's name beside its index: ``arms[1] 'e2e'.sett: unknown key``."""
    m = re.match(r"^arms\[(\d+)\]", path)
    if m and isinstance(data, dict) and isinstance(data.get("arms"), list):
        i = int(m.group(1))
        arm = data["arms"][i] if i < len(data["arms"]) else None
        if isinstance(arm, dict) and isinstance(arm.get("name"), str):
            path = f"arms[{i}] {arm['name']!r}{path[m.end() :]}"
    return f"{spec_path}: {path}: {message}" if path else f"{spec_path}: {message}"


def _shared_data_problems(spec_path: Path, spec: Spec, arms: list[Arm]) -> list[str]:
    """Every arm must read the same tokenizer and split (the first arm's vocabulary size and data settings) and be
    scored the same way (its objective: one table holds one loss)."""
    first = arms[0]
    out = [
        f"{spec_path}: arms[{i}] {a.name!r}: objective: {a.recipe.objective!r} differs from arm {first.name!r}'s "
        f"{first.recipe.objective!r}; every arm of a comparison is scored by one loss (make a spec per objective)"
        for i, a in enumerate(arms[1:], start=1)
        if a.recipe.objective != first.recipe.objective
    ]
    if out:
        return out
    ref = {"model.vocab_size": first.recipe.model.vocab_size, **_flat(to_data(first.recipe.data), "data")}
    for i, a in enumerate(arms[1:], start=1):
        have = {"model.vocab_size": a.recipe.model.vocab_size, **_flat(to_data(a.recipe.data), "data")}
        for k, v in have.items():
            if v != ref[k]:
                out.append(
                    f"{spec_path}: arms[{i}] {a.name!r}: {k}: {v!r} differs from arm {first.name!r}'s {ref[k]!r}; "
                    "every arm shares one tokenizer and data split (set it under data.set, or alike in every arm)"
                )
    return out


def _flat(data: Any, prefix: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for k, v in data.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _diff(old: Any, new: Any, limit: int = 3) -> str:
    a, b = _flat(old, ""), _flat(new, "")
    changed = [f"{k} was {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more


# --- FLOPs -----------------------------------------------------------------------------------------------------


def plan_for(recipe: Recipe, device: str = "cpu", stacks: int | None = None, finetune: bool = False):
    """The planner's view of what ``build`` runs: fp32 (train-stack's default precision), the recipe's
    activation checkpointing, for ``device``; ``stacks`` plans a shorter rack (right to left: stack j's suffix);
    ``finetune``: what a fuse fine-tune runs (its own ``train.finetune_checkpointing``)."""
    if stacks is not None:
        recipe = dataclasses.replace(recipe, rack=dataclasses.replace(recipe.rack, stacks=stacks))
    tr = recipe.train
    ckpt = tr.finetune_checkpointing if finetune else tr.activation_checkpointing
    return plan(recipe, _BIG_DEVICE, PlanOptions(precision="fp32", device=device, activation_checkpointing=ckpt))


@dataclass
class FlopStage:
    """One training stage of an arm: ``steps_per_unit * n`` optimizer steps of ``flops_per_step`` each (n = the
    arm's train.steps; the peer's n is its total steps), after ``fixed`` FLOPs of cache passes."""

    label: str
    flops_per_step: float
    steps_per_unit: int = 1
    scale: float = 1.0  # train.step_scale's factor for this stack: it runs round(n * scale) * steps_per_unit steps
    cache_per_token: float = 0.0  # FLOPs per token of the cache pass before this stage (l2r, after the first)
    cache_tokens: int = 0

    @property
    def fixed(self) -> float:
        return self.cache_per_token * self.cache_tokens

    def steps_at(self, n: int) -> int:
        """The optimizer steps this stage runs when the arm's train.steps is ``n``."""
        return round(n * self.scale) * self.steps_per_unit


def flop_stages(kind: ArmKind, recipe: Recipe, train_tokens: int) -> list[FlopStage]:
    """The training stages an arm runs, in order, with the FLOPs its runs record: each stage of
    ``train/stage.grown`` (``stage.flops_per_token`` times the tokens of a step), any family. Cache passes (left to
    right from a cache, before each stack after the first) are one forward of a stack over the train split
    (``train_tokens``): build caches the train split only, so each cache after the first is incremental from its
    left neighbour's, and the first runs the ends and stack 0; where train/cache.py never runs incrementally
    (time-as-depth diffusion, an fp8 cache), the cache before stack i runs i stacks from the tokens. Evaluation is
    not training and is not counted."""
    from stackwise_cli.train import stage as stages

    fs, tr = FlopShapes.of(recipe), recipe.train
    per_step = tr.batch_size * tr.grad_accum * recipe.data.seq_len
    if kind == "peer":  # the whole model, trained as end to end trains it
        whole = stages.planned(recipe)[-1]
        return [FlopStage("peer", stages.flops_per_token(whole, fs) * per_step)]
    grown = stages.grown(recipe)
    if curriculum_of(recipe).whole_rack:
        # train-stack all runs rack.stacks x train.steps steps (the token budget of training each stack)
        (whole,) = grown
        return [FlopStage("all", stages.flops_per_token(whole, fs) * per_step, steps_per_unit=recipe.rack.stacks)]
    scale = tr.step_scale or [1.0] * len(grown)  # in growth order, as train-stack reads it
    # train/cache.py's paths: incremental from the left neighbour's cache (one stack), or from the tokens through
    # every stack to the left where each stack's input is masked at its own ratio or the cache is fp8
    from_tokens = objective_kind(recipe.objective).ratio_per_stack(recipe) or recipe.cache.dtype == "fp8"
    bps = recipe.rack.blocks_per_stack
    return [
        FlopStage(
            f"stack {i}",
            stages.flops_per_token(st, fs) * per_step,
            scale=scale[i],
            cache_per_token=cache_flops_per_token(fs, [bps] * (i if from_tokens else 1))
            if st.source == "cache"
            else 0.0,
            cache_tokens=train_tokens if st.source == "cache" else 0,
        )
        for i, st in enumerate(grown)
    ]


def total_flops(stages: list[FlopStage], n: int) -> float:
    return sum(s.fixed + s.steps_at(n) * s.flops_per_step for s in stages)


def recipe_steps(kind: ArmKind, recipe: Recipe) -> int:
    """An arm's n at its recipe's steps: train.steps; the peer: the whole-model steps of end-to-end training."""
    return recipe.train.steps * (recipe.rack.stacks if kind == "peer" else 1)


def solve_steps(stages: list[FlopStage], budget: float) -> int:
    """The n whose FLOPs come nearest ``budget`` (rounded to the nearest whole n; may be 0)."""
    per_unit = sum(s.scale * s.steps_per_unit * s.flops_per_step for s in stages)
    fixed = sum(s.fixed for s in stages)
    return max(0, round((budget - fixed) / per_unit))


@dataclass
class ArmPlan:
    arm: Arm
    recipe: Recipe  # with the solved train.steps (stack-wise arms)
    steps: int  # n: train.steps, or the peer's total steps
    stages: list[FlopStage]
    flops: float  # planned total at n
    planned_peak_bytes: int | None  # the planner's largest training stage on the device (None: it models llama only)
    fixed_steps: bool  # the budget's reference arm runs at its recipe's steps
    finetune_steps: int = 0  # the fine-tune of the fused rack (arm finetune:), its share of the budget

    def fingerprint(self, eval_spec: EvalSpec) -> dict:
        ft = {} if self.arm.finetune is None else {"finetune_steps": self.finetune_steps}
        return {
            "kind": self.arm.kind,
            "steps": self.steps,
            "recipe": to_data(self.recipe),
            "eval": eval_spec.key(self.recipe.objective),
            **ft,
        }


def finetune_flops_per_step(recipe: Recipe) -> float:
    """One full fine-tune step of the whole planned rack (``fuse --finetune full``), by the planner's formulas: a
    step is ``train.batch_size x train.grad_accum`` sequences of ``data.seq_len`` tokens."""
    r, tr = recipe.rack, recipe.train
    per_token = whole_model_flops_per_token(
        FlopShapes.of(recipe), r.stacks * r.blocks_per_stack, r.stacks, checkpointing=tr.finetune_checkpointing
    )
    return per_token * tr.batch_size * tr.grad_accum * recipe.data.seq_len


def plan_arms(c: Comparison, train_tokens: int, device: str = "cpu") -> list[ArmPlan]:
    """Solve every arm's steps for the budget; one error listing every arm the budget cannot run."""
    from stackwise_cli.train.finetune import finetune_warmup

    stages = {a.name: flop_stages(a.kind, a.recipe, train_tokens) for a in c.arms}
    b = c.spec.budget
    if b.like is not None:
        ref = c.arm(b.like)
        budget = total_flops(stages[ref.name], recipe_steps(ref.kind, ref.recipe))
        budget_key = f"budget.like {b.like!r} ({budget:.4g} FLOPs)"
    else:
        budget, budget_key = float(b.flops), f"budget.flops {b.flops:.4g}"
    problems, plans = [], []
    for i, a in enumerate(c.arms):
        where = f"{c.spec_path}: arms[{i}] {a.name!r}"
        st = stages[a.name]
        fixed = a.name == b.like
        ft_steps = 0
        if a.finetune is not None:  # the fine-tune's share first; the stacks share the rest
            ft_steps = round(a.finetune.share * budget / finetune_flops_per_step(a.recipe))
        ft_flops = ft_steps * (finetune_flops_per_step(a.recipe) if ft_steps else 0.0)
        n = recipe_steps(a.kind, a.recipe) if fixed else solve_steps(st, budget - ft_flops)
        one = total_flops(st, 1)
        if n < 1:
            problems.append(
                f"{where}: {budget_key} is too small for one step: one step costs {one:.4g} FLOPs "
                f"({'whole-model step' if a.kind == 'peer' else 'train.steps = 1'})"
            )
            continue
        # the recipe's rule: every stack's share of train.steps (end to end: train.steps itself) exceeds the warmup
        fewest = min(round(n * s.scale) for s in st) if a.kind == "stackwise" else n
        if fewest <= a.recipe.train.warmup_steps:
            problems.append(
                f"{where}: train.warmup_steps: {a.recipe.train.warmup_steps} is not below the {fewest} steps "
                f"{budget_key} gives; lower it in the arm's set:, or raise the budget"
            )
            continue
        recipe = a.recipe
        if a.kind == "stackwise":
            recipe = dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, steps=n))
        stage = curriculum_of(recipe).plan_stage if a.kind == "stackwise" else "end-to-end"  # a peer: the whole model
        warmup_key, ft_warmup = finetune_warmup(recipe.train)
        if a.finetune is not None and ft_steps <= ft_warmup:
            # fuse --finetune-steps refuses a fine-tune its warmup fills: say so now, before the arm's stacks train
            problems.append(
                f"{where}: finetune.share: {a.finetune.share} of {budget_key} is {ft_steps} fine-tune step(s), not "
                f"more than {warmup_key} ({ft_warmup}); raise the share or lower the warmup"
            )
            continue
        peak = plan_for(recipe, device).stage(stage).total_bytes if recipe.model.family == "llama" else None
        if peak is not None and a.finetune is not None:  # the fine-tune trains the whole fused rack
            peak = max(peak, plan_for(recipe, device, finetune=True).stage("fuse-full").total_bytes)
        plans.append(ArmPlan(a, recipe, n, st, total_flops(st, n) + ft_flops, peak, fixed, ft_steps))
    if problems:
        raise CompareError("\n".join(problems), hint="rerun after fixing: arms already finished are kept")
    return plans


# --- peak memory -----------------------------------------------------------------------------------------------


_CPU_READY = False


def _cpu_setup() -> None:
    """Once per process, before the first CPU measurement: exact accounting (glibc maps every block of 64 KiB or
    more on its own and unmaps it when freed, so the resident set follows live memory; ``bench/step.py``), and one
    rehearsal step of a tiny model, so torch's one-time set-up (thread pools, library loads) is not counted as the
    first arm's memory."""
    global _CPU_READY
    if _CPU_READY:
        return
    import torch

    exact_rss_accounting()
    from stackwise_cli.bench.peer import warm_up

    warm_up(torch.device("cpu"))
    _CPU_READY = True


class PeakMemory:
    """The peak memory a block allocates above where it started. CUDA: the allocator's peak
    (``torch.cuda.max_memory_allocated``) above what was allocated at the start. CPU, with exact accounting: the
    anonymous resident memory (RssAnon: tensors and the heap, not the pages of memory-mapped shards and caches), sampled
    every 5 ms, above where it started (``peak_bytes``); and the whole resident set's peak (VmHWM, reset through
    /proc/self/clear_refs, file pages included) above its start (``rss_peak_bytes``)."""

    def __init__(self, device) -> None:
        self.cuda = getattr(device, "type", str(device)).startswith("cuda")
        self.peak_bytes = 0
        self.rss_peak_bytes: int | None = None
        self.how = (
            "torch.cuda.max_memory_allocated above the stage's start"
            if self.cuda
            else "peak anonymous RSS above the stage's start, sampled every 5 ms, exact glibc accounting"
        )

    def __enter__(self) -> PeakMemory:
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _cpu_setup()
        gc.collect()
        self._base = self._max = _rss_bytes("RssAnon")
        self._rss_base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._max = max(self._max, _rss_bytes("RssAnon"))

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._base
            return
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self._max, _rss_bytes("RssAnon")) - self._base
        self.rss_peak_bytes = _rss_bytes("VmHWM") - self._rss_base


# --- data, once ------------------------------------------------------------------------------------------------


def _data_key(c: Comparison) -> dict:
    d, r = c.spec.data, c.arms[0].recipe
    return {
        "data": to_data(r.data),
        "vocab_size": r.model.vocab_size,
        "input": [str(_resolve_path(p, c.spec_path.parent).resolve()) for p in d.input],
        "val_input": [str(_resolve_path(p, c.spec_path.parent).resolve()) for p in d.val_input],
        "tokenizer": str(_resolve_path(d.tokenizer, c.spec_path.parent).resolve()) if d.tokenizer else None,
    }


def prepare_data(c: Comparison, reporter: Reporter = QUIET) -> Project:
    """Prepare ``OUT/data-project`` once (under a lock: array tasks wait for the first); a later run checks it was
    prepared from the same data settings."""
    from stackwise_cli.data.prepare import prepare

    dp, key = c.data_project, _data_key(c)
    key_path = c.out / "data.json"
    with exclusive_lock(c.out / ".data.lock"):
        if dp.exists():
            old = json.loads(key_path.read_text()) if key_path.exists() else None
            if old != key:
                raise CompareError(
                    f"{dp.root} was prepared from other data settings than {c.spec_path} gives now: {_diff(old, key)}",
                    hint="use another -o folder, or remove it to start the comparison over",
                )
            return dp
        atomic_write_text(key_path, json.dumps(key, indent=1))
        d = c.spec.data
        spec_dir = c.spec_path.parent
        prepare(
            dp,
            c.arms[0].recipe,
            [_resolve_path(p, spec_dir) for p in d.input] or None,
            _resolve_path(d.tokenizer, spec_dir) if d.tokenizer else None,
            reporter,
            [_resolve_path(p, spec_dir) for p in d.val_input] or None,
        )
    return dp


def train_tokens(dp: Project) -> int:
    return dp.load().data.splits["train"].tokens


def _arm_project(c: Comparison, ap: ArmPlan) -> Project:
    """The arm's project: the data project's tokenizer and shards (hard links, or copies across filesystems) under
    the arm's recipe. The manifest is written last, so a copy cut short is redone."""
    project = Project(c.arm_dir(ap.arm.name) / "project")
    if project.exists():
        have = project.load().recipe
        if have != ap.recipe:
            raise CompareError(
                f"arm {ap.arm.name!r}: {project.root} was made with another recipe than {c.spec_path} gives now: "
                f"{_diff(to_data(have), to_data(ap.recipe))}",
                hint=f"remove {c.arm_dir(ap.arm.name)} to run the arm again as the spec says",
            )
        return project
    dp = c.data_project
    m = dp.load()
    files = [m.tokenizer.file] + [s.file for split in m.data.splits.values() for s in split.shards]
    for rel in files:
        dst = project.path(rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)  # a copy cut short
        try:
            os.link(dp.path(rel), dst)  # shards are only ever replaced by rename, never written in place
        except OSError:
            shutil.copyfile(dp.path(rel), dst)
    project.save(dataclasses.replace(m, recipe=ap.recipe, history=[]))
    return project


# --- running an arm --------------------------------------------------------------------------------------------


def result_path(c: Comparison, name: str) -> Path:
    return c.arm_dir(name) / "result.json"


def load_result(c: Comparison, ap: ArmPlan) -> dict | None:
    """The arm's result, if it finished under this spec; an error if it finished under another."""
    path = result_path(c, ap.arm.name)
    if not path.exists():
        return None
    res = json.loads(path.read_text())
    want = ap.fingerprint(c.spec.eval)
    if _recipe_read_now(res.get("fingerprint")) != want:
        raise CompareError(
            f"arm {ap.arm.name!r} finished under another spec than {c.spec_path} gives now: "
            f"{_diff(res.get('fingerprint'), want)}",
            hint=f"remove {c.arm_dir(ap.arm.name)} to run it again, or use another -o folder",
        )
    return res


def _recipe_read_now(fingerprint: Any) -> Any:
    """A finished arm's fingerprint with its recipe read as this version reads it: a recipe key added since, at
    its default, does not make the arm another run."""
    if not (isinstance(fingerprint, dict) and isinstance(fingerprint.get("recipe"), dict)):
        return fingerprint
    try:
        return {**fingerprint, "recipe": to_data(recipe_from_data(fingerprint["recipe"], "a finished arm's recipe"))}
    except StackwiseError:  # a key this version does not know: another run (the diff names it)
        return fingerprint


@dataclass
class _Progress:
    """What an arm has done so far, kept across restarts in ``progress.json``."""

    path: Path
    points: list[dict] = field(default_factory=list)  # {"after", "flops", "loss"}
    peak_bytes: int = 0
    wall_s: float = 0.0
    rss_peak_bytes: int | None = None  # CPU: the whole resident set's peak, file pages included

    def measured(self, meter: PeakMemory) -> None:
        self.peak_bytes = max(self.peak_bytes, meter.peak_bytes)
        if meter.rss_peak_bytes is not None:
            self.rss_peak_bytes = max(self.rss_peak_bytes or 0, meter.rss_peak_bytes)

    @staticmethod
    def load(path: Path) -> _Progress:
        if not path.exists():
            return _Progress(path)
        d = json.loads(path.read_text())
        return _Progress(path, d["points"], d["peak_bytes"], d["wall_s"], d.get("rss_peak_bytes"))

    def save(self) -> None:
        data = {
            "points": self.points,
            "peak_bytes": self.peak_bytes,
            "wall_s": self.wall_s,
            "rss_peak_bytes": self.rss_peak_bytes,
        }
        atomic_write_text(self.path, json.dumps(data, indent=1))


def counted_flops(project: Project) -> float:
    """The training FLOPs the arm's manifest records (every train-stack run and train cache pass, by the planner's
    formulas: ``Manifest.count_flops``)."""
    return project.load().count_flops().total


def run_arm(c: Comparison, ap: ArmPlan, device: str = "auto", reporter: Reporter = QUIET) -> dict:
    """Run one arm to its result (or return the result of a finished one)."""
    done = load_result(c, ap)
    if done is not None:
        reporter.info(f"arm {ap.arm.name}: finished earlier, skipped")
        return done
    from stackwise_cli.device import pick_device
    from stackwise_cli.evaluate.eval import val_tokens

    dev = pick_device(device)
    arm_dir = c.arm_dir(ap.arm.name)
    arm_dir.mkdir(parents=True, exist_ok=True)
    dp = c.data_project
    val = val_tokens(dp, dp.load(), "val", c.spec.eval.max_sequences)
    with exclusive_lock(arm_dir / ".arm.lock"):
        progress = _Progress.load(arm_dir / "progress.json")
        start = time.monotonic()
        if ap.arm.kind == "peer":
            flops, how, val_loss, extra = _run_peer(c, ap, dp, val, dev, progress, reporter)
        else:
            flops, how, val_loss, extra = _run_stackwise(c, ap, val, device, dev, progress, reporter)
        progress.wall_s += time.monotonic() - start
        r = ap.recipe
        result = {
            "name": ap.arm.name,
            "kind": ap.arm.kind,
            "curriculum": "end-to-end" if ap.arm.kind == "peer" else r.curriculum,
            "recipe": str(ap.arm.recipe_path),
            "overrides": ap.arm.overrides,
            "params": extra.pop("params"),
            "blocks": r.rack.stacks * r.rack.blocks_per_stack,
            "d_model": r.model.d_model,
            "steps": ap.steps,
            "steps_are": "total optimizer steps" if ap.arm.kind == "peer" else "train.steps",
            "at_recipe_steps": ap.fixed_steps,
            "flops_planned": ap.flops,
            "flops": flops,
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 700.0)),
            "val_sequences": int(len(val)),
            "peak_bytes": progress.peak_bytes,
            "peak_how": how,
            "peak_rss_bytes": progress.rss_peak_bytes,
            "planned_peak_bytes": ap.planned_peak_bytes,
            "device": str(dev),
            "wall_s": progress.wall_s,
            "points": progress.points,
            **extra,
            "fingerprint": ap.fingerprint(c.spec.eval),
        }
        atomic_write_text(result_path(c, ap.arm.name), json.dumps(result, indent=1))
    return result


def masked_scoring(c: Comparison, dp: Project):
    """How this comparison's masked arms are scored (``bench/peer.MaskedScoring``), or None for next-token ones."""
    from stackwise_cli.bench.peer import MaskedScoring

    objective = c.arms[0].recipe.objective
    if objective_kind(objective).causal:
        return None
    mask_id = dp.load().tokenizer.mask_id
    if mask_id is None:
        raise CompareError(f"{dp.root}: the tokenizer has no [MASK] token, which a {objective} arm is scored with")
    return MaskedScoring.of(objective, mask_id, c.spec.eval.mask_ratio, c.spec.eval.elbo_points)


def score_rack(project: Project, val, how, batch_size: int, dev) -> float:
    """A masked arm's curve point: the trained stacks so far (stackwise's forward), scored at the evaluator's
    masks; the final score is transformers' (``score_arm``)."""
    from stackwise_cli.bench.peer import masked_loss
    from stackwise_cli.evaluate.eval import scored_stacks
    from stackwise_cli.model.io import load_current_rack
    from stackwise_cli.model.model import Rack

    m, rack = load_current_rack(project)
    n = len(scored_stacks(project, m))
    rack = Rack(rack.cfg, rack.ends, list(rack.stacks[:n]), rack.ids[:n]).to(dev).eval()
    return masked_loss(lambda x: rack(x, False, None), val, how, batch_size, dev)


def score_arm(project: Project, val, how, batch_size: int, dev, rack=None) -> float:
    """The one evaluator on a stack-wise arm's model, in transformers: fused/ (``AutoModelForCausalLM`` for clm,
    ``AutoModelForMaskedLM`` for a masked bert), or a masked llama rack's weights in ``LlamaForCausalLM`` attending
    both ways (``bench/peer.bidirectional_llama``; ``rack``: the current rack, if already read)."""
    from stackwise_cli.bench.peer import bidirectional_llama, hf_logits, masked_loss, score_folder

    m = project.load()
    if how is None or not hf_scored_bidirectionally(m.recipe):
        return score_folder(project.fused_dir, val, batch_size, dev, how)
    if rack is None:
        from stackwise_cli.model.io import load_current_rack

        _, rack = load_current_rack(project, manifest=m)
    model = bidirectional_llama(rack, m.tokenizer.eos_id, m.tokenizer.pad_id).to(dev)
    return masked_loss(hf_logits(model, bidirectional_mask=True), val, how, batch_size, dev)


def _run_stackwise(c, ap, val, device, dev, progress: _Progress, reporter) -> tuple[float, str, float, dict]:
    from stackwise_cli.build import build, end_to_end, stack_by_stack
    from stackwise_cli.evaluate.eval import evaluate
    from stackwise_cli.fuse import fuse, is_fused
    from stackwise_cli.train.finetune import FinetuneSpec

    project = _arm_project(c, ap)
    meter_how = PeakMemory(dev).how
    r = ap.recipe
    how = masked_scoring(c, c.data_project)
    bs = c.spec.eval.batch_size

    def val_loss(fused: bool = False) -> float:
        """A curve point: stackwise's eval (clm); for masked objectives the evaluator's masks on the rack so far,
        or on fused/ after a fine-tune."""
        if how is None:
            return evaluate(project, max_sequences=c.spec.eval.max_sequences, device=device, fused=fused).loss
        return score_arm(project, val, how, bs, dev) if fused else score_rack(project, val, how, bs, dev)

    @contextlib.contextmanager
    def measured():
        with PeakMemory(dev) as meter:
            yield
        progress.measured(meter)
        progress.save()

    if not curriculum_of(r).whole_rack:
        # build's stack-by-stack loop, each train-stack's peak measured, the val loss read after each stack (the
        # curve's points)

        def point(i: int, entry) -> None:
            if len(progress.points) <= i:
                loss = val_loss()
                progress.points.append({"after": f"stack {entry.id}", "flops": counted_flops(project), "loss": loss})
                progress.save()

        side = curriculum_of(r).grows
        stack_by_stack(project, r.rack.stacks, side, device, reporter=reporter, around_train=measured, after_each=point)
        if ap.finetune_steps and not is_fused(project, FinetuneSpec(mode="full", steps=ap.finetune_steps)):
            with measured():
                fuse(project, FinetuneSpec(mode="full", steps=ap.finetune_steps), device, reporter=reporter)
            loss = val_loss(fused=True)
            progress.points.append({"after": "fine-tune", "flops": counted_flops(project), "loss": loss})
            progress.save()
        build(project, device=device, reporter=reporter)  # every stack trained: fuse (kept if fine-tuned) and eval
    else:
        # the peak of train-stack all alone: build's fuse and eval (a larger batch's logits) are not training
        end_to_end(project, r.rack.stacks, device, reporter=reporter, around_train=measured)
        build(project, device=device, reporter=reporter)  # trained: fuses and scores (the recipe's eval sequences)
        if not progress.points:  # the curve's point on the spec's sequences, as every other arm's
            progress.points.append({"after": "train-stack all", "flops": counted_flops(project), "loss": val_loss()})
        progress.save()
    from stackwise_cli.model.io import load_current_rack

    _, rack = load_current_rack(project)  # the model as built (the planner's parameter count is llama's shapes)
    params = sum(p.numel() for p in rack.parameters())
    return counted_flops(project), meter_how, score_arm(project, val, how, bs, dev, rack), {"params": params}


def _run_peer(c, ap, dp: Project, val, dev, progress: _Progress, reporter) -> tuple[float, str, float, dict]:
    """The peer from scratch (a peer killed mid-run starts over: it keeps no checkpoints)."""
    import numpy as np

    from stackwise_cli.bench.peer import hf_logits, masked_loss, next_token_loss, peer_model, score_folder, train_peer
    from stackwise_cli.store.files import atomic_replace_dir
    from stackwise_cli.train.data import token_data

    m = dp.load()
    r = ap.recipe
    stream = np.concatenate([np.asarray(s.tokens).reshape(-1) for s in token_data(dp, m)])
    model = peer_model(r, m.tokenizer.eos_id, m.tokenizer.pad_id, r.train.seed)
    steps, pts = ap.steps, c.spec.eval.peer_points
    eval_at = {max(1, round(steps * k / pts)) for k in range(1, pts + 1)}
    bs = c.spec.eval.batch_size
    how = masked_scoring(c, dp)
    if how is None:
        masking, score = None, lambda mod: next_token_loss(mod, val, bs, dev)
    else:
        masking = (r.mask.ratio, how.mask_id, m.tokenizer.vocab_size)
        score = lambda mod: masked_loss(hf_logits(mod), val, how, bs, dev)  # noqa: E731
    reporter.info(f"arm {ap.arm.name}: peer ({type(model).__name__}) for {steps} steps")
    with PeakMemory(dev) as meter:
        run = train_peer(model, stream, r.train, r.data.seq_len, steps, dev, eval_at, score, masking)
    fps = ap.stages[0].flops_per_step
    progress.peak_bytes, progress.rss_peak_bytes = 0, None  # a peer run starts over
    progress.measured(meter)
    progress.points = [{"after": f"step {s}", "flops": s * fps, "loss": loss} for s, loss in run.points]
    progress.save()
    folder = c.arm_dir(ap.arm.name) / "model"
    tmp = folder.with_name("model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.cpu().save_pretrained(tmp)
    atomic_replace_dir(tmp, folder)
    val_loss = score_folder(folder, val, bs, dev, how)
    params = sum(p.numel() for p in model.parameters())
    return run.steps * fps, meter.how, val_loss, {"params": params, "train_loss_last": run.losses[-1]}


# --- the report ------------------------------------------------------------------------------------------------


@dataclass
class Report:
    spec: str
    out: str
    budget_flops: float
    arms: list[dict]  # the finished arms' results, in spec order
    missing: list[str]  # arms not finished yet
    files: dict[str, str] = field(default_factory=dict)
    scored_as: str = ""  # what the val loss is (the evaluator's loss for the arms' objective)

    def to_data(self) -> dict:
        return dataclasses.asdict(self)


COLUMNS = [
    "arm",
    "kind",
    "curriculum",
    "blocks x d",
    "params",
    "steps",
    "GFLOPs",
    "of budget",
    "val loss",
    "val ppl",
    "peak MiB",
    "RSS MiB",
    "plan MiB",
    "wall s",
]


def table_rows(report: Report) -> list[list[Any]]:
    rows = []
    for a in report.arms:
        steps = f"{a['steps']:,}{'*' if a['at_recipe_steps'] else ''}"
        rows.append(
            [
                a["name"],
                a["kind"],
                a["curriculum"],
                f"{a['blocks']} x {a['d_model']}",
                f"{a['params']:,}",
                steps,
                f"{a['flops'] / 1e9:,.1f}",
                f"{a['flops'] / report.budget_flops:.3f}",
                a["val_loss"],
                a["val_perplexity"],
                f"{a['peak_bytes'] / 2**20:,.1f}",
                None if a.get("peak_rss_bytes") is None else f"{a['peak_rss_bytes'] / 2**20:,.1f}",
                None if a["planned_peak_bytes"] is None else f"{a['planned_peak_bytes'] / 2**20:,.1f}",
                f"{a['wall_s']:,.0f}",
            ]
        )
    return rows


def _markdown(report: Report) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"# Comparison: {report.spec}",
        "",
        f"Budget: {report.budget_flops:.4g} FLOPs per arm (planner formulas, docs/science.md). Val loss: "
        f"{report.scored_as}.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "| " + " | ".join("---" for _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table_rows(report)]
    how = sorted({a["peak_how"] for a in report.arms})
    lines += [
        "",
        "steps: train.steps of a stack-wise arm (per stack; end to end runs rack.stacks x that), the peer's total "
        "optimizer steps; * = the budget's reference arm at its recipe's steps. peak MiB: measured training peak "
        f"({'; '.join(how)}); RSS MiB (CPU): the whole resident set's peak above the stage's start, pages of the "
        "memory-mapped shards and cache included; plan MiB: `bench plan`'s largest training stage for the device "
        "(- where the planner does not model the family).",
    ]
    if report.missing:
        lines += ["", f"Not finished: {', '.join(report.missing)}."]
    return "\n".join(lines) + "\n"


def _plot(report: Report, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise CompareError(
            "the loss-vs-FLOPs plot needs matplotlib, which is not installed (the table and results are written)",
            hint="pip install 'stackwise[plot]', then rerun with --report",
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for a in report.arms:
        xs = [p["flops"] for p in a["points"]]
        ys = [p["loss"] for p in a["points"]]
        ax.plot(xs, ys, marker="o", label=f"{a['name']} ({a['kind']}, {a['curriculum']})")
    ax.axvline(report.budget_flops, color="grey", linestyle="--", linewidth=0.8, label="budget")
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{Path(report.spec).name}: budget {report.budget_flops:.3g} FLOPs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")  # array tasks may report at once
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def scored_as(c: Comparison) -> str:
    """What the table's val loss is, in words."""
    objective, e = c.arms[0].recipe.objective, c.spec.eval
    where = "of each arm's model in transformers, on the same val sequences"
    if objective == "mlm":
        return f"mean cross-entropy at the same masked positions ({e.mask_ratio:g} of each sequence, [MASK]) {where}"
    if objective == "diffusion":
        return (
            f"the ELBO bound (the masked loss over t, per position, averaged over {e.elbo_points} t in (0, 1), "
            f"the same masks for every arm) {where}"
        )
    return f"mean next-token cross-entropy {where}"


def gather(c: Comparison, plans: list[ArmPlan]) -> Report:
    """The finished arms' results as a report; writes results.json, results.md and loss_vs_flops.png."""
    results, missing = [], []
    for ap in plans:
        res = load_result(c, ap)
        (results.append(res) if res is not None else missing.append(ap.arm.name))
    report = Report(str(c.spec_path), str(c.out), _budget(c, plans), results, missing)
    report.scored_as = scored_as(c)
    c.out.mkdir(parents=True, exist_ok=True)
    files = {"json": c.out / "results.json", "markdown": c.out / "results.md", "plot": c.out / "loss_vs_flops.png"}
    report.files = {k: str(v) for k, v in files.items()}
    atomic_write_text(files["json"], json.dumps(report.to_data(), indent=1))
    atomic_write_text(files["markdown"], _markdown(report))
    if results:
        _plot(report, files["plot"])
    return report


def _budget(c: Comparison, plans: list[ArmPlan]) -> float:
    if c.spec.budget.like is None:
        return float(c.spec.budget.flops)
    return plans[[p.arm.name for p in plans].index(c.spec.budget.like)].flops


def planned(c: Comparison, plans: list[ArmPlan]) -> dict:
    """What each arm will run, before it runs (``--plan``): its steps a stage, FLOPs and planned peak."""
    budget = _budget(c, plans)
    arms = []
    for ap in plans:
        kind = ap.arm.kind
        stages = [{"stage": s.label, "steps": s.steps_at(ap.steps), "cache_flops": s.fixed} for s in ap.stages]
        arms.append(
            {
                "name": ap.arm.name,
                "kind": kind,
                "curriculum": "end-to-end" if kind == "peer" else ap.recipe.curriculum,
                "blocks": ap.recipe.rack.stacks * ap.recipe.rack.blocks_per_stack,
                "d_model": ap.recipe.model.d_model,
                "steps": ap.steps,
                "at_recipe_steps": ap.fixed_steps,
                "stages": stages,
                "finetune_steps": ap.finetune_steps,
                "flops": ap.flops,
                "cache_flops": sum(s.fixed for s in ap.stages),
                "planned_peak_bytes": ap.planned_peak_bytes,
                "state": _state(c, ap),
            }
        )
    return {"spec": str(c.spec_path), "out": str(c.out), "budget_flops": budget, "arms": arms}


def _state(c: Comparison, ap: ArmPlan) -> str:
    """finished, to run, or finished under another spec (which a run refuses, naming what changed)."""
    try:
        return "to run" if load_result(c, ap) is None else "finished"
    except CompareError:
        return "finished under another spec"


def plan_rows(plan: dict) -> list[list[Any]]:
    rows = []
    for a in plan["arms"]:
        steps = ", ".join(f"{s['steps']:,}" for s in a["stages"])
        if a["finetune_steps"]:
            steps += f" + {a['finetune_steps']:,} fine-tune"
        rows.append(
            [
                a["name"],
                a["kind"],
                a["curriculum"],
                f"{a['blocks']} x {a['d_model']}",
                f"{a['steps']:,}{'*' if a['at_recipe_steps'] else ''}",
                steps,
                f"{a['flops'] / 1e9:,.1f}",
                f"{a['flops'] / plan['budget_flops']:.3f}",
                f"{a['cache_flops'] / a['flops']:.2f}",
                None if a["planned_peak_bytes"] is None else f"{a['planned_peak_bytes'] / 2**20:,.1f}",
                a["state"],
            ]
        )
    return rows


PLAN_COLUMNS = [
    "arm",
    "kind",
    "curriculum",
    "blocks x d",
    "n",
    "steps a stage",
    "GFLOPs",
    "of budget",
    "cache share",
    "plan MiB",
    "state",
]


def _solved(c: Comparison, spec_path: Path, report_only: bool, device: str, reporter: Reporter) -> list[ArmPlan]:
    c.out.mkdir(parents=True, exist_ok=True)
    if report_only and not c.data_project.exists():
        raise CompareError(
            f"nothing has run in {c.out} yet", hint=f"run `stackwise bench compare {spec_path} -o {c.out}`"
        )
    dp = c.data_project if report_only else prepare_data(c, reporter)
    dev_type = "cuda" if device.startswith("cuda") or (device == "auto" and _has_cuda()) else "cpu"
    return plan_arms(c, train_tokens(dp), dev_type)


def plan_comparison(spec_path: Path, out: Path | None = None, device: str = "auto", reporter: Reporter = QUIET) -> dict:
    """Validate the spec, prepare the data once (the budget's steps depend on the split's size) and solve every
    arm's steps, running none (``--plan``)."""
    c = load_comparison(spec_path, out)
    return planned(c, _solved(c, spec_path, False, device, reporter))


def compare(
    spec_path: Path,
    out: Path | None = None,
    arm: str | None = None,
    report_only: bool = False,
    device: str = "auto",
    reporter: Reporter = QUIET,
) -> Report:
    """Validate the spec, prepare the data once, solve every arm's steps, run the unfinished arms (or only ``arm``;
    none with ``report_only``), and gather the report."""
    c = load_comparison(spec_path, out)
    if arm is not None:
        c.arm(arm)  # an unknown name fails before anything runs
    plans = _solved(c, spec_path, report_only, device, reporter)
    if not report_only:
        for ap in plans:
            if arm is None or ap.arm.name == arm:
                reporter.info(f"arm {ap.arm.name}: {ap.steps} steps, {ap.flops:.4g} FLOPs planned")
                run_arm(c, ap, device, reporter)
    return gather(c, plans)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
