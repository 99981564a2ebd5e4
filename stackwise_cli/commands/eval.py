from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import CliReporter, out, print_json, print_table


def render_eval(result, project: Path = Path(".")) -> None:
    what = {"clm": "next-token loss", "mlm": "masked-token loss", "diffusion": "masked loss at the stack's t"}
    if result.causal_readout == "mask":  # a masked rack read causally (--causal)
        what["clm"] = "next-token loss via a [MASK] at the next position"
    rows = [
        [r.id, r.blocks, r.mask_ratio if r.mask_ratio is not None else "-", r.loss, r.perplexity]
        for r in result.per_stack
    ]
    model = "fused/ " if result.model == "fused" else ""
    print_table(
        f"{model}{result.split} ({result.objective}, {result.attention}): {what[result.objective]} after each stack",
        ["stack id", "blocks", "mask ratio", "loss", "perplexity"],
        rows,
    )
    if result.per_t:
        print_table(
            "diffusion: the whole rack at each noise level t",
            ["t", "masked loss", "accuracy", "ELBO term"],
            [[p.t, p.masked_loss, p.accuracy, p.elbo_term] for p in result.per_t],
        )
    headline = "ELBO bound" if result.objective == "diffusion" else "loss"
    acc = f", accuracy {result.accuracy:.4f}" if result.accuracy is not None else ""
    out.print(f"{headline} {result.loss:.4f} nats/token (perplexity {result.perplexity:.2f}){acc}")
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
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Validation loss by the recipe's objective (next-token, masked-token, diffusion ELBO), and the readout after
    each stack."""
    from dataclasses import asdict

    from stackwise_cli.evaluate.eval import evaluate
    from stackwise_cli.store.project import Project

    result = evaluate(Project(project), split, max_sequences, device, CliReporter(quiet=json_), causal, fused)
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
