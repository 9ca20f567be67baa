"""Which checkpoint keys carry the routed experts of each MoE block: the only place that knows.

A checkpoint on disk is not always laid out like the model in memory. transformers renames and
converts keys on load (``transformers/conversion_mapping.py``): hub checkpoints keep one key per
expert (``mlp.experts.7.gate_proj.weight``; Mixtral/MiniMax ``block_sparse_moe.experts.7.w1.weight``)
that are merged into the fused ``experts.gate_up_proj`` [E, 2I, H]; routers and biases move
(Ernie ``mlp.moe_statics.*`` -> ``mlp.gate.moe_statics.*``, MiniMax-M2
``block_sparse_moe.e_score_correction_bias`` -> ``mlp.e_score_correction_bias``). Rather than
guessing, every checkpoint key is renamed with transformers' own transforms for the model
(:func:`transformers.conversion_mapping.get_model_conversion_mapping`, the list ``from_pretrained``
uses) and then compared with the tensors the MoE blocks found by structure
(:func:`moeprune.arch.blocks.find_moe_blocks`) carry along the expert axis:

- the fused expert tensors of the block's experts module (axis 0);
- the router tensors with an expert axis (router rows, ``e_score_correction_bias``, gpt-oss
  ``router.bias``; Ernie's ``moe_statics.e_score_correction_bias`` [1, E] on axis 1) and the
  selection bias wherever it lives.

A key that a ``MergeModulelist`` converter merges, or any key under the experts module whose
first name is a number (e.g. the ``weight_scale_inv`` of an fp8 hub checkpoint), holds one expert.
Everything else (attention, norms, the dense MLP of non-MoE layers, shared experts, their gates)
is not an expert tensor and is never touched.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..errors import UserError
from ..quant import companion_of, is_companion
from .variants import IDENTITY_ON_FLOAT_OPS, quantized_experts_problem

if TYPE_CHECKING:  # read without torch by the header-planned rewrite (.spec says why)
    from torch import nn

    from .blocks import MoEBlock

Kind = Literal["fused", "router", "per_expert"]


@dataclass(frozen=True)
class ExpertKey:
    """A checkpoint key that carries experts of one MoE block."""

    key: str
    block: int  # MoEBlock.index
    layer: int  # decoder-layer index
    kind: Kind
    axis: int | None = None  # expert axis of a fused/router tensor holding all E experts
    expert: int | None = None  # the expert of a per-expert key
    target: str | None = (
        None  # model tensor this key becomes (fused/router: itself; per-expert: the merged one)
    )
    prefix: str = ""  # per-expert key = prefix + str(expert) + suffix
    suffix: str = ""
    rows: int = 1  # entries of ``axis`` per expert (DBRX's 2D experts: I rows each)
    # expert axis of the model tensor ``target`` where a transpose on load moves it (Ergo's
    # [H, E] router on disk); None: the same as ``axis``
    target_axis: int | None = None

    @property
    def model_axis(self) -> int:
        return self.target_axis if self.target_axis is not None else (self.axis or 0)

    def renumbered(self, new_id: int) -> str:
        """The same per-expert key for expert ``new_id`` (renumbering after a removal)."""
        if self.kind != "per_expert":
            raise ValueError(f"{self.key} holds all experts; it is sliced, not renumbered")
        return f"{self.prefix}{new_id}{self.suffix}"


@dataclass
class ExpertKeyMap:
    """Every checkpoint key that carries experts, by MoE block."""

    blocks: list[MoEBlock]
    keys: dict[str, ExpertKey] = field(default_factory=dict)
    # checkpoint keys that are no tensor of the model (nor experts): a loader would refuse them
    stray: list[str] = field(default_factory=list)

    def of_block(self, index: int) -> list[ExpertKey]:
        return [k for k in self.keys.values() if k.block == index]

    def layout(self, index: int) -> str:
        """'per-expert' (hub layout) or 'fused' for the experts of one block."""
        kinds = {k.kind for k in self.of_block(index)}
        return "per-expert" if "per_expert" in kinds else "fused"

    def get(self, key: str) -> ExpertKey | None:
        return self.keys.get(key)


def _dotted_prefixes(key: str) -> Iterable[str]:
    parts = key.split(".")
    for n in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:n])


def _keeps_axis0(converter) -> bool:
    """True when none of a converter's operations moves or merges dimension 0."""
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, Split, Transpose

    for op in getattr(converter, "operations", []):
        if isinstance(op, Transpose):
            if 0 in (op.dim0, op.dim1):
                return False
        elif isinstance(op, (Concatenate, Chunk, Interleave, Split)):
            if getattr(op, "dim", 0) == 0:
                return False
        else:
            return False
    return True


