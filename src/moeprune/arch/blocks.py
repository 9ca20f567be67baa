"""Finding the routed MoE blocks of a loaded model, by structure.

A block is found as the parent of a fused experts module (see :mod:`.experts`); its router is the
sibling whose weight rows are the experts; shared experts are the siblings named ``shared_*``.
Per-model facts that structure cannot tell (the routing family) come from :mod:`.table`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from .experts import ExpertsLayout, is_fused_experts
from .extended import RouterAdapter
from .routing import RoutingSpec, route
from .table import ARCH_TABLE, EXPERT_COUNT_ATTRS, UNSUPPORTED, ArchFacts, facts_for
from .variants import is_hash_routed


def _has_expert_config(config) -> bool:
    return any((getattr(config, name, None) or 0) > 1 for name in EXPERT_COUNT_ATTRS)


@dataclass
class MoEBlock:
    """One routed MoE block of a model, with everything the rest of moeprune needs to know."""

    index: int  # position among the model's MoE blocks (0..L-1)
    layer: int  # decoder-layer index
    path: str  # module path of the block, e.g. "model.layers.3.mlp"
    router_path: str
    experts_path: str
    shared_paths: list[str]
    prenorm_path: str | None  # norm whose *input* is the residual h_t entering the block
    num_experts: int
    top_k: int
    spec: RoutingSpec
    layout: ExpertsLayout
    selection_bias_path: str | None  # full path of the selection-bias tensor, if any
    router_tensors: dict[str, int] = field(default_factory=dict)  # router tensor name -> expert axis
    router_weight_path: str = ""  # full path of the router's [E, H] weight
    # Block method turning router logits into (weights, index) when the router returns logits
    # only (DBRX); None: the router returns (logits, weights, index) itself.
    route_method: str | None = None
    # Non-prunable router columns after the E experts (Longcat zero / Inkling shared experts),
    # how to read the router's full logits and write its output, and the learned weight scale.
    router_extra: int = 0
    adapter: RouterAdapter | None = None
    weight_scale_path: str | None = None
    # linear map of the experts' outputs to the residual stream (Muse-Spark; ArchFacts.expert_out_proj)
    expert_out_proj_path: str | None = None
    # the router's logits without its routing (ArchFacts.logits_only), for steered stock evaluation
    logits_only: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None

    def module(self, model: nn.Module, path: str) -> nn.Module:
        return model.get_submodule(path)

    def block(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.path)

    def router(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.router_path)

    def experts(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.experts_path)

    def selection_bias(self, model: nn.Module) -> torch.Tensor | None:
        if self.selection_bias_path is None:
            return None
        return model.get_parameter_or_buffer(self.selection_bias_path)

    def route(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        allowed: torch.Tensor | None = None,
        top_k: int | None = None,
    ):
        return self.bound_route(model)(logits, allowed=allowed, top_k=top_k)

    def bound_route(self, model: nn.Module) -> BoundRoute:
        """:meth:`route` for ``model``, to be called at every forward: its tensors are found once."""
        return BoundRoute(self.spec, _TensorAt(model, self.selection_bias_path), _TensorAt(model, self.weight_scale_path))

    def router_logits(self, router: nn.Module, hidden: torch.Tensor, out) -> torch.Tensor:
        """The router's logits over all its columns [T, E + router_extra], from its input and output."""
        if self.adapter is not None and self.adapter.logits is not None:
            return self.adapter.logits(router, hidden, out)
        return out if isinstance(out, torch.Tensor) else out[0]


class _TensorAt:
    """The parameter or buffer at ``path`` of ``model`` (None: none), its module found at the first
    read: ``get_parameter_or_buffer`` walks the module path, twice for a buffer (the parameter
    lookup fails first), a visible share of a small model's steered router at every forward."""

    def __init__(self, model: nn.Module, path: str | None) -> None:
        self.model, self.path = model, path
        self.found: tuple[nn.Module, str] | None = None

    def __call__(self) -> torch.Tensor | None:
        if self.path is None:
            return None
        if self.found is None:
            value = self.model.get_parameter_or_buffer(self.path)  # a missing one fails as it did
            owner_path, _, name = self.path.rpartition(".")
            self.found = (self.model.get_submodule(owner_path), name)
            return value
        owner, name = self.found
        return getattr(owner, name)


@dataclass(frozen=True)
class BoundRoute:
    """:meth:`MoEBlock.route` of one block in one model (:meth:`MoEBlock.bound_route`)."""

    spec: RoutingSpec
    selection_bias: _TensorAt
    weight_scale: _TensorAt

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None, top_k: int | None = None):
        scale = self.weight_scale()
        return route(self.spec, logits, self.selection_bias(), allowed=allowed, top_k=top_k, weight_scale=scale)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (the ModuleList the text model iterates over); of a
    multimodal wrapper's language model (:mod:`.wrappers`)."""
    from .wrappers import layers_path as wrapper_layers

    known = wrapper_layers(model)
    if known is not None:
        return model.get_submodule(known)
    config = model.config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    # Longcat-Flash: num_hidden_layers counts attention sublayers (2 per layer); num_layers the layers
    sizes = {n, getattr(config, "num_layers", None)} - {None}
    candidates = []
    for suffix in ("layers", "blocks"):  # DBRX: transformer.blocks (only when no "layers" list exists)
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and name.endswith(suffix) and (not sizes or len(mod) in sizes):
                candidates.append((name.count("."), name, mod))
        if candidates:
            break
    if not candidates:
        raise UserError("could not find the decoder layers of this model", "it is not a supported causal LM")
    candidates.sort(key=lambda c: c[0])
    return candidates[0][2]


