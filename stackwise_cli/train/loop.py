"""The training loop: one stack at a time (left-to-right), with checkpoints, resume and signal handling.

Left-to-right causal training of stack k (at rack position p):
- p = 0: tokens -> embedding -> stack -> final norm -> head; the embedding trains with the stack.
- p > 0: cached hidden states entering the stack -> stack -> final norm -> head; the stacks to its left are not
  touched (their work is frozen in the cache).
The final norm and the head train with every stack (``train.head: train``) or stay frozen (``frozen``). With tied
embeddings the head *is* the embedding, so it only trains together with the leftmost stack: changing it later
would make every cache stale.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stackwise_cli.errors import ProjectError, StackwiseError, Stopped
from stackwise_cli.model.model import Ends, Stack, causal_lm_loss
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.manifest import Manifest
from stackwise_cli.store.project import Project, digest
from stackwise_cli.store.shards import HiddenShard, TokenShard, read_hidden_shard, read_token_shard
from stackwise_cli.store.weights import load_ends, load_stack, save_ends, save_stack
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train.precision import autocast, pick_device

RESUME = ("auto", "never")


# --- data --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    hidden: torch.Tensor | None  # (B, T, d_model) float32: the cached states entering the stack, if any


class Sequences:
    """The rows of one split: token shards, and (optionally) the cache shards that match them row for row."""

    def __init__(self, tokens: list[TokenShard], hidden: list[HiddenShard] | None = None):
        if hidden is not None:
            for i, (t, h) in enumerate(zip(tokens, hidden, strict=True)):
                if not np.array_equal(np.asarray(t.seq_ids), np.asarray(h.seq_ids)):
                    raise StackwiseError(f"cache shard {i} does not hold the same sequences as token shard {i}")
        self.tokens, self.hidden = tokens, hidden
        self.starts = np.cumsum([0] + [len(t.seq_ids) for t in tokens])  # global row -> shard by searchsorted

    def __len__(self) -> int:
        return int(self.starts[-1])

    def get(self, rows: np.ndarray, device: torch.device) -> Batch:
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        toks, hids = [], []
        for r, s in zip(rows, shard_of):
            local = int(r - self.starts[s])
            toks.append(np.asarray(self.tokens[s].tokens[local]))
            if self.hidden is not None:
                hids.append(self.hidden[s].hidden[local])
        tokens = torch.from_numpy(np.stack(toks).astype(np.int64)).to(device)
        hidden = torch.stack(hids).to(device, torch.float32) if hids else None
        return Batch(tokens, hidden)


class Sampler:
    """Shuffled batches without replacement, epoch after epoch. Its whole state is (epoch, offset), so a
    resumed run draws exactly the batches the uninterrupted run would have."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise ProjectError(
                f"the split holds {n} sequences, fewer than train.batch_size ({batch_size})",
                hint="lower train.batch_size or prepare more text",
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = 0, 0

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        perm, out = self._perm(), []
        while len(out) < self.batch_size:
            take = min(self.batch_size - len(out), self.n - self.offset)
            out.extend(perm[self.offset : self.offset + take])
            self.offset += take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
                perm = self._perm()
        return np.asarray(out)

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


# --- optimisation ------------------------------------------------------------------------------------------


def lr_at(step: int, tr: TrainRecipe, steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    progress = (step - tr.warmup_steps) / max(1, steps - tr.warmup_steps)
    floor = tr.lr * tr.min_lr_ratio
    return floor + (tr.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: dict[str, nn.Parameter], tr: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains are left alone)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    other = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=1e-8)


class SignalFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption with --signal) ask the loop to checkpoint and stop
    at the next step boundary. Installed only in the main thread; the previous handlers come back after."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, lambda signum, frame: setattr(self, "received", signum))
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


# --- the loop ----------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One training run: what is saved in checkpoints, what trains, and the loss on a batch."""

    name: str
    modules: dict[str, nn.Module]  # checkpointed under "<key>.<tensor name>"
    trainable: dict[str, nn.Parameter]
    loss: Callable[[Batch], torch.Tensor]
    data: Sequences
    fingerprint: str  # the inputs this run trains on; a checkpoint made on other inputs is refused
    extra: dict = field(default_factory=dict)  # caller's state kept in checkpoints and restored on resume


@dataclass
class Result:
    steps: int
    tokens: int
    last_loss: float | None
    time_s: float
    tokens_per_s: float
    resumed_from: int | None


