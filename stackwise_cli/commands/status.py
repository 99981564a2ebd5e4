from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from stackwise_cli.commands.options import JsonOpt, ProjectOpt
from stackwise_cli.console import out, print_json, print_table


def _render(report, verb: str) -> None:
    rows = [
        [
            r["position"],
            r["id"],
            r["blocks"],
            r["state"],
            "-" if r["mask_ratio"] is None else r["mask_ratio"],
            r["steps"],
            r["tokens"],
            r["last_loss"],
            r["precision"],
            r["trained_by"] or "-",
            f"{r['total_flops']:.3g}",
        ]
        for r in report.rack
    ]
    print_table(
        "rack (left = input side)",
        [
            "pos",
            "id",
            "blocks",
            "state",
            "mask ratio",
            "steps",
            "tokens",
            "last loss",
            "precision",
            "trained by",
            "FLOPs",
        ],
        rows,
    )
    f = report.flops
    if f.get("total"):
        out.print(
            f"training FLOPs: {f['total']:.4g} (train-stack {f['train']:.4g}, cache {f['cache']:.4g}, "
            f"fine-tune {f['finetune']:.4g})"
        )
    if report.caches:
        rows = [
            [
                c["stack"],
                c["split"],
                c["dtype"],
                c["shards"],
                "yes" if c["complete"] else "no",
                "removed by clean" if c.get("removed") else ("; ".join(c["stale"]) or "fresh"),
            ]
            for c in report.caches
        ]
        print_table("caches", ["stack", "split", "dtype", "shards", "complete", "state"], rows)
    if report.fused:
        out.print(f"fused: {report.fused['dir']} ({'stale' if report.fused['stale'] else 'up to date'})")
    if report.disk:
        from stackwise_cli.store.project import CACHE, CKPT
        from stackwise_cli.store.tidy import human_bytes

        d = report.disk
        parts = ", ".join(f"{k} {human_bytes(v)}" for k, v in d.items() if k != "total" and v)
        reclaim = " (`stackwise clean --dry-run` shows what can go)" if d.get(CACHE, 0) + d.get(CKPT, 0) else ""
        out.print(f"disk: {human_bytes(d['total'])} ({parts}){reclaim}")
    for p in report.problems:
        out.print(f"[yellow]{p.what}[/]: {p.file}: {escape(p.detail)} -> {escape(p.fix)}")
    if not report.problems:
        out.print(f"{verb}: {report.files_checked} files, no problems")


def status(project: ProjectOpt = Path("."), json_: JsonOpt = False) -> None:
    """The rack in order with each stack's state, and what is stale or missing."""
    from stackwise_cli.store.project import Project
    from stackwise_cli.store.status import status as run

    report = run(Project(project))
    print_json(report.to_data()) if json_ else _render(report, "status")


def verify(project: ProjectOpt = Path("."), json_: JsonOpt = False) -> None:
    """Re-hash every file against the manifest; exit 1 if anything is missing, corrupt or stale."""
    from stackwise_cli.store.project import Project
    from stackwise_cli.store.status import status as run

    report = run(Project(project), rehash=True)
    print_json(report.to_data()) if json_ else _render(report, "verify")
    if report.problems:
        raise typer.Exit(1)
