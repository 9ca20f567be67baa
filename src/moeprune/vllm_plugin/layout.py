"""``config.moeprune`` as the vLLM plugin needs it (no torch, no vLLM).

Kept apart from :mod:`moeprune.arch.pruned` on purpose: the plugin runs in vLLM's environment,
which pins its own torch and transformers, so it reads the JSON itself rather than importing the
model-surgery code. The format is the same (``moeprune-checkpoint/1``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CONFIG_KEY = "moeprune"
FORMAT = "moeprune-checkpoint/1"


@dataclass
class ServeLayout:
    mode: str  # "remove" or "novice"
    experts_per_layer: dict[int, int]  # expert weights stored per MoE layer
    novice_experts: dict[int, list[int]] = field(default_factory=dict)  # router ids answering a constant
    base_model_type: str | None = None

    def experts_in(self, layer: int, default: int) -> int:
        """Experts a ragged layer holds (the config's count for every layer otherwise)."""
        return self.experts_per_layer.get(layer, default) if self.mode == "remove" else default

    def novices_in(self, layer: int) -> list[int]:
        """Router ids answering a constant in a layer (none outside novice checkpoints)."""
        return self.novice_experts.get(layer, []) if self.mode == "novice" else []


def require_layout(config: Any) -> ServeLayout:
    """The layout of a checkpoint served by the plugin's classes (ValueError for a stock one)."""
    layout = read_layout(config)
    if layout is None:
        raise ValueError("this checkpoint has no config.moeprune: serve it with stock vLLM")
    return layout


def read_layout(config: Any) -> ServeLayout | None:
    """The layout of a moeprune checkpoint's config, None for a stock one; ValueError (one line)
    for what this plugin cannot serve."""
    data = getattr(config, CONFIG_KEY, None)
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"config.{CONFIG_KEY} is not a {FORMAT} layout")
    mode = data.get("mode")
    if mode not in ("remove", "novice"):
        raise ValueError(f"config.{CONFIG_KEY} has an unknown mode {mode!r}")
    if mode == "novice" and data.get("novice_storage") != "buffer":
        raise ValueError(
            f"novice_storage {data.get('novice_storage')!r}: the vLLM plugin serves novices stored "
            "as a novice_outputs buffer only (down_bias ones load in stock vLLM)"
        )
    if data.get("dead_experts"):
        raise ValueError("padded (dead-expert) checkpoints are stock: serve them without the plugin")
    return ServeLayout(
        mode=mode,
        experts_per_layer={int(k): int(v) for k, v in (data.get("experts_per_layer") or {}).items()},
        novice_experts={
            int(k): sorted(int(i) for i in v) for k, v in (data.get("novice_experts") or {}).items()
        },
        base_model_type=data.get("base_model_type"),
    )
