"""ZAYA (arch/extended.py): an MLP router over E experts + a 'skip' class, whose state feeds the next
layer's router. Beyond the parametrized architecture tests (four MoE layers, random balancing
biases so that tokens do choose skip): route() equals the router with skips, masking equals a
router without the removed rows (state handed on included), profile statistics equal a naive
float64 computation, every checkpoint (fused, hub, ragged, novice) and the adaptive model equal the
masked original, pad-uniform is refused, inspect and the layer-by-layer pass work."""

from __future__ import annotations

import copy
import json
from functools import cache

import pytest
import torch

import _checkpoints as ckpt
from _reference import Routing, assert_same, naive_profile
from moeprune.arch import find_moe_blocks, kept_controls, single_expert_forward
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model
from test_surgery_modes import _deeper_overrides

E = 8
LAYERS = [0, 1, 2, 3]
EXPERT_TENSORS = ("gate.router_mlp.out_proj.weight", "gate.balancing_biases")


@cache
def _model():
    """A tiny ZAYA with four MoE layers whose tokens do choose the skip class: the experts'
    balancing biases lie below the skip's -1. (The skip's must be -1: ZayaPreTrainedModel's
    _init_weights writes -1 into it on every from_pretrained, whatever the checkpoint holds.)"""
    model = tiny_model("zaya", **_deeper_overrides("zaya"))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            experts = -1.3 + 0.05 * torch.randn(E, generator=g)
            layer.mlp.gate.balancing_biases.copy_(torch.cat((experts, torch.tensor([-1.0]))))
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == LAYERS
    return model, blocks


def _router_calls(model, blocks, controls=None) -> dict[int, tuple]:
    """Each router's (input, router_states, output) in one forward (with patch_moe controls if given)."""
    seen: dict[int, tuple] = {}

    def grab(b):
        def hook(_m, args, kwargs, out):
            state = kwargs.get("router_states", args[1] if len(args) > 1 else None)
            seen[b.index] = (args[0].detach().clone(), state, tuple(o.detach().clone() for o in out))

        return hook

    hooks = [b.router(model).register_forward_hook(grab(b), with_kwargs=True) for b in blocks]
    try:
        if controls is None:
            ckpt.run_logits(model)
        else:
            ckpt.run_logits(model, blocks=blocks, controls=controls)
    finally:
        for h in hooks:
            h.remove()
    return seen


# --- routing --------------------------------------------------------------------------------------


def test_blocks_name_only_the_router_tensors_with_an_expert_axis():
    model, blocks = _model()
    for b in blocks:
        assert set(b.router_tensors) == set(EXPERT_TENSORS)
        assert b.router_extra == 1 and b.spec.extra_role == "skip" and b.top_k == 1
        assert b.selection_bias_path == f"{b.path}.gate.balancing_biases"
        for rel in EXPERT_TENSORS:
            assert model.get_parameter_or_buffer(f"{b.path}.{rel}").shape[0] == E + 1


def test_route_equals_the_router_with_its_skip_class():
    """route() picks what ZayaRouter picks: an index E is the skip class, which the router hands on
    as expert 0 with weight 0."""
    model, blocks = _model()
    seen = _router_calls(model, blocks)
    skips = 0
    for b in blocks:
        _x, _state, out = seen[b.index]
        r = b.route(model, out[0])
        skip = r.top_k_index == E
        skips += int(skip.sum())
        assert torch.equal(r.top_k_index.masked_fill(skip, 0), out[2])
        torch.testing.assert_close(r.top_k_weights.masked_fill(skip, 0), out[1], rtol=0, atol=0)
    assert 0 < skips < 2 * 12 * len(blocks)


