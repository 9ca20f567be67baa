"""The vLLM plugin's config reading and entry point (vLLM itself: scripts/check_vllm.sh, opt-in)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from moeprune.vllm_plugin.layout import read_layout

ROOT = Path(__file__).resolve().parents[1]


def _config(**moeprune):
    return SimpleNamespace(moeprune={"format": "moeprune-checkpoint/1", **moeprune})


def test_ragged_and_novice_layouts_read():
    ragged = read_layout(_config(mode="remove", experts_per_layer={"1": 12, "2": 16}))
    assert ragged.mode == "remove" and ragged.experts_per_layer == {1: 12, 2: 16}
    novice = read_layout(
        _config(
            mode="novice",
            experts_per_layer={"1": 2},
            novice_experts={"1": [3, 0]},
            novice_storage="buffer",
            base_model_type="deepseek_v3",
        )
    )
    assert novice.novice_experts == {1: [0, 3]} and novice.base_model_type == "deepseek_v3"
    assert read_layout(SimpleNamespace()) is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mode": "novice", "novice_storage": "down_bias"}, "novice_storage"),
        ({"mode": "remove", "dead_experts": {"1": [3]}}, "stock"),
        ({"mode": "merge"}, "unknown mode"),
    ],
)
def test_unservable_layouts_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        read_layout(_config(**fields))


def test_entry_point_names_register():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # tomllib is 3.11+
    section = text.split('[project.entry-points."vllm.general_plugins"]\n', 1)[1].split("\n[", 1)[0]
    assert 'moeprune = "moeprune.vllm_plugin:register"' in section
    import moeprune.vllm_plugin as plugin  # importable without vLLM

    assert callable(plugin.register)


def test_models_table_names_existing_classes():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    import moeprune.vllm_plugin as plugin

    for base, (name, target) in plugin.MODELS.items():
        assert base in CONFIG_MAPPING  # the stock config class the dispatch subclasses
        module, cls = target.split(":")
        assert cls == name and module.startswith("moeprune.vllm_plugin.")
        source = (ROOT / "src" / Path(*module.split("."))).with_suffix(".py").read_text(encoding="utf-8")
        assert f"class {name}(" in source  # a typo would only show when vLLM builds the model


def test_dispatch_config_names_the_family_class_and_stock_type():
    from transformers import GptOssConfig

    from moeprune.vllm_plugin import dispatch_config

    cls = dispatch_config(GptOssConfig, "MoepruneGptOssForCausalLM")
    raw = GptOssConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"]).to_dict()
    renamed = cls.from_dict(
        {**raw, "model_type": "moeprune_gpt_oss", "architectures": ["MoepruneForCausalLM"]}
    )
    assert isinstance(renamed, GptOssConfig)
    assert renamed.architectures == ["MoepruneGptOssForCausalLM"] and renamed.model_type == "gpt_oss"
    config, unused = cls.from_dict(
        {**raw, "architectures": ["GptOssForCausalLM"]}, return_unused_kwargs=True, foo=1
    )
    assert config.architectures == ["GptOssForCausalLM"] and unused == {"foo": 1}  # others untouched


def test_gpt_oss_novice_layer_matches_moeprune_load(tmp_path):
    """The plugin's torch novice layer (what vLLM runs) against moeprune.load's, float32."""
    import torch
    from safetensors.torch import load_file

    import moeprune
    from moeprune.surgery import rewrite_checkpoint
    from moeprune.testing.tiny import tiny_model
    from moeprune.vllm_plugin.gpt_oss_novice import NoviceGptOssMLP

    model = tiny_model("gpt_oss")  # 8 experts, top-2, 2 layers, randomised routing
    model.save_pretrained(tmp_path / "src", save_original_format=True)
    novice_ids = {0: [1, 4, 6], 1: [0, 2, 3, 7]}
    kept = {layer: [i for i in range(8) if i not in ids] for layer, ids in novice_ids.items()}
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    novices = {layer: torch.randn(len(ids), hidden) for layer, ids in novice_ids.items()}
    rewrite_checkpoint(tmp_path / "src", tmp_path / "novice", kept, mode="novice", novices=novices)
    reference = moeprune.load(tmp_path / "novice", dtype=torch.float32).eval()
    tensors = load_file(tmp_path / "novice" / "model.safetensors")
    x = torch.randn(64, hidden)
    for layer, ids in novice_ids.items():
        mine = NoviceGptOssMLP(model.config, ids)
        prefix = f"model.layers.{layer}.mlp."
        mine.load_state_dict({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        chosen = mine.lookup[mine.route(x)[0]]
        assert (chosen >= mine.kept).any() and (chosen < mine.kept).any()  # both kinds are hit
        with torch.no_grad():
            want = reference.model.layers[layer].mlp(x[None])[0][0]
            got = mine(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, model.model.layers[layer].mlp(x[None])[0][0], atol=1e-4)
