"""Gemma-4, Longcat-Flash and Inkling (arch/extended.py), beyond the parametrized architecture tests
(with two MoE layers each, and learned weight scales that are not 1): masking equals a router without the removed rows, profile statistics equal a
naive float64 computation, and every checkpoint (fused, hub, ragged, pad-uniform where exact,
novice) and the adaptive model equal the masked original."""

from __future__ import annotations

import copy
import json
from functools import cache
from pathlib import Path

import pytest
import torch

import moeprune
from moeprune.adaptive import AdaptiveMoE
from moeprune.arch import BlockControl, find_moe_blocks, kept_controls, patch_moe, single_expert_forward
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import check_kept, rewrite_checkpoint
from moeprune.testing.tiny import byte_tokenizer, tiny_model
from test_profile import assert_same, naive_premoe_bounded
from test_surgery_modes import _deeper_overrides, _novice_reference, _novices, _ragged

TYPES = ("gemma4_text", "gemma4", "longcat_flash", "inkling_text")
COUNT_NAME = {"gemma4_text": "num_experts", "gemma4": "num_experts", "longcat_flash": "n_routed_experts",
              "inkling_text": "n_routed_experts"}
TOL = {"rtol": 1e-5, "atol": 1e-5}


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


def _ids(model, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, **patch) -> torch.Tensor:
    with torch.no_grad():
        if not patch:
            return model(_ids(model), use_cache=False).logits
        with patch_moe(model, **patch):
            return model(_ids(model), use_cache=False).logits


def _kept(blocks) -> dict[int, list[int]]:
    return {b.layer: sorted(set(range(8)) - {b.layer % 8, (3 * b.layer + 5) % 8}) for b in blocks}


def _masked(model, blocks, kept) -> torch.Tensor:
    return _logits(model, blocks=blocks, controls=kept_controls(blocks, kept))


def _tensor(path: Path, key: str) -> torch.Tensor:
    ckpt = Checkpoint.open(path)
    from safetensors import safe_open

    with safe_open(str(path / ckpt.tensors[key].file), "pt") as f:
        return f.get_tensor(key)


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
    torch.testing.assert_close(out[1].gather(-1, order_theirs), r.top_k_weights.gather(-1, order_ours), **TOL)
    if model_type == "inkling_text":  # the shared experts' weights (shared_gammas) change too
        torch.testing.assert_close(out[3], r.extra_weights, **TOL)
    if model_type == "longcat_flash":  # some tokens choose a zero expert (index >= E), kept as such
        assert bool((r.top_k_index >= 8).any())


def test_longcat_zero_expert_slots_reach_observers_as_no_expert():
    model, blocks = _model("longcat_flash")
    routed, events = [], []
    hooks = [b.router(model).register_forward_hook(lambda m, a, o: routed.append(o[2])) for b in blocks]
    try:
        with torch.no_grad(), patch_moe(model, blocks, observer=events.append):
            model(_ids(model), use_cache=False)
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
    kept = _kept(blocks)
    kept[blocks[0].layer] = [*kept[blocks[0].layer][:-1], 8]
    with pytest.raises(UserError, match="outside 0..7"):
        check_kept(blocks, kept)


# --- profile ---------------------------------------------------------------------------------------


