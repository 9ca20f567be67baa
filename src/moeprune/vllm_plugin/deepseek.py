"""DeepSeek-V3 family in vLLM with moeprune's ragged and novice MoE layers.

- ragged (``mode: remove``, a different expert count per layer): each MoE layer is vLLM's own
  ``DeepseekV2MoE`` (fused experts, grouped top-k) built from a copy of the config whose
  ``n_routed_experts`` is that layer's count: the stock kernels, only the sizes change;
- novice (MoNE, ``mode: novice``): the router keeps all E rows and picks the top-k among them;
  the kept experts run, each replaced expert adds its constant row of ``novice_outputs`` times
  its routing weight. :class:`NoviceDeepseekMoE` does this in plain torch (the routing of
  transformers' ``DeepseekV3TopkRouter``, one matmul per selected kept expert): exact, but not
  vLLM's fused kernel, and single-GPU only (no tensor parallelism in these layers).
"""

from __future__ import annotations

import copy
import importlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models import deepseek_v2
from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

from .common import QWEN_NAMES, NoviceExperts, SwiGLU, layer_of, load_with_novices, replaced, single_gpu
from .layout import ServeLayout, require_layout


class _Gate(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.empty(experts, dtype=torch.float32))


class NoviceDeepseekMoE(nn.Module):
    """A DeepSeek-V3 MoE layer whose replaced experts answer a constant (MoNE)."""

    def __init__(self, config, novice_ids: list[int]) -> None:
        super().__init__()
        single_gpu("deepseek_v3")
        if (
            getattr(config, "scoring_func", "sigmoid") != "sigmoid"
            or getattr(config, "topk_method", "noaux_tc") != "noaux_tc"
        ):
            raise ValueError(
                "novice layers of the moeprune vLLM plugin follow DeepSeek-V3 routing (sigmoid, noaux_tc)"
            )
        routed = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group or 1
        self.topk_group = config.topk_group or 1
        self.norm_topk_prob = config.norm_topk_prob
        self.scale = config.routed_scaling_factor
        self.gate = _Gate(config.hidden_size, routed)
        self.experts = NoviceExperts(
            config.hidden_size, config.moe_intermediate_size, routed, novice_ids, QWEN_NAMES
        )
        shared = config.n_shared_experts
        self.shared_experts = (
            SwiGLU(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k router ids and weights, as transformers' ``DeepseekV3TopkRouter`` computes them."""
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        choice = scores + self.gate.e_score_correction_bias
        t, e = choice.shape
        groups = choice.view(t, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(-1)
        top_groups = torch.topk(groups, k=self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(groups).scatter_(1, top_groups, 1)
        mask = mask.unsqueeze(-1).expand(t, self.n_group, e // self.n_group).reshape(t, e)
        ids = torch.topk(choice.masked_fill(~mask.bool(), 0.0), k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return ids, weights * self.scale

    def forward(self, hidden_states: torch.Tensor, **_: object) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        out = self.experts.mix(x, ids, weights).to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class MoepruneDeepseekV3ForCausalLM(DeepseekV3ForCausalLM):
    """vLLM's DeepSeek-V3 with the layer sizes and novice layers of ``config.moeprune``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        layout = require_layout(config)
        # transformers' DeepSeek-V3 always routes this way; vLLM reads it from the hub fields,
        # which configs written by transformers lack (without them vLLM drops the selection bias)
        for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        # read by DeepseekV2DecoderLayer
        with replaced(deepseek_v2, "DeepseekV2MoE", _moe_factory(deepseek_v2.DeepseekV2MoE, layout)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        if getattr(config, "tie_word_embeddings", False) and hasattr(self.lm_head, "tie_weights"):
            # vLLM's DeepSeek never ties (DeepSeek-V3 does not); a tied checkpoint stores no
            # lm_head.weight and would otherwise run an uninitialised head
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Novice layers take their tensors by name; everything else goes to vLLM's loader."""
        return load_with_novices(self, NoviceDeepseekMoE, weights, super().load_weights)


class MoepruneForCausalLM(MoepruneDeepseekV3ForCausalLM):
    """The name moeprune writes into ``architectures``, for every family: builds the class that
    :func:`moeprune.vllm_plugin.model_target` names for ``config.moeprune.base_model_type``.
    It subclasses the DeepSeek class because vLLM reads a registered class's interfaces before
    building it (text generation, pipeline parallel), and the families served share them."""

    def __new__(cls, *, vllm_config, prefix: str = ""):
        from . import model_target

        base = getattr(vllm_config.model_config.hf_config, "moeprune", {}).get("base_model_type")
        module, _, name = model_target(base).partition(":")
        family = getattr(importlib.import_module(module), name)
        if issubclass(cls, family):
            return super().__new__(cls)
        # not an instance of cls: Python does not call __init__ on it again
        return family(vllm_config=vllm_config, prefix=prefix)


def _moe_factory(stock: type, layout: ServeLayout) -> type:
    """A stand-in for ``DeepseekV2MoE`` that builds each MoE layer at its own size. A subclass,
    not a function: vLLM looks the name up for ``isinstance`` checks too."""

    class SizedMoE(stock):
        def __new__(cls, *args, config=None, prefix: str = "", **kwargs):
            ids = layout.novices_in(layer_of(prefix))
            if ids:
                return NoviceDeepseekMoE(config, ids)  # not a SizedMoE: __init__ is not called
            return super().__new__(cls)

        def __init__(self, *, config, prefix: str = "", **kwargs) -> None:
            count = layout.experts_in(layer_of(prefix), config.n_routed_experts)
            if count != config.n_routed_experts:
                config = copy.copy(config)
                config.n_routed_experts = count
            super().__init__(config=config, prefix=prefix, **kwargs)

    return SizedMoE
