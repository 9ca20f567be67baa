"""The random models the benchmarks share: DeepSeek-V3-style (hidden 1024, 64 experts in 8 groups, top-8)
and Qwen3-MoE-like (hidden 1024, 128 experts, top-8)."""

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


def qwen3_config(layers: int, **overrides: Any):
    """A Qwen3-MoE-like config (hidden 1024, 128 experts, top-8, softmax routing) with ``layers`` MoE layers."""
    from transformers import Qwen3MoeConfig

    settings: dict[str, Any] = dict(
        vocab_size=8192,
        hidden_size=1024,
        intermediate_size=2816,
        moe_intermediate_size=256,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        norm_topk_prob=True,
        max_position_embeddings=1024,
    )
    settings.update(overrides)
    return Qwen3MoeConfig(**settings)


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


POOL = 64 * 1024 * 1024  # random bytes reused for every tensor

Entry = tuple[str, str, tuple[int, ...], int]  # (key, safetensors dtype, shape, bytes)


def dsv3_entries(tensors: Any) -> list[Entry]:
    """The (key, dtype, shape, bytes) of each tensor of ``tensors`` (a state dict, on meta) as
    DeepSeek-V3 stores it: BF16, but F32 for the router's score-correction biases."""
    from moeprune.checkpoint import DTYPE_SIZES

    entries = []
    for key, t in tensors.items():
        dtype = "F32" if key.endswith("e_score_correction_bias") else "BF16"
        entries.append((key, dtype, tuple(t.shape), t.numel() * DTYPE_SIZES[dtype]))
    return entries


def write_shards(directory: Any, entries: list[Entry], shards: int, pools: dict[str, bytes]) -> int:
    """Write ``entries`` in file order as up to ``shards`` safetensors shards of about equal size,
    plus ``model.safetensors.index.json``, in ``directory``; each tensor's bytes are
    ``pools[dtype]`` repeated and cut to size. Returns the bytes of tensor data."""
    import json
    from pathlib import Path

    directory = Path(directory)
    total = sum(e[3] for e in entries)
    per_shard = total / shards
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e[3] > per_shard and len(groups) < shards:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e[3]
    weight_map = {}
    n = len(groups)
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key, dtype, shape, nbytes in group:
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / name, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            for _key, dtype, _shape, nbytes in group:
                pool, left = pools[dtype], nbytes
                while left:
                    chunk = min(left, len(pool))
                    fh.write(pool[:chunk])
                    left -= chunk
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_random_dsv3(directory: Any, layers: int, shards: int) -> int:
    """Write a random bf16 DeepSeek-V3-style checkpoint in the hub layout (one key per expert, as
    DeepSeek-V3 is published) shard by shard, from a small pool of random bytes (no model is built
    in memory); returns the bytes of tensor data."""
    import torch
    from transformers.core_model_loading import revert_weight_conversion

    from moeprune.modelio import build_on_meta

    cfg = dsv3_config(layers, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(directory)
    meta = build_on_meta(cfg)
    hub = revert_weight_conversion(meta, meta.state_dict())  # per-expert keys, on meta
    entries = dsv3_entries(hub)
    del meta, hub
    # small values (std 0.02) keep activations finite through every layer
    pools = {
        "BF16": (torch.randn(POOL // 2) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy().tobytes(),
        "F32": (torch.randn(POOL // 4) * 0.02).view(torch.uint8).numpy().tobytes(),
    }
    return write_shards(directory, entries, shards, pools)
