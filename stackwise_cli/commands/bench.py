from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import JsonOpt, SetOpt
from stackwise_cli.console import out, print_json, print_table
from stackwise_cli.train.defaults import GPU_PRECISION

BenchProjectOpt = Annotated[
    Path | None, typer.Option("-p", "--project", help="Use this project's recipe (its manifest's) instead of --recipe.")
]


def _recipe(recipe: Path | None, set_: list[str] | None, project: Path | None):
    """The recipe to measure: ``--recipe`` (with its ``--set``s), or the one a project's manifest records."""
    from stackwise_cli.errors import StackwiseError
    from stackwise_cli.recipe import apply_overrides, load_recipe, recipe_from_data
    from stackwise_cli.schema import to_data
    from stackwise_cli.store.project import Project

    if project is not None:
        if recipe is not None:
            raise StackwiseError("pass --recipe or -p, not both: -p measures the project's own recipe")
        p = Project(project)
        return recipe_from_data(apply_overrides(to_data(p.load().recipe), set_ or []), str(p.manifest_path))
    if recipe is None:
        raise StackwiseError("no recipe: pass --recipe PATH (e.g. recipes/llama/tiny.yaml) or -p PROJECT")
    return load_recipe(recipe, set_)


def step(
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML whose model is measured.")] = None,
    set_: SetOpt = None,
    project: BenchProjectOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Sequences per step (default: the recipe's).")
    ] = None,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 2,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps; the median is reported.")] = 5,
    json_: JsonOpt = False,
) -> None:
    """One training step of a stack (from its cache) against one step of the whole model trained end to end."""
    from stackwise_cli.bench.step import bench_step
    from stackwise_cli.device import pick_device

    dev = str(pick_device(device))
    rows = bench_step(_recipe(recipe, set_, project), dev, batch_size, warmup, repeats)
    if json_:
        print_json(
            {
                "device": dev,
                "cases": [r.__dict__ for r in rows],
                "stack_over_end_to_end_tokens_per_s": rows[0].tokens_per_s / rows[1].tokens_per_s,
            }
        )
        return
    print_table(
        f"train step on {dev} (median of {repeats})",
        ["case", "blocks", "params trained", "step s", "tokens/s", "peak MiB"],
        [
            [
                r.case,
                r.blocks,
                f"{r.params_trained:,}",
                r.step_s,
                f"{r.tokens_per_s:,.0f}",
                f"{r.peak_bytes / 2**20:,.1f}",
            ]
            for r in rows
        ],
    )
    out.print(
        f"stack / end-to-end: {rows[0].tokens_per_s / rows[1].tokens_per_s:.2f}x tokens/s, "
        f"{rows[0].peak_bytes / max(rows[1].peak_bytes, 1):.2f}x peak memory ({rows[0].memory_how})"
    )


def attention(
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML whose model shape is measured.")] = None,
    set_: SetOpt = None,
    project: BenchProjectOpt = None,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    seq_lens: Annotated[str, typer.Option("--seq-lens", help="Comma-separated sequence lengths.")] = "128,256,512,1024",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Sequences per step.")] = 4,
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed steps first.")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed steps; the median is reported.")] = 3,
    json_: JsonOpt = False,
) -> None:
    """Each attention kind and backend against sequence length: tokens/s and peak memory (forward + backward)."""
    from stackwise_cli.bench.attention import bench_attention
    from stackwise_cli.device import pick_device
    from stackwise_cli.errors import StackwiseError

    try:
        lens = [int(x) for x in seq_lens.split(",") if x.strip()]
    except ValueError:
        raise StackwiseError(f"--seq-lens must be comma-separated integers, got {seq_lens!r}") from None
    if not lens or min(lens) < 1:
        raise StackwiseError(f"--seq-lens must list positive lengths, got {seq_lens!r}")
    r = _recipe(recipe, set_, project)
    dev = str(pick_device(device))
    rows = bench_attention(r.model, r.attention, dev, lens, batch_size, warmup, repeats)
    if json_:
        print_json({"device": dev, "recipe": r.name, "rows": rows})
        return
    print_table(
        f"attention forward + backward on {dev}, {r.name} shape, batch {batch_size} (median of {repeats})",
        ["kind", "backend", "seq len", "tokens/s", "peak MiB"],
        [
            [x["kind"], x["backend"], x["seq_len"], f"{x['tokens_per_s']:,.0f}", f"{x['peak_bytes'] / 2**20:,.1f}"]
            if x["seq_len"]
            else [x["kind"], x["backend"], "-", "unavailable", x["unavailable"]]
            for x in rows
        ],
    )


