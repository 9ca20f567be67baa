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


@dataclass
class SlotOutputs:
    """The unweighted output e_{i,t} of every (token, slot) pair of one experts call, P = T·k rows,
    kept in the order the experts computed them: grouped by expert (ascending id, slots with no
    expert last), so that per-expert statistics read contiguous rows and nothing is permuted twice.

    ``perm`` [P] gives each row's pair index t·k + j and ``sorted_ids`` [P] its expert (an id < 0 or
    >= the expert count: no expert, output 0); both None when ``rows`` are already in pair order
    (outputs handed over as [T, k, H], e.g. by Llama-4's input-gated block)."""

    rows: torch.Tensor  # [P, H]
    perm: torch.Tensor | None
    sorted_ids: torch.Tensor | None
    top_k: int
    # Σ_k g e, when the experts summed as they went (:func:`_slot_kernels`), and the gate
    # weights it was summed with
    summed: torch.Tensor | None = None
    summed_with: torch.Tensor | None = None

    @classmethod
    def in_pair_order(cls, outputs: torch.Tensor) -> SlotOutputs:
        """Wrap [T, k, H] outputs."""
        t, k, h = outputs.shape
        return cls(outputs.reshape(t * k, h), None, None, k)

    def slots(self) -> torch.Tensor:
        """[T, k, H] in pair order (a copy when the rows are grouped by expert)."""
        h = self.rows.shape[-1]
        if self.perm is None:
            return self.rows.view(-1, self.top_k, h)
        return torch.empty_like(self.rows).index_copy_(0, self.perm, self.rows).view(-1, self.top_k, h)

    def map_rows(self, fn) -> SlotOutputs:
        """The same pairs with ``fn`` applied to every row (a row-wise map, e.g. a linear layer)."""
        return SlotOutputs(fn(self.rows), self.perm, self.sorted_ids, self.top_k)

    def weighted_sum(self, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Σ_k g e per token [T, H], in the rows' dtype, the way transformers' grouped kernels sum
        (weight the rows, back to pair order, sum over the k slots)."""
        if self.summed is not None and top_k_weights is self.summed_with:
            return self.summed
        h = self.rows.shape[-1]
        g = top_k_weights.reshape(-1).to(self.rows.dtype)
        if self.perm is None:
            return (self.rows.view(-1, self.top_k, h) * g.view(-1, self.top_k, 1)).sum(dim=1)
        weighted = self.rows * g[self.perm].unsqueeze(1)
        inverse = torch.empty_like(self.perm)
        inverse[self.perm] = torch.arange(self.perm.numel(), device=self.perm.device)
        return weighted.index_select(0, inverse).view(-1, self.top_k, h).sum(dim=1)


def selected_expert_outputs(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    constant_outputs: dict[int, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each selected expert's unweighted output, computed once per (token, expert) pair: [T, k, H]
    (:func:`expert_slot_outputs` in pair order)."""
    return expert_slot_outputs(module, hidden_states, top_k_index, constant_outputs).slots()


def expert_slot_outputs(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    constant_outputs: dict[int, torch.Tensor] | None = None,
    top_k_weights: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> SlotOutputs:
    """Each selected expert's unweighted output, computed once per (token, expert) pair, grouped by
    expert. Each expert runs on its own tokens only (transformers' grouped kernels where they
    compute the module exactly, else one matmul per expert). ``constant_outputs`` maps expert ids
    to a fixed [H] vector that replaces the expert's computation (MoNE novices). A novice experts
    module (:class:`moeprune.arch.pruned.NoviceExperts`) takes router ids and adds its stored
    constants. ``top_k_weights``: the gate weights the caller will sum with
    (:meth:`SlotOutputs.weighted_sum`), where the experts may sum as they go (:func:`_slot_kernels`).
    ``out``: [T·k, H] memory in the activations' dtype for the rows of the per-expert loop (the
    grouped kernels allocate their own)."""
    novice_route = getattr(module, "novice_route", None)
    if novice_route is not None:
        top_k_index, constant_outputs = novice_route(top_k_index, constant_outputs)
    kernels = _slot_kernels(module, hidden_states)
    if not constant_outputs and kernels == "grouped":
        return grouped_expert_outputs(module, hidden_states, top_k_index)
    # the loop of transformers' eager experts: each expert's weighted output added as it is computed
    summing = not constant_outputs and top_k_weights is not None and kernels == "summing"
    t, k = top_k_index.shape
    flat = top_k_index.reshape(-1).long()
    order = torch.argsort(flat.masked_fill(flat < 0, torch.iinfo(torch.long).max), stable=True)  # no expert: last
    sorted_ids = flat[order]
    if out is None:
        out = hidden_states.new_empty((t * k, hidden_states.shape[-1]))
    elif out.shape != (t * k, hidden_states.shape[-1]) or out.dtype != hidden_states.dtype:
        raise ValueError(f"out must be [{t * k}, {hidden_states.shape[-1]}] {hidden_states.dtype}")
    summed = torch.zeros_like(hidden_states) if summing else None
    gates = top_k_weights.reshape(-1)[order] if summing else None
    experts, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        end = start + count
        if expert < 0:  # expert-parallel sentinels, zero / skip slots
            out[start:end] = 0
        elif constant_outputs is not None and expert in constant_outputs:
            out[start:end] = constant_outputs[expert].to(out.dtype)
        else:
            tokens = torch.div(order[start:end], k, rounding_mode="floor")
            e = single_expert_forward(module, expert, hidden_states[tokens]).to(out.dtype)
            out[start:end] = e
            if summed is not None:  # as eager does: weighted in the gates' dtype, added in the activations'
                summed.index_add_(0, tokens, (e * gates[start:end, None]).to(summed.dtype))
        start = end
    return SlotOutputs(out, order, sorted_ids, k, summed, top_k_weights if summing else None)


# Which kernels compute the per-slot outputs: "grouped" (transformers' grouped kernels, wherever
# they compute the module exactly: :func:`_groupable`), "loop" (one matmul per expert, as
# transformers' eager experts, the weighted sum gathered afterwards), or "auto": the grouped
# kernels except for experts of at least LOOP_MIN_EXPERT_SIZE weights on CPU, which run the loop
# that sums as it goes (:func:`_slot_kernels`: the faster there, docs/benchmarks.md, "The loop
# that sums as it goes"); small experts (the testbed's) spend more on the loop's few small ops per
# expert than on the grouped kernels ("All layers' statistics").
SLOT_KERNELS = "auto"
LOOP_MIN_EXPERT_SIZE = 65536


def _expert_size(module: nn.Module) -> int:
    """Weights of one expert of a fused experts module (its projections, biases left out)."""
    n_exp = int(module.num_experts)
    first = module.gate_up_proj if module.has_gate else module.up_proj
    return (first.numel() + module.down_proj.numel()) // max(n_exp, 1)


def _slot_kernels(module: nn.Module, hidden_states: torch.Tensor) -> str:
    """How :func:`expert_slot_outputs` computes this module's per-slot outputs: "grouped" (the
    grouped kernels), "summing" (the loop of transformers' ``eager`` experts, summing as it goes:
    large experts on CPU under ``auto``. Each expert's rows are gathered just before its matmuls,
    while they are in cache, and its weighted output added at once, instead of a second pass over
    all [T·k, H] rows gathering them back to pair order for the sum: docs/benchmarks.md, "Quiet
    rerun after the merge") or "loop" (the per-expert loop, the sum gathered afterwards)."""
    if SLOT_KERNELS == "loop" or not _groupable(module, hidden_states):
        return "loop"
    if SLOT_KERNELS == "auto" and hidden_states.device.type == "cpu":
        return "grouped" if _expert_size(module) < LOOP_MIN_EXPERT_SIZE else "summing"
    return "grouped"


def _use_grouped(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    return _slot_kernels(module, hidden_states) == "grouped"


def _use_eager_loop(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    return _slot_kernels(module, hidden_states) == "summing"


def plain_fused_experts(module: nn.Module) -> bool:
    """A ``@use_experts_implementation`` module as transformers builds it, computing with its own
    weights: not DBRX's or Llama-4's layouts, no novices, nothing moeprune holds quantized, no
    per-expert norm, an int expert count."""
    if dbrx.is_row_blocked_experts(module) or llama4.is_input_scaled_experts(module):
        return False
    if not (hasattr(type(module), "_apply_gate") and hasattr(module, "has_gate")):
        return False
    if getattr(module, "novice_route", None) is not None or module.__dict__.get("_moeprune_quantized") is not None:
        return False
    return variants.per_expert_norm(module) is None and isinstance(getattr(module, "num_experts", None), int)


def _groupable(module: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether transformers' grouped kernels compute exactly this module's per-slot outputs: a
    :func:`plain_fused_experts` module with weights in the activations' dtype and device."""
    if not plain_fused_experts(module):
        return False
    names = ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]
    if getattr(module, "has_bias", False):
        names += [n + "_bias" for n in names]
    for name in names:
        w = getattr(module, name, None)
        if not isinstance(w, torch.Tensor) or w.dtype != hidden_states.dtype or w.device != hidden_states.device:
            return False
    return True


def grouped_expert_outputs(module: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> SlotOutputs:
    """:func:`expert_slot_outputs` with transformers' grouped kernels (the ``grouped_mm`` experts
    implementation, stopped before the gate weights): a fixed number of large kernels instead of a
    few small ops per expert. Only where :func:`_groupable` holds."""
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
    return SlotOutputs(out, perm, ids_g, k)
