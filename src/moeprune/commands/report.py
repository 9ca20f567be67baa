"""`moeprune report PROFILE... --out DIR`: an HTML page of how the domains use the experts.

See :mod:`moeprune.report` for what the page shows. The page and its PNG plots are written into a
temporary folder beside ``--out`` and renamed into place at the end."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from moeprune.cli import app
from moeprune.errors import UserError


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
    from moeprune.score import check_method

    check_method(method)
    if top is not None and top < 1:
        raise UserError(f"--top must be a positive number of experts, got {top}", "pass --top 1 or more")
    _check_out(out, force)
    resolved = [p.expanduser().resolve() for p in profiles]
    if len(set(resolved)) != len(resolved):
        raise UserError("the same profile is given twice", "pass each profile once")

    from moeprune.commands.plan import _load_profile
    from moeprune.report import compute_report, missing_stability_note

    loaded = [_load_profile(p) for p in profiles]
    stems = [p.name.removesuffix(".safetensors").removesuffix(".profile") for p in profiles]
    names = stems if len(set(stems)) == len(stems) else [str(p) for p in profiles]
    rep = compute_report(loaded, names, method, top)
    _write(out, rep)
    print(f"wrote {out / 'index.html'}", file=sys.stderr)
    note = missing_stability_note(rep)
    if note:
        print(f"moeprune: {note}", file=sys.stderr)


def _check_out(out: Path, force: bool) -> None:
    out = out.expanduser()
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file", "pass a folder name")
        if any(out.iterdir()) and not force:
            raise UserError(
                f"--out '{out}' already exists and is not empty", "pass another folder, or --force"
            )
    parent = out.resolve().parent
    if not parent.is_dir():
        raise UserError(f"the folder of --out '{out}' does not exist", f"create {parent} first")


def _write(out: Path, rep: dict) -> None:
    """Write everything into a temporary folder beside ``out``, then rename it into place."""
    from moeprune.report import write_report

    out = out.expanduser()
    from ..outputs import write_dir_atomically

    write_dir_atomically(out, lambda tmp: write_report(tmp, rep))
