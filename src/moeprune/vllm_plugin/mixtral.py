"""Mixtral in vLLM with moeprune's ragged and novice MoE layers.

- ragged: each MoE layer is vLLM's own ``MixtralMoE`` (fused experts) built with that layer's
  ``num_experts``: the stock kernels, only the sizes change;
- novice (MoNE): :class:`~.common.SoftmaxNoviceMoE`, transformers' ``MixtralTopKRouter`` over all
  E router rows (softmax, top-k, always renormalised), one matmul per selected kept expert
  (``w1``/``w3``/``w2`` as stored), ``novice_outputs[row] * weight`` for a replaced one; plain
  torch, no tensor parallelism.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.model_executor.models import mixtral
from vllm.model_executor.models.mixtral import MixtralForCausalLM

from .common import MIXTRAL_NAMES, SoftmaxNoviceMoE, layer_of, load_with_novices, replaced, single_gpu
from .layout import ServeLayout, require_layout


class MoepruneMixtralForCausalLM(MixtralForCausalLM):
    """vLLM's Mixtral with the layer sizes and novice layers of ``config.moeprune``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        layout = require_layout(vllm_config.model_config.hf_config)
        # read by MixtralDecoderLayer to build, and by MixtralForCausalLM for isinstance
        with replaced(mixtral, "MixtralMoE", _blocks(mixtral.MixtralMoE, layout)):
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_with_novices(self, SoftmaxNoviceMoE, weights, super().load_weights)


def _blocks(stock: type, layout: ServeLayout) -> type:
    """A stand-in for ``MixtralMoE`` that builds each layer at its own size, or as a novice layer
    (a subclass of it, so vLLM's ``isinstance`` checks count it as an MoE layer)."""

    class SizedMoE(stock):
        def __new__(cls, *args, prefix: str = "", **kwargs):
            novice = cls is SizedMoE and layout.novices_in(layer_of(prefix))
            return nn.Module.__new__(NoviceMoE if novice else cls)

        def __init__(self, *, num_experts: int, prefix: str = "", **kwargs) -> None:
            count = layout.experts_in(layer_of(prefix), num_experts)
            super().__init__(num_experts=count, prefix=prefix, **kwargs)

    class NoviceMoE(SoftmaxNoviceMoE, SizedMoE):
        def __init__(
            self,
            *,
            num_experts: int,
            top_k: int,
            hidden_size: int,
            intermediate_size: int,
            prefix: str = "",
            **_,
        ) -> None:
            single_gpu("mixtral")
            SoftmaxNoviceMoE.__init__(
                self,
                hidden=hidden_size,
                inner=intermediate_size,
                routed=num_experts,
                top_k=top_k,
                renormalize=True,
                novice_ids=layout.novices_in(layer_of(prefix)),
                names=MIXTRAL_NAMES,
            )

    return SizedMoE
