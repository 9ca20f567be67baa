"""The expert keys of a checkpoint from its config and shard headers alone, for the families whose
layouts are known exactly: no model is built and no transformers model code is imported.

:func:`moeprune.arch.keys.map_expert_keys` needs the model on the meta device (its module tree
finds the MoE blocks, transformers' conversion mapping renames the hub keys). Rewriting shards
needs less: which keys carry the expert axis, of which layer, on which axis, and for a per-expert
key its expert id. For the families below that is fixed by the names transformers 5.x uses for
them, on disk in both layouts: fused (``mlp.experts.gate_up_proj`` [E, ...], as
``save_pretrained`` writes) and hub (one key per expert, ``mlp.experts.7.gate_proj.weight``;
Mixtral ``block_sparse_moe.experts.7.w1.weight``). :func:`header_key_map` returns None (the caller
then builds the model) for anything it does not recognise in full: another model type, a quantized
checkpoint, a key it has no rule for (so the model path refuses stray tensors as before), MoE
layers other than the config's, an expert count that is not the config's. tests/test_header_keys.py
proves the result equal to the model-based map on every family and layout listed here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .keys import ExpertKey, ExpertKeyMap
from .spec import RoutingSpec
from .table import ARCH_TABLE

_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLA = (
    "q_a_proj",
    "q_a_layernorm",
    "q_b_proj",
    "q_proj",
    "kv_a_proj_with_mqa",
    "kv_a_layernorm",
    "kv_b_proj",
    "o_proj",
)
_DENSE = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """Where one family keeps its MoE tensors, relative to ``model.layers.<i>.``."""

    count: tuple[str, ...]  # config names of the routed expert count, first present wins
    router: str  # router module under the block
    router_leaves: tuple[str, ...]  # router tensors with the expert axis (axis 0)
    fused: tuple[str, ...]  # fused expert tensors under ``mlp.experts``
    per_expert: dict[str, str]  # hub leaf under ``experts.<i>.`` -> fused tensor it is merged into
    hub_block: str = "mlp"  # the block's name in hub checkpoints (Mixtral: block_sparse_moe)
    attention: tuple[str, ...] = _QKVO  # self_attn modules (a weight each) a checkpoint may hold
    # (config flag, self_attn modules with a bias when it is true); () = no bias is known to exist,
    # so a checkpoint with one goes the model path, which knows
    attention_bias: tuple[str, tuple[str, ...]] | tuple[()] = ()
    attention_leaves: tuple[str, ...] = ()  # self_attn tensors that are no module (gpt-oss sinks)
    # (config flag, self_attn modules with a weight only when it is true: GLM-4-MoE's q/k norms)
    attention_flagged: tuple[str, tuple[str, ...]] | tuple[()] = ()
    # why a novice cannot live in an expert's down bias (--pad-uniform), as
    # arch.pruned.bias_novice_problem finds on the experts module; None: it can
    bias_novice_problem: str | None = "its experts have no biases"
    shared: tuple[str, ...] = ()  # shared-expert MLPs under the block (gate_proj, up_proj, down_proj)
    shared_gate: str | None = None  # the shared expert's own gate (a linear) under the block
    selection_bias: str | None = None  # router leaf that is the selection bias
    inter: str = "moe_intermediate_size"  # config name of one expert's intermediate size I
    # shapes in E (experts), H (hidden_size), I, 2I of the fused tensors, router leaves and hub leaves
    shapes: tuple[tuple[str, str], ...] = (
        ("gate_up_proj", "E 2I H"),
        ("down_proj", "E H I"),
        ("weight", "E H"),
        ("e_score_correction_bias", "E"),
        ("gate_proj.weight", "I H"),
        ("up_proj.weight", "I H"),
        ("down_proj.weight", "H I"),
        ("w1.weight", "I H"),
        ("w3.weight", "I H"),
        ("w2.weight", "H I"),
    )


_QWEN_HUB = {
    "gate_proj.weight": "gate_up_proj",
    "up_proj.weight": "gate_up_proj",
    "down_proj.weight": "down_proj",
}
FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family(
        ("num_experts", "num_local_experts"),
        "gate",
        ("weight",),
        ("gate_up_proj", "down_proj"),
        _QWEN_HUB,
        attention=(*_QKVO, "q_norm", "k_norm"),
        attention_bias=("attention_bias", _QKVO),
    ),
    "qwen2_moe": Family(
        ("num_experts",),
        "gate",
        ("weight",),
        ("gate_up_proj", "down_proj"),
        _QWEN_HUB,
        attention_bias=("qkv_bias", ("q_proj", "k_proj", "v_proj")),
        shared=("shared_expert",),
        shared_gate="shared_expert_gate",
    ),
    "olmoe": Family(
        ("num_experts",),
        "gate",
        ("weight",),
        ("gate_up_proj", "down_proj"),
        _QWEN_HUB,
        attention=(*_QKVO, "q_norm", "k_norm"),
        inter="intermediate_size",
    ),
    "mixtral": Family(
        ("num_local_experts",),
        "gate",
        ("weight",),
        ("gate_up_proj", "down_proj"),
        {"w1.weight": "gate_up_proj", "w3.weight": "gate_up_proj", "w2.weight": "down_proj"},
        hub_block="block_sparse_moe",
        inter="intermediate_size",
    ),
    "deepseek_v3": Family(
        ("n_routed_experts",),
        "gate",
        ("weight", "e_score_correction_bias"),
        ("gate_up_proj", "down_proj"),
        _QWEN_HUB,
        attention=_MLA,
        shared=("shared_experts",),
        selection_bias="e_score_correction_bias",
    ),
    "glm4_moe": Family(
        ("n_routed_experts",),
        "gate",
        ("weight", "e_score_correction_bias"),
        ("gate_up_proj", "down_proj"),
        _QWEN_HUB,
        attention_bias=("attention_bias", ("q_proj", "k_proj", "v_proj")),
        attention_flagged=("use_qk_norm", ("q_norm", "k_norm")),
        shared=("shared_experts",),
        selection_bias="e_score_correction_bias",
    ),
    "gpt_oss": Family(
        ("num_local_experts",),
        "router",
        ("weight", "bias"),
        ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
        {},
        attention_bias=("attention_bias", _QKVO),
        attention_leaves=("sinks",),
        inter="intermediate_size",
        bias_novice_problem=None,  # clamped SwiGLU of 0 is 0, and no norm follows the experts
        shapes=(
            ("gate_up_proj", "E H 2I"),
            ("gate_up_proj_bias", "E 2I"),
            ("down_proj", "E I H"),
            ("down_proj_bias", "E H"),
            ("weight", "E H"),
            ("bias", "E"),
        ),
    ),
}


@dataclass
class HeaderBlock:
    """The parts of :class:`moeprune.arch.blocks.MoEBlock` that a plain removal rewrite reads."""

    index: int
    layer: int
    path: str
    experts_path: str
    num_experts: int
    top_k: int
    spec: RoutingSpec
    selection_bias_path: str | None
    router_weight_path: str
    router_extra: int = 0
    router_tensors: dict[str, int] = field(default_factory=dict)
    expert_out_proj_path: str | None = None  # (no family here runs its experts in a projected space)
    bias_novice_problem: str | None = None  # the family's (Family.bias_novice_problem)


def _moe_layers(model_type: str, cfg: Any, n_layers: int) -> list[int]:
    """The decoder layers transformers builds with a routed MoE block for this config."""
    if model_type in ("deepseek_v3", "glm4_moe"):
        return [i for i in range(n_layers) if i >= int(cfg.first_k_dense_replace)]
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
        only = set(getattr(cfg, "mlp_only_layers", None) or [])
        return [i for i in range(n_layers) if i not in only and (i + 1) % step == 0]
    return list(range(n_layers))


def _expert_count(fam: Family, cfg: Any) -> int | None:
    for name in fam.count:
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def header_key_map(config: Any, shapes: Mapping[str, tuple[int, ...]], drop: set[str]) -> ExpertKeyMap | None:
    """The expert-key map of a checkpoint with keys ``shapes`` (key -> shape), or None when this
    module cannot prove it equal to the model-based one (the caller then builds the model).
    Keys in ``drop`` (multi-token-prediction layers) are ignored."""
    model_type = str(getattr(config, "model_type", ""))
    fam = FAMILIES.get(model_type)
    if fam is None or getattr(config, "quantization_config", None) or model_type not in ARCH_TABLE:
        return None
    n_experts = _expert_count(fam, config)
    n_layers = getattr(config, "num_hidden_layers", None)
    if n_experts is None or not isinstance(n_layers, int):
        return None
    hidden, inter = getattr(config, "hidden_size", None), getattr(config, fam.inter, None)
    if not isinstance(hidden, int) or not isinstance(inter, int):
        return None
    sizes = _sizes(n_experts, hidden, inter)
    moe = _moe_layers(model_type, config, n_layers)
    if not moe:
        return None
    spec = ARCH_TABLE[model_type].spec(router=None, block=None, config=config)
    blocks = []
    for index, layer in enumerate(moe):
        path = f"model.layers.{layer}.mlp"
        blocks.append(
            HeaderBlock(
                index=index,
                layer=layer,
                path=path,
                experts_path=f"{path}.experts",
                num_experts=n_experts,
                top_k=spec.top_k,
                spec=spec,
                selection_bias_path=f"{path}.{fam.router}.{fam.selection_bias}"
                if fam.selection_bias
                else None,
                router_weight_path=f"{path}.{fam.router}.weight",
                router_tensors={f"{fam.router}.{leaf}": 0 for leaf in fam.router_leaves},
                bias_novice_problem=fam.bias_novice_problem,
            )
        )
    by_layer = {b.layer: b for b in blocks}
    found = ExpertKeyMap(blocks=blocks)  # type: ignore[arg-type]  (HeaderBlock has what the rewrite reads)
    covered: set[str] = set()
    per_expert: dict[tuple[int, str], dict[int, tuple[int, ...]]] = {}
    top = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for key, shape in shapes.items():
        if key in drop or key in top:
            continue
        m = _LAYER.match(key)
        if m is None or int(m.group(1)) >= n_layers:
            return None
        layer, rest = int(m.group(1)), m.group(2)
        block = by_layer.get(layer)
        if _plain(fam, rest, block is not None, config):
            continue
        if block is None:
            return None
        ek = _expert_key(fam, key, rest, block, tuple(shape))
        if ek is None or tuple(shape) != _shape(fam, ek, sizes):
            return None  # (the model path names the mismatch)
        found.keys[key] = ek
        if ek.kind == "per_expert":
            ids = per_expert.setdefault((layer, ek.suffix), {})
            if ek.expert in ids:  # the same expert twice (Mixtral under mlp. and block_sparse_moe.)
                return None
            ids[ek.expert] = tuple(shape)  # type: ignore[index]
        elif ek.target in covered:  # two keys become the same model tensor
            return None
        else:
            covered.add(ek.target or "")
    for b in blocks:  # complete: every fused / router tensor, or every expert of every hub template
        templates = {s: ids for (layer, s), ids in per_expert.items() if layer == b.layer}
        want_fused = {f"{b.experts_path}.{n}" for n in fam.fused}
        if templates:
            if set(templates) != {f".{leaf}" for leaf in fam.per_expert}:
                return None
            if any(
                sorted(ids) != list(range(b.num_experts)) or len(set(ids.values())) != 1
                for ids in templates.values()
            ):
                return None
            want_fused = set()
        want = want_fused | {f"{b.path}.{fam.router}.{leaf}" for leaf in fam.router_leaves}
        if not want <= covered or any(t.startswith(b.path + ".") and t not in want for t in covered):
            return None
    return found


def _sizes(experts: int, hidden: int, inter: int) -> dict[str, int]:
    """The dimensions :attr:`Family.shapes` names."""
    return {"E": experts, "H": hidden, "I": inter, "2I": 2 * inter}


def _leaf_shape(fam: Family, leaf: str, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """The shape of the family's tensor ``leaf`` at ``sizes`` (None: not one it tables)."""
    spec = dict(fam.shapes).get(leaf)
    return None if spec is None else tuple(sizes[d] for d in spec.split())


