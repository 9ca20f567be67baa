"""The random DeepSeek-V3-style model the benchmarks share (hidden 1024, 64 experts in 8 groups, top-8)."""

from __future__ import annotations

from typing import Any


def dsv3_config(layers: int, *, first_dense: int = 1, **overrides: Any):
    """A DeepSeek-V3 config with ``layers`` MoE layers after ``first_dense`` dense ones."""
    from transformers import DeepseekV3Config

    settings: dict[str, Any] = dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=512,
        num_hidden_layers=layers + first_dense,
        first_k_dense_replace=first_dense,
        num_attention_heads=8,
        num_key_value_heads=8,
        n_shared_experts=1,
        n_routed_experts=64,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        q_lora_rank=256,
        kv_lora_rank=128,
        qk_rope_head_dim=32,
        qk_nope_head_dim=64,
        v_head_dim=64,
        head_dim=32,
        max_position_embeddings=1024,
    )
    settings.update(overrides)
    return DeepseekV3Config(**settings)


def kv_table(rows: list[tuple[str, str]]) -> str:
    """A two-column markdown table of (what, figure) rows."""
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def append_section(path: Any, title: str, command: str, note: str, goal: str, table: str) -> None:
    """Append a `## title` section (command, environment, goal, table) to a markdown file."""
    import os
    import platform
    from pathlib import Path

    import torch

    path = Path(path)
    env = (
        f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.machine()}), "
        f"{platform.system()} {platform.release()}; {note}"
    )
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"\n## {title}\n\nCommand: `{command}` ({env}). {goal}\n\n{table}\n"
    path.write_text(text.rstrip("\n") + "\n" + block)