@torch.no_grad()
def naive_stats(model, seqs: list[list[int]], ka: int) -> dict[str, torch.Tensor]:
    """Every profile statistic per token in float64, one record at a time, from the router's and
    the experts' own inputs: zero-expert selections count nowhere, probabilities are taken over all
    router columns and kept for the E routed ones, PreMoe ranks the routed columns."""
    blocks = find_moe_blocks(model)
    L, E = len(blocks), blocks[0].num_experts
    H = model.config.get_text_config().hidden_size
    cap: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for b in blocks:
        for what, path in (("r", b.router_path), ("x", b.experts_path), ("h", b.prenorm_path)):

            def grab(_m, args, _k=(what, b.index)):
                cap[_k] = args[0].reshape(-1, args[0].shape[-1])

            handles.append(model.get_submodule(path).register_forward_pre_hook(grab))
    f64 = torch.float64
    names = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1", "gate_sq")
    out = {n: torch.zeros(L, E, dtype=f64) for n in names}
    lsq_num = torch.zeros(L, E, H, dtype=f64)  # Σ g² e: the least-squares novice's numerator
    per_expert: list[list[list[torch.Tensor]]] = [[[] for _ in range(E)] for _ in range(L)]
    rows: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(L)] for n in ("q", "f", "i")}
    sample_gate = torch.zeros(len(seqs), L, E, dtype=f64)
    zero_selections = 0
    try:
        for s_idx, seq in enumerate(seqs):
            model(input_ids=torch.tensor([seq]), use_cache=False)
            for b in blocks:
                li, router, experts = b.index, b.router(model), b.experts(model)
                xr, x, h = cap[("r", li)], cap[("x", li)], cap[("h", li)].double()
                logits = b.router_logits(router, xr, router(xr))
                r = b.route(model, logits)
                for t in range(x.shape[0]):
                    h_new, contrib = h[t].clone(), []
                    for j in range(r.top_k_index.shape[1]):
                        i = int(r.top_k_index[t, j])
                        if i >= E:  # a Longcat zero expert: no prunable expert
                            zero_selections += 1
                            continue
                        g = float(r.top_k_weights[t, j])
                        e = single_expert_forward(experts, i, x[t : t + 1])[0].double()
                        h_new += g * e
                        contrib.append((i, g, e))
                    cos = float((h[t] @ h_new) / (h[t].norm() * h_new.norm()))
                    for i, g, e in contrib:
                        out["count"][li, i] += 1
                        out["gate"][li, i] += g
                        out["gate_sq"][li, i] += g * g
                        lsq_num[li, i] += g * g * e
                        out["reap_sum"][li, i] += g * e.norm()
                        out["easyep"][li, i] += g * e.norm() * max(0.0, 1.0 - cos)
                        per_expert[li][i].append(e)
                        sample_gate[s_idx, li, i] += g
                    s = logits[t, :E].double()
                    out["prob"][li] += r.probs[t, :E].double()
                    am = int(s.argmax())
                    out["premoe_v1"][li, am] += s[am]
                    vals, ids = torch.topk(s, ka)
                    rows["q"][li].append(torch.softmax(vals, -1))
                    rows["f"][li].append(torch.maximum(vals, torch.sigmoid(vals)))
                    rows["i"][li].append(ids)
    finally:
        for hd in handles:
            hd.remove()
    mean, m2 = torch.zeros(L, E, H, dtype=f64), torch.zeros(L, E, H, dtype=f64)
    for li in range(L):
        for i in range(E):
            if per_expert[li][i]:
                stack = torch.stack(per_expert[li][i])
                mean[li, i], m2[li, i] = stack.mean(0), (stack - stack.mean(0)).square().sum(0)
    out["mone_mean"], out["mone_m2"] = mean, m2
    gsq = out["gate_sq"].unsqueeze(-1)
    out["novice_lsq"] = torch.where(gsq > 0, lsq_num / gsq.clamp(min=1e-300), torch.zeros_like(lsq_num))
    q, f, idx = (torch.stack([torch.stack(r) for r in rows[n]]) for n in ("q", "f", "i"))
    out["premoe_q"], out["premoe_f"], out["premoe_idx"] = q, f, idx
    out["sample_gate"] = sample_gate
    out["tokens"] = torch.tensor([float(sum(len(s) for s in seqs))], dtype=f64)
    out["sample_tokens"] = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out.update(naive_premoe_bounded(q, f, idx, [len(s) for s in seqs], E))
    out["_zero"] = torch.tensor(zero_selections)
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_statistics_match_naive_float64_reference(model_type):
    model, blocks = _model(model_type)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 23, 3, 12]  # batches of 3 carry padding
    seqs = [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]
    got = calibrate(model, seqs, batch_size=3, premoe_ka=3, per_sample=True, premoe_exact=True)
    ref = naive_stats(model, seqs, 3)
    zero = int(ref.pop("_zero"))
    assert_same(got, ref)
    total = sum(lengths) * blocks[0].top_k * len(blocks)
    assert int(got["count"].sum()) + zero == total
    assert (zero > 0) == (model_type == "longcat_flash")


@pytest.mark.parametrize("model_type", TYPES)
def test_layer_by_layer_pass_equals_the_whole_model_pass(model_type, tmp_path):
    """The offloaded calibration (one decoder layer in memory) sees the same router columns."""
    from moeprune.offload import calibrate_sequential

    model, _ = _model(model_type)
    model.save_pretrained(tmp_path, save_original_format=True, max_shard_size="100KB")
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(4, 256, (n,), generator=g).tolist() for n in (7, 1, 20, 3)]
    kwargs = {"batch_size": 2, "pad_id": 0, "premoe_ka": 3, "per_sample": True}
    got = calibrate_sequential(tmp_path, seqs, **kwargs)
    assert_same(got, calibrate(model, seqs, **kwargs))


# --- checkpoints -----------------------------------------------------------------------------------


def _save(model, path: Path, layout: str) -> Path:
    model.save_pretrained(path, save_original_format=(layout == "hub"))
    byte_tokenizer().save_pretrained(path)
    return path


