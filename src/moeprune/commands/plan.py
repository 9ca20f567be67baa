"""`moeprune plan PROFILE --method M --keep K --out plan.json`: choose the experts to keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app


@app.command("plan")
def plan_command(
    profile: Path = typer.Argument(..., help="Profile file (*.profile.safetensors) from `moeprune profile`."),
    more: list[Path] | None = typer.Option(
        None,
        "--profile",
        help="Another profile of the same model (another domain); scores are normalised per layer and "
        "averaged (EASY-EP mixed-domain). Repeatable.",
    ),
    method: str = typer.Option(
        ...,
        "--method",
        "-m",
        help="Score: random, frequency, gate, easyep, easyep-no-token, reap, premoe, premoe-v1, mone, mone-code.",
    ),
    keep: str = typer.Option(
        ..., "--keep", "-k", help="Experts kept per MoE layer (e.g. 64) or a fraction (0.5 or 50%)."
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Where to write the plan (JSON)."),
    scope: str = typer.Option(
        "layer",
        "--scope",
        help="layer: the same count in every layer; global: one ranking of per-layer-normalised scores "
        "across layers (same total, at least top-k per layer).",
    ),
    top_k: int | None = typer.Option(
        None, "--top-k", help="Lower the experts active per token to N (needed to keep fewer than top-k)."
    ),
    seed: int | None = typer.Option(None, "--seed", help="Seed of the random baseline (method random)."),
    per_group: str = typer.Option(
        "equal",
        "--per-group",
        help="Group-limited routers: equal = every group keeps the same count; free = ignore groups.",
    ),
    premoe_r: float | None = typer.Option(
        None, "--premoe-r", help="PreMoe: a fixed threshold r instead of the per-layer mean top-1 q."
    ),
    premoe_ka: int | None = typer.Option(
        None, "--premoe-ka", help="PreMoe: candidates per token K_a (at most what the profile stores)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="The model (directory or cached hub id): also show memory before/after."
    ),
    force: bool = typer.Option(False, "--force", help="Replace an existing plan that moeprune wrote."),
) -> None:
    """Choose the experts every MoE layer keeps, from one or more profiles, and write a plan."""
    from moeprune.api import check_plan_args, load_profile, model_input, plan, plan_output, save_plan
    from moeprune.plan import plan_summary

    check_plan_args(method, keep, scope=scope, per_group=per_group, seed=seed, premoe_r=premoe_r, premoe_ka=premoe_ka)
    given = [profile, *(more or [])]
    target = plan_output(out, given, force)
    if model is not None:  # the plan never goes into the model it is shown against
        from moeprune.outputs import check_output

        check_output(out, inputs=[model_input(model)], force=force, folder=False)
    profiles = [load_profile(p) for p in given]
    the_plan = plan(
        profiles,
        method,
        keep,
        scope=scope,
        top_k=top_k,
        seed=seed,
        per_group=per_group,
        premoe_r=premoe_r,
        premoe_ka=premoe_ka,
    )
    memory = _memory_args(model, profiles[0]) if model is not None else {}
    # gate share: of the (first) profile; with several, of all of them summed
    summary = plan_summary(the_plan, _GateSum(profiles), **memory)
    save_plan(the_plan, target)
    print_summary(the_plan, summary, out)


class _GateSum:
    """A profile-like object holding the calibration gate mass summed over all given profiles."""

    def __init__(self, profiles: list[Any]) -> None:
        gates = [p.tensors["gate"] for p in profiles if "gate" in p.tensors]
        self.tensors = {"gate": sum(g.double() for g in gates)} if len(gates) == len(profiles) else {}
        self.meta: dict[str, Any] = {}


def _memory_args(model: str, profile: Any) -> dict[str, Any]:
    from moeprune.arch import find_moe_blocks
    from moeprune.modelio import build_on_meta, load_config
    from moeprune.summary import summarize

    config = load_config(model)
    meta_model = build_on_meta(config)
    profile.check_model(config, model, find_moe_blocks(meta_model))
    info = summarize(config, meta_model)
    return {
        "params_per_expert": info.params_per_expert,
        "other_params": info.other_params,
        "bytes_per_param": info.bytes_per_param,
    }


def print_summary(plan: Any, summary: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from moeprune.commands.inspect import human_bytes, human_count

    console = Console()
    s = plan.settings
    top = f"top-k {plan.top_k}" + (
        f" (lowered from {plan.original_top_k})" if plan.top_k != plan.original_top_k else ""
    )
    budget = f"{s['experts_per_layer']}/{plan.num_experts} per layer"
    if s["scope"] == "global":
        budget = f"{s['experts_per_layer'] * len(plan.layers)}/{plan.num_experts * len(plan.layers)} in all (global)"
    console.print(f"plan: method {plan.method}, keep {budget}, {top}", highlight=False)
    table = Table()
    table.add_column("layer", justify="right")
    table.add_column("kept", justify="right")
    table.add_column("gate mass kept", justify="right")
    for row in summary["layers"]:
        share = row.get("gate_share")
        table.add_row(
            str(row["layer"]),
            f"{row['kept']}/{row['of']}",
            "-" if share is None else f"{100 * share:.1f}%",
        )
    console.print(table)
    line = f"kept {summary['kept_total']} of {summary['experts_total']} routed experts"
    if "gate_share_mean" in summary:
        line += f"; mean gate mass kept {100 * summary['gate_share_mean']:.1f}%"
    console.print(line, highlight=False)
    if "params_before" in summary:
        mem = f"parameters {human_count(summary['params_before'])} -> {human_count(summary['params_after'])}"
        if "bytes_before" in summary:
            mem += f" ({human_bytes(summary['bytes_before'])} -> {human_bytes(summary['bytes_after'])})"
        console.print(mem, highlight=False)
    Console(stderr=True).print(f"wrote {out}", highlight=False)
