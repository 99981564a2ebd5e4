"""Downstream evaluation: EleutherAI's lm-evaluation-harness on the project's model (docs/harness.md).

Which harness model scores what:

- clm, fused/ current: the harness's own Hugging Face model (``HFLM``) on ``fused/``: the numbers anyone gets who
  loads the export. ``adapter = "hf"``.
- everything else (a clm rack not fused, mlm and diffusion racks, or ``fused=True`` on a masked rack):
  ``StackwiseLM``, a harness model of our own on the rack in memory. ``adapter = "stackwise"``.

How ``StackwiseLM`` scores (``scoring`` in the result):

- clm, ``exact``: log p(continuation | context) from the shifted next-token logits, as ``HFLM`` computes it (same
  tokenization, truncation and rolling windows; tests/test_harness.py holds the two to each other).
- diffusion, ``bound``: the ELBO of masked diffusion, estimated by Monte-Carlo as LLaDA evaluates: per sample,
  draw k uniformly from 1..L (L = continuation tokens), mask k continuation positions chosen uniformly, and score
  (L / k) * sum of log p(token | context, unmasked rest) over the masked ones; the mean over ``mc_samples`` samples
  is a stochastic lower bound on log p(continuation | context). The masks are a pure function of (seed, the
  request's tokens): the same request gets the same estimate in any batch and any run.
- mlm, ``score``: the same estimator; an mlm rack is trained at one mask ratio, not over all of them, so the number
  ranks the choices of a multiple-choice task but bounds no likelihood. Perplexity tasks
  (``loglikelihood_rolling``) are refused for mlm.

Requests are batched: clm rows are right-padded (causal attention never reads the padding); masked rows have no
padding (bidirectional attention would read it), so rows are batched by equal length.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stackwise_cli.errors import DataError, ProjectError, StackwiseError
from stackwise_cli.model.model import Rack
from stackwise_cli.objectives import OBJECTIVES, objective_kind
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.store.project import Project

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:  # the optional extra (pip install 'stackwise[harness]'): require_harness() says so
    TemplateLM = object

    def register_model(*names):
        return lambda cls: cls


log = logging.getLogger(__name__)

RESULTS_DIR = "eval"  # <project>/eval/harness-<time>.json
DEFAULT_MC_SAMPLES = 32
MC_SEED = 1234
# lm-eval's output types -> the LM method that scores them.
OUTPUT_TYPES = {
    "loglikelihood": "loglikelihood",
    "multiple_choice": "loglikelihood",
    "loglikelihood_rolling": "loglikelihood_rolling",
    "generate_until": "generate_until",
}


def require_harness():
    """The ``lm_eval`` module, or a StackwiseError naming the extra that installs it."""
    try:
        import lm_eval
    except ImportError:
        raise StackwiseError(
            "eval --tasks runs lm-evaluation-harness, which is not installed", hint="pip install 'stackwise[harness]'"
        ) from None
    return lm_eval


# --- tasks ------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4)
def task_manager(include_path: str | None, include_defaults: bool):
    """The harness's task index (the built-in one takes ~10 s to build: once per process)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=include_defaults)


def find_tasks(names: list[str], include_path: Path | None):
    """A TaskManager that knows every name: the include path alone when it has them all (fast), else with the
    harness's built-in tasks; a StackwiseError naming the unknown ones."""
    if include_path is not None:
        if not include_path.exists():
            raise StackwiseError(f"--include-path {include_path} does not exist", hint="a folder of task YAML files")
        local = task_manager(str(include_path), False)
        if all(n in local.task_index for n in names):
            return local
    tm = task_manager(str(include_path) if include_path is not None else None, True)
    unknown = [n for n in names if n not in tm.task_index]
    if unknown:
        import difflib

        near = sorted({c for n in unknown for c in difflib.get_close_matches(n, list(tm.task_index), n=3)})
        hint = f"did you mean: {', '.join(near)}?" if near else "`lm_eval ls tasks` lists them"
        where = f" or in {include_path}" if include_path is not None else ""
        raise StackwiseError(
            f"unknown task(s) {', '.join(unknown)}: not among lm-evaluation-harness's tasks{where}", hint=hint
        )
    return tm


def _dataset_of(tm, name: str) -> str:
    cfg = getattr(tm.task_index.get(name), "cfg", None) or {}
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    return f"{path} ({sub})" if path and sub else str(path or "?")


