"""The vLLM plugin without vLLM: config reading, entry point, dispatch table, config registration
and the novice arithmetic of softmax-routed families (vLLM itself: scripts/check_vllm.sh, opt-in)."""

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


# --- dispatch and config registration (pure python) ------------------------------------------------


@pytest.mark.parametrize(
    ("base", "target"),
    [
        ("qwen3_moe", "moeprune.vllm_plugin.qwen3_moe:MoepruneQwen3MoeForCausalLM"),
        ("mixtral", "moeprune.vllm_plugin.mixtral:MoepruneMixtralForCausalLM"),
        ("gpt_oss", "moeprune.vllm_plugin.gpt_oss:MoepruneGptOssForCausalLM"),
        ("deepseek_v3", "moeprune.vllm_plugin.deepseek:MoepruneDeepseekV3ForCausalLM"),
        ("deepseek_v2", "moeprune.vllm_plugin.deepseek:MoepruneDeepseekV3ForCausalLM"),
        (None, "moeprune.vllm_plugin.deepseek:MoepruneDeepseekV3ForCausalLM"),  # before the rename
    ],
)
def test_dispatch_on_base_model_type(base, target):
    import moeprune.vllm_plugin as plugin

    assert plugin.model_target(base) == target


def test_unserved_family_refused_in_one_line():
    import moeprune.vllm_plugin as plugin

    with pytest.raises(
        ValueError, match=r"does not serve base model type 'olmoe' yet \(served: .*qwen3_moe"
    ) as err:
        plugin.model_target("olmoe")
    assert "\n" not in str(err.value)


def test_configs_registered_as_the_stock_classes(monkeypatch):
    """``moeprune_<base>`` is read as a subclass of the stock config class of ``<base>`` with its
    model_type (vLLM keys attention and routing paths on the stock model_type); a fake mapping
    keeps transformers' global clean."""
    from transformers.models.auto import configuration_auto

    import moeprune.vllm_plugin as plugin

    real = configuration_auto.CONFIG_MAPPING
    registered: dict[str, type] = {}

    class Mapping:
        def __contains__(self, key):
            return key in registered

        def __getitem__(self, key):
            return registered[key] if key in registered else real[key]

        def register(self, key, value, exist_ok=False):
            registered[key] = value

    monkeypatch.setattr(configuration_auto, "CONFIG_MAPPING", Mapping())
    plugin._register_configs()
    assert set(registered) == {f"moeprune_{base}" for base in plugin.MODELS}
    for base in ("qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"):
        cls = registered[f"moeprune_{base}"]
        assert issubclass(cls, real[base]) and cls is not real[base] and cls.model_type == base


def test_layout_counts_per_layer():
    ragged = read_layout(_config(mode="remove", experts_per_layer={"1": 12}))
    assert ragged.experts_in(1, 32) == 12 and ragged.experts_in(2, 32) == 32 and ragged.novices_in(1) == []
    novice = read_layout(
        _config(
            mode="novice", experts_per_layer={"1": 2}, novice_experts={"1": [3, 0]}, novice_storage="buffer"
        )
    )
    # a novice layer is built from the config's full count: its router keeps all E rows
    assert novice.experts_in(1, 4) == 4 and novice.novices_in(1) == [0, 3] and novice.novices_in(2) == []


@pytest.mark.parametrize(
    ("prefix", "layer"), [("model.layers.3.mlp", 3), ("model.layers.12.block_sparse_moe", 12)]
)
def test_layer_of_moe_prefix(prefix, layer):
    from moeprune.vllm_plugin.common import layer_of

    assert layer_of(prefix) == layer
    with pytest.raises(ValueError, match="cannot tell the decoder layer"):
        layer_of("model.layers.3.self_attn")


# --- the novice layer of softmax-routed families, against moeprune's own semantics -----------------


@pytest.mark.parametrize(
    ("model_type", "renormalize"), [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True)]
)
def test_softmax_novice_layer_is_exact(model_type, renormalize):
    """:class:`SoftmaxNoviceMoE` (what vLLM runs for a novice Qwen3-MoE / Mixtral layer) equals the
    transformers block with the same experts replaced by constants through ``patch_moe``."""
    import torch

    from moeprune.arch import BlockControl, find_moe_blocks, patch_moe
    from moeprune.testing.tiny import tiny_model
    from moeprune.vllm_plugin.common import MIXTRAL_NAMES, QWEN_NAMES, SoftmaxNoviceMoE

    overrides = {"norm_topk_prob": renormalize} if model_type == "qwen3_moe" else {}
    model = tiny_model(model_type, **overrides)
    b = find_moe_blocks(model)[0]
    hidden = model.config.hidden_size
    experts = b.experts(model)
    gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
    inner = down.shape[-1]
    novice_ids = [1, 4, 6]
    kept = [e for e in range(b.num_experts) if e not in novice_ids]
    gen = torch.Generator().manual_seed(3)
    vectors = torch.randn(len(novice_ids), hidden, generator=gen)
    x = torch.randn(2, 9, hidden, generator=gen)
    control = BlockControl(novices=dict(zip(novice_ids, vectors, strict=True)))
    with torch.no_grad(), patch_moe(model, [b], controls={b.index: control}):
        want = b.block(model)(x)

    names = QWEN_NAMES if model_type == "qwen3_moe" else MIXTRAL_NAMES
    layer = SoftmaxNoviceMoE(
        hidden=hidden,
        inner=inner,
        routed=b.num_experts,
        top_k=model.config.num_experts_per_tok,
        renormalize=renormalize,
        novice_ids=novice_ids,
        names=names,
    )
    with torch.no_grad():
        layer.gate.weight.copy_(b.router(model).weight)
        layer.experts.novice_outputs.copy_(vectors)
        for j, e in enumerate(kept):
            gate, up, proj = (getattr(getattr(layer.experts, str(j)), n) for n in names)
            gate.weight.copy_(gate_up[e, :inner])
            up.weight.copy_(gate_up[e, inner:])
            proj.weight.copy_(down[e])
        got = layer(x.reshape(-1, hidden)).reshape(x.shape)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # and the replaced experts matter: the same layer without its constants differs
    with torch.no_grad():
        layer.experts.novice_outputs.zero_()
        assert not torch.allclose(layer(x.reshape(-1, hidden)).reshape(x.shape), want, atol=1e-3)


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
