"""`moeprune library build|route|show`: a pattern library of tasks and routing queries to it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..cli import app
from ..errors import UserError
from .options import device_option, dtype_option

library_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help=(
        "Task pattern libraries (PreMoe task-adaptive retrieval).\n\n"
        "Build: moeprune library build MODEL --task math=math.jsonl --task code=code.jsonl --keep K --out LIB\n\n"
        'Route: moeprune library route LIB "query" (or --file queries.jsonl)\n\n'
        "Show: moeprune library show LIB"
    ),
)
app.add_typer(library_app, name="library")


def parse_task_specs(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` specs -> {name: path}; PATH is data or a ``*.profile.safetensors``."""
    from ..library import check_task_name

    if not specs:
        raise UserError(
            "no task given", "pass --task NAME=DATA (or NAME=X.profile.safetensors) at least once"
        )
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--task '{spec}' is not NAME=PATH", "e.g. --task math=math.jsonl")
        check_task_name(name)
        if name in out:
            raise UserError(f"task '{name}' is given twice", "give each task once")
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"data file '{path}' of task '{name}' does not exist", "check the path")
        out[name] = p
    return out


@library_app.command("build")
def build(
    model: str = typer.Argument(..., help="Local model directory or a hub id present in the local cache."),
    task: list[str] = typer.Option(
        ...,
        "--task",
        "-t",
        help="NAME=PATH: a task's calibration data (any `moeprune profile` format) or its existing "
        "profile (*.profile.safetensors). Repeatable.",
    ),
    keep: str = typer.Option(
        ..., "--keep", "-k", help="Experts kept per MoE layer (e.g. 64) or a fraction (0.5)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Library folder to write."),
    method: str = typer.Option(
        "mone", "--method", "-m", help="Score that picks each task's experts (default mone: docs/methods.md)."
    ),
    self_generate: int = typer.Option(
        0, "--self-generate", help="Calibrate on each prompt + the model's own greedy answer (N new tokens)."
    ),
    max_length: int = typer.Option(2048, "--max-length", help="Truncate each record to this many tokens."),
    max_samples: int | None = typer.Option(
        None, "--max-samples", help="Seeded subset of N records per task."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of --max-samples."),
    premoe_ka: int | None = typer.Option(
        None, "--premoe-ka", help="PreMoe candidates per token (default: the model's top-k)."
    ),
    profiles_dir: Path | None = typer.Option(
        None,
        "--profiles-dir",
        help="Also keep the profiles made from data in this folder (created if missing), to re-plan "
        "without recalibrating.",
    ),
    dtype: str = dtype_option(),
    device: str = device_option(),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing library folder (and profiles in --profiles-dir)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Profile each task (or take its profile), plan its kept experts and store its retrieval keys."""
    from ..api import build_library

    lib = build_library(
        model,
        parse_task_specs(task),
        keep,
        out,
        method=method,
        self_generate=self_generate,
        max_length=max_length,
        max_samples=max_samples,
        seed=seed,
        premoe_ka=premoe_ka,
        profiles_dir=profiles_dir,
        dtype=dtype,
        device=device,
        force=force,
        quiet=quiet,
    )
    if not quiet:
        _print_library(lib)
    print(f"wrote {out}: {len(lib.tasks)} tasks, {lib.keep} of {lib.num_experts} experts per layer")


def _print_library(lib: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    names = lib.names
    table = Table(title=f"library {lib.path}: {lib.method}, keep {lib.keep}/{lib.num_experts} per layer")
    table.add_column("task")
    table.add_column("tokens", justify="right")
    for n in names:
        table.add_column(f"shared with {n}", justify="right")
    for a in names:
        info = lib.tasks[a].info
        table.add_row(a, str(info.get("tokens", "?")), *(f"{lib.overlap(a, b):.0%}" for b in names))
    Console(stderr=True).print(table)


@library_app.command("show")
def show(library: Path = typer.Argument(..., help="Library folder.")) -> None:
    """List a library's tasks and how many kept experts each pair shares."""
    from ..library import Library

    _print_library(Library.load(library))


def read_queries(path: Path) -> list[tuple[str, str | None]]:
    """Queries from a file: jsonl records (``prompt``, ``text`` or the first user message of
    ``messages``; an optional ``task`` field is the expected task) or .txt (one query per line)."""
    from ..data import read_file

    if path.suffix == ".txt":
        if not path.is_file():
            raise UserError(f"query file '{path}' does not exist", "check the path")
        lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
        queries: list[tuple[str, str | None]] = [(ln, None) for ln in lines if ln]
    else:
        df = read_file(path)
        labels = _labels(path)
        queries = []
        for i, r in enumerate(df.records_list):
            if r.messages is not None:
                text = next((str(m.get("content", "")) for m in r.messages if m.get("role") == "user"), "")
            else:
                text = r.prompt if r.prompt is not None else (r.text or "")
            queries.append((text, labels[i] if labels else None))
    if not queries:
        raise UserError(f"query file '{path}' holds no query", "give one query per line or record")
    return queries


def _labels(path: Path) -> list[str | None] | None:
    if path.suffix != ".jsonl":
        return None
    out: list[str | None] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            task = row.get("task") if isinstance(row, dict) else None
            out.append(str(task) if task is not None else None)
    return out if any(x is not None for x in out) else None


@library_app.command("route")
def route(
    library: Path = typer.Argument(..., help="Library folder."),
    query: str | None = typer.Argument(None, help="The query text (or use --file)."),
    file: Path | None = typer.Option(
        None,
        "--file",
        "-f",
        help="Queries: .jsonl (prompt/text/messages; optional 'task' = expected) or .txt lines.",
    ),
    model: str | None = typer.Option(
        None, "--model", help="The model (default: the one the library was built on)."
    ),
    key: str | None = typer.Option(
        None,
        "--key",
        help="records (default when available): the task of the nearest calibration record; first: "
        "PreMoe's per-task key; both from a forward up to the first MoE router (no expert loaded). "
        "all: every MoE layer's statistics (loads the whole model).",
    ),
    output: Path | None = typer.Option(None, "--output", "--out", "-o", help="Write the results as JSON."),
    dtype: str = dtype_option(),
    device: str = device_option(),
    force: bool = typer.Option(False, "--force", help="Replace an existing --output that moeprune wrote."),
) -> None:
    """Find the nearest task of each query, the distances to all tasks, and how much of the
    query's own expert usage the chosen pattern keeps."""
    from ..api import route
    from ..library import check_key_kind

    if key is not None:
        check_key_kind(key)
    if (query is None) == (file is None):
        raise UserError(
            "give a query or --file, not both" if query else "no query given", 'pass "TEXT" or --file F'
        )
    if file is None and not (query or "").strip():
        raise UserError("the query is empty", "pass some text")
    lib, results = route(
        library,
        read_queries(file) if file is not None else [(query or "", None)],
        model=model,
        key=key,
        dtype=dtype,
        device=device,
        inputs=[("query file", file)] if file is not None else [],
        out=output,
        force=force,
    )
    _print_routes(lib, results)


def _print_routes(lib: Any, results: list[Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if len(results) == 1:
        r = results[0]
        table = Table(title=f"query ({r.tokens} tokens) -> {r.match.task}")
        table.add_column("task")
        table.add_column("L2 distance", justify="right")
        for name, d in sorted(r.match.distances.items(), key=lambda kv: kv[1]):
            table.add_row(("-> " if name == r.match.task else "   ") + name, f"{d:.4f}")
        console.print(table)
        cov = ", ".join(f"layer {k}: {v:.0%}" for k, v in r.coverage.items())
        console.print(
            f"nearest task: [bold]{r.match.task}[/bold] (margin {r.match.margin:.4f}); "
            f"the query's own expert choices kept by its pattern: {cov}"
        )
        console.print(far_line(lib, r.match), highlight=False)
        return
    names = lib.names
    table = Table(title=f"{len(results)} queries")
    table.add_column("expected")
    for n in names:
        table.add_column(f"-> {n}", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("coverage", justify="right")
    table.add_column("far", justify="right")
    groups: dict[str, list[Any]] = {}
    for r in results:
        groups.setdefault(r.label or "(unlabelled)", []).append(r)
    for label, rs in groups.items():
        counts = [sum(r.match.task == n for r in rs) for n in names]
        acc = f"{sum(bool(r.correct) for r in rs) / len(rs):.1%}" if rs[0].label is not None else "-"
        cov = sum(r.mean_coverage for r in rs) / len(rs)
        far = sum(r.match.far for r in rs)
        table.add_row(label, *(str(c) for c in counts), acc, f"{cov:.0%}", str(far))
    console.print(table)
    console.print(far_summary(lib, results), highlight=False)
    labelled = [r for r in results if r.label is not None]
    if labelled:
        acc = sum(bool(r.correct) for r in labelled) / len(labelled)
        console.print(
            f"routing accuracy: {acc:.1%} ({sum(bool(r.correct) for r in labelled)}/{len(labelled)})"
        )


def far_line(lib: Any, match: Any) -> str:
    """What the distance of a routed query means: its warning when far, else how it compares."""
    from ..library import FAR_FACTOR

    if match.typical is None:
        return no_typical_note(lib, match.key)
    return match.far_warning() or (
        f"distance {match.distance:.4f} is within {FAR_FACTOR} x the typical distance of task "
        f"'{match.task}' (95th percentile over its own demonstrations: {match.typical:.4f})"
    )


def far_summary(lib: Any, results: list[Any]) -> str:
    from ..library import FAR_FACTOR

    if all(r.match.typical is None for r in results):
        return no_typical_note(lib, results[0].match.key if results else None)
    far = sum(r.match.far for r in results)
    return (
        f"far: {far} of {len(results)} queries lie beyond {FAR_FACTOR} x the 95th percentile of their "
        "nearest task's own demonstrations (their pattern may not suit them)"
    )


def no_typical_note(lib: Any, key: str | None) -> str:
    if key == "all":
        return "(no typical distance for --key all: queries far from every task are not detected)"
    return (
        f"(library '{lib.path}' has no per-record keys, so queries far from every task are not "
        "detected; rebuild it with `moeprune library build` to get them)"
    )
