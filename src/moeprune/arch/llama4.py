"""Llama-4: the router's score scales each expert's *input*, and every expert runs densely.

``Llama4TextMoe`` (transformers ``models/llama4/modeling_llama4.py``):

- ``Llama4Router`` (an ``nn.Linear``) returns ``(scores [T, E], logits [T, E])``: top-k of the
  logits, ``scores`` = sigmoid of the chosen logits and 0 elsewhere (sigmoid(-inf));
- the block repeats the tokens E times, multiplies expert i's copy by ``scores[:, i]`` and runs all
  E experts on all T tokens with one bmm (``Llama4TextExperts``: ``gate_up_proj`` [E, H, 2I]
  (transposed, gate columns first), ``down_proj`` [E, I, H], no biases, SwiGLU), then sums over
  E and adds the shared expert.

An unchosen expert sees 0 * x = 0 and, with a bias-free SwiGLU, outputs exactly 0, so the block
computes ``sum_{i in K_t} E_i(g_{i,t} * x_t)`` with g = sigmoid(logit): a sparse MoE whose gate
multiplies the input ("gate site input", :attr:`.routing.RoutingSpec.gate_site`). Removing an expert
therefore equals giving it a -inf logit, exactly as for every other router: it is never in the top-k
and its score is sigmoid(-inf) = 0.

What a profile records for such a block (the project's choice; docs/methods.md "Llama-4"):
the gate g_{i,t} is the router's real weight sigmoid(s_{i,t}), and the expert output is
e_{i,t} = E_i(g_{i,t} x_t) / g_{i,t}, so that g_{i,t} e_{i,t} is exactly what the expert adds to
the residual stream, as for output-gated MoEs. EASY-EP's and REAP's g * ||e|| are then the norm of
the expert's real contribution ||E_i(g x)|| (with the un-scaled E_i(x) they would measure an output
the model never computes: SwiGLU is not homogeneous, E(g x) != g E(x)); the gate score stays the
router's soft activation sum_t sigmoid(s) rather than collapsing to the frequency (as it would
with g := 1), and h~ = h + sum g e is the real block output. A MoNE novice c then adds g * c.

:func:`moeprune.arch.patch_moe` steers such a block through the router (selection and weights from
:func:`.routing.route`) and the experts module (each chosen expert run once on its own scaled
tokens, placed where the dense bmm would have put it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

WEIGHTS = ("gate_up_proj", "down_proj")


def is_input_scaled_experts(module: nn.Module) -> bool:
    """True for Llama-4's experts module: fused 3D ``gate_up_proj`` [E, H, 2I] and ``down_proj``
    [E, I, H] run on inputs the block has already scaled, so its forward takes no routing."""
    if hasattr(type(module), "_apply_gate") or not hasattr(module, "act_fn"):
        return False
    for name in WEIGHTS:
        p = module._parameters.get(name)
        if p is None or p.dim() != 3:
            return False
    if module.gate_up_proj.shape[0] != module.down_proj.shape[0]:
        return False
    params = [p for p in inspect.signature(module.forward).parameters.values() if p.name != "self"]
    return len(params) == 1  # hidden_states only: no top_k_index / top_k_weights


def single_expert_forward(module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``expert`` on tokens ``x`` [n, H], as ``Llama4TextExperts.forward`` computes it (the
    inputs are whatever the caller passes: the block passes g * x)."""
    from ..quant import expert_tensor

    gate_up = x @ expert_tensor(module, "gate_up_proj", expert, x.dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    return (up * module.act_fn(gate)) @ expert_tensor(module, "down_proj", expert, x.dtype)


def unit_outputs(contributions: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """e = E(g x) / g per chosen pair ([T, k, H] from contributions [T, k, H] and g [T, k]); 0 where
    g = 0 (a logit below ~-88 whose sigmoid underflows: the expert then saw 0 and added 0)."""
    g = weights.to(contributions.dtype).unsqueeze(-1)
    safe = torch.where(g > 0, g, torch.ones_like(g))
    return torch.where(g > 0, contributions / safe, torch.zeros_like(contributions))


def model_routing(scores: torch.Tensor, logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [T, k], weights [T, k]) of the model's own router output, recomputed as it does:
    top-k of the logits, weights = its sigmoid scores at those experts."""
    index = torch.topk(logits, top_k, dim=1).indices
    return index, scores.gather(1, index)


class InputGatedState:
    """What the router saw, for the experts forward of the same block call."""

    def __init__(self) -> None:
        self.hidden: torch.Tensor | None = None  # [T, H] un-scaled input
        self.index: torch.Tensor | None = None  # [T, k]
        self.weights: torch.Tensor | None = None  # [T, k] sigmoid gates applied to the input


def router_forward(
    block: Any, route: Callable, original: Callable, state: Any, gate: InputGatedState, steer: Callable
) -> Callable:
    """A Llama-4 router forward that records the routing and returns the scores it implies.

    ``route(logits)`` gives moeprune's routing for this block (masked / lowered top-k / rerouted);
    ``steer()`` says whether to use it (else the model's own top-k is kept)."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        scores, logits = original(hidden_states, *args, **kwargs)
        state.logits = logits
        gate.hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        if steer():
            r = route(logits)
            index, weights = r.top_k_index, r.top_k_weights.to(scores.dtype)
            scores = torch.zeros_like(scores).scatter_(1, index, weights)
        else:
            index, weights = model_routing(scores, logits, block.top_k)
        gate.index, gate.weights = index, weights
        return scores, logits

    return forward


def experts_forward(
    module: nn.Module,
    gate: InputGatedState,
    novices: Callable[[], dict[int, torch.Tensor] | None],
    observe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None],
) -> Callable:
    """A Llama-4 experts forward: each chosen expert runs once on its tokens scaled by their gate;
    the result is laid out [E * T, H] as the dense bmm's (rows of unchosen experts are 0, which is
    what they compute). ``observe(hidden, index, weights, unit_outputs)`` sees every call."""

    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        x, index, weights = gate.hidden, gate.index, gate.weights
        assert x is not None and index is not None and weights is not None, "router did not run"
        t, k = index.shape
        e = hidden_states.shape[0] // t
        contributions = x.new_zeros((t, k, x.shape[-1]))
        constants = novices() or {}
        for expert in torch.unique(index).tolist():
            rows, slots = (index == expert).nonzero(as_tuple=True)
            g = weights[rows, slots].to(x.dtype).unsqueeze(-1)
            if expert in constants:
                contributions[rows, slots] = g * constants[expert].to(x.dtype)
            else:
                contributions[rows, slots] = single_expert_forward(module, expert, g * x[rows]).to(x.dtype)
        observe(x, index, weights, unit_outputs(contributions, weights))
        out = x.new_zeros((e, t, x.shape[-1]))
        tokens = torch.arange(t, device=x.device).unsqueeze(1).expand(t, k)
        out.index_put_((index, tokens), contributions, accumulate=True)
        return out.reshape(e * t, -1).to(hidden_states.dtype)

    return forward


NOVICE_PROBLEM = (
    "its experts module receives only the score-scaled inputs of all experts, not the routing, so "
    "a stored constant (novice) expert cannot know which tokens chose it"
)
