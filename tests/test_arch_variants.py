"""MoE types with one more piece than the common layout, beyond the parametrized architecture tests
(tests/test_arch.py, test_surgery.py, test_surgery_modes.py, test_adaptive.py, test_inspect.py run
every supported type): Ergo's per-expert post-norm and transposed hub router, DeepSeek-V4's hash
layers kept whole, the types that stay refused and why."""

from __future__ import annotations

import json

import pytest
import torch

import moeprune
from _reference import assert_same, naive_stats
from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model
from test_profile import LENGTHS, _seqs

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _ids(vocab: int = 256) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model, **patch) -> torch.Tensor:
    with torch.no_grad():
        if not patch:
            return model(_ids(), use_cache=False).logits
        with patch_moe(model, **patch):
            return model(_ids(), use_cache=False).logits


def _masked(model, blocks, kept) -> torch.Tensor:
    return _logits(model, blocks=blocks, controls=kept_controls(blocks, kept))


def _deeper(model_type: str):
    """Four decoder layers (three MoE layers where the first is dense)."""
    from test_surgery_modes import _deeper_overrides

    return tiny_model(model_type, **_deeper_overrides(model_type))


# --- profile statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["ergo", "deepseek_v4"])
def test_statistics_match_naive_float64_reference(model_type):
    model = tiny_model(model_type)
    seqs = _seqs(LENGTHS)
    got = calibrate(model, seqs, batch_size=3, premoe_ka=3, per_sample=True, premoe_exact=True)
    assert_same(got, naive_stats(model, seqs, 3))


# --- Ergo -----------------------------------------------------------------------------------------


def test_ergo_post_norm_is_an_expert_tensor_and_is_sliced(tmp_path):
    from safetensors import safe_open

    model = tiny_model("ergo")
    blocks = find_moe_blocks(model)
    layout = blocks[0].layout
    assert layout.tensors["post_expert_norm.weight"] == (8, 64)
    assert blocks[0].prenorm_path.endswith("pre_feedforward_layernorm")
    # the norms differ per expert, so slicing them wrongly would show in the logits
    with torch.no_grad():
        for b in blocks:
            b.experts(model).post_expert_norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 2, 3, 5, 6, 7] for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    layer = blocks[0].layer
    param = model.get_parameter(f"model.layers.{layer}.mlp.experts.post_expert_norm.weight").detach()
    stored = f"layers.{layer}.feed_forward.expert_output_norm.scale"  # Ergo saves its own names
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert torch.equal(f.get_tensor(stored), param[kept[layer]])
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(pruned), _masked(model, blocks, kept), **TOL)


def test_ergo_hub_layout_slices_the_transposed_router(tmp_path):
    """Ergo publishes its router as feed_forward.gate_kernel [H, E] (transposed on load): its
    expert axis on disk is 1. Ragged removal and the adaptive model both read it right."""
    from moeprune.adaptive import AdaptiveMoE
    from moeprune.testing.tiny import byte_tokenizer
    from test_adaptive import _library

    model = _deeper("ergo")
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src", save_original_format=True)
    byte_tokenizer().save_pretrained(tmp_path / "src")
    keys = Checkpoint.open(tmp_path / "src").tensors
    kernel = f"layers.{blocks[0].layer}.feed_forward.gate_kernel"
    assert kernel in keys and keys[kernel].shape == (64, 8)
    ragged = {b.layer: [[0, 1, 4, 6, 7], [1, 2, 3], [0, 3, 5, 6]][b.index % 3] for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", ragged)
    assert Checkpoint.open(tmp_path / "out").tensors[kernel].shape == (64, 5)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _masked(model, blocks, ragged), **TOL)
    uniform = {b.layer: [1, 2, 4, 5, 6, 7] if b.index % 2 else [0, 1, 2, 3, 5, 7] for b in blocks}
    lib = _library(model, blocks, {"a": uniform})
    am = AdaptiveMoE.from_library(tmp_path / "src", lib, dtype="float32", task="a")
    rewrite_checkpoint(tmp_path / "src", tmp_path / "uniform", uniform)
    from transformers import AutoModelForCausalLM

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "uniform", dtype=torch.float32).eval()
    assert torch.equal(_logits(am.model), _logits(pruned))
    torch.testing.assert_close(_logits(pruned), _masked(model, blocks, uniform), **TOL)


