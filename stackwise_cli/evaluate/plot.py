"""``stackwise plot``: PNGs of a project's training from its logs (docs/cli.md, "plot").

- ``loss_vs_steps.png``: training loss (line) and validation loss (``train.eval_every``, markers) of each run,
  over its optimizer steps;
- ``loss_vs_flops.png``: the same over cumulative training FLOPs, the runs laid end to end in the order they
  started (FLOPs of train-stack and fine-tune runs as each log line records them: tokens x the planner's FLOPs per
  token; cache passes are not drawn);
- ``readout.png``: the loss when the head reads the state after each stack, from the newest eval record
  (``logs/eval-*.json``, written by ``stackwise eval`` and ``build``).

The logs are the JSONL files the training loop writes (``logs/train-stack-<id>-<time>-<pid>.jsonl``,
``logs/fuse-finetune-<mode>-...``); a resumed run writes a new file, and a step logged twice keeps its last value.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from stackwise_cli.errors import StackwiseError
from stackwise_cli.store.project import Project

LOG_NAME = re.compile(r"^(?P<run>train-stack-.+|fuse-finetune-.+)-(?P<stamp>\d{8}T\d{6})-(?P<pid>\d+)\.jsonl$")
EVAL_PREFIX = "eval-"
FILES = ("loss_vs_steps.png", "loss_vs_flops.png", "readout.png")


@dataclass
class Run:
    """One training run's curves, from every log file it wrote (resumes included)."""

    name: str  # "train-stack 0", "train-stack all", "fuse-finetune lora"
    started: str  # the first log file's time stamp: runs are laid end to end in this order
    train: dict[int, tuple[float, float | None]] = field(default_factory=dict)  # step -> (loss, flops)
    val: dict[int, tuple[float, float | None]] = field(default_factory=dict)  # step -> (val_loss, flops)


@dataclass
class PlotResult:
    files: list[str]  # the PNGs written
    runs: list[str]
    readout: str | None  # the eval record the readout was drawn from, or None (no eval yet)


def read_runs(project: Project) -> list[Run]:
    """Every training run in ``logs/``, in the order they started."""
    runs: dict[str, Run] = {}
    per_token: dict[str, float] = {}
    logs = project.logs_dir
    files = sorted(logs.glob("*.jsonl"), key=lambda p: (LOG_NAME.match(p.name) or {"stamp": ""})["stamp"])
    for path in files:
        match = LOG_NAME.match(path.name)
        if match is None:
            continue
        kind, _, label = match["run"].partition("-")[2].partition("-")
        name = f"{'train-stack' if kind == 'stack' else 'fuse-finetune'} {label}"
        run = runs.setdefault(name, Run(name, match["stamp"]))
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            flops = row.get("flops")
            if "val_loss" in row:
                run.val[row["step"]] = (row["val_loss"], row.get("tokens"))  # tokens: FLOPs below
            elif "loss" in row:
                run.train[row["step"]] = (row["loss"], flops)
                if flops and row.get("tokens"):
                    per_token[name] = flops / row["tokens"]
    for run in runs.values():  # a val line records the tokens read so far; its FLOPs are the run's per token
        ratio = per_token.get(run.name)
        run.val = {s: (v, t * ratio if t is not None and ratio else None) for s, (v, t) in run.val.items()}
    return sorted(runs.values(), key=lambda r: r.started)


def record_eval(project: Project, result) -> Path:
    """Keep an eval's result (``evaluate.eval.EvalResult``) as ``logs/eval-<time>.json``, for ``plot``."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    path = project.logs_dir / f"{EVAL_PREFIX}{stamp}-{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"time": stamp, **result.to_data()}, indent=2) + "\n")
    return path


def latest_eval(project: Project) -> tuple[Path, dict] | None:
    """The newest eval record of the rack on the val split, or None."""
    for path in sorted(project.logs_dir.glob(f"{EVAL_PREFIX}*.json"), reverse=True):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("model") == "rack" and data.get("split") == "val" and data.get("per_stack"):
            return path, data
    return None


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise StackwiseError(
            "stackwise plot needs matplotlib, which is not installed", hint="pip install 'stackwise[plot]'"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp)
    os.replace(tmp, path)


def plot(project: Project, out_dir: Path | None = None) -> PlotResult:
    """Write the three PNGs into ``out_dir`` (default ``<project>/plots``)."""
    m = project.load()
    runs = [r for r in read_runs(project) if r.train]
    if not runs:
        raise StackwiseError(
            f"no training logs in {project.logs_dir}: nothing to plot",
            hint=f"train a stack first (`stackwise train-stack ID -p {project.root}` or `stackwise build`)",
        )
    plt = _pyplot()
    out_dir = Path(out_dir) if out_dir is not None else project.plots_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    title = f"{m.recipe.name} ({m.recipe.objective}, {m.recipe.curriculum})"

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        steps = sorted(r.train)
        ax.plot(steps, [r.train[s][0] for s in steps], ".-", color=c, markersize=3, label=f"{r.name} train")
        if r.val:
            vs = sorted(r.val)
            ax.plot(vs, [r.val[s][0] for s in vs], "o--", color=c, markersize=4, label=f"{r.name} val")
    _finish_axes(ax, "optimizer step (of each run)", title)
    _save(fig, out_dir / FILES[0])
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    offset = 0.0
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        pts = [(f, loss) for _, (loss, f) in sorted(r.train.items()) if f is not None]
        if not pts:  # a log from before FLOPs were logged
            continue
        ax.plot([offset + f for f, _ in pts], [y for _, y in pts], ".-", color=c, markersize=3, label=f"{r.name} train")
        val = [(f, loss) for _, (loss, f) in sorted(r.val.items()) if f is not None]
        if val:
            xs, ys = [offset + f for f, _ in val], [y for _, y in val]
            ax.plot(xs, ys, "o--", color=c, markersize=4, label=f"{r.name} val")
        offset += max(f for f, _ in pts)
    _finish_axes(ax, "cumulative training FLOPs (train-stack and fine-tune runs, in the order they ran)", title)
    _save(fig, out_dir / FILES[1])
    plt.close(fig)

    record = latest_eval(project)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=120)
    if record is None:
        ax.text(0.5, 0.5, f"no eval record yet: run `stackwise eval -p {project.root}`", ha="center", va="center")
        ax.set_axis_off()
    else:
        per = record[1]["per_stack"]
        blocks, depth = [], 0
        for r in per:
            depth += r["blocks"]
            blocks.append(depth)
        ax.plot(blocks, [r["loss"] for r in per], "o-")
        for b, r in zip(blocks, per):
            ax.annotate(f"stack {r['id']}", (b, r["loss"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        ax.set_xlabel("blocks read (the head reads the state after each stack)")
        ax.set_ylabel(f"{record[1]['split']} loss (nats/token)")
        ax.set_title(f"{title}: readout after each stack ({record[1]['time']})")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    _save(fig, out_dir / FILES[2])
    plt.close(fig)
    return PlotResult(
        [str(out_dir / f) for f in FILES], [r.name for r in runs], str(record[0]) if record is not None else None
    )


def _finish_axes(ax, xlabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.figure.tight_layout()


def to_data(result: PlotResult) -> dict:
    return asdict(result)
