"""The one table of per-model facts that structure alone cannot tell.

Everything else (which layers are MoE, where the router and experts are, how experts are stored)
is read off the modules. Here: each model type's routing family and its options, where the
selection bias lives, which norm precedes the block, and the config names of its counts.
Families read their numbers (top-k, groups, scaling, renormalisation) from the router module's own
attributes first, then from the config, so a checkpoint's settings are always the ones used.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from .extended import RouterAdapter, extended_facts
from .spec import SPARSEMIXER_TOP_K, RoutingSpec

if TYPE_CHECKING:  # the table is read without torch by the header-planned rewrite (.spec says why)
    from torch import nn

SpecBuilder = Callable[["nn.Module", "nn.Module", Any], RoutingSpec]

# Config attribute names, most common first (shared/transformers-moe.md, "Config names for counts").
EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_ATTRS = (
    "num_experts_per_tok",
    "moe_topk",
    "moe_k",
    "top_k_experts",
    "num_experts_per_token",
    "moe_top_k",  # DBRX (in its ffn_config)
)
# Sub-configs that hold the counts instead of the (text) config itself, by model type.
NESTED_COUNT_CONFIGS: dict[str, tuple[str, ...]] = {"dbrx": ("ffn_config",)}
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
# Each builder returns a SpecBuilder; the builders read the numbers off the live router/block/config.


def softmax_topk(default_renorm: bool | None = None) -> SpecBuilder:
    """softmax over E, top-k, renormalised iff ``norm_topk_prob`` (or always / never when fixed)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        renorm = default_renorm
        if renorm is None:
            renorm = bool(_first_attr((router, block, config), ("norm_topk_prob",), False))
        return RoutingSpec(top_k=_top_k(router, block, config), score_fn="softmax", renormalize=renorm)

    return build


def topk_softmax() -> SpecBuilder:
    """top-k on the logits, then softmax over the chosen k (gpt-oss, Granite-MoE, Aria)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(
            top_k=_top_k(router, block, config), score_fn="softmax", weight_from="softmax_topk"
        )

    return build


def cohere2() -> SpecBuilder:
    """Cohere2-MoE: top-k on logits, then softmax over the k, or sigmoid (renormalised iff
    ``norm_topk_prob``); the block averages routed and shared outputs (x0.5) by default."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        k = _top_k(router, block, config)
        halve = getattr(config, "shared_expert_combination_strategy", "average") == "average" and bool(
            getattr(block, "shared_experts", None) is not None
        )
        scale = {"scaling": 0.5, "scaling_site": "block"} if halve else {}
        if getattr(router, "expert_selection_fn", "softmax") == "sigmoid":
            return RoutingSpec(
                top_k=k,
                score_fn="sigmoid",
                renormalize=bool(getattr(router, "norm_topk_prob", False)),
                **scale,
            )
        return RoutingSpec(top_k=k, score_fn="softmax", weight_from="softmax_topk", **scale)

    return build


def sigmoid_biased(
    *,
    groups: bool = True,
    renorm: bool | None = None,
    renorm_eps: float = 1e-20,
    scaling_attrs: tuple[str, ...] = ("routed_scaling_factor",),
    scaling_site: str = "router",
    group_fill: float = float("-inf"),
    on_logits: bool = False,
) -> SpecBuilder:
    """DeepSeek-V3 family and its relatives: sigmoid scores, selection on score + correction bias
    (or on logits + bias), optional group-limited top-k (group score = sum of the group's top 2),
    weights = unbiased sigmoids, renormalised (iff ``norm_topk_prob`` unless fixed), times a
    routed scaling factor applied by the router or by the block."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        n_group = int(_first_attr(objs, ("num_group", "n_group"), 1) or 1) if groups else 1
        topk_group = int(_first_attr(objs, ("topk_group",), n_group) or n_group) if groups else 1
        do_renorm = renorm if renorm is not None else bool(_first_attr(objs, ("norm_topk_prob",), True))
        scaling = float(_first_attr(objs, scaling_attrs, 1.0) or 1.0) if scaling_attrs else 1.0
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="sigmoid",
            has_selection_bias=True,
            selection_on_logits=on_logits,
            n_group=n_group,
            topk_group=topk_group,
            group_score="top2_sum",
            group_fill=group_fill,
            renormalize=do_renorm,
            renorm_eps=renorm_eps if do_renorm else 0.0,
            scaling=scaling,
            scaling_site=scaling_site,  # type: ignore[arg-type]
        )

    return build


def sigmoid_topk() -> SpecBuilder:
    """Flint: top-k of sigmoid scores, no bias, renormalised iff ``norm_topk_prob``."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        renorm = bool(_first_attr((router, block, config), ("norm_topk_prob",), False))
        return RoutingSpec(top_k=_top_k(router, block, config), score_fn="sigmoid", renormalize=renorm)

    return build