def _weights(job: Job) -> dict[str, torch.Tensor]:
    return {f"{k}.{n}": t for k, mod in job.modules.items() for n, t in mod.state_dict().items()}


def _load_weights(job: Job, weights: dict[str, torch.Tensor]) -> None:
    for key, mod in job.modules.items():
        mod.load_state_dict({n.removeprefix(f"{key}."): t for n, t in weights.items() if n.startswith(f"{key}.")})


def run(
    job: Job,
    tr: TrainRecipe,
    steps: int,
    device: torch.device,
    precision: str,
    ckpt_dir: Path,
    resume: str,
    log_path: Path,
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
    checkpoint_every_min: float = 0.0,
) -> Result:
    """Train ``job`` to ``steps`` optimizer steps, checkpointing every ``train.checkpoint_every`` steps and every
    ``checkpoint_every_min`` minutes of wall time (0 = off). ``stop_at`` (tests) stops as a signal would."""
    opt = make_optimizer(job.trainable, tr)
    names = {p: n for n, p in job.trainable.items()}
    sampler = Sampler(len(job.data), tr.batch_size, tr.seed)
    step, tokens, last_loss, resumed_from = 0, 0, None, None
    window: list[torch.Tensor] = []  # losses since the last log line (saved, so a resumed log is identical)

    existing = ckpt.list_checkpoints(ckpt_dir)
    if resume == "never" and existing:
        shutil.rmtree(ckpt_dir)
    elif resume == "auto" and existing:
        weights, optim, rng, state = ckpt.load_checkpoint(existing[-1])
        if state["fingerprint"] != job.fingerprint:
            raise StackwiseError(
                f"the checkpoint {existing[-1]} was made on other inputs than {job.name} has now "
                "(its cache or data changed)",
                hint="use --resume never to start again",
            )
        if state["steps_total"] != steps:
            raise StackwiseError(
                f"the checkpoint {existing[-1]} belongs to a {state['steps_total']}-step run, not {steps} "
                "(the learning-rate schedule depends on it)",
                hint=f"pass --steps {state['steps_total']}, or --resume never to start again",
            )
        _load_weights(job, weights)
        ckpt.load_optimizer_tensors(opt, job.trainable, optim)
        ckpt.restore_rng(rng)
        sampler.load_state(state["sampler"])
        step, tokens, last_loss = state["step"], state["tokens"], state["last_loss"]
        window = [torch.tensor(x) for x in state["window"]]
        job.extra.update(state["extra"])
        resumed_from = step
        reporter.info(f"{job.name}: resuming from step {step} ({existing[-1].name})")

    def save(at: int) -> None:
        state = {
            "step": at,
            "steps_total": steps,
            "tokens": tokens,
            "last_loss": last_loss,
            "sampler": sampler.state(),
            "window": [w.item() for w in window],
            "extra": job.extra,
            "fingerprint": job.fingerprint,
            "precision": precision,
            "time": time.time(),
        }
        ckpt.save_checkpoint(
            ckpt_dir, at, _weights(job), ckpt.optimizer_tensors(opt, names), state, tr.keep_checkpoints
        )

    log_path.parent.mkdir(parents=True, exist_ok=True)
    flag = SignalFlag()
    t0, tokens0 = time.perf_counter(), tokens
    last_save = time.monotonic()
    with flag.installed(), open(log_path, "a") as log, reporter.task(job.name, total=steps) as advance:
        advance(step)
        shown = step
        for mod in job.modules.values():
            mod.train()
        while step < steps:
            if flag.received is not None or (stop_at is not None and step >= stop_at):
                save(step)
                why = signal.Signals(flag.received).name if flag.received else "stop requested"
                raise Stopped(
                    f"{job.name}: {why}; checkpoint saved at step {step}/{steps}",
                    hint="rerun the same command to resume",
                )
            lr = lr_at(step, tr, steps)
            for g in opt.param_groups:
                g["lr"] = lr
            batch = job.data.get(sampler.next(), device)
            with autocast(precision, device):
                loss = job.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(list(job.trainable.values()), tr.grad_clip or float("inf"))
            # Checked every step, before the update: no checkpoint may ever hold diverged weights.
            if not (torch.isfinite(loss) and torch.isfinite(norm)):
                raise StackwiseError(
                    f"{job.name}: the loss or the gradient became non-finite at step {step + 1} "
                    f"(loss {loss.item()}, gradient norm {norm.item()})",
                    hint="lower train.lr in stackwise.yaml, then rerun: it resumes from the last checkpoint",
                )
            opt.step()
            step += 1
            tokens += batch.tokens.numel()
            window.append(loss.detach())
            if step % tr.log_every == 0 or step == steps:
                last_loss = torch.stack(window).float().mean().item()
                window.clear()
                elapsed = time.perf_counter() - t0
                tok_s = (tokens - tokens0) / max(elapsed, 1e-9)
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": last_loss,
                            "lr": lr,
                            "tokens": tokens,
                            "tokens_per_s": tok_s,
                            "elapsed_s": elapsed,
                        }
                    )
                    + "\n"
                )
                log.flush()
                advance(step - shown, loss=last_loss, tok_s=tok_s)
                shown = step
            due_by_time = checkpoint_every_min > 0 and time.monotonic() - last_save >= 60 * checkpoint_every_min
            if step < steps and ((tr.checkpoint_every and step % tr.checkpoint_every == 0) or due_by_time):
                save(step)
                last_save = time.monotonic()
        save(step)  # the final state: if we die before the stack file and manifest are written, a rerun finishes it
    elapsed = time.perf_counter() - t0
    return Result(step, tokens, last_loss, elapsed, (tokens - tokens0) / max(elapsed, 1e-9), resumed_from)


