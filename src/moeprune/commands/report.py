"""`moeprune report PROFILE... --out DIR`: an HTML page of how the domains use the experts.

See :mod:`moeprune.report` for what the page shows. The page and its PNG plots are written into a
temporary folder beside ``--out`` and renamed into place at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moeprune.cli import app


@app.command("report")
def report_command(
    profiles: list[Path] = typer.Argument(
        ..., help="Profiles (*.profile.safetensors), one per domain, all of the same model."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for index.html and its PNG plots."),
    method: str = typer.Option(
        "easyep", "--method", "-m", help="Scoring method that picks the kept experts."
    ),
    top: int | None = typer.Option(
        None, "--top", help="Size M of the kept set compared between domains (default: half the experts)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it exists and is not empty."),
) -> None:
    """Write an HTML report: expert usage, overlap between domains, few-shot stability, gate mass kept."""
    from moeprune.api import report
    from moeprune.report import missing_stability_note

    rep = report(profiles, out, method=method, top=top, force=force)
    print(f"wrote {out / 'index.html'}", file=sys.stderr)
    note = missing_stability_note(rep)
    if note:
        print(f"moeprune: {note}", file=sys.stderr)
