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

- ``MoepruneQwen3MoeForCausalLM``, ``MoepruneMixtralForCausalLM``: the same for Qwen3-MoE and
  Mixtral (``MoepruneForCausalLM`` builds them for ``base_model_type`` ``qwen3_moe``/``mixtral``).

Families served: DeepSeek-V3 (and the DeepSeek-V2 layout it shares), Qwen3-MoE, Mixtral.
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
    """``moeprune_<base>`` configs read as the stock config class of ``<base>`` itself: vLLM picks
    attention and other paths by ``config.model_type`` (e.g. MLA for ``deepseek_v3``), so the
    loaded config must carry the stock type (AutoConfig.register would insist on the new one)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for base in MODELS:
        if PREFIX + base not in CONFIG_MAPPING:
            CONFIG_MAPPING.register(PREFIX + base, CONFIG_MAPPING[base], exist_ok=True)
