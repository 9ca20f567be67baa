"""Gemma-4, Longcat-Flash and Inkling (arch/extended.py), beyond the parametrized architecture tests
(with two MoE layers each, and learned weight scales that are not 1): masking equals a router without the removed rows, profile statistics equal a
naive float64 computation, and every checkpoint (fused, hub, ragged, pad-uniform where exact,
novice) and the adaptive model equal the masked original."""

from __future__ import annotations

import copy
import json
from functools import cache

import pytest
import torch

import _checkpoints as ckpt
from _reference import Routing, assert_same, naive_profile
from moeprune.arch import BlockControl, find_moe_blocks, kept_controls, patch_moe, single_expert_forward
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import check_kept, rewrite_checkpoint
from moeprune.testing.tiny import tiny_model
from test_surgery_modes import _deeper_overrides

TYPES = ("gemma4_text", "gemma4", "longcat_flash", "inkling_text")
COUNT_NAME = {"gemma4_text": "num_experts", "gemma4": "num_experts", "longcat_flash": "n_routed_experts",
              "inkling_text": "n_routed_experts"}


@cache
def _model(model_type: str):
    """A tiny model with at least two MoE layers (its learned weight scales are random)."""
    model = tiny_model(model_type, **_deeper_overrides(model_type))
    for name, p in model.named_parameters():
        if name.endswith(("router.per_expert_scale", "gate.global_scale")):
            assert not bool((p == 1).all()), name
    blocks = find_moe_blocks(model)
    assert len(blocks) >= 2
    return model, blocks


# --- routing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", TYPES)
def test_masking_equals_a_router_without_the_removed_rows(model_type):
    """route() with removed experts forbidden = the model's own router class built for the kept
    experts, its expert-axis tensors sliced (zero / shared rows kept, last)."""
    model, blocks = _model(model_type)
    b = blocks[0]
    router = b.router(model)
    x = torch.randn(64, model.config.get_text_config().hidden_size, generator=torch.Generator().manual_seed(3))
    kept = [0, 2, 3, 5, 6, 7]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[kept] = True
    with torch.no_grad():
        r = b.route(model, b.router_logits(router, x, router(x)), allowed=allowed)
        cfg = copy.deepcopy(router.config if hasattr(router, "config") else model.config.get_text_config())
        setattr(cfg, COUNT_NAME[model_type], len(kept))
        small = type(router)(cfg)
        rows = kept + list(range(8, 8 + b.router_extra))
        state = {}
        for name, t in router.state_dict().items():
            full = f"{b.router_path[len(b.path) + 1:]}.{name}"
            state[name] = t[rows if t.shape[0] == 8 + b.router_extra else kept] if full in b.router_tensors else t
        small.load_state_dict(state)
        out = small(x)
    ids = torch.tensor(rows)[out[2].long()]
    assert torch.equal(ids.sort(-1).values, r.top_k_index.sort(-1).values)
    order_ours, order_theirs = r.top_k_index.argsort(-1), ids.argsort(-1)
    torch.testing.assert_close(out[1].gather(-1, order_theirs), r.top_k_weights.gather(-1, order_ours), **ckpt.TOL)
    if model_type == "inkling_text":  # the shared experts' weights (shared_gammas) change too
        torch.testing.assert_close(out[3], r.extra_weights, **ckpt.TOL)
    if model_type == "longcat_flash":  # some tokens choose a zero expert (index >= E), kept as such
        assert bool((r.top_k_index >= 8).any())