def test_masking_equals_a_router_without_the_removed_rows_and_hands_on_the_same_state():
    """A layer's router with removed experts forbidden = ZayaRouter built for the kept experts with
    its out_proj rows and balancing biases sliced (skip row kept, last), given the same input and
    the previous layer's state: same choice, same weight, same state for the next layer."""
    model, blocks = _model()
    kept = [0, 2, 3, 5, 6, 7]
    allowed = torch.zeros(E, dtype=torch.bool)
    allowed[kept] = True
    seen = _router_calls(model, blocks)
    rows = kept + [E]
    for b in blocks:
        router = b.router(model)
        x, state, out = seen[b.index]
        assert (state is None) == (b.layer == 0)  # layers >= 1 read the previous layer's state
        cfg = copy.deepcopy(model.config)
        cfg.num_experts = len(kept)
        small = type(router)(cfg, b.layer)
        sd = {n: t[rows] if f"gate.{n}" in b.router_tensors else t for n, t in router.state_dict().items()}
        small.load_state_dict(sd)
        with torch.no_grad():
            theirs = small(x, router_states=state)
        r = b.route(model, out[0], allowed=allowed)
        ids = torch.tensor(rows)[theirs[2].long()]
        ids = torch.where(theirs[1] == 0, torch.full_like(ids, -1), ids)  # the router's skip slots
        ours = r.top_k_index.masked_fill(r.top_k_index == E, -1)
        assert torch.equal(ids, ours)
        torch.testing.assert_close(theirs[1], r.top_k_weights.masked_fill(ours < 0, 0), **ckpt.TOL)
        torch.testing.assert_close(theirs[3], out[3], rtol=0, atol=0)


def test_state_handed_between_layers_equals_the_pruned_models(tmp_path):
    """The state each router hands on is taken before its MLP: the masked original and the pruned
    checkpoint hand on the same state at every layer (and run the same routers)."""
    model, blocks = _model()
    kept = ckpt.two_removed(blocks)
    rewrite_checkpoint(ckpt.save(model, tmp_path / "src", "fused"), tmp_path / "out", kept)
    pruned = ckpt.load_stock(tmp_path / "out")
    masked = _router_calls(model, blocks, kept_controls(blocks, kept))
    theirs = _router_calls(pruned, find_moe_blocks(pruned))
    for b in blocks:
        torch.testing.assert_close(theirs[b.index][0], masked[b.index][0], **ckpt.TOL)
        torch.testing.assert_close(theirs[b.index][2][3], masked[b.index][2][3], **ckpt.TOL)
        # the pruned router's logits are the masked original's kept columns, skip last
        torch.testing.assert_close(theirs[b.index][2][0], masked[b.index][2][0][:, kept[b.layer] + [E]], **ckpt.TOL)


def test_masked_control_never_selects_removed_experts():
    model, blocks = _model()
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[[1, 6]] = False
    seen: list[torch.Tensor] = []
    ckpt.run_logits(model, blocks=blocks, controls=kept_controls(blocks, {b.layer: [0, 2, 3, 4, 5, 7] for b in blocks}),
            observer=lambda e: seen.append(e.top_k_index))
    assert len(seen) == len(blocks)
    assert all(not bool(((idx == 1) | (idx == 6)).any()) for idx in seen)
    assert any(bool((idx < 0).any()) for idx in seen)  # skip slots reach observers as no expert


# --- profile ---------------------------------------------------------------------------------------


def _watch(b) -> dict[str, tuple[str, str]]:
    return {"x": (b.experts_path, "in"), "h": (b.prenorm_path, "in"), "s": (b.router_path, "out")}


def _read(model, b, cap: dict[str, torch.Tensor]) -> Routing:
    """The router's own outputs and the experts' input: top-1 on softmax over all E + 1 classes
    plus the balancing bias; skip selections count nowhere, probabilities are kept for the E
    experts, PreMoe ranks the expert columns (tests/_reference.py)."""
    experts, x, logits = b.experts(model), cap["x"], cap["s"]
    p = torch.softmax(logits.double(), -1)
    bias = model.get_buffer(b.selection_bias_path).double()
    index = torch.stack([torch.argmax(p[t] + bias) for t in range(p.shape[0])]).unsqueeze(-1)

    def expert(t: int, i: int, _g: float) -> torch.Tensor:
        return single_expert_forward(experts, i, x[t : t + 1])[0].double()

    return Routing(cap["h"].double(), logits, p, index, p.gather(-1, index), expert)


def _seqs(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]


def test_statistics_match_naive_float64_reference():
    model, blocks = _model()
    lengths = (7, 1, 23, 3, 12)  # batches of 3 carry padding
    seqs = _seqs(0, lengths)
    got = calibrate(model, seqs, batch_size=3, premoe_ka=3, per_sample=True, premoe_exact=True)
    ref, skips = naive_profile(model, seqs, 3, _watch, _read)
    assert_same(got, ref)
    assert skips > 0 and int(got["count"].sum()) + skips == sum(lengths) * len(blocks)


