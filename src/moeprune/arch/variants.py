"""MoE variants whose experts or routers carry one more piece than the common fused layout.

- Ergo: its experts module holds a per-expert RMSNorm (``post_expert_norm.weight`` [E, H]) applied
  to each expert's output before the gate weight; it is an expert tensor, sliced with the experts.
  (Ergo's ``feedforward_residual_gate`` is per hidden unit, not per expert: nothing to slice.)
- DeepSeek-V4: its first MoE layers route by a frozen token-id -> expert table (``tid2eid``); which
  experts a token uses there does not depend on the router, so routing statistics cannot score
  them and removing an expert leaves tokens whose table entry has no replacement. Those layers are
  not prunable blocks: they are kept whole (all experts), and only the learned-router layers are
  profiled and pruned. A pruned model then has different expert counts per layer (a ragged
  checkpoint, loaded by :func:`moeprune.load`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch where a tensor is looked at: arch.keys imports this module (.spec says why)
    import torch
    from torch import nn

# Children of an experts module whose parameter has one row per expert (Ergo's post-expert norm).
_PER_EXPERT_CHILDREN = ("post_expert_norm",)


def per_expert_norm(module: nn.Module) -> nn.Module | None:
    """The experts module's per-expert post-norm (weight [E, H], called with expert ids), if any.

    transformers' own ``has_post_expert_norm`` flag means one shared norm called on the output
    alone; this is the other kind (Ergo's ``ErgoExpertNorm``)."""
    import torch

    if getattr(module, "has_post_expert_norm", False):
        return None
    norm = getattr(module, "post_expert_norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return norm
    return None


def expert_axis_children(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Tensors below the experts module's children that carry the expert axis (name -> shape)."""
    from torch import nn

    out: dict[str, tuple[int, ...]] = {}
    for child in _PER_EXPERT_CHILDREN:
        if child == "post_expert_norm" and per_expert_norm(module) is None:
            continue
        sub = getattr(module, child, None)
        if isinstance(sub, nn.Module):
            for name, p in sub.named_parameters():
                out[f"{child}.{name}"] = tuple(p.shape)
    return out


def apply_per_expert_norm(module: nn.Module, expert: int, out: torch.Tensor) -> torch.Tensor:
    """``out`` [n, H] of expert ``expert`` through its own post-norm, where the module has one."""
    norm = per_expert_norm(module)
    if norm is None:
        return out
    import torch

    ids = torch.full((out.shape[0],), expert, dtype=torch.long, device=out.device)
    return norm(out, ids)


def is_hash_routed(block: nn.Module) -> bool:
    """A block that routes by a token-id -> expert table (DeepSeek-V4 ``hash_moe`` layers)."""
    import torch

    router = getattr(block, "gate", None)
    return bool(getattr(block, "is_hash", False)) or isinstance(getattr(router, "tid2eid", None), torch.Tensor)


def whole_layers(model: nn.Module) -> dict[int, int]:
    """Decoder layer -> expert count of the MoE layers kept whole (hash-routed): every checkpoint
    moeprune writes keeps all their experts, so it records them with the pruned layers' counts."""
    from .blocks import decoder_layers
    from .experts import ExpertsLayout, is_fused_experts

    out: dict[int, int] = {}
    for i, layer in enumerate(decoder_layers(model)):
        for name, mod in layer.named_modules():
            if not name or not is_fused_experts(mod):
                continue
            parent = name.rpartition(".")[0]
            if is_hash_routed(layer.get_submodule(parent) if parent else layer):
                out[i] = ExpertsLayout.of(mod).num_experts
    return out


# Load-time converter operations that leave a float checkpoint tensor as it is: Inkling2-Loop's
# expert dequantization returns its only source unchanged when no scales come with it (a float
# checkpoint); with scales (NVFP4 / MXFP8) the checkpoint is refused by :func:`quantized_experts_problem`.
IDENTITY_ON_FLOAT_OPS = ("Inkling2LoopDequantizeExperts",)
# Expert companions of Inkling2-Loop's published NVFP4 / MXFP8 experts.
_LOOP_QUANT_SUFFIXES = ("_weight_scale", "_weight_amax", "_weight_outer_scale_denominator")


def quantized_experts_problem(model_type: str, keys: list[str]) -> str | None:
    """Why the checkpoint's experts cannot be sliced (None when they can): Inkling2-Loop's
    published checkpoints store NVFP4 / MXFP8 experts that transformers dequantizes on load."""
    if not model_type.startswith("inkling2_loop"):
        return None
    for key in keys:
        if ".experts.w" in key and key.endswith(_LOOP_QUANT_SUFFIXES):
            fmt = "NVFP4" if key.endswith(("_amax", "_denominator")) or any(
                k.endswith("_weight_amax") for k in keys
            ) else "MXFP8"
            return f"its experts are stored in {fmt} ('{key}'), which moeprune cannot read"
    return None


def looped_layers(config: Any) -> dict[int, int]:
    """Decoder layer -> passes, for layers the model runs more than once per token (Inkling2-Loop:
    layers ``loop_layer_index_start`` .. ``end - 1``, ``loop_num_passes`` times each)."""
    text = config.get_text_config()
    passes = int(getattr(text, "loop_num_passes", 1) or 1)
    start, end = getattr(text, "loop_layer_index_start", None), getattr(text, "loop_layer_index_end", None)
    if passes <= 1 or start is None or end is None:
        return {}
    n = int(getattr(text, "num_hidden_layers", 0) or 0)
    return {i: passes for i in range(int(start), min(int(end), n))}


def profile_problem(config: Any, layers: list[int]) -> str | None:
    """Why the MoE layers ``layers`` cannot be profiled (None when they can): a looped layer routes
    each token once per pass through the same experts, and a profile holds one routing per token
    and MoE layer (its PreMoe thresholds are means over tokens), so it has no place for them."""
    looped = sorted(set(looped_layers(config)) & set(layers))
    if not looped:
        return None
    passes = looped_layers(config)[looped[0]]
    return (
        f"its MoE layers {looped[0]}-{looped[-1]} are looped: the model runs each of them {passes} times "
        "per token, and a profile holds one routing per token and layer, so moeprune cannot profile them yet"
    )


# What a user of these types should know beyond the routing family (docs/architectures.md).
TYPE_NOTES: dict[str, str] = {
    "deepseek_v4": "hash-routed MoE layers (a token-id -> expert table, `tid2eid`) are kept whole with "
    "all their experts, since routing statistics cannot score them and a removed expert has no "
    "replacement in the table; only the learned-router layers are profiled and pruned, so a pruned "
    "checkpoint is ragged (`config.moeprune`) and loads with `moeprune.load`; `--pad-uniform` is refused",
    "ergo": "the per-expert post-norm (`experts.post_expert_norm.weight` [E, H]) is sliced with the "
    "experts; the router published as `gate_kernel` [H, E] is sliced on its axis 1",
    "inkling2_loop_text": "float checkpoints only: the published NVFP4 / MXFP8 expert checkpoints are "
    "refused (save a float copy first); removal is exact with active loop layers, but a model whose "
    "loop runs more than one pass cannot be profiled yet (a profile holds one routing per token and layer)",
}
