"""Multimodal wrappers (``*ForConditionalGeneration``) around an MoE language model: the language
model's experts are profiled and pruned, every other tensor (vision/audio towers, projectors) is
copied, and the pruned checkpoint loads in the same stock class, equal to the masked original."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch

from moeprune.arch import find_moe_blocks, kept_controls, llama4, patch_moe
from moeprune.arch.table import ARCH_TABLE, UNSUPPORTED
from moeprune.arch.wrappers import WRAPPED, WRAPPER_REFUSED, wrapper_class
from moeprune.errors import UserError
from moeprune.surgery import rewrite_checkpoint
from moeprune.testing.tiny import byte_tokenizer
from moeprune.testing.wrappers import MOE_WRAPPER_TYPES, tiny_wrapper, wrapper_config

TYPES = sorted(WRAPPED)
TOL = {"rtol": 1e-5, "atol": 1e-5}


@cache
def _model(model_type: str):
    model = tiny_wrapper(model_type)
    return model, find_moe_blocks(model)


def _stock(model_type: str) -> type:
    import transformers

    return getattr(transformers, WRAPPED[model_type].cls)


def _ids(model) -> torch.Tensor:
    vocab = model.config.get_text_config().vocab_size
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids(model), use_cache=False).logits


def _masked(model, blocks, kept, top_k=None) -> torch.Tensor:
    with torch.no_grad(), patch_moe(model, blocks, controls=kept_controls(blocks, kept, top_k)):
        return model(input_ids=_ids(model), use_cache=False).logits


def _kept(blocks) -> dict[int, list[int]]:
    """6 of 8 experts (equal per routing group), different ones per layer."""
    kept = {}
    for b in blocks:
        size = b.num_experts // max(1, b.spec.n_group)
        drop = {g * size + (b.layer + g) % size for g in range(max(1, b.spec.n_group))}
        if b.spec.n_group <= 1:
            drop |= {(3 * b.layer + 5) % b.num_experts}
        kept[b.layer] = sorted(set(range(b.num_experts)) - drop)
    return kept


def _load_strict(cls, path: Path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"] and not info["error_msgs"], info
    return model.eval()


def test_every_moe_wrapper_is_classified():
    """Every wrapper type of the installed transformers with routed experts in its language model
    is supported, refused for a reason, or has a refused text type (whose reason then applies)."""
    for t in MOE_WRAPPER_TYPES:
        text = wrapper_config(t).get_text_config().model_type if t not in WRAPPER_REFUSED else None
        assert t in WRAPPED or t in WRAPPER_REFUSED or text in UNSUPPORTED or text in ARCH_TABLE, t
    assert set(WRAPPED) <= set(MOE_WRAPPER_TYPES)


def test_the_wrapper_class_is_the_one_the_checkpoint_names(tmp_path):
    """A checkpoint whose architectures name the wrapper is built as the wrapper; a composite config
    naming no class (or the text-only causal LM) is built as the causal LM, as before."""
    from moeprune.modelio import build_on_meta, load_config

    model, _ = _model("llama4")
    model.save_pretrained(tmp_path / "m")
    config = load_config(str(tmp_path / "m"))
    assert wrapper_class(config) is _stock("llama4")
    assert type(build_on_meta(config)).__name__ == "Llama4ForConditionalGeneration"
    for archs in (None, ["Llama4ForCausalLM"]):
        config.architectures = archs
        assert wrapper_class(config) is None
        assert type(build_on_meta(config)).__name__ == "Llama4ForCausalLM"


@pytest.mark.parametrize("model_type", TYPES)
def test_wrapper_routes_and_recomputes_exactly(model_type):
    """The language model's blocks: route() = the router, recomputed experts reproduce the logits."""
    model, blocks = _model(model_type)
    assert type(model) is _stock(model_type)
    assert all(b.path.startswith(WRAPPED[model_type].layers) for b in blocks)
    seen = {}
    hooks = []
    for b in blocks:

        def hook(_mod, args, out, _b=b):
            if _b.spec.gate_site == "input":
                index, weights = llama4.model_routing(out[0], out[1], _b.top_k)
                out = (out[1], weights, index)
            # the router's logits over all its columns (Gemma-4 returns probabilities, Inkling its
            # routed columns only: arch/extended.py)
            logits = _b.router_logits(_mod, args[0], out)
            seen[_b.index] = tuple(o.detach().clone() for o in (logits, *out[1:3]))

        hooks.append(b.router(model).register_forward_hook(hook))
    try:
        reference = _logits(model)
    finally:
        for h in hooks:
            h.remove()
    for b in blocks:
        logits, weights, index = seen[b.index]
        r = b.route(model, logits)
        own, own_order = index.sort(dim=-1)
        ours, our_order = r.top_k_index.sort(dim=-1)
        assert torch.equal(own, ours)
        applied = weights.float() * (b.spec.scaling if b.spec.scaling_site == "block" else 1.0)
        torch.testing.assert_close(applied.gather(-1, own_order), r.top_k_weights.gather(-1, our_order),
                                   rtol=1e-5, atol=1e-6)
    with torch.no_grad(), patch_moe(model, blocks, reroute=True):
        torch.testing.assert_close(model(input_ids=_ids(model), use_cache=False).logits, reference, **TOL)