def kernels(
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    warmup: Annotated[int, typer.Option("--warmup", min=0, help="Untimed runs first.")] = 2,
    repeats: Annotated[int, typer.Option("--repeats", min=1, help="Timed runs; the median is reported.")] = 5,
    json_: JsonOpt = False,
) -> None:
    """Each custom kernel against its torch reference: time and achieved bandwidth vs the device's copy bandwidth."""
    from stackwise_cli.bench.kernels import bench_kernels
    from stackwise_cli.device import pick_device

    dev = str(pick_device(device))
    rows = bench_kernels(dev, repeats=repeats, warmup=warmup)
    if json_:
        print_json({"device": dev, "rows": rows})
        return
    timed = [r for r in rows if "time_ms" in r]
    print_table(
        f"kernels on {dev} (median of {repeats}); copy bandwidth {timed[0]['copy_gb_per_s']:.1f} GB/s"
        if timed
        else dev,
        ["kernel", "impl", "dtype", "tokens x width", "ms", "GB/s", "of copy"],
        [
            [
                r["kernel"],
                r["impl"],
                r["dtype"],
                f"{r['tokens']}x{r['width']}",
                f"{r['time_ms']:.3f}",
                f"{r['gb_per_s']:.2f}",
                f"{r['fraction_of_copy']:.3f}",
            ]
            for r in timed
        ],
    )
    for r in rows:
        if "size_saved_vs_bf16" in r:
            out.print(
                f"fp8 cache of {r['dtype']} {r['tokens']}x{r['width']}: "
                f"max error {r['max_err_over_row_amax']:.4f} of the row amax, "
                f"mean abs error {r['mean_abs_err']:.4f}, {r['size_saved_vs_bf16']:.1%} smaller than bf16"
            )
    notes = {r["note"] for r in timed if r.get("note")}
    for note in notes:
        out.print(note)