# --- sequential offload of layers that hand state to the next layer -------------------------------


@pytest.mark.parametrize("model_type", ["hy_v4", "deepseek_v4", "ergo"])
def test_sequential_offload_carries_the_state_layers_hand_on(model_type, tmp_path, capsys):
    """HY-V4's decoder layers return (hidden, indexer top-k) and the next layer reads it as
    ``prev_topk_indices``: `profile --offload sequential` used to crash unpacking the stubbed
    layers; it now hands each layer's real extra outputs to the next and equals the in-memory pass
    (also for DeepSeek-V4, whose hash layers read input_ids, and Ergo)."""
    from _cli import run_cli
    from moeprune.offload import calibrate_sequential
    from moeprune.testing.tiny import byte_tokenizer

    model = _deeper(model_type)
    assert len(find_moe_blocks(model)) >= 2
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    seqs = _seqs(LENGTHS)
    kwargs = {"batch_size": 3, "premoe_ka": 3, "per_sample": True}
    assert_same(calibrate_sequential(tmp_path / "m", seqs, **kwargs), calibrate(model, seqs, **kwargs))
    (tmp_path / "d.jsonl").write_text('{"text": "alpha beta gamma delta"}\n')
    capsys.readouterr()
    rc, _, err = run_cli(
        capsys, "profile", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
        "--offload", "sequential", "--out", str(tmp_path / "p.profile.safetensors"), "-q",
    )
    assert rc == 0, err
    assert (tmp_path / "p.profile.safetensors").exists()


# --- DeepSeek-V4 ----------------------------------------------------------------------------------


def _v4(tmp_path, layout: str = "fused"):
    """Four layers [hash, moe, hash, moe] with diverse hash tables, saved."""
    model = _deeper("deepseek_v4")
    g = torch.Generator().manual_seed(3)
    hashed = []
    for i, layer in enumerate(model.model.layers):
        if layer.mlp.is_hash:
            table = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(256)])
            layer.mlp.gate.tid2eid.copy_(table)
            hashed.append(i)
    model.save_pretrained(tmp_path / "src", save_original_format=(layout == "hub"))
    return model, find_moe_blocks(model), hashed