# --- one stack, left to right ------------------------------------------------------------------------------


def check_left_to_right(m: Manifest, stack_id: int, right: bool = True) -> int:
    """Left to right, a stack trains (or gets its cache) only on top of trained stacks, and (``right``) trains only
    while nothing to its right has trained on its output. Returns its rack position."""
    pos = m.position(stack_id)
    left = [s.id for s in m.rack[:pos] if s.state not in ("trained", "frozen")]
    if left:
        raise ProjectError(
            f"left-to-right: stack {stack_id} would learn from stack(s) {', '.join(map(str, left))}, "
            "which are not trained yet",
            hint=f"run `stackwise train-stack {left[0]}` first (`stackwise build` runs every stage in order)",
        )
    trained_right = [s.id for s in m.rack[pos + 1 :] if s.state != "new"] if right else []
    if trained_right:
        raise ProjectError(
            f"left-to-right: stack {stack_id} has trained stacks to its right ({', '.join(map(str, trained_right))}); "
            "retraining it would silently invalidate them",
            hint="grow a new stack on the right instead (`stackwise grow --side right`)",
        )
    return pos


def train_stack(
    project: Project,
    stack_id: int,
    steps: int | None = None,
    precision: str = "fp32",
    resume: str = "auto",
    device: str = "auto",
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
    checkpoint_every_min: float | None = None,
) -> Result | None:
    """Train one stack left-to-right. Returns None when it is already trained to ``steps``.

    Holds the stack's training lock throughout: a second process asked to train the same stack fails at once,
    naming the holder; a killed holder's lock is free again.
    """
    project.load().position(stack_id)  # an unknown id is a clear error before any lock file is made
    with project.job_lock(f"train-stack-{stack_id}", f"training of stack {stack_id}"):
        return _train_stack(
            project, stack_id, steps, precision, resume, device, reporter, stop_at, checkpoint_every_min
        )


