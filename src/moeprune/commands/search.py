"""`moeprune search MODEL --data DEMOS --target 0.99 --out DIR`: the smallest model that keeps the domain.

Holds out part of the demonstrations as a dev set (or takes ``--eval`` tasks), profiles the rest
once and searches method x mode x scope x experts kept for the smallest model whose dev quality is
>= target x the full model's; see :mod:`moeprune.search` and :mod:`moeprune.search_run`."""

from __future__ import annotations

from pathlib import Path

import typer

from moeprune.cli import app
from moeprune.commands.options import device_option, dtype_option


def parse_dev(text: str) -> float | int:
    """``--dev``: a share of the demonstrations (0.3) or a record count (20)."""
    from moeprune.errors import UserError

    try:
        return int(text) if text.strip().isdigit() else float(text)
    except ValueError:
        raise UserError(
            f"--dev '{text}' is not a number", "pass a share such as 0.3 or a count such as 20"
        ) from None


@app.command("search")
def search_command(
    model: str = typer.Argument(
        ..., help="Model directory, or a hub id already in the local Hugging Face cache."
    ),
    data: list[str] = typer.Option(..., "--data", help="Demonstrations of the domain (repeatable)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for the frontier, plan, recipe (and --prune's model/)."
    ),
    target: float = typer.Option(
        0.99, "--target", help="Keep at least this share of the full model's dev quality."
    ),
    dev: str = typer.Option(
        "0.3", "--dev", help="Demonstrations held out as the dev set: a share or a count."
    ),
    eval_tasks: list[str] | None = typer.Option(
        None,
        "--eval",
        help="Dev tasks instead of held-out demonstrations (as `moeprune eval --task`; repeatable).",
    ),
    test_tasks: list[str] | None = typer.Option(
        None, "--test", help="Test tasks, disjoint from the dev set: how the chosen model holds (repeatable)."
    ),
    metric: str = typer.Option(
        "auto",
        "--metric",
        help="auto: exact match on prompt+answer records (the model's own answers with --self-generate), "
        "perplexity on text; exact_match; perplexity.",
    ),
    method: list[str] | None = typer.Option(
        None, "--method", "-m", help="Scores to search (repeatable; default mone, easyep, reap, premoe)."
    ),
    mode: list[str] | None = typer.Option(None, "--mode", help="remove and/or novice (default both)."),
    scope: list[str] | None = typer.Option(None, "--scope", help="layer and/or global (default both)."),
    objective: str = typer.Option(
        "bytes", "--objective", help="Smallest by bytes (then active params), or active."
    ),
    select: str | None = typer.Option(
        None,
        "--select",
        help="bound: a variant passes when the 95% lower confidence bound of its dev accuracy clears the "
        "target; mean: when the accuracy itself does (rewards dev-set luck on a small dev set); auto "
        "(default): bound when the dev set is large enough to certify the target, else mean.",
    ),
    self_generate: int = typer.Option(
        0, "--self-generate", help="Calibrate on the model's own answers (N new tokens)."
    ),
    max_length: int = typer.Option(
        2048, "--max-length", help="Truncate each calibration record to this many tokens."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the dev split."),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N records of each task."),
    prune: bool = typer.Option(
        False, "--prune", help="Also write the chosen checkpoint to OUT/model (runs the recipe)."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if moeprune wrote it."),
    device: str = device_option(),
    dtype: str = dtype_option(),
) -> None:
    """Find the smallest pruned model that keeps --target of the full model on held-out demonstrations."""
    from moeprune.search import DEFAULT_METHODS, MODES, SCOPES
    from moeprune.search_run import SearchOptions, run_search

    run_search(
        model,
        list(data),
        out,
        target=target,
        eval_tasks=eval_tasks or [],
        test_tasks=test_tasks or [],
        dev=parse_dev(dev),
        metric=metric,
        methods=method or list(DEFAULT_METHODS),
        modes=mode or list(MODES),
        scopes=scope or list(SCOPES),
        objective=objective,
        select=select or SearchOptions.select,
        self_generate=self_generate,
        max_length=max_length,
        seed=seed,
        limit=limit,
        prune=prune,
        force=force,
        quiet=False,
        device=device,
        dtype=dtype,
    )