def _axis_on_disk(converter, axis: int) -> int | None:
    """The stored tensor's axis that becomes the model tensor's expert ``axis`` (None when a
    converter operation splits or merges it, or is one moeprune does not know). A transpose
    moves it: Ergo stores its router as [H, E] (``gate_kernel``), the model holds [E, H]."""
    from transformers.core_model_loading import Chunk, Concatenate, Interleave, Split, Transpose

    for op in reversed(getattr(converter, "operations", [])):
        if type(op).__name__ in IDENTITY_ON_FLOAT_OPS:
            continue
        if isinstance(op, Transpose):
            axis = op.dim1 if axis == op.dim0 else op.dim0 if axis == op.dim1 else axis
        elif isinstance(op, (Concatenate, Chunk, Interleave, Split)):
            if getattr(op, "dim", 0) == axis:
                return None
        else:
            return None
    return axis


def _merges_experts(converter) -> bool:
    from transformers.core_model_loading import MergeModulelist

    return any(isinstance(op, MergeModulelist) for op in getattr(converter, "operations", []))


def map_expert_keys(
    model: nn.Module, blocks: list[MoEBlock], shapes: Mapping[str, tuple[int, ...]]
) -> ExpertKeyMap:
    """Classify the checkpoint keys ``shapes`` (key -> shape) of ``model`` (built on the meta device).

    Raises :class:`UserError` when a block's expert tensors are missing or do not hold its E experts.
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        apply_renamings,
        rename_source_key,
    )

    why = quantized_experts_problem(str(getattr(model.config, "model_type", "")), list(shapes))
    if why is not None:
        raise UserError(
            f"this checkpoint cannot be pruned: {why}",
            "save a float copy first (from_pretrained, then save_pretrained)",
        )
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    state = model.state_dict()
    meta_keys: dict[str, bool] = dict.fromkeys(state, True)
    bmp = getattr(model, "base_model_prefix", "") or ""

    # model tensor -> (block, expert axis) for every tensor that carries the expert axis
    axis_of: dict[str, tuple[MoEBlock, int]] = {}
    for b in blocks:
        for name in b.layout.tensors:
            axis_of[f"{b.experts_path}.{name}"] = (b, 0)
        for rel, axis in b.router_tensors.items():
            axis_of[f"{b.path}.{rel}"] = (b, axis)
        if b.selection_bias_path is not None and b.selection_bias_path not in axis_of:
            t = state.get(b.selection_bias_path)
            axis = 1 if t is not None and t.dim() == 2 and t.shape[0] == 1 else 0
            axis_of[b.selection_bias_path] = (b, axis)
    axis_of = {k: v for k, v in axis_of.items() if k in meta_keys}  # persistent tensors only
    experts_of = {b.experts_path: b for b in blocks}

    def normalise(key: str) -> str:
        """The key with the model's prefix, as the module paths have it (checkpoints may omit it)."""
        cands = [key, f"{bmp}.{key}"] if bmp else [key]
        if bmp and key.startswith(f"{bmp}."):
            cands.append(key[len(bmp) + 1 :])
        for cand in cands:
            if any(p in experts_of for p in _dotted_prefixes(cand)):
                return cand
        return key

    def experts_module(key: str) -> MoEBlock | None:
        for p in _dotted_prefixes(key):
            if p in experts_of:
                return experts_of[p]
        return None

    quantized = bool(getattr(model.config, "quantization_config", None))  # packed shapes differ
    found = ExpertKeyMap(blocks=blocks)
    for key, shape in shapes.items():
        renamed, pattern = rename_source_key(key, renamings, converters, bmp, meta_keys)
        if renamed not in meta_keys and key in meta_keys:
            renamed, pattern = key, None
        if pattern is None and renamed in meta_keys and not quantized:
            want = tuple(state[renamed].shape)
            if tuple(shape) != want:
                raise UserError(
                    f"checkpoint tensor '{key}' has shape {list(shape)}, the model its config.json "
                    f"describes has {list(want)}",
                    "the checkpoint does not match its config.json",
                )
        hit = axis_of.get(renamed)
        if hit is not None and (pattern is None or not _merges_experts(by_pattern[pattern])):
            block, axis = hit
            model_axis = axis
            if pattern is not None and not _keeps_axis0(by_pattern[pattern]):
                disk_axis = _axis_on_disk(by_pattern[pattern], axis)
                if disk_axis is None:
                    raise UserError(
                        f"checkpoint tensor '{key}' is converted on load in a way moeprune cannot slice",
                        "this checkpoint layout is not supported yet",
                    )
                axis = disk_axis
            kind: Kind = "fused" if renamed.startswith(block.experts_path + ".") else "router"
            rows = block.layout.rows_per_expert if kind == "fused" else 1
            found.keys[key] = ExpertKey(
                key,
                block.index,
                block.layer,
                kind,
                axis=axis,
                target=renamed,
                rows=rows,
                target_axis=model_axis if model_axis != axis else None,
            )
            continue
        # one key per expert: merged by a converter, or any tensor named experts.<i>.*
        renamed_only = normalise(apply_renamings(key, renamings))
        block = experts_module(renamed_only)
        if block is None:
            if renamed not in meta_keys and not (quantized and is_companion(key)):
                found.stray.append(key)  # (a quantized weight's scales are no model tensor, yet belong)
            continue  # not an expert tensor: copied unchanged
        rest = renamed_only[len(block.experts_path) + 1 :]
        first, _, tail = rest.partition(".")
        if first.isdigit() and tail:
            token = f"{first}.{tail}"
            if not key.endswith("." + token):
                raise UserError(
                    f"cannot tell the expert id in checkpoint key '{key}'",
                    "this checkpoint layout is not supported yet",
                )
            target = renamed if hit is not None else None
            found.keys[key] = ExpertKey(
                key,
                block.index,
                block.layer,
                "per_expert",
                expert=int(first),
                target=target,
                prefix=key[: len(key) - len(token)],
                suffix=f".{tail}",
            )
        elif len(shape) >= 1 and shape[0] == block.num_experts:
            # quantisation companions of fused tensors ([E, ...] fp8 scales, mxfp4 blocks / scales):
            # together they store the model tensor they name (mxfp4 has no key of that name)
            owner = companion_of(renamed_only)
            target = owner if owner in axis_of else None
            found.keys[key] = ExpertKey(key, block.index, block.layer, "fused", axis=0, target=target)
        elif first == "post_expert_norm" and renamed_only in meta_keys:
            # one norm shared by every expert (transformers' has_post_expert_norm; Muse-Spark): no
            # expert axis, copied unchanged (Ergo's per-expert norm has one and is sliced above)
            continue
        elif any(d != 1 for d in shape):
            raise UserError(
                f"checkpoint tensor '{key}' {list(shape)} lies in the experts of layer {block.layer} "
                f"but has no axis of {block.num_experts} experts",
                "this checkpoint layout is not supported yet",
            )
    _check_complete(found, axis_of, shapes)
    return found


