"""Architecture knowledge: the one place that knows how each transformers MoE is built.

- :mod:`.blocks` finds the routed MoE blocks of a loaded model by structure;
- :mod:`.routing` states router semantics as data and reimplements them (with masking);
- :mod:`.experts` computes each selected expert's own output from fused 3D tensors;
- :mod:`.patch` observes and steers blocks on a live model;
- :mod:`.table` holds the per-model facts structure cannot tell;
- :mod:`.keys` maps checkpoint keys to the expert tensors they hold;
- :mod:`.pruned` builds ragged and MoNE-novice models (``config.moeprune``) and knows where
  padding experts and bias-stored novices are exact;
"""

import importlib
from typing import TYPE_CHECKING, Any

# where each name of the package lives; imported on first use, so that importing one torch-free
# submodule (.header_keys, .header_config, .spec: the header-planned rewrite) imports no torch
_WHERE = {
    "MoEBlock": ".blocks",
    "decoder_layers": ".blocks",
    "find_moe_blocks": ".blocks",
    "ExpertsLayout": ".experts",
    "selected_expert_outputs": ".experts",
    "single_expert_forward": ".experts",
    "BlockControl": ".patch",
    "BlockEvent": ".patch",
    "kept_controls": ".patch",
    "patch_moe": ".patch",
    "Routing": ".routing",
    "RoutingSpec": ".routing",
    "route": ".routing",
    "ARCH_TABLE": ".table",
    "UNSUPPORTED": ".table",
    "facts_for": ".table",
}

if TYPE_CHECKING:
    from .blocks import MoEBlock, decoder_layers, find_moe_blocks
    from .experts import ExpertsLayout, selected_expert_outputs, single_expert_forward
    from .patch import BlockControl, BlockEvent, kept_controls, patch_moe
    from .routing import Routing, RoutingSpec, route
    from .table import ARCH_TABLE, UNSUPPORTED, facts_for


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(where, __name__), name)
    globals()[name] = value  # looked up once
    return value


__all__ = [
    "ARCH_TABLE",
    "UNSUPPORTED",
    "BlockControl",
    "BlockEvent",
    "ExpertsLayout",
    "MoEBlock",
    "Routing",
    "RoutingSpec",
    "decoder_layers",
    "facts_for",
    "find_moe_blocks",
    "kept_controls",
    "patch_moe",
    "route",
    "selected_expert_outputs",
    "single_expert_forward",
]
