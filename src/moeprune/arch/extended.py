"""Routers whose columns are not all prunable experts, or whose output is not plain logits.

Four families that the generic table cannot describe on its own (transformers 5.25):

- **Gemma-4** (``gemma4``, ``gemma4_text``): the router returns *probabilities* (softmax over E)
  in slot 0, renormalises the chosen k and multiplies each by a learned ``per_expert_scale`` [E].
  There is no MoE block: router and experts hang off the decoder layer beside a dense MLP; the
  router reads the residual stream, the experts its ``pre_feedforward_layernorm_2``. The logits
  moeprune records are the router's own pre-softmax scores (recomputed from its ``proj`` exactly
  as its forward does). Removal = the removed experts are never chosen: since the chosen k are
  renormalised, masking before top-k and slicing ``proj`` rows and ``per_expert_scale`` agree.
- **Longcat-Flash** (``longcat_flash``): the router has E + Z rows; the last Z are identity
  ("zero") experts (their output is the token itself). Softmax over all E + Z, selection on
  p + ``e_score_correction_bias`` [E + Z], weights = unnormalised p times the scaling factor.
  Only the E real experts are prunable; the zero experts keep their router rows and bias and stay
  last. A plan cannot remove zero experts: they hold no weights to save, and the config has one
  ``zero_expert_num`` for every layer (a per-layer choice could not be stored); a removed real
  expert's logit at -inf is exactly a router without its row.
- **Inkling** (``inkling_text``): the router has E + S rows, the last S scoring the shared
  experts. Only the E routed ones are selected (sigmoid + correction bias [E]), but the shared
  experts act as a sink: weights = sigmoid(s_i) / (sum over the chosen and the S shared sigmoids),
  times ``route_scale`` and a learned ``global_scale`` [1]; the shared experts get their share as
  ``shared_gammas``. The shared rows stay, last.

- **ZAYA** (``zaya``): the router is an MLP (``down_proj``, then ``router_mlp``: RMSNorm, fc1,
  fc2, ``out_proj``) over E + 1 classes, the last one "skip". Softmax over all E + 1, selection
  on p + ``balancing_biases`` [E + 1] (top-1), weight = unnormalised p; a chosen skip gets weight
  0 and index 0 from the router itself (so moeprune recomputes which slots are skips). Only
  ``out_proj.weight`` and ``balancing_biases`` have an expert axis; the skip row stays, last. The
  state the router hands to the next layer's router is ``down_proj(x)`` (+ the previous state),
  taken *before* the MLP, so it does not depend on any expert row: a removed expert's logit at
  -inf is exactly a router without its row, in this layer and downstream, provided it is also
  barred from selection (its p is 0, but p + its balancing bias could still be the top-1).

Statistics: profiles cover the E prunable experts only. Zero-expert selections are not counted
(their slots reach the observers with index -1 and weight 0, like an expert-parallel sentinel);
probabilities are computed over all router columns (Longcat's softmax includes its zero experts)
and then restricted to the E routed columns; PreMoe candidates are the routed columns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .spec import Routing, RoutingSpec

if TYPE_CHECKING:  # torch only where a tensor is computed: .table imports this module (.spec says why)
    import torch
    from torch import nn

    from .table import ArchFacts


@dataclass(frozen=True)
class RouterAdapter:
    """How to read and write a router whose output is not ``(logits [T, E], weights, index)``.

    ``extra``: the router's non-prunable columns (after the E experts), from the config;
    ``logits``: the router's full pre-score logits [T, E + extra] from (router, its input, its
    output); ``output``: the router's output tuple for a :class:`Routing` (and the original
    output, for the slots it passes through); ``weight_scale``: path (relative to the block) of the
    learned tensor ``RoutingSpec.weight_scale`` names; ``expert_tensors``: the router's tensors
    (relative to the router) with an expert axis (0), where shapes alone cannot tell (ZAYA's MLP
    router has hidden widths that may equal E or E + 1); None: found by shape.
    """

    extra: Callable[[Any], int] = lambda config: 0
    logits: Callable[[nn.Module, torch.Tensor, Any], torch.Tensor] | None = None
    output: Callable[[tuple, Routing, torch.Tensor], tuple] | None = None
    weight_scale: str | None = None
    expert_tensors: tuple[str, ...] | None = None
    # transformers' from_pretrained runs the model's _init_weights on this router after loading,
    # and it writes over a loaded tensor (ZAYA: balancing_biases[-1] = -1, unguarded): a
    # layer-by-layer load must do the same to run the router the stock class runs
    init_after_load: bool = False


def init_routers_after_load(model: nn.Module, routers: list[nn.Module]) -> None:
    """What from_pretrained does to these routers after loading them: ``_init_weights`` with
    every loaded tensor flagged initialised (transformers' init functions skip those), so only
    its unguarded writes land."""
    for router in routers:
        for t in list(router.parameters(recurse=False)) + list(router.buffers(recurse=False)):
            t._is_hf_initialized = True
        router._is_hf_initialized = False
        import torch

        with torch.no_grad():
            model._init_weights(router)


# --- routing semantics ---------------------------------------------------------------------------


def apply_weight_scale(
    spec: RoutingSpec, weights: torch.Tensor, chosen: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Multiply the chosen weights by a learned scale: per expert [E] (Gemma-4) or global [1]."""
    if spec.weight_scale == "per_expert":
        return weights * scale.to(weights.device)[chosen]
    return weights * scale.to(weights.device).float()


def route_with_sinks(
    spec: RoutingSpec,
    logits: torch.Tensor,
    selection_bias: torch.Tensor | None,
    allowed: torch.Tensor | None,
    k: int,
    weight_scale: torch.Tensor | None,
) -> Routing:
    """Inkling: selection among the E routed columns (sigmoid + bias); the chosen k and the S sink
    columns share one normalisation of their sigmoids (written as transformers writes it: a
    softmax over log-sigmoids); sink weights in ``extra_weights``."""
    import torch
    import torch.nn.functional as F

    e = logits.shape[-1] - spec.extra_columns
    routed, sink = logits[:, :e], logits[:, e:]
    if allowed is not None:
        if int(allowed[:e].sum()) < k:
            raise ValueError(f"only {int(allowed[:e].sum())} experts allowed but top-k is {k}")
        routed = routed.masked_fill(~allowed[:e].to(routed.device), float("-inf"))
    probs = torch.sigmoid(torch.cat((routed, sink), dim=-1))
    choice = probs[:, :e]
    if spec.has_selection_bias and selection_bias is not None:
        choice = choice + selection_bias.float().reshape(1, -1).to(choice.device)
    if allowed is not None:
        choice = choice.masked_fill(~allowed[:e].to(choice.device), float("-inf"))
    chosen = torch.topk(choice, k, dim=-1).indices
    log_p = F.logsigmoid(torch.cat((routed.gather(-1, chosen), sink), dim=-1))
    weights = torch.exp(log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)) * spec.scaling
    if spec.weight_scale == "global" and weight_scale is not None:
        weights = weights * weight_scale.to(weights.device).float()
    return Routing(probs=probs, top_k_index=chosen, top_k_weights=weights[:, :k], extra_weights=weights[:, k:])


