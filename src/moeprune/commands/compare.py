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
from moeprune.errors import UserError

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
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N records of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    max_new_tokens: int = typer.Option(
        24, "--max-new-tokens", help="Generation limit for exact-match tasks."
    ),
    max_length: int = typer.Option(
        1024, "--max-length", help="Truncate perplexity documents to this many tokens."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random baseline."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Folder for results.md/.csv/.json and plot_<task>.png."
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already exists."),
) -> None:
    """Compare scoring methods and keep ratios on one loaded model (routing masks; nothing pruned on disk)."""
    from moeprune.compare import DEFAULT_KEEPS, check_keeps, default_methods
    from moeprune.evaluate.options import check_device_and_dtype, check_run_options
    from moeprune.plan import parse_keep
    from moeprune.score import check_method

    # --- check everything before loading anything heavy ---------------------------------------------
    check_run_options(
        limit=limit, batch_size=batch_size, max_new_tokens=max_new_tokens, max_length=max_length
    )
    check_device_and_dtype(device, dtype)
    methods = list(method) if method else default_methods()
    for m in methods:
        check_method(m)
    if len(set(methods)) != len(methods):
        raise UserError("a --method is given twice", "pass each method once")
    keeps: list[int | float] = [parse_keep(k) for k in keep] if keep else list(DEFAULT_KEEPS)
    check_keeps(keeps, None)  # fractions' range and duplicates now; counts again once E is known
    _check_out(out, force)

    from moeprune.evaluate.loading import resolve_device
    from moeprune.evaluate.tasks import resolve_tasks

    tasks = resolve_tasks(list(task))
    resolved_device = resolve_device(device)
    profiles, names = _load_profiles(profile)
    config, blocks = _check_model(model, profiles, names)
    check_keeps(keeps, int(blocks[0].num_experts))

    # --- load once, evaluate every variant (finished rows kept beside --out until it is written) -------
    from moeprune.compare import PartialRows, compare, partial_path, row_key, run_identity
    from moeprune.evaluate.loading import load_model_and_tokenizer

    started = time.time()
    err = _stderr_console()
    identity = run_identity(
        model,
        dict(zip(names, profile, strict=True)),
        tasks,
        {"limit": limit, "batch_size": batch_size, "max_new_tokens": max_new_tokens,
         "max_length": max_length, "seed": seed, "device": resolved_device, "dtype": dtype},
    )  # fmt: skip
    partial = PartialRows(partial_path(out), identity)
    resumed = dict(partial.done)
    if partial.note:
        err.print(f"[compare] {partial.note}", highlight=False, markup=False)
    lm, tokenizer = load_model_and_tokenizer(model, device=resolved_device, dtype=dtype)

    def on_row(row: dict[str, Any]) -> None:
        partial.add(row)
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

    try:
        rows = compare(
            lm,
            tokenizer,
            profiles,
            tasks,
            methods,
            keeps,
            novice,
            profile_names=names,
            limit=limit,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            seed=seed,
            progress=sys.stderr.isatty(),
            on_row=on_row,
            done=resumed,
        )
    except KeyboardInterrupt:
        raise partial.interrupted() from None
    report = {
        "model": model,
        "profiles": [{"name": n, "path": str(p)} for n, p in zip(names, profile, strict=True)],
        "tasks": {t.name: t.kind for t in tasks},
        "num_experts": int(blocks[0].num_experts),
        "top_k": int(blocks[0].top_k),
        "settings": {
            "methods": methods,
            "keeps": keeps,
            "novice": novice,
            "limit": limit,
            "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "max_length": max_length,
            "seed": seed,
            "device": resolved_device,
            "dtype": dtype,
        },
        "seconds": round(time.time() - started, 3),
    }
    _print_table(rows, report)
    _write(out, rows, report, force)
    partial.remove()
    err.print(f"wrote {out}", highlight=False)



def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _check_out(out: Path, force: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise UserError(f"--out '{out}' is a file", "pass a folder name")
        if any(out.iterdir()) and not force:
            raise UserError(
                f"--out '{out}' already exists and is not empty", "pass another folder, or --force"
            )
    parent = out.expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"the folder of --out '{out}' does not exist", f"create {parent} first")


def _load_profiles(paths: list[Path]) -> tuple[list[Any], list[str]]:
    from moeprune.commands.plan import _load_profile

    profiles = [_load_profile(p) for p in paths]
    stems = [p.name.removesuffix(".safetensors").removesuffix(".profile") for p in paths]
    distinct = len(set(stems)) == len(stems) and "mixed" not in stems
    names = stems if distinct else [str(p) for p in paths]
    if len(set(names)) != len(names):
        raise UserError("the same profile is given twice", "pass each --profile once")
    return profiles, names


def _check_model(model: str, profiles: list[Any], names: list[str]) -> tuple[Any, Any]:
    """Every profile must come from this model (checked on the meta device, before loading weights)."""
    from moeprune.arch import find_moe_blocks
    from moeprune.modelio import build_on_meta, load_config

    config = load_config(model)
    blocks = find_moe_blocks(build_on_meta(config))
    for prof in profiles:
        prof.check_model(config, model, blocks)
    return config, blocks


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


def _write(out: Path, rows: list[dict[str, Any]], report: dict[str, Any], force: bool) -> None:
    """Write everything into a temporary folder beside ``out``, then rename it into place."""
    from moeprune.compare import write_results

    out = out.expanduser()
    from ..outputs import write_dir_atomically

    write_dir_atomically(out, lambda tmp: write_results(tmp, rows, report))