def test_layer_by_layer_pass_equals_the_whole_model_pass(tmp_path):
    """--offload sequential hands each layer's router state to the next layer's router."""
    model, _ = _model()
    model.save_pretrained(tmp_path, save_original_format=True, max_shard_size="100KB")
    ckpt.check_layer_by_layer_profile(tmp_path, model)


def test_layer_by_layer_pass_runs_the_router_the_stock_loader_runs(tmp_path):
    """transformers' from_pretrained writes -1 over ZAYA's loaded skip bias (_init_weights, after
    loading); the layer-by-layer pass does the same, so it profiles the model users load."""
    model, _ = _model()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.mlp.gate.balancing_biases[-1] = -0.9
    ckpt.save(other, tmp_path, "hub")
    assert float(ckpt.tensor(tmp_path, "model.layers.0.mlp.gate.balancing_biases")[-1]) == pytest.approx(-0.9)
    stock = ckpt.load_stock(tmp_path)
    assert all(float(layer.mlp.gate.balancing_biases[-1]) == -1.0 for layer in stock.model.layers)
    # the checkpoint's -0.9 routes differently
    ckpt.check_layer_by_layer_profile(tmp_path, stock, differs_from=other)


# --- checkpoints -----------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["fused", "hub"])
def test_pruned_checkpoint_equals_the_masked_original(layout, tmp_path):
    model, blocks = _model()
    src = ckpt.save(model, tmp_path / "src", layout)
    kept = ckpt.two_removed(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept)
    pruned = ckpt.load_stock(tmp_path / "out")
    torch.testing.assert_close(ckpt.run_logits(pruned), ckpt.masked_logits(model, blocks, kept), **ckpt.TOL)
    assert not torch.allclose(ckpt.run_logits(model), ckpt.masked_logits(model, blocks, kept), **ckpt.TOL)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 6
    src_keys, out_keys = Checkpoint.open(src).tensors, Checkpoint.open(tmp_path / "out").tensors
    assert set(src_keys) == set(out_keys)
    for b in blocks:
        rows = kept[b.layer] + [E]  # the skip row stays, last
        for rel in EXPERT_TENSORS:
            key = f"{b.path}.{rel}"
            assert torch.equal(ckpt.tensor(tmp_path / "out", key), ckpt.tensor(src, key)[rows]), key
        # the rest of the router MLP (hidden widths, the state scale) is untouched
        for key in src_keys:
            if key.startswith(f"{b.path}.gate.") and key[len(b.path) + 1 :] not in EXPERT_TENSORS:
                assert torch.equal(ckpt.tensor(tmp_path / "out", key), ckpt.tensor(src, key)), key


def test_ragged_checkpoint_loads_exactly(tmp_path):
    model, blocks = _model()
    ckpt.check_ragged_loads_exactly(model, blocks, tmp_path)


def test_pad_uniform_is_refused(tmp_path):
    """A padding expert's row would enter the softmax over E + 1 classes: no exactly dead expert."""
    model, blocks = _model()
    src = ckpt.save(model, tmp_path / "src", "fused")
    with pytest.raises(UserError, match="softmax denominator") as err:
        rewrite_checkpoint(src, tmp_path / "out", ckpt.ragged_plan(blocks), pad_uniform=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_novice_checkpoint_loads_exactly(tmp_path):
    model, blocks = _model()
    ckpt.check_novice_loads_exactly(model, blocks, tmp_path)


def test_adaptive_model_equals_the_pruned_checkpoint(tmp_path):
    model, blocks = _model()
    ckpt.check_adaptive_equals_pruned(model, blocks, tmp_path)


def test_inspect_reports_the_skip_class(tmp_path, capsys):
    from _cli import run_cli

    model, _ = _model()
    ckpt.save(model, tmp_path, "hub")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model_type"] == "zaya" and report["moe_layers"] == LAYERS
    assert report["num_experts"] == E and report["top_k"] == 1
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0 and "'skip' class" in out
