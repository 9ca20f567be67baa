"""Routed experts held as stored (quantized bytes and scales), one expert dequantized at a time.

A DeepSeek-V3 MoE layer is 11.3 GB of fp8; dequantized to bfloat16 it is 22.5 GB, to float32 45 GB.
To run such a layer on a machine that holds one stored layer, the experts module keeps the
checkpoint's tensors as they are and :func:`moeprune.quant.expert_tensor` asks this store for one
expert's weight in the model's layout when the expert runs. The layout conversion is
transformers' own (the ``WeightConverter`` that ``from_pretrained`` would apply to the hub keys:
merge the per-expert list, concatenate gate and up, transpose), replayed for one expert: only
operations that act within an expert (or merge the expert list) can be replayed; any other is
refused with one line.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import UserError
from .quant import (
    FP8_SCALE,
    MXFP4_BLOCKS,
    MXFP4_SCALES,
    QuantFormat,
    dequantize_fp8,
    dequantize_mxfp4,
)

__all__ = ["QuantizedExperts", "attach", "detach", "split_expert_keys"]

ATTR = "_moeprune_quantized"


@dataclass
class _Stored:
    """One checkpoint tensor of the experts and what qualifies it."""

    weight: torch.Tensor | None = None  # fp8 weight / unquantized tensor / mxfp4 blocks
    scale: torch.Tensor | None = None  # fp8 scale_inv / mxfp4 scales


@dataclass
class _Param:
    """How one fused parameter of the experts module comes from the checkpoint."""

    fused: _Stored | None = None  # a tensor holding all E experts on axis 0
    # per-expert keys merged by a converter: source pattern index -> expert -> stored tensor
    parts: dict[int, dict[int, _Stored]] = field(default_factory=dict)
    operations: list[Any] = field(default_factory=list)


class QuantizedExperts:
    """The stored tensors of one experts module; :meth:`expert` dequantizes one expert's slice."""

    def __init__(self, fmt: QuantFormat, params: dict[str, _Param]) -> None:
        self.fmt = fmt
        self.params = params

    def nbytes(self) -> int:
        total = 0
        for p in self.params.values():
            stored = [p.fused] if p.fused else [s for part in p.parts.values() for s in part.values()]
            for s in stored:
                for t in (s.weight, s.scale):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total

    def _value(self, stored: _Stored, dtype: torch.dtype, index: int | None = None) -> torch.Tensor:
        w = stored.weight if index is None else stored.weight[index]
        if stored.scale is None:
            return w.to(dtype)
        s = stored.scale if index is None else stored.scale[index]
        if self.fmt.method == "mxfp4":  # rows as stored; the model holds the transpose
            return dequantize_mxfp4(w, s, dtype).transpose(-1, -2).contiguous()
        return dequantize_fp8(w, s, self.fmt.block_size, dtype, self.fmt.scale_fmt)

    def expert(self, name: str, expert: int, dtype: torch.dtype) -> torch.Tensor:
        param = self.params.get(name)
        if param is None:
            raise KeyError(f"the quantized experts hold no '{name}'")
        if param.fused is not None:
            return self._value(param.fused, dtype, expert)
        values = [self._value(param.parts[i][expert], dtype) for i in sorted(param.parts)]
        return _replay(param.operations, values)


