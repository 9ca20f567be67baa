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
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
    expert_mask = group_mask.unsqueeze(-1).expand(t, spec.n_group, per_group).reshape(t, e)
    return choice.masked_fill(~expert_mask, spec.group_fill)


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
