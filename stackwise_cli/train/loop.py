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

from stackwise_cli.device import pick_device
from stackwise_cli.errors import EXIT_INTERRUPTED, ProjectError, StackwiseError, Stopped
from stackwise_cli.model.io import load_ends, load_stack, save_ends, save_stack
from stackwise_cli.model.model import Ends, Stack
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import TrainRecipe
from stackwise_cli.store.manifest import Manifest, StackEntry
from stackwise_cli.store.project import Project, digest
from stackwise_cli.store.shards import HiddenShard, TokenShard, read_hidden_shard, read_token_shard
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train import distributed
from stackwise_cli.train.defaults import adamw_step
from stackwise_cli.train.metrics import (
    EventWriter,
    Metrics,
    Validation,
    device_peak,
    epochs_line,
    keep_best,
    progress_fields,
    reset_peak_memory,
    save_best,
    tb_dir,
)
from stackwise_cli.train.objectives import CACHE_EPOCH, Objective, stack_objective
from stackwise_cli.train.precision import autocast, grad_scaler, resolve_precision

RESUME = ("auto", "never")


# --- data --------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, T) int64
    hidden: torch.Tensor | None  # (B, T, d_model) float32: the cached states entering the stack, if any
    seq_ids: np.ndarray  # (B,) the sequences' stable ids: masks are a function of them
    epochs: np.ndarray  # (B,) the epoch each row was drawn in: a new epoch, new masks


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

    def get(self, rows: np.ndarray, device: torch.device, epochs: np.ndarray | None = None) -> Batch:
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        toks, hids, ids = [], [], []
        for r, s in zip(rows, shard_of):
            local = int(r - self.starts[s])
            toks.append(np.asarray(self.tokens[s].tokens[local]))
            ids.append(int(self.tokens[s].seq_ids[local]))
            if self.hidden is not None:
                hids.append(self.hidden[s].hidden[local])
        tokens = torch.from_numpy(np.stack(toks).astype(np.int64)).to(device)
        hidden = torch.stack(hids).to(device, torch.float32) if hids else None
        epochs = np.zeros(len(rows), dtype=np.int64) if epochs is None else epochs
        return Batch(tokens, hidden, np.asarray(ids, dtype=np.int64), epochs)


