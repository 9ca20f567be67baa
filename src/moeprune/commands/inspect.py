"""`moeprune inspect MODEL`: what a MoE model is made of, from its config alone."""

from __future__ import annotations

import json

import typer

from ..cli import app


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000 or unit == "T":
            return f"{n:.2f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.2f}T"


@app.command()
def inspect(
    model: str = typer.Argument(..., help="Local model directory or a hub id present in the local cache."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Show the MoE structure and the size after keeping 75/50/25/12.5% of routed experts (config only)."""
    from ..api import inspect as inspect_model

    summary = inspect_model(model)
    if as_json:
        typer.echo(json.dumps(summary.to_json(), indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = Table(title=f"{model}", show_header=False, title_justify="left")
    info.add_column("field", style="bold")
    info.add_column("value")
    layers = summary.moe_layers
    span = f"{layers[0]}..{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
    rows = [
        ("architecture", f"{summary.architecture} ({summary.model_type})"),
        ("layers", f"{summary.num_layers} ({summary.num_moe_layers} MoE: {span})"),
        ("routed experts per layer", str(summary.num_experts)),
        ("active per token (top-k)", str(summary.top_k)),
        ("shared experts", str(summary.num_shared_experts)),
        (
            "router",
            summary.router + (f"; group-limited: {summary.group_limited}" if summary.group_limited else ""),
        ),
        ("checkpoint dtype", summary.dtype),
        ("parameters", f"{human_count(summary.total_params)} ({human_bytes(summary.total_bytes)})"),
        (
            "routed experts",
            f"{human_count(summary.routed_expert_params)} ({human_bytes(summary.routed_expert_bytes)}, "
            f"{100 * summary.routed_expert_params / summary.total_params:.1f}%)",
        ),
        ("everything else", f"{human_count(summary.other_params)}"),
    ]
    if summary.whole_moe_layers:
        rows.insert(2, ("hash-routed MoE layers", f"{summary.whole_moe_layers} (kept whole, in 'everything else')"))
    for k, v in rows:
        info.add_row(k, v)
    console.print(info)
    sizes = Table(title="after pruning routed experts (same count in every MoE layer)", title_justify="left")
    for col in ("keep", "experts/layer", "parameters", "size", "of full"):
        sizes.add_column(col, justify="right")
    sizes.add_row(
        "100%",
        str(summary.num_experts),
        human_count(summary.total_params),
        human_bytes(summary.total_bytes),
        "100%",
    )
    refused = []
    for k in summary.keep:
        if k["refused"]:  # plan refuses this keep for this router: no size to show
            sizes.add_row(f"{100 * k['fraction']:g}%", str(k["experts_per_layer"]), "-", "-", "refused")
            refused.append(f"{100 * k['fraction']:g}%: {k['refused']}")
            continue
        sizes.add_row(
            f"{100 * k['fraction']:g}%",
            str(k["experts_per_layer"]),
            human_count(k["params"]),
            human_bytes(k["bytes"]),
            f"{100 * k['share_of_full']:.1f}%",
        )
    console.print(sizes)
    for line in refused:
        console.print(f"refused by `moeprune plan` at {line}", highlight=False, markup=False)
