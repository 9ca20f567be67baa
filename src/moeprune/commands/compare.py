"""`moeprune compare MODEL --profile P --task T --out DIR`: every method x keep ratio, in memory.

The model is loaded once; each plan is evaluated with routing masks (the pruning reference
semantics, no checkpoint written) and, with ``--novice``, in MoNE's novice mode. See
:mod:`moeprune.compare`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app
from moeprune.commands.options import device_option, dtype_option

NOTE_WIDTH = 40  # columns of the terminal table's note column


@app.command("compare")
def compare_command(
    model: str = typer.Argument(
        ..., help="Model directory, or a hub id already in the local Hugging Face cache."
    ),
    profile: list[Path] = typer.Option(
        ...,
        "--profile",
        "-p",
        help="Profile of one domain (*.profile.safetensors). Repeatable: one plan per profile, plus the "
        "mixed-domain plan.",
    ),
    task: list[str] = typer.Option(
        ..., "--task", "-t", help="Evaluation task, as for `moeprune eval` (testbed:NAME, NAME=PATH, ...)."
    ),
    method: list[str] | None = typer.Option(
        None, "--method", "-m", help="Scoring method (repeatable; default: every method)."
    ),
    keep: list[str] | None = typer.Option(
        None,
        "--keep",
        "-k",
        help="Fraction of experts kept per layer, or a count (repeatable; default 0.75 0.5 0.25 0.125).",
    ),
    novice: bool = typer.Option(
        True, "--novice/--no-novice", help="Also evaluate MoNE novice mode beside removal."
    ),
    novice_fit: str = typer.Option(
        "mean",
        "--novice-fit",
        help="The novice rows' vectors: mean (MoNE's mean output) or lsq (gate-weighted least squares, "
        "docs/methods.md).",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N records of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    max_new_tokens: int = typer.Option(
        24, "--max-new-tokens", help="Generation limit for exact-match tasks."
    ),
    max_length: int = typer.Option(
        1024, "--max-length", help="Truncate perplexity documents to this many tokens."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for results.md/.csv/.json and plot_<task>.png."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already exists."),
) -> None:
    """Compare scoring methods and keep ratios on one loaded model (routing masks; nothing pruned on disk)."""
    from moeprune.api import compare
    from moeprune.compare import row_key

    started = time.time()
    err = _stderr_console()
    resumed: set[str] = set()

    def on_resume(note: str, keys: set[str]) -> None:
        resumed.update(keys)
        err.print(f"[compare] {note}", highlight=False, markup=False)

    def on_row(row: dict[str, Any]) -> None:
        what = (
            "full model" if row["mode"] == "full" else f"{row['domain']} {row['method']} keep {row['keep']:g}"
        )
        if row["skipped"]:
            err.print(f"[compare] {what}: skipped ({row['skipped']})", highlight=False, markup=False)
        elif row["mode"] != "full":
            what += f" {row['mode']}"
        if not row["skipped"]:
            state = "resumed" if row_key(row) in resumed else f"done ({time.time() - started:.0f}s)"
            err.print(f"[compare] {what}: {state}", highlight=False, markup=False)

    rows, report = compare(
        model,
        profile,
        task,
        methods=method,
        keeps=keep,
        novice=novice,
        novice_fit=novice_fit,
        limit=limit,
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        max_length=max_length,
        seed=seed,
        device=device,
        dtype=dtype,
        out=out,
        force=force,
        progress=sys.stderr.isatty(),
        on_row=on_row,
        on_resume=on_resume,
    )
    _print_table(rows, report)
    err.print(f"wrote {out}", highlight=False)


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _print_table(rows: list[dict[str, Any]], report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from moeprune.compare import table_rows, task_kinds

    header, cells = table_rows(rows, task_kinds(rows, report["tasks"]), report["num_experts"])
    table = Table(title=f"moeprune compare: {report['model']}")
    for i, col in enumerate(header):
        if i == len(header) - 1:  # notes wrap in their column (full text in the files)
            table.add_column(col, max_width=NOTE_WIDTH, overflow="fold")
            continue
        table.add_column(col, justify="right" if 2 <= i < len(header) - 1 and i != 3 else "left")
    for line in cells:
        table.add_row(*line)
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