def _check_complete(
    found: ExpertKeyMap, axis_of: dict[str, tuple[MoEBlock, int]], shapes: Mapping[str, tuple[int, ...]]
) -> None:
    """Every expert-axis tensor of every block is in the checkpoint, with all E experts."""
    covered: set[str] = set()
    for k in found.keys.values():
        if k.target is not None:
            covered.add(k.target)
        if k.axis is not None:
            block = found.blocks[k.block]
            shape = shapes[k.key]
            held = {block.num_experts * k.rows}
            if k.kind == "router":  # plus the non-prunable rows (Longcat zero / Inkling shared experts)
                held.add((block.num_experts + block.router_extra) * k.rows)
            if len(shape) <= k.axis or shape[k.axis] not in held:
                raise UserError(
                    f"checkpoint tensor '{k.key}' {list(shape)} does not hold the {block.num_experts} "
                    f"experts of layer {block.layer} that config.json declares",
                    "the checkpoint does not match its config.json",
                )
    for target, (block, _) in axis_of.items():
        if target not in covered:
            raise UserError(
                f"the checkpoint has no tensor for '{target}' (MoE layer {block.layer})",
                "the checkpoint does not match its config.json",
            )
    # per-expert keys: every template holds experts 0..E-1 exactly once
    templates: dict[tuple[str, str, int], list[int]] = defaultdict(list)
    template_shape: dict[tuple[str, str, int], tuple[str, tuple[int, ...]]] = {}
    for k in found.keys.values():
        if k.kind == "per_expert":
            templates[(k.prefix, k.suffix, k.block)].append(k.expert)  # type: ignore[arg-type]
            first = template_shape.setdefault((k.prefix, k.suffix, k.block), (k.key, tuple(shapes[k.key])))
            if tuple(shapes[k.key]) != first[1]:
                raise UserError(
                    f"checkpoint tensor '{k.key}' has shape {list(shapes[k.key])}, "
                    f"but '{first[0]}' has {list(first[1])}",
                    "the checkpoint is corrupt or does not match its config.json",
                )
    for (prefix, suffix, index), ids in templates.items():
        block = found.blocks[index]
        if sorted(ids) != list(range(block.num_experts)):
            missing = sorted(set(range(block.num_experts)) - set(ids))
            raise UserError(
                f"the checkpoint's per-expert tensors '{prefix}*{suffix}' do not hold experts "
                f"0..{block.num_experts - 1} (missing {missing[:5]})",
                "the checkpoint does not match its config.json",
            )
