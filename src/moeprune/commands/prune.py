"""`moeprune prune MODEL --plan plan.json [--mode remove|novice] --out DIR`: write the pruned checkpoint.

Modes and loading are described in docs/surgery.md: ``remove`` (stock checkpoint, or ragged with
per-layer counts, or ``--pad-uniform``), ``novice`` (MoNE: needs ``--profile``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app
from moeprune.errors import UserError

from .options import bandwidth_option, dry_run_json_option


@app.command("prune")
def prune_command(
    model: str = typer.Argument(
        ..., help="Model directory, or a hub id already in the local Hugging Face cache."
    ),
    plan_path: Path | None = typer.Option(
        None, "--plan", "-p", help="Plan file (JSON) from `moeprune plan` (or give --data instead)."
    ),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Folder to write the pruned model to (not needed with --dry-run)."
    ),
    mode: str = typer.Option(
        "remove",
        "--mode",
        help="remove: drop the pruned experts' weights and router rows (the checkpoint shrinks). "
        "novice: keep the router; replaced experts output their mean vector from --profile (MoNE).",
    ),
    pad_uniform: bool = typer.Option(
        False,
        "--pad-uniform",
        help="Write a checkpoint stock transformers loads: remove mode pads layers that keep fewer experts "
        "with dead experts (routers with a selection bias only); novice mode stores novices as zeroed "
        "experts with a down bias (experts with biases only, e.g. gpt-oss).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --out if it already holds a model."),
    max_shard_size: str | None = typer.Option(
        None, "--max-shard-size", help="Largest output shard, e.g. 5GB (default: the input's largest shard)."
    ),
    profile: Path | None = typer.Option(
        None,
        "--profile",
        help="The profile the plan came from: its metadata is kept as profile-meta.json; "
        "--mode novice takes the novices' mean outputs from it (required there).",
    ),
    allow_other_profile: bool = typer.Option(
        False, "--allow-other-profile", help="Accept a --profile calibrated on other data than the plan's."
    ),
    novice: str = typer.Option(
        "mean",
        "--novice",
        help="With --mode novice and --plan: what each novice is fitted to, mean (MoNE's mean output) or "
        "lsq (the gate-weighted least-squares fit, sum g^2 e / sum g^2; docs/methods.md).",
    ),
    data: list[str] | None = typer.Option(
        None,
        "--data",
        help="One-shot: calibration data (repeatable); profile, plan and prune in one go, the profile and "
        "plan kept in --out (the profile and recipe in --out/moeprune/). Needs --method and --keep.",
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="One-shot: the score (as `moeprune plan`; default mone, docs/methods.md)."
    ),
    keep: str | None = typer.Option(
        None,
        "--keep",
        "-k",
        help="One-shot, or --dry-run without --plan: experts kept per MoE layer (e.g. 64) or a fraction (0.5).",
    ),
    self_generate: int | None = typer.Option(
        None, "--self-generate", help="One-shot: calibrate on the model's own answers (up to N new tokens)."
    ),
    scope: str | None = typer.Option(None, "--scope", help="One-shot: layer (default) or global."),
    top_k: int | None = typer.Option(None, "--top-k", help="One-shot: lower the experts active per token."),
    max_length: int | None = typer.Option(
        None, "--max-length", help="One-shot: truncate each calibration record (default 2048 tokens)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="One-shot: seed (random method; default 0)."),
    eval_tasks: list[str] | None = typer.Option(
        None,
        "--eval",
        help="One-shot: evaluate full and pruned on this task (as `moeprune eval --task`, e.g. "
        "testbed:dates; repeatable): a table in the model card and moeprune/eval.json.",
    ),
    eval_limit: int | None = typer.Option(
        None, "--eval-limit", help="One-shot: evaluate only the first N records of each task."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Write nothing: print the output's shards and sizes, the bytes read and written, the peak "
        "memory and a time estimate, from the config and shard headers alone. Takes --plan, or --keep K "
        "(the same count or fraction kept in every MoE layer).",
    ),
    as_json: bool = dry_run_json_option(),
    bandwidth: str | None = bandwidth_option(),
    target: float | None = typer.Option(
        None,
        "--target",
        help="One-shot: instead of --method/--keep, search for the smallest model that keeps this share of "
        "the full model on held-out demonstrations (as `moeprune search`; its results go to OUT.search/).",
    ),
) -> None:
    """Write a smaller model that keeps only the experts of a plan (streams; never loads the model).

    One-shot: `--data FILE --method M --keep K` instead of `--plan` profiles, plans and prunes in one
    go (the same as `moeprune run recipe.yaml`). Checkpoints whose layers keep different numbers of
    experts, and novice checkpoints, load with `moeprune.load(path)` (see docs/surgery.md)."""
    oneshot = {
        "--method": method,
        "--keep": keep,
        "--self-generate": self_generate,
        "--scope": scope,
        "--top-k": top_k,
        "--max-length": max_length,
        "--seed": seed,
        "--eval": eval_tasks or None,
        "--eval-limit": eval_limit,
        "--target": target,
    }
    if dry_run:
        _dry_run(model, plan_path, keep, mode, profile, pad_uniform, max_shard_size, bandwidth, as_json, data)
        return
    if as_json or bandwidth is not None:
        raise UserError(
            "--json and --bandwidth only apply with --dry-run", "add --dry-run, or leave them out"
        )
    if out is None:
        raise UserError(
            "no output folder given", "pass --out DIR (or --dry-run to see the plan without writing)"
        )
    if plan_path is not None and data:
        raise UserError("--plan and --data are given together", "pass --plan PLAN or --data FILE, not both")
    if plan_path is None and not data:
        raise UserError(
            "no plan and no data given",
            "pass --plan plan.json, or --data FILE --method M --keep K to profile and plan in one go",
        )
    if novice != "mean" and (mode != "novice" or plan_path is None):
        raise UserError(f"--novice {novice} applies only with --mode novice and --plan", "leave --novice out")
    if plan_path is not None:
        given = [flag for flag, value in oneshot.items() if value is not None]
        if given:
            raise UserError(
                f"{', '.join(given)} only apply with --data (one-shot pruning)", "leave them out with --plan"
            )
        prune_with_plan(
            model=model,
            plan_path=plan_path,
            out=out,
            mode=mode,
            pad_uniform=pad_uniform,
            force=force,
            max_shard_size=max_shard_size,
            profile=profile,
            allow_other_profile=allow_other_profile,
            novice=novice,
        )
        return
    if target is not None:
        _prune_by_search(model, data, out, target, oneshot, mode, force)
        return
    if keep is None:
        raise UserError("one-shot pruning (--data) needs --keep", "e.g. --keep 0.5, or --target 0.99 to search")
    if profile is not None:
        raise UserError(
            "--profile does not apply with --data", "leave it out: the profile is made and kept in --out/moeprune/"
        )
    if max_shard_size is not None:
        raise UserError("--max-shard-size does not apply with --data", "leave it out")
    from moeprune.oneshot import OneShot, run_oneshot
    from moeprune.score import DEFAULT_METHOD

    result = run_oneshot(
        OneShot(
            model=model,
            data=list(data or []),
            method=method or DEFAULT_METHOD,
            keep=str(keep),
            out=str(out),
            self_generate=self_generate or 0,
            scope=scope or "layer",
            mode=mode,
            eval=list(eval_tasks or []),
            eval_limit=eval_limit,
            max_length=max_length if max_length is not None else 2048,
            seed=seed if seed is not None else 0,
            top_k=top_k,
            force=force,
            pad_uniform=pad_uniform,
        )
    )
    print_oneshot(result)


def _dry_run(
    model: str,
    plan_path: Path | None,
    keep: str | None,
    mode: str,
    profile: Path | None,
    pad_uniform: bool,
    max_shard_size: str | None,
    bandwidth: str | None,
    as_json: bool,
    data: list[str] | None,
) -> None:
    """`prune --dry-run`: :func:`moeprune.api.estimate_prune`, printed. With --data (one-shot) the
    rewrite is sized for --keep in every layer; `profile --dry-run` sizes the calibration pass."""
    from moeprune.api import estimate_prune
    from moeprune.commands.dryrun import print_prune_estimate

    if plan_path is not None and keep is not None:
        raise UserError("--plan and --keep are given together", "pass one of them with --dry-run")
    est = estimate_prune(
        model,
        plan_path,
        keep=keep,
        mode=mode,
        profile=profile,
        pad_uniform=pad_uniform,
        max_shard_size=max_shard_size,
        bandwidth=bandwidth,
    )
    if data:
        est.notes.append(
            "the calibration pass of one-shot pruning: see `moeprune profile MODEL --data ... --dry-run`"
        )
    print_prune_estimate(est, as_json)


def prune_with_plan(
    *,
    model: str,
    plan_path: Path,
    out: Path,
    mode: str = "remove",
    pad_uniform: bool = False,
    force: bool = False,
    max_shard_size: str | None = None,
    profile: Path | None = None,
    allow_other_profile: bool = False,
    novice: str = "mean",
) -> None:
    """`moeprune prune MODEL --plan PLAN ...`: :func:`moeprune.api.prune` with a progress bar."""
    from moeprune.api import prune

    console = _console()
    start = time.perf_counter()
    with _progress(console) as bar:
        result = prune(
            model,
            plan_path,
            out,
            mode=mode,
            profile=profile,
            allow_other_profile=allow_other_profile,
            pad_uniform=pad_uniform,
            force=force,
            max_shard_size=max_shard_size,
            progress=bar,
            novice=novice,
        )
    print_result(result, out, mode, time.perf_counter() - start, console)


def print_result(result: Any, out: Path, mode: str, seconds: float, console: Any = None) -> None:
    """What `prune` wrote: expert counts, top-k, sizes and how to load it."""
    from moeprune.surgery import human_bytes

    console = console or _console()
    top = f"top-k {result.top_k}" + (
        f" (was {result.original_top_k})" if result.top_k != result.original_top_k else ""
    )
    counts = sorted(set(result.kept_counts.values()))
    kept = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    what = "computed experts (the rest novices)" if mode == "novice" else "experts"
    console.print(
        f"wrote {out} ({mode}{', padded' if result.padded else ''}): {kept}/{result.num_experts} {what} in "
        f"{len(result.layers)} MoE layers, {top}; {human_bytes(result.bytes_in)} -> "
        f"{human_bytes(result.bytes_out)} in {len(result.shards)} shard(s), {seconds:.1f} s"
    )
    if not result.stock:
        console.print("load it with moeprune.load(path) (stock from_pretrained cannot: see docs/surgery.md)")
    if result.skipped_files:
        console.print(f"not copied from the source: {', '.join(result.skipped_files)}")


def print_oneshot(result: Any) -> None:
    """What one-shot pruning made: the plan, the rewrite, the full-vs-pruned table (with --eval)."""
    from moeprune.commands.plan import _GateSum, print_summary
    from moeprune.oneshot import PROVENANCE
    from moeprune.plan import plan_summary

    print_summary(result.plan, plan_summary(result.plan, _GateSum([result.profile])), result.out / "plan.json")
    print_result(result.rewrite, result.out, result.rewrite.mode, result.seconds)
    if result.eval is not None:
        print_pair_table(result.eval)
    _console().print(f"provenance (profile, recipe, evaluation) in {result.out / PROVENANCE}", highlight=False)


def print_pair_table(report: dict[str, Any]) -> None:
    """The full-vs-pruned evaluation table (the model card's "Evaluation" section)."""
    import sys

    from rich.console import Console
    from rich.table import Table

    from moeprune.oneshot import _fmt, eval_rows

    limit = report.get("limit")
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print("full vs pruned" + (f" (first {limit} records of each task)" if limit else ""), highlight=False)
    table = Table()
    for col, justify in (("task", "left"), ("metric", "left"), ("full", "right"), ("pruned", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for task, metric, full, pruned in eval_rows(report):
        table.add_row(task, metric, _fmt(full), _fmt(pruned))
    console.print(table)


def _console():
    from rich.console import Console

    return Console()


class _progress:
    """A transient bytes progress bar (a callable ``(done, total)``)."""

    def __init__(self, console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._bar = Progress(
            "writing",
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._task = None

    def __enter__(self):
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.__exit__(*exc)

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._task = self._bar.add_task("write", total=total)
        self._bar.update(self._task, completed=done)


def _prune_by_search(
    model: str, data: list[str], out: Path, target: float, oneshot: dict[str, Any], mode: str, force: bool
) -> None:
    """`prune --data D --target T --out OUT`: `moeprune search` with its results in OUT.search/ and
    the chosen checkpoint in OUT (the search picks method, keep, scope and mode)."""
    chosen = [f for f in ("--method", "--keep", "--scope", "--top-k", "--eval-limit") if oneshot[f] is not None]
    if chosen or mode != "remove":
        flags = chosen + (["--mode"] if mode != "remove" else [])
        raise UserError(
            f"{', '.join(flags)} cannot be given with --target: the search chooses them",
            "leave them out, or drop --target and choose them yourself",
        )
    from moeprune.search_run import run_search

    out = Path(out)
    run_search(
        model,
        list(data),
        out.with_name(out.name + ".search"),
        target=target,
        test_tasks=oneshot["--eval"] or [],
        self_generate=oneshot["--self-generate"] or 0,
        max_length=oneshot["--max-length"] or 2048,
        seed=oneshot["--seed"] or 0,
        prune=True,
        model_out=out,
        force=force,
        quiet=False,
    )