# --- the three families ----------------------------------------------------------------------------


def _gemma4_logits(router: nn.Module, hidden: torch.Tensor, out: Any) -> torch.Tensor:
    x = router.norm(hidden.reshape(-1, hidden.shape[-1]))
    return router.proj(x * router.scale * router.scalar_root_size)  # what Gemma4TextRouter computes


def _gemma4_output(out: tuple, r: Routing, logits: torch.Tensor) -> tuple:
    return (r.probs, r.top_k_weights, r.top_k_index)


def _inkling_logits(router: nn.Module, hidden: torch.Tensor, out: Any) -> torch.Tensor:
    import torch.nn.functional as F

    return F.linear(hidden.reshape(-1, router.hidden_dim).float(), router.weight.float())


def _inkling_output(out: tuple, r: Routing, logits: torch.Tensor) -> tuple:
    e = logits.shape[-1] - (r.extra_weights.shape[-1] if r.extra_weights is not None else 0)
    dtype = out[1].dtype
    return (logits[:, :e], r.top_k_weights.to(dtype), r.top_k_index, r.extra_weights.to(dtype).contiguous())


def _zaya_output(out: tuple, r: Routing, logits: torch.Tensor) -> tuple:
    # as ZayaRouter hands a chosen skip class on: index 0 with weight 0; its state passes through
    e = logits.shape[-1] - 1
    skip = r.top_k_index >= e
    weights = r.top_k_weights.masked_fill(skip, 0).to(out[1].dtype)
    return (out[0], weights, r.top_k_index.masked_fill(skip, 0).to(out[2].dtype), *out[3:])


