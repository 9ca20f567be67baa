"""gpt-oss in vLLM with moeprune's ragged and novice MoE layers.

- ragged (``mode: remove``, a different expert count per layer): each MoE layer is vLLM's own
  gpt-oss ``MLPBlock`` (router with bias, fused experts with biases and the clamped SwiGLU
  ``swigluoai``) built while ``num_local_experts`` reads that layer's count: the stock kernels
  and weight loading, only the sizes change;
- novice (MoNE, ``mode: novice``): the router keeps all E rows and picks the top-k among them;
  the kept experts run, each replaced expert adds its constant row of ``novice_outputs`` times
  its routing weight. :class:`~.gpt_oss_novice.NoviceGptOssMLP` does this in plain torch with the
  routing and experts of transformers' ``GptOssMLP``: exact, but not vLLM's fused kernel, and
  single-GPU only (no tensor parallelism in these layers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models import gpt_oss
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM

from .common import load_with_novices
from .gpt_oss_novice import NoviceGptOssMLP
from .layout import ServeLayout, read_layout


class MoepruneGptOssForCausalLM(GptOssForCausalLM):
    """vLLM's gpt-oss with the layer sizes and novice layers of ``config.moeprune``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        layout = read_layout(vllm_config.model_config.hf_config)
        if layout is None:
            raise ValueError("this checkpoint has no config.moeprune: serve it with stock vLLM")
        block = gpt_oss.TransformerBlock
        stock = block.mlp_cls
        block.mlp_cls = _mlp_factory(stock, layout)  # read by TransformerBlock.__init__
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            block.mlp_cls = stock

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Novice layers take their tensors by checkpoint name; everything else goes to vLLM's
        loader (which renames the hub's names, e.g. ``gate_up_proj`` -> ``w13_weight``)."""
        return load_with_novices(self, NoviceGptOssMLP, weights, super().load_weights)


def _mlp_factory(stock: type, layout: ServeLayout) -> type:
    """A stand-in for gpt-oss's ``MLPBlock`` that builds each MoE layer at its own size (a
    subclass, so that ``isinstance`` checks on the stock class still hold)."""

    class SizedMLP(stock):
        def __new__(cls, vllm_config, layer_idx: int, prefix: str = ""):
            ids = layout.novice_experts.get(layer_idx) if layout.mode == "novice" else None
            if ids:
                from vllm.distributed import get_tensor_model_parallel_world_size

                if get_tensor_model_parallel_world_size() != 1:
                    raise ValueError(
                        "novice layers of the moeprune vLLM plugin run without tensor parallelism"
                    )
                # not a SizedMLP: __init__ is not called
                return NoviceGptOssMLP(vllm_config.model_config.hf_config, ids)
            return super().__new__(cls)

        def __init__(self, vllm_config, layer_idx: int, prefix: str = "") -> None:
            config = vllm_config.model_config.hf_config
            count = config.num_local_experts
            if layout.mode == "remove":
                count = layout.experts_per_layer.get(layer_idx, count)
            # MLPBlock reads the expert count from the shared config: set it for this layer only
            stored, config.num_local_experts = config.num_local_experts, count
            try:
                super().__init__(vllm_config, layer_idx, prefix=prefix)
            finally:
                config.num_local_experts = stored

    return SizedMLP
