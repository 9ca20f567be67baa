"""One-shot settings (the keys of a recipe), their checks, and the evaluation section of the card.

The run itself is :func:`moeprune.api.oneshot` (``moeprune prune MODEL --data ...`` and
``moeprune run recipe.yaml``): everything is written in a temporary folder beside ``out`` and
renamed at the end, so a failure anywhere leaves nothing behind. The output folder holds the pruned
checkpoint, its ``plan.json``, an "Evaluation" section in its model card (``README.md``) with
evaluation, and the provenance in ``moeprune/``: ``profile.safetensors``, ``recipe.yaml``,
``demos.jsonl`` (with self-generation) and ``eval.json`` (with evaluation).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .plan import Plan
    from .profile import Profile
    from .surgery import RewriteResult

# The provenance of a one-shot run (profile, recipe, demonstrations, evaluation) goes into this
# subfolder of the output: vLLM loads every *.safetensors of the top folder (a profile there breaks
# it); no loader looks into subfolders (docs/api.md).
PROVENANCE = "moeprune"

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


def _check_keep(model_dir: Path, s: OneShot) -> None:
    """--keep and --top-k against the model's routing (its config), before the calibration pass;
    a hint names only --keep or --top-k (one-shot has no --per-group)."""
    from .arch import find_moe_blocks
    from .arch.routing import top_k_problem
    from .modelio import build_on_meta, load_config
    from .plan import check_keep, parse_keep

    block = find_moe_blocks(build_on_meta(load_config(str(model_dir))))[0]
    if s.mode == "novice" and s.top_k is None:  # the router stays whole: any count from 1 works
        from .plan import experts_to_keep

        experts_to_keep(parse_keep(str(s.keep)), block.num_experts)
        return
    check_keep(
        parse_keep(str(s.keep)),
        block.num_experts,
        top_k=block.top_k,
        n_group=max(1, block.spec.n_group),
        topk_group=max(1, block.spec.topk_group),
        group_score=block.spec.group_score,
        new_top_k=s.top_k,
        can_change=("keep", "top_k"),
    )
    why = top_k_problem(block.spec, s.top_k) if s.top_k is not None else None
    if why is not None:  # PhiMoE's sparsemixer: refused before the calibration pass, not after it
        raise UserError(f"cannot lower top-k to {s.top_k}: {why}", "drop --top-k")


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
    from .card import text  # task names come from files: inert Markdown

    lines += [f"| {text(t)} | {text(m)} | {_fmt(f)} | {_fmt(p)} |" for t, m, f, p in eval_rows(report)]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


@dataclass
class OneShotResult:
    """What :func:`oneshot` made: the output folder, the profile, the plan, the rewrite's summary and,
    with ``eval``, the full-vs-pruned report (``eval.json``)."""

    out: Path
    profile: Profile
    plan: Plan
    rewrite: RewriteResult
    eval: dict[str, Any] | None = None
    seconds: float = 0.0


def run_oneshot(
    s: OneShot, *, quiet: bool = False, loaded: Any = None, inputs: Sequence[Any] = ()
) -> OneShotResult:
    """Profile, plan and prune (and evaluate) as ``s`` says (:func:`moeprune.api.oneshot`);
    ``loaded``: the model ``s.model`` names, already in memory; ``inputs``: other files the run
    reads (the recipe), which ``s.out`` may not be nor contain.

    ``s.out`` is checked before any work (:mod:`moeprune.outputs`: never the model, a data or task
    file; replaced only with ``force`` and only if moeprune wrote it) and locked for the whole run;
    everything is written in its temporary folder, put in place at the end."""
    import time

    import yaml

    from .api import _prune, _tokenizer_of, plan
    from .evaluate.tasks import resolve_tasks
    from .modelio import resolve_model_dir
    from .outputs import json_safe, prepare_output
    from .profiling import demos_path, run_profile
    from .score import OPTIONS

    start = time.perf_counter()
    check_settings(s)
    src = resolve_model_dir(s.model)
    out = Path(s.out).expanduser()
    _check_keep(src, s)
    tasks = resolve_tasks(list(s.eval)) if s.eval else []
    reads = [("input model", src), *(("data file", d) for d in s.data), *inputs]
    reads += [("task file", t.source) for t in tasks if getattr(t, "source", None)]
    target = prepare_output(out, inputs=reads, force=s.force, kind="model")
    target.need(_least_bytes(src, s.keep))  # a full disk is found now, not after the calibration
    final = target.path
    shown = out / PROVENANCE  # log lines name where files end up, not the temporary folder

    with target as tmp:
        keep_dir = tmp / PROVENANCE
        keep_dir.mkdir()
        profile_path = keep_dir / "profile.safetensors"
        plan_path = tmp / "plan.json"
        _say(quiet, "== profile")
        prof = run_profile(
            model=s.model,
            data=list(s.data),
            out=profile_path,
            max_length=s.max_length,
            seed=s.seed,
            self_generate=s.self_generate,
            quiet=quiet,
            loaded=None if loaded is None else (loaded, _tokenizer_of(loaded, None)),
            shown=str(shown / "profile.safetensors"),
        )
        prof.path = str(final / PROVENANCE / "profile.safetensors")
        demos = demos_path(profile_path)
        if demos.is_file():
            demos.rename(keep_dir / "demos.jsonl")
            _say(quiet, f"demonstrations in {shown / 'demos.jsonl'}")
        _say(quiet, "== plan")
        the_plan = plan(
            profile_path,
            s.method,
            s.keep,
            scope=s.scope,
            top_k=s.top_k,
            seed=s.seed if "seed" in OPTIONS.get(s.method, ()) else None,
            # novices keep the router whole: no routing rule limits their kept sets
            router="unchanged" if s.mode == "novice" and s.top_k is None else "routed",
        )
        # name the profile by where it ends up, not the temporary folder
        for entry in (the_plan.settings or {}).get("profiles") or []:
            entry["path"] = prof.path
        plan_path.write_text(the_plan.dumps(), encoding="utf-8")
        _say(quiet, "== prune")
        rewrite = _prune(
            s.model, plan_path, out, mode=s.mode, pad_uniform=s.pad_uniform, profile=profile_path, into=tmp
        )
        plan_path.write_text(the_plan.dumps(), encoding="utf-8")  # the plan as saved, not its JSON view
        report = None
        if tasks:
            _say(quiet, "== evaluate full and pruned")
            report = evaluate_pair(loaded if loaded is not None else s.model, tmp, tasks, s.eval_limit)
            (keep_dir / "eval.json").write_text(json.dumps(json_safe(report), indent=2) + "\n", encoding="utf-8")
            card = tmp / "README.md"
            card.write_text(card.read_text(encoding="utf-8") + "\n" + eval_section(report), encoding="utf-8")
        (keep_dir / "recipe.yaml").write_text(
            "# moeprune recipe of this run: `moeprune run recipe.yaml` makes it again\n"
            + yaml.safe_dump(recipe_dict(s), sort_keys=False),
            encoding="utf-8",
        )
    return OneShotResult(out, prof, the_plan, rewrite, report, time.perf_counter() - start)


def _least_bytes(src: Path, keep: str) -> int:
    """A lower bound of the pruned checkpoint's size: the kept share of the experts times the whole
    checkpoint (the other weights are all kept, so never more than the real size)."""
    from .arch import find_moe_blocks
    from .checkpoint import Checkpoint
    from .modelio import build_on_meta, load_config
    from .plan import parse_keep

    value = parse_keep(str(keep))
    if isinstance(value, float):
        share = value
    else:
        share = value / find_moe_blocks(build_on_meta(load_config(str(src))))[0].num_experts
    return int(min(max(share, 0.0), 1.0) * Checkpoint.open(src).total_bytes)


def evaluate_pair(model: Any, pruned: Path, tasks: list[Any], limit: int | None) -> dict[str, Any]:
    """Evaluate the full model, then the pruned one, on the same tasks (one model in memory at a time;
    a loaded full model is used as it is)."""
    import gc

    from .api import _is_loaded, _tokenizer_of, model_source
    from .evaluate.loading import load_model_and_tokenizer, resolve_device
    from .evaluate.runners import evaluate as run_tasks

    device = str(next(model.parameters()).device) if _is_loaded(model) else resolve_device("auto")
    results: dict[str, Any] = {}
    for which, path in (("full", model), ("pruned", str(pruned))):
        if _is_loaded(path):
            lm, tok = path, _tokenizer_of(path, None)
        else:
            lm, tok = load_model_and_tokenizer(path, device=device, dtype="auto")
        results[which] = run_tasks(lm, tok, tasks, limit=limit, progress=False)["tasks"]
        del lm, tok
        gc.collect()
    return {
        "model": model_source(model),
        "limit": limit,
        "device": device,
        "full": results["full"],
        "pruned": results["pruned"],
    }


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, file=sys.stderr)
