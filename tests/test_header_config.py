"""The config read from config.json alone (arch/header_config.py) answers every name the header
rewrite reads as transformers' config object does, and its table is the installed transformers'."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import moeprune.arch.header_keys as header_keys
from moeprune.arch.header_config import ALIASES, DEFAULTS, HeaderConfig, header_config
from moeprune.arch.header_keys import FAMILIES
from moeprune.arch.table import EXPERT_COUNT_ATTRS, TOP_K_ATTRS
from moeprune.surgery import plan_rewrite
from moeprune.testing.tiny import tiny_model

# every name the header path reads (header_keys, the routing specs, pruned_config, quant checks)
ASKED = sorted(
    {n for table in DEFAULTS.values() for n in table}
    | {a for table in ALIASES.values() for a in table}
    | set(EXPERT_COUNT_ATTRS)
    | set(TOP_K_ATTRS)
    | {"top_k", "num_group", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor"}
    | {"attention_bias", "qkv_bias", "first_k_dense_replace", "decoder_sparse_step", "mlp_only_layers"}
    | {"intermediate_size", "moe_intermediate_size", "quantization_config", "moeprune", "model_type"}
)
MISSING = object()


def test_families_are_the_header_map_families():
    assert set(DEFAULTS) == set(ALIASES) == set(FAMILIES)


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
def test_table_is_the_installed_transformers(model_type):
    cls = CONFIG_MAPPING[model_type]
    built = cls()
    assert dict(cls.attribute_map) == ALIASES[model_type]
    for name, value in DEFAULTS[model_type].items():
        assert getattr(built, name) == value, name
    # no name the header path reads has a class value the table leaves out
    for name in ASKED:
        if name != "model_type" and getattr(built, name, MISSING) is not MISSING:
            canonical = ALIASES[model_type].get(name, name)
            assert canonical in DEFAULTS[model_type], name


def _answers(cfg) -> dict[str, object]:
    out = {n: getattr(cfg, n, MISSING) for n in ASKED}
    out["get_text_config"] = cfg.get_text_config() is cfg
    return out


def _variants(model_type: str, saved: dict) -> list[dict]:
    """The tiny model's config.json, the bare minimum, and each name of every count alone."""
    bare = {"model_type": model_type}
    out = [saved, bare]
    for alias, canonical in ALIASES[model_type].items():
        for name in (alias, canonical):
            out.append({**bare, name: 6})
    out.append({**bare, "norm_topk_prob": True, "num_experts_per_tok": 3, "hidden_size": 96})
    return out


@pytest.mark.parametrize("model_type", sorted(DEFAULTS))
def test_answers_equal_transformers(model_type, tmp_path):
    tiny_model(model_type).config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for raw in _variants(model_type, saved):
        mine = header_config(dict(raw))
        assert mine is not None, raw
        real = CONFIG_MAPPING[model_type].from_dict({k: v for k, v in raw.items() if k != "model_type"})
        assert _answers(mine) == _answers(real), raw


def test_what_only_transformers_can_read():
    base = {"model_type": "deepseek_v3", "n_routed_experts": 8}
    assert isinstance(header_config(base), HeaderConfig)
    for raw in (
        {"model_type": "llama"},
        {"model_type": "dbrx"},
        {**base, "quantization_config": {"quant_method": "fp8"}},
        {**base, "moeprune": {"experts_per_layer": {"1": 4}}},
        {**base, "num_local_experts": 8},  # two names of one count
        {**base, "n_group": None},  # None where the class has a number
        {**base, "norm_topk_prob": 1},  # not a bool
        {**base, "routed_scaling_factor": True},
        {**base, "hidden_size": 96.0},
        {**base, "text_config": {}},
        {"model_type": "qwen3_moe", "mlp_only_layers": None},  # the class makes it []
        {"model_type": "qwen3_moe", "mlp_only_layers": [True]},
    ):
        assert header_config(raw) is None, raw


# routing names left out of config.json: the class defaults decide, with and without transformers
STRIPPED = {
    "deepseek_v3": ("norm_topk_prob", "routed_scaling_factor"),
    "qwen3_moe": ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"),
    "qwen2_moe": ("norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"),
}


@pytest.mark.parametrize("model_type", sorted(STRIPPED))
def test_rewrite_plan_with_defaults_equals_transformers(model_type, tmp_path, monkeypatch):
    path = tmp_path / "model"
    tiny_model(model_type).save_pretrained(path)
    raw = json.loads((path / "config.json").read_text())
    for name in STRIPPED[model_type]:
        raw.pop(name)
    (path / "config.json").write_text(json.dumps(raw))
    n = header_config(raw).num_experts_per_tok
    e = 8
    kept = {i: [j for j in range(e) if j % 4 != i % 4] for i in range(raw["num_hidden_layers"])}
    kept = {i: ids for i, ids in kept.items() if i >= raw.get("first_k_dense_replace", 0)}
    assert n <= 6
    fast = plan_rewrite(path, tmp_path / "out", kept, max_shard_size=40_000)
    with monkeypatch.context() as m:
        m.setattr(header_keys, "header_key_map", lambda *a, **k: None)
        slow = plan_rewrite(path, tmp_path / "out", kept, max_shard_size=40_000)
    assert fast.from_headers and not slow.from_headers
    assert [dataclasses.astuple(t) for t in fast.tensors] == [dataclasses.astuple(t) for t in slow.tensors]
    assert fast.new_config == slow.new_config
    assert dataclasses.asdict(fast.result) == dataclasses.asdict(slow.result)
    assert fast.ckpt.keys() == slow.ckpt.keys()