def plan(
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML whose model is planned.")] = None,
    set_: SetOpt = None,
    project: BenchProjectOpt = None,
    gpu: Annotated[str, typer.Option("--gpu", help="h100, h200, or the device's bytes (e.g. 150e9).")] = "h200",
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per micro-batch.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="fp32, bf16 (what --precision auto runs on a GPU), fp16 or fp8.")
    ] = GPU_PRECISION,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw or adamw8bit (bitsandbytes).")] = "adamw",
    activation_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Checkpoint every trained block. Default: off for train-stack and end-to-end, on for fuse.",
            show_default=False,
        ),
    ] = None,
    frozen_dtype: Annotated[
        str, typer.Option("--frozen-dtype", help="Right-to-left frozen suffix: fp32, bf16, fp8, nf4 or fp4.")
    ] = "nf4",
    lora_rank: Annotated[int, typer.Option("--lora-rank", help="LoRA rank of fuse-lora and fuse-qlora.")] = 16,
    tflops: Annotated[float, typer.Option("--tflops", help="Sustained TFLOP/s, for tokens per day.")] = 400.0,
    shards: Annotated[
        int,
        typer.Option("--shards", min=1, help="Ranks one stack is sharded over under torchrun: bytes per rank."),
    ] = 1,
    json_: JsonOpt = False,
) -> None:
    """Memory each stage needs on one GPU, by kind, against end-to-end training (docs/memory.md). Nothing runs."""
    from stackwise_cli.bench.plan import KIND_LABELS, KINDS, PlanOptions, gpu_bytes
    from stackwise_cli.bench.plan import plan as make_plan

    options = PlanOptions(
        batch_size=batch_size,
        seq_len=seq_len,
        precision=precision,
        optimizer=optimizer,
        activation_checkpointing=activation_checkpointing,
        frozen_dtype=frozen_dtype,
        lora_rank=lora_rank,
        tflops=tflops,
        shards=shards,
    )
    device = gpu_bytes(gpu)
    p = make_plan(_recipe(recipe, set_, project), device, options)
    if json_:
        print_json(p.to_data())
        return

    def gib(n: float) -> str:
        return f"{n / 2**30:,.2f}"

    for s in p.stages:
        rows = [[KIND_LABELS[k], gib(s.bytes[k])] for k in KINDS]
        rows += [["total", gib(s.total_bytes)], [f"device ({gpu})", gib(s.device_bytes)]]
        rows.append(["fits", "yes" if s.fits else f"NO, short by {gib(s.total_bytes - s.device_bytes)}"])
        print_table(
            f"{s.name}: {s.what}; batch {s.batch_size} x {s.seq_len} tokens, activation checkpointing "
            f"{'on' if s.activation_checkpointing else 'off'}",
            ["what", "GiB"],
            rows,
        )
        for note in s.notes:
            out.print(f"  {note}")
    print_table(
        f"{p.recipe} on {gpu} ({gib(device)} GiB), precision {options.precision}, optimizer {options.optimizer}, "
        f"{options.tflops:g} TFLOP/s sustained",
        ["stage", "total GiB", "fits", "trainable params", "frozen params", "GFLOP/token", "tokens/day"],
        [
            [
                s.name,
                gib(s.total_bytes),
                "yes" if s.fits else "NO",
                f"{s.params_trainable:,}",
                f"{s.params_frozen:,}",
                f"{s.flops_per_token / 1e9:,.2f}",
                f"{s.tokens_per_day:,.3g}",
            ]
            for s in p.stages
        ],
    )
    disk = p.cache_disk_bytes_per_billion_tokens
    out.print(
        "activation cache on disk per 1e9 tokens (one stack boundary): "
        + ", ".join(f"{k} {v / 1e12:,.2f} TB" + (" (recipe)" if k == p.cache_dtype else "") for k, v in disk.items())
    )


def memory(
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML whose model is measured.")] = None,
    set_: SetOpt = None,
    project: BenchProjectOpt = None,
    stage: Annotated[
        str, typer.Option("--stage", help="train-stack-l2r, train-stack-r2l or end-to-end.")
    ] = "train-stack-l2r",
    precision: Annotated[str, typer.Option("--precision", help="fp32, bf16, fp16 or fp8.")] = "fp32",
    optimizer: Annotated[
        str | None, typer.Option("--optimizer", help="adamw or adamw8bit (default: the recipe's).")
    ] = None,
    activation_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Checkpoint every trained block (default: the recipe's).",
            show_default=False,
        ),
    ] = None,
    frozen_dtype: Annotated[
        str | None,
        typer.Option("--frozen-dtype", help="Right-to-left suffix: fp32, bf16, fp8, nf4 or fp4 (default: recipe's)."),
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Sequences per step.")] = None,
    seq_len: Annotated[int | None, typer.Option("--seq-len", help="Tokens per sequence.")] = None,
    blocks: Annotated[int | None, typer.Option("--blocks", help="Blocks per stack (default: the recipe's).")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Optimizer steps to run (>= 2).")] = 3,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda.")] = "cpu",
    json_: JsonOpt = False,
) -> None:
    """Run real optimizer steps of a stage on random data; its measured peak memory against the plan's figure."""
    from stackwise_cli.bench.memory import bench_memory, with_options
    from stackwise_cli.errors import StackwiseError

    for name, value in (("--batch-size", batch_size), ("--seq-len", seq_len), ("--blocks", blocks)):
        if value is not None and value < 1:
            raise StackwiseError(f"{name} must be >= 1, got {value}")
    r = with_options(
        _recipe(recipe, set_, project),
        optimizer=optimizer,
        activation_checkpointing=activation_checkpointing,
        frozen_dtype=frozen_dtype,
        batch_size=batch_size,
        seq_len=seq_len,
        blocks=blocks,
    )
    res = bench_memory(r, stage, precision, steps, device)
    if json_:
        print_json(res.to_data())
        return

    def mib(n: float) -> str:
        return f"{n / 2**20:,.1f}"

    print_table(
        f"{res.recipe} {res.stage} ({res.variant}: {res.what}) on {res.device}, {res.precision}, {res.optimizer}, "
        f"activation checkpointing {'on' if res.activation_checkpointing else 'off'}, "
        f"batch {res.batch_size} x {res.seq_len}, {res.steps} steps",
        ["what", "planned MiB", "measured MiB"],
        [[k.label, mib(k.planned_bytes), mib(k.measured_bytes)] for k in res.kinds]
        + [["peak", mib(res.planned_bytes), mib(res.peak_bytes)]],
    )
    out.print(f"measured / plan: {res.ratio:.3f}")
    out.print("loss by step: " + ", ".join(f"{x:.4f}" for x in res.losses))
    if not res.loss_decreased:
        out.print("the loss did not go down over the steps")
    out.print(f"measured as: {res.memory_how}; {res.wall_s:.1f} s")


