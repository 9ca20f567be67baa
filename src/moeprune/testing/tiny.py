"""Tiny random models of every MoE causal-LM type in transformers 5.x.

``tiny_config(model_type)`` returns a config with a few thousand parameters per layer,
``tiny_model(model_type)`` a seeded float32 model in eval mode whose routers are randomised
enough that routing is diverse. Per-type needs are kept in ONE table, ``TINY_FIXES``.
"""

from __future__ import annotations

import dataclasses
import inspect
from functools import lru_cache
from typing import Any

import torch

__all__ = [
    "MOE_CAUSAL_LM_TYPES",
    "TINY_FIXES",
    "UNBUILDABLE",
    "NEEDS_NO_CACHE",
    "buildable_types",
    "find_moe_causal_lm_types",
    "has_routed_experts",
    "tiny_config",
    "tiny_model",
]

VOCAB = 256

# Sizes applied to every (text) config that has the attribute.
_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    # shared / dense-expert widths
    "shared_expert_intermediate_size": 32,
    "shared_experts_intermediate_size": 32,
    "shared_intermediate_size": 32,
    "moe_shared_expert_intermediate_size": 32,
    "expert_ffn_hidden_size": 32,
    "ffn_hidden_size": 128,
    "dense_intermediate_size": 128,
    "prefix_dense_intermediate_size": 128,
    # routed experts
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    "num_experts_per_token": 2,
    "moe_topk": 2,
    "moe_k": 2,
    "top_k_experts": 2,
    "n_shared_experts": 1,
    "num_shared_experts": 1,
    "moe_num_shared_experts": 1,
    "n_group": 2,
    "num_expert_group": 2,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "num_dense_layers": 1,
    # MLA
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "qk_head_dim": 16,
    "v_head_dim": 16,
    # sparse-attention indexers
    "index_n_heads": 2,
    "index_head_dim": 16,
    "index_topk": 8,
    # linear attention / SSM
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_head_dim": 16,
    "mamba_n_heads": 4,
    "mamba_head_dim": 16,
    "mamba_d_state": 16,
    "ssm_state_size": 16,
    "mamba_dt_rank": 8,
}

# Sizes applied to every non-text sub-config (vision/audio towers of multimodal configs).
_TOWER: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_layers": 1,
    "depth": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "projection_dim": 32,
    "vision_output_dim": 32,
    "out_hidden_size": 64,
    "output_dim": 64,
    "text_hidden_size": 64,
}

# Per-layer list attributes that are shrunk to the tiny layer count.
_LAYER_LISTS = ("layer_types", "mlp_layer_types", "indexer_types", "mtp_layer_types", "mtp_mlp_layer_types")

# ---------------------------------------------------------------------------------------------
# ONE table of per-type fixes. Keys are config attributes of the *text* config; they override
# the generic sizes above. "_use_cache": False marks types whose forward needs use_cache=False.
# ---------------------------------------------------------------------------------------------
TINY_FIXES: dict[str, dict[str, Any]] = {
    # DBRX: its own names (d_model/n_heads/n_layers) and nested attn/ffn configs; the attention
    # reads attn_config.rope_theta, which DbrxAttentionConfig does not declare, and clip_qkv.
    "dbrx": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 64,
        "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0, "rope_theta": 10000.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    # Doge: the routed "experts" are product keys: num_experts must be a square (num_keys =
    # sqrt(E) per key half); is_moe=False (the default) builds a dense MLP.
    "doge": {"is_moe": True, "num_experts": 16},
    # dots3_note: validate_architecture requires num_key_value_heads == num_attention_heads.
    "dots3_note": {"num_key_value_heads": 4},
    "dots3_note_text": {"num_key_value_heads": 4},
    # Flint: mlp_only_layers defaults to [0, 1], which would make both tiny layers dense.
    "flint": {"mlp_only_layers": [0]},
    # Gemma-4: the MoE block exists only with enable_moe_block=True (beside the dense MLP);
    # per-layer input embeddings default to a 262k vocab, shrink them.
    "gemma4": {
        "enable_moe_block": True,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 8,
    },
    "gemma4_text": {
        "enable_moe_block": True,
        "vocab_size_per_layer_input": VOCAB,
        "hidden_size_per_layer_input": 8,
    },
    # LFM2-MoE: layer_types defaults to None (derived from full_attn_idxs); give it one
    # short-conv layer and one full-attention layer (first layer dense via num_dense_layers=1).
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Qwen4-Exp: the indexed-attention (QSA) indexer has no defaults; fields must all be set,
    # indexer_kv_heads must be 1 and budget divisible by compress ratio.
    "qwen4_exp": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    "qwen4_exp_text": {
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 8,
        "indexer_compress_ratio": 2,
    },
    # ZAYA: validate_architecture only supports top-1 routing.
    "zaya": {"num_experts_per_tok": 1},
}

# Types whose forward must be run with use_cache=False.
NEEDS_NO_CACHE: set[str] = set()

# Types that cannot be built or run from a config in transformers 5.23, with the reason.
UNBUILDABLE: dict[str, str] = {}


def _fields(cfg_cls: type) -> set[str]:
    names = set()
    if dataclasses.is_dataclass(cfg_cls):
        names |= {f.name for f in dataclasses.fields(cfg_cls)}
    return names


def _shrink_list(values: list, n: int) -> list:
    """First occurrence of each distinct value in order, padded with the last one to length n."""
    distinct: list = []
    for v in values:
        if v not in distinct:
            distinct.append(v)
    return (distinct + [distinct[-1]] * n)[:n] if distinct else []


