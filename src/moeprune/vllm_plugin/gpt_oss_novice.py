"""The novice (MoNE) gpt-oss MoE layer of the vLLM plugin, in plain torch (no vLLM import, so
that the default test suite checks it against ``moeprune.load``; :mod:`.gpt_oss` puts it in vLLM).

It computes what transformers' ``GptOssMLP`` computes over all E router rows: the softmax over
the top-k biased logits, the kept experts' clamped SwiGLU with biases, and for each replaced
expert its ``novice_outputs`` row times its routing weight. The experts' tensors keep the
checkpoint's (hub) layout: ``gate_up_proj`` [M, H, 2I] with gate and up interleaved on the last
axis, ``down_proj`` [M, I, H], and their biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Router(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(experts), requires_grad=False)


class _Experts(nn.Module):
    """``mlp.experts``: the kept experts (renumbered 0..M-1 as stored) and the novices' constants."""

    def __init__(self, config, kept: int, novices: int) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(kept, hidden, 2 * inner), requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(kept, 2 * inner), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(kept, inner, hidden), requires_grad=False)
        self.down_proj_bias = nn.Parameter(torch.empty(kept, hidden), requires_grad=False)
        self.novice_outputs = nn.Parameter(torch.empty(novices, hidden), requires_grad=False)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Kept expert ``e`` on tokens ``x``, as transformers' ``GptOssExperts`` computes it."""
        gate_up = x @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]
        gate, up = gate_up[..., ::2], gate_up[..., 1::2]
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        glu = gate * torch.sigmoid(gate * self.alpha)
        return ((up + 1) * glu) @ self.down_proj[e] + self.down_proj_bias[e]


class NoviceGptOssMLP(nn.Module):
    """A gpt-oss MoE layer whose replaced experts answer a constant (MoNE)."""

    def __init__(self, config, novice_ids: list[int]) -> None:
        super().__init__()
        routed = config.num_local_experts
        self.top_k = config.num_experts_per_tok
        kept = [i for i in range(routed) if i not in set(novice_ids)]
        # router id -> stored index: kept experts 0..M-1, novice j -> M + j (its novice_outputs row)
        lookup = [0] * routed
        for local, i in enumerate([*kept, *novice_ids]):
            lookup[i] = local
        self.register_buffer("lookup", torch.tensor(lookup, dtype=torch.long), persistent=False)
        self.kept = len(kept)
        self.router = _Router(config.hidden_size, routed)
        self.experts = _Experts(config, len(kept), len(novice_ids))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k router ids and weights as transformers' ``GptOssTopKRouter``: the softmax over
        the k largest biased logits (so the unchosen experts do not enter the weights)."""
        logits = F.linear(x, self.router.weight, self.router.bias)
        top, ids = torch.topk(logits, self.top_k, dim=-1)
        return ids, F.softmax(top, dim=1, dtype=top.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = self.route(x)
        local = self.lookup[ids]  # [T, k]
        novice = local >= self.kept
        constants = self.experts.novice_outputs[(local - self.kept).clamp(min=0)]
        out = (constants * (weights * novice).unsqueeze(-1)).sum(dim=1)  # novices: weight * constant
        for e in torch.unique(local[~novice]).tolist():
            token, slot = torch.nonzero(local == e, as_tuple=True)
            y = self.experts.expert(e, x[token]) * weights[token, slot].unsqueeze(-1)
            out.index_add_(0, token, y.to(out.dtype))
        return out.to(x.dtype).reshape(shape)
