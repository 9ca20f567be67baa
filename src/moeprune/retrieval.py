"""Routing queries to library tasks, and how well the chosen pattern covers a query.

Two probes compute a query's router statistics:

- :class:`FirstLayerProbe` (key ``first``): the adaptive model's forward that stops at the first
  MoE router -- what :class:`moeprune.adaptive.AdaptiveMoE` uses, no expert needed;
- :class:`FullModelProbe` (keys ``first`` and ``all``): a forward of the whole model, observing
  every MoE layer's router.

Each gives the query's PreMoe key(s) and the experts its tokens select in each observed layer
(routing over all E experts), so :func:`route_query` can say how much of the query's own expert
usage the chosen task keeps ("coverage": the share of its (token, expert) assignments whose expert
the task's pattern keeps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .library import Library, Match, check_key_kind, query_keys

__all__ = ["FirstLayerProbe", "FullModelProbe", "Routed", "route_query"]


@dataclass
class QueryStats:
    keys: dict[str, torch.Tensor]
    selected: dict[int, torch.Tensor]  # decoder layer -> [T, k] experts chosen (full routing)
    tokens: int


@dataclass
class Routed:
    """One routed query."""

    text: str
    match: Match
    coverage: dict[int, float] = field(default_factory=dict)  # layer -> share of assignments kept
    tokens: int = 0
    label: str | None = None

    @property
    def mean_coverage(self) -> float:
        return sum(self.coverage.values()) / len(self.coverage) if self.coverage else float("nan")

    @property
    def correct(self) -> bool | None:
        return None if self.label is None else self.match.task == self.label

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.text,
            "task": self.match.task,
            "key": self.match.key,
            "distances": self.match.distances,
            "typical_distance": self.match.typical,
            "far": self.match.far,
            "coverage": {str(k): v for k, v in self.coverage.items()},
            "mean_coverage": self.mean_coverage,
            "tokens": self.tokens,
            **({"label": self.label, "correct": self.correct} if self.label is not None else {}),
        }


class FirstLayerProbe:
    """Query statistics from the forward up to the first MoE router of an adaptive model."""

    kinds = ("records", "first")

    def __init__(self, adaptive: Any) -> None:
        self.adaptive = adaptive

    def stats(self, text: str) -> QueryStats:
        key, selected, _ = self.adaptive.query_statistics(text)
        layer = self.adaptive.blocks[0].layer
        return QueryStats({"first": key}, {layer: selected}, int(selected.shape[0]))


class FullModelProbe:
    """Query statistics from a full forward (every MoE layer observed)."""

    kinds = ("records", "first", "all")

    def __init__(self, model: Any, tokenizer: Any, ka: int) -> None:
        from .arch import find_moe_blocks

        self.model = model
        self.tokenizer = tokenizer
        self.blocks = find_moe_blocks(model)
        self.ka = ka

    @torch.no_grad()
    def stats(self, text: str) -> QueryStats:
        from .adaptive import query_ids
        from .arch import patch_moe
        from .score import premoe_token_entries

        ids = query_ids(self.tokenizer, text)
        entries: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        selected: dict[int, torch.Tensor] = {}

        def observe(event: Any) -> None:
            logits = event.logits.reshape(-1, event.logits.shape[-1])
            logits = logits[:, : event.block.num_experts]  # the prunable experts' columns (arch/extended.py)
            entries[event.block.index] = premoe_token_entries(logits, self.ka)
            selected[event.block.layer] = event.top_k_index.detach().cpu()

        device = next(self.model.parameters()).device
        with patch_moe(self.model, self.blocks, observer=observe):
            self.model(input_ids=torch.tensor([ids], device=device), use_cache=False)
        rows = [entries[b.index] for b in self.blocks]
        stacked = tuple(torch.stack([r[i].cpu() for r in rows]) for i in range(3))
        keys = query_keys(stacked, self.blocks[0].num_experts, all_layers=True)  # type: ignore[arg-type]
        return QueryStats(keys, selected, len(ids))


def coverage(selected: torch.Tensor, kept: Sequence[int], num_experts: int) -> float:
    """Share of the (token, expert) assignments ``selected`` [T, k] whose expert is in ``kept``."""
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[list(kept)] = True
    sel = selected.reshape(-1).long()
    sel = sel[sel >= 0]
    return float(mask[sel].float().mean()) if sel.numel() else float("nan")


def route_query(
    library: Library, probe: Any, text: str, key: str | None = None, label: str | None = None
) -> Routed:
    """Route ``text`` with ``probe``'s statistics and the library's ``key`` kind (default: the
    library's best available kind)."""
    key = check_key_kind(key or library.default_key)
    if key not in probe.kinds:
        from .errors import UserError

        raise UserError(
            f"key '{key}' needs a forward through the whole model", "drop --key or use --key first"
        )
    st = probe.stats(text)
    match = library.match(st.keys["all" if key == "all" else "first"], key)
    plan = library.task(match.task).plan
    cov = {layer: coverage(sel, plan.kept[layer], library.num_experts) for layer, sel in st.selected.items()}
    return Routed(text, match, cov, st.tokens, label)
