"""The generic training loop: a ``Job`` (what is checkpointed, what trains, the loss on a batch, the data) trained to a
number of optimizer steps, with checkpoints, resume under the settings it was made with, and signal handling. It
knows no stacks or curricula: ``train/stack.py`` and ``train/finetune.py`` build the jobs it runs.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stackwise_cli.errors import EXIT_INTERRUPTED, StackwiseError, Stopped
from stackwise_cli.progress import QUIET, Reporter
from stackwise_cli.recipe import Recipe, TrainRecipe
from stackwise_cli.schema import to_data
from stackwise_cli.train import checkpoint as ckpt
from stackwise_cli.train import distributed
from stackwise_cli.train.data import Batch, Sampler, Sequences
from stackwise_cli.train.metrics import (
    EventWriter,
    Metrics,
    epochs_line,
    progress_fields,
    reset_peak_memory,
    save_best,
    tb_dir,
)
from stackwise_cli.train.optim import lr_at, make_optimizer
from stackwise_cli.train.precision import autocast, grad_scaler

RESUME = ("auto", "never")


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
    # The caller's settings its numbers depend on beyond the loop's own (``run_settings``), by recipe key: a resume
    # under other values is refused, naming the key.
    settings: dict[str, object] = field(default_factory=dict)


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


def recipe_settings(recipe: Recipe, keys: tuple[str, ...]) -> dict[str, object]:
    """The values of the recipe ``keys`` (``section.name``) as plain data, for ``Job.settings``."""
    return {key: to_data(getattr(getattr(recipe, key.partition(".")[0]), key.partition(".")[2])) for key in keys}


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


def check_resumable(
    path: Path,
    state: ckpt.TrainState,
    job: Job,
    settings: dict[str, object],
    steps: int,
    optim: dict[str, torch.Tensor],
) -> None:
    """Refuse to resume checkpoint ``path`` into a run that is not the one it was made by, naming what differs: the
    settings first (a changed recipe key also changes the fingerprint of what it shapes, and the key is what the user
    can put back), then the inputs, the run's length and what trains."""
    check_resume_settings(path, state.settings or {"--precision": state.precision}, settings)
    if state.fingerprint != job.fingerprint:
        raise StackwiseError(
            f"the checkpoint {path} was made on other inputs than {job.name} has now (its cache or data changed)",
            hint="use --resume never to start again",
        )
    if state.steps_total != steps:
        raise StackwiseError(
            f"the checkpoint {path} belongs to a {state.steps_total}-step run, not {steps} "
            "(the learning-rate schedule depends on it)",
            hint=f"pass --steps {state.steps_total}, or --resume never to start again",
        )
    # What trains must be what the checkpoint trained (a setting outside run_settings, or a version of stackwise
    # with another rule for it, may have changed it): its optimizer state is for those parameters alone. Older
    # checkpoints do not list them; their optimizer tensors name every parameter that had a gradient.
    now = set(job.trainable)
    listed = state.trainable is not None
    held = set(state.trainable) if listed else {key.partition("::")[0] for key in optim}
    if held - now or (listed and now - held):
        gone, new = sorted(held - now), sorted(now - held)
        raise StackwiseError(
            f"the checkpoint {path} trained other parameters than this run would "
            f"(only in the checkpoint: {', '.join(gone) or 'none'}; only now: {', '.join(new) or 'none'})",
            hint="rerun with the settings it was made with, or pass --resume never to start again",
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

    settings = run_settings(tr, precision, job.data.tokens[0].seq_len) | job.settings
    checkpoints = ckpt.Checkpoints(ckpt_dir, tr.keep_checkpoints)
    latest = checkpoints.latest()
    distributed.barrier()  # under torchrun every rank has read the checkpoints before rank 0 removes any
    if resume == "never" and latest:
        if distributed.is_main():
            checkpoints.clear()
    elif resume == "auto" and latest:
        weights, optim, rng, state = ckpt.load_checkpoint(latest)
        check_resumable(latest, state, job, settings, steps, optim)
        _load_weights(job, weights)
        ckpt.load_optimizer_tensors(opt, job.trainable, optim)
        ckpt.restore_rng(rng)
        sampler.load_state(state.sampler)
        step, tokens, last_loss = state.step, state.tokens, state.last_loss
        window = [torch.tensor(x) for x in state.window]
        job.extra.update(state.extra)
        if scaler is not None and state.scaler:
            scaler.load_state_dict(state.scaler)
        resumed_from = step
        reporter.info(f"{job.name}: resuming from step {step} ({latest.name})")

    def save(at: int) -> None:
        state = ckpt.TrainState(
            step=at,
            steps_total=steps,
            tokens=tokens,
            last_loss=last_loss,
            sampler=sampler.state(),
            window=[w.item() for w in window],
            extra=job.extra,
            fingerprint=job.fingerprint,
            precision=precision,
            settings=settings,
            trainable=sorted(job.trainable),
            scaler=scaler.state_dict() if scaler is not None else None,
            time=time.time(),
        )
        weights, optim = _weights(job), ckpt.optimizer_tensors(opt, names)  # every rank joins the gathers
        if distributed.is_main():
            checkpoints.save(at, weights, optim, state)

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
