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
from pathlib import Path

import pytest
import torch

import moeprune
from moeprune.adaptive import AdaptiveMoE
from moeprune.arch import find_moe_blocks, kept_controls, patch_moe, single_expert_forward
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import byte_tokenizer, tiny_model
from test_profile import assert_same, naive_premoe_bounded
from test_surgery_modes import _deeper_overrides, _novice_reference, _novices, _ragged

E = 8
LAYERS = [0, 1, 2, 3]
TOL = {"rtol": 1e-5, "atol": 1e-5}
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


def _ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(seed))


def _logits(model, **patch) -> torch.Tensor:
    with torch.no_grad():
        if not patch:
            return model(_ids(), use_cache=False).logits
        with patch_moe(model, **patch):
            return model(_ids(), use_cache=False).logits


def _kept(blocks) -> dict[int, list[int]]:
    return {b.layer: sorted(set(range(E)) - {b.layer % E, (3 * b.layer + 5) % E}) for b in blocks}


def _masked(model, blocks, kept) -> torch.Tensor:
    return _logits(model, blocks=blocks, controls=kept_controls(blocks, kept))


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
            _logits(model)
        else:
            _logits(model, blocks=blocks, controls=controls)
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
        torch.testing.assert_close(theirs[1], r.top_k_weights.masked_fill(ours < 0, 0), **TOL)
        torch.testing.assert_close(theirs[3], out[3], rtol=0, atol=0)


def test_state_handed_between_layers_equals_the_pruned_models(tmp_path):
    """The state each router hands on is taken before its MLP: the masked original and the pruned
    checkpoint hand on the same state at every layer (and run the same routers)."""
    model, blocks = _model()
    kept = _kept(blocks)
    rewrite_checkpoint(_save(model, tmp_path / "src", "fused"), tmp_path / "out", kept)
    pruned = _load_stock(tmp_path / "out")
    masked = _router_calls(model, blocks, kept_controls(blocks, kept))
    theirs = _router_calls(pruned, find_moe_blocks(pruned))
    for b in blocks:
        torch.testing.assert_close(theirs[b.index][0], masked[b.index][0], **TOL)
        torch.testing.assert_close(theirs[b.index][2][3], masked[b.index][2][3], **TOL)
        # the pruned router's logits are the masked original's kept columns, skip last
        torch.testing.assert_close(theirs[b.index][2][0], masked[b.index][2][0][:, kept[b.layer] + [E]], **TOL)


def test_masked_control_never_selects_removed_experts():
    model, blocks = _model()
    allowed = torch.ones(E, dtype=torch.bool)
    allowed[[1, 6]] = False
    seen: list[torch.Tensor] = []
    _logits(model, blocks=blocks, controls=kept_controls(blocks, {b.layer: [0, 2, 3, 4, 5, 7] for b in blocks}),
            observer=lambda e: seen.append(e.top_k_index))
    assert len(seen) == len(blocks)
    assert all(not bool(((idx == 1) | (idx == 6)).any()) for idx in seen)
    assert any(bool((idx < 0).any()) for idx in seen)  # skip slots reach observers as no expert


# --- profile ---------------------------------------------------------------------------------------