def lfm2() -> SpecBuilder:
    """LFM2-MoE: sigmoid; selection on score + ``expert_bias`` when ``use_expert_bias``;
    renormalised (+1e-6) iff ``norm_topk_prob``; times ``routed_scaling_factor`` in the router."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        renorm = bool(_first_attr(objs, ("norm_topk_prob",), False))
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="sigmoid",
            has_selection_bias=bool(getattr(config, "use_expert_bias", False)),
            renormalize=renorm,
            renorm_eps=1e-6 if renorm else 0.0,
            scaling=float(_first_attr(objs, ("routed_scaling_factor",), 1.0) or 1.0),
        )

    return build


def softmax_group_greedy() -> SpecBuilder:
    """DeepSeek-V2: softmax, greedy or group-limited greedy (group score = max, dropped groups
    filled with 0.0), never renormalised, times ``routed_scaling_factor``."""

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
            group_fill=0.0,
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


def softmax_topk_pnorm() -> SpecBuilder:
    """DBRX: softmax over E, top-k, divided by the p-norm of the chosen weights
    (``moe_normalize_expert_weights``; None: not normalised)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        p = getattr(block, "moe_normalize_expert_weights", None)
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="softmax",
            renorm_p=float(p) if p is not None else None,
        )

    return build


def sparsemixer_top2() -> SpecBuilder:
    """PhiMoE: the inference-time sparsemixer (routing.sparsemixer): always two experts, each
    weighted by a softmax over the logits near its own max (threshold ``router_jitter_noise``)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        eps = _first_attr((router, config), ("router_jitter_noise",), 0.0)
        return RoutingSpec(
            top_k=SPARSEMIXER_TOP_K, score_fn="softmax", selector="sparsemixer", jitter_eps=float(eps)
        )

    return build


def softmax_group_top2() -> SpecBuilder:
    """Mistral-Large-4: softmax over E; group-limited top-k (group score = sum of the group's top
    two probabilities, dropped groups filled with 0.0); renormalised (+1e-20); scaled."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        objs = (router, block, config)
        n_group = int(_first_attr(objs, ("num_group", "n_group"), 1) or 1)
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="softmax",
            n_group=n_group,
            topk_group=int(_first_attr(objs, ("topk_group",), n_group) or n_group),
            group_score="top2_sum",
            group_fill=0.0,
            renormalize=True,
            renorm_eps=1e-20,
            scaling=float(_first_attr(objs, ("routed_scaling_factor",), 1.0) or 1.0),
        )

    return build


def sigmoid_input_gate() -> SpecBuilder:
    """Llama-4: top-k on the logits, each chosen expert's *input* scaled by sigmoid(logit), never
    renormalised (:mod:`.llama4`)."""

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        return RoutingSpec(
            top_k=_top_k(router, block, config),
            score_fn="sigmoid",
            selection_on_logits=True,  # sigmoid saturates to equal 1.0s; the model ranks logits
            gate_site="input",
        )

    return build


