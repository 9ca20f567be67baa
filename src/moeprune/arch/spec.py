"""Router semantics as data: :class:`RoutingSpec` and the :class:`Routing` it produces.

Kept apart from :mod:`.routing` (which applies a spec with torch) so that what only reads specs
(the header-planned checkpoint rewrite, :mod:`.header_keys`, :mod:`.table`) imports no torch:
a rewrite from the command line then costs neither torch's import time nor its ~230 MB.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

ScoreFn = Literal["softmax", "sigmoid", "identity", "sqrtsoftplus"]
WeightFrom = Literal["score", "softmax_topk"]
GroupScore = Literal["max", "top2_sum"]
Selector = Literal["topk", "sparsemixer"]
ExtraRole = Literal["", "zero", "skip", "sink"]
WeightScale = Literal["", "per_expert", "global"]


@dataclass(frozen=True)
class RoutingSpec:
    """What a router does with its logits ``s_t`` (shape [T, E]).

    - ``score_fn``: p_t = softmax(s_t) | sigmoid(s_t) | s_t | sqrt(softplus(s_t)) (DeepSeek-V4).
    - ``selection_bias``: added to p_t for *selection only* (DeepSeek-V3 ``e_score_correction_bias``,
      Ernie ``moe_statics``); weights still come from the unbiased p_t. ``selection_on_logits``:
      the bias is added to the raw logits instead (Kolibri-1).
    - ``n_group``/``topk_group``/``group_score``: group-limited routing (only experts in the best
      ``topk_group`` groups may be chosen; a group's score is its max or the sum of its top two;
      experts of dropped groups get ``group_fill``: -inf, or 0.0 as DeepSeek-V2 and AXK-2 do).
    - ``weight_from``: ``score`` = gather p_t at the chosen experts; ``softmax_topk`` = softmax over the
      chosen *logits* (gpt-oss, Mixtral-style top-k-then-softmax).
    - ``renormalize``: divide the chosen weights by their sum (+``renorm_eps``, or clamp at
      ``renorm_min``).
    - ``scaling``: multiply the weights by this (``routed_scaling_factor``); ``scaling_site`` says
      whether the router applies it or the block applies it to the experts' summed output (same
      product, recorded so that observers report the weight the model really applies).
    - ``renorm_p``: renormalise by the p-norm of the chosen weights instead of their sum (DBRX
      ``moe_normalize_expert_weights``; p = 1 is the sum).
    - ``selector``: ``sparsemixer`` replaces top-k and the weights by PhiMoE's inference-time
      sparsemixer (always two experts; ``jitter_eps`` is its threshold, see :func:`sparsemixer`).
    - ``gate_site``: ``output`` = the block multiplies each expert's output by its weight (every
      family but one); ``input`` = it multiplies the expert's input (Llama-4, :mod:`.llama4`).
    - ``extra_columns``/``extra_role``: router columns after the E prunable experts that are no
      prunable expert (never masked): ``zero`` = identity experts selected like the others (an
      index >= E; Longcat-Flash), ``skip`` = a "no expert" class selected like the others (an
      index >= E) whose slot adds nothing (ZAYA), ``sink`` = never selected, but their scores join the weights'
      normalisation and get weights of their own (``Routing.extra_weights``; Inkling's shared
      experts). See :mod:`.extended`.
    - ``weight_scale``: the chosen weights are multiplied by a learned tensor: ``per_expert`` [E]
      gathered at the chosen experts (Gemma-4), ``global`` [1] (Inkling).
    """

    top_k: int
    score_fn: ScoreFn = "softmax"
    has_selection_bias: bool = False
    selection_on_logits: bool = False
    n_group: int = 1
    topk_group: int = 1
    group_score: GroupScore = "max"
    group_fill: float = float("-inf")
    weight_from: WeightFrom = "score"
    renormalize: bool = False
    renorm_eps: float = 0.0
    renorm_min: float | None = None
    scaling: float = 1.0
    scaling_site: Literal["router", "block"] = "router"
    notes: tuple[str, ...] = field(default_factory=tuple)
    renorm_p: float | None = None
    selector: Selector = "topk"
    jitter_eps: float = 0.0
    gate_site: Literal["output", "input"] = "output"
    extra_columns: int = 0
    extra_role: ExtraRole = ""
    weight_scale: WeightScale = ""

    @property
    def selects_extra(self) -> bool:
        """Some selections may land on a non-prunable column (index >= E): no expert of the block."""
        return self.extra_role in ("zero", "skip")

    @property
    def group_limited(self) -> bool:
        return self.n_group > 1 and self.topk_group < self.n_group

    def describe(self) -> dict:
        d = asdict(self)
        d["notes"] = list(self.notes)
        d["group_fill"] = repr(self.group_fill)  # "-inf" stays valid JSON
        return d


@dataclass
class Routing:
    """The outcome of routing T tokens among E experts."""

    probs: torch.Tensor  # [T, E] router probabilities p_t (after score_fn, before any bias)
    top_k_index: torch.Tensor  # [T, k] selected experts
    top_k_weights: torch.Tensor  # [T, k] gate weights g the model applies (incl. scaling)
    extra_weights: torch.Tensor | None = None  # [T, X] weights of ``sink`` columns (Inkling)


SPARSEMIXER_TOP_K = 2


def top_k_problem(spec: RoutingSpec, k: int) -> str | None:
    """Why a router cannot route ``k`` experts per token (None when it can)."""
    if spec.selector == "sparsemixer" and k != SPARSEMIXER_TOP_K:
        return (
            f"its sparsemixer router always selects {SPARSEMIXER_TOP_K} experts per token "
            "(the model ignores num_experts_per_tok)"
        )
    return None