GEMMA4 = RouterAdapter(logits=_gemma4_logits, output=_gemma4_output, weight_scale="router.per_expert_scale")
LONGCAT = RouterAdapter(extra=lambda config: int(getattr(config, "zero_expert_num", 0) or 0))
INKLING = RouterAdapter(
    extra=lambda config: int(getattr(config, "n_shared_experts", 0) or 0),
    logits=_inkling_logits,
    output=_inkling_output,
    weight_scale="gate.global_scale",
)

ZAYA = RouterAdapter(
    extra=lambda config: 1,  # the skip class
    output=_zaya_output,
    expert_tensors=("router_mlp.out_proj.weight", "balancing_biases"),
    init_after_load=True,
)


def _gemma4_spec(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(config.top_k_experts), score_fn="softmax", renormalize=True, weight_scale="per_expert"
    )


def _longcat_spec(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        score_fn="softmax",
        has_selection_bias=True,
        scaling=float(router.routed_scaling_factor),
        extra_columns=LONGCAT.extra(config),
        extra_role="zero",
    )


def _inkling_spec(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        score_fn="sigmoid",
        has_selection_bias=True,
        renormalize=True,
        scaling=float(router.route_scale),
        extra_columns=INKLING.extra(config),
        extra_role="sink",
        weight_scale="global",
    )


def _zaya_spec(router: nn.Module, block: nn.Module, config: Any) -> RoutingSpec:
    return RoutingSpec(
        top_k=int(router.top_k),
        score_fn="softmax",
        has_selection_bias=True,
        extra_columns=ZAYA.extra(config),
        extra_role="skip",
    )


def extended_facts() -> dict[str, ArchFacts]:
    """The table entries of this module's types (merged into ``ARCH_TABLE``)."""
    from .table import ArchFacts

    gemma4 = ArchFacts(
        _gemma4_spec,
        router_name="router",
        prenorm_name="pre_feedforward_layernorm_2",  # its input is the residual h_t
        family="router returns softmax probabilities -> top-k, renormalised, x learned per-expert scale (Gemma-4)",
        adapter=GEMMA4,
    )
    return {
        "gemma4": gemma4,
        "gemma4_text": gemma4,
        "longcat_flash": ArchFacts(
            _longcat_spec,
            ("router.e_score_correction_bias",),
            router_name="router",
            prenorm_name="post_attention_layernorm.0",  # the first of its two sublayers' norms
            family="softmax over E routed + Z identity (zero) experts + correction bias, top-k, scaled "
            "(Longcat-Flash; zero experts kept)",
            adapter=LONGCAT,
        ),
        "inkling_text": ArchFacts(
            _inkling_spec,
            ("gate.e_score_correction_bias",),
            router_name="gate",
            family="sigmoid + correction bias, top-k; weights normalised with the shared experts' "
            "sigmoids, scaled (Inkling; shared rows kept)",
            adapter=INKLING,
        ),
        "zaya": ArchFacts(
            _zaya_spec,
            ("gate.balancing_biases",),
            router_name="gate",
            family="MLP router: softmax over E experts + a skip class + balancing bias, top-1, "
            "unnormalised (ZAYA; skip row kept)",
            adapter=ZAYA,
        ),
    }