def unreachable(e: BaseException) -> bool:
    """Did loading fail because the Hub could not be reached (no network, or HF_HUB_OFFLINE=1)?"""
    while e is not None:
        if isinstance(e, ConnectionError) or type(e).__name__ in ("OfflineModeIsEnabled", "LocalEntryNotFoundError"):
            return True
        e = e.__cause__ or e.__context__
    return False


def load_tasks(tm, names: list[str]) -> dict[str, str]:
    """Load each task (its dataset included) and return {leaf task: output type}. A dataset that cannot be loaded
    is a DataError naming the task and the dataset, and saying the machine is offline when it could not reach the
    Hub."""
    types: dict[str, str] = {}
    for name in names:
        try:
            loaded = tm.load([name])
        except Exception as e:  # datasets raises many kinds (ConnectionError, FileNotFoundError, ValueError...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if unreachable(e):
                raise DataError(
                    f"task {name}: its dataset {_dataset_of(tm, name)} is not on this machine, and this machine is "
                    f"offline ({first})",
                    hint="download it where there is a network (the Hugging Face datasets cache), or point a local "
                    "task at your copy with --include-path",
                ) from None
            raise DataError(f"task {name}: its dataset {_dataset_of(tm, name)} could not be loaded ({first})") from None
        for task_name, task in loaded["tasks"].items():
            types[task_name] = task.get_config("output_type")
    return types


def check_scorable(objective: str, types: dict[str, str]) -> None:
    """A ProjectError for a task this objective cannot be scored for: an mlm rack defines no likelihood of a
    document, so it has no perplexity (``loglikelihood_rolling``)."""
    for task, kind in types.items():
        if kind not in OUTPUT_TYPES:
            raise ProjectError(f"task {task}: output type {kind!r} is not one stackwise can score")
        if not objective_kind(objective).document_likelihood and OUTPUT_TYPES[kind] == "loglikelihood_rolling":
            raise ProjectError(
                f"task {task} scores a perplexity (loglikelihood_rolling), and an {objective} rack defines no "
                "likelihood of a document (it is trained at one mask ratio, not as a generative model)",
                hint="score multiple-choice or generation tasks on this rack, or perplexity on a clm or diffusion one",
            )


# --- the harness model ------------------------------------------------------------------------------------------


def _request_seed(seed: int, tokens: list[int]) -> np.random.Generator:
    """A generator that is a pure function of (seed, the request's tokens)."""
    digest = hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=8).digest()
    return np.random.default_rng([seed, int.from_bytes(digest, "little")])


def cut_at(text: str, until: list[str]) -> str:
    """``text`` up to the first of the ``until`` strings."""
    for s in until:
        if s and s in text:
            text = text[: text.index(s)]
    return text


