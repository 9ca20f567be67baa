"""Expert storage: which tensors carry the expert axis, and each selected expert's own output.

transformers 5 keeps the routed experts of almost every MoE in one module decorated with
``@use_experts_implementation``: fused 3D tensors ``gate_up_proj`` [E, 2I, H] (or [E, H, 2I] when
``is_transposed``) and ``down_proj`` [E, H, I], optional biases, and ``_apply_gate`` for the gated
activation (which also knows whether gate and up are concatenated or interleaved). We compute with
exactly those pieces, so every activation variant (clamped SwiGLU of gpt-oss, ...) is the module's
own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import dbrx, llama4, variants

FUSED_EXPERT_PARAMS = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)


def is_fused_experts(module: nn.Module) -> bool:
    """True for an experts module built by ``@use_experts_implementation`` (fused 3D tensors), or
    DBRX's, whose 2D tensors hold each expert as a block of rows (:mod:`.dbrx`)."""
    return (
        hasattr(type(module), "_apply_gate") and hasattr(module, "down_proj") and hasattr(module, "has_gate")
    ) or dbrx.is_row_blocked_experts(module) or llama4.is_input_scaled_experts(module)


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its weights (read off the module's own flags)."""

    class_name: str
    num_experts: int
    tensors: dict[str, tuple[int, ...]]  # name -> shape; the expert axis is 0 for all of them
    is_transposed: bool
    is_concatenated: bool
    has_bias: bool
    has_gate: bool
    has_post_expert_norm: bool
    custom_gate: bool  # `_apply_gate` overridden (clamped / soft-capped SwiGLU, ...)
    # Rows of axis 0 per expert: 1 for 3D tensors; DBRX's 2D [E * I, H] tensors hold I rows per
    # expert (``tensors`` then gives the [E, I, H] view, and names are paths under the module).
    rows_per_expert: int = 1

    @classmethod
    def of(cls, module: nn.Module) -> ExpertsLayout:
        from transformers.integrations.moe import _default_apply_gate

        if dbrx.is_row_blocked_experts(module):
            return cls._of_row_blocked(module)
        if llama4.is_input_scaled_experts(module):
            return cls._of_input_scaled(module)

        tensors = {
            name: tuple(p.shape)
            for name, p in module.named_parameters(recurse=False)
            if p.dim() >= 1 and not name.endswith(("_scale_inv", "_activation_scale"))  # fp8 scales
        }
        tensors.update(variants.expert_axis_children(module))  # Ergo's per-expert post-norm
        # a novice experts module (arch.pruned.NoviceExperts) stores fewer experts than it routes
        num = getattr(module, "routed_experts", None) or next(iter(tensors.values()))[0]
        custom = getattr(type(module), "_apply_gate", None) is not _default_apply_gate
        return cls(
            class_name=type(module).__name__,
            num_experts=int(num),
            tensors=tensors,
            # transformers' FP8Experts (quantized on GPU) lacks the flags it cannot have
            is_transposed=bool(getattr(module, "is_transposed", False)),
            is_concatenated=bool(getattr(module, "is_concatenated", True)),
            has_bias=bool(module.has_bias),
            has_gate=bool(module.has_gate),
            has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)),
            custom_gate=custom,
        )

    @classmethod
    def _of_row_blocked(cls, module: nn.Module) -> ExpertsLayout:
        rows = int(module.ffn_hidden_size)
        tensors = {}
        for name in dbrx.tensor_names():
            shape = tuple(module.get_parameter(name).shape)
            tensors[name] = (shape[0] // rows, rows, *shape[1:])
        num = getattr(module, "routed_experts", None) or next(iter(tensors.values()))[0]
        return cls(
            class_name=type(module).__name__,
            num_experts=int(num),
            tensors=tensors,
            is_transposed=False,
            is_concatenated=False,
            has_bias=False,
            has_gate=True,
            has_post_expert_norm=False,
            custom_gate=False,
            rows_per_expert=rows,
        )

    @classmethod
    def _of_input_scaled(cls, module: nn.Module) -> ExpertsLayout:
        """Llama-4: ``gate_up_proj`` [E, H, 2I] (gate columns first), ``down_proj`` [E, I, H]."""
        tensors = {name: tuple(module.get_parameter(name).shape) for name in llama4.WEIGHTS}
        num = getattr(module, "routed_experts", None) or tensors["gate_up_proj"][0]
        return cls(
            class_name=type(module).__name__,
            num_experts=int(num),
            tensors=tensors,
            is_transposed=True,
            is_concatenated=True,
            has_bias=False,
            has_gate=True,
            has_post_expert_norm=False,
            custom_gate=False,
        )

    def params_per_expert(self) -> int:
        total = 0
        for shape in self.tensors.values():
            n = 1
            for d in shape[1:]:
                n *= d
            total += n
        return total


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    out = x @ w if transposed else F.linear(x, w)
    return out + b if b is not None else out


def single_expert_forward(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Unweighted output of one expert of a fused experts module on tokens ``x`` [n, H]. Weights
    held quantized (transformers' ``FP8Experts``, or kept as stored by moeprune's offload) are
    dequantized for this expert only (:func:`moeprune.quant.expert_tensor`)."""
    from ..quant import expert_tensor

    if dbrx.is_row_blocked_experts(module):
        return dbrx.single_expert_forward(module, expert, x)
    if llama4.is_input_scaled_experts(module):
        return llama4.single_expert_forward(module, expert, x)

    def weight(name: str) -> torch.Tensor:
        return expert_tensor(module, name, expert, x.dtype)

    t = getattr(module, "is_transposed", False)
    has_bias = bool(getattr(module, "has_bias", False))
    if module.has_gate:
        w, b = weight("gate_up_proj"), (weight("gate_up_proj_bias") if has_bias else None)
        h = module._apply_gate(_linear(x, w, b, t))
    else:
        w, b = weight("up_proj"), (weight("up_proj_bias") if has_bias else None)
        h = module.act_fn(_linear(x, w, b, t))
    b = weight("down_proj_bias") if has_bias else None
    out = _linear(h, weight("down_proj"), b, t)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return variants.apply_per_expert_norm(module, expert, out)


def selected_expert_outputs(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    constant_outputs: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each selected expert's unweighted output, computed once per (token, expert) pair.

    Returns [T, k, H]. Tokens are grouped by expert so each expert runs one matmul on its tokens;
    no expert ever runs on a token that did not select it. ``constant_outputs`` maps expert ids to a
    fixed [H] vector that replaces the expert's computation (MoNE novices). A novice experts module
    (:class:`moeprune.arch.pruned.NoviceExperts`) takes router ids and adds its stored constants.
    """
    novice_route = getattr(module, "novice_route", None)
    if novice_route is not None:
        top_k_index, constant_outputs = novice_route(top_k_index, constant_outputs)
    if GROUPED and not constant_outputs:
        grouped = grouped_expert_outputs(module, hidden_states, top_k_index)
        if grouped is not None:
            return grouped
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1)
    out = hidden_states.new_empty((t * k, hidden_states.shape[-1]))
    order = torch.argsort(flat, stable=True)
    sorted_ids = flat[order]
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        start += count
        if expert < 0:  # expert-parallel sentinels; never produced on one process
            out[rows] = 0
            continue
        if constant_outputs is not None and expert in constant_outputs:
            out[rows] = constant_outputs[expert].to(out.dtype)
            continue
        tokens = torch.div(rows, k, rounding_mode="floor")
        out[rows] = single_expert_forward(module, expert, hidden_states[tokens]).to(out.dtype)
    return out.view(t, k, -1)


# Per-slot outputs from transformers' grouped kernels wherever they compute this module exactly
# (:func:`_groupable`): a fixed number of large kernels, so that busy cores hurt them no more than
# the stock forward. False forces the per-expert loop (tests of that path).
GROUPED = True


def _groupable(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether transformers' grouped kernels compute exactly this module's per-slot outputs: a
    ``@use_experts_implementation`` module with plain weights in the activations' dtype (nothing
    quantized, no per-expert norm, no novices)."""
    if dbrx.is_row_blocked_experts(module) or llama4.is_input_scaled_experts(module):
        return False
    if not (hasattr(type(module), "_apply_gate") and hasattr(module, "has_gate")):
        return False
    if getattr(module, "novice_route", None) is not None or module.__dict__.get("_moeprune_quantized") is not None:
        return False
    if variants.per_expert_norm(module) is not None or not isinstance(getattr(module, "num_experts", None), int):
        return False
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if getattr(module, "has_bias", False):
        names += [n + "_bias" for n in names]
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor) or w.dtype != hidden_states.dtype or w.device != hidden_states.device:
            return False
    return True


def grouped_expert_outputs(
    module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor
) -> torch.Tensor | None:
    """:func:`selected_expert_outputs` with transformers' grouped kernels (the ``grouped_mm``
    experts implementation, stopped before the gate weights): a fixed number of large kernels
    instead of a few small ops per expert. None where they do not apply (:func:`_groupable`)."""
    if not _groupable(module, hidden_states):
        return None
    from transformers.integrations.moe import _grouped_linear

    t, k = top_k_index.shape
    n_exp = int(module.num_experts)
    flat = top_k_index.reshape(-1).long()
    sentinel = bool((flat < 0).any())  # zero-expert / skip slots: no expert, output 0
    ids = flat.masked_fill(flat < 0, n_exp) if sentinel else flat
    ids_g, perm = torch.sort(ids, stable=True)  # the sentinels last: the kernels skip them
    x = hidden_states.index_select(0, torch.div(perm, k, rounding_mode="floor"))
    counts = torch.bincount(ids_g, minlength=n_exp + 1)[:n_exp]
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    has_bias = bool(getattr(module, "has_bias", False))
    safe = ids_g.clamp(max=n_exp - 1) if sentinel else ids_g
    transposed = bool(getattr(module, "is_transposed", False))
    if module.has_gate:
        b = module.gate_up_proj_bias[safe] if has_bias else None
        h = module._apply_gate(_grouped_linear(x, module.gate_up_proj, offsets, b, transposed))
    else:
        b = module.up_proj_bias[safe] if has_bias else None
        h = module.act_fn(_grouped_linear(x, module.up_proj, offsets, b, transposed))
    b = module.down_proj_bias[safe] if has_bias else None
    out = _grouped_linear(h, module.down_proj, offsets, b, transposed)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    if sentinel:  # rows past the last offset are left uninitialised by the kernel
        out = out.masked_fill((ids_g >= n_exp).unsqueeze(1), 0.0)
    return torch.empty_like(out).index_copy_(0, perm, out).view(t, k, -1)
