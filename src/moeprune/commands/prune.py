"""`moeprune prune MODEL --plan plan.json [--mode remove|novice] --out DIR`: write the pruned checkpoint.

Modes and loading are described in docs/surgery.md: ``remove`` (stock checkpoint, or ragged with
per-layer counts, or ``--pad-uniform``), ``novice`` (MoNE: needs ``--profile``)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app
from moeprune.errors import UserError

MODES = ("remove", "novice")


@app.command("prune")
def prune_command(
    model: str = typer.Argument(
        ..., help="Model directory, or a hub id already in the local Hugging Face cache."
    ),
    plan_path: Path | None = typer.Option(
        None, "--plan", "-p", help="Plan file (JSON) from `moeprune plan` (or give --data instead)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the pruned model to."),
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
    data: list[str] | None = typer.Option(
        None,
        "--data",
        help="One-shot: calibration data (repeatable); profile, plan and prune in one go, the profile and "
        "plan kept in --out. Needs --method and --keep.",
    ),
    method: str | None = typer.Option(
        None, "--method", "-m", help="One-shot: the score (as `moeprune plan`)."
    ),
    keep: str | None = typer.Option(
        None, "--keep", "-k", help="One-shot: experts kept per MoE layer (e.g. 64) or a fraction (0.5)."
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
        "testbed:dates; repeatable): a table in the model card and eval.json.",
    ),
    eval_limit: int | None = typer.Option(
        None, "--eval-limit", help="One-shot: evaluate only the first N records of each task."
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
    }
    if plan_path is not None and data:
        raise UserError("--plan and --data are given together", "pass --plan PLAN or --data FILE, not both")
    if plan_path is None and not data:
        raise UserError(
            "no plan and no data given",
            "pass --plan plan.json, or --data FILE --method M --keep K to profile and plan in one go",
        )
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
        )
        return
    missing = [flag for flag in ("--method", "--keep") if oneshot[flag] is None]
    if missing:
        raise UserError(
            f"one-shot pruning (--data) needs {' and '.join(missing)}", "e.g. --method easyep --keep 0.5"
        )
    if profile is not None:
        raise UserError(
            "--profile does not apply with --data", "leave it out: the profile is made and kept in --out"
        )
    if max_shard_size is not None:
        raise UserError("--max-shard-size does not apply with --data", "leave it out")
    from moeprune.oneshot import OneShot, run_oneshot

    run_oneshot(
        OneShot(
            model=model,
            data=list(data or []),
            method=str(method),
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
) -> None:
    """What `moeprune prune MODEL --plan PLAN ...` does (usable from Python)."""
    from moeprune.checkpoint import parse_size
    from moeprune.modelio import load_config, resolve_model_dir
    from moeprune.plan import Plan
    from moeprune.surgery import check_output_dir, human_bytes, rewrite_checkpoint

    # --- check everything before writing anything --------------------------------------------------
    if mode not in MODES:
        raise UserError(f"unknown --mode '{mode}'", f"use --mode {' or '.join(MODES)}")
    if mode == "novice" and profile is None:
        raise UserError(
            "--mode novice needs the novices' mean outputs",
            "pass --profile with the profile the plan was made from",
        )
    if max_shard_size is not None:
        parse_size(max_shard_size)
    src = resolve_model_dir(model)
    plan = Plan.load(plan_path)
    profile_meta = _profile_meta(profile) if profile is not None else None
    check_output_dir(src, out, force)
    config = load_config(str(src))
    check_plan_matches(plan, config)
    novices = _novice_vectors(profile, plan, config, model) if mode == "novice" and profile else None

    top_k = plan.top_k if plan.top_k != _model_top_k(config) else None
    console = _console()
    start = time.perf_counter()
    with _progress(console) as bar:
        result = rewrite_checkpoint(
            src,
            out,
            plan.kept,
            top_k=top_k,
            metadata=profile_meta,
            force=force,
            plan=plan.to_json(),
            max_shard_size=max_shard_size,
            progress=bar,
            mode=mode,
            pad_uniform=pad_uniform,
            novices=novices,
            allow_other_profile=allow_other_profile,
        )
    seconds = time.perf_counter() - start
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


def _novice_vectors(profile_path: Path, plan: Any, config: Any, model: str) -> dict[int, Any]:
    """Each layer's novice vectors [R, H] (mean expert outputs, ascending replaced ids) from the profile."""
    from moeprune.profile import Profile

    prof = Profile.load(profile_path)
    prof.check_model(config, model)
    mean = prof["mone_mean"]
    out: dict[int, Any] = {}
    for layer, ids in plan.replaced.items():
        if layer not in prof.layers:
            raise UserError(
                f"profile '{profile_path}' has no statistics for MoE layer {layer}",
                "pass the profile the plan was made from",
            )
        out[layer] = mean[prof.layers.index(layer), ids].float()
    return out


def check_plan_matches(plan: Any, config: Any) -> None:
    """Error unless the plan was made for this model (type, fingerprint, expert count, MoE layers)."""
    from moeprune.arch import find_moe_blocks
    from moeprune.modelio import build_on_meta
    from moeprune.profile import fingerprint_fields, model_fingerprint

    text = config.get_text_config()
    types = {getattr(config, "model_type", None), getattr(text, "model_type", None)}
    if plan.model_type and plan.model_type not in types:
        raise UserError(
            f"this plan was made for a '{plan.model_type}' model, not '{config.model_type}'",
            "make a plan from a profile of this model",
        )
    blocks = find_moe_blocks(build_on_meta(config))
    if plan.model_fingerprint:
        plan.check_model(model_fingerprint(fingerprint_fields(config, blocks)))
    num_experts = blocks[0].num_experts
    if plan.num_experts != num_experts:
        raise UserError(
            f"this plan was made for a model with {plan.num_experts} experts per layer; this one has {num_experts}",
            "make a plan from a profile of this model",
        )
    layers = [b.layer for b in blocks]
    missing = [layer for layer in layers if layer not in plan.kept]
    if missing:
        raise UserError(
            f"the plan has no kept experts for MoE layer(s) {', '.join(map(str, missing[:8]))}",
            "make a plan from a profile of this model",
        )
    extra = [layer for layer in plan.layers if layer not in layers]
    if extra:
        raise UserError(
            f"the plan names layer(s) {', '.join(map(str, extra[:8]))}, which are not MoE layers of this "
            f"model (MoE layers: {layers})",
            "make a plan from a profile of this model",
        )


def _model_top_k(config: Any) -> int | None:
    from moeprune.arch.table import TOP_K_ATTRS

    text = config.get_text_config()
    return next((int(getattr(text, n)) for n in TOP_K_ATTRS if getattr(text, n, None) is not None), None)


def _profile_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` JSON object of a profile, read from its safetensors header only."""
    from moeprune.checkpoint import read_header

    if not path.is_file():
        raise UserError(f"profile '{path}' does not exist", "pass the profile the plan was made from")
    _, metadata = read_header(path)
    try:
        meta = json.loads(metadata.get("meta", ""))
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict):
        raise UserError(
            f"'{path}' is not a moeprune profile (no meta)", "pass a file from `moeprune profile`"
        )
    return meta


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