def _shape(fam: Family, ek: ExpertKey, sizes: dict[str, int]) -> tuple[int, ...] | None:
    """The shape config.json gives the tensor of ``ek`` (None: unknown)."""
    leaf = ek.suffix[1:] if ek.kind == "per_expert" else ek.key.rpartition(".")[2]
    return _leaf_shape(fam, leaf, sizes)


def _plain(fam: Family, rest: str, moe: bool, config: Any) -> bool:
    """``rest`` (the key after ``model.layers.<i>.``) is a tensor of the layer that holds no expert."""
    if rest in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return True
    head, _, leaf = rest.rpartition(".")
    if head == "self_attn":
        return leaf in fam.attention_leaves
    if head.startswith("self_attn."):
        module = head[len("self_attn.") :]
        if leaf == "weight":
            if module in fam.attention:
                return True
            if fam.attention_flagged:
                flag, modules = fam.attention_flagged
                return bool(getattr(config, flag, False)) and module in modules
            return False
        if leaf == "bias" and fam.attention_bias:
            flag, biased = fam.attention_bias
            return bool(getattr(config, flag, False)) and module in biased
        return False
    if leaf != "weight":
        return False
    if not moe:  # a dense layer's MLP
        return head in {f"mlp.{n}" for n in _DENSE}
    if fam.shared_gate is not None and head == f"mlp.{fam.shared_gate}":
        return True
    return any(head == f"mlp.{shared}.{n}" for shared in fam.shared for n in _DENSE)


