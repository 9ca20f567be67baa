"""`moeprune run recipe.yaml`: one-shot pruning (profile -> plan -> prune -> eval) from a recipe."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprune.cli import app


@app.command("run")
def run_command(
    recipe: Path = typer.Argument(..., help="Recipe YAML (see examples/recipe.yaml)."),
    force: bool = typer.Option(False, "--force", help="Replace the recipe's out folder if it holds a model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Profile, plan and prune (and evaluate) as a recipe says; the same as `moeprune prune --data`.

    Relative paths in the recipe are relative to its folder; the output folder keeps the plan, and
    the recipe and the profile in its moeprune/ subfolder."""
    from moeprune.commands.prune import print_oneshot
    from moeprune.oneshot import run_oneshot
    from moeprune.recipe import load_recipe

    settings = load_recipe(recipe)
    if force:
        settings.force = True
    result = run_oneshot(settings, quiet=quiet)
    if not quiet:
        print_oneshot(result)
