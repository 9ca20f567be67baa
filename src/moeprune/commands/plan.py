"""`moeprune plan PROFILE --method M --keep K --out plan.json`: choose the experts to keep."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from moeprune.cli import app
from moeprune.errors import UserError


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
) -> None:
    """Choose the experts every MoE layer keeps, from one or more profiles, and write a plan."""
    from moeprune.plan import experts_to_keep, parse_keep, plan_from_profile, plan_summary, profile_routing
    from moeprune.score import OPTIONS, check_method, combined_score, score

    # --- check the arguments before reading anything ----------------------------------------------
    check_method(method)
    if scope not in ("layer", "global"):
        raise UserError(f"unknown scope '{scope}'", "use --scope layer or --scope global")
    if per_group not in ("equal", "free"):
        raise UserError(f"unknown --per-group '{per_group}'", "use --per-group equal or free")
    keep_value = parse_keep(keep)
    options: dict[str, Any] = {"seed": seed, "r": premoe_r, "ka": premoe_ka}
    for name, value in options.items():
        flag = {"seed": "--seed", "r": "--premoe-r", "ka": "--premoe-ka"}[name]
        if value is not None and name not in OPTIONS.get(method, ()):
            raise UserError(f"{flag} does not apply to method '{method}'", f"leave {flag} out")
    if method == "random" and seed is None:
        options["seed"] = 0
    options = {k: v for k, v in options.items() if v is not None}
    _check_out(out)

    # --- load, score, plan -------------------------------------------------------------------------
    paths = [profile, *(more or [])]
    profiles = [_load_profile(p) for p in paths]
    meta = profiles[0].meta
    if len(profiles) == 1:
        scores = score(profiles[0], method, **options)
    else:
        scores = combined_score(profiles, method, **options)

    source = f"profile '{profile}'"
    num_experts = int(scores.shape[1])
    n_group = profile_routing(meta, source)["n_group"]
    experts_to_keep(keep_value, num_experts, n_group=n_group, per_group=per_group)  # early, clear error

    settings: dict[str, Any] = {
        "profiles": [
            {"path": str(p), "tokens": pr.meta.get("tokens"), "data": pr.meta.get("data")}
            for p, pr in zip(paths, profiles, strict=True)
        ],
        "options": options,
        "mixed_domain": len(profiles) > 1,
    }
    plan = plan_from_profile(
        scores,
        meta,
        keep=keep_value,
        method=method,
        source=source,
        scope=scope,
        new_top_k=top_k,
        per_group=per_group,
        settings=settings,
    )

    memory: dict[str, Any] = {}
    if model is not None:
        memory = _memory_args(model, profiles[0])
    # gate share: of the (first) profile; with several, of all of them summed
    summary = plan_summary(plan, _GateSum(profiles), **memory)

    plan.save(out)
    _print_summary(plan, summary, out)


class _GateSum:
    """A profile-like object holding the calibration gate mass summed over all given profiles."""

    def __init__(self, profiles: list[Any]) -> None:
        gates = [p.tensors["gate"] for p in profiles if "gate" in p.tensors]
        self.tensors = {"gate": sum(g.double() for g in gates)} if len(gates) == len(profiles) else {}
        self.meta: dict[str, Any] = {}


def _check_out(out: Path) -> None:
    if out.exists() and out.is_dir():
        raise UserError(f"--out '{out}' is a directory", "pass a file name such as plan.json")
    parent = out.expanduser().resolve().parent
    if not parent.is_dir():
        raise UserError(f"the folder of --out '{out}' does not exist", f"create {parent} first")


def _load_profile(path: Path) -> Any:
    from moeprune.profile import Profile

    if not path.is_file():
        raise UserError(f"profile '{path}' does not exist", "make one with `moeprune profile`")
    try:
        return Profile.load(path)
    except UserError:
        raise
    except Exception as exc:  # any other failure to read it: a corrupted file
        raise UserError(
            f"cannot read profile '{path}' ({exc.__class__.__name__})",
            "re-run `moeprune profile` to make it again",
        ) from None


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


def _print_summary(plan: Any, summary: dict[str, Any], out: Path) -> None:
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
