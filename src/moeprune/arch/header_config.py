"""The config of a checkpoint read from ``config.json`` alone, for the families of
:mod:`moeprune.arch.header_keys`: what a plain removal rewrite asks of a config, without importing
transformers' config classes (the first touch of ``transformers.models`` scans the ``__all__`` of
its ~1,700 model files: ~0.3 s on a quiet machine, the largest fixed cost of a rewrite).

:class:`HeaderConfig` answers attribute reads the way the transformers config object does: the
value in the file (where ``attribute_map`` makes two names one, either name), else the value a
default-built config of the class has (:data:`DEFAULTS`). A name neither in the file nor in the
table raises ``AttributeError``, as for a name the class does not have. :func:`header_config`
gives None (the caller then loads the config with transformers, which also names any problem) for
another model type, a quantized or moeprune-written config, two names of one count given at once,
or a value of another type than the class's. tests/test_header_config.py checks the table against
the installed transformers and every answer against its config object.
"""

from __future__ import annotations

import copy
from typing import Any

# per model type: every name the rewrite reads on the header path that the config class defines
# (the canonical name of an alias), with the value of a config built with no arguments
DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": {
        "attention_bias": False,
        "first_k_dense_replace": 3,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "n_group": 8,
        "n_routed_experts": 256,
        "norm_topk_prob": True,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "routed_scaling_factor": 2.5,
        "topk_group": 4,
    },
    "glm4_moe": {
        "attention_bias": False,
        "first_k_dense_replace": 1,
        "hidden_size": 4096,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "n_group": 1,
        "n_routed_experts": 128,
        "norm_topk_prob": True,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 46,
        "num_nextn_predict_layers": 1,
        "routed_scaling_factor": 1.0,
        "topk_group": 1,
        "use_qk_norm": False,
    },
    "gpt_oss": {
        "attention_bias": True,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 36,
        "num_local_experts": 128,
    },
    "mixtral": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 32,
        "num_local_experts": 8,
    },
    "olmoe": {
        "attention_bias": False,
        "hidden_size": 2048,
        "intermediate_size": 2048,
        "norm_topk_prob": False,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 16,
    },
    "qwen2_moe": {
        "decoder_sparse_step": 1,
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "mlp_only_layers": [],
        "moe_intermediate_size": 1408,
        "norm_topk_prob": False,
        "num_experts": 60,
        "num_experts_per_tok": 4,
        "num_hidden_layers": 24,
        "qkv_bias": True,
    },
    "qwen3_moe": {
        "attention_bias": False,
        "decoder_sparse_step": 1,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "mlp_only_layers": [],
        "moe_intermediate_size": 768,
        "norm_topk_prob": False,
        "num_experts_per_tok": 8,
        "num_hidden_layers": 24,
        "num_local_experts": 128,
    },
}
# each config class's ``attribute_map`` (alias -> the name the value is stored under)
ALIASES: dict[str, dict[str, str]] = {
    "deepseek_v3": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "glm4_moe": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "gpt_oss": {"num_experts": "num_local_experts"},
    "mixtral": {"num_experts": "num_local_experts"},
    "olmoe": {"num_local_experts": "num_experts"},
    "qwen2_moe": {},
    "qwen3_moe": {"num_experts": "num_local_experts"},
}


class HeaderConfig:
    """Attribute reads of a transformers config, answered from ``config.json`` and :data:`DEFAULTS`."""

    def __init__(self, raw: dict[str, Any]) -> None:
        self.model_type = str(raw["model_type"])
        self.attribute_map = dict(ALIASES[self.model_type])
        self._raw = raw
        self._defaults = DEFAULTS[self.model_type]

    def get_text_config(self, *args: Any, **kwargs: Any) -> HeaderConfig:
        return self  # none of these families nests a text config

    def _names(self, name: str) -> list[str]:
        """``name`` and every name ``attribute_map`` makes the same, canonical first."""
        canonical = self.attribute_map.get(name, name)
        return [canonical, *(a for a, c in self.attribute_map.items() if c == canonical)]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        names = self._names(name)
        for n in names:
            if n in self._raw:
                return self._raw[n]
        if names[0] in self._defaults:
            return copy.deepcopy(self._defaults[names[0]])
        raise AttributeError(name)


def header_config(raw: dict[str, Any]) -> HeaderConfig | None:
    """The config of ``raw`` (a ``config.json`` already checked by :func:`moeprune.modelio.read_raw_config`)
    without transformers, or None where only transformers can say what it is."""
    from .pruned import CONFIG_KEY

    model_type = raw.get("model_type")
    if model_type not in DEFAULTS or raw.get("quantization_config") or CONFIG_KEY in raw:
        return None
    if "text_config" in raw:  # would be nested by some class: not one of these
        return None
    cfg = HeaderConfig(raw)
    for name, default in DEFAULTS[model_type].items():
        given = [n for n in cfg._names(name) if n in raw]
        if len(given) > 1:  # two names of one count: which wins is transformers' business
            return None
        if given and not _same_type(raw[given[0]], default):
            return None
    return cfg


def _same_type(value: Any, default: Any) -> bool:
    """``value`` (from the file) has the type the class gives ``default``; None only where the
    default is None (a None the class replaces, like ``mlp_only_layers``, goes to transformers)."""
    if value is None or default is None:
        return value is None and default is None
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, list):
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    return False
