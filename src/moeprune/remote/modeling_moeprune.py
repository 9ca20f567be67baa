"""Plain-transformers loader for a ragged or novice checkpoint written by moeprune.

This file is copied into the checkpoint folder by ``moeprune prune`` and named by the ``auto_map``
of its ``config.json``, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    pipeline("text-generation", model=path, trust_remote_code=True)

load the checkpoint without moeprune installed. It needs only torch and transformers.

A transformers config holds one expert count for all MoE layers; these checkpoints differ from it
(``config.moeprune``): a ragged one keeps a different number of experts per layer, a novice one
(MoNE) keeps the router's full width but stores only the kept experts' weights, the replaced
experts ("novices") answering one constant vector each, weighted by their routing weight.

``MoepruneForCausalLM`` is the stock causal-LM class of ``BASE_MODEL_TYPE``: after the stock
``__init__`` it resizes the tensors and cached counts that ``config.moeprune["serve"]`` lists (what
moeprune's own loader changes, recorded when the checkpoint was written) and turns the novice
experts modules into :class:`NoviceExperts`. Every load is strict: a missing, unexpected or
mis-sized tensor raises instead of leaving randomly initialised weights.

The checkpoint's ``model_type`` is ``moeprune_<base>`` on purpose: without ``trust_remote_code``
transformers refuses it, where the stock class would load the weights into the wrong shapes
(``ignore_mismatched_sizes``) or, for a novice checkpoint, ignore the constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

BASE_MODEL_TYPE = "deepseek_v3"  # the source model's type: moeprune writes it here
CONFIG_KEY = "moeprune"
NOVICE_BUFFER = "novice_outputs"

_BaseConfig = CONFIG_MAPPING[BASE_MODEL_TYPE]
_BaseModel = MODEL_FOR_CAUSAL_LM_MAPPING[_BaseConfig]


class MoepruneConfig(_BaseConfig):
    model_type = "moeprune_" + BASE_MODEL_TYPE


# transformers converts hub layouts (one key per expert) into its fused tensors only for its own
# classes; this class is custom code, so give it the stock conversions under its model type.
_CONVERSIONS = get_checkpoint_conversion_mapping(_BaseModel.__name__) or get_checkpoint_conversion_mapping(
    BASE_MODEL_TYPE
)
if _CONVERSIONS is not None:
    register_checkpoint_conversion_mapping(MoepruneConfig.model_type, _CONVERSIONS, overwrite=True)


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, name = path.rpartition(".")
    return (model.get_submodule(owner_path) if owner_path else model), name


def _serve_spec(config) -> dict:
    data = getattr(config, CONFIG_KEY, None)
    if not isinstance(data, dict) or not isinstance(data.get("serve"), dict):
        raise ValueError(
            f"config.{CONFIG_KEY}.serve is missing: this is not a checkpoint written by moeprune"
        )
    return data["serve"]


def _mismatch(what: str, found, want) -> ValueError:
    return ValueError(
        f"{what} is {found} in this transformers version, the checkpoint was written for {want}: "
        f"load it with moeprune.load or the transformers version in config.json"
    )


def reshape(model: nn.Module, spec: dict) -> None:
    """Resize tensors, fix cached counts and install novice experts as ``spec`` says (in place)."""
    for path, (old, new) in spec["tensors"].items():
        owner, name = _owner(model, path)
        param = owner._parameters.get(name)
        t = param if param is not None else owner._buffers[name]
        if list(t.shape) != list(old):
            raise _mismatch(f"the shape of {path}", list(t.shape), list(old))
        fresh = torch.empty(list(new), dtype=t.dtype, device=t.device)
        if param is not None:
            owner._parameters[name] = nn.Parameter(fresh, requires_grad=param.requires_grad)
        else:
            owner._buffers[name] = fresh
    for path, (old, new) in spec["attributes"].items():
        owner, name = _owner(model, path)
        if owner.__dict__.get(name) != old:
            raise _mismatch(path, owner.__dict__.get(name), old)
        setattr(owner, name, new)
    for path, novice in spec["novices"].items():
        make_novice(model.get_submodule(path), int(novice["routed"]), novice["ids"], int(novice["hidden"]))


class NoviceExperts:
    """Mixin put before a fused experts class: the kept experts (renumbered 0..M-1) are computed by
    the class's own tensors and activation, the novices answer the rows of ``novice_outputs``."""

    routed_experts: int
    novice_ids: list
    expert_map: list  # router id -> local id (kept: 0..M-1, novice j: M + j)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, shape[-1])
        lookup = torch.tensor(self.expert_map, dtype=torch.long, device=top_k_index.device)
        local = torch.where(top_k_index >= 0, lookup[top_k_index.clamp(min=0).long()], top_k_index.long())
        kept = len(self.expert_map) - len(self.novice_ids)
        outputs = _selected_outputs(self, hidden_states, local, kept)
        weighted = outputs * top_k_weights.unsqueeze(-1).to(outputs.dtype)
        return weighted.sum(dim=1).to(hidden_states.dtype).reshape(shape)


