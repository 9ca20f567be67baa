"""Models whose MoE layers are not what their config alone describes, and how to build them.

A transformers config holds ONE routed-expert count for all layers. Checkpoints that moeprune
writes can differ from it, and record how in ``config.moeprune`` (:class:`PrunedLayout`):

- **ragged** (mode ``remove``, a global budget): MoE layer l keeps M_l experts; the config's count
  is max_l M_l and ``experts_per_layer`` gives every layer's own count;
- **novice** (MoNE, mode ``novice``): the router keeps all E rows, the experts module holds only the
  kept experts' weights, and the replaced experts answer a constant vector (``novice_outputs``
  [R, H], a buffer of the experts module).

:func:`apply_layout` turns a model freshly built from such a config (normally on the meta device,
inside ``from_pretrained``) into the right shape: it replaces the experts module's tensors and the
router's expert-axis tensors by correctly sized ones, fixes the counts modules cache
(``num_experts`` of experts, router and some blocks), and turns novice experts modules into
:class:`NoviceExperts`. Loading the safetensors then fills them (:func:`moeprune.load`).

Also here, because they are architecture facts: where padding experts go so that stock
transformers can load a ragged model (:func:`padding_slots`, :func:`pad_uniform_problem`), the
selection bias that makes an expert dead (:func:`dead_bias_value`), and whether a novice can be
stored in an expert's own down-projection bias (:func:`bias_novice_problem`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .table import EXPERT_COUNT_ATTRS

if TYPE_CHECKING:  # torch where a module is changed: the rewrite reads the layout without it (.spec says why)
    import torch
    from torch import nn

    from .blocks import MoEBlock
    from .experts import ExpertsLayout

CHECKPOINT_FORMAT = "moeprune-checkpoint/1"
CONFIG_KEY = "moeprune"  # config.json key holding the PrunedLayout
NOVICE_BUFFER = "novice_outputs"  # [R, H] buffer of a NoviceExperts module
DOWN_BIAS = "down_proj_bias"  # the fused experts' down-projection bias [E, H]
# Integer attributes in which modules cache their expert count.
# (ZAYA's router caches its E + 1 classes as num_router_classes)
CACHED_COUNT_ATTRS = (
    *EXPERT_COUNT_ATTRS, "total_experts", "n_experts", "num_routed_experts", "num_router_classes"
)
# The selection bias of a padding ("dead") expert: sigmoid scores lie in [0, 1] and trained
# correction biases are O(1), so a dead expert's selection score (<= 1 - 1e4) is never in the top-k.
DEAD_BIAS = -1.0e4

Mode = Literal["remove", "novice"]
NoviceStorage = Literal["buffer", "down_bias"]


@dataclass
class PrunedLayout:
    """What ``config.moeprune`` says about a checkpoint's MoE layers (decoder-layer index keys)."""

    mode: Mode
    experts_per_layer: dict[int, int]  # expert weights stored per MoE layer (expert-axis length)
    novice_experts: dict[int, list[int]] = field(default_factory=dict)  # router ids answering a constant
    novice_storage: NoviceStorage | None = None
    dead_experts: dict[int, list[int]] = field(default_factory=dict)  # padding slots (never selected)
    original_experts: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # informative fields, kept as written

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT,
            "mode": self.mode,
            "experts_per_layer": {str(k): v for k, v in sorted(self.experts_per_layer.items())},
        }
        if self.original_experts is not None:
            out["original_experts"] = self.original_experts
        if self.novice_experts:
            out["novice_experts"] = {str(k): list(v) for k, v in sorted(self.novice_experts.items())}
            out["novice_storage"] = self.novice_storage
        if self.dead_experts:
            out["dead_experts"] = {str(k): list(v) for k, v in sorted(self.dead_experts.items())}
        out.update(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrunedLayout:
        if data.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"config.{CONFIG_KEY} has format {data.get('format')!r}, not {CHECKPOINT_FORMAT!r}"
            )
        mode = data.get("mode")
        if mode not in ("remove", "novice"):
            raise ValueError(f"config.{CONFIG_KEY} has an unknown mode {mode!r}")
        known = {
            "format",
            "mode",
            "experts_per_layer",
            "novice_experts",
            "novice_storage",
            "dead_experts",
            "original_experts",
        }
        storage = data.get("novice_storage")
        if storage not in (None, "buffer", "down_bias"):
            raise ValueError(f"config.{CONFIG_KEY} has an unknown novice_storage {storage!r}")
        return cls(
            mode=mode,
            experts_per_layer={int(k): int(v) for k, v in dict(data.get("experts_per_layer") or {}).items()},
            novice_experts={
                int(k): [int(i) for i in v] for k, v in dict(data.get("novice_experts") or {}).items()
            },
            novice_storage=storage,
            dead_experts={
                int(k): [int(i) for i in v] for k, v in dict(data.get("dead_experts") or {}).items()
            },
            original_experts=data.get("original_experts"),
            extra={k: v for k, v in data.items() if k not in known},
        )

    @classmethod
    def of_config(cls, config: Any) -> PrunedLayout | None:
        """The layout recorded in a config (or its text config), or None for a stock checkpoint."""
        for cfg in (config, config.get_text_config()):
            data = getattr(cfg, CONFIG_KEY, None)
            if isinstance(data, Mapping):
                return cls.from_json(data)
        return None

    @property
    def novices_in_buffer(self) -> bool:
        return self.mode == "novice" and self.novice_storage == "buffer"

    def router_experts(self, layer: int, config_count: int) -> int:
        """Router rows of a layer: every layer routes over its stored experts, except novice
        checkpoints, whose routers keep all the config's experts."""
        if self.novices_in_buffer:
            return config_count
        return self.experts_per_layer.get(layer, config_count)


