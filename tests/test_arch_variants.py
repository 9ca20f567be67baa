"""MoE types with one more piece than the common layout, beyond the parametrized architecture tests
(tests/test_arch.py, test_surgery.py, test_surgery_modes.py, test_adaptive.py, test_inspect.py run
every supported type): Ergo's per-expert post-norm and transposed hub router, DeepSeek-V4's hash
layers kept whole, the types that stay refused and why."""

from __future__ import annotations

import pytest
import torch

import moeprune
from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.calibrate import calibrate
from moeprune.checkpoint import Checkpoint
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model
from test_profile import LENGTHS, _seqs, assert_same, naive_stats

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


@pytest.mark.parametrize("model_type", ["ergo"])
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


@pytest.mark.parametrize("model_type", ["hy_v4"])
def test_sequential_offload_carries_the_state_layers_hand_on(model_type, tmp_path, capsys):
    """HY-V4's decoder layers return (hidden, indexer top-k) and the next layer reads it as
    ``prev_topk_indices``: `profile --offload sequential` used to crash unpacking the stubbed
    layers; it now hands each layer's real extra outputs to the next and equals the in-memory pass."""
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
