"""The adaptive model (PreMoe TAER): built from the original checkpoint and a library, it equals
the model pruned with the active task's plan, reads only the experts it lacks, and routes queries
by the first MoE router (float32, tiny random models)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import cache

import pytest
import torch

from _checkpoints import masked_logits, run_logits, save
from moeprune.adaptive import AdaptiveMoE
from moeprune.arch import ARCH_TABLE, find_moe_blocks, kept_controls, patch_moe
from moeprune.arch.pruned import expert_tensor
from moeprune.checkpoint import Checkpoint
from moeprune.errors import UserError
from moeprune.library import Library, TaskPattern
from moeprune.offload import ShardReader
from moeprune.plan import Plan
from moeprune.profile import fingerprint_fields, model_fingerprint
from moeprune.retrieval import FirstLayerProbe, FullModelProbe, route_query
from moeprune.testing.tiny import buildable_types, byte_tokenizer, tiny_model

TYPES = [t for t in buildable_types() if t in ARCH_TABLE]
HUB = ("deepseek_v3", "qwen3_moe", "mixtral", "gpt_oss")


@cache
def _model(model_type: str):
    model = tiny_model(model_type)
    return model, find_moe_blocks(model)


def _kept(blocks, seed: int) -> dict[int, list[int]]:
    """A random pattern per layer keeping 3/4 of the experts, equal per routing group."""
    g = torch.Generator().manual_seed(seed)
    kept = {}
    for b in blocks:
        groups = max(1, b.spec.n_group)
        size = b.num_experts // groups
        per = size - max(1, size // 4)
        kept[b.layer] = sorted(
            int(i) + grp * size for grp in range(groups) for i in torch.randperm(size, generator=g)[:per]
        )
    return kept


def _library(model, blocks, patterns: dict[str, dict[int, list[int]]], keys=None) -> Library:
    fields = fingerprint_fields(model.config, blocks)
    fp = model_fingerprint(fields)
    e = blocks[0].num_experts
    layers = [b.layer for b in blocks]
    tasks = {}
    for i, (name, kept) in enumerate(patterns.items()):
        plan = Plan(fp, model.config.model_type, layers, e, blocks[0].top_k, "frequency", kept)
        g = torch.Generator().manual_seed(i)
        k = (keys or {}).get(name)
        key = {"first": k if k is not None else torch.rand(e, generator=g, dtype=torch.float64)}
        key["all"] = torch.rand(e * len(layers), generator=g, dtype=torch.float64)
        tasks[name] = TaskPattern(name, plan, torch.zeros(len(layers), e, dtype=torch.float64), key)
    keep = len(next(iter(patterns.values()))[layers[0]])
    return Library("tiny", fields, fp, "frequency", keep, blocks[0].top_k, layers, e, tasks)


@contextmanager
def _reads(am: AdaptiveMoE):
    """Record every checkpoint read of ``am``: (key, index) per slice access, keys opened."""
    log: list[tuple[str, object]] = []
    real_open = ShardReader.open

    class Spy:
        def __init__(self, key, sl):
            self.key, self.sl = key, sl

        def __getitem__(self, index):
            log.append((self.key, index))
            return self.sl[index]

        def __getattr__(self, name):  # whole-tensor reads by the loader go through get_* methods
            log.append((self.key, name))
            return getattr(self.sl, name)

    @contextmanager
    def spy_open(self, keys):
        with real_open(self, keys) as slices:
            yield {k: Spy(k, v) for k, v in slices.items()}

    am.reader.open = spy_open.__get__(am.reader)
    try:
        yield log
    finally:
        del am.reader.open


def _read_experts(am: AdaptiveMoE, log) -> dict[int, set[int]]:
    """Layer -> expert ids whose bytes the log shows were read."""
    out: dict[int, set[int]] = {}
    for key, index in log:
        ek = am.keymap.get(key)
        assert ek is not None, f"a non-expert tensor was read during a switch: {key}"
        got = out.setdefault(ek.layer, set())
        if ek.kind == "per_expert":
            got.add(int(ek.expert))
        else:
            assert isinstance(index, tuple), f"the whole fused tensor {key} was read"
            sl = index[ek.axis or 0]
            got.update(range(sl.start, sl.stop))
    return out


@pytest.mark.parametrize("model_type", TYPES)
def test_adaptive_model_equals_the_pruned_reference_and_switches(model_type, tmp_path):
    model, blocks = _model(model_type)
    src = save(model, tmp_path / "src", "fused")
    a, b = _kept(blocks, 0), _kept(blocks, 1)
    am = AdaptiveMoE.from_library(src, _library(model, blocks, {"a": a, "b": b}), dtype="float32")
    for name, kept in (("a", a), ("b", b), ("a", a)):
        before = am._slots.copy()
        sw = am.activate(name)
        torch.testing.assert_close(run_logits(am.model), masked_logits(model, blocks, kept), rtol=1e-5, atol=1e-5)
        new = sum(len(set(kept[layer]) - set(before.get(layer, []))) for layer in kept)
        assert (sw.read_experts, sw.reused_experts) == (new, sum(map(len, kept.values())) - new)
    for blk in am.blocks:  # K experts per layer, nothing left on the meta device
        ex = blk.experts(am.model)
        assert all(expert_tensor(ex, blk.layout, n).shape[0] == am.library.keep for n in blk.layout.tensors)
    assert not [n for n, p in am.model.named_parameters() if p.is_meta]


@pytest.mark.parametrize("layout", ["fused", "hub"])
@pytest.mark.parametrize("model_type", HUB)
def test_adaptive_model_equals_a_checkpoint_pruned_with_the_plan(model_type, layout, tmp_path):
    from transformers import AutoModelForCausalLM

    from moeprune.surgery import rewrite_checkpoint

    model, blocks = _model(model_type)
    src = save(model, tmp_path / "src", layout)
    if layout == "hub" and model_type != "gpt_oss":  # gpt-oss publishes fused (transposed) tensors
        assert any(".experts.0." in k for k in Checkpoint.open(src).tensors)
    a, b = _kept(blocks, 2), _kept(blocks, 3)
    lib = _library(model, blocks, {"a": a, "b": b})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32", task="a")
    for name in ("b", "a"):
        pruned_dir = tmp_path / f"pruned-{name}"
        rewrite_checkpoint(src, pruned_dir, lib.task(name).plan.kept)
        pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
        am.activate(name)
        # Every parameter is bit-equal (checked by hand), but torch's CPU grouped_mm experts kernel
        # can round the last bit differently for equal inputs at other addresses: equal to 1e-6.
        torch.testing.assert_close(run_logits(am.model), run_logits(pruned), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["fused", "hub"])
def test_only_missing_experts_are_read(layout, tmp_path):
    model, blocks = _model("qwen3_moe")
    src = save(model, tmp_path / "src", layout)
    a, b = _kept(blocks, 4), _kept(blocks, 5)
    am = AdaptiveMoE.from_library(src, _library(model, blocks, {"a": a, "b": b}), dtype="float32")
    with _reads(am) as log:
        am.activate("a")
    assert _read_experts(am, log) == {layer: set(ids) for layer, ids in a.items()}
    with _reads(am) as log:
        sw = am.activate("b")
    want = {layer: set(b[layer]) - set(a[layer]) for layer in b}
    assert _read_experts(am, log) == {k: v for k, v in want.items() if v}
    per_expert = sum(
        Checkpoint.open(src).info(k).nbytes for k, ek in am.keymap.keys.items() if ek.kind != "router"
    ) // (blocks[0].num_experts * len(blocks))
    assert sw.bytes_read == per_expert * sum(map(len, want.values()))
    with _reads(am) as log:
        assert am.activate("b").read_experts == 0
    assert log == []


def test_poisoned_unkept_experts_never_reach_the_model(tmp_path):
    """Every expert no task keeps is NaN on disk: the adaptive model still equals the reference."""
    from safetensors.torch import load_file, save_file

    model, blocks = _model("deepseek_v3")
    src = save(model, tmp_path / "src", "fused")
    a = _kept(blocks, 6)
    am0 = AdaptiveMoE.from_library(src, _library(model, blocks, {"a": a}), dtype="float32")
    weights = load_file(str(src / "model.safetensors"))
    for key, ek in am0.keymap.keys.items():
        if ek.kind == "fused":
            drop = sorted(set(range(blocks[0].num_experts)) - set(a[ek.layer]))
            weights[key][drop] = float("nan")
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    am = AdaptiveMoE.from_library(src, _library(model, blocks, {"a": a}), dtype="float32", task="a")
    torch.testing.assert_close(run_logits(am.model), masked_logits(model, blocks, a), rtol=1e-5, atol=1e-5)


def test_memory_is_the_non_expert_weights_plus_k_experts(tmp_path):
    model, blocks = _model("deepseek_v3")
    src = save(model, tmp_path / "src", "fused")
    am = AdaptiveMoE.from_library(
        src, _library(model, blocks, {"a": _kept(blocks, 0)}), dtype="float32", task="a"
    )
    held = {id(t): t.numel() * t.element_size() for t in [*am.model.parameters(), *am.model.buffers()]}
    assert sum(held.values()) == am.non_expert_bytes() + am.expert_bytes()
    full = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    e, k = blocks[0].num_experts, am.library.keep
    assert am.expert_bytes() * e == am.expert_bytes(per_layer=e) * k
    assert sum(held.values()) < full


@pytest.mark.parametrize("model_type", ["deepseek_v3", "qwen3_moe", "afmoe"])
def test_first_router_probe_equals_a_full_forward(model_type, tmp_path):
    model, blocks = _model(model_type)
    src = save(model, tmp_path / "src", "fused")
    lib = _library(model, blocks, {"a": _kept(blocks, 0), "b": _kept(blocks, 1)})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32")
    text = "the quick brown fox"
    first = FirstLayerProbe(am).stats(text)
    full = FullModelProbe(model, byte_tokenizer(), lib.ka).stats(text)
    torch.testing.assert_close(first.keys["first"], full.keys["first"], rtol=1e-5, atol=1e-6)
    layer = blocks[0].layer
    assert torch.equal(first.selected[layer].sort(-1).values, full.selected[layer].sort(-1).values)
    assert full.keys["all"].shape == (len(blocks) * blocks[0].num_experts,)
    # a task whose key is this query's own statistic is found at distance 0
    lib2 = _library(
        model, blocks, {"x": _kept(blocks, 0), "y": _kept(blocks, 1)}, keys={"x": first.keys["first"]}
    )
    am2 = AdaptiveMoE.from_library(src, lib2, dtype="float32")
    routed = route_query(lib2, FirstLayerProbe(am2), text)
    assert routed.match.task == "x" and routed.match.distances["x"] == pytest.approx(0.0, abs=1e-6)
    cov = routed.coverage[layer]
    sel = first.selected[layer].reshape(-1)
    assert cov == pytest.approx(
        float(torch.isin(sel, torch.tensor(lib2.task("x").plan.kept[layer])).float().mean())
    )


def test_generate_routes_and_matches_the_pruned_model(tmp_path):
    model, blocks = _model("deepseek_v3")
    src = save(model, tmp_path / "src", "fused")
    a, b = _kept(blocks, 0), _kept(blocks, 1)
    am0 = AdaptiveMoE.from_library(src, _library(model, blocks, {"a": a, "b": b}), dtype="float32")
    key_b = am0.query_statistics("hello there")[0]
    lib = _library(model, blocks, {"a": a, "b": b}, keys={"b": key_b})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32")
    text = am.generate("hello there", max_new_tokens=6)
    assert am.current == "b" and am.switches[-1].task == "b"
    tok = byte_tokenizer()
    ids = torch.tensor([tok("hello there")["input_ids"]])
    with torch.no_grad(), patch_moe(model, blocks, controls=kept_controls(blocks, b)):
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert text == tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True)
    assert am.generate("hello there", max_new_tokens=2) and len(am.switches) == 1  # no reload


def test_top_level_name():
    import moeprune

    assert moeprune.AdaptiveMoE is AdaptiveMoE
    with pytest.raises(AttributeError):
        _ = moeprune.NoSuchThing


def test_bad_input(tmp_path):
    model, blocks = _model("deepseek_v3")
    src = save(model, tmp_path / "src", "fused")
    lib = _library(model, blocks, {"a": _kept(blocks, 0)})
    am = AdaptiveMoE.from_library(src, lib, dtype="float32")
    with pytest.raises(UserError, match="no task 'nope'.*use one of: a"):
        am.activate("nope")
    with pytest.raises(UserError, match="empty"):
        am.route("   ")
    with pytest.raises(UserError, match="tokenises to nothing"):
        am.route("\u00e9\u00e9\u00e9")
    other, other_blocks = _model("qwen3_moe")
    other_dir = save(other, tmp_path / "other", "fused")
    with pytest.raises(UserError, match="was built for model"):
        AdaptiveMoE.from_library(other_dir, lib)


def test_a_config_that_disagrees_with_the_weights_is_refused(tmp_path):
    """Issue 11 #7: from_library loaded whatever matched (a config claiming 2 layers of a
    3-layer checkpoint) and left missing non-expert tensors random: one line naming keys."""
    from safetensors.torch import load_file, save_file

    config_model = tiny_model("qwen3_moe", num_hidden_layers=2)
    src = save(tiny_model("qwen3_moe", num_hidden_layers=3), tmp_path / "src", "fused")
    config_model.config.save_pretrained(src)  # config.json claims 2 layers
    blocks = find_moe_blocks(config_model)
    lib = _library(config_model, blocks, {"a": _kept(blocks, 0)})
    with pytest.raises(
        UserError, match=r"does not load exactly: \d+ unexpected keys \(e\.g\. model\.layers\.2\."
    ):
        AdaptiveMoE.from_library(src, lib, dtype="float32")
    # a non-expert tensor missing from the checkpoint
    src = save(config_model, tmp_path / "missing", "fused")
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        UserError, match=r"1 missing keys \(e\.g\. model\.layers\.1\.self_attn\.q_proj\.weight\)"
    ):
        AdaptiveMoE.from_library(src, lib, dtype="float32")