class Sampler:
    """Shuffled batches without replacement from one endless seeded stream: epoch e is a permutation of the split
    seeded by (``train.seed``, e), and the stream is epoch 0, epoch 1, ... one after the other. ``start`` is where a
    run begins in that stream (in sequences): a stack trained after others starts where they stopped, so stacks
    trained one after another read consecutive, disjoint slices of the data, as one end-to-end run of their total
    length does (docs/training.md, "What each stack sees"). The whole state is the position (epoch, offset), so a
    resumed run draws exactly the batches the uninterrupted run would have. The permutation of the current epoch is
    computed once, when the stream enters it, not per batch: drawing a batch costs O(batch size)."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0):
        if n < batch_size:
            raise ProjectError(
                f"the split holds {n} sequences, fewer than train.batch_size ({batch_size})",
                hint="lower train.batch_size or prepare more text",
            )
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.offset = divmod(start, n)
        self.last_epochs = np.zeros(0, dtype=np.int64)  # the epoch of each row of the last batch
        self.permutations = 0  # how many epoch permutations were computed (each O(n)); tests count them
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            self._perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
            self._perm_epoch = self.epoch
            self.permutations += 1
        return self._perm

    def next(self) -> np.ndarray:
        out, epochs, need = [], [], self.batch_size
        while need:
            take = min(need, self.n - self.offset)
            out.append(self._permutation()[self.offset : self.offset + take])
            epochs.append(np.full(take, self.epoch, dtype=np.int64))
            self.offset += take
            need -= take
            if self.offset == self.n:
                self.epoch, self.offset = self.epoch + 1, 0
        self.last_epochs = np.concatenate(epochs)
        return np.concatenate(out)

    def position(self) -> int:
        """Sequences drawn from the start of the stream (all runs before this one included)."""
        return self.epoch * self.n + self.offset

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset < self.n:
            raise StackwiseError(
                f"the checkpoint's data position (epoch {epoch}, offset {offset}) does not fit a split of {self.n} "
                "sequences: it was made on other data",
                hint="use --resume never to start again",
            )
        self.epoch, self.offset = epoch, offset


# --- optimisation ------------------------------------------------------------------------------------------


def lr_at(step: int, tr: TrainRecipe, steps: int) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * min_lr_ratio`` at the last step."""
    if step < tr.warmup_steps:
        return tr.lr * (step + 1) / tr.warmup_steps
    progress = (step - tr.warmup_steps) / max(1, steps - tr.warmup_steps)
    floor = tr.lr * tr.min_lr_ratio
    return floor + (tr.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(params: dict[str, nn.Parameter], tr: TrainRecipe) -> torch.optim.Optimizer:
    """AdamW (``train.optimizer: adamw``, two fp32 states per parameter; on CUDA its fused step, which allocates no
    per-parameter temporaries: ``defaults.adamw_step``) or bitsandbytes' 8-bit AdamW (``adamw8bit``: two 8-bit states
    with blockwise scales, paged to host memory under pressure on CUDA); weight decay on matrices only (norm gains
    and biases are left alone)."""
    decay = [p for p in params.values() if p.ndim >= 2]
    other = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": other, "weight_decay": 0.0}]
    if tr.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        on_cuda = any(p.is_cuda for p in params.values())
        cls = bnb.optim.PagedAdamW8bit if on_cuda else bnb.optim.AdamW8bit
        return cls(groups, lr=tr.lr, betas=tr.betas, eps=1e-8)
    devices = {p.device.type for p in params.values()}
    fused = len(devices) == 1 and adamw_step(devices.pop()) == "fused"
    fused = fused and all(p.is_floating_point() for p in params.values())
    # fused=None (not False) off CUDA: torch's default, the foreach step, exactly as before.
    return torch.optim.AdamW(groups, lr=tr.lr, betas=tr.betas, eps=1e-8, fused=True if fused else None)


class Interrupted(Stopped):
    """Ctrl-C (SIGINT) during training: checkpointed at the step boundary as for SIGTERM, but exit 130, as an
    interrupted command exits."""

    exit_code = EXIT_INTERRUPTED


class SignalFlag:
    """SIGTERM / SIGUSR1 (what Slurm sends before preemption with --signal) and SIGINT (Ctrl-C) ask the loop to
    checkpoint and stop at the next step boundary. Installed only in the main thread; the previous handlers come
    back after. A second Ctrl-C while the step finishes interrupts at once (the last checkpoint stays)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the step
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[SignalFlag]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in self.SIGNALS}
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
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
    start: int = 0  # where the run begins in the sampler's stream, in sequences (``Sampler``, ``stream_start``)
    lr_span: tuple[int, int] | None = (
        None  # (offset, total): step s follows the schedule of a total-step run at s+offset
    )


@dataclass
class Result:
    steps: int
    tokens: int
    last_loss: float | None
    time_s: float
    tokens_per_s: float
    resumed_from: int | None


def _weights(job: Job) -> dict[str, torch.Tensor]:
    """Every checkpointed tensor by name, whole: under torchrun gathered to rank 0 (the other ranks get none)."""
    return distributed.gathered({f"{k}.{n}": t for k, mod in job.modules.items() for n, t in mod.state_dict().items()})


def _load_weights(job: Job, weights: dict[str, torch.Tensor]) -> None:
    for key, mod in job.modules.items():
        own = {n.removeprefix(f"{key}."): t for n, t in weights.items() if n.startswith(f"{key}.")}
        mod.load_state_dict(distributed.sharded_state(own, mod))  # under torchrun: this rank's shards of them


# The settings a checkpoint records and a resumed run must share: each one changes the numbers the rest of the
# run computes, so a resume under another value would be neither the old run nor a new one. Keyed by how the
# user sets it (a recipe key or a command option).
def run_settings(tr: TrainRecipe, precision: str, seq_len: int) -> dict[str, object]:
    """What a run's numbers depend on beyond its inputs (``Job.fingerprint``) and its length (``steps_total``, checked
    on its own), by the key or option that sets it."""
    return {
        "--precision": precision,
        "data.seq_len": seq_len,
        **{
            f"train.{k}": list(v) if isinstance(v, tuple) else v
            for k, v in (
                ("lr", tr.lr),
                ("min_lr_ratio", tr.min_lr_ratio),
                ("warmup_steps", tr.warmup_steps),
                ("batch_size", tr.batch_size),
                ("grad_accum", tr.grad_accum),
                ("optimizer", tr.optimizer),
                ("weight_decay", tr.weight_decay),
                ("betas", tr.betas),
                ("grad_clip", tr.grad_clip),
                ("seed", tr.seed),
                ("embedding", tr.embedding),  # what trains: the checkpoint's optimizer holds exactly those
                ("head", tr.head),
                ("lr_schedule", tr.lr_schedule),
            )
        },
    }


def check_resume_settings(checkpoint: Path, saved: dict[str, object], now: dict[str, object]) -> None:
    """Refuse to resume ``checkpoint`` under settings other than those it was made with, naming each one. A
    checkpoint from before settings were recorded (no ``saved``) is checked on ``--precision`` alone, if it has it."""
    changed = [(k, saved[k], v) for k, v in now.items() if k in saved and saved[k] != v]
    if not changed:
        return
    what = "; ".join(f"{k} was {old!r}, now {new!r}" for k, old, new in changed)
    back = ", ".join(f"{k} {old}" if k.startswith("--") else f"{k}: {old} in stackwise.yaml" for k, old, _ in changed)
    raise StackwiseError(
        f"the checkpoint {checkpoint} was made with other settings than this run: {what}",
        hint=f"to resume it, rerun with the old value ({back}); or pass --resume never to start again",
    )


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
    metrics: Metrics | None = None,
) -> Result:
    """Train ``job`` to ``steps`` optimizer steps, checkpointing every ``train.checkpoint_every`` steps and every
    ``checkpoint_every_min`` minutes of wall time (0 = off). ``stop_at`` (tests) stops as a signal would.
    ``metrics``: FLOPs per token, device peak and validation scorer for the log (``train/metrics.py``); every run
    writes TensorBoard event files beside its JSONL log when tensorboard is installed."""
    metrics = metrics if metrics is not None else Metrics()
    if metrics.events is None:
        metrics.events = EventWriter(tb_dir(log_path), reporter) if distributed.is_main() else distributed.NoEvents()
    opt = make_optimizer(job.trainable, tr)
    scaler = grad_scaler(precision, device)
    names = {p: n for n, p in job.trainable.items()}
    sampler = Sampler(len(job.data), tr.batch_size, tr.seed, job.start)
    step, tokens, last_loss, resumed_from = 0, 0, None, None
    window: list[torch.Tensor] = []  # losses since the last log line (saved, so a resumed log is identical)

    settings = run_settings(tr, precision, job.data.tokens[0].seq_len)
    existing = ckpt.list_checkpoints(ckpt_dir)
    distributed.barrier()  # under torchrun every rank has read the checkpoints before rank 0 removes any
    if resume == "never" and existing:
        if distributed.is_main():
            shutil.rmtree(ckpt_dir)
    elif resume == "auto" and existing:
        weights, optim, rng, state = ckpt.load_checkpoint(existing[-1])
        if state["fingerprint"] != job.fingerprint:
            raise StackwiseError(
                f"the checkpoint {existing[-1]} was made on other inputs than {job.name} has now "
                "(its cache or data changed)",
                hint="use --resume never to start again",
            )
        saved = state.get("settings") or ({"--precision": state["precision"]} if "precision" in state else {})
        check_resume_settings(existing[-1], saved, settings)
        if state["steps_total"] != steps:
            raise StackwiseError(
                f"the checkpoint {existing[-1]} belongs to a {state['steps_total']}-step run, not {steps} "
                "(the learning-rate schedule depends on it)",
                hint=f"pass --steps {state['steps_total']}, or --resume never to start again",
            )
        # What trains must be what the checkpoint trained (a setting outside run_settings, or a version of stackwise
        # with another rule for it, may have changed it): its optimizer state is for those parameters alone. Older
        # checkpoints do not list them; their optimizer tensors name every parameter that had a gradient.
        now = set(job.trainable)
        held = set(state["trainable"]) if "trainable" in state else {key.partition("::")[0] for key in optim}
        if held - now or ("trainable" in state and now - held):
            gone, new = sorted(held - now), sorted(now - held)
            raise StackwiseError(
                f"the checkpoint {existing[-1]} trained other parameters than this run would "
                f"(only in the checkpoint: {', '.join(gone) or 'none'}; only now: {', '.join(new) or 'none'})",
                hint="rerun with the settings it was made with, or pass --resume never to start again",
            )
        _load_weights(job, weights)
        ckpt.load_optimizer_tensors(opt, job.trainable, optim)
        ckpt.restore_rng(rng)
        sampler.load_state(state["sampler"])
        step, tokens, last_loss = state["step"], state["tokens"], state["last_loss"]
        window = [torch.tensor(x) for x in state["window"]]
        job.extra.update(state["extra"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
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
            "settings": settings,
            "trainable": sorted(job.trainable),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "time": time.time(),
        }
        weights, optim = _weights(job), ckpt.optimizer_tensors(opt, names)  # every rank joins the gathers
        if distributed.is_main():
            ckpt.save_checkpoint(ckpt_dir, at, weights, optim, state, tr.keep_checkpoints)

    for line in epochs_line(job.name, steps, tr.batch_size * tr.grad_accum, len(job.data)):
        if line:
            reporter.info(line)
    reset_peak_memory(device)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    flag = SignalFlag()
    t0, tokens0 = time.perf_counter(), tokens
    last_save = time.monotonic()
    log_to = distributed.log_file(log_path)  # rank 0's log; the other ranks write none
    with flag.installed(), open(log_to, "a") as log, reporter.task(job.name, total=steps) as advance:
        advance(step)
        shown = step
        for mod in job.modules.values():
            mod.train()
        while step < steps:
            if distributed.any_rank(flag.received is not None or (stop_at is not None and step >= stop_at)):
                save(step)
                why = signal.Signals(flag.received).name if flag.received else "stop requested"
                raise (Interrupted if flag.received == signal.SIGINT else Stopped)(
                    f"{job.name}: {why}; checkpoint saved at step {step}/{steps}",
                    hint="rerun the same command to resume",
                )
            offset, span = job.lr_span or (0, steps)
            lr = lr_at(step + offset, tr, span)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            # One optimizer step over train.grad_accum micro-batches of train.batch_size sequences, drawn in turn
            # from the sampler (so the rows are those of one batch grad_accum times as big). Each micro-batch's
            # loss is divided by grad_accum before backward: the summed gradients are those of the mean loss.
            micro_losses, step_tokens = [], 0
            for _ in range(tr.grad_accum):
                rows, epochs = distributed.local_rows(sampler.next(), sampler.last_epochs)  # this rank's slice
                batch = job.data.get(rows, device, epochs)
                with autocast(precision, device):
                    micro = job.loss(batch)
                part = micro / tr.grad_accum if tr.grad_accum > 1 else micro
                if scaler is not None:  # fp16: scale the loss up so small gradients survive
                    scaler.scale(part).backward()
                else:
                    part.backward()
                micro_losses.append(micro.detach())
                step_tokens += batch.tokens.numel() * distributed.world_size()  # the rows of every rank
                del micro, part, batch  # free this micro-batch's graph before the next is built
            loss = micro_losses[0] if tr.grad_accum == 1 else torch.stack(micro_losses).float().mean()
            loss = distributed.mean(loss)  # under torchrun: the global batch's, on every rank
            if scaler is not None:  # unscale before clipping
                scaler.unscale_(opt)
            norm = distributed.clip_grad_norm(list(job.trainable.values()), tr.grad_clip or float("inf"))
            # Checked every step, before the update: no checkpoint may ever hold diverged weights. With fp16 an
            # overflowing gradient is the scaler's signal to skip the step and lower the scale, not a divergence.
            overflow = scaler is not None and torch.isfinite(loss) and not torch.isfinite(norm)
            if not overflow and not (torch.isfinite(loss) and torch.isfinite(norm)):
                raise StackwiseError(
                    f"{job.name}: the loss or the gradient became non-finite at step {step + 1} "
                    f"(loss {loss.item()}, gradient norm {norm.item()})",
                    hint="lower train.lr in stackwise.yaml, then rerun: it resumes from the last checkpoint",
                )
            if scaler is not None:
                scaler.step(opt)  # skipped when the scaled gradients overflowed
                scaler.update()
            else:
                opt.step()
            step += 1
            tokens += step_tokens  # grad_accum x batch_size x seq_len
            window.append(loss.detach())
            if step % tr.log_every == 0 or step == steps:
                last_loss = torch.stack(window).float().mean().item()
                window.clear()
                elapsed = time.perf_counter() - t0
                tok_s = (tokens - tokens0) / max(elapsed, 1e-9)
                logged = metrics.logged(step, last_loss, lr, norm.item(), tokens, tok_s, device)
                log.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": last_loss,
                            "lr": lr,
                            "tokens": tokens,
                            "tokens_per_s": tok_s,
                            "elapsed_s": elapsed,
                            **logged,
                        }
                    )
                    + "\n"
                )
                log.flush()
                advance(step - shown, **progress_fields(last_loss, lr, logged, tok_s))
                shown = step
            if metrics.validation_due(step, steps):
                val_loss = metrics.validation.score(job.modules, device, precision)
                best = job.extra.get("best_val")
                if best is None or val_loss < best["val_loss"]:
                    job.extra["best_val"] = {"step": step, "val_loss": val_loss}
                    best_weights = _weights(job)  # every rank joins the gather; rank 0 writes
                    if distributed.is_main():
                        save_best(ckpt_dir, best_weights, step, val_loss)
                log.write(json.dumps({"step": step, "val_loss": val_loss, "tokens": tokens}) + "\n")
                log.flush()
                metrics.events.scalars({"val/loss": val_loss}, step)
                reporter.info(f"{job.name}: step {step}/{steps} val_loss {val_loss:.4f}")
            due_by_time = checkpoint_every_min > 0 and time.monotonic() - last_save >= 60 * checkpoint_every_min
            if step < steps and ((tr.checkpoint_every and step % tr.checkpoint_every == 0) or due_by_time):
                save(step)
                last_save = time.monotonic()
        save(step)  # the final state: if we die before the stack file and manifest are written, a rerun finishes it
    metrics.close()
    elapsed = time.perf_counter() - t0
    return Result(step, tokens, last_loss, elapsed, (tokens - tokens0) / max(elapsed, 1e-9), resumed_from)


def stream_start(m: Manifest, before: list[StackEntry]) -> int:
    """Where a run begins in the train split's sample stream: after every sequence the runs recorded on the stack
    entries ``before`` drew (each run draws its ``tokens / data.seq_len`` sequences in turn; the stacks of one
    end-to-end run share it, so it counts once)."""
    runs = [e.tokens for e in before if e.trained_by != "end-to-end"]
    runs.append(max((e.tokens for e in before if e.trained_by == "end-to-end"), default=0))
    return sum(runs) // m.data.seq_len


# --- curricula -------------------------------------------------------------------------------------------


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
    if trained_right and not inserted(m, pos):
        raise ProjectError(
            f"left-to-right: stack {stack_id} has trained stacks to its right ({', '.join(map(str, trained_right))}); "
            "retraining it would silently invalidate them",
            hint="grow a new stack on the right instead (`stackwise grow --side right`)",
        )
    return pos


def inserted(m: Manifest, pos: int) -> bool:
    """Left to right, whether the stack at ``pos`` was inserted into a trained rack (``grow --after``, as LLaMA Pro
    inserts blocks): not trained itself, after a stack, and every stack to its right trained. It trains from the cache
    of the stacks before it, and its loss reads out through the frozen stacks after it (``frozen_suffix``)."""
    after = m.rack[pos + 1 :]
    return (
        pos > 0
        and m.rack[pos].state not in ("trained", "frozen")
        and bool(after)
        and all(s.state in ("trained", "frozen") for s in after)
    )


def frozen_suffix(m: Manifest, pos: int) -> list[StackEntry]:
    """The trained stacks after ``pos`` that a stack's loss passes through: right to left all of them; left to right
    those after an inserted stack (``inserted``), none otherwise."""
    if m.recipe.curriculum == "right-to-left" or inserted(m, pos):
        return m.rack[pos + 1 :]
    return []


def check_right_to_left(m: Manifest, stack_id: int) -> int:
    """Right to left, only the leftmost stack trains, against a suffix that is all trained. Returns 0."""
    pos = m.position(stack_id)
    if pos != 0:
        raise ProjectError(
            f"right-to-left: stack {stack_id} is at rack position {pos}; only the leftmost stack "
            f"({m.rack[0].id}) trains, in front of the trained suffix",
            hint="grow a new stack on the left (`stackwise grow --side left`) and train that",
        )
    untrained = [s.id for s in m.rack[1:] if s.state not in ("trained", "frozen")]
    if untrained:
        raise ProjectError(
            f"right-to-left: stack {stack_id} would learn against stack(s) {', '.join(map(str, untrained))}, "
            "which are not trained yet",
            hint=f"run `stackwise train-stack {untrained[-1]}` first (`stackwise build` runs every stage in order)",
        )
    return pos


def check_curriculum(m: Manifest, stack_id: int | None) -> int | None:
    """The rack position the curriculum lets ``stack_id`` train at (None: the whole rack, end to end)."""
    curriculum = m.recipe.curriculum
    if curriculum == "end-to-end":
        if stack_id is not None:
            raise ProjectError(
                f"the recipe's curriculum is end-to-end: the whole rack trains at once, not stack {stack_id}",
                hint="run `stackwise train-stack all`",
            )
        if not m.rack:
            raise ProjectError("the rack is empty: nothing to train", hint="run `stackwise grow` once per stack")
        return None
    if stack_id is None:
        raise ProjectError(
            f"`train-stack all` trains the whole rack end to end; this recipe's curriculum is {curriculum}",
            hint="train one stack at a time, or make a project with `curriculum: end-to-end` as the baseline",
        )
    if curriculum == "right-to-left":
        return check_right_to_left(m, stack_id)
    return check_left_to_right(m, stack_id)


def _grown_index(m: Manifest, pos: int) -> int:
    """How many stacks were grown before the one at ``pos``: left to right those to its left, right to left those
    to its right."""
    return len(m.rack) - 1 - pos if m.recipe.curriculum == "right-to-left" else pos


def _steps_of(tr: TrainRecipe, grown: int) -> int:
    if tr.step_scale is None or grown >= len(tr.step_scale):
        return tr.steps
    return round(tr.steps * tr.step_scale[grown])


def planned_steps(m: Manifest, pos: int) -> int:
    """The steps the recipe plans for the stack at rack position ``pos``: train.steps times its factor in
    ``train.step_scale``, which lists the stacks in the order they are grown (left to right: from the input; right to
    left: the leftmost stack is the last grown). A stack grown past the planned rack gets train.steps."""
    return _steps_of(m.recipe.train, _grown_index(m, pos))


def lr_span(m: Manifest, pos: int) -> tuple[int, int] | None:
    """``train.lr_schedule: whole-rack``: the stack's slice of one schedule over every planned stack's steps, as
    (steps of the stacks grown before it, steps of all of them); None for a per-stack schedule, or a stack grown past
    the planned rack (it gets its own)."""
    tr, grown = m.recipe.train, _grown_index(m, pos)
    if tr.lr_schedule != "whole-rack" or grown >= m.recipe.rack.stacks:
        return None
    steps = [_steps_of(tr, g) for g in range(m.recipe.rack.stacks)]
    return sum(steps[:grown]), sum(steps)


# --- train-stack -------------------------------------------------------------------------------------------

ALL = "all"


def train_stack(
    project: Project,
    stack_id: int | str,
    steps: int | None = None,
    precision: str = "auto",
    resume: str = "auto",
    device: str = "auto",
    reporter: Reporter = QUIET,
    stop_at: int | None = None,
    checkpoint_every_min: float | None = None,
) -> Result | None:
    """Train one stack by the recipe's curriculum, or (``stack_id`` = "all", curriculum end-to-end) the whole
    rack. Returns None when it is already trained to ``steps``.

    Holds the training lock throughout: a second process asked to train the same thing fails at once, naming the
    holder; a killed holder's lock is free again.
    """
    target = None if stack_id == ALL else int(stack_id)
    if target is not None:
        project.load().position(target)  # an unknown id is a clear error before any lock file is made
    name = "all" if target is None else str(target)
    what = "end-to-end training of the rack" if target is None else f"training of stack {target}"
    distributed.init(pick_device(device))  # under torchrun: join the other ranks; rank 0 alone takes the lock
    reporter = reporter if distributed.is_main() else QUIET
    with project.job_lock(f"train-stack-{name}", what):
        return _train(project, target, steps, precision, resume, device, reporter, stop_at, checkpoint_every_min)


@dataclass
class Setup:
    """What one curriculum trains, on what, and with which loss."""

    modules: dict[str, nn.Module]
    trainable: dict[str, nn.Parameter]
    loss: Callable[[Batch], torch.Tensor]
    data: Sequences
    fingerprint: str


def _freeze(modules: list[nn.Module]) -> None:
    for mod in modules:
        for p in mod.parameters():
            p.requires_grad_(False)


def token_data(project: Project, m: Manifest) -> list[TokenShard]:
    return [
        read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len) for s in m.data.splits["train"].shards
    ]


def _setup_one(
    project: Project, m: Manifest, stack_id: int, pos: int, stack: Stack, ends: Ends, dev: torch.device
) -> Setup:
    """One stack, left to right (from its cache, or from the tokens when leftmost) or right to left (from the
    tokens, through the frozen suffix)."""
    recipe, tr = m.recipe, m.recipe.train
    obj = stack_objective(m, stack_id)
    causal = obj.causal
    forward = forward_for(tr.activation_checkpointing)
    right_to_left = recipe.curriculum == "right-to-left"
    suffix = frozen_suffix(m, pos)
    trainable = trainable_for(stack, ends, tr, pos, right_to_left, bool(suffix))
    tokens = token_data(project, m)
    frozen = []
    if suffix:
        from stackwise_cli.train.frozen import freeze

        frozen = [freeze(load_stack(project, m, s.id), tr.frozen_dtype).to(dev) for s in suffix]
    suffix_forward = forward_for(tr.suffix_checkpointing)
    # The frozen inputs: a checkpoint made against another suffix or head is not this run.
    suffix_key = [m.ends.sha256, *[f"{s.id}:{s.sha256}" for s in suffix], tr.frozen_dtype] if suffix else []

    if pos == 0 or right_to_left:

        def loss_fn(b: Batch) -> torch.Tensor:
            c = obj.corrupt(b.tokens, b.seq_ids, b.epochs)
            h = forward(stack, ends.embed_tokens(c.inputs), causal, c.t)
            for s in frozen:
                h = suffix_forward(s, h, causal, c.t)
            return obj.loss(ends.logits(h), c)

        parts = ["tokens", project.split_digest(m, "train"), obj.key(), *suffix_key]
        return Setup({"stack": stack, "ends": ends}, trainable, loss_fn, Sequences(tokens), digest(parts))

    if tr.prefix == "recompute":
        from stackwise_cli.train.frozen import freeze

        prefix = [freeze(load_stack(project, m, s.id), tr.frozen_dtype).to(dev) for s in m.rack[:pos]]

        def recomputed_loss(b: Batch) -> torch.Tensor:
            c = obj.corrupt(b.tokens, b.seq_ids, b.epochs)
            with torch.no_grad():  # what the cache would hold, computed for this batch only
                h = ends.embed_tokens(c.inputs)
                for s in prefix:
                    h = s(h, causal, c.t)
            h = forward(stack, h, causal, c.t)
            for s in frozen:
                h = suffix_forward(s, h, causal, c.t)
            return obj.loss(ends.logits(h), c)

        prefix_key = [m.ends.sha256, *[f"{s.id}:{s.sha256}" for s in m.rack[:pos]], tr.frozen_dtype]
        parts = ["recompute", project.split_digest(m, "train"), obj.key(), *prefix_key, *suffix_key]
        return Setup({"stack": stack, "ends": ends}, trainable, recomputed_loss, Sequences(tokens), digest(parts))

    cache = project.fresh_cache(m, stack_id, "train")
    hidden = [
        read_hidden_shard(project.path(s.file), expect_shape=(m.data.seq_len, recipe.model.d_model))
        for s in cache.shards
    ]

    def cached_loss(b: Batch) -> torch.Tensor:
        c = obj.corrupt(b.tokens, b.seq_ids, CACHE_EPOCH)  # the masks the cache was computed with
        h = forward(stack, b.hidden, causal, c.t)
        for s in frozen:  # an inserted stack reads out through the trained stacks after it
            h = suffix_forward(s, h, causal, c.t)
        return obj.loss(ends.logits(h), c)

    fingerprint = digest(["cache", *[s.sha256 for s in cache.shards], *suffix_key])
    return Setup({"stack": stack, "ends": ends}, trainable, cached_loss, Sequences(tokens, hidden), fingerprint)


def trainable_for(
    stack: Stack, ends: Ends, tr: TrainRecipe, pos: int, right_to_left: bool, has_suffix: bool
) -> dict[str, nn.Parameter]:
    """What trains with one stack at rack position ``pos``, as ``stack.<name>`` / ``ends.<name>``.

    The embedding trains with the leftmost stack. Right to left with tied embeddings it is also the head that the
    trained suffix reads out through, so it trains only with the first stack. The first stack trained always trains
    the final norm and head (a random head makes every readout useless); left to right the later ones do too with
    `train.head: train`, tied or not: with tied embeddings the output side is what is not the embedding matrix (the
    final norm, BERT's MLM transform and output bias), which no cache depends on. Right to left, and left to right
    for a stack inserted in front of trained ones, the head stays frozen: the trained suffix was fitted to it."""
    trainable = {f"stack.{n}": p for n, p in stack.named_parameters()}
    tied_head_in_use = right_to_left and ends.head is None and has_suffix
    if pos == 0 and tr.embedding == "train" and not tied_head_in_use:
        trainable.update({f"ends.{n}": p for n, p in ends.named_input_parameters().items()})
    first = not has_suffix if right_to_left else pos == 0
    if first or (tr.head == "train" and not right_to_left and not has_suffix):
        trainable.update({f"ends.{n}": p for n, p in ends.named_output_parameters().items()})
    return trainable


def forward_for(checkpointed: bool) -> Callable:
    """How a stack runs: whole, or (``checkpointed``: ``train.activation_checkpointing`` for a trained stack,
    ``train.suffix_checkpointing`` for a frozen suffix, ``train.finetune_checkpointing`` in a fuse fine-tune) block by
    block under checkpoint, keeping only each block's input for backward and recomputing the rest."""
    if checkpointed:
        from stackwise_cli.train.frozen import run_checkpointed

        return run_checkpointed
    return lambda stack, h, causal, t: stack(h, causal, t)


def whole_rack_loss(
    obj: Objective, ends: Ends, stacks: list[Stack], forward: Callable
) -> Callable[[Batch], torch.Tensor]:
    """The loss of the whole rack on a batch: corrupt, embed, every stack in order, head, objective."""

    def loss_fn(b: Batch) -> torch.Tensor:
        c = obj.corrupt(b.tokens, b.seq_ids, b.epochs)
        h = ends.embed_tokens(c.inputs)
        for s in stacks:
            h = forward(s, h, obj.causal, c.t)
        return obj.loss(ends.logits(h), c)

    return loss_fn


def whole_rack_modules(
    m: Manifest, stacks: list[Stack], ends: Ends
) -> tuple[dict[str, nn.Module], dict[str, nn.Parameter]]:
    """The whole rack as checkpointed modules (``ends``, ``stack<id>``) and every parameter of it by name."""
    modules: dict[str, nn.Module] = {"ends": ends} | {f"stack{e.id}": s for e, s in zip(m.rack, stacks)}
    return modules, {f"{k}.{n}": p for k, mod in modules.items() for n, p in mod.named_parameters()}


def _setup_all(project: Project, m: Manifest, stacks: list[Stack], ends: Ends) -> Setup:
    """The whole rack end to end: the embedding, every stack and the head train together."""
    obj = stack_objective(m, None)
    modules, trainable = whole_rack_modules(m, stacks, ends)
    if m.recipe.train.embedding == "frozen":
        for n in ends.named_input_parameters():
            trainable.pop(f"ends.{n}")
    loss_fn = whole_rack_loss(obj, ends, stacks, forward_for(m.recipe.train.activation_checkpointing))
    fingerprint = digest(["tokens", project.split_digest(m, "train"), obj.key(), "end-to-end"])
    return Setup(modules, trainable, loss_fn, Sequences(token_data(project, m)), fingerprint)


def train_flops_per_token(
    m: Manifest, stack_id: int | None, pos: int | None, trainable: dict[str, nn.Parameter], ends: Ends
) -> float:
    """The training FLOPs per token of this run, by the planner's formulas (``bench/plan.py``) for the rack as it
    is: the stack's own blocks (or every block end to end), right to left the frozen suffix, and the head, whose
    weight's gradient counts only where it trains (``trainable``)."""
    from stackwise_cli.bench.plan import FlopShapes, train_stack_flops_per_token, whole_model_flops_per_token

    f = FlopShapes.of(m.recipe, m.data.seq_len)
    head = ends.embed.weight if ends.head is None else ends.head.weight
    head_trains = any(p is head for p in trainable.values())
    ckpt_on = m.recipe.train.activation_checkpointing
    if stack_id is None:
        blocks = sum(e.blocks for e in m.rack)
        return whole_model_flops_per_token(f, blocks, len(m.rack), checkpointing=ckpt_on, head_trains=head_trains)
    suffix = frozen_suffix(m, pos)
    prefix = m.rack[:pos] if m.recipe.train.prefix == "recompute" and m.recipe.curriculum == "left-to-right" else []
    return train_stack_flops_per_token(
        f,
        m.rack[pos].blocks,
        head_trains=head_trains,
        checkpointing=ckpt_on,
        suffix_blocks=sum(e.blocks for e in suffix),
        suffix_stacks=len(suffix),
        prefix_blocks=[e.blocks for e in prefix],
    )


def _train(
    project: Project,
    stack_id: int | None,
    steps: int | None,
    precision: str,
    resume: str,
    device: str,
    reporter: Reporter,
    stop_at: int | None,
    checkpoint_every_min: float | None,
) -> Result | None:
    m = project.load()
    tr = m.recipe.train
    pos = check_curriculum(m, stack_id)
    ids = m.ids() if stack_id is None else [stack_id]
    span = None  # the stack's slice of a whole-rack schedule, for the planned run only (not for --steps N)
    if steps is None:  # end to end: the same token budget as training every stack for train.steps
        steps = tr.steps * len(ids) if stack_id is None else planned_steps(m, pos)
        span = None if stack_id is None else lr_span(m, pos)
    if steps <= tr.warmup_steps:
        raise StackwiseError(
            f"--steps {steps} leaves no room for the schedule: train.warmup_steps is {tr.warmup_steps}",
            hint=f"pass --steps greater than {tr.warmup_steps}, or lower train.warmup_steps in the recipe",
        )
    if resume not in RESUME:
        raise StackwiseError(f"--resume must be one of {', '.join(RESUME)}, got {resume!r}")
    dev = distributed.local_device(pick_device(device))
    precision = resolve_precision(precision, dev)
    autocast(precision, dev)  # an impossible precision fails here, before the manifest is touched
    distributed.check(precision, tr.batch_size, tr.optimizer)  # and so does what several ranks cannot run
    label = "all" if stack_id is None else str(stack_id)
    entries = [m.stack(i) for i in ids]
    states = {e.state for e in entries}
    if states == {"trained"} and resume == "auto":
        done = min(e.steps for e in entries)
        if done >= steps:
            reporter.info(f"stack {label} is already trained ({done} steps): nothing to do")
            return None
        raise StackwiseError(
            f"stack {label} is already trained ({done} steps); {steps} steps would be a second run with a "
            "new schedule, not a continuation",
            hint="pass --resume never to train it further from its weights (its steps and tokens add up)",
        )
    if stack_id is None and "trained" in states and states != {"trained"}:
        raise ProjectError(
            "end to end trains every stack together, and some are trained already: "
            f"{', '.join(str(e.id) for e in entries if e.state == 'trained')}",
            hint="make a new project for the baseline (`stackwise build` with `curriculum: end-to-end`)",
        )
    # Training a trained stack again (--resume never) continues from its weights: the counts add up. The counts
    # of the weights in the stack file are the entry's, unless an interrupted run already moved the entry on: then
    # its checkpoints remember what the file held when that run began.
    ckpt_dir = project.ckpt_dir(label)
    prior_steps, prior_tokens, prior_flops = entries[0].steps, entries[0].tokens, entries[0].flops
    if states != {"trained"} and ckpt.list_checkpoints(ckpt_dir):
        extra = json.loads((ckpt.list_checkpoints(ckpt_dir)[-1] / "state.json").read_text())["extra"]
        prior_steps, prior_tokens = extra["prior_steps"], extra["prior_tokens"]
        prior_flops = extra.get("prior_flops", 0.0)  # a checkpoint from before FLOPs were counted: none before it
    have_ckpt = resume == "auto" and bool(ckpt.list_checkpoints(ckpt_dir))

    # With a checkpoint to resume from, the weights come from it: the files may be one step ahead or behind.
    stacks = [load_stack(project, m, i, verify=not have_ckpt).to(dev) for i in ids]
    ends = load_ends(project, m, verify=not have_ckpt).to(dev)
    _freeze([*stacks, ends])
    if precision == "fp8":  # the trained stacks' linear layers become scaled fp8 matmuls, same parameters
        from stackwise_cli.train.fp8 import to_fp8

        for stack in stacks:
            to_fp8(stack)
    distributed.shard(stacks, dev, precision)  # under torchrun: FSDP2 over each block, before what trains is listed
    if stack_id is None:
        setup = _setup_all(project, m, stacks, ends)
    else:
        setup = _setup_one(project, m, stack_id, pos, stacks[0], ends, dev)
    for p in setup.trainable.values():
        p.requires_grad_(True)

    if distributed.is_main():
        with project.update(f"train-stack {label} --steps {steps} --precision {precision}") as mm:
            for i in ids:
                mm.stack(i).state = "training"

    # The stacks trained before this one (left to right: those to its left; right to left: its suffix) drew the
    # start of the stream, and an earlier run of this stack (--resume never) what follows: this run reads on.
    if stack_id is None:
        before = []
    elif m.recipe.curriculum == "right-to-left":
        before = m.rack[pos + 1 :]
    else:
        before = m.rack[:pos]
    start = stream_start(m, before) + prior_tokens // m.data.seq_len
    job = Job(
        f"train-stack {label}",
        setup.modules,
        setup.trainable,
        setup.loss,
        setup.data,
        setup.fingerprint,
        {"prior_steps": prior_steps, "prior_tokens": prior_tokens, "prior_flops": prior_flops},
        start,
        span if prior_steps == 0 else None,  # a second run (--resume never) has a schedule of its own
    )
    flops_per_token = train_flops_per_token(m, stack_id, pos, setup.trainable, ends)
    metrics = Metrics(flops_per_token, device_peak(dev, precision), run_validation(project, m, stack_id, setup, dev))
    try:
        result = run(
            job,
            tr,
            steps,
            dev,
            precision,
            ckpt_dir,
            resume,
            project.log_path(f"train-stack-{label}"),
            reporter,
            stop_at,
            tr.checkpoint_every_min if checkpoint_every_min is None else checkpoint_every_min,
            metrics,
        )
    except Stopped:
        if not distributed.is_main():
            distributed.barrier()  # rank 0 records the stop in the manifest; the others wait for it, then stop
            raise
        state = json.loads((ckpt.list_checkpoints(ckpt_dir)[-1] / "state.json").read_text())
        with project.update() as mm:
            for i in ids:
                e = mm.stack(i)
                e.steps = state["extra"]["prior_steps"] + state["step"]
                e.tokens = state["extra"]["prior_tokens"] + state["tokens"]
                e.last_loss, e.precision = state["last_loss"], precision
                e.flops = state["extra"].get("prior_flops", 0.0) + state["tokens"] * flops_per_token
            mm.recount_flops()
        distributed.barrier()
        raise

    trained_ends = ends if any(n.startswith("ends.") for n in setup.trainable) else None
    curriculum = m.recipe.curriculum
    flops = result.tokens * flops_per_token
    stacks = [distributed.whole_copy(s, lambda s=s: Stack(s.cfg, len(s.blocks), s.attn)) for s in stacks]
    if not distributed.is_main():  # rank 0 alone writes the result; the others wait for it
        distributed.barrier()
        return result
    _finish(project, dict(zip(ids, stacks)), trained_ends, result, precision, job.extra, curriculum, flops)
    keep_best(ckpt_dir, project.path(f"best/{label}.safetensors"))  # train.eval_every: the best-validation weights
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the stack files and the manifest now hold the result
    distributed.barrier()
    return result


def val_data(project: Project, m: Manifest) -> Sequences:
    """The validation split's rows, for ``train.eval_every`` (scored from the first, ``eval.max_sequences`` of them)."""
    return Sequences(
        [read_token_shard(project.path(s.file), expect_seq_len=m.data.seq_len) for s in m.data.splits["val"].shards]
    )


def run_validation(
    project: Project, m: Manifest, stack_id: int | None, setup: Setup, dev: torch.device
) -> Validation | None:
    """``train.eval_every``: the run's loss on a fixed subset of the validation split. A run that reads tokens
    scores its own loss; a stack trained on a cache (left to right, not leftmost) has no val cache to read, so it
    scores the readout after it: the trained stacks to its left (frozen, read from their files), then it, then the
    head."""
    tr, ev = m.recipe.train, m.recipe.eval
    if not tr.eval_every:
        return None
    loss = setup.loss
    if setup.data.hidden is not None:
        pos = m.position(stack_id)
        left = [load_stack(project, m, e.id).to(dev) for e in m.rack[:pos]]
        _freeze(left)
        stack, ends = setup.modules["stack"], setup.modules["ends"]
        loss = whole_rack_loss(stack_objective(m, stack_id), ends, [*left, stack], forward_for(False))
    return Validation(tr.eval_every, loss, val_data(project, m), ev.max_sequences, ev.batch_size)


def _finish(
    project: Project,
    stacks: dict[int, Stack],
    ends: Ends | None,
    result: Result,
    precision: str,
    prior: dict,
    curriculum: str,
    flops: float,
) -> None:
    shas = {i: save_stack(project, stack.cpu(), i) for i, stack in stacks.items()}
    ends_sha = save_ends(project, ends.cpu()) if ends is not None else None
    label = "all" if len(stacks) > 1 else str(next(iter(stacks)))
    with project.update(f"train-stack {label}: trained to step {result.steps}, loss {result.last_loss}") as m:
        for i, sha in shas.items():
            e = m.stack(i)
            e.sha256, e.state, e.last_loss, e.precision = sha, "trained", result.last_loss, precision
            e.steps = prior["prior_steps"] + result.steps
            e.tokens = prior["prior_tokens"] + result.tokens
            e.flops = prior.get("prior_flops", 0.0) + flops
            e.trained_by = curriculum
        m.recount_flops()
        if ends_sha is not None:
            m.ends.sha256, m.ends.input_sha256 = ends_sha
