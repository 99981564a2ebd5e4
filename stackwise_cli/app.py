"""The typer app: every command registered in one block, and the one place errors become exit codes."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable

import typer

from stackwise_cli import __version__
from stackwise_cli.commands import (
    bench,
    build,
    cache,
    clean,
    drop,
    eval,
    fuse,
    generate,
    grow,
    import_hf,
    prepare,
    status,
    train_stack,
)
from stackwise_cli.commands import plot as plot_cmd
from stackwise_cli.errors import EXIT_INTERRUPTED, StackwiseError

app = typer.Typer(
    name="stackwise",
    help="Train transformer language models one stack of blocks at a time, from a project directory on disk.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Measurements: training steps, attention kinds, kernels.", no_args_is_help=True)


def handled(fn: Callable) -> Callable:
    """Turn StackwiseError into one red line (plus hint) and its exit code; tracebacks only with STACKWISE_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from stackwise_cli.console import error_line

        try:
            return fn(*args, **kwargs)
        except StackwiseError as e:
            if os.environ.get("STACKWISE_DEBUG") == "1":
                raise
            error_line(e.message, e.hint)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            error_line("interrupted", "rerun the same command: every stage resumes where it stopped")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except OSError as e:  # a full disk or a read-only project where no writer said so itself (logs, plots)
            from stackwise_cli.store.files import os_write_error

            known = os_write_error(e)
            if known is None or os.environ.get("STACKWISE_DEBUG") == "1":
                raise
            error_line(known.message, known.hint)
            raise typer.Exit(known.exit_code) from None

    return wrapper


# --- every command, in one block -----------------------------------------------------------------------------
app.command("prepare")(handled(prepare.prepare))
app.command("import")(handled(import_hf.import_))
app.command("grow")(handled(grow.grow))
app.command("cache")(handled(cache.cache))
app.command("train-stack")(handled(train_stack.train_stack))
app.command("fuse")(handled(fuse.fuse))
app.command("eval")(handled(eval.eval_))
app.command("status")(handled(status.status))
app.command("verify")(handled(status.verify))
app.command("drop")(handled(drop.drop))
app.command("clean")(handled(clean.clean))
app.command("build")(handled(build.build))
app.command("generate")(handled(generate.generate))
app.command("plot")(handled(plot_cmd.plot))
bench_app.command("step")(handled(bench.step))
bench_app.command("attention")(handled(bench.attention))
bench_app.command("kernels")(handled(bench.kernels))
bench_app.command("plan")(handled(bench.plan))
bench_app.command("memory")(handled(bench.memory))
bench_app.command("compare")(handled(bench.compare))
app.add_typer(bench_app, name="bench")


def _version(value: bool) -> None:
    if value:
        print(f"stackwise {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    app()
