"""`moeprune export SOURCE --uniform --out DIR`: the stock uniform checkpoint nearest to a ragged or
novice prune, for consumers that need one expert count per model (llama.cpp; docs/deploying.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprune.cli import app
from moeprune.errors import UserError


@app.command("export")
def export_command(
    source: Path = typer.Argument(
        ..., help="A pruned checkpoint folder moeprune wrote (its plan.json), or a plan file."
    ),
    uniform: bool = typer.Option(
        False,
        "--uniform",
        help="Write the nearest uniform checkpoint: the plan's method and scores, one expert count per "
        "layer (the plan's mean, rounded), each layer keeping its own best experts (--mode remove).",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the uniform checkpoint to."),
    model: str | None = typer.Option(
        None, "--model", help="The original model (default: the one the plan's profile was made on)."
    ),
    profile: list[Path] | None = typer.Option(
        None,
        "--profile",
        help="The profile(s) the plan was made from (default: the ones the plan records). Repeatable.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already holds a model."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Largest output shard, e.g. 5GB (default: the input's largest shard)."
    ),
) -> None:
    """Write the stock checkpoint nearest to a ragged or novice prune (one expert count per layer)."""
    from rich.console import Console

    from moeprune.api import export_uniform

    if not uniform:
        raise UserError("say what to export", "pass --uniform (the one kind for now)")
    done = export_uniform(
        source, out, model=model, profile=profile or None, force=force, max_shard_size=max_shard_size
    )
    u = done.uniform
    k = u.plan.kept_counts()[0]
    counts = "/".join(str(n) for n in u.source.kept_counts())
    console = Console()
    console.print(
        f"{u.plan.method}: {counts} experts per MoE layer (mean {u.mean_kept:.2f}) -> {k} in each of "
        f"{len(u.plan.layers)} layers, top-k {u.plan.top_k}; each layer keeps its own top {k} by the "
        f"plan's scores",
        highlight=False,
    )
    Console(stderr=True).print(f"wrote {done.result.out_dir} (stock checkpoint)", highlight=False)