def _train_stack(
    project: Project,
    stack_id: int,
    steps: int | None,
    precision: str,
    resume: str,
    device: str,
    reporter: Reporter,
    stop_at: int | None,
    checkpoint_every_min: float | None,
) -> Result | None:
    m = project.load()
    recipe, tr = m.recipe, m.recipe.train
    steps = steps if steps is not None else tr.steps
    if steps <= tr.warmup_steps:
        raise StackwiseError(
            f"--steps {steps} leaves no room for the schedule: train.warmup_steps is {tr.warmup_steps}",
            hint=f"pass --steps greater than {tr.warmup_steps}, or lower train.warmup_steps in the recipe",
        )
    if resume not in RESUME:
        raise StackwiseError(f"--resume must be one of {', '.join(RESUME)}, got {resume!r}")
    dev = pick_device(device)
    autocast(precision, dev)  # an impossible precision fails here, before the manifest is touched
    pos = check_left_to_right(m, stack_id)
    entry = m.stack(stack_id)
    if entry.state == "trained" and resume == "auto":
        if entry.steps >= steps:
            reporter.info(f"stack {stack_id} is already trained ({entry.steps} steps): nothing to do")
            return None
        raise StackwiseError(
            f"stack {stack_id} is already trained ({entry.steps} steps); {steps} steps would be a second run with a "
            "new schedule, not a continuation",
            hint="pass --resume never to train it further from its weights (its steps and tokens add up)",
        )
    # Training a trained stack again (--resume never) continues from its weights: the counts add up.
    prior_steps, prior_tokens = (entry.steps, entry.tokens) if entry.state == "trained" else (0, 0)
    ckpt_dir = project.ckpt_dir(stack_id)
    have_ckpt = resume == "auto" and bool(ckpt.list_checkpoints(ckpt_dir))

    # With a checkpoint to resume from, the weights come from it: the stack file may be one step ahead or behind.
    stack = load_stack(project, m, stack_id, verify=not have_ckpt).to(dev)
    ends = load_ends(project, m, verify=not have_ckpt).to(dev)
    for p in [*stack.parameters(), *ends.parameters()]:
        p.requires_grad_(False)

    trainable = {f"stack.{n}": p for n, p in stack.named_parameters()}
    if pos == 0:
        trainable["ends.embed.weight"] = ends.embed.weight
    # The leftmost stack always trains the final norm and head: a random head would make every readout useless.
    if pos == 0 or (tr.head == "train" and ends.head is not None):
        trainable.update({f"ends.{n}": p for n, p in ends.named_parameters() if not n.startswith("embed")})
    for p in trainable.values():
        p.requires_grad_(True)

    token_shards = [
        read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len) for s in m.data.splits["train"].shards
    ]
    if pos == 0:
        data = Sequences(token_shards)
        fingerprint = digest(["tokens", project.split_digest(m, "train")])

        def loss_fn(b: Batch) -> torch.Tensor:
            return causal_lm_loss(ends.logits(stack(ends.embed_tokens(b.tokens))), b.tokens)
    else:
        cache = project.fresh_cache(m, stack_id, "train")
        hidden = [
            read_hidden_shard(project.path(s.file), expect_shape=(m.data.seq_len, recipe.model.d_model))
            for s in cache.shards
        ]
        data = Sequences(token_shards, hidden)
        fingerprint = digest(["cache", *[s.sha256 for s in cache.shards]])

        def loss_fn(b: Batch) -> torch.Tensor:
            return causal_lm_loss(ends.logits(stack(b.hidden)), b.tokens)

    with project.update(f"train-stack {stack_id} --steps {steps} --precision {precision}") as mm:
        mm.stack(stack_id).state = "training"

    job = Job(
        f"train-stack {stack_id}",
        {"stack": stack, "ends": ends},
        trainable,
        loss_fn,
        data,
        fingerprint,
        {"prior_steps": prior_steps, "prior_tokens": prior_tokens},
    )
    try:
        result = run(
            job,
            tr,
            steps,
            dev,
            precision,
            ckpt_dir,
            resume,
            project.log_path(f"train-stack-{stack_id}"),
            reporter,
            stop_at,
            tr.checkpoint_every_min if checkpoint_every_min is None else checkpoint_every_min,
        )
    except Stopped:
        state = json.loads((ckpt.list_checkpoints(ckpt_dir)[-1] / "state.json").read_text())
        with project.update() as mm:
            e = mm.stack(stack_id)
            e.steps = state["extra"]["prior_steps"] + state["step"]
            e.tokens = state["extra"]["prior_tokens"] + state["tokens"]
            e.last_loss, e.precision = state["last_loss"], precision
        raise

    trained_ends = ends if any(n.startswith("ends.") for n in trainable) else None
    _finish(project, stack_id, stack, trained_ends, result, precision, job.extra)
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the stack file and the manifest now hold the result
    return result


def _finish(
    project: Project, stack_id: int, stack: Stack, ends: Ends | None, result: Result, precision: str, prior: dict
) -> None:
    sha = save_stack(project, stack.cpu(), stack_id)
    ends_sha = save_ends(project, ends.cpu()) if ends is not None else None
    with project.update(f"train-stack {stack_id}: trained to step {result.steps}, loss {result.last_loss}") as m:
        e = m.stack(stack_id)
        e.sha256, e.state, e.last_loss, e.precision = sha, "trained", result.last_loss, precision
        e.steps = prior["prior_steps"] + result.steps
        e.tokens = prior["prior_tokens"] + result.tokens
        if ends_sha is not None:
            m.ends.sha256, m.ends.input_sha256 = ends_sha
