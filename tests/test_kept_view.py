"""Routing a mask over its kept experts alone (the pruned router's view) is the -inf mask exactly."""

from __future__ import annotations

import pytest
import torch

from moeprune.arch import BlockControl, find_moe_blocks, patch_moe
from moeprune.arch.routing import RoutingSpec, kept_view, kept_view_problem, route, route_kept
from moeprune.testing.tiny import tiny_model

E = 32
DEEPSEEK_V3 = RoutingSpec(
    top_k=4,
    score_fn="sigmoid",
    has_selection_bias=True,
    n_group=4,
    topk_group=2,
    group_score="top2_sum",
    renormalize=True,
    renorm_eps=1e-20,
    scaling=2.5,
)
SPECS = {
    "deepseek_v3": DEEPSEEK_V3,
    "deepseek_v3, groups scored by their max": RoutingSpec(
        top_k=4, score_fn="sigmoid", has_selection_bias=True, n_group=4, topk_group=2, group_score="max"
    ),
    "qwen3_moe": RoutingSpec(top_k=4),  # softmax over E, top-k, not renormalised
    "qwen3_moe, norm_topk_prob / mixtral": RoutingSpec(top_k=4, renormalize=True),
    "gpt_oss": RoutingSpec(top_k=4, weight_from="softmax_topk"),
    "minimax_m2 (sigmoid + bias, no groups)": RoutingSpec(
        top_k=4, score_fn="sigmoid", has_selection_bias=True, renormalize=True
    ),
    "selection bias on the logits": RoutingSpec(
        top_k=4, score_fn="sigmoid", has_selection_bias=True, selection_on_logits=True, renormalize=True
    ),
    "dbrx (p-norm)": RoutingSpec(top_k=4, renorm_p=1.0),
}


def _allowed(keep_per_group: list[int], n_group: int = 4) -> torch.Tensor:
    """Keep the given number of experts in each group, spread over the group (not a prefix)."""
    allowed = torch.zeros(E, dtype=torch.bool)
    size = E // n_group
    g = torch.Generator().manual_seed(sum(keep_per_group))
    for group, n in enumerate(keep_per_group):
        allowed[group * size + torch.randperm(size, generator=g)[:n]] = True
    return allowed


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("per_group", [2, 3, 5])
def test_the_kept_view_routes_as_the_mask(name, per_group):
    """Same experts (ids in the E experts' numbering, in the same order) and the same weights as
    ``route`` with the other experts' logits at -inf, over tokens of every kind of logit."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(per_group)
    logits = torch.randn(64, E, generator=g) * 3
    bias = torch.randn(E, generator=g) * 0.5
    allowed = _allowed([per_group] * 4)
    assert kept_view_problem(spec, allowed) is None
    want = route(spec, logits, bias, allowed=allowed)
    view = kept_view(allowed, bias, logits.device)
    assert view.kept.tolist() == allowed.nonzero().flatten().tolist()
    got = route_kept(spec, logits[:, view.kept], view)
    assert torch.equal(got.top_k_index, want.top_k_index)
    assert not (~allowed)[got.top_k_index].any()
    # elementwise scores give the same floats; a softmax sums fewer exp(-inf) = 0: the same value
    # up to the order of a float sum
    torch.testing.assert_close(got.top_k_weights, want.top_k_weights, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got.probs, want.probs[:, view.kept], rtol=1e-6, atol=1e-7)


def test_lowered_top_k_through_the_view():
    spec = SPECS["deepseek_v3"]
    logits, bias = torch.randn(16, E), torch.randn(E)
    allowed = _allowed([3] * 4)
    view = kept_view(allowed, bias, logits.device)
    want = route(spec, logits, bias, allowed=allowed, top_k=2)
    got = route_kept(spec, logits[:, view.kept], view, top_k=2)
    assert torch.equal(got.top_k_index, want.top_k_index)
    torch.testing.assert_close(got.top_k_weights, want.top_k_weights, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("spec", "allowed", "why"),
    [
        # groups of other sizes than the pruned checkpoint's: the view would regroup the experts
        (DEEPSEEK_V3, _allowed([2, 3, 3, 3]), "different numbers"),
        (DEEPSEEK_V3, _allowed([1, 1, 1, 1]), "fewer than the two"),  # (top-k 4 > 2 groups x 1)
        (
            RoutingSpec(top_k=4, score_fn="sigmoid", n_group=4, topk_group=1, group_score="max"),
            _allowed([3] * 4),
            "fewer than top-k",
        ),
        (
            RoutingSpec(top_k=4, score_fn="sigmoid", n_group=4, topk_group=2, group_fill=0.0),
            _allowed([3] * 4),
            "finite score",
        ),
        (RoutingSpec(top_k=2, selector="sparsemixer"), _allowed([3] * 4), "sparsemixer"),
        (RoutingSpec(top_k=4, extra_columns=2, extra_role="zero"), _allowed([3] * 4), "beyond"),
        (RoutingSpec(top_k=4), _allowed([1, 1, 1, 0]), "only 3 experts"),
    ],
)
def test_masks_the_view_cannot_route_exactly_are_left_to_the_mask(spec, allowed, why):
    assert why in (kept_view_problem(spec, allowed) or "")


def _logits_only_rows(blocks) -> list:
    """Record the rows each block's logits were computed from (None: all E)."""
    seen: list = []
    for b in blocks:
        own = b.logits_only
        b.logits_only = lambda router, h, rows=None, _own=own: seen.append(rows) or _own(router, h, rows)
    return seen


