"""One-shot settings (the keys of a recipe), their checks, and the evaluation section of the card.

The run itself is :func:`moeprune.api.oneshot` (``moeprune prune MODEL --data ...`` and
``moeprune run recipe.yaml``): everything is written in a temporary folder beside ``out`` and
renamed at the end, so a failure anywhere leaves nothing behind. The output folder holds the pruned
checkpoint, its ``plan.json``, an "Evaluation" section in its model card (``README.md``) with
evaluation, and the provenance in ``moeprune/``: ``profile.safetensors``, ``recipe.yaml``,
``demos.jsonl`` (with self-generation) and ``eval.json`` (with evaluation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import UserError

MODES = ("remove", "novice")
SCOPES = ("layer", "global")


@dataclass
class OneShot:
    """The settings of one one-shot run (the keys of a recipe)."""

    model: str
    data: list[str]
    method: str
    keep: str
    out: str
    self_generate: int = 0
    scope: str = "layer"
    mode: str = "remove"
    eval: list[str] = field(default_factory=list)
    eval_limit: int | None = None
    max_length: int = 2048
    seed: int = 0
    top_k: int | None = None
    force: bool = False
    pad_uniform: bool = False


def check_settings(s: OneShot) -> None:
    """Every check that needs no model: a clear one-line error before anything is read or written."""
    from .data import check_max_length
    from .plan import parse_keep
    from .score import check_method

    if not s.data:
        raise UserError("no calibration data given", "pass --data FILE (repeatable)")
    for d in s.data:
        if not Path(d).expanduser().exists():
            raise UserError(f"data file '{d}' does not exist", "pass an existing calibration file")
    check_method(s.method)
    parse_keep(str(s.keep))
    if s.scope not in SCOPES:
        raise UserError(f"unknown scope '{s.scope}'", "use --scope layer or --scope global")
    if s.mode not in MODES:
        raise UserError(f"unknown --mode '{s.mode}'", f"use --mode {' or '.join(MODES)}")
    if s.self_generate < 0:
        raise UserError(f"--self-generate must be >= 0, got {s.self_generate}", "pass a number of new tokens")
    if s.eval_limit is not None and s.eval_limit <= 0:
        raise UserError(f"--eval-limit must be positive, got {s.eval_limit}", "pass --eval-limit 1 or more")
    if s.eval_limit is not None and not s.eval:
        raise UserError("--eval-limit given without --eval", "name the tasks with --eval TASK")
    if s.top_k is not None and s.top_k <= 0:
        raise UserError(f"--top-k must be positive, got {s.top_k}", "pass --top-k 1 or more")
    check_max_length(s.max_length)
    out = Path(s.out).expanduser()
    if not out.resolve().parent.is_dir():
        raise UserError(
            f"the folder of --out '{s.out}' does not exist", f"create {out.resolve().parent} first"
        )
    for d in s.data:
        if Path(d).expanduser().resolve() == out.resolve():
            raise UserError(f"--out '{s.out}' is one of the data files", "pass another output folder")


def recipe_dict(s: OneShot) -> dict[str, Any]:
    """The recipe of a run, with absolute paths (a hub id stays as it is)."""
    model = s.model
    if Path(model).expanduser().exists():
        model = str(Path(model).expanduser().resolve())
    return {
        "model": model,
        "data": [str(Path(d).expanduser().resolve()) for d in s.data],
        "method": s.method,
        "keep": str(s.keep),
        "out": str(Path(s.out).expanduser().resolve()),
        "self_generate": s.self_generate,
        "scope": s.scope,
        "mode": s.mode,
        "eval": [_abs_task(t) for t in s.eval],
        "eval_limit": s.eval_limit,
        "max_length": s.max_length,
        "seed": s.seed,
        "top_k": s.top_k,
        "force": s.force,
        "pad_uniform": s.pad_uniform,
    }


def _abs_task(spec: str) -> str:
    """A task spec with its file absolute (PATH, NAME=PATH, kind:PATH); 'testbed...' stays."""
    from .recipe import _task

    p = Path(spec).expanduser()
    return str(p.resolve()) if p.exists() else _task(Path.cwd(), spec)


def eval_rows(report: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(task, metric, full, pruned) for every headline metric (no stderr, no token counts)."""
    rows = []
    for name, res in report["full"].items():
        other = report["pruned"].get(name, {}).get("metrics", {})
        for metric, value in res.get("metrics", {}).items():
            if metric == "tokens" or "_stderr" in metric:
                continue
            rows.append((name, metric, value, other.get(metric)))
    return rows


def eval_section(report: dict[str, Any]) -> str:
    """The "## Evaluation" section of the model card: a markdown table full vs pruned."""
    limit = report.get("limit")
    lines = [
        "## Evaluation",
        "",
        "Full vs pruned model, the same tasks and settings"
        + (f" (first {limit} records of each task)" if limit else "")
        + "; details in `moeprune/eval.json`.",
        "",
        "| task | metric | full | pruned |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {t} | {m} | {_fmt(f)} | {_fmt(p)} |" for t, m, f, p in eval_rows(report)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


