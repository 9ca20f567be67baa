"""PhiMoE's sparsemixer and DBRX's row-blocked experts, beyond the parametrized architecture tests:
the sparsemixer is reproduced for any threshold and masking equals removal exactly; top-k cannot be
lowered; DBRX checkpoints are sliced in blocks of rows and the nested ffn_config is rewritten."""

from __future__ import annotations

import json

import pytest
import torch

from moeprune.arch import find_moe_blocks, kept_controls, patch_moe
from moeprune.arch.routing import RoutingSpec, route
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import tiny_model


def _sparsemixer_spec(eps: float) -> RoutingSpec:
    return RoutingSpec(top_k=2, selector="sparsemixer", jitter_eps=eps)


def _logits(t: int = 64, e: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, e, generator=g)
    logits[:4] = logits[:4].round()  # ties and exact zeros
    logits[4] = -logits[4].abs() - 1  # every logit negative (the threshold clamps at a negative max)
    return logits


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.3, 1.0])
def test_sparsemixer_equals_transformers_at_inference(eps):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = _logits()
    weights, index = sparsemixer(logits, jitter_eps=eps, training=False)
    r = route(_sparsemixer_spec(eps), logits)
    assert torch.equal(r.top_k_index, index)
    torch.testing.assert_close(r.top_k_weights, weights, rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.01, 0.3, 1.0])
def test_sparsemixer_masking_equals_removing_the_router_rows(eps):
    """-inf logits for removed experts give what the model computes on the kept logits alone."""
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    logits = _logits(seed=3)
    for kept in ([0, 2, 3, 5, 7], [1, 6], [0, 1, 2, 3, 4, 5, 6]):
        allowed = torch.zeros(8, dtype=torch.bool)
        allowed[kept] = True
        r = route(_sparsemixer_spec(eps), logits, allowed=allowed)
        weights, local = sparsemixer(logits[:, kept], jitter_eps=eps, training=False)
        assert torch.equal(r.top_k_index, torch.tensor(kept)[local])
        torch.testing.assert_close(r.top_k_weights, weights, rtol=0, atol=0)


def test_sparsemixer_top_k_cannot_change():
    with pytest.raises(ValueError, match="always selects 2"):
        route(_sparsemixer_spec(0.01), _logits(), top_k=1)


def test_phimoe_prune_refuses_a_lowered_top_k(tmp_path):
    model = tiny_model("phimoe")
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 1, 2, 4, 5, 6] for b in blocks}
    with pytest.raises(UserError, match="always selects 2 experts"):
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, top_k=1)
    assert not (tmp_path / "out").exists()


def test_phimoe_hub_checkpoint_prunes_exactly_with_the_published_threshold(tmp_path):
    """The published router_jitter_noise (0.01), hub layout (block_sparse_moe.experts.<i>.w1)."""
    from transformers import AutoModelForCausalLM

    model = tiny_model("phimoe", router_jitter_noise=0.01)
    blocks = find_moe_blocks(model)
    assert blocks[0].spec.jitter_eps == 0.01
    model.save_pretrained(tmp_path / "src", save_original_format=True)
    keys = json.dumps(sorted(_keys(tmp_path / "src")))
    assert "block_sparse_moe.experts.7.w1.weight" in keys
    kept = {b.layer: [1, 2, 3, 6] for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = pruned(ids, use_cache=False).logits
        with patch_moe(model, blocks, controls=kept_controls(blocks, kept)):
            ref = model(ids, use_cache=False).logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def _keys(path) -> list[str]:
    from moeprune.checkpoint import Checkpoint

    return list(Checkpoint.open(path).tensors)


# --- DBRX ------------------------------------------------------------------------------------------


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))


def _masked(model, blocks, kept) -> torch.Tensor:
    with torch.no_grad(), patch_moe(model, blocks, controls=kept_controls(blocks, kept)):
        return model(_ids(), use_cache=False).logits


