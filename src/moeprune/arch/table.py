"""The one table of per-model facts that structure alone cannot tell.

Everything else (which layers are MoE, where the router and experts are, how experts are stored)
is read off the modules. Here: each model type's routing family and its options, where the
selection bias lives, which norm precedes the block, and the config names of its counts.
Families read their numbers (top-k, groups, scaling, renormalisation) from the router module's own
attributes first, then from the config, so a checkpoint's settings are always the ones used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import UserError
from .routing import RoutingSpec

SpecBuilder = Callable[[nn.Module, nn.Module, Any], RoutingSpec]

# Config attribute names, most common first (shared/transformers-moe.md, "Config names for counts").
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_ATTRS = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token")
SHARED_COUNT_ATTRS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")


def _first_attr(objs: tuple[Any, ...], names: tuple[str, ...], default: Any = None) -> Any:
    for obj in objs:
        for name in names:
            value = getattr(obj, name, None)
            if value is not None:
                return value
    return default


def _top_k(router: nn.Module, block: nn.Module, config: Any) -> int:
    return int(_first_attr((router, block, config), ("top_k",) + TOP_K_ATTRS))


# --- routing families -----------------------------------------------------------------------------


def softmax_topk(default_renorm: bool | None = None) -> SpecBuilder:
    """softmax over E, top-k, optional renormalisation (Mixtral, Qwen-MoE, OLMoE, ...)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        renorm = default_renorm
        if renorm is None:
            renorm = bool(_first_attr((router, block, config), ("norm_topk_prob",), False))
        return RoutingSpec(top_k=_top_k(router, block, config), score_fn="softmax", renormalize=renorm)

    return build


def topk_softmax() -> SpecBuilder:
    """top-k on the logits, then softmax over the chosen k (gpt-oss)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(
            top_k=_top_k(router, block, config), score_fn="softmax", weight_from="softmax_topk"
        )

    return build


def sigmoid_grouped(renorm_eps: float = 1e-20, scaling_site: str = "router") -> SpecBuilder:
    """DeepSeek-V3 family: sigmoid, selection on sigmoid + correction bias, group-limited top-k
    (group score = sum of the group's top 2), weights = unbiased sigmoids, optional renormalisation,
    times ``routed_scaling_factor``."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        n_group = int(_first_attr(objs, ("num_group", "n_group"), 1) or 1)
        topk_group = int(_first_attr(objs, ("topk_group",), n_group) or n_group)
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="sigmoid",
            has_selection_bias=True,
            n_group=n_group,
            topk_group=topk_group,
            group_score="top2_sum",
            renormalize=bool(_first_attr(objs, ("norm_topk_prob",), True)),
            renorm_eps=renorm_eps,
            scaling=float(_first_attr(objs, ("routed_scaling_factor",), 1.0)),
            scaling_site=scaling_site,  # type: ignore[arg-type]
        )

    return build


def softmax_group_greedy() -> SpecBuilder:
    """DeepSeek-V2: softmax, greedy or group-limited greedy (group score = max), no
    renormalisation, times ``routed_scaling_factor``."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        method = _first_attr(objs, ("topk_method",), "greedy")
        n_group = int(_first_attr(objs, ("num_group", "n_group"), 1) or 1)
        grouped = method == "group_limited_greedy" and n_group > 1
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="softmax",
            n_group=n_group if grouped else 1,
            topk_group=int(_first_attr(objs, ("topk_group",), n_group)) if grouped else 1,
            group_score="max",
            scaling=float(_first_attr(objs, ("routed_scaling_factor",), 1.0)),
        )

    return build


def softmax_statics() -> SpecBuilder:
    """Ernie-4.5: softmax; selection on p + ``moe_statics.e_score_correction_bias``; renormalise by
    the sum clamped at ``moe_norm_min``."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="softmax",
            has_selection_bias=True,
            renormalize=True,
            renorm_min=float(_first_attr(objs, ("norm_min", "moe_norm_min"), 1e-12)),
        )

    return build


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchFacts:
    spec: SpecBuilder
    selection_bias_names: tuple[str, ...] = ()  # paths relative to the block
    router_name: str | None = None  # default: found by structure
    prenorm_name: str | None = "post_attention_layernorm"
    notes: tuple[str, ...] = field(default_factory=tuple)


_DSV3_BIAS = ("gate.e_score_correction_bias", "router.e_score_correction_bias", "e_score_correction_bias")

ARCH_TABLE: dict[str, ArchFacts] = {
    # softmax over E, top-k, renormalise iff norm_topk_prob
    "qwen2_moe": ArchFacts(softmax_topk()),
    "qwen3_moe": ArchFacts(softmax_topk()),
    "olmoe": ArchFacts(softmax_topk()),
    "flex_olmo": ArchFacts(softmax_topk()),
    # softmax over E, top-k, always renormalised
    "mixtral": ArchFacts(softmax_topk(default_renorm=True)),
    "minimax": ArchFacts(softmax_topk(default_renorm=True)),
    # top-k over logits, then softmax
    "gpt_oss": ArchFacts(topk_softmax()),
    # DeepSeek-V3 family
    "deepseek_v3": ArchFacts(sigmoid_grouped(), _DSV3_BIAS),
    "glm4_moe": ArchFacts(sigmoid_grouped(), _DSV3_BIAS),
    "dots1": ArchFacts(sigmoid_grouped(), _DSV3_BIAS),
    # DeepSeek-V2
    "deepseek_v2": ArchFacts(softmax_group_greedy()),
    # Ernie
    "ernie4_5_moe": ArchFacts(softmax_statics(), ("gate.moe_statics.e_score_correction_bias",)),
}

# Types that exist in transformers but cannot be pruned exactly, with the reason (docs table too).
UNSUPPORTED: dict[str, str] = {}


def facts_for(model_type: str) -> ArchFacts:
    if model_type in UNSUPPORTED:
        raise UserError(
            f"MoE type '{model_type}' is not supported: {UNSUPPORTED[model_type]}",
            "see docs/architectures.md for the supported types",
        )
    if model_type not in ARCH_TABLE:
        raise UserError(
            f"model type '{model_type}' is not a supported MoE architecture",
            "see docs/architectures.md for the supported types",
        )
    return ARCH_TABLE[model_type]
