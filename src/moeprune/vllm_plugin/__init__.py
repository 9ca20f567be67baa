"""vLLM plugin: serve moeprune's ragged and novice checkpoints with vLLM.

Installed with ``pip install moeprune[vllm]``; vLLM finds :func:`register` through the
``vllm.general_plugins`` entry point and calls it in every process before it builds a model.
Only this package imports vLLM, and only inside the functions below, so moeprune itself never
needs it.

What it registers (``docs/vllm.md``):

- ``MoepruneForCausalLM``: the ``architectures`` name moeprune gives ragged and novice checkpoints
  (``model_type`` ``moeprune_<base>``, the stock one in ``config.moeprune.base_model_type``); the
  config type is registered with transformers' ``AutoConfig`` too, so no remote code runs;
- ``MoepruneDeepseekV3ForCausalLM``: the same model named explicitly, for checkpoints written
  before the rename (``architectures: [DeepseekV3ForCausalLM]`` plus ``config.moeprune``):
  ``LLM(path, hf_overrides={"architectures": ["MoepruneDeepseekV3ForCausalLM"]})``.

- ``MoepruneQwen3MoeForCausalLM``, ``MoepruneMixtralForCausalLM``, ``MoepruneGptOssForCausalLM``:
  the same for Qwen3-MoE, Mixtral and gpt-oss.

Families served: DeepSeek-V3 (and the DeepSeek-V2 layout it shares), Qwen3-MoE, Mixtral, gpt-oss.

Dispatch: the ``moeprune_<base>`` config type reads as a subclass of ``<base>``'s stock config
that names the family's class in ``architectures`` (and carries the stock ``model_type``), so
``MoepruneForCausalLM`` checkpoints of every family in :data:`MODELS` reach their own class; a
config that still names ``MoepruneForCausalLM`` (read some other way) is built through
:func:`model_target` on ``config.moeprune.base_model_type``.
"""

from __future__ import annotations

ARCHITECTURE = "MoepruneForCausalLM"  # what moeprune writes into config.json
# base model type -> (explicit architecture name, "module:class")
MODELS = {
    "deepseek_v3": (
        "MoepruneDeepseekV3ForCausalLM",
        "moeprune.vllm_plugin.deepseek:MoepruneDeepseekV3ForCausalLM",
    ),
    "qwen3_moe": (
        "MoepruneQwen3MoeForCausalLM",
        "moeprune.vllm_plugin.qwen3_moe:MoepruneQwen3MoeForCausalLM",
    ),
    "mixtral": (
        "MoepruneMixtralForCausalLM",
        "moeprune.vllm_plugin.mixtral:MoepruneMixtralForCausalLM",
    ),
    "gpt_oss": ("MoepruneGptOssForCausalLM", "moeprune.vllm_plugin.gpt_oss:MoepruneGptOssForCausalLM"),
}
# base model types served by another family's class (None: configs written before the rename)
ALIASES = {None: "deepseek_v3", "deepseek_v2": "deepseek_v3"}
PREFIX = "moeprune_"


def register() -> None:
    """vLLM's ``vllm.general_plugins`` hook: register the models and config types (idempotent)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for name, target in MODELS.values():
        if name not in supported:
            ModelRegistry.register_model(name, target)
    if ARCHITECTURE not in supported:
        # one name for every family: the class dispatches on config.moeprune.base_model_type
        ModelRegistry.register_model(ARCHITECTURE, "moeprune.vllm_plugin.deepseek:MoepruneForCausalLM")
    _register_configs()


def model_target(base_model_type: str | None) -> str:
    """``module:class`` that serves ``config.moeprune.base_model_type`` (what
    ``MoepruneForCausalLM`` builds); ValueError (one line) for a family the plugin does not serve."""
    base = ALIASES.get(base_model_type, base_model_type)
    if base not in MODELS:
        served = ", ".join(sorted(MODELS))
        raise ValueError(
            f"the moeprune vLLM plugin does not serve base model type {base_model_type!r} yet (served: {served})"
        )
    return MODELS[base][1]


def _register_configs() -> None:
    """``moeprune_<base>`` configs read as :func:`dispatch_config` of ``<base>``'s stock config
    class (AutoConfig.register would insist on a class whose ``model_type`` is the new name)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for base, (name, _) in MODELS.items():
        if PREFIX + base not in CONFIG_MAPPING:
            CONFIG_MAPPING.register(PREFIX + base, dispatch_config(CONFIG_MAPPING[base], name), exist_ok=True)


def dispatch_config(stock: type, name: str) -> type:
    """A subclass of the stock config class whose loaded configs name ``name`` instead of
    ``MoepruneForCausalLM`` (vLLM resolves the model class from ``architectures``) and carry the
    stock ``model_type``: vLLM picks attention and other paths by it (MLA for ``deepseek_v3``,
    the harmony chat format for ``gpt_oss``)."""

    class MoepruneConfig(stock):
        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            out = super().from_dict(config_dict, **kwargs)
            config = out[0] if isinstance(out, tuple) else out  # (config, unused) on request
            if list(getattr(config, "architectures", None) or []) == [ARCHITECTURE]:
                config.architectures = [name]
            config.model_type = stock.model_type
            return out

    MoepruneConfig.__name__ = MoepruneConfig.__qualname__ = f"Moeprune{stock.__name__}"
    return MoepruneConfig
