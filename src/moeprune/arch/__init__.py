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

from .blocks import MoEBlock, decoder_layers, find_moe_blocks
from .experts import ExpertsLayout, selected_expert_outputs, single_expert_forward
from .patch import BlockControl, BlockEvent, kept_controls, patch_moe
from .routing import Routing, RoutingSpec, route
from .table import ARCH_TABLE, UNSUPPORTED, facts_for

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