def deepseek_v4() -> SpecBuilder:
    """DeepSeek-V4 learned-router layers: ``scoring_func`` scores (sqrt(softplus) by default),
    selection on score + correction bias, no groups, always renormalised (+1e-20), scaled. Its
    hash-routed layers are no prunable blocks (arch/variants.py)."""
    base = sigmoid_biased(groups=False, renorm=True)

    def build(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
        fn = getattr(config, "scoring_func", "sqrtsoftplus")
        if fn not in ("sigmoid", "softmax", "sqrtsoftplus"):
            raise UserError(
                f"DeepSeek-V4 scoring_func '{fn}' is not one moeprune reproduces",
                "supported: sqrtsoftplus, sigmoid, softmax",
            )
        return replace(base(router, block, config), score_fn=fn)

    return build


# --- the table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArchFacts:
    spec: SpecBuilder
    selection_bias_names: tuple[str, ...] = ()  # paths relative to the block
    router_name: str | None = None  # default: found by structure
    # Norm whose input is the residual h_t entering the block; None: the block input is used
    # (post-norm layers, where the residual stream itself feeds the MoE).
    prenorm_name: str | None = "post_attention_layernorm"
    family: str = ""
    # Block method that turns the router's logits into (weights, index), for routers that return
    # logits only (DBRX's ``route_tokens_to_experts``): what patch_moe steers instead of the router.
    route_method: str | None = None
    # Routers whose columns are not all prunable experts or whose output is not plain logits
    # (Gemma-4, Longcat-Flash, Inkling): see :mod:`.extended`.
    adapter: RouterAdapter | None = None
    # Linear map (no bias) from the experts' output space to the residual stream, applied by the
    # block to the experts' weighted sum (Muse-Spark's ``post_expert_proj``: its experts run in a
    # projected space). Observers see each expert's output mapped through it: being linear, the
    # mapped outputs' gated sum is the block's output, as for every other family.
    expert_out_proj: str | None = None
    # The router's logits [T, E] from its input alone, computed exactly as its own forward does,
    # for routers whose forward is "logits, then routing, returned as (logits, weights, index)": a
    # masked evaluation replaces the routing, so it need not run (docs/benchmarks.md, compare rows).
    # None: the router's own forward runs and its routing is recomputed. Called as
    # ``logits_only(router, hidden, rows)``: ``rows`` (None: all) are rows of the router's weight
    # (MoEBlock.router_weight_path), the kept experts' for a mask (routing.route_kept). Only for
    # routers that return their weights in the logits' dtype (not Mixtral's: float32 weights of
    # bf16 logits); tests/test_arch.py checks each entry against the router's own forward.
    logits_only: Callable[[nn.Module, Any, Any], Any] | None = None


def float32_linear_logits(router: nn.Module, hidden: Any, rows: Any = None) -> Any:
    """``F.linear(h.float(), W.float())``: DeepSeek-V3's ``TopkRouter`` forward, up to its routing
    (``rows``: some rows of W, as a pruned checkpoint's router holds them)."""
    import torch.nn.functional as F

    w = router.weight if rows is None else rows
    return F.linear(hidden.view(-1, w.shape[-1]).float(), w.float())


def linear_logits(router: nn.Module, hidden: Any, rows: Any = None) -> Any:
    """``F.linear(h, W)`` in the model's dtype: the ``TopKRouter`` forward of Qwen2/3-MoE, OLMoE and
    their copies, up to its routing (softmax in float32, top-k, weights back in the logits' dtype)."""
    import torch.nn.functional as F

    w = router.weight if rows is None else rows
    return F.linear(hidden.reshape(-1, w.shape[-1]), w)


_ROUTER_BIAS = ("gate.e_score_correction_bias", "router.e_score_correction_bias")
_BLOCK_BIAS = ("e_score_correction_bias",)

_A = ArchFacts(softmax_topk(), family="softmax -> top-k, renormalised iff norm_topk_prob")
_A_LOGITS = replace(_A, logits_only=linear_logits)  # routers of Qwen3-MoE's code
_A_RENORM = ArchFacts(softmax_topk(default_renorm=True), family="softmax -> top-k, renormalised")
_B = ArchFacts(topk_softmax(), family="top-k logits -> softmax over k")
_C = ArchFacts(
    sigmoid_biased(),
    _ROUTER_BIAS,
    family="sigmoid + correction bias, group-limited top-k, scaled (DeepSeek-V3)",
)
_C_LOGITS = replace(_C, logits_only=float32_linear_logits)  # routers of DeepSeek-V3's code

ARCH_TABLE: dict[str, ArchFacts] = {
    # A. softmax over E -> top-k, renormalise iff norm_topk_prob
    "qwen2_moe": _A_LOGITS,
    "qwen3_moe": _A_LOGITS,
    "qwen3_next": _A_LOGITS,
    "qwen4_exp": replace(_A_LOGITS, prenorm_name=None),  # hyper-connection residual: no single h_t
    "qwen4_exp_text": replace(_A_LOGITS, prenorm_name=None),
    "olmoe": _A_LOGITS,
    "flex_olmo": replace(_A_LOGITS, prenorm_name=None),  # post-norm: no norm before the MoE
    "mellum": _A_LOGITS,
    "lara_mini": _A,
    # A'. always renormalised
    "mixtral": _A_RENORM,
    "minimax": replace(_A_RENORM, prenorm_name=None),  # post-norm: the residual is the normed state
    "qwen3_5_moe": replace(_A_RENORM, logits_only=linear_logits),
    "qwen3_5_moe_text": replace(_A_RENORM, logits_only=linear_logits),
    "hunyuan_v1_moe": replace(_A_RENORM, router_name="gate"),
    # A''. never renormalised
    "jamba": ArchFacts(
        softmax_topk(default_renorm=False), prenorm_name="pre_ff_layernorm", family="softmax -> top-k"
    ),
    # B. top-k over logits -> softmax over the k
    "gpt_oss": _B,
    "aria_text": _B,
    "granitemoe": _B,
    "granitemoe_swa": _B,
    "granitemoehybrid": _B,
    "granitemoeshared": _B,
    "cohere2_moe": ArchFacts(
        cohere2(), prenorm_name="input_layernorm", family="top-k logits -> softmax/sigmoid"
    ),
    # C. DeepSeek-V3 family
    "deepseek_v3": _C_LOGITS,
    "deepseek_v32": _C_LOGITS,
    "axk1": _C_LOGITS,
    "bailing_hybrid": _C_LOGITS,
    "dots1": _C_LOGITS,
    "dots3_note": _C_LOGITS,
    "dots3_note_text": _C_LOGITS,
    "exaone_moe": _C_LOGITS,
    "glm4_moe": _C_LOGITS,
    "glm4_moe_lite": _C_LOGITS,
    "glm_moe_dsa": _C_LOGITS,
    "hy_v4": replace(_C_LOGITS, prenorm_name=None),  # hyper-connections around the block
    "kimi_linear": _C_LOGITS,
    "mimo_v2_flash": _C_LOGITS,
    "nemotron_h": replace(_C_LOGITS, prenorm_name="norm"),
    "solar_open": _C_LOGITS,
    "minicpm5_moe": _C,
    "axk2": replace(_C_LOGITS, spec=sigmoid_biased(group_fill=0.0)),
    "beam": replace(_C_LOGITS, spec=sigmoid_biased(scaling_site="block")),
    # DeepSeek-V4: hash-routed layers kept whole, learned-router layers pruned (arch/variants.py)
    "deepseek_v4": ArchFacts(
        deepseek_v4(),
        _ROUTER_BIAS,
        prenorm_name=None,  # hyper-connections around the block: no single h_t
        family="sqrt-softplus + correction bias, top-k, renormalised, scaled; hash layers kept whole",
    ),
    # E. sigmoid + bias, no groups, always renormalised
    "minimax_m2": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, renorm_eps=0.0, scaling_attrs=()),
        _BLOCK_BIAS,
        family="sigmoid + correction bias, top-k, renormalised",
    ),
    "minimax_m3_vl_text": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, renorm_eps=0.0, scaling_site="block"),
        _ROUTER_BIAS,
        family="sigmoid + correction bias, top-k, renormalised, scaled by the block",
    ),
    # Muse-Spark: the router multiplies its logits by output_multiplier itself (the logits it returns
    # are the scaled ones), renormalises with +1e-15, and its experts run between pre_expert_proj
    # (+ a norm) and post_expert_proj
    "muse_spark_text": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, renorm_eps=1e-15),
        _ROUTER_BIAS,
        prenorm_name="pre_feedforward_layernorm",
        family="sigmoid + correction bias, top-k, renormalised, scaled; experts in a projected space "
        "(Muse-Spark: pre_expert_proj -> experts -> post_expert_proj)",
        expert_out_proj="post_expert_proj",
    ),
    "hy_v3": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, scaling_attrs=("router_scaling_factor",)),
        _BLOCK_BIAS,
        family="sigmoid + correction bias, top-k, renormalised, scaled",
    ),
    "afmoe": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, scaling_attrs=("route_scale",)),
        ("expert_bias",),
        family="sigmoid + expert bias, top-k, renormalised, scaled",
    ),
    "laguna": ArchFacts(
        sigmoid_biased(
            groups=False,
            renorm=True,
            renorm_eps=0.0,
            scaling_attrs=("moe_routed_scaling_factor",),
            scaling_site="block",
        ),
        _ROUTER_BIAS,
        family="(soft-capped) sigmoid + correction bias, top-k, renormalised, scaled by the block",
    ),
    "inkling2_text": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, scaling_attrs=("route_scale", "routed_scaling_factor")),
        _ROUTER_BIAS,
        family="sigmoid + correction bias, top-k, renormalised, scaled",
    ),
    # Inkling2-Loop: Inkling2's router; its loop layers run one MoE block several times per token
    "inkling2_loop_text": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, scaling_attrs=("route_scale", "routed_scaling_factor")),
        _ROUTER_BIAS,
        family="sigmoid + correction bias, top-k, renormalised, scaled; looped layers",
    ),
    "lfm2_moe": ArchFacts(
        lfm2(), ("expert_bias",), prenorm_name="ffn_norm", family="sigmoid (+ expert bias), top-k"
    ),
    "kolibri1": ArchFacts(
        sigmoid_biased(groups=False, renorm=None, scaling_attrs=(), on_logits=True),
        _ROUTER_BIAS,
        family="top-k on logits + bias, sigmoid weights",
    ),
    "kolibri1_1": ArchFacts(
        sigmoid_biased(groups=False, renorm=None, scaling_attrs=(), on_logits=True),
        _ROUTER_BIAS,
        family="top-k on logits + bias, sigmoid weights",
    ),
    "flint": ArchFacts(sigmoid_topk(), family="sigmoid -> top-k"),
    # Ergo: per-expert post-norm sliced with the experts (arch/variants.py)
    "ergo": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, scaling_attrs=("routed_scaling_factor", "moe_routed_scaling_factor")),
        _ROUTER_BIAS,
        prenorm_name="pre_feedforward_layernorm",
        family="sigmoid + correction bias, top-k, renormalised, scaled; per-expert post-norm",
    ),
    # D. DeepSeek-V2
    "deepseek_v2": ArchFacts(
        softmax_group_greedy(), family="softmax, group-limited greedy, scaled (DeepSeek-V2)"
    ),
    # H. DBRX (2D row-blocked experts, arch/dbrx.py)
    "dbrx": ArchFacts(
        softmax_topk_pnorm(),
        prenorm_name="norm_attn_norm.norm_2",
        family="softmax -> top-k, divided by the p-norm of the chosen weights (DBRX)",
        route_method="route_tokens_to_experts",
    ),
    # J. PhiMoE
    "phimoe": ArchFacts(
        sparsemixer_top2(), family="sparsemixer: top-2, each weighted by a softmax near its max (PhiMoE)"
    ),
    # K. Llama-4: the gate scales the experts' input (arch/llama4.py)
    "llama4": ArchFacts(
        sigmoid_input_gate(), family="top-k logits -> sigmoid, scaling the expert's input (Llama-4)"
    ),
    "llama4_text": ArchFacts(
        sigmoid_input_gate(), family="top-k logits -> sigmoid, scaling the expert's input (Llama-4)"
    ),
    # Language models of multimodal wrappers only (arch/wrappers.py): not causal-LM types themselves
    "qwen3_vl_moe_text": _A_RENORM,
    "qwen3_omni_moe_text": _A,
    "glm4v_moe_text": _C,
    "glm5_next_text": _C,
    "hy_v4_vl_text": replace(_C, prenorm_name=None),  # hyper-connections around the block
    "mistral_large4_text": ArchFacts(
        softmax_group_top2(),
        family="softmax, group-limited (top-2 sum) top-k, renormalised, scaled (Mistral-Large-4)",
    ),
    "step3p5": ArchFacts(
        sigmoid_biased(groups=False, renorm=True, renorm_eps=0.0, scaling_site="block"),
        _ROUTER_BIAS,
        family="sigmoid + correction bias, top-k, renormalised, scaled by the block",
    ),
    "deepseek_ocr2_text": ArchFacts(
        softmax_group_greedy(), family="softmax, group-limited greedy, scaled (DeepSeek-V2)"
    ),
    "unlimited_ocr_text": ArchFacts(
        softmax_group_greedy(), family="softmax, group-limited greedy, scaled (DeepSeek-V2)"
    ),
    # G. Ernie-4.5
    "ernie4_5_moe": ArchFacts(
        softmax_statics(),
        ("gate.moe_statics.e_score_correction_bias",),
        family="softmax + statics bias, top-k, renormalised (Ernie-4.5)",
    ),
}

# Types that exist in transformers but that moeprune cannot prune exactly (yet), with the reason.
UNSUPPORTED: dict[str, str] = {
    "doge": "its experts are the cells of a sqrt(E) x sqrt(E) product-key grid whose ids the model "
    "computes (row * sqrt(E) + column), so no checkpoint can hold a chosen subset of them, and its "
    "router splits one token's key scores across tokens (view(2, T, -1)), so no per-token routing "
    "exists to score experts by",
    "jetmoe": "one num_local_experts sizes both its MLP experts and its attention experts (JetMoeMoA, "
    "own router), so no JetMoE checkpoint can hold fewer MLP experts than attention experts, and a "
    "profile of the MLP experts does not say which attention experts to remove",
}

ARCH_TABLE.update(extended_facts())  # Gemma-4, Longcat-Flash, Inkling, ZAYA (arch/extended.py)


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