@torch.no_grad()
def naive_stats(model, seqs: list[list[int]], ka: int) -> dict[str, torch.Tensor]:
    """Every profile statistic per token in float64, one record at a time, from the router's own
    outputs and the experts' input: skip selections count nowhere, probabilities are taken over
    all E + 1 classes and kept for the E experts, PreMoe ranks the expert columns."""
    blocks = find_moe_blocks(model)
    L = len(blocks)
    H = model.config.hidden_size
    cap: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for b in blocks:
        for what, path in (("x", b.experts_path), ("h", b.prenorm_path)):

            def grab(_m, args, _k=(what, b.index)):
                cap[_k] = args[0].reshape(-1, args[0].shape[-1])

            handles.append(model.get_submodule(path).register_forward_pre_hook(grab))

        def grab_logits(_m, _a, out, _k=("s", b.index)):
            cap[_k] = out[0]

        handles.append(b.router(model).register_forward_hook(grab_logits))
    f64 = torch.float64
    names = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1", "gate_sq")
    out = {n: torch.zeros(L, E, dtype=f64) for n in names}
    lsq_num = torch.zeros(L, E, H, dtype=f64)  # Σ g² e: the least-squares novice's numerator
    per_expert: list[list[list[torch.Tensor]]] = [[[] for _ in range(E)] for _ in range(L)]
    rows: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(L)] for n in ("q", "f", "i")}
    sample_gate = torch.zeros(len(seqs), L, E, dtype=f64)
    skips = 0
    try:
        for s_idx, seq in enumerate(seqs):
            model(input_ids=torch.tensor([seq]), use_cache=False)
            for b in blocks:
                li, experts = b.index, b.experts(model)
                logits, x, h = cap[("s", li)], cap[("x", li)], cap[("h", li)].double()
                p = torch.softmax(logits.double(), -1)
                bias = model.get_buffer(b.selection_bias_path).double()
                for t in range(x.shape[0]):
                    i = int(torch.argmax(p[t] + bias))  # top-1 on p + balancing bias
                    h_new, contrib = h[t].clone(), []
                    if i == E:  # the skip class: no expert
                        skips += 1
                    else:
                        g = float(p[t, i])
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
                    out["prob"][li] += p[t, :E]
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
    out["_skips"] = torch.tensor(skips)
    return out


def _seqs(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 256, (n,), generator=g).tolist() for n in lengths]


def test_statistics_match_naive_float64_reference():
    model, blocks = _model()
    lengths = (7, 1, 23, 3, 12)  # batches of 3 carry padding
    seqs = _seqs(0, lengths)
    got = calibrate(model, seqs, batch_size=3, premoe_ka=3, per_sample=True, premoe_exact=True)
    ref = naive_stats(model, seqs, 3)
    skips = int(ref.pop("_skips"))
    assert_same(got, ref)
    assert skips > 0 and int(got["count"].sum()) + skips == sum(lengths) * len(blocks)


def test_layer_by_layer_pass_equals_the_whole_model_pass(tmp_path):
    """--offload sequential hands each layer's router state to the next layer's router."""
    from moeprune.offload import calibrate_sequential

    model, _ = _model()
    model.save_pretrained(tmp_path, save_original_format=True, max_shard_size="100KB")
    seqs = _seqs(2, (7, 1, 20, 3))
    kwargs = {"batch_size": 2, "pad_id": 0, "premoe_ka": 3, "per_sample": True}
    got = calibrate_sequential(tmp_path, seqs, **kwargs)
    assert_same(got, calibrate(model, seqs, **kwargs))


def test_layer_by_layer_pass_runs_the_router_the_stock_loader_runs(tmp_path):
    """transformers' from_pretrained writes -1 over ZAYA's loaded skip bias (_init_weights, after
    loading); the layer-by-layer pass does the same, so it profiles the model users load."""
    from moeprune.offload import calibrate_sequential

    model, _ = _model()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for layer in other.model.layers:
            layer.mlp.gate.balancing_biases[-1] = -0.9
    _save(other, tmp_path, "hub")
    assert float(_tensor(tmp_path, "model.layers.0.mlp.gate.balancing_biases")[-1]) == pytest.approx(-0.9)
    stock = _load_stock(tmp_path)
    assert all(float(layer.mlp.gate.balancing_biases[-1]) == -1.0 for layer in stock.model.layers)
    seqs = _seqs(2, (7, 1, 20, 3))
    kwargs = {"batch_size": 2, "pad_id": 0, "premoe_ka": 3, "per_sample": True}
    got = calibrate_sequential(tmp_path, seqs, **kwargs)
    assert_same(got, calibrate(stock, seqs, **kwargs))
    with pytest.raises(AssertionError):
        assert_same(got, calibrate(other, seqs, **kwargs))  # the checkpoint's -0.9 routes differently


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