def _tensors(path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("layout", ["fused", "hub"])
def test_deepseek_v4_hash_layers_are_kept_whole(layout, tmp_path):
    from transformers import AutoModelForCausalLM

    model, blocks, hashed = _v4(tmp_path, layout)
    assert hashed == [0, 2] and [b.layer for b in blocks] == [1, 3]
    assert blocks[0].spec.score_fn == "sqrtsoftplus" and blocks[0].prenorm_path is None
    kept = {1: [0, 2, 3, 5, 6, 7], 3: [1, 2, 4, 5, 6, 7]}
    result = rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    assert result.whole_layers == hashed and not result.stock
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["n_routed_experts"] == 8  # the hash layers' count
    assert config["moeprune"]["experts_per_layer"] == {"0": 8, "1": 6, "2": 8, "3": 6}
    before, after = _tensors(tmp_path / "src"), _tensors(tmp_path / "out")
    for key, value in before.items():  # every tensor of a hash layer is copied unchanged
        if any(key.startswith(f"{p}layers.{i}.") for i in hashed for p in ("", "model.")):
            assert torch.equal(after[key], value), key
    assert any("tid2eid" in k for k in after)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    torch.testing.assert_close(_logits(loaded), _masked(model, blocks, kept), **TOL)
    with pytest.raises((RuntimeError, ValueError)):  # ragged: stock loading refuses it
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "hash-routed" in card and "kept whole" in card


def test_deepseek_v4_novice_checkpoint_loads_exactly(tmp_path):
    from moeprune.arch import BlockControl

    model, blocks, _ = _v4(tmp_path)
    kept = {1: [0, 3, 4, 6, 7], 3: [1, 2, 5]}
    gen = torch.Generator().manual_seed(7)
    novices = {b.layer: torch.randn(8 - len(kept[b.layer]), 64, generator=gen) for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    controls = {}
    for b in blocks:
        replaced = sorted(set(range(8)) - set(kept[b.layer]))
        controls[b.index] = BlockControl(novices=dict(zip(replaced, novices[b.layer], strict=True)))
    torch.testing.assert_close(_logits(loaded), _logits(model, blocks=blocks, controls=controls), **TOL)


def test_deepseek_v4_pad_uniform_is_refused_in_one_line(tmp_path):
    _, blocks, _ = _v4(tmp_path)
    kept = {1: [0, 2, 3, 5, 6, 7], 3: [1, 2, 4, 5]}
    with pytest.raises(UserError, match="hash-routed layers keep all their experts") as err:
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, pad_uniform=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_deepseek_v4_with_only_hash_layers_is_refused():
    model = tiny_model("deepseek_v4", mlp_layer_types=["hash_moe", "hash_moe"])
    with pytest.raises(UserError, match="routes by a token-id -> expert table"):
        find_moe_blocks(model)


def test_sqrtsoftplus_routing_masks_like_removal():
    """A removed expert (-inf logit) scores sqrt(softplus(-inf)) = 0 and is never chosen: routing
    over the kept logits alone gives the same experts and weights."""
    from moeprune.arch.routing import RoutingSpec, route

    spec = RoutingSpec(top_k=2, score_fn="sqrtsoftplus", has_selection_bias=True, renormalize=True,
                       renorm_eps=1e-20, scaling=1.5)
    g = torch.Generator().manual_seed(0)
    logits, bias = torch.randn(32, 8, generator=g), torch.randn(8, generator=g) * 0.1
    kept = [0, 2, 3, 5, 6]
    allowed = torch.zeros(8, dtype=torch.bool)
    allowed[kept] = True
    masked = route(spec, logits, bias, allowed=allowed)
    alone = route(spec, logits[:, kept], bias[kept])
    assert torch.equal(masked.top_k_index, torch.tensor(kept)[alone.top_k_index])
    torch.testing.assert_close(masked.top_k_weights, alone.top_k_weights, rtol=0, atol=0)


# --- types that stay refused ------------------------------------------------------------------------


def test_doge_experts_form_a_key_grid_and_its_router_mixes_tokens():
    """Why Doge stays refused: expert ids are computed from a square key grid (so no checkpoint can
    drop single experts), and one token's two key-score halves come from different tokens."""
    model = tiny_model("doge")
    moe = model.model.layers[0].mlp
    assert moe.num_keys ** 2 == moe.num_experts == moe.down_embed.weight.shape[0]
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, logits = moe(x)
        _, changed = moe(torch.cat([x[:, :3], x[:, 3:] * 2], dim=1))
    # token 0's scores change when only tokens 3..5 change: routing is not per token
    assert not torch.allclose(logits[:, 0], changed[:, 0])
    with pytest.raises(UserError, match="product-key grid") as err:
        find_moe_blocks(model)
    assert "\n" not in str(err.value)


# --- Inkling2-Loop --------------------------------------------------------------------------------

_LOOP = {
    "num_hidden_layers": 3,
    "n_layers_per_attn_res_block": 1,
    "loop_layer_index_start": 1,
    "loop_layer_index_end": 2,
    "loop_num_passes": 2,
    "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"],
}


def test_inkling2_loop_removal_is_exact_with_active_loops(tmp_path):
    """Layer 1 runs twice per token (the same experts, two routings): masking equals removal at
    every pass, and the pruned checkpoint loads in the stock class."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("inkling2_loop_text", **_LOOP)
    blocks = find_moe_blocks(model)
    assert [b.layer for b in blocks] == [0, 1, 2]
    calls: list[int] = []
    with torch.no_grad(), patch_moe(model, blocks, observer=lambda e: calls.append(e.block.layer), reroute=True):
        rerouted = model(_ids(), use_cache=False).logits
    assert calls.count(1) == 2 and calls.count(0) == 1  # the looped block runs once per pass
    torch.testing.assert_close(rerouted, _logits(model), **TOL)
    for layout in ("fused", "hub"):
        model.save_pretrained(tmp_path / layout, save_original_format=(layout == "hub"))
        kept = {b.layer: [[0, 1, 3, 4, 6, 7], [1, 2, 3, 5, 6, 7], [0, 2, 3, 4, 5, 6]][b.index] for b in blocks}
        result = rewrite_checkpoint(tmp_path / layout, tmp_path / f"out-{layout}", kept)
        assert result.stock
        pruned = AutoModelForCausalLM.from_pretrained(tmp_path / f"out-{layout}", dtype=torch.float32).eval()
        torch.testing.assert_close(_logits(pruned), _masked(model, blocks, kept), **TOL)


def test_inkling2_loop_profile_of_looped_layers_is_refused_in_one_line(tmp_path, capsys):
    from _cli import assert_user_error, run_cli
    from moeprune.testing.tiny import byte_tokenizer

    model = tiny_model("inkling2_loop_text", **_LOOP)
    with pytest.raises(UserError, match="MoE layers 1-1 are looped"):
        calibrate(model, _seqs([4, 6]))
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    (tmp_path / "d.jsonl").write_text('{"text": "alpha beta gamma"}\n')
    for extra in ((), ("--offload", "sequential")):
        capsys.readouterr()
        rc, _, err = run_cli(
            capsys, "profile", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"),
            "--out", str(tmp_path / "p.profile.safetensors"), *extra,
        )
        assert_user_error(rc, err, "cannot profile", "looped")
    assert not (tmp_path / "p.profile.safetensors").exists()
    # without active loops (the tiny default) it profiles like Inkling2
    assert calibrate(tiny_model("inkling2_loop_text"), _seqs([4, 6]))["tokens"].item() == 10


@pytest.mark.parametrize(("suffix", "fmt"), [("_weight_scale", "MXFP8"), ("_weight_amax", "NVFP4")])
def test_inkling2_loop_quantized_experts_are_refused_in_one_line(suffix, fmt, tmp_path):
    """The published checkpoints store NVFP4 / MXFP8 experts (w13_weight + scales), which
    transformers dequantizes on load and moeprune cannot slice as stored: refused, one line."""
    from safetensors.torch import load_file, save_file

    model = tiny_model("inkling2_loop_text")
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src", save_original_format=True)
    weights = load_file(str(tmp_path / "src" / "model.safetensors"))
    w13 = next(k for k in weights if k.endswith("mlp.experts.w13_weight"))
    weights[w13[: -len("_weight")] + suffix] = torch.ones(8, 4)
    save_file(weights, str(tmp_path / "src" / "model.safetensors"), metadata={"format": "pt"})
    kept = {b.layer: [0, 1, 2, 3, 4, 5] for b in blocks}
    with pytest.raises(UserError, match=f"stored in {fmt}") as err:
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()


def test_inspect_names_the_hash_layers_kept_whole(tmp_path, capsys):
    from _cli import run_cli
    from moeprune.testing.tiny import tiny_config
    from test_surgery_modes import _deeper_overrides

    tiny_config("deepseek_v4", **_deeper_overrides("deepseek_v4")).save_pretrained(tmp_path)
    code, out, err = run_cli(capsys, "inspect", str(tmp_path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["moe_layers"] == [1, 3] and report["whole_moe_layers"] == [0, 2]
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path))
    assert code == 0 and "hash-routed MoE layers" in out


@pytest.mark.parametrize("model_type", ["ergo", "inkling2_loop_text"])
def test_novice_checkpoint_loads_exactly(model_type, tmp_path):
    """MoNE novices: Ergo's kept experts keep their own post-norm rows; the novice constants
    replace the whole expert output (norm included)."""
    from moeprune.arch import BlockControl

    model = _deeper(model_type)
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [[0, 3, 4, 6, 7], [1, 2, 5], [0, 1, 2, 4, 5, 6]][b.index % 3] for b in blocks}
    gen = torch.Generator().manual_seed(7)
    novices = {b.layer: torch.randn(8 - len(kept[b.layer]), 64, generator=gen) for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    controls = {}
    for b in blocks:
        replaced = sorted(set(range(8)) - set(kept[b.layer]))
        controls[b.index] = BlockControl(novices=dict(zip(replaced, novices[b.layer], strict=True)))
    torch.testing.assert_close(_logits(loaded), _logits(model, blocks=blocks, controls=controls), **TOL)