def test_longcat_zero_expert_slots_reach_observers_as_no_expert():
    model, blocks = _model("longcat_flash")
    routed, events = [], []
    hooks = [b.router(model).register_forward_hook(lambda m, a, o: routed.append(o[2])) for b in blocks]
    try:
        with torch.no_grad(), patch_moe(model, blocks, observer=events.append):
            model(ckpt.tiny_ids(model), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    zero = [idx >= 8 for idx in routed]
    assert any(bool(z.any()) for z in zero) and all(not bool(z.all()) for z in zero)
    for z, e in zip(zero, events, strict=True):
        assert torch.equal(e.top_k_index < 0, z)
        assert bool((e.top_k_weights[z] == 0).all())


def test_plans_cannot_name_zero_experts():
    """Zero experts have no weights and one config count for all layers: a plan keeps E' of the
    E real experts, and an id of a zero expert is outside them."""
    model, blocks = _model("longcat_flash")
    kept = ckpt.two_removed(blocks)
    kept[blocks[0].layer] = [*kept[blocks[0].layer][:-1], 8]
    with pytest.raises(UserError, match="outside 0..7"):
        check_kept(blocks, kept)


# --- profile ---------------------------------------------------------------------------------------


def _watch(b) -> dict[str, tuple[str, str]]:
    return {"r": (b.router_path, "in"), "x": (b.experts_path, "in"), "h": (b.prenorm_path, "in")}


def _read(model, b, cap: dict[str, torch.Tensor]) -> Routing:
    """The router's and the experts' own inputs: zero-expert selections count nowhere,
    probabilities are taken over all router columns and kept for the E routed ones, PreMoe ranks
    the routed columns (tests/_reference.py)."""
    router, experts, x = b.router(model), b.experts(model), cap["x"]
    logits = b.router_logits(router, cap["r"], router(cap["r"]))
    r = b.route(model, logits)

    def expert(t: int, i: int, _g: float) -> torch.Tensor:
        return single_expert_forward(experts, i, x[t : t + 1])[0].double()

    return Routing(cap["h"].double(), logits, r.probs, r.top_k_index, r.top_k_weights, expert)


@pytest.mark.parametrize("model_type", TYPES)
def test_statistics_match_naive_float64_reference(model_type):
    model, blocks = _model(model_type)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 23, 3, 12]  # batches of 3 carry padding
    seqs = [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]
    got = calibrate(model, seqs, batch_size=3, premoe_ka=3, per_sample=True, premoe_exact=True)
    ref, zero = naive_profile(model, seqs, 3, _watch, _read)
    assert_same(got, ref)
    total = sum(lengths) * blocks[0].top_k * len(blocks)
    assert int(got["count"].sum()) + zero == total
    assert (zero > 0) == (model_type == "longcat_flash")


@pytest.mark.parametrize("model_type", TYPES)
def test_layer_by_layer_pass_equals_the_whole_model_pass(model_type, tmp_path):
    """The offloaded calibration (one decoder layer in memory) sees the same router columns."""
    model, _ = _model(model_type)
    model.save_pretrained(tmp_path, save_original_format=True, max_shard_size="100KB")
    ckpt.check_layer_by_layer_profile(tmp_path, model)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fused", "hub"])
@pytest.mark.parametrize("model_type", TYPES)
def test_pruned_checkpoint_equals_the_masked_original(model_type, layout, tmp_path):
    model, blocks = _model(model_type)
    src = ckpt.save(model, tmp_path / "src", layout)
    if layout == "hub" and model_type == "longcat_flash":  # published one key per expert
        assert any(".experts.0." in k for k in Checkpoint.open(src).tensors)
    kept = ckpt.two_removed(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept)
    pruned = ckpt.load_stock(tmp_path / "out")
    torch.testing.assert_close(ckpt.run_logits(pruned), ckpt.masked_logits(model, blocks, kept), **ckpt.TOL)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    text = config.get("text_config", config)
    assert text[COUNT_NAME[model_type]] == 6
    b = blocks[1]
    for rel in b.router_tensors:
        key = f"{b.path}.{rel}"
        full = ckpt.tensor(src, key) if key in Checkpoint.open(src).tensors else None
        if full is None:  # renamed on disk: compare with the model's tensor instead
            full = model.get_parameter_or_buffer(key).detach()
        extra = list(range(8, full.shape[0]))  # zero / shared rows stay, last
        new = pruned.get_parameter_or_buffer(key).detach()
        assert torch.equal(new, full[kept[b.layer] + extra]), key
    if model_type == "longcat_flash":
        assert text["zero_expert_num"] == 2