def _replay(operations: list[Any], values: list[torch.Tensor]) -> torch.Tensor:
    """transformers' conversion operations applied to one expert's tensors (one per source pattern).
    After ``MergeModulelist(dim=0)`` the fused tensor's axis 0 is the expert axis, so later
    operations act on axis ``d - 1`` of the expert's own tensor."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    merged = False
    out: list[torch.Tensor] | torch.Tensor = values
    for op in operations:
        shift = 1 if merged else 0
        if isinstance(op, MergeModulelist):
            if op.dim != 0:
                break
            merged = True
        elif isinstance(op, Concatenate) and op.dim - shift >= 0 and isinstance(out, list):
            out = torch.cat(out, dim=op.dim - shift)
        elif isinstance(op, Transpose) and min(op.dim0, op.dim1) - shift >= 0:
            t = out[0] if isinstance(out, list) and len(out) == 1 else out
            if isinstance(t, list):
                break
            out = t.transpose(op.dim0 - shift, op.dim1 - shift)
        else:
            break
    else:
        if isinstance(out, list):
            if len(out) != 1:
                raise RuntimeError("a converter with several sources did not concatenate them")
            out = out[0]
        return out
    raise UserError(
        f"the checkpoint's expert layout is converted on load by {type(op).__name__}, which moeprune "
        "cannot apply to one quantized expert at a time",
        "profile this model in memory (without --offload sequential)",
    )


def _role(key: str, fmt: QuantFormat) -> tuple[str, str]:
    """(checkpoint key of the value, 'weight' | 'scale') for a stored tensor."""
    if fmt.method == "fp8" and key.endswith(FP8_SCALE):
        return key[: -len(FP8_SCALE)], "scale"
    if fmt.method == "mxfp4" and key.endswith(MXFP4_SCALES):
        return key[: -len(MXFP4_SCALES)], "scale"
    if fmt.method == "mxfp4" and key.endswith(MXFP4_BLOCKS):
        return key[: -len(MXFP4_BLOCKS)], "weight"
    return key, "weight"


@dataclass
class ExpertKeys:
    """The checkpoint keys of one decoder layer that feed routed-expert parameters."""

    # experts module path -> param name -> [(key, role, pattern index or None, expert or None)]
    by_module: dict[str, dict[str, list[tuple[str, str, int | None, int | None]]]] = field(
        default_factory=dict
    )
    operations: dict[tuple[str, str], list[Any]] = field(default_factory=dict)

    def keys(self) -> set[str]:
        return {k for params in self.by_module.values() for ks in params.values() for k, *_ in ks}


def split_expert_keys(
    model: nn.Module, experts_paths: list[str], keys: list[str], fmt: QuantFormat, weight_mapping: list
) -> ExpertKeys:
    """Which of ``keys`` (checkpoint keys of one layer) carry the fused parameters of the experts
    modules at ``experts_paths``, with transformers' renaming rules (``weight_mapping``)."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [w for w in weight_mapping if isinstance(w, WeightRenaming)]
    converters = [w for w in weight_mapping if isinstance(w, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta_sd = dict.fromkeys(model.state_dict(), True)
    bmp = model.base_model_prefix
    direct = {
        path: {n for n, _ in model.get_submodule(path).named_parameters(recurse=False)}
        for path in experts_paths
    }
    found = ExpertKeys()
    for key in keys:
        if key.endswith((".input_scale", ".activation_scale")):
            continue
        base, role = _role(key, fmt)
        renamed, pattern = rename_source_key(base, renamings, converters, bmp, meta_sd)
        if renamed not in meta_sd and base in meta_sd:
            renamed, pattern = base, None
        for path in experts_paths:
            name = renamed[len(path) + 1 :] if renamed.startswith(path + ".") else None
            if name is None or name not in direct[path]:
                continue
            index = expert = None
            if pattern is not None:
                conv = by_pattern[pattern]
                index = list(conv.source_patterns).index(pattern)
                found.operations[(path, name)] = list(conv.operations)
                expert = _expert_id(base, path, model)
            found.by_module.setdefault(path, {}).setdefault(name, []).append((key, role, index, expert))
    return found


def _expert_id(key: str, experts_path: str, model: nn.Module) -> int:
    """The expert number in a per-expert hub key (``...experts.7.gate_proj.weight`` -> 7)."""
    last = experts_path.rsplit(".", 1)[-1]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if parts[i - 1] == last and parts[i].isdigit():
            return int(parts[i])
    raise UserError(f"cannot tell the expert id in checkpoint key '{key}'", "this layout is not supported")


def build(
    fmt: QuantFormat, entries: dict[str, list[tuple[str, str, int | None, int | None]]],
    operations: Mapping[str, list[Any]], tensors: Mapping[str, torch.Tensor],
) -> QuantizedExperts:  # fmt: skip
    """A store from the read tensors of one experts module (``entries`` from :func:`split_expert_keys`)."""
    params: dict[str, _Param] = {}
    for name, items in entries.items():
        param = params.setdefault(name, _Param(operations=list(operations.get(name, []))))
        for key, role, index, expert in items:
            if index is None:
                stored = param.fused = param.fused or _Stored()
            else:
                stored = param.parts.setdefault(index, {}).setdefault(expert, _Stored())
            setattr(stored, role, tensors[key])
    return QuantizedExperts(fmt, params)


def attach(module: nn.Module, store: QuantizedExperts) -> None:
    module.__dict__[ATTR] = store


def detach(module: nn.Module) -> None:
    module.__dict__.pop(ATTR, None)


def held_params(module: nn.Module) -> set[str]:
    store = module.__dict__.get(ATTR)
    return set(store.params) if store is not None else set()


def check_complete(store: QuantizedExperts, module: nn.Module, path: str) -> None:
    """Every fused parameter of ``module`` is in ``store``, with all its experts (and scales)."""
    for name, p in module.named_parameters(recurse=False):
        n_experts = int(p.shape[0])
        param = store.params.get(name)
        ok = param is not None
        if ok and param.fused is not None:
            ok = param.fused.weight is not None and int(param.fused.weight.shape[0]) == n_experts
        elif ok:
            ok = bool(param.parts) and all(
                sorted(part) == list(range(n_experts)) and all(s.weight is not None for s in part.values())
                for part in param.parts.values()
            )
        if not ok:
            raise UserError(
                f"the checkpoint does not hold every expert of '{path}.{name}' ({n_experts} experts)",
                "the checkpoint does not match its config.json",
            )