@pytest.mark.parametrize("layout", ["fused", "hub"])
@pytest.mark.parametrize("model_type", TYPES)
def test_pruned_wrapper_loads_in_the_stock_class(model_type, layout, tmp_path):
    model, blocks = _model(model_type)
    model.save_pretrained(tmp_path / "src", save_original_format=(layout == "hub"))
    kept = _kept(blocks)
    result = rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    assert result.bytes_out < result.bytes_in
    pruned = _load_strict(_stock(model_type), tmp_path / "out")
    # everything but the routed experts and routers (towers, projectors, the rest of the LM) is copied
    moe = tuple(p + "." for b in blocks for p in (b.experts_path, b.router_path))
    original = dict(model.named_parameters())
    towers = [n for n in original if not n.startswith(WRAPPED[model_type].layers)]
    assert any(w in n for n in towers for w in ("vision", "visual", "audio", "projector", "sam_"))
    for name, p in pruned.named_parameters():
        if not name.startswith(moe):
            assert torch.equal(p, original[name]), name
    assert [b.num_experts for b in find_moe_blocks(pruned)] == [len(kept[b.layer]) for b in blocks]
    ref = _masked(model, blocks, kept)
    torch.testing.assert_close(_logits(pruned), ref, **TOL)
    import moeprune

    torch.testing.assert_close(_logits(moeprune.load(tmp_path / "out", dtype=torch.float32)), ref, **TOL)


def test_pruned_wrapper_loads_as_image_text_to_text(tmp_path):
    from transformers import AutoModelForImageTextToText

    model, blocks = _model("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "src")
    kept = _kept(blocks)
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, top_k=1)
    pruned = _load_strict(AutoModelForImageTextToText, tmp_path / "out")
    assert type(pruned) is type(model)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "`Qwen3VLMoeForConditionalGeneration.from_pretrained(path)`" in card
    assert "vision/audio towers, projectors) is copied unchanged" in card
    torch.testing.assert_close(_logits(pruned), _masked(model, blocks, kept, top_k=1), **TOL)


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "llama4", "glm4v_moe"])
def test_ragged_wrapper_loads_exactly(model_type, tmp_path):
    import moeprune
    from test_surgery_modes import _deeper_overrides

    model = tiny_wrapper(model_type, **_deeper_overrides(model_type))
    blocks = find_moe_blocks(model)
    assert len(blocks) >= 2
    model.save_pretrained(tmp_path / "src")
    kept = {}
    for j, b in enumerate(blocks):
        g = max(1, b.spec.n_group)
        per = [4, 3, 2][j % 3] if g == 1 else [3, 2][j % 2]
        size = b.num_experts // g
        kept[b.layer] = [grp * size + (i + j) % size for grp in range(g) for i in range(per)]
        kept[b.layer] = sorted(kept[b.layer])
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    assert type(loaded).__name__ == type(model).__name__
    torch.testing.assert_close(_logits(loaded), _masked(model, blocks, kept), **TOL)


