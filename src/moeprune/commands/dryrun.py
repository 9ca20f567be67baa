"""How `prune --dry-run` and `profile --dry-run` print their estimates: a table, or JSON."""

from __future__ import annotations

import json
import sys
from typing import Any

_SHARDS_SHOWN = 8  # a longer shard list is shortened in the table (the JSON has every shard)


def _bytes(n: float) -> str:
    from moeprune.card import human_bytes

    return human_bytes(n)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rate(bw: Any) -> str:
    if bw.bytes_per_s is None:
        return bw.source
    return f"{bw.bytes_per_s / 1e9:.2f} GB/s ({bw.source})"


def _console() -> Any:
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _table(rows: list[tuple[str, str]]) -> Any:
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    return table


def print_prune_estimate(est: Any, as_json: bool = False) -> None:
    """The dry run of `prune`: sizes, bytes, memory, time; then the output's shards."""
    if as_json:
        print(json.dumps(est.to_json(), indent=2))
        return
    from rich.table import Table

    kept = f"{est.kept[0]}-{est.kept[-1]}" if len(est.kept) > 1 else str(est.kept[0])
    top = f"top-k {est.top_k}" + (f" (was {est.original_top_k})" if est.top_k != est.original_top_k else "")
    quant = f", {est.quantization} copied as stored" if est.quantization else ""
    out_files = sum(s.bytes for s in est.shards)
    time_line = _duration(est.seconds)
    if est.seconds is not None:
        time_line += f" at {_rate(est.bandwidth)}: reading, then writing"
    else:
        time_line += f": {est.bandwidth.source}"
    console = _console()
    console.print(
        f"dry run: prune {est.model} ({est.mode}{quant}): keep {kept}/{est.num_experts} experts in "
        f"{est.layers} MoE layers, {top}",
        highlight=False,
    )
    rows = [
        ("source", f"{_bytes(est.source_tensor_bytes)} of tensors ({_bytes(est.source_file_bytes)} of files)"),
        ("output", f"{_bytes(est.output_tensor_bytes)} of tensors in {len(est.shards)} shard(s) ({_bytes(out_files)} of files)"),
        ("read", f"{_bytes(est.bytes_read)} (the kept byte ranges and the headers)"),
        ("written", f"{_bytes(est.bytes_written)} (the shards and the index)"),
        ("peak memory", f"{_bytes(est.peak_memory)} (does not grow with the checkpoint)"),
        ("time", time_line),
        ("this dry run", f"{est.plan_seconds:.1f} s, no tensor data read"),
    ]  # fmt: skip
    console.print(_table(rows))
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
    table = Table(title=None)
    for col, justify in (("shard", "left"), ("size", "right"), ("tensors", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    shards = est.shards
    if len(shards) > _SHARDS_SHOWN:
        head, tail = shards[: _SHARDS_SHOWN - 2], shards[-2:]
        for s in head:
            table.add_row(s.name, _bytes(s.bytes), f"{s.tensors:,}")
        table.add_row(f"... {len(shards) - len(head) - len(tail)} more (--json lists every shard)", "", "")
        shards = tail
    for s in shards:
        table.add_row(s.name, _bytes(s.bytes), f"{s.tensors:,}")
    console.print(table)


def print_profile_estimate(est: Any, as_json: bool = False) -> None:
    """The dry run of `profile`: the profile's size, bytes read, peak memory and its items."""
    if as_json:
        print(json.dumps(est.to_json(), indent=2))
        return
    console = _console()
    how = "one decoder layer at a time" if est.offload == "sequential" else "the whole model in memory"
    console.print(
        f"dry run: profile {est.model} ({how}, {est.device}, {est.dtype}): {est.layers} MoE layers of "
        f"{est.num_experts} experts, {est.tokens:,} tokens in {est.records:,} records",
        highlight=False,
    )
    time_line = _duration(est.read_seconds)
    time_line += (
        f" at {_rate(est.bandwidth)}" if est.read_seconds is not None else f": {est.bandwidth.source}"
    )
    sample = "with" if est.per_sample else "without"
    rows = [
        ("tokens", est.tokens_source),
        ("profile", f"{_bytes(est.profile_bytes)} ({sample} per-sample gate sums"
                    + (", with per-token PreMoe entries)" if est.premoe_exact else ")")),
        ("read", f"{_bytes(est.bytes_read)} of weights"),
        ("peak memory", _bytes(est.peak_memory) + (f" (decoder layer {est.largest_layer} is the largest)"
                                                    if est.largest_layer is not None else "")),
        ("time to read", time_line),
        ("this dry run", f"{est.plan_seconds:.1f} s, no tensor data read"),
    ]  # fmt: skip
    console.print(_table(rows))
    console.print(_table([(f"  {_bytes(n)}", label) for label, n in est.memory]))
    for note in est.notes:
        console.print(f"note: {note}", highlight=False)
