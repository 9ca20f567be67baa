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
import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.model_executor.models import deepseek_v2
from vllm.model_executor.models.deepseek_v2 import DeepseekV3ForCausalLM

from .layout import ServeLayout, read_layout

_LAYER = re.compile(r"layers\.(\d+)\.mlp$")


class _MLP(nn.Module):
    """SwiGLU expert with the checkpoint's own parameter names (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Gate(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))
        self.e_score_correction_bias = nn.Parameter(torch.empty(experts, dtype=torch.float32))


class _Experts(nn.Module):
    """``mlp.experts``: the kept experts (renumbered 0..M-1 as stored) and the novices' constants."""

    def __init__(self, hidden: int, inner: int, kept: int, novices: int) -> None:
        super().__init__()
        for j in range(kept):
            self.add_module(str(j), _MLP(hidden, inner))
        self.novice_outputs = nn.Parameter(torch.empty(novices, hidden), requires_grad=False)


class NoviceDeepseekMoE(nn.Module):
    """A DeepSeek-V3 MoE layer whose replaced experts answer a constant (MoNE)."""

    def __init__(self, config, novice_ids: list[int]) -> None:
        super().__init__()
        from vllm.distributed import get_tensor_model_parallel_world_size

        if get_tensor_model_parallel_world_size() != 1:
            raise ValueError("novice layers of the moeprune vLLM plugin run without tensor parallelism")
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
        kept = [i for i in range(routed) if i not in set(novice_ids)]
        # router id -> stored index: kept experts 0..M-1, novice j -> M + j (its novice_outputs row)
        lookup = [0] * routed
        for local, i in enumerate([*kept, *novice_ids]):
            lookup[i] = local
        self.register_buffer("lookup", torch.tensor(lookup, dtype=torch.long), persistent=False)
        self.kept = len(kept)
        self.gate = _Gate(config.hidden_size, routed)
        self.experts = _Experts(config.hidden_size, config.moe_intermediate_size, len(kept), len(novice_ids))
        shared = config.n_shared_experts
        self.shared_experts = (
            _MLP(config.hidden_size, config.moe_intermediate_size * shared) if shared else None
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
        local = self.lookup[ids]  # [T, k]
        novice = local >= self.kept
        constants = self.experts.novice_outputs.float()[(local - self.kept).clamp(min=0)]
        out = (constants * (weights * novice).unsqueeze(-1)).sum(dim=1)  # novices: weight * constant
        for e in torch.unique(local[~novice]).tolist():
            token, slot = torch.nonzero(local == e, as_tuple=True)
            y = getattr(self.experts, str(e))(x[token]).float() * weights[token, slot].unsqueeze(-1)
            out.index_add_(0, token, y)
        out = out.to(x.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


class MoepruneDeepseekV3ForCausalLM(DeepseekV3ForCausalLM):
    """vLLM's DeepSeek-V3 with the layer sizes and novice layers of ``config.moeprune``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        config = vllm_config.model_config.hf_config
        layout = read_layout(config)
        if layout is None:
            raise ValueError("this checkpoint has no config.moeprune: serve it with stock vLLM")
        # transformers' DeepSeek-V3 always routes this way; vLLM reads it from the hub fields,
        # which configs written by transformers lack (without them vLLM drops the selection bias)
        for key, value in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if getattr(config, key, None) is None:
                setattr(config, key, value)
        stock = deepseek_v2.DeepseekV2MoE
        deepseek_v2.DeepseekV2MoE = _moe_factory(stock, layout)  # read by DeepseekV2DecoderLayer
        try:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        finally:
            deepseek_v2.DeepseekV2MoE = stock
        if getattr(config, "tie_word_embeddings", False) and hasattr(self.lm_head, "tie_weights"):
            # vLLM's DeepSeek never ties (DeepSeek-V3 does not); a tied checkpoint stores no
            # lm_head.weight and would otherwise run an uninitialised head
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Novice layers take their tensors by name; everything else goes to vLLM's loader."""
        own: dict[str, torch.Tensor] = {}
        for name, module in self.named_modules():
            if isinstance(module, NoviceDeepseekMoE):
                own.update({f"{name}.{k}": v for k, v in module.named_parameters()})
        loaded: set[str] = set()

        def rest() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                if name in own:
                    if own[name].shape != tensor.shape:
                        raise ValueError(
                            f"{name} is {list(tensor.shape)} in the checkpoint, {list(own[name].shape)} in the model"
                        )
                    own[name].data.copy_(tensor)
                    loaded.add(name)
                else:
                    yield name, tensor

        loaded |= super().load_weights(rest())
        missing = sorted(set(own) - loaded)
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} novice-layer tensors, e.g. {missing[0]}")
        return loaded


class MoepruneForCausalLM(MoepruneDeepseekV3ForCausalLM):
    """The name moeprune writes into ``architectures``; dispatched on ``base_model_type``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        base = getattr(vllm_config.model_config.hf_config, "moeprune", {}).get("base_model_type")
        if base not in (None, "deepseek_v3", "deepseek_v2"):
            raise ValueError(f"the moeprune vLLM plugin does not serve base model type {base!r} yet")
        super().__init__(vllm_config=vllm_config, prefix=prefix)


def _layer(prefix: str) -> int:
    match = _LAYER.search(prefix)
    if match is None:
        raise ValueError(f"cannot tell the decoder layer of MoE module {prefix!r}")
    return int(match.group(1))


def _moe_factory(stock: type, layout: ServeLayout) -> type:
    """A stand-in for ``DeepseekV2MoE`` that builds each MoE layer at its own size. A subclass,
    not a function: vLLM looks the name up for ``isinstance`` checks too."""

    class SizedMoE(stock):
        def __new__(cls, *args, config=None, prefix: str = "", **kwargs):
            ids = layout.novice_experts.get(_layer(prefix)) if layout.mode == "novice" else None
            if ids:
                return NoviceDeepseekMoE(config, ids)  # not a SizedMoE: __init__ is not called
            return super().__new__(cls)

        def __init__(self, *, config, prefix: str = "", **kwargs) -> None:
            count = config.n_routed_experts
            if layout.mode == "remove":
                count = layout.experts_per_layer.get(_layer(prefix), count)
            if count != config.n_routed_experts:
                config = copy.copy(config)
                config.n_routed_experts = count
            super().__init__(config=config, prefix=prefix, **kwargs)

    return SizedMoE