def test_masked_stock_evaluation_routes_through_the_kept_view():
    """DeepSeek-V3 (group-limited, bias): a mask of equal groups takes the view (logits of the kept
    rows only) and gives the logits of the per-slot forward, which masks all E; a mask of unequal
    groups keeps the -inf mask over all E; a mask changed in place is followed, never the old view."""
    torch.manual_seed(0)
    model = tiny_model("deepseek_v3").eval()
    blocks = find_moe_blocks(model)
    spec, n = blocks[0].spec, blocks[0].num_experts
    assert spec.group_limited and spec.has_selection_bias and blocks[0].logits_only is not None
    size = n // spec.n_group
    equal = torch.ones(n, dtype=torch.bool)
    equal[::size] = False  # one expert out of every group
    unequal = equal.clone()
    unequal[1] = False  # two out of the first group
    assert kept_view_problem(spec, equal) is None and kept_view_problem(spec, unequal) is not None
    with torch.no_grad():
        for b in blocks:  # the router's selection bias is zero at init: make it count
            b.selection_bias(model).copy_(torch.randn(n) * 0.3)
        x = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
        seen = _logits_only_rows(blocks)
        for allowed, kept_rows in ((equal, int(equal.sum())), (unequal, None)):
            controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
            with patch_moe(model, blocks, controls=controls):
                slots = model(x, use_cache=False).logits
            seen.clear()
            with patch_moe(model, blocks, controls=controls, stock_experts=True):
                stock = model(x, use_cache=False).logits
            assert seen and all((r is None if kept_rows is None else r.shape[0] == kept_rows) for r in seen)
            torch.testing.assert_close(stock, slots, rtol=1e-5, atol=1e-5)
        # one session, its mask changed in place between forwards: the view is built again
        other = equal.clone()
        other[::size] = True
        other[size - 1 :: size] = False
        with patch_moe(model, blocks, controls={b.index: BlockControl(allowed=other) for b in blocks}):
            want = model(x, use_cache=False).logits
        allowed = equal.clone()
        controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
        with patch_moe(model, blocks, controls=controls, stock_experts=True):
            first = model(x, use_cache=False).logits
            allowed.copy_(other)
            got = model(x, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, first)


def test_kept_cache_is_built_again_for_any_change_it_depends_on():
    """The cached view stands only for the very tensors it was built from, unchanged: another
    mask, weight or bias tensor, an in-place change of any of them, or another top-k invalidates it."""
    from moeprune.arch.patch import _KeptCache

    allowed, weight, bias = torch.ones(8, dtype=torch.bool), torch.randn(8, 4), torch.zeros(8)
    cache = _KeptCache()
    assert not cache.valid_for(allowed, weight, bias, None)  # empty
    cache.store(allowed, weight, bias, None, None)
    assert cache.valid_for(allowed, weight, bias, None)
    assert not cache.valid_for(allowed.clone(), weight, bias, None)
    assert not cache.valid_for(allowed, weight.clone(), bias, None)
    assert not cache.valid_for(allowed, weight, bias.clone(), None)
    assert not cache.valid_for(allowed, weight, None, None)
    assert not cache.valid_for(allowed, weight, bias, 2)
    for t in (allowed, weight, bias):
        cache.store(allowed, weight, bias, None, None)
        if t.dtype == torch.bool:
            t.logical_not_()
        else:
            t.add_(1)
        assert not cache.valid_for(allowed, weight, bias, None)
    cache.store(allowed, weight, None, 2, None)
    assert cache.valid_for(allowed, weight, None, 2)
