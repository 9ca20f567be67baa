"""Tiny random multimodal wrappers (``*ForConditionalGeneration``) around an MoE language model.

``tiny_wrapper(model_type)`` builds the stock wrapper class of :data:`moeprune.arch.wrappers.WRAPPED`
from :func:`.tiny.tiny_config` (text model as for the causal LMs, towers at width 32, one layer),
seeded, float32, in eval mode, with the routing randomised like :func:`.tiny.tiny_model`.
``WRAPPER_FIXES`` holds what a wrapper's config needs beyond that.
"""

from __future__ import annotations

from typing import Any

import torch

from .tiny import randomize_routing, tiny_config

# Per-wrapper overrides of the composite config (top level; text_config={...} for the text model).
WRAPPER_FIXES: dict[str, dict[str, Any]] = {
    # GLM-4.5V: rotary on half of head_dim 16 = 8 dims, 4 frequencies split (time, height, width)
    "glm4v_moe": {
        "text_config": {
            "rope_parameters": {
                "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default",
                "mrope_section": [2, 1, 1],
            }
        }
    },
    # Step-3.7: the text attention reads sliding_window even when every layer is full attention
    "step3p7": {"text_config": {"sliding_window": 8}},
    # HY-V4-VL: multimodal rotary sections over qk_rope_head_dim 8 / 2 = 4 frequencies
    "hy_v4_vl": {"text_config": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                     "mrope_section": [2, 1, 1]}}},
    # GLM-5-Next: the indexer pools keys by index_kpool, which must divide index_topk
    "glm5_next": {"text_config": {"index_kpool": 4, "qk_rope_head_dim": 0}},
    # Gemma-4: its vision and audio towers are optional (None by default): build tiny ones, so the
    # checkpoint holds tower tensors that pruning must copy
    "gemma4": {
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                          "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16,
                          "position_embedding_size": 64},
        "audio_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "subsampling_conv_channels": [8, 8], "output_proj_dims": 32},
    },
    # Muse-Spark: the audio encoder has one entry per stage in patch_sizes/hidden_sizes/depths
    # (its experts' projected width moe_hidden_size and the vision projector widths default to 4096+)
    "muse_spark": {"text_config": {"moe_hidden_size": 32, "moe_intermediate_size": 32},
                   "out_hidden_size": 128, "projector_hidden_size": 64,
                   "audio_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                    "num_hidden_layers": 4, "hidden_sizes": [16, 16, 32, 32],
                                    "depths": [1, 1, 1, 1], "out_hidden_size": 64}},
}


_TINY_AUDIO = {"encoder_layers": 1, "d_model": 32, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
               "downsample_hidden_size": 16, "output_dim": 64}
_TINY_SAM = {"hidden_size": 32, "output_channels": 16, "mlp_dim": 64, "num_hidden_layers": 1,
             "num_attention_heads": 2, "global_attn_indexes": [0]}
# Tower sizes set on the built sub-configs (dotted path -> {attr: value}): defaults that the generic
# tower sizes of tiny_config miss, which made towers of 10^7-10^10 parameters.
WRAPPER_TOWERS: dict[str, dict[str, dict[str, Any]]] = {
    "llama4": {"vision_config": {"projector_input_dim": 64, "projector_output_dim": 64}},
    "qwen3_omni_moe_thinker": {"audio_config": _TINY_AUDIO},
    "dots3_note": {"audio_config": {"downsample_hidden_size": 16, "conv_output_size": 256}},
    "nemo_speechlm": {
        "audio_config.asr_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "num_key_value_heads": 2},
        "audio_config.diarization_config.audio_config": {"hidden_size": 32, "intermediate_size": 64,
                                                         "num_hidden_layers": 1, "num_attention_heads": 2,
                                                         "num_key_value_heads": 2},
        "audio_config.diarization_config.head_config": {"audio_hidden_size": 32},
        "word_timestamp_config": {"vocab_size": 256, "blank_token_id": 255},
    },
    "deepseek_ocr2": {
        "vision_config.sam_config": _TINY_SAM,
        "vision_config.encoder_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 256,
                                         "layer_types": ["full_attention"]},
    },
    "unlimited_ocr": {
        "vision_config.sam_config": _TINY_SAM,
        "vision_config.encoder_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                         "num_attention_heads": 2},
    },
}


# Every *ForConditionalGeneration type of transformers 5.25 whose language model has routed experts
# (found by building each wrapper class of the auto mappings on the meta device; gemma4, inkling2_loop
# and inkling_mm_model are classified by their text type).
MOE_WRAPPER_TYPES: list[str] = [
    "deepseek_ocr2", "dots3_note", "ernie4_5_vl_moe", "gemma4", "glm4v_moe", "glm5_next", "hy_v4_vl",
    "inkling2", "inkling2_loop", "inkling_mm_model", "kimi_k25", "llama4", "minimax_m3_vl",
    "mistral_large4", "muse_spark", "nemo_speechlm", "nllb-moe", "qwen3_5_moe", "qwen3_omni_moe",
    "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen4_exp", "step3p7", "switch_transformers",
    "unlimited_ocr",
]  # fmt: skip


def _config_with_any_text(model_type: str, **overrides: Any):
    """A tiny composite config whose text_config sub-config is an AutoConfig (Kimi-K2.5: DeepSeek-V3;
    Nemotron-3.5-Transcribe: Nemotron-H): the default text type, made tiny like a causal LM."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from .tiny import _text_kwargs, _tower_kwargs

    cfg_cls = CONFIG_MAPPING[model_type]
    default = cfg_cls()
    kw: dict[str, Any] = {}
    for name, sub_cls in cfg_cls.sub_configs.items():
        sub = getattr(default, name, None)
        if name == "text_config":
            if sub_cls.__name__ == "AutoConfig":
                kw[name] = tiny_config(sub.model_type).to_dict()
            else:
                kw[name] = _text_kwargs(sub_cls, {})
            kw[name].update(overrides.pop("text_config", {}))
        elif sub is not None:
            cls = type(sub) if sub_cls.__name__ == "AutoConfig" else sub_cls
            kw[name] = {**sub.to_dict(), **_tower_kwargs(cls), **overrides.pop(name, {})}
    kw.update(overrides)
    return cfg_cls(**kw)


def wrapper_config(model_type: str, **overrides: Any):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    fix = dict(WRAPPER_FIXES.get(model_type, {}))
    for name, value in overrides.items():  # a sub-config override adds to the fix, not replaces it
        fix[name] = {**fix[name], **value} if isinstance(value, dict) and name in fix else value
    subs = CONFIG_MAPPING[model_type].sub_configs
    if any(c.__name__ == "AutoConfig" for c in subs.values()):
        cfg = _config_with_any_text(model_type, **fix)
    else:
        cfg = tiny_config(model_type, **fix)
    for path, values in WRAPPER_TOWERS.get(model_type, {}).items():
        sub = cfg
        for name in path.split("."):
            sub = getattr(sub, name)
        for attr, value in values.items():
            setattr(sub, attr, value)
    return cfg


def tiny_wrapper(model_type: str, seed: int = 0, **overrides: Any):
    """A seeded float32 tiny wrapper model of ``model_type`` in eval mode with randomised routing."""
    import transformers

    from moeprune.arch.wrappers import WRAPPED

    cls = getattr(transformers, WRAPPED[model_type].cls)
    cfg = wrapper_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32)
    model.float().eval()
    return randomize_routing(model, seed + 1)