def _tensor(path: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    ckpt = Checkpoint.open(path)
    with safe_open(str(path / ckpt.tensors[key].file), "pt") as f:
        return f.get_tensor(key)


@pytest.mark.parametrize("layout", ["fused", "hub"])
def test_pruned_checkpoint_equals_the_masked_original(layout, tmp_path):
    model, blocks = _model()
    src = _save(model, tmp_path / "src", layout)
    kept = _kept(blocks)
    rewrite_checkpoint(src, tmp_path / "out", kept)
    pruned = _load_stock(tmp_path / "out")
    torch.testing.assert_close(_logits(pruned), _masked(model, blocks, kept), **TOL)
    assert not torch.allclose(_logits(model), _masked(model, blocks, kept), **TOL)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts"] == 6
    src_keys, out_keys = Checkpoint.open(src).tensors, Checkpoint.open(tmp_path / "out").tensors
    assert set(src_keys) == set(out_keys)
    for b in blocks:
        rows = kept[b.layer] + [E]  # the skip row stays, last
        for rel in EXPERT_TENSORS:
            key = f"{b.path}.{rel}"
            assert torch.equal(_tensor(tmp_path / "out", key), _tensor(src, key)[rows]), key
        # the rest of the router MLP (hidden widths, the state scale) is untouched
        for key in src_keys:
            if key.startswith(f"{b.path}.gate.") and key[len(b.path) + 1 :] not in EXPERT_TENSORS:
                assert torch.equal(_tensor(tmp_path / "out", key), _tensor(src, key)), key


def test_ragged_checkpoint_loads_exactly(tmp_path):
    model, blocks = _model()
    src = _save(model, tmp_path / "src", "hub")
    kept = _ragged(blocks)
    assert len({len(v) for v in kept.values()}) > 1
    rewrite_checkpoint(src, tmp_path / "out", kept)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _masked(model, blocks, kept), **TOL)


def test_pad_uniform_is_refused(tmp_path):
    """A padding expert's row would enter the softmax over E + 1 classes: no exactly dead expert."""
    model, blocks = _model()
    src = _save(model, tmp_path / "src", "fused")
    with pytest.raises(UserError, match="softmax denominator") as err:
        rewrite_checkpoint(src, tmp_path / "out", _ragged(blocks), pad_uniform=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_novice_checkpoint_loads_exactly(tmp_path):
    model, blocks = _model()
    src = _save(model, tmp_path / "src", "hub")
    kept = _ragged(blocks, seed=11)
    novices = _novices(blocks, kept, model.config.hidden_size)
    rewrite_checkpoint(src, tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _novice_reference(model, blocks, kept, novices), **TOL)


def test_adaptive_model_equals_the_pruned_checkpoint(tmp_path):
    from test_adaptive import _library

    model, blocks = _model()
    src = _save(model, tmp_path / "src", "hub")
    a = _kept(blocks)
    b = {layer: sorted(set(range(E)) - {(layer + 2) % E, (layer + 6) % E}) for layer in a}
    lib = _library(model, blocks, {"a": a, "b": b})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32", task="a")
    for name in ("b", "a"):
        rewrite_checkpoint(src, tmp_path / f"pruned-{name}", lib.task(name).plan.kept)
        pruned = _load_stock(tmp_path / f"pruned-{name}")
        am.activate(name)
        torch.testing.assert_close(_logits(am.model), _logits(pruned), rtol=1e-6, atol=1e-6)


def test_inspect_reports_the_skip_class(tmp_path, capsys):
    from _cli import run_cli

    model, _ = _model()
    _save(model, tmp_path, "hub")
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model_type"] == "zaya" and report["moe_layers"] == LAYERS
    assert report["num_experts"] == E and report["top_k"] == 1
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0 and "'skip' class" in out