@register_model("stackwise")
class StackwiseLM(TemplateLM):
    """lm-evaluation-harness model over a stackwise ``Rack`` in memory (any objective; module docstring)."""

    backend = "causal"  # how TemplateLM splits (context, continuation) into tokens: encode the whole, then split

    def __init__(
        self,
        rack: Rack,
        tokenizer,
        objective: str,
        eos_id: int,
        mask_id: int | None,
        vocab: int,
        max_length: int,
        batch_size: int = 32,
        mc_samples: int = DEFAULT_MC_SAMPLES,
        seed: int = MC_SEED,
        time_input: bool = False,
        t_range: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        if objective not in OBJECTIVES:
            raise ProjectError(f"no harness scoring for objective {objective!r}")
        if objective_kind(objective).needs_mask_token and mask_id is None:
            raise ProjectError(f"an {objective} rack is scored through [MASK] tokens; this tokenizer has none")
        self.rack, self.tok, self.objective = rack.eval(), tokenizer, objective
        self.causal = objective_kind(objective).causal  # scored exactly left to right, else through [MASK] tokens
        self.eos_id, self.mask_id, self.vocab, self.max_len = eos_id, mask_id, vocab, max_length
        self.batch_size, self.mc_samples, self.seed = batch_size, mc_samples, seed
        self.time_input, self.t_range = time_input, t_range
        self._device = rack.ends.embed.weight.device
        self.requests = 0  # requests answered, for requests/s

    # TemplateLM's interface ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.eos_id

    @property
    def max_length(self) -> int:
        return self.max_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # As the Hugging Face export's tokenizer encodes (HFLM: add_special_tokens=False for causal models).
        return self.tok.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        self.requests += len(requests)
        pairs = [(list(ctx), list(cont)) for _, ctx, cont in requests]
        if self.causal:
            return self._exact(pairs)
        return self._masked(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        # Masked rows hold the context and the window in max_length positions (no shift), causal ones one more.
        window = self.max_len if self.causal else self.max_len - 1
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                utils.make_disjoint_window,
                utils.get_rolling_token_windows(self.tok_encode(string), self.eos_id, window, 1),
            ):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows) if windows else []
        self.requests += len(requests) - len(windows)  # count documents, not windows
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, scores):
            totals[i] += ll
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self.requests += len(requests)
        jobs = []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.get("until") or [self.tok_decode([self.eos_id])]
            until = [until] if isinstance(until, str) else list(until)
            n = int(kw.get("max_gen_toks", 256))
            jobs.append((self.tok_encode(context), until, n))
        return self._generate(jobs)

    # clm: exact ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _exact(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        # As HFLM: the last max_length + 1 tokens, the last one dropped from the input.
        rows = [(ctx + cont)[-(self.max_len + 1) :][:-1] for ctx, cont in pairs]
        order = sorted(range(len(pairs)), key=lambda i: -len(rows[i]))  # longest first, like HFLM
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            T = len(rows[idx[0]])
            x = torch.full((len(idx), T), self.eos_id, dtype=torch.long)
            for b, i in enumerate(idx):  # right padding: causal attention never reads it
                x[b, : len(rows[i])] = torch.tensor(rows[i])
            logp = torch.log_softmax(self.rack(x.to(self._device), causal=True).float(), dim=-1)  # (B, T, V)
            for b, i in enumerate(idx):
                cont = pairs[i][1]
                n, end = len(cont), len(rows[i])
                lp = logp[b, end - n : end]  # (n, V): position j predicts token j + 1
                target = torch.tensor(cont, device=lp.device)
                ll = float(lp.gather(-1, target[:, None]).sum().double())
                out[i] = (ll, bool((lp.argmax(-1) == target).all()))
        return out  # type: ignore[return-value]

    # mlm, diffusion: Monte-Carlo masking ------------------------------------------------------------------

    def _rows(self, ctx: list[int], cont: list[int]) -> list[tuple[float, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The masked copies of one request, each (weight, row (T,), masked positions (k,), their tokens (k,)):
        mc_samples rows with k ~ U{1..L} continuation positions masked (weight L / k), then one with the whole
        continuation masked (weight 0: it says whether the continuation is the greedy prediction)."""
        full = torch.tensor((ctx + cont)[-self.max_len :], dtype=torch.long)  # no shift: position i predicts token i
        T = len(full)
        L = min(len(cont), T)
        rng = _request_seed(self.seed, full.tolist())
        out = []
        for s in range(self.mc_samples + 1):
            if s < self.mc_samples:
                k = int(rng.integers(1, L + 1))
                pos = torch.from_numpy(T - L + rng.permutation(L)[:k])
                weight = L / k
            else:
                pos, weight = torch.arange(T - L, T), 0.0
            row = full.clone()
            row[pos] = self.mask_id
            out.append((weight, row, pos, full[pos]))
        return out

    @torch.inference_mode()
    def _masked(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        by_len: dict[int, list] = {}  # row length -> [(request, weight, row, positions, tokens)]
        for i, (ctx, cont) in enumerate(pairs):
            for w, row, pos, target in self._rows(ctx, cont):
                by_len.setdefault(len(row), []).append((i, w, row, pos, target))
        total = [0.0] * len(pairs)
        greedy = [False] * len(pairs)
        for T, items in sorted(by_len.items(), reverse=True):
            for lo in range(0, len(items), self.batch_size):
                chunk = items[lo : lo + self.batch_size]
                x = torch.stack([c[2] for c in chunk]).to(self._device)  # (B, T)
                t = None
                if self.time_input:  # the masked share of the row: what t means in training
                    share = torch.tensor([len(c[3]) / T for c in chunk], device=self._device)
                    t = share.clamp(*self.t_range)
                logits = self.rack(x, causal=False, t=t).float()  # (B, T, V)
                for b, (i, w, _, pos, target) in enumerate(chunk):
                    lp = torch.log_softmax(logits[b, pos.to(self._device)], dim=-1)  # (k, V)
                    target = target.to(lp.device)
                    if w > 0:
                        total[i] += w * float(lp.gather(-1, target[:, None]).sum().double()) / self.mc_samples
                    else:
                        lp[:, self.mask_id] = -math.inf  # [MASK] is never a prediction
                        greedy[i] = bool((lp.argmax(-1) == target).all())
        return list(zip(total, greedy))

    # generation ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _generate(self, jobs: list[tuple[list[int], list[str], int]]) -> list[str]:
        from stackwise_cli.evaluate.generate import restrict_vocab, unmask_iterative

        out = [""] * len(jobs)
        groups: dict[tuple[int, int], list[int]] = {}
        fitted = []
        for i, (ids, _, n) in enumerate(jobs):
            n = max(1, min(n, self.max_len - 1))
            ids = (ids or [self.eos_id])[-(self.max_len - n) :]  # truncate the context from the left
            fitted.append(ids)
            groups.setdefault((len(ids), n), []).append(i)
        for (P, n), members in groups.items():  # equal prompt lengths: one batch, no padding
            for lo in range(0, len(members), self.batch_size):
                idx = members[lo : lo + self.batch_size]
                x = torch.tensor([fitted[i] for i in idx], dtype=torch.long, device=self._device)  # (B, P)
                if self.causal:
                    made = self._greedy(x, n, restrict_vocab)
                else:
                    ids = torch.cat([x, torch.full((len(idx), n), self.mask_id, device=self._device)], dim=1)
                    res = unmask_iterative(
                        self.rack,
                        ids,
                        self.mask_id,
                        n,
                        time_input=self.time_input,
                        t_range=self.t_range,
                        vocab_size=self.vocab,
                    )
                    made = res.ids[:, P:].tolist()
                for i, toks in zip(idx, made):
                    if self.eos_id in toks:
                        toks = toks[: toks.index(self.eos_id)]
                    out[i] = cut_at(self.tok_decode(toks), jobs[i][1])
        return out

    def _greedy(self, x: torch.Tensor, n: int, restrict_vocab) -> list[list[int]]:
        """Greedy continuation of the prompts x (B, P) by n tokens through the KV cache."""
        banned = () if self.mask_id is None else (self.mask_id,)
        logits, caches = self.rack.decode(x, 0, None)
        made = []
        start = x.shape[1]
        for step in range(n):
            nxt = restrict_vocab(logits[:, -1], self.vocab, banned).argmax(-1)  # (B,)
            made.append(nxt)
            if step + 1 < n:
                logits, caches = self.rack.decode(nxt[:, None], start + step, caches)
        return torch.stack(made, dim=1).tolist()


# --- the run ----------------------------------------------------------------------------------------------------


@dataclass
class HarnessResult:
    tasks: list[str]
    metrics: dict[str, dict[str, float]]  # task -> metric -> value (the harness's headline numbers)
    file: str  # the harness's results JSON, relative to the project root
    model: str  # "fused" (fused/) or "rack" (the rack's files)
    adapter: str  # "hf": the harness's HFLM on fused/; "stackwise": StackwiseLM
    objective: str
    scoring: str  # exact | bound | score (module docstring)
    requests: int
    time_s: float  # the whole harness run: tasks built, requests answered, metrics computed
    model_time_s: float  # inside the model's request methods (loglikelihood, loglikelihood_rolling, generate_until)
    requests_per_s: float  # requests / model_time_s: the harness model's throughput
    settings: dict[str, Any] = field(default_factory=dict)

    def to_data(self) -> dict:
        return asdict(self)


def time_requests(lm) -> list[float]:
    """Time spent in ``lm``'s request methods, summed into the returned one-element list as they run: what the
    harness model costs, apart from building tasks and computing metrics (the same for every model)."""
    spent = [0.0]
    for name in sorted(set(OUTPUT_TYPES.values())):
        method = getattr(lm, name)

        def timed(requests, *args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(requests, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        setattr(lm, name, timed)  # an instance attribute: the harness calls getattr(lm, request_type)
    return spent


def headline(results: dict) -> dict[str, dict[str, float]]:
    """The harness's per-task numbers without stderrs and labels: {task: {"acc": 0.5, ...}} (the ",none" filter
    suffix dropped; other filters kept)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.get("results", {}).items():
        metrics = {}
        for key, value in row.items():
            if "_stderr" in key or key in ("alias", "name", "sample_len") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
                continue
            metrics[key.removesuffix(",none")] = float(value)
        out[task] = metrics
    return out


def _limit(limit: float | None) -> int | float | None:
    if limit is None:
        return None
    if limit <= 0:
        raise StackwiseError(f"--limit must be > 0, got {limit}", hint="a count of examples, or a share below 1")
    return int(limit) if limit >= 1 and float(limit).is_integer() else limit


def build_lm(project: Project, m, adapter: str, fused: bool, device: str, batch_size: int, mc_samples: int):
    """(the harness model, model: fused|rack) for the project. ``adapter``: hf | stackwise."""
    from stackwise_cli.device import pick_device
    from stackwise_cli.evaluate.eval import scored_stacks
    from stackwise_cli.model.io import load_current_rack

    dev = pick_device(device)
    if adapter == "hf":
        from lm_eval.models.huggingface import HFLM

        return HFLM(pretrained=str(project.path(m.fused.dir)), device=str(dev), batch_size=batch_size), "fused"
    from tokenizers import Tokenizer

    from stackwise_cli.data.tokenizer import id_bound

    if fused:
        from stackwise_cli.evaluate.fused import load_fused

        rack, model, tok_file = load_fused(project, m), "fused", project.path(f"{m.fused.dir}/tokenizer.json")
    else:
        entries = scored_stacks(project, m)  # refuses untrained stacks (left to right: scores the trained prefix)
        m, rack = load_current_rack(project, manifest=m)
        if len(entries) < len(m.rack):
            rack = Rack(rack.cfg, rack.ends, list(rack.stacks[: len(entries)]), rack.ids[: len(entries)])
        model, tok_file = "rack", project.path(m.tokenizer.file)
    tok = Tokenizer.from_file(str(tok_file))
    recipe = m.recipe
    lm = StackwiseLM(
        rack=rack.to(dev),
        tokenizer=tok,
        objective=recipe.objective,
        eos_id=m.tokenizer.eos_id,
        mask_id=m.tokenizer.mask_id,
        vocab=id_bound(tok),
        max_length=recipe.model.max_seq_len,
        batch_size=batch_size,
        mc_samples=mc_samples,
        time_input=recipe.model.time_embedding,
        t_range=(recipe.diffusion.t_min, recipe.diffusion.t_max),
    )
    return lm, model


def choose_adapter(m, fused: bool) -> str:
    """hf for a clm project whose fused/ is current (or with ``fused``), else stackwise."""
    if objective_kind(m.recipe.objective).causal and (fused or (m.fused is not None and m.fused_is_current())):
        return "hf"
    return "stackwise"


def run_harness(
    project: Project,
    tasks: list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    include_path: Path | None = None,
    batch_size: int | None = None,
    mc_samples: int = DEFAULT_MC_SAMPLES,
    device: str = "auto",
    fused: bool = False,
    adapter: str | None = None,
    record: bool = True,
    reporter: Reporter = QUIET,
) -> HarnessResult:
    """Run lm-evaluation-harness ``tasks`` on the project's model; write its results JSON to
    ``<project>/eval/harness-<time>.json`` and the headline metrics to the manifest's ``harness`` record (unless
    ``record`` is False). Every check (tasks known, datasets on the machine, the objective can score each task,
    the model present) runs before anything is written: a refused run changes nothing in the project.

    ``adapter``: force hf (the harness's HFLM on fused/) or stackwise (StackwiseLM); default ``choose_adapter``."""
    require_harness()
    names = [t.strip() for t in tasks if t.strip()]
    if not names:
        raise StackwiseError("--tasks names no task", hint="e.g. --tasks hellaswag,arc_easy")
    if mc_samples < 1:
        raise StackwiseError(f"--mc-samples must be >= 1, got {mc_samples}")
    if batch_size is not None and batch_size < 1:
        raise StackwiseError(f"--batch-size must be >= 1, got {batch_size}")
    if num_fewshot is not None and num_fewshot < 0:
        raise StackwiseError(f"--num-fewshot must be >= 0, got {num_fewshot}")
    lim = _limit(limit)
    m = project.load()
    if not m.rack:
        raise ProjectError("the rack is empty: nothing to evaluate", hint="run `stackwise grow --side right`")
    if fused:
        from stackwise_cli.evaluate.fused import require_current_fused

        require_current_fused(project, m)
    adapter = adapter or choose_adapter(m, fused)
    if adapter == "hf" and (
        not objective_kind(m.recipe.objective).causal or m.fused is None or not m.fused_is_current()
    ):
        raise ProjectError("the harness's Hugging Face model scores a current clm fused/", hint="run `stackwise fuse`")
    _quiet_harness()
    with reporter.task("harness: load tasks"):
        tm = find_tasks(names, include_path)
        types = load_tasks(tm, names)
    check_scorable(m.recipe.objective, types)
    batch = batch_size or m.recipe.eval.batch_size
    with reporter.task("harness: load model"):
        lm, model = build_lm(project, m, adapter, fused, device, batch, mc_samples)

    from lm_eval import simple_evaluate

    model_time = time_requests(lm)
    start = time.perf_counter()
    with reporter.task(f"harness: {', '.join(names)}"):
        raw = simple_evaluate(
            lm,
            tasks=names,
            num_fewshot=num_fewshot,
            limit=lim,
            task_manager=tm,
            bootstrap_iters=0,
            log_samples=True,
        )
    time_s = time.perf_counter() - start
    samples = raw.pop("samples", {}) or {}
    requests = sum(len(s["arguments"]) for rows in samples.values() for s in rows)
    scoring = "exact" if adapter == "hf" else objective_kind(m.recipe.objective).harness_scoring
    settings = {
        "num_fewshot": num_fewshot,
        "limit": lim,
        "batch_size": batch,
        "include_path": str(include_path) if include_path is not None else None,
        "mc_samples": mc_samples if scoring != "exact" else None,
        "mc_seed": MC_SEED if scoring != "exact" else None,
    }
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    rel = f"{RESULTS_DIR}/harness-{stamp}.json"
    result = HarnessResult(
        tasks=names,
        metrics=headline(raw),
        file=rel,
        model=model,
        adapter=adapter,
        objective=m.recipe.objective,
        scoring=scoring,
        requests=requests,
        time_s=time_s,
        model_time_s=model_time[0],
        requests_per_s=requests / model_time[0] if model_time[0] > 0 else 0.0,
        settings=settings,
    )
    if record:
        write_record(project, result, raw)
    return result


def write_record(project: Project, result: HarnessResult, raw: dict) -> None:
    """The harness's results JSON (with stackwise's own fields under ``stackwise``) into the project, and the
    headline metrics into the manifest's ``harness`` record."""
    from lm_eval.utils import handle_non_serializable

    from stackwise_cli.store.files import atomic_write_text
    from stackwise_cli.store.manifest import HarnessRun
    from stackwise_cli.store.project import now

    path = project.path(result.file)
    n = 1
    while path.exists():  # two runs in one second
        result.file = f"{RESULTS_DIR}/harness-{Path(result.file).stem.split('.')[0]}.{n}.json"
        path, n = project.path(result.file), n + 1
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = {**raw, "stackwise": result.to_data()}
    atomic_write_text(path, json.dumps(raw, indent=2, default=handle_non_serializable) + "\n")
    entry = HarnessRun(
        time=now(),
        file=result.file,
        model=result.model,
        adapter=result.adapter,
        scoring=result.scoring,
        tasks=result.tasks,
        num_fewshot=result.settings["num_fewshot"],
        limit=result.settings["limit"],
        mc_samples=result.settings["mc_samples"],
        metrics=result.metrics,
    )
    with project.update(f"eval --tasks {','.join(result.tasks)}") as m:
        m.harness = [*m.harness, entry][-HARNESS_RUNS_KEPT:]


HARNESS_RUNS_KEPT = 20  # the manifest keeps the last runs; every run's full JSON stays in eval/


def _quiet_harness() -> None:
    """The harness logs every default it fills in as a warning; keep its errors only (STACKWISE_DEBUG: all)."""
    if not os.environ.get("STACKWISE_DEBUG"):
        for name in ("lm_eval", "lm-eval"):
            logging.getLogger(name).setLevel(logging.ERROR)