def _distinct(values: Any) -> int:
    if not isinstance(values, (list, tuple)):
        return 0
    seen: list = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return len(seen)


def _is_property(cfg_cls: type, name: str) -> bool:
    return isinstance(inspect.getattr_static(cfg_cls, name, None), property)


def _text_kwargs(cfg_cls: type, fix: dict[str, Any]) -> dict[str, Any]:
    default = cfg_cls()
    have = (_fields(cfg_cls) | set(default.to_dict())) - {k for k in _COMMON if _is_property(cfg_cls, k)}
    kw = {k: v for k, v in _COMMON.items() if k in have}
    n_layers = fix.get("num_hidden_layers")
    if n_layers is None:
        n_layers = max(
            [2] + [_distinct(getattr(default, k, None)) for k in _LAYER_LISTS if not _is_property(cfg_cls, k)]
        )
    kw["num_hidden_layers"] = n_layers
    orig_layers = getattr(default, "num_hidden_layers", None)
    for k in _LAYER_LISTS:
        if k in fix or _is_property(cfg_cls, k):
            continue
        v = getattr(default, k, None)
        if isinstance(v, (list, tuple)) and len(v) == orig_layers:
            kw[k] = _shrink_list(list(v), n_layers)
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(default, tok, None)
        if isinstance(v, int) and v >= VOCAB:
            kw[tok] = 0 if tok == "pad_token_id" else VOCAB - 1
        elif isinstance(v, (list, tuple)) and any(isinstance(x, int) and x >= VOCAB for x in v):
            kw[tok] = VOCAB - 1
    kw.update(fix)
    return kw


def _tower_kwargs(cfg_cls: type) -> dict[str, Any]:
    default = cfg_cls()
    have = _fields(cfg_cls) | set(default.to_dict())
    return {k: v for k, v in _TOWER.items() if k in have}


def tiny_config(model_type: str, **overrides: Any):
    """A tiny config of ``model_type``.

    ``overrides`` win over everything; for a composite (multimodal) config, top-level overrides
    go to the composite config and ``text_config={...}`` is merged into the text config.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg_cls = CONFIG_MAPPING[model_type]
    fix = {k: v for k, v in TINY_FIXES.get(model_type, {}).items() if not k.startswith("_")}
    top = dict(TINY_FIXES.get(model_type, {}).get("_top", {}))
    subs = getattr(cfg_cls, "sub_configs", None) or {}
    if "text_config" not in subs:
        kw = _text_kwargs(cfg_cls, fix)
        kw.update(top)
        kw.update(overrides)
        return cfg_cls(**kw)
    specs = getattr(cfg_cls, "sub_configs_defaults", None) or {}
    kw = {}
    for name, sub_cls in subs.items():
        if name == "text_config":
            kw[name] = {**_text_kwargs(sub_cls, fix), **overrides.pop("text_config", {})}
        elif getattr(specs.get(name), "optional", False):
            kw[name] = None
        else:
            kw[name] = _tower_kwargs(sub_cls)
    kw.update(top)
    kw.update(overrides)
    return cfg_cls(**kw)


def has_routed_experts(model: torch.nn.Module) -> bool:
    """True when some module is a routed-experts container (by structure, not by config)."""
    for name, mod in model.named_modules():
        cls = type(mod)
        if hasattr(cls, "_apply_gate"):
            return True
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "experts" or (cls.__name__.endswith("Experts") and "Shared" not in cls.__name__):
            return True
        # product-key MoE (Doge): routed rank-1 experts stored as embeddings
        if cls.__name__.endswith(("MoE", "Moe")) and getattr(mod, "num_experts", 0) > 1:
            return True
    return False


def _is_router(name: str, mod: torch.nn.Module) -> bool:
    cls = type(mod).__name__.lower()
    leaf = name.rsplit(".", 1)[-1]
    if "shared" in leaf or "shared" in cls:
        return False
    return "router" in cls or "router" in leaf or (leaf == "gate" and "expert" not in cls)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any):
    """A seeded float32 tiny model of ``model_type`` in eval mode with randomised routers."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    model.float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        routers = {n for n, m in model.named_modules() if n and _is_router(n, m)}
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if not p.is_floating_point():
                continue
            leaf = name.rsplit(".", 1)[-1]
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if "bias" in leaf or "statics" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif owner in routers and p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def find_moe_causal_lm_types() -> list[str]:
    """Scan transformers: causal-LM model types whose modeling code mentions experts and whose
    meta-device build from a tiny config really contains routed experts."""
    import os
    import re

    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    out = []
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        d = os.path.join(root, model_type_to_module_name(mt))
        if not os.path.isdir(d):
            continue
        text = "".join(
            open(os.path.join(d, f)).read() for f in os.listdir(d) if f.startswith("modeling_")
        )
        if not re.search(r"[Ee]xpert", text):
            continue
        try:
            cfg = tiny_config(mt)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
        except Exception:  # noqa: BLE001 - unbuildable types are listed separately
            out.append(mt)
            continue
        if has_routed_experts(model):
            out.append(mt)
    return out


MOE_CAUSAL_LM_TYPES: list[str] = []


@lru_cache(maxsize=1)
def _buildable() -> tuple[str, ...]:
    return tuple(t for t in MOE_CAUSAL_LM_TYPES if t not in UNBUILDABLE)


def buildable_types() -> list[str]:
    """MoE causal-LM types that build and run from a tiny config."""
    return list(_buildable())

