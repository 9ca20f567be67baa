"""`moeprune eval MODEL --task ...`: perplexity, exact-match and multiple-choice evaluation,
optionally lm-evaluation-harness tasks (``--lm-eval``)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app
from moeprune.commands.options import device_option, dtype_option

TASK_HELP = (
    "Task file: PATH, NAME=PATH, or with a forced kind kind:PATH (perplexity, exact_match, multiple_choice). "
    "JSON lines with 'text' (perplexity; .txt files too), 'prompt'+'answer' (exact match) or "
    "'prompt'+'choices'+'label' (multiple choice). 'testbed' runs every testbed task, 'testbed:NAME' one. Repeatable."
)


@app.command("eval")
def eval_command(
    model: str = typer.Argument(
        ..., help="Model directory, or a hub id already in the local Hugging Face cache."
    ),
    task: list[str] | None = typer.Option(None, "--task", "-t", help=TASK_HELP),
    lm_eval: str | None = typer.Option(
        None, "--lm-eval", help="Comma-separated lm-evaluation-harness task names (needs moeprune\\[lmeval])."
    ),
    lm_eval_include: str | None = typer.Option(
        None,
        "--lm-eval-include",
        help="Directory of local lm-eval task YAMLs (relative data_files resolve against it).",
    ),
    limit: int | None = typer.Option(None, "--limit", help="Evaluate only the first N records of each task."),
    batch_size: int = typer.Option(8, "--batch-size", help="Sequences per forward pass."),
    device: str = device_option(),
    dtype: str = dtype_option(),
    max_new_tokens: int = typer.Option(
        24, "--max-new-tokens", help="Generation limit for exact-match tasks."
    ),
    max_length: int = typer.Option(
        1024, "--max-length", help="Truncate perplexity documents to this many tokens."
    ),
    output: Path | None = typer.Option(
        None, "--output", "--out", "-o", help="Write the results as JSON to this file."
    ),
    allow_download: bool = typer.Option(
        False,
        "--allow-download",
        help="Let lm-eval download datasets it needs (default: offline, local cache only; "
        "or MOEPRUNE_ALLOW_DOWNLOAD=1).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output that moeprune wrote."),
) -> None:
    """Evaluate a model on perplexity, exact-match and multiple-choice tasks (and lm-eval tasks)."""
    from moeprune.api import evaluate
    from moeprune.evaluate.lm_eval_bridge import LmEvalDataMissing

    missing = None
    try:
        report = evaluate(
            model,
            list(task or []),
            lm_eval=lm_eval,
            lm_eval_include=lm_eval_include,
            limit=limit,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            max_new_tokens=max_new_tokens,
            max_length=max_length,
            progress=True,
            allow_download=allow_download or None,
            out=output,
            force=force,
        )
    except LmEvalDataMissing as exc:  # report what ran, then the one-line error
        report, missing = exc.report, exc
    print_table(report)
    if missing is not None:  # the error stays one line: it says where the finished results are
        if output is not None:
            missing.problem = f"{missing.problem.rstrip('.')} (the finished results are in {output})"
        raise missing
    if output is not None:
        from rich.console import Console

        Console(stderr=True).print(f"wrote {output}", highlight=False)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"moeprune eval: {report['model']}")
    for col, justify in (
        ("task", "left"),
        ("kind", "left"),
        ("metric", "left"),
        ("value", "right"),
        ("± stderr", "right"),
        ("n", "right"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for name, res in report["tasks"].items():
        metrics = res.get("metrics", {})
        for metric, value in metrics.items():
            if metric == "tokens" or "_stderr" in metric:
                continue
            stderr = metrics.get(f"{metric}_stderr")
            if stderr is None and "[" in metric:
                base, _, filt = metric.partition("[")
                stderr = metrics.get(f"{base}_stderr[{filt}")
            n = res.get("n")
            if metric in ("perplexity", "nll") and "tokens" in metrics:
                n = f"{n} ({metrics['tokens']} tok)"
            table.add_row(name, res.get("kind", ""), metric, _fmt(value), _fmt(stderr), _fmt(n))
    # A pipe or a captured stream has no width: use a wide one so names are never wrapped.
    console = Console() if sys.stdout.isatty() else Console(width=200)
    console.print(table)