def _expert_key(
    fam: Family, key: str, rest: str, block: HeaderBlock, shape: tuple[int, ...]
) -> ExpertKey | None:
    """The :class:`ExpertKey` of a key of a MoE layer (None: not one this family has)."""
    e = block.num_experts
    head, _, leaf = rest.partition(".")
    if head not in ("mlp", fam.hub_block):
        return None
    inner = leaf
    if inner.startswith(f"{fam.router}.") and inner[len(fam.router) + 1 :] in fam.router_leaves:
        if not shape or shape[0] != e:
            return None
        return ExpertKey(key, block.index, block.layer, "router", axis=0, target=f"{block.path}.{inner}")
    if not inner.startswith("experts."):
        return None
    name = inner[len("experts.") :]
    if head == "mlp" and name in fam.fused:
        if not shape or shape[0] != e:
            return None
        return ExpertKey(
            key, block.index, block.layer, "fused", axis=0, target=f"{block.experts_path}.{name}"
        )
    first, _, tail = name.partition(".")
    if head != fam.hub_block or not first.isdigit() or tail not in fam.per_expert or int(first) >= e:
        return None
    return ExpertKey(
        key,
        block.index,
        block.layer,
        "per_expert",
        expert=int(first),
        target=f"{block.experts_path}.{fam.per_expert[tail]}",
        prefix=key[: len(key) - len(name)],
        suffix=f".{tail}",
    )