@pytest.mark.parametrize("p", [2.0, None])
def test_dbrx_routes_with_any_normalisation(p):
    """moe_normalize_expert_weights: the p-norm of the chosen weights (default 1), or none."""
    model = tiny_model("dbrx", ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2,
                                           "moe_normalize_expert_weights": p})
    blocks = find_moe_blocks(model)
    assert blocks[0].spec.renorm_p == p
    ffn = blocks[0].block(model)
    logits = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    weights, index = ffn.route_tokens_to_experts(logits)
    r = blocks[0].route(model, logits)
    assert torch.equal(r.top_k_index, index)
    torch.testing.assert_close(r.top_k_weights, weights, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        ref = model(_ids(), use_cache=False).logits
        with patch_moe(model, blocks, reroute=True):
            torch.testing.assert_close(model(_ids(), use_cache=False).logits, ref, rtol=1e-5, atol=1e-5)


def test_dbrx_checkpoint_slices_row_blocks_and_the_nested_config(tmp_path):
    from safetensors import safe_open

    model = tiny_model("dbrx")
    blocks = find_moe_blocks(model)
    assert blocks[0].layout.rows_per_expert == 32 and blocks[0].prenorm_path.endswith("norm_attn_norm.norm_2")
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 3, 4, 7] for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, top_k=1)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["ffn_config"]["moe_num_experts"] == 4 and config["ffn_config"]["moe_top_k"] == 1
    name = f"transformer.blocks.{blocks[1].layer}.ffn.experts.mlp.w2"
    with safe_open(tmp_path / "src" / "model.safetensors", "pt") as a, safe_open(
        tmp_path / "out" / "model.safetensors", "pt"
    ) as b:
        full, pruned = a.get_tensor(name), b.get_tensor(name)
    assert pruned.shape == (4 * 32, 64)
    assert torch.equal(pruned, full.view(8, 32, 64)[[0, 3, 4, 7]].reshape(-1, 64))


@pytest.mark.parametrize("model_type", ["dbrx", "phimoe"])
def test_novice_checkpoint_loads_exactly(model_type, tmp_path):
    import moeprune
    from moeprune.arch import BlockControl

    model = tiny_model(model_type)
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src", save_original_format=True)
    kept = {b.layer: [1, 2, 5] if b.index % 2 else [0, 3, 4, 6, 7] for b in blocks}
    gen = torch.Generator().manual_seed(7)
    novices = {b.layer: torch.randn(8 - len(kept[b.layer]), 64, generator=gen) for b in blocks}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    controls = {}
    for b in blocks:
        replaced = sorted(set(range(8)) - set(kept[b.layer]))
        controls[b.index] = BlockControl(novices=dict(zip(replaced, novices[b.layer], strict=True)))
    with torch.no_grad():
        with patch_moe(model, blocks, controls=controls):
            ref = model(_ids(), use_cache=False).logits
        torch.testing.assert_close(loaded(_ids(), use_cache=False).logits, ref, rtol=1e-5, atol=1e-5)


def test_dbrx_pad_uniform_is_refused(tmp_path):
    model = tiny_model("dbrx")
    blocks = find_moe_blocks(model)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 1, 2, 3, 4, 5][: 4 + b.index] for b in blocks}
    with pytest.raises(UserError, match="no additive selection bias"):
        rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, pad_uniform=True)
    assert not (tmp_path / "out").exists()


def test_phimoe_one_shot_refuses_a_lowered_top_k_before_calibrating(tmp_path, capsys, monkeypatch):
    import moeprune.calibrate as calibrate_module
    from _cli import assert_user_error, run_cli
    from moeprune.testing.tiny import byte_tokenizer

    model = tiny_model("phimoe")
    model.save_pretrained(tmp_path / "model")
    byte_tokenizer().save_pretrained(tmp_path / "model")
    (tmp_path / "d.jsonl").write_text('{"text": "alpha beta gamma"}\n')

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibrated before refusing --top-k")

    monkeypatch.setattr(calibrate_module, "calibrate", no_calibration)
    capsys.readouterr()  # the progress bar of save_pretrained
    rc, _, err = run_cli(
        capsys, "prune", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
        "--method", "easyep", "--keep", "0.5", "--top-k", "1", "--out", str(tmp_path / "out"),
    )
    assert_user_error(rc, err, "top-k", "always selects 2")
    assert not (tmp_path / "out").exists()


# --- JetMoE ----------------------------------------------------------------------------------------


def test_jetmoe_attention_and_mlp_experts_share_one_count():
    """Why JetMoE stays refused: the one config count sizes both expert sets, so a checkpoint with
    fewer MLP experts than attention experts cannot be described by its config."""
    model = tiny_model("jetmoe", num_local_experts=6)
    layer = model.model.layers[0]
    assert layer.mlp.input_linear.weight.shape[0] == 6
    assert layer.self_attention.experts.input_linear.weight.shape[0] == 6
    with pytest.raises(UserError, match="not supported: one num_local_experts sizes both"):
        find_moe_blocks(model)