# --- building --------------------------------------------------------------------------------------


def _resize(owner: nn.Module, name: str, axis: int, n: int) -> None:
    """Replace ``owner.<name>`` by an uninitialised tensor with ``n`` entries along ``axis``."""
    import torch
    from torch import nn

    old = owner._parameters.get(name)
    if old is None:
        old = owner._buffers[name]
    if old.shape[axis] == n:
        return
    shape = list(old.shape)
    shape[axis] = n
    new = torch.empty(shape, dtype=old.dtype, device=old.device)
    if name in owner._parameters:
        owner._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        owner._buffers[name] = new
    if isinstance(owner, nn.Linear) and name == "weight" and axis == 0:
        owner.out_features = n


def expert_tensor(module: nn.Module, layout: ExpertsLayout, name: str) -> torch.Tensor:
    """Expert tensor ``name`` of an experts module with one entry per expert on axis 0 (a view
    [E, I, H] of DBRX's [E * I, H] tensors; the tensor itself otherwise)."""
    t = module.get_parameter(name)
    rows = layout.rows_per_expert
    return t if rows == 1 else t.view(-1, rows, *t.shape[1:])


def expert_storage(module: nn.Module, layout: ExpertsLayout, name: str, value: torch.Tensor):
    """(owner module, attribute, tensor as stored) for a value shaped like :func:`expert_tensor`."""
    owner, leaf = _owner(module, name)
    if layout.rows_per_expert != 1:
        value = value.reshape(-1, *value.shape[2:])
    return owner, leaf, value


def resize_experts(module: nn.Module, layout: ExpertsLayout, n: int) -> None:
    """Give every expert tensor of an experts module ``n`` experts (uninitialised, in place)."""
    for name in layout.tensors:
        _resize(*_owner(module, name), 0, n * layout.rows_per_expert)


def _set_cached_counts(modules: list[nn.Module], old: int, new: int) -> None:
    for mod in modules:
        for attr in CACHED_COUNT_ATTRS:
            value = mod.__dict__.get(attr)
            if isinstance(value, int) and not isinstance(value, bool) and value == old:
                setattr(mod, attr, new)