def header_serve_spec(config: Any, blocks: list[HeaderBlock], layout: Any, experts: int) -> dict[str, Any]:
    """:func:`moeprune.remote.serve_spec` of a ragged or novice checkpoint planned from its
    headers, without building the model: what :func:`moeprune.arch.pruned.apply_layout` changes on
    the stock build of the written config (``experts`` routed experts in every layer). In these
    families that is the experts module's fused tensors and cached ``num_experts`` where a layer
    stores another count, the router's tensors and ``num_experts`` where it routes another count,
    and a novice module per block when novices live in a buffer (tests/test_header_keys.py: the
    spec read off a meta build, family by family, in both layouts)."""
    fam = FAMILIES[str(config.model_type)]
    hidden, inter = int(config.hidden_size), int(getattr(config, fam.inter))

    def shape(leaf: str, e: int) -> list[int]:
        return list(_leaf_shape(fam, leaf, _sizes(e, hidden, inter)) or ())

    tensors: dict[str, list[list[int]]] = {}
    attributes: dict[str, list[int]] = {}
    novices: dict[str, dict[str, Any]] = {}
    for b in blocks:
        stored = layout.experts_per_layer.get(b.layer, experts)
        routed = layout.router_experts(b.layer, experts)
        if stored != experts:
            for name in fam.fused:
                tensors[f"{b.experts_path}.{name}"] = [shape(name, experts), shape(name, stored)]
            attributes[f"{b.experts_path}.num_experts"] = [experts, stored]
        if routed != experts:
            router = f"{b.path}.{fam.router}"
            for leaf in fam.router_leaves:
                tensors[f"{router}.{leaf}"] = [shape(leaf, experts), shape(leaf, routed)]
            attributes[f"{router}.num_experts"] = [experts, routed]
        if layout.novices_in_buffer:  # apply_layout makes every block's experts a novice module
            ids = list(layout.novice_experts.get(b.layer, []))
            novices[b.experts_path] = {"routed": routed, "ids": ids, "hidden": hidden}
    return {"tensors": tensors, "attributes": attributes, "novices": novices, "unknown_tensors": []}
