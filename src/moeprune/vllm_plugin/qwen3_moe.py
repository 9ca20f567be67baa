"""Qwen3-MoE in vLLM with moeprune's ragged and novice MoE layers.

- ragged: each MoE layer is vLLM's own ``Qwen3MoeSparseMoeBlock`` (fused experts) built while the
  config's ``num_experts`` says that layer's count: the stock kernels, only the sizes change;
- novice (MoNE): :class:`~.common.SoftmaxNoviceMoE`, transformers' ``Qwen3MoeTopKRouter`` over all
  E router rows (softmax, top-k, renormalised if ``norm_topk_prob``), one matmul per selected kept
  expert, ``novice_outputs[row] * weight`` for a replaced one; plain torch, no tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models import qwen3_moe
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

from .common import QWEN_NAMES, SoftmaxNoviceMoE, layer_of, load_with_novices, replaced, single_gpu
from .layout import ServeLayout, require_layout


class MoepruneQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """vLLM's Qwen3-MoE with the layer sizes and novice layers of ``config.moeprune``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        layout = require_layout(vllm_config.model_config.hf_text_config)
        # read by Qwen3MoeDecoderLayer to build, and by Qwen3MoeForCausalLM for isinstance
        with replaced(qwen3_moe, "Qwen3MoeSparseMoeBlock", _blocks(qwen3_moe.Qwen3MoeSparseMoeBlock, layout)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_with_novices(self, SoftmaxNoviceMoE, weights, super().load_weights)


def _blocks(stock: type, layout: ServeLayout) -> type:
    """A stand-in for ``Qwen3MoeSparseMoeBlock`` that builds each layer at its own size, or as a
    novice layer (a subclass of it, so vLLM's ``isinstance`` checks count it as an MoE layer)."""

    class SizedMoE(stock):
        def __new__(cls, *args, prefix: str = "", **kwargs):
            novice = cls is SizedMoE and layout.novices_in(layer_of(prefix))
            return nn.Module.__new__(NoviceMoE if novice else cls)

        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            config = vllm_config.model_config.hf_text_config
            count = layout.experts_in(layer_of(prefix), config.num_experts)
            with replaced(config, "num_experts", count):  # read by the block and its fused experts
                super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)

    class NoviceMoE(SoftmaxNoviceMoE, SizedMoE):
        def __init__(self, *, vllm_config, prefix: str = "", **kwargs) -> None:
            config = vllm_config.model_config.hf_text_config
            single_gpu("qwen3_moe")
            if getattr(config, "shared_expert_intermediate_size", 0):
                raise ValueError("novice layers of the moeprune vLLM plugin: Qwen3-MoE has no shared expert")
            SoftmaxNoviceMoE.__init__(
                self,
                hidden=config.hidden_size,
                inner=config.moe_intermediate_size,
                routed=config.num_experts,
                top_k=config.num_experts_per_tok,
                renormalize=bool(config.norm_topk_prob),
                novice_ids=layout.novices_in(layer_of(prefix)),
                names=QWEN_NAMES,
            )

    return SizedMoE