def _linear(x: torch.Tensor, w: torch.Tensor, b, transposed: bool) -> torch.Tensor:
    out = x @ w if transposed else F.linear(x, w)
    return out + b if b is not None else out


def _expert_output(module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Unweighted output of kept expert ``e`` on tokens ``x`` [n, H], with the module's own pieces."""
    t = getattr(module, "is_transposed", False)
    bias = bool(getattr(module, "has_bias", False))

    def w(name: str) -> torch.Tensor:
        return getattr(module, name)[e].to(x.dtype)

    if module.has_gate:
        h = module._apply_gate(_linear(x, w("gate_up_proj"), w("gate_up_proj_bias") if bias else None, t))
    else:
        h = module.act_fn(_linear(x, w("up_proj"), w("up_proj_bias") if bias else None, t))
    out = _linear(h, w("down_proj"), w("down_proj_bias") if bias else None, t)
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out


def _selected_outputs(module: nn.Module, x: torch.Tensor, local: torch.Tensor, kept: int) -> torch.Tensor:
    """[T, k, H]: each selected expert's output, computed once per (token, expert) pair."""
    t, k = local.shape
    flat = local.reshape(-1)
    out = x.new_empty((t * k, x.shape[-1]))
    order = torch.argsort(flat, stable=True)
    experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
    constants = getattr(module, NOVICE_BUFFER)
    start = 0
    for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
        rows = order[start : start + count]
        start += count
        if expert < 0:  # expert-parallel sentinels; never produced on one process
            out[rows] = 0
        elif expert >= kept:
            out[rows] = constants[expert - kept].to(out.dtype)
        else:
            tokens = torch.div(rows, k, rounding_mode="floor")
            out[rows] = _expert_output(module, expert, x[tokens]).to(out.dtype)
    return out.view(t, k, -1)


_NOVICE_CLASSES: dict = {}


def make_novice(module: nn.Module, routed: int, novice_ids: list, hidden_size: int) -> None:
    """Turn a fused experts module (already sized for the kept experts) into a novice module."""
    novice_ids = sorted(int(i) for i in novice_ids)
    kept = [i for i in range(routed) if i not in set(novice_ids)]
    expert_map = [0] * routed
    for local, i in enumerate(kept):
        expert_map[i] = local
    for j, i in enumerate(novice_ids):
        expert_map[i] = len(kept) + j
    ref = next(iter(module.parameters()))
    module.register_buffer(
        NOVICE_BUFFER, torch.zeros(len(novice_ids), hidden_size, dtype=ref.dtype, device=ref.device)
    )
    cls = type(module)
    if cls not in _NOVICE_CLASSES:
        _NOVICE_CLASSES[cls] = type(f"Novice{cls.__name__}", (NoviceExperts, cls), {"__module__": __name__})
    module.__class__ = _NOVICE_CLASSES[cls]
    module.routed_experts = routed
    module.novice_ids = novice_ids
    module.expert_map = expert_map


_INEXACT = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")


class MoepruneForCausalLM(_BaseModel):
    config_class = MoepruneConfig

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        reshape(self, _serve_spec(config))

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        # transformers decides this by searching the class's source file for its experts
        # decorator; this file has none, so without this it would run the experts eagerly, not
        # with the stock class's default (grouped_mm), and logits would differ in the last bits
        return _BaseModel._can_set_experts_implementation()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Stock ``from_pretrained``, strict: every tensor of the checkpoint fills one of the model."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = [f"{k}: {sorted(map(str, info[k]))[:3]}" for k in _INEXACT if info.get(k)]
        if problems:
            raise ValueError(f"the checkpoint does not load exactly ({'; '.join(problems)})")
        return (model, info) if wants_info else model