def layers_path(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError("unreachable")


def _find_router(block: nn.Module, experts_name: str, num_experts: int, facts: ArchFacts) -> str:
    """The block's child whose weight rows are the experts (a router, whatever its class)."""
    if facts.router_name:
        return facts.router_name
    for name, child in block.named_children():
        if name == experts_name or name.startswith("shared"):
            continue
        for p in child.parameters():
            if p.dim() == 2 and p.shape[0] == num_experts:
                return name
    raise UserError(
        f"could not find the router of {type(block).__name__}",
        "this MoE architecture is not supported yet (see docs/architectures.md)",
    )


def _has_submodule(layer: nn.Module, path: str) -> bool:
    """``layer`` has the submodule ``path`` (dotted: DBRX's ``norm_attn_norm.norm_2``)."""
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """All routed MoE blocks of ``model``, in layer order. Raises UserError for dense or unsupported models."""
    from .wrappers import wrapped

    wrapped(model.config)  # raises for a refused wrapper, naming the reason
    config = model.config.get_text_config()
    model_type = getattr(config, "model_type", None) or getattr(model.config, "model_type", "?")
    if model_type in UNSUPPORTED:
        facts_for(model_type)  # raises, naming the reason
    facts: ArchFacts | None = None
    layers = decoder_layers(model)
    lpath = layers_path(model)
    blocks: list[MoEBlock] = []
    hash_layers: list[int] = []
    for layer_idx, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if not name or not is_fused_experts(mod):
                continue
            if facts is None:
                facts = facts_for(model_type)  # a MoE was found: now it must be a known type
            block_rel, _, experts_name = name.rpartition(".")
            block = layer.get_submodule(block_rel) if block_rel else layer
            if is_hash_routed(block):  # kept whole, never a prunable block (arch/variants.py)
                hash_layers.append(layer_idx)
                continue
            layout = ExpertsLayout.of(mod)
            extra = facts.adapter.extra(config) if facts.adapter is not None else 0
            rows = layout.num_experts + extra  # router rows: experts, then non-prunable columns
            router_name = _find_router(block, experts_name, rows, facts)
            router = block.get_submodule(router_name)
            base = f"{lpath}.{layer_idx}" + (f".{block_rel}" if block_rel else "")
            spec = facts.spec(router=router, block=block, config=config)
            bias_path = None
            for cand in facts.selection_bias_names:
                owner_path, _, attr = cand.rpartition(".")
                owner = block.get_submodule(owner_path) if owner_path else block
                if isinstance(getattr(owner, attr, None), torch.Tensor):
                    bias_path = f"{base}.{cand}"
                    break
            named = facts.adapter.expert_tensors if facts.adapter is not None else None
            if named is not None:  # ZAYA: its MLP router's hidden widths may equal E or E + 1
                router_tensors = {f"{router_name}.{n}": 0 for n in named}
                weight_name = named[0]
            else:
                router_tensors = {
                    f"{router_name}.{n}": 0
                    for n, p in list(router.named_parameters()) + list(router.named_buffers())
                    if p.dim() >= 1 and p.shape[0] in (layout.num_experts, rows)
                }
                for n, p in list(router.named_parameters()) + list(router.named_buffers()):
                    if p.dim() == 2 and p.shape[0] == 1 and p.shape[1] == layout.num_experts:
                        router_tensors[f"{router_name}.{n}"] = 1  # Ernie moe_statics [1, E]
                weight_name = next(
                    n for n, p in router.named_parameters() if p.dim() == 2 and p.shape[0] == rows
                )
            shared = [
                f"{base}.{n}"
                for n, _ in block.named_children()
                if n.startswith("shared") and n != experts_name
            ]
            prenorm = None
            if facts.prenorm_name and _has_submodule(layer, facts.prenorm_name):
                prenorm = f"{lpath}.{layer_idx}.{facts.prenorm_name}"
            blocks.append(
                MoEBlock(
                    index=len(blocks),
                    layer=layer_idx,
                    path=base,
                    router_path=f"{base}.{router_name}",
                    experts_path=f"{base}.{experts_name}",
                    shared_paths=shared,
                    prenorm_path=prenorm,
                    num_experts=layout.num_experts,
                    top_k=spec.top_k,
                    spec=spec,
                    layout=layout,
                    selection_bias_path=bias_path,
                    router_tensors=router_tensors,
                    router_weight_path=f"{base}.{router_name}.{weight_name}",
                    route_method=facts.route_method,
                    router_extra=extra,
                    adapter=facts.adapter,
                    logits_only=facts.logits_only,
                    weight_scale_path=(
                        f"{base}.{facts.adapter.weight_scale}"
                        if facts.adapter is not None and facts.adapter.weight_scale
                        else None
                    ),
                    expert_out_proj_path=f"{base}.{facts.expert_out_proj}" if facts.expert_out_proj else None,
                )
            )
    if not blocks and hash_layers:
        raise UserError(
            f"every MoE layer of this '{model_type}' model routes by a token-id -> expert table "
            "(hash routing), which moeprune keeps whole: there is nothing to prune",
            "prune a model with learned-router MoE layers",
        )
    if not blocks:
        if model_type in UNSUPPORTED or (model_type not in ARCH_TABLE and _has_expert_config(config)):
            facts_for(model_type)  # raises: a MoE type that moeprune does not (yet) support
        raise UserError(
            f"'{model_type}' is a dense model: it has no routed Mixture-of-Experts layers",
            "moeprune prunes the experts of MoE models only",
        )
    return blocks
