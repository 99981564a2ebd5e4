from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt, RunSetOpt
from stackwise_cli.console import CliReporter, out, print_json, print_table
from stackwise_cli.errors import StackwiseError
from stackwise_cli.objectives import objective_kind


def render_eval(result, project: Path = Path(".")) -> None:
    objective = objective_kind(result.objective)
    what = objective.scored
    if result.causal_readout == "mask":  # a masked rack read causally (--causal)
        what = "next-token loss via a [MASK] at the next position"
    rows = [
        [r.id, r.blocks, r.mask_ratio if r.mask_ratio is not None else "-", r.loss, r.perplexity]
        for r in result.per_stack
    ]
    model = "fused/ " if result.model == "fused" else ""
    print_table(
        f"{model}{result.split} ({result.objective}, {result.attention}): {what} after each stack",
        ["stack id", "blocks", "mask ratio", "loss", "perplexity"],
        rows,
    )
    if result.per_t:
        print_table(
            "diffusion: the whole rack at each noise level t",
            ["t", "masked loss", "accuracy", "ELBO term"],
            [[p.t, p.masked_loss, p.accuracy, p.elbo_term] for p in result.per_t],
        )
    acc = f", accuracy {result.accuracy:.4f}" if result.accuracy is not None else ""
    out.print(f"{objective.headline} {result.loss:.4f} nats/token (perplexity {result.perplexity:.2f}){acc}")
    if result.left_out:
        scored = ", ".join(str(r.id) for r in result.per_stack)
        left = ", ".join(str(i) for i in result.left_out)
        out.print(
            f"scored the trained prefix only (stacks {scored}); not trained yet, left out: stacks {left} "
            f"(`stackwise train-stack {result.left_out[0]} -p {project}` trains the next)"
        )


def eval_(
    split: Annotated[str, typer.Option("--split", help="Split to score.")] = "val",
    max_sequences: Annotated[
        int | None, typer.Option("--max-sequences", min=1, help="Score at most this many sequences.")
    ] = None,
    causal: Annotated[
        bool, typer.Option("--causal", help="Score a bidirectionally trained rack as a causal LM (next-token loss).")
    ] = False,
    fused: Annotated[
        bool,
        typer.Option(
            "--fused",
            help="Score the model in fused/ (after fuse --finetune-steps, the one users load), not the rack; "
            "records its validation loss in the manifest.",
        ),
    ] = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Run lm-evaluation-harness tasks instead (comma-separated: hellaswag,arc_easy); docs/harness.md.",
        ),
    ] = None,
    limit: Annotated[
        float | None, typer.Option("--limit", help="--tasks: score at most N examples per task (or a share < 1).")
    ] = None,
    num_fewshot: Annotated[
        int | None, typer.Option("--num-fewshot", help="--tasks: few-shot examples per prompt (default: the task's).")
    ] = None,
    include_path: Annotated[
        Path | None, typer.Option("--include-path", help="--tasks: a folder of your own task YAML files.")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="--tasks: rows per forward pass (default: eval.batch_size).")
    ] = None,
    mc_samples: Annotated[
        int,
        typer.Option("--mc-samples", help="--tasks, mlm and diffusion: Monte-Carlo masks per request (fixed seed)."),
    ] = 32,
    set_: RunSetOpt = None,
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Validation loss by the recipe's objective (next-token, masked-token, diffusion ELBO), and the readout after
    each stack."""
    from dataclasses import asdict

    from stackwise_cli.store.project import Project

    if tasks is not None:
        harness_eval(
            Project(project),
            tasks,
            limit,
            num_fewshot,
            include_path,
            batch_size,
            mc_samples,
            device,
            fused,
            json_,
            split=split,
            max_sequences=max_sequences,
            causal=causal,
            set_=set_,
        )
        return
    for flag, given in (
        ("--limit", limit),
        ("--num-fewshot", num_fewshot),
        ("--include-path", include_path),
        ("--batch-size", batch_size),
        ("--mc-samples", mc_samples != 32),
    ):
        if given not in (None, False):
            raise StackwiseError(f"{flag} applies to lm-evaluation-harness runs", hint="add --tasks, or drop " + flag)
    from stackwise_cli.evaluate.eval import evaluate

    if set_:
        from stackwise_cli.settings import apply_settings

        apply_settings(Project(project), set_, "eval")
    result = evaluate(Project(project), split, max_sequences, device, CliReporter(quiet=json_), causal, fused)
    from stackwise_cli.evaluate.plot import record_eval

    record_eval(Project(project), result)  # for `stackwise plot`'s readout curve
    # The training FLOPs that produced what was scored (the manifest's count: train-stack, cache, fine-tune), so a
    # score can be set against its compute.
    flops = asdict(Project(project).load().count_flops())
    if json_:
        print_json({**result.to_data(), "flops": flops})
    else:
        render_eval(result, project)
        out.print(
            f"training FLOPs: {flops['total']:.4g} (train-stack {flops['train']:.4g}, cache {flops['cache']:.4g}, "
            f"fine-tune {flops['finetune']:.4g})"
        )


def harness_eval(
    project, tasks: str, limit, num_fewshot, include_path, batch_size, mc_samples, device, fused, json_, **rest
) -> None:
    """``eval --tasks``: lm-evaluation-harness on the project's model (stackwise_cli/evaluate/harness.py)."""
    from stackwise_cli.evaluate.harness import run_harness

    for flag, value in (
        ("--split", rest["split"] != "val"),
        ("--max-sequences", rest["max_sequences"]),
        ("--causal", rest["causal"]),
    ):
        if value not in (None, False):
            raise StackwiseError(
                f"{flag} does not apply to --tasks (the tasks bring their own data)", hint=f"drop {flag}"
            )
    if rest["set_"]:  # a refused run must change nothing, and --set would write the manifest first
        raise StackwiseError("--set does not apply to --tasks", hint="drop --set (--batch-size sets the batch)")
    names = [t.strip() for t in tasks.split(",")]
    r = run_harness(
        project,
        names,
        limit=limit,
        num_fewshot=num_fewshot,
        include_path=include_path,
        batch_size=batch_size,
        mc_samples=mc_samples,
        device=device,
        fused=fused,
        reporter=CliReporter(quiet=json_),
    )
    if json_:
        print_json(r.to_data())
        return
    rows = [[task, metric, value] for task, metrics in r.metrics.items() for metric, value in metrics.items()]
    how = {
        "exact": "exact",
        "bound": f"a Monte-Carlo ELBO bound, {mc_samples} masks per request",
        "score": f"a Monte-Carlo masking score (no bound), {mc_samples} masks per request",
    }[r.scoring]
    model = "fused/ through the harness's Hugging Face model" if r.adapter == "hf" else f"the {r.model} (stackwise)"
    print_table(f"lm-evaluation-harness on {model}: log-likelihoods {how}", ["task", "metric", "value"], rows)
    out.print(
        f"{r.requests} requests, {r.requests_per_s:.1f}/s in the model ({r.model_time_s:.1f} s of {r.time_s:.1f} s); "
        f"results: {project.root / r.file}"
    )