def _load_stock(path: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


@pytest.mark.parametrize("layout", ["fused", "hub"])
@pytest.mark.parametrize("model_type", TYPES)
def test_pruned_checkpoint_equals_the_masked_original(model_type, layout, tmp_path):
    model, blocks = _model(model_type)
    src = _save(model, tmp_path / "src", layout)
    if layout == "hub" and model_type == "longcat_flash":  # published one key per expert
        assert any(".experts.0." in k for k in Checkpoint.open(src).tensors)
    kept = _kept(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept)
    pruned = _load_stock(tmp_path / "out")
    torch.testing.assert_close(_logits(pruned), _masked(model, blocks, kept), **TOL)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    text = config.get("text_config", config)
    assert text[COUNT_NAME[model_type]] == 6
    b = blocks[1]
    for rel in b.router_tensors:
        key = f"{b.path}.{rel}"
        full = _tensor(src, key) if key in Checkpoint.open(src).tensors else None
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
    src = _save(model, tmp_path / "src", "fused")
    kept = _kept(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept, top_k=1)
    pruned = _load_stock(tmp_path / "out")
    assert [b.top_k for b in find_moe_blocks(pruned)] == [1] * len(blocks)
    ref = _logits(model, blocks=blocks, controls=kept_controls(blocks, kept, top_k=1))
    torch.testing.assert_close(_logits(pruned), ref, **TOL)


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
    src = _save(model, tmp_path / "src", "hub")
    kept = _ragged(blocks)
    assert len({len(v) for v in kept.values()}) > 1
    rewrite_checkpoint(src, tmp_path / "out", kept)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _masked(model, blocks, kept), **TOL)


@pytest.mark.parametrize("model_type", TYPES)
def test_pad_uniform_is_exact_or_refused(model_type, tmp_path):
    """Inkling selects on sigmoid + bias: a dead expert is never chosen and its row is no part of
    the weights' normalisation, so padding is exact. Gemma-4 (no selection bias) and Longcat
    (softmax over every row) have no exactly dead expert."""
    model, blocks = _model(model_type)
    src = _save(model, tmp_path / "src", "fused")
    kept = _ragged(blocks)
    if model_type != "inkling_text":
        why = "no additive selection bias" if model_type.startswith("gemma4") else "softmax denominator"
        with pytest.raises(UserError, match=why):
            rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
        assert not (tmp_path / "out").exists()
        return
    rewrite_checkpoint(src, tmp_path / "out", kept, pad_uniform=True)
    padded = _load_stock(tmp_path / "out")
    torch.testing.assert_close(_logits(padded), _masked(model, blocks, kept), **TOL)
    b = blocks[0]
    w = padded.get_parameter(b.router_weight_path)
    full = model.get_parameter(b.router_weight_path)
    assert torch.equal(w[-b.router_extra :], full[-b.router_extra :])  # the shared rows stay last


@pytest.mark.parametrize("model_type", TYPES)
def test_novice_checkpoint_loads_exactly(model_type, tmp_path):
    model, blocks = _model(model_type)
    src = _save(model, tmp_path / "src", "hub")
    kept = _ragged(blocks, seed=11)
    novices = _novices(blocks, kept, model.config.get_text_config().hidden_size)
    rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _novice_reference(model, blocks, kept, novices), **TOL)


@pytest.mark.parametrize("model_type", TYPES)
def test_adaptive_model_equals_the_pruned_checkpoint(model_type, tmp_path):
    from test_adaptive import _library

    model, blocks = _model(model_type)
    layout = "hub"
    src = _save(model, tmp_path / "src", layout)
    a = _kept(blocks)
    b = {layer: sorted(set(range(8)) - {(layer + 2) % 8, (layer + 6) % 8}) for layer in a}
    lib = _library(model, blocks, {"a": a, "b": b})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32", task="a")
    for name in ("b", "a"):
        rewrite_checkpoint(src, tmp_path / f"pruned-{name}", lib.task(name).plan.kept)
        pruned = _load_stock(tmp_path / f"pruned-{name}")
        am.activate(name)
        # every parameter is bit-equal, but torch's CPU grouped_mm rounds the last bit by address
        torch.testing.assert_close(_logits(am.model), _logits(pruned), rtol=1e-6, atol=1e-6)
    key, index, weights = am.query_statistics("the quick brown fox")
    assert key.shape == (8,) and index.shape[1] == blocks[0].top_k and bool((index < 8 + blocks[0].router_extra).all())


@pytest.mark.parametrize("model_type", TYPES)
def test_masked_control_never_selects_removed_experts(model_type):
    model, blocks = _model(model_type)
    allowed = torch.ones(8, dtype=torch.bool)
    allowed[[1, 6]] = False
    seen: list[torch.Tensor] = []
    controls = {b.index: BlockControl(allowed=allowed) for b in blocks}
    _logits(model, blocks=blocks, controls=controls, observer=lambda e: seen.append(e.top_k_index))
    assert len(seen) == len(blocks) and all(not bool(((idx == 1) | (idx == 6)).any()) for idx in seen)
