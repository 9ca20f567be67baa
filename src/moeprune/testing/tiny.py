"""Tiny random models of every MoE causal-LM type in transformers 5.x.

``tiny_config(model_type)`` returns a config with hidden 64, 2-3 layers (a dense first layer
where the architecture has a dense prefix), 8 routed experts, top-2, one shared expert where the
architecture has them, and group-limited routing with 2 groups where it exists;
``tiny_model(model_type)`` a seeded float32 model (< 2M parameters) in eval mode whose routers
are randomised so that routing is diverse. Per-type needs are kept in ONE table,
``TINY_FIXES``. The per-type survey of routers and MoE blocks is docs/arch-survey.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

import torch

__all__ = [
    "MOE_CAUSAL_LM_TYPES",
    "TINY_FIXES",
    "UNBUILDABLE",
    "NEEDS_NO_CACHE",
    "TEXT_ALIASES",
    "TYPES_FROM_TRANSFORMERS",
    "buildable_types",
    "byte_tokenizer",
    "find_moe_causal_lm_types",
    "has_routed_experts",
    "tiny_config",
    "randomize_routing",
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
    "intermediate_size_mlp": 128,
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
    # sliding-window layers with their own attention shape (Inkling)
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
    # grouped low-rank output projection (DeepSeek-V4), hyper-connections (Qwen4-Exp),
    # per-head width of JetMoE's attention experts
    "o_lora_rank": 16,
    "o_groups": 2,
    "hc_lowrank": 16,
    "kv_channels": 16,
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
    # adapters from a tower into the text model (dots3_note): in = tower width, out = text width
    "adapter_in_dim": 32,
    "adapter_input_size": 32,
    "adapter_out_dim": 64,
}

# Per-layer list attributes that are shrunk to the tiny layer count.
_LAYER_LISTS = ("layer_types", "mlp_layer_types", "indexer_types", "mtp_layer_types", "mtp_mlp_layer_types")

# ---------------------------------------------------------------------------------------------
# ONE table of per-type fixes. Keys are attributes of the *text* config; they override the
# generic sizes above. "_towers": {sub_config_name: {...}} adds kwargs for a non-text tower.
# Generic rules applied before it (see _text_kwargs), so they need no entry here:
# * per-layer lists (layer_types, mlp_layer_types, ...) keep the first occurrence of each
#   distinct value, in order: hybrids (qwen3_next, qwen3_5_moe, qwen4_exp, kimi_linear,
#   bailing_hybrid, minimax, ...) get one linear-attention and one full-attention layer,
#   dense-prefix models get ["dense", "sparse"]; the layer count grows to 3 when a list needs it;
# * a dense/sparse mlp_layer_types selector always starts with a dense layer;
# * MLA configs (kv_lora_rank) get num_key_value_heads = num_attention_heads, and head_dim =
#   qk_rope_head_dim where the default config ties them (DeepSeek-V3 style rotary);
# * pad/bos/eos ids >= vocab are moved inside the tiny vocab.
# ---------------------------------------------------------------------------------------------
_DOTS3_SWA = {
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 4,
    "swa_q_lora_rank": 32,
    "swa_kv_lora_rank": 16,
    "swa_head_dim": 16,
    "swa_qk_nope_head_dim": 8,
    "swa_v_head_dim": 16,
}

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
    # DeepSeek-V2: the default topk_method "greedy" ignores n_group/topk_group; the full V2
    # uses "group_limited_greedy" (group score = max of the group), exercised here.
    "deepseek_v2": {"topk_method": "group_limited_greedy"},
    # Doge: the routed "experts" are product keys: num_experts must be a square (num_keys =
    # sqrt(E) per key half); is_moe=False (the default) builds a dense MLP.
    "doge": {"is_moe": True, "num_experts": 16},
    # dots3_note: validate_architecture requires num_key_value_heads == num_attention_heads; the
    # sliding-window layers get their own per_layer_config from swa_* kwargs (default 64 heads,
    # ranks 1024); the vision tower is itself a "pyramid" MoE: make its single layer dense.
    "dots3_note": {
        "num_key_value_heads": 4,
        **_DOTS3_SWA,
        "_towers": {"vision_config": {"mlp_layer_types": ["dense"]}},
    },
    "dots3_note_text": {"num_key_value_heads": 4, **_DOTS3_SWA},
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
    # Granite-MoE-Hybrid: layer_types defaults to all Mamba ("linear_attention"); a forward with
    # a cache needs at least one attention layer (get_seq_length). Every layer is MoE.
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # Jamba: attention/MoE placement by period/offset: layer 0 = attention + dense MLP,
    # layer 1 = Mamba + MoE (the cache needs an attention layer).
    "jamba": {
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
    },
    # Kolibri-1.1: sliding-window layers plus indexed-attention layers whose first one is an
    # indexer (index_layers); the indexer scores with at most heads/kv_heads query heads and pools
    # index_pool_size keys compressed by index_compression (defaults sized for 50 layers, 48 heads).
    "kolibri1_1": {
        "index_layers": [1],
        "index_num_heads": 2,
        "index_pool_size": 16,
        "index_compression": 2,
        "index_num_local_tokens": 4,
        "index_num_sink_tokens": 1,
        "sliding_window": 8,
        "mlp_only_layers": [0],
    },
    # Llama-4: MoE every interleave_moe_layer_step layers (Maverick: 2); step 2 gives layer 0 a
    # dense Llama4TextMLP and layer 1 the MoE (the default step 1 = Scout makes every layer MoE).
    "llama4": {"interleave_moe_layer_step": 2},
    "llama4_text": {"interleave_moe_layer_step": 2},
    # LFM2-MoE: layer_types defaults to None (derived from full_attn_idxs); give it one
    # short-conv layer and one full-attention layer (first layer dense via num_dense_layers=1).
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # Longcat-Flash: Z identity ("zero") experts beside the E routed ones; the default Z=256
    # makes the router and the (E+Z)-row expert tensor large. One Longcat layer holds two
    # attention sublayers, two dense MLPs and one MoE (num_hidden_layers = 2 * num_layers, so
    # 4 gives two Longcat layers).
    "longcat_flash": {"zero_expert_num": 2, "num_hidden_layers": 4},
    # Nemotron-H: one mixer per block (Mamba / attention / MoE / MLP); the default 4-block
    # pattern ends in a dense MLP block: keep Mamba + MoE + attention.
    "nemotron_h": {"layer_types": ["linear_attention", "moe", "full_attention"]},
    # PhiMoE: the sparsemixer weighs each of its two experts by a softmax over the logits within
    # 2 * router_jitter_noise (relative) of that expert's logit; at the published 0.01 almost every
    # tiny-model weight is exactly 1, at 0.3 the threshold keeps some neighbours and some not.
    "phimoe": {"router_jitter_noise": 0.3},
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
    # ZAYA: validate_architecture only supports top-1 routing; the router is an MLP of width
    # router_hidden_size (default 256) over E+1 classes (the last one = skip).
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 32},
}

# Types whose forward must be run with use_cache=False. Empty since transformers 5.23: the hybrids
# that failed with a cache (Jamba, Granite-MoE-Hybrid: "get_seq_length can only be called on
# Attention layers") only did so because their tiny layer pattern had no attention layer, which
# TINY_FIXES now gives them.
NEEDS_NO_CACHE: set[str] = set()

# Types that cannot be built or run from a config in TYPES_FROM_TRANSFORMERS, with the reason. Empty:
# every type in MOE_CAUSAL_LM_TYPES builds and runs with TINY_FIXES.
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
    # MLA models whose rotary embedding is sized by head_dim == qk_rope_head_dim (DeepSeek-V3 style)
    rope = getattr(default, "qk_rope_head_dim", None)
    if rope is not None and getattr(default, "head_dim", None) == rope:
        kw["head_dim"] = _COMMON["qk_rope_head_dim"]
    # MLA expands the latent KV to one head per query head (real configs set kv heads == heads)
    if "kv_lora_rank" in kw and "num_key_value_heads" in kw:
        kw["num_key_value_heads"] = kw["num_attention_heads"]
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
    # Architectures with a per-layer dense/sparse selector get a dense first layer, like the
    # dense-prefix knobs above (first_k_dense_replace, num_dense_layers).
    mlp_types = kw.get("mlp_layer_types", getattr(default, "mlp_layer_types", None))
    if (
        "mlp_layer_types" in have
        and "mlp_layer_types" not in fix
        and (mlp_types is None or set(mlp_types) <= {"dense", "sparse"})
    ):
        kw["mlp_layer_types"] = ["dense"] + ["sparse"] * (n_layers - 1)
    _shrink_new_sizes(default, kw, fix)
    for tok in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(default, tok, None)
        if isinstance(v, int) and v >= VOCAB:
            kw[tok] = 0 if tok == "pad_token_id" else VOCAB - 1
        elif isinstance(v, (list, tuple)) and any(isinstance(x, int) and x >= VOCAB for x in v):
            kw[tok] = VOCAB - 1
    kw.update(fix)
    return kw


# Size-like fields a new transformers release may add to a config with a full-size default
# (transformers 5.25: Inkling-2's unpadded_vocab_size 200058 > the tiny vocab gave a negative
# dimension; Ergo's first_dense_intermediate_size 32768 made a 4M-parameter model). Any int field
# whose name matches one of these patterns and that _COMMON / TINY_FIXES leave unset is capped.
_SIZE_CAPS: tuple[tuple[str, int], ...] = (
    ("vocab", VOCAB),
    ("intermediate_size", _COMMON["intermediate_size"]),
    ("ffn_hidden_size", _COMMON["ffn_hidden_size"]),
    ("lora_rank", _COMMON["q_lora_rank"]),
)


def _shrink_new_sizes(default: Any, kw: dict[str, Any], fix: dict[str, Any]) -> None:
    """Cap every size-like int field of ``default`` not set explicitly (see _SIZE_CAPS)."""
    for name, value in default.to_dict().items():
        if name in kw or name in fix or isinstance(value, bool) or not isinstance(value, int):
            continue
        for pattern, cap in _SIZE_CAPS:
            if pattern in name and value > cap:
                kw[name] = cap
                break


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
    towers = TINY_FIXES.get(model_type, {}).get("_towers", {})
    subs = getattr(cfg_cls, "sub_configs", None) or {}
    if "text_config" not in subs:
        kw = _text_kwargs(cfg_cls, fix)
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
            kw[name] = {**_tower_kwargs(sub_cls), **towers.get(name, {})}
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
    # shared-expert gates (Qwen2-MoE shared_expert_gate) and expert modules are not routers;
    # GraniteMoeShared's router class name contains "shared" and is one.
    if "shared" in leaf or "sharedexpert" in cls or "expert" in cls:
        return False
    return "router" in cls or "router" in leaf or leaf == "gate"


# Names of tensors that bias expert *selection* (score-correction / load-balancing biases).
_ROUTING_BIAS = ("correction_bias", "expert_bias", "statics", "balancing_bias")

# Learned scales of the chosen weights (Gemma-4 per expert, Inkling global), 1 at init, where a
# wrongly sliced or ignored scale could not show: U(0.5, 2).
_ROUTER_WEIGHT_SCALES = ("per_expert_scale", "global_scale")

ROUTER_WEIGHT_STD = 0.5  # at fan-in 64; scaled by 8 / sqrt(fan_in) for other widths
ROUTING_BIAS_STD = 0.1
OTHER_BIAS_STD = 0.02


@torch.no_grad()
def randomize_routing(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make routing diverse in a freshly initialised model (in place, seeded).

    * the score matrix of every router (its last weight of dim >= 2): N(0, 0.5 * 8 / sqrt(fan_in))
      (std 0.5 at fan-in 64; std 0.02 gives near-uniform router scores); other matrices inside a
      router (Zaya's router MLP): N(0, 1 / fan_in);
    * every floating parameter or buffer named like ``*bias*`` / ``*statics*``: seeded normal
      noise *added* to its init (so structural values such as Zaya's -1 skip-class bias stay),
      std 0.1 for routing biases (score correction, expert bias, Ernie statics, router biases),
      std 0.02 elsewhere (a larger constant attention/norm bias would dominate the tiny
      embeddings and send every token to the same experts);
    * learned scales of the chosen weights (Gemma-4 ``per_expert_scale``, Inkling
      ``global_scale``): U(0.5, 2);
    * integer hash-routing tables (DeepSeek-V4 ``tid2eid``, zeros at init): k distinct random
      experts per token id.
    """
    gen = torch.Generator().manual_seed(seed)
    router_names = [n for n, m in model.named_modules() if n and _is_router(n, m)]
    routers = tuple(n + "." for n in router_names)
    # The last matrix of each router produces the expert scores; earlier ones (Zaya's router
    # MLP) get a variance-preserving N(0, 1/fan_in) so the scores do not saturate.
    last_matrix = {}
    for r in router_names:
        mats = [n for n, p in model.named_parameters() if n.startswith(r + ".") and p.dim() >= 2]
        if mats:
            last_matrix[r] = mats[-1]
    score_mats = set(last_matrix.values())
    n_experts = _num_experts(model.config)
    for name, p in list(model.named_parameters()) + list(model.named_buffers()):
        leaf = name.rsplit(".", 1)[-1]
        if not p.is_floating_point():
            if leaf == "tid2eid" and n_experts:
                perm = torch.rand(p.shape[0], n_experts, generator=gen).argsort(dim=-1)
                p.copy_(perm[:, : p.shape[1]].to(p.dtype))
            continue
        in_router = name.startswith(routers)
        if in_router and leaf in _ROUTER_WEIGHT_SCALES:
            p.copy_(0.5 + 1.5 * torch.rand(p.shape, generator=gen).to(p.dtype))
        elif "bias" in leaf or "statics" in name:
            std = ROUTING_BIAS_STD if in_router or any(k in name for k in _ROUTING_BIAS) else OTHER_BIAS_STD
            p.add_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)
        elif in_router and p.dim() >= 2:
            scale = ROUTER_WEIGHT_STD * 8.0 if name in score_mats else 1.0
            std = scale / math.sqrt(p.shape[-1])
            p.copy_(torch.randn(p.shape, generator=gen).to(p.dtype) * std)
    return model


