from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from stackwise_cli.commands.options import DeviceOpt, JsonOpt, ProjectOpt
from stackwise_cli.console import CliReporter, print_json


def render_generate(result) -> None:
    """The text of each sample on stdout; several samples are separated by a header line."""
    many = len(result.samples) > 1
    for i, s in enumerate(result.samples, 1):
        if many:
            sys.stdout.write(f"=== sample {i}/{len(result.samples)} ===\n")
        sys.stdout.write(s.text + "\n")
    sys.stdout.flush()


def generate(
    prompt: Annotated[str, typer.Option("--prompt", help="Text to continue; empty starts a new document.")] = "",
    max_new_tokens: Annotated[
        int | None,
        typer.Option("--max-new-tokens", help="Autoregressive: most tokens to add. Default: up to model.max_seq_len."),
    ] = None,
    length: Annotated[
        int | None,
        typer.Option("--length", help="Unmasking: total tokens, prompt included. Default: data.seq_len."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option("--steps", help="Iterative unmasking: forward passes. Default: one per generated token."),
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", help="0 = greedy (argmax); > 0 samples from softmax(logits / T).")
    ] = 0.0,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Sample only from the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option("--top-p", help="Nucleus: sample from the smallest set holding this mass, (0, 1].")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling generator.")] = 0,
    samples: Annotated[int, typer.Option("--samples", help="How many samples to make (one batch).")] = 1,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Autoregressive: do not stop at <|endoftext|>.")
    ] = False,
    causal: Annotated[
        bool,
        typer.Option("--causal", help="Causal attention and left-to-right sampling on any model (mlm, diffusion too)."),
    ] = False,
    single_pass: Annotated[
        bool | None,
        typer.Option(
            "--single-pass/--iterative",
            help="Diffusion time-as-depth: one pass through the rack (default) or iterative unmasking.",
            show_default=False,
        ),
    ] = None,
    device: DeviceOpt = "auto",
    project: ProjectOpt = Path("."),
    json_: JsonOpt = False,
) -> None:
    """Sample text from the rack: left to right with a KV cache (clm, or --causal), or by unmasking (mlm, diffusion).

    The mode follows the recipe's objective; see docs/generate.md. Reads the project, never writes to it."""
    from stackwise_cli.evaluate.generate import generate as run
    from stackwise_cli.store.project import Project

    result = run(
        Project(project),
        prompt,
        causal=causal,
        single_pass=single_pass,
        max_new_tokens=max_new_tokens,
        length=length,
        steps=steps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        samples=samples,
        ignore_eos=ignore_eos,
        device=device,
        reporter=CliReporter(quiet=json_),
    )
    if json_:
        print_json(result.to_data())
    else:
        render_generate(result)
