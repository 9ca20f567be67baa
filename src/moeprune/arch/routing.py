"""Router semantics as data, and one function that applies them.

Every supported router is described by a :class:`RoutingSpec`: how logits become scores, which
score selects experts, how groups limit the choice, and how the selected scores become the gate
weights the model really multiplies expert outputs by. :func:`route` reimplements the routers of
transformers from the spec, and can additionally forbid experts (the *mask* semantics used as the
reference for pruning: a removed expert can never be selected and, for softmax routers, leaves the
softmax denominator, exactly as if its logit were -inf).

The architecture tests check `route(spec, logits)` against each router's own outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# the spec lives in a torch-free module (.spec says why); re-exported here, where it always was
from .spec import (  # noqa: F401
    SPARSEMIXER_TOP_K,
    ExtraRole,
    GroupScore,
    Routing,
    RoutingSpec,
    ScoreFn,
    Selector,
    WeightFrom,
    WeightScale,
    top_k_problem,
)


def route(
    spec: RoutingSpec,
    logits: torch.Tensor,
    selection_bias: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    top_k: int | None = None,
    weight_scale: torch.Tensor | None = None,
) -> Routing:
    """Route tokens from router logits exactly as the architecture does.

    ``allowed`` (bool [E]) forbids experts: the pruning reference semantics. ``top_k`` overrides the
    number of active experts (used when a plan lowers it explicitly). ``logits`` hold the router's
    ``spec.extra_columns`` non-prunable columns last; ``allowed`` may leave them out (they are
    always allowed). ``weight_scale``: the tensor ``spec.weight_scale`` names.
    """
    k = top_k or spec.top_k
    why = top_k_problem(spec, k)
    if why is not None:
        raise ValueError(why)
    logits = logits.float()
    if allowed is not None and spec.extra_columns and allowed.shape[-1] == logits.shape[-1] - spec.extra_columns:
        extra = torch.ones(spec.extra_columns, dtype=torch.bool, device=allowed.device)
        allowed = torch.cat((allowed.to(torch.bool), extra))
    if spec.extra_role == "sink":
        from .extended import route_with_sinks

        return route_with_sinks(spec, logits, selection_bias, allowed, k, weight_scale)
    forbidden = None
    if allowed is not None:
        allowed = allowed.to(device=logits.device, dtype=torch.bool)
        if int(allowed.sum()) < k:
            raise ValueError(f"only {int(allowed.sum())} experts allowed but top-k is {k}")
        forbidden = ~allowed  # (once: every forward of a masked evaluation comes here)
        # -inf logits: softmax renormalises over the kept experts; sigmoid gives 0 for removed ones.
        logits = logits.masked_fill(forbidden, float("-inf"))

    if spec.selector == "sparsemixer":
        index, weights = sparsemixer(logits, spec.jitter_eps)
        return Routing(probs=torch.softmax(logits, dim=-1), top_k_index=index, top_k_weights=weights)

    probs = scores(spec.score_fn, logits)
    choice = logits if spec.selection_on_logits else probs
    if spec.has_selection_bias and selection_bias is not None:
        choice = choice + selection_bias.float().reshape(1, -1)
    if forbidden is not None and choice is not logits:  # (logits are masked already)
        choice = choice.masked_fill(forbidden, float("-inf"))

    if spec.group_limited:
        choice = _limit_to_groups(spec, choice)
        if forbidden is not None and spec.group_fill != float("-inf"):
            choice = choice.masked_fill(forbidden, float("-inf"))  # a 0.0 group fill must not revive one

    chosen = torch.topk(choice, k, dim=-1).indices
    if spec.weight_from == "softmax_topk":
        weights = torch.softmax(logits.gather(-1, chosen), dim=-1)
    else:
        weights = probs.gather(-1, chosen)
    if spec.renorm_p is not None:
        weights = weights / torch.norm(weights, p=spec.renorm_p, dim=-1, keepdim=True)
    if spec.renormalize:
        denom = weights.sum(dim=-1, keepdim=True)
        if spec.renorm_min is not None:
            denom = denom.clamp(min=spec.renorm_min)
        weights = weights / (denom + spec.renorm_eps)
    if spec.scaling != 1.0:
        weights = weights * spec.scaling
    if spec.weight_scale and weight_scale is not None:
        from .extended import apply_weight_scale

        weights = apply_weight_scale(spec, weights, chosen, weight_scale)
    return Routing(probs=probs, top_k_index=chosen, top_k_weights=weights)


def kept_view_problem(spec: RoutingSpec, allowed: torch.Tensor, top_k: int | None = None) -> str | None:
    """Why routing over the ``allowed`` experts alone (:func:`route_kept`) would not be exactly
    :func:`route` with the others forbidden (None: it is).

    Forbidden experts hold -inf from the logits on: they score 0 (sigmoid, softplus) or add exp(-inf)
    = 0 to a softmax, are never selected, and a group's max or top-2 sum is that of its allowed
    experts. Routing the allowed columns alone, in their order, computes the same values (a softmax
    sums its exponentials over fewer zeros: equal up to the order of a float sum) and selects the
    same experts, provided the groups stay the same groups: every group keeps the same number of
    experts (the pruned checkpoint's groups), at least two where a group scores by its top two, and
    the chosen groups hold all top-k. Dropped groups filled with 0.0 (AXK-2) are left to the mask:
    their many equal scores make top-k a tie that the two layouts need not break alike."""
    k = top_k or spec.top_k
    if spec.selector != "topk":
        return "the sparsemixer selector"
    if spec.extra_columns or spec.weight_scale:
        return "router columns or weight scales beyond the E experts"
    e = allowed.shape[-1]
    n_kept = int(allowed.sum())
    if n_kept < k:
        return f"only {n_kept} experts allowed but top-k is {k}"
    if spec.group_limited:
        if spec.group_fill != float("-inf"):
            return "dropped groups are filled with a finite score"
        if e % spec.n_group:
            return f"{e} experts do not split into {spec.n_group} groups"
        counts = set(allowed.to(torch.bool).view(spec.n_group, -1).sum(dim=-1).tolist())
        if len(counts) != 1:
            return "the groups keep different numbers of experts"
        per = counts.pop()
        if spec.group_score == "top2_sum" and per < 2:
            return "a group keeps fewer than the two experts it is scored by"
        if spec.topk_group * per < k:
            return "the chosen groups keep fewer than top-k experts"
    return None


@dataclass(frozen=True)
class KeptView:
    """The allowed experts of a mask as a router of their own: the pruned checkpoint's router.

    ``kept``: their ids, ascending (a pruned checkpoint keeps this order, so groups stay contiguous);
    ``selection_bias``: their entries of the selection bias (None: the router has none)."""

    kept: torch.Tensor  # int64 [K]
    selection_bias: torch.Tensor | None  # [K]


def kept_view(allowed: torch.Tensor, selection_bias: torch.Tensor | None, device: torch.device) -> KeptView:
    """The view of the experts ``allowed`` (bool [E]) leaves, its ids on ``device`` (the logits')."""
    kept = allowed.to(torch.bool).nonzero().flatten()
    bias = None if selection_bias is None else selection_bias.detach()[kept.to(selection_bias.device)]
    return KeptView(kept=kept.to(device), selection_bias=bias)


def route_kept(spec: RoutingSpec, logits: torch.Tensor, view: KeptView, top_k: int | None = None) -> Routing:
    """:func:`route` over the kept experts' logits [T, K] alone, ids mapped back to the E experts:
    the same routing as ``route(spec, all_logits, bias, allowed)`` where :func:`kept_view_problem`
    finds none, at the pruned router's cost (no mask, K columns). ``probs`` are the kept columns'."""
    r = route(spec, logits, view.selection_bias, top_k=top_k)
    index = torch.take(view.kept, r.top_k_index)  # (one op: cheaper per forward than kept[index])
    return Routing(probs=r.probs, top_k_index=index, top_k_weights=r.top_k_weights)


def scores(score_fn: ScoreFn, logits: torch.Tensor) -> torch.Tensor:
    """Router probabilities p_t from logits [T, E] (a removed expert's -inf logit scores 0)."""
    if score_fn == "softmax":
        return torch.softmax(logits, dim=-1)
    if score_fn == "sigmoid":
        return torch.sigmoid(logits)
    if score_fn == "sqrtsoftplus":  # DeepSeek-V4
        return torch.nn.functional.softplus(logits).sqrt()
    return logits


def _limit_to_groups(spec: RoutingSpec, choice: torch.Tensor) -> torch.Tensor:
    """Mask out experts outside the ``topk_group`` best groups (DeepSeek group-limited routing).

    With forbidden experts, a group's score is computed over its allowed experts only: that is what
    the pruned model computes, since its groups contain only the kept experts.
    """
    t, e = choice.shape
    per_group = e // spec.n_group
    grouped = choice.view(t, spec.n_group, per_group)
    if spec.group_score == "top2_sum":
        # Removed experts hold -inf; a group keeping a single expert cannot form a top-2 sum.
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values
    best = torch.topk(group_scores, spec.topk_group, dim=-1).indices
    dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
    # (the [T, G, 1] mask broadcasts over each group: no expanded copy, no negation, per forward)
    return grouped.masked_fill(dropped.unsqueeze(-1), spec.group_fill).reshape(t, e)


def sparsemixer(logits: torch.Tensor, jitter_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PhiMoE's sparsemixer as the model runs it at inference (transformers ``sparsemixer`` with
    ``training=False``): expert 1 is the argmax; its weight is the softmax, taken at expert 1, over
    the logits that lie within a relative distance ``2 * jitter_eps`` of the max (the others are
    set to -inf); expert 2 is the argmax once expert 1 is set to -inf, weighted the same way
    relative to the second max. Returns (index [T, 2], weights [T, 2]).

    Removed experts carry -inf logits: they are never an argmax, and their threshold test
    ((max - -inf) / inf = nan) is false, so they stay -inf and add 0 to every softmax, exactly as
    if their router rows were gone."""
    first, w1 = _sparsemixer_pick(logits, logits, jitter_eps)
    rest = torch.scatter(logits, -1, first, float("-inf"))
    second, w2 = _sparsemixer_pick(rest, logits, jitter_eps)
    return torch.cat((first, second), dim=-1), torch.cat((w1, w2), dim=-1)


def _sparsemixer_pick(
    candidates: torch.Tensor, logits: torch.Tensor, jitter_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    top, index = candidates.max(dim=-1, keepdim=True)
    factor = logits.abs().clamp(min=top)
    far = ((top - logits) / factor) > (2 * jitter_eps)
    gates = torch.softmax(candidates.masked_fill(far, float("-inf")), dim=-1)
    return index, gates.gather(-1, index)