@pytest.mark.parametrize("model_type", TYPES)
def test_lowered_top_k_equals_the_masked_original(model_type, tmp_path):
    model, blocks = _model(model_type)
    src = ckpt.save(model, tmp_path / "src", "fused")
    kept = ckpt.two_removed(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept, top_k=1)
    pruned = ckpt.load_stock(tmp_path / "out")
    assert [b.top_k for b in find_moe_blocks(pruned)] == [1] * len(blocks)
    ref = ckpt.run_logits(model, blocks=blocks, controls=kept_controls(blocks, kept, top_k=1))
    torch.testing.assert_close(ckpt.run_logits(pruned), ref, **ckpt.TOL)


def test_sink_router_refuses_fewer_allowed_experts_than_top_k():
    model, blocks = _model("inkling_text")
    b = blocks[0]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[0] = True  # one routed expert; the shared column does not count
    with pytest.raises(ValueError, match="only 1 experts allowed but top-k is 2"):
        b.route(model, torch.randn(4, 9), allowed=allowed)


@pytest.mark.parametrize("model_type", TYPES)
def test_ragged_checkpoint_loads_exactly(model_type, tmp_path):
    model, blocks = _model(model_type)
    ckpt.check_ragged_loads_exactly(model, blocks, tmp_path)


@pytest.mark.parametrize("model_type", TYPES)
def test_pad_uniform_is_exact_or_refused(model_type, tmp_path):
    """Inkling selects on sigmoid + bias: a dead expert is never chosen and its row is no part of
    the weights' normalisation, so padding is exact. Gemma-4 (no selection bias) and Longcat
    (softmax over every row) have no exactly dead expert."""
    model, blocks = _model(model_type)
    src = ckpt.save(model, tmp_path / "src", "fused")
    kept = ckpt.ragged_plan(blocks)
    if model_type != "inkling_text":
        why = "no additive selection bias" if model_type.startswith("gemma4") else "softmax denominator"
        with pytest.raises(UserError, match=why):
            rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
        assert not (tmp_path / "out").exists()
        return
    rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
    padded = ckpt.load_stock(tmp_path / "out")
    torch.testing.assert_close(ckpt.run_logits(padded), ckpt.masked_logits(model, blocks, kept), **ckpt.TOL)
    b = blocks[0]
    w = padded.get_parameter(b.router_weight_path)
    full = model.get_parameter(b.router_weight_path)
    assert torch.equal(w[-b.router_extra :], full[-b.router_extra :])  # the shared rows stay last


@pytest.mark.parametrize("model_type", TYPES)
def test_novice_checkpoint_loads_exactly(model_type, tmp_path):
    model, blocks = _model(model_type)
    ckpt.check_novice_loads_exactly(model, blocks, tmp_path)


@pytest.mark.parametrize("model_type", TYPES)
def test_adaptive_model_equals_the_pruned_checkpoint(model_type, tmp_path):
    model, blocks = _model(model_type)
    am = ckpt.check_adaptive_equals_pruned(model, blocks, tmp_path)
    key, index, weights = am.query_statistics("the quick brown fox")
    assert key.shape == (8,) and index.shape[1] == blocks[0].top_k and bool((index < 8 + blocks[0].router_extra).all())


@pytest.mark.parametrize("model_type", TYPES)
def test_masked_control_never_selects_removed_experts(model_type):
    model, blocks = _model(model_type)
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[[1, 6]] = False
    seen: list[torch.Tensor] = []
    controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
    ckpt.run_logits(model, blocks=blocks, controls=controls, observer=lambda e: seen.append(e.top_k_index))
    assert len(seen) == len(blocks) and all(not bool(((idx == 1) | (idx == 6)).any()) for idx in seen)
