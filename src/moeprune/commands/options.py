"""Options that several commands share, declared once so that they read the same everywhere."""

from __future__ import annotations

from typing import Any

import typer

from moeprune.device import DEVICE_HELP, DTYPE_HELP


def device_option() -> Any:
    """``--device``: auto (cuda when available, else cpu), resolved by :func:`moeprune.device.resolve_device`."""
    return typer.Option("auto", "--device", help=DEVICE_HELP)


def dtype_option() -> Any:
    """``--dtype``: auto (bfloat16 on CUDA, and on CPUs with bf16 units for models of hidden size >= 1024; else float32), resolved by :func:`moeprune.device.resolve_dtype`."""
    return typer.Option("auto", "--dtype", help=DTYPE_HELP)


def dry_run_json_option() -> Any:
    """``--json`` of ``prune``/``profile --dry-run``: the estimate as JSON."""
    return typer.Option(False, "--json", help="With --dry-run: print the estimate as JSON.")


def bandwidth_option() -> Any:
    """``--bandwidth`` of ``prune``/``profile --dry-run``, parsed by :mod:`moeprune.estimate`."""
    return typer.Option(
        None,
        "--bandwidth",
        help="With --dry-run: disk bandwidth for the time estimate, e.g. 1.5GB/s (default: a quick "
        "measured read of the largest shard).",
    )