def _num_experts(cfg) -> int | None:
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"):
        v = getattr(cfg, key, None)
        if isinstance(v, int) and v > 0:
            return v
    ffn = getattr(cfg, "ffn_config", None)
    return getattr(ffn, "moe_num_experts", None)


def tiny_model(model_type: str, seed: int = 0, **overrides: Any):
    """A seeded float32 tiny model of ``model_type`` in eval mode with randomised routing."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.float().eval()
    return randomize_routing(model, seed + 1)


def find_moe_causal_lm_types() -> tuple[list[str], dict[str, str]]:
    """Scan the installed transformers for MoE causal-LM types (slow: a few seconds).

    Candidates are the ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` types whose modeling code mentions
    experts; each is built on the meta device from ``tiny_config`` (falling back to its default
    config) and kept when the model really contains routed experts. Returns ``(types, failures)``
    where ``failures`` maps candidates that could not be built either way to the error.
    """
    import os
    import re

    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    found: list[str] = []
    failures: dict[str, str] = {}
    for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        d = os.path.join(root, model_type_to_module_name(mt))
        if not os.path.isdir(d):
            continue
        text = ""
        for f in os.listdir(d):
            if f.startswith("modeling_") and f.endswith(".py"):
                with open(os.path.join(d, f), encoding="utf-8") as fh:
                    text += fh.read()
        if not re.search(r"[Ee]xpert", text):
            continue
        model = None
        for make in (lambda mt=mt: tiny_config(mt), lambda mt=mt: AutoConfig.for_model(mt)):
            try:
                with torch.device("meta"):
                    model = AutoModelForCausalLM.from_config(make())
                break
            except Exception as e:  # noqa: BLE001 - any build error is reported, not raised
                failures[mt] = f"{type(e).__name__}: {e}".splitlines()[0][:200]
        if model is None:
            continue
        failures.pop(mt, None)
        if has_routed_experts(model):
            found.append(mt)
    return found, failures


# Text-only aliases: model types whose AutoModelForCausalLM class is the same text model as the
# composite type's (same modules; the composite config nests the text config).
TEXT_ALIASES: dict[str, str] = {
    "dots3_note_text": "dots3_note",
    "gemma4_text": "gemma4",
    "llama4_text": "llama4",
    "qwen3_5_moe_text": "qwen3_5_moe",
    "qwen4_exp_text": "qwen4_exp",
}

# The transformers version MOE_CAUSAL_LM_TYPES was made from: the one constraints.txt pins
# (tests/test_tiny_models.py checks both).
TYPES_FROM_TRANSFORMERS = "5.25.0"

# Every MoE causal-LM type of transformers 5.25 (output of find_moe_causal_lm_types(); 62
# architectures + the 5 TEXT_ALIASES; 5.25 added ergo, inkling2_loop_text, kolibri1_1, lara_mini,
# minicpm5_moe). Not MoE although their code mentions experts: bamba, gemma3n(_text),
# gemma4_unified(_text), gemma4_assistant.
MOE_CAUSAL_LM_TYPES: list[str] = [
    "afmoe",
    "aria_text",
    "axk1",
    "axk2",
    "bailing_hybrid",
    "beam",
    "cohere2_moe",
    "dbrx",
    "deepseek_v2",
    "deepseek_v3",
    "deepseek_v32",
    "deepseek_v4",
    "doge",
    "dots1",
    "dots3_note",
    "dots3_note_text",
    "ergo",
    "ernie4_5_moe",
    "exaone_moe",
    "flex_olmo",
    "flint",
    "gemma4",
    "gemma4_text",
    "glm4_moe",
    "glm4_moe_lite",
    "glm_moe_dsa",
    "gpt_oss",
    "granitemoe",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
    "hunyuan_v1_moe",
    "hy_v3",
    "hy_v4",
    "inkling2_loop_text",
    "inkling2_text",
    "inkling_text",
    "jamba",
    "jetmoe",
    "kimi_linear",
    "kolibri1",
    "kolibri1_1",
    "laguna",
    "lara_mini",
    "lfm2_moe",
    "llama4",
    "llama4_text",
    "longcat_flash",
    "mellum",
    "mimo_v2_flash",
    "minicpm5_moe",
    "minimax",
    "minimax_m2",
    "minimax_m3_vl_text",
    "mixtral",
    "nemotron_h",
    "olmoe",
    "phimoe",
    "qwen2_moe",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen3_moe",
    "qwen3_next",
    "qwen4_exp",
    "qwen4_exp_text",
    "solar_open",
    "zaya",
]


def buildable_types() -> list[str]:
    """MoE causal-LM types that build and run from a tiny config."""
    return [t for t in MOE_CAUSAL_LM_TYPES if t not in UNBUILDABLE]


def byte_tokenizer():
    """A character-level tokenizer (<pad>=0, <s>=1, </s>=2, <unk>=3, printable ASCII, newline) that
    prepends BOS: enough to save beside a tiny model so the CLI can run end to end in tests."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for c in [chr(c) for c in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
