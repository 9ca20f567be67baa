"""DBRX: experts stored as 2D row blocks, a router that returns logits only, a nested ffn_config.

``DbrxExperts`` is not an ``@use_experts_implementation`` module: its child ``mlp``
(``DbrxExpertGLU``) holds ``w1`` (gate), ``v1`` (up) and ``w2`` (down, used transposed), each
[E * I, H], which the model views as [E, I, H] (expert e = rows e*I .. (e+1)*I - 1), on disk
exactly as in memory (no conversion on load). moeprune treats these tensors as fused tensors
whose expert axis 0 holds ``rows_per_expert`` = I rows per expert (:class:`.experts.ExpertsLayout`),
so that slicing an expert is slicing its block of rows.

The router (``DbrxRouter``) returns the logits only; the FFN block turns them into gate weights in
``route_tokens_to_experts`` (softmax over E, top-k, divided by the p-norm of the chosen weights,
``moe_normalize_expert_weights``): that method (``ArchFacts.route_method``) is what
:func:`moeprune.arch.patch_moe` steers. Counts live in ``config.ffn_config`` (``moe_num_experts``,
``moe_top_k``; ``table.NESTED_COUNT_CONFIGS``).
"""

from __future__ import annotations

import torch
from torch import nn

WEIGHTS = ("w1", "v1", "w2")  # gate, up, down of DbrxExpertGLU


def is_row_blocked_experts(module: nn.Module) -> bool:
    """True for a DBRX experts module (2D [E * I, H] weights in its child ``mlp``)."""
    mlp = getattr(module, "mlp", None)
    rows = getattr(module, "ffn_hidden_size", None)
    if not isinstance(mlp, nn.Module) or not isinstance(rows, int) or rows <= 0:
        return False
    for name in WEIGHTS:
        p = mlp._parameters.get(name)
        if p is None or p.dim() != 2 or p.shape[0] % rows:
            return False
    return True


def tensor_names() -> tuple[str, ...]:
    return tuple(f"mlp.{n}" for n in WEIGHTS)


def expert_weights(module: nn.Module, expert: int) -> tuple[torch.Tensor, ...]:
    """(w1, v1, w2) of one expert, each [I, H], as the model slices them."""
    shape = (-1, module.ffn_hidden_size, module.hidden_size)
    return tuple(getattr(module.mlp, n).view(shape)[expert] for n in WEIGHTS)


def single_expert_forward(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Unweighted output of one DBRX expert on tokens ``x`` [n, H] (the model's own GLU)."""
    return module.mlp(x, *expert_weights(module, expert))