def _owner(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    owner_path, _, name = path.rpartition(".")
    return model.get_submodule(owner_path) if owner_path else model, name


def resize_block(model: nn.Module, block: MoEBlock, experts: int, router: int) -> None:
    """Give one MoE block ``experts`` expert weights and ``router`` routable experts (in place)."""
    old = block.num_experts
    ex = block.experts(model)
    resize_experts(ex, block.layout, experts)  # DBRX: a block of rows per expert, names under `mlp.`
    _set_cached_counts(list(ex.modules()), old, experts)
    if router == old:
        return
    seen: set[str] = set()
    for rel, axis in block.router_tensors.items():
        path = f"{block.path}.{rel}"
        seen.add(path)
        owner, name = _owner(model, path)
        extra = getattr(owner, name).shape[axis] - old  # non-prunable rows (Longcat/Inkling), kept
        _resize(owner, name, axis, router + max(extra, 0))
    if block.selection_bias_path is not None and block.selection_bias_path not in seen:
        owner, name = _owner(model, block.selection_bias_path)
        t = getattr(owner, name)
        _resize(owner, name, 1 if t.dim() == 2 and t.shape[0] == 1 else 0, router)
    shared = tuple(p + "." for p in block.shared_paths)
    blk = block.block(model)
    modules = [
        m for n, m in blk.named_modules() if not f"{block.path}.{n}".startswith(shared) and m is not ex
    ]
    _set_cached_counts(modules, old, router)
    if block.router_extra:  # Longcat's router caches E + Z, ZAYA's E + 1
        _set_cached_counts(modules, old + block.router_extra, router + block.router_extra)
    _give_router_its_count(block.router(model), old, router)


def _give_router_its_count(router: nn.Module, old: int, new: int) -> None:
    """A router that reads the expert count from the (shared) model config in its forward gets a
    copy of it with its own layer's count (ZAYA tells its skip class by index == config.num_experts)."""
    config = router.__dict__.get("config")
    if config is None:
        return
    names = [a for a in EXPERT_COUNT_ATTRS if getattr(config, a, None) == old]
    if names:
        own = copy.copy(config)
        for name in names:
            setattr(own, name, new)
        router.config = own


def apply_layout(model: nn.Module, layout: PrunedLayout) -> None:
    """Shape a freshly built model (normally on the meta device) as ``layout`` says, in place."""
    from .blocks import find_moe_blocks
    from .variants import whole_layers

    blocks = find_moe_blocks(model)
    layers = {b.layer for b in blocks}
    whole = whole_layers(model)  # hash-routed layers: recorded with all their experts, as built
    unknown = sorted(set(layout.experts_per_layer) - layers - set(whole))
    if unknown:
        raise ValueError(f"config.{CONFIG_KEY} names layer(s) {unknown}, which are not MoE layers")
    wrong = [i for i, n in whole.items() if layout.experts_per_layer.get(i, n) != n]
    if wrong:
        raise ValueError(f"config.{CONFIG_KEY} gives hash-routed layer {wrong[0]} fewer experts than it holds")
    hidden = int(model.config.get_text_config().hidden_size)
    for b in blocks:
        n = layout.experts_per_layer.get(b.layer, b.num_experts)
        resize_block(model, b, n, layout.router_experts(b.layer, b.num_experts))
        if layout.novices_in_buffer:
            make_novice(b.experts(model), b.num_experts, layout.novice_experts.get(b.layer, []), hidden)


# --- novice experts ------------------------------------------------------------------------------


class NoviceExperts:
    """Mixin put before a fused experts class: the kept experts are computed by the class's own
    tensors and activation (renumbered 0..M-1), the replaced experts ("novices", MoNE) answer
    the constant rows of the ``novice_outputs`` buffer. The router still routes over all E."""

    routed_experts: int
    novice_ids: list[int]
    expert_map: list[int]  # router id -> local id (kept: 0..M-1, novice j: M + j)

    def novice_route(
        self, top_k_index: torch.Tensor, constants: Mapping[int, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Router ids -> local ids, and the constant outputs by local id (``constants``, keyed by
        router id, override the stored ones: what :func:`moeprune.arch.patch_moe` passes)."""
        import torch

        lookup = torch.tensor(self.expert_map, dtype=torch.long, device=top_k_index.device)
        local = torch.where(top_k_index >= 0, lookup[top_k_index.clamp(min=0).long()], top_k_index.long())
        kept = len(self.expert_map) - len(self.novice_ids)
        buf = getattr(self, NOVICE_BUFFER)
        out = {kept + j: buf[j] for j in range(len(self.novice_ids))}
        for expert, vector in (constants or {}).items():
            out[self.expert_map[int(expert)]] = vector
        return local, out

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        from .experts import expert_slot_outputs

        shape = hidden_states.shape  # [T, H]; DBRX passes [B, S, H] and gets that shape back
        hidden_states = hidden_states.reshape(-1, shape[-1])
        outputs = expert_slot_outputs(self, hidden_states, top_k_index)  # type: ignore[arg-type]
        return outputs.weighted_sum(top_k_weights).to(hidden_states.dtype).reshape(shape)


_NOVICE_CLASSES: dict[type, type] = {}


def novice_class(cls: type) -> type:
    """``Novice<cls>``: the fused experts class with :class:`NoviceExperts` in front (cached)."""
    if cls not in _NOVICE_CLASSES:
        _NOVICE_CLASSES[cls] = type(f"Novice{cls.__name__}", (NoviceExperts, cls), {"__module__": __name__})
    return _NOVICE_CLASSES[cls]


def make_novice(module: nn.Module, routed: int, novice_ids: list[int], hidden_size: int) -> nn.Module:
    """Turn a fused experts module already holding the kept experts' tensors into a novice module
    (in place): kept = the router ids not in ``novice_ids``, in ascending order."""
    import torch

    from .experts import ExpertsLayout

    novice_ids = sorted(int(i) for i in novice_ids)
    kept = [i for i in range(routed) if i not in set(novice_ids)]
    layout = ExpertsLayout.of(module)
    stored = next(iter(layout.tensors.values()))[0]
    if stored != len(kept):
        raise ValueError(f"the experts module holds {stored} experts, but {len(kept)} are kept")
    expert_map = [0] * routed
    for local, i in enumerate(kept):
        expert_map[i] = local
    for j, i in enumerate(novice_ids):
        expert_map[i] = len(kept) + j
    ref = next(iter(module.parameters()))
    module.register_buffer(
        NOVICE_BUFFER, torch.zeros(len(novice_ids), hidden_size, dtype=ref.dtype, device=ref.device)
    )
    module.__class__ = novice_class(type(module))
    module.routed_experts = routed
    module.novice_ids = novice_ids
    module.expert_map = expert_map
    return module


# --- padding (stock-loadable ragged models) and bias-stored novices -------------------------------


def pad_uniform_problem(block: MoEBlock) -> str | None:
    """Why a block cannot be padded with exactly dead experts (None when it can).

    A dead expert (router row 0, selection bias -1e4) is exact when the router selects on
    per-expert scores (sigmoid, or raw logits) plus an additive bias: it is never selected and
    the other experts' scores do not depend on it."""
    if not block.spec.has_selection_bias or block.selection_bias_path is None:
        return (
            "its router has no additive selection bias, so a padding expert would still take part in "
            "routing (softmax routers have no exactly dead expert)"
        )
    if block.spec.score_fn == "softmax" and not block.spec.selection_on_logits:
        return (
            "its router selects on softmax probabilities plus a bias, and a padding expert would still "
            "enter the softmax denominator, rescaling every probability against the bias (Ernie-4.5, Longcat-Flash, ZAYA)"
        )
    return None


def padding_slots(block: MoEBlock, kept: list[int], total: int) -> list[int | None]:
    """Expert slots of a layer padded to ``total`` experts: kept router ids in order, ``None`` for a
    dead expert. Group-limited routers keep their groups: each group's kept experts come first,
    then its dead ones, so every group has ``total / n_group`` slots and scores as before (its top
    experts are its kept ones; the dead ones score ~-1e4)."""
    groups = block.spec.n_group if block.spec.n_group > 1 else 1
    if total % groups:
        raise ValueError(f"{total} experts do not split into {groups} groups")
    size = block.num_experts // groups
    per = total // groups
    slots: list[int | None] = []
    for g in range(groups):
        mine: list[int | None] = [i for i in sorted(kept) if i // size == g]
        if len(mine) > per:
            raise ValueError(f"group {g} keeps {len(mine)} experts, more than {per}")
        slots += mine + [None] * (per - len(mine))
    return slots


def dead_bias_value(kept_bias: torch.Tensor | None) -> float:
    """A selection bias that makes an expert never selected, given the kept experts' biases."""
    if kept_bias is None or kept_bias.numel() == 0:
        return DEAD_BIAS
    return min(DEAD_BIAS, float(kept_bias.float().min()) + DEAD_BIAS)


def bias_novice_problem(module: nn.Module) -> str | None:
    """Why a constant expert output cannot be stored in the expert's own down bias (None when it can).

    With zero gate/up weights and biases the gated activation sees 0; the expert then outputs its
    down bias exactly if the activation of 0 is 0 (plain and clamped SwiGLU: 0 * sigmoid(0) = 0)
    and no norm follows the down projection."""
    import torch

    if not getattr(module, "has_bias", False):
        return "its experts have no biases"
    if getattr(module, "has_post_expert_norm", False):
        return "a norm follows its experts' down projection"
    width = module.gate_up_proj.shape[-1 if module.is_transposed else 1] if module.has_gate else 4
    zero = torch.zeros(1, int(width))
    with torch.no_grad():
        h = module._apply_gate(zero) if module.has_gate else module.act_fn(zero)
    if not bool((h == 0).all()):
        return "its activation of 0 is not 0"
    return None