def test_adaptive_wrapper_equals_the_pruned_checkpoint(tmp_path):
    from moeprune.adaptive import AdaptiveMoE
    from test_adaptive import _library

    model, blocks = _model("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "src")
    byte_tokenizer().save_pretrained(tmp_path / "src")
    a = _kept(blocks)
    am = AdaptiveMoE.from_library(tmp_path / "src", _library(model, blocks, {"a": a}), dtype="float32", task="a")
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", a)
    pruned = _load_strict(_stock("qwen3_vl_moe"), tmp_path / "out")
    torch.testing.assert_close(_logits(am.model), _logits(pruned), **TOL)


@pytest.mark.parametrize("model_type", ["llama4", "muse_spark"])
def test_profile_of_a_wrapper_matches_the_naive_reference(model_type):
    """The same statistics as for causal LMs, on the wrapper's language model (test_profile's
    float64 per-token reference; Muse-Spark: each expert's output mapped by post_expert_proj)."""
    from _reference import assert_same, naive_stats
    from moeprune.calibrate import calibrate
    from test_profile import LENGTHS, _seqs

    model, _ = _model(model_type)
    seqs = _seqs(LENGTHS[:4])
    got = calibrate(model, seqs, batch_size=2, premoe_ka=3, per_sample=True, premoe_exact=True)
    assert_same(got, naive_stats(model, seqs, 3))


def test_inspect_names_the_wrapper(tmp_path, capsys):
    from _cli import run_cli

    model, _ = _model("qwen3_vl_moe")
    model.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    rc, out, err = run_cli(capsys, "inspect", str(tmp_path / "m"))
    assert rc == 0, err
    assert "Qwen3VLMoeForConditionalGeneration" in out


@pytest.mark.parametrize("model_type", sorted(WRAPPER_REFUSED))
def test_refused_wrappers_say_why(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from moeprune.modelio import build_on_meta

    with pytest.raises(UserError, match="not supported: .{40,}"):
        build_on_meta(CONFIG_MAPPING[model_type]())


def test_architectures_doc_lists_every_wrapper():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "architectures.md").read_text()
    assert f"## Multimodal wrappers: supported ({len(WRAPPED)} types)" in doc
    for t in WRAPPED:
        assert f"| {t} | {WRAPPED[t].cls} |" in doc, t
    for t in MOE_WRAPPER_TYPES:
        if t not in WRAPPED:
            assert f"| {t} | " in doc, t


@pytest.mark.parametrize("model_type", ["qwen3_vl_moe", "llama4", "muse_spark"])
def test_novice_wrapper_checkpoint(model_type, tmp_path):
    """MoNE novices in a wrapper's language model load exactly with moeprune.load (Llama-4: refused,
    its experts module never sees the routing; Muse-Spark: refused, a novice is a residual-stream
    vector and its experts run in a projected space)."""
    import moeprune
    from moeprune.arch import BlockControl

    model, blocks = _model(model_type)
    model.save_pretrained(tmp_path / "src")
    kept = {b.layer: [0, 2, 3, 5, 6] for b in blocks}
    gen = torch.Generator().manual_seed(7)
    hidden = model.config.get_text_config().hidden_size
    novices = {b.layer: torch.randn(3, hidden, generator=gen) for b in blocks}
    if model_type == "llama4":
        with pytest.raises(UserError, match="receives only the score-scaled inputs"):
            rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
        return
    if model_type == "muse_spark":
        with pytest.raises(UserError, match="projected space"):
            rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
        controls = {b.index: BlockControl(novices={1: novices[b.layer][0]}) for b in blocks}
        with pytest.raises(UserError, match="projected space"), patch_moe(model, blocks, controls=controls):
            pass
        return
    rewrite_checkpoint(tmp_path / "src", tmp_path / "out", kept, mode="novice", novices=novices)
    loaded = moeprune.load(tmp_path / "out", dtype=torch.float32)
    assert type(loaded).__name__ == type(model).__name__
    controls = {
        b.index: BlockControl(novices=dict(zip([1, 4, 7], novices[b.layer], strict=True))) for b in blocks
    }
    with torch.no_grad(), patch_moe(model, blocks, controls=controls):
        ref = model(input_ids=_ids(model), use_cache=False).logits
    torch.testing.assert_close(_logits(loaded), ref, **TOL)


@pytest.mark.parametrize("model_type", ["llama4", "qwen3_vl_moe"])
def test_sequential_offload_profiles_a_wrapper_like_memory(model_type, tmp_path):
    """--offload sequential reads a wrapper checkpoint one decoder layer at a time: same profile."""
    from _reference import assert_same
    from moeprune.profile import Profile
    from test_profile import _run

    model, _ = _model(model_type)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "alpha beta gamma delta"}\n{"text": "the quick brown fox jumps over"}\n')
    full, seq = tmp_path / "full.profile.safetensors", tmp_path / "seq.profile.safetensors"
    assert _run("profile", tmp_path / "m", "--data", data, "--out", full, "--per-sample", "-q") == 0
    assert _run("profile", tmp_path / "m", "--data", data, "--out", seq, "--per-sample",
                "--offload", "sequential", "-q") == 0
    assert_same(Profile.load(full).tensors, Profile.load(seq).tensors)