def compare(
    spec: Annotated[Path, typer.Argument(help="Comparison spec YAML (docs/science.md).")],
    out_dir: Annotated[
        Path | None, typer.Option("-o", "--out", help="Output folder (default: the spec's out:).")
    ] = None,
    arm: Annotated[
        str | None, typer.Option("--arm", help="Run this arm only (one Slurm array task), then report.")
    ] = None,
    report: Annotated[bool, typer.Option("--report", help="Run nothing: gather the finished arms' table.")] = False,
    plan_: Annotated[
        bool,
        typer.Option("--plan", help="Run nothing: prepare the data and show each arm's solved steps and FLOPs."),
    ] = False,
    device: Annotated[str, typer.Option("--device", help="auto (GPU if present), cpu, cuda or cuda:N.")] = "auto",
    json_: JsonOpt = False,
) -> None:
    """Train every arm of SPEC at one FLOP budget on the same data, score all on the same val split, report a table
    and a plot of val loss against FLOPs (docs/science.md). Rerun to resume: finished arms are skipped."""
    from stackwise_cli.bench.compare import COLUMNS, PLAN_COLUMNS, plan_comparison, plan_rows, table_rows
    from stackwise_cli.bench.compare import compare as run
    from stackwise_cli.console import CliReporter
    from stackwise_cli.errors import StackwiseError

    chosen = [o for o, on in (("--arm", arm is not None), ("--report", report), ("--plan", plan_)) if on]
    if len(chosen) > 1:
        raise StackwiseError(f"{' and '.join(chosen)}: --arm runs one arm, --report and --plan run none; pass one")
    if plan_:
        p = plan_comparison(spec, out_dir, device, CliReporter(quiet=json_))
        if json_:
            print_json(p)
            return
        print_table(f"{p['spec']}: budget {p['budget_flops']:.4g} FLOPs per arm, planned", PLAN_COLUMNS, plan_rows(p))
        out.print(
            "n: train.steps (* the budget's reference arm at its recipe's steps; the peer: its total steps); "
            "cache share: the FLOPs of cache passes; plan MiB: bench plan's largest training stage"
        )
        return
    r = run(spec, out_dir, arm, report, device, CliReporter(quiet=json_))
    if json_:
        print_json(r.to_data())
        return
    print_table(f"{r.spec}: budget {r.budget_flops:.4g} FLOPs per arm", COLUMNS, table_rows(r))
    if r.arms:
        how = "; ".join(sorted({a["peak_how"] for a in r.arms}))
        out.print(f"val loss: {r.scored_as}")
        out.print(f"peak MiB measured as {how}; plan MiB from the memory planner")
        out.print(f"wrote {r.files['markdown']}, {r.files['plot']}, {r.files['json']}")
    for name in r.missing:
        out.print(f"not finished: {name} (run `stackwise bench compare {spec} -o {r.out} --arm {name}`)")
