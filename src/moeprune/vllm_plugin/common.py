"""What the plugin's families share: novice experts in plain torch, the weight loading that feeds
them, and small helpers for swapping vLLM's MoE block while a model is built.

Torch only (no vLLM import), so the routing and the novice arithmetic are tested in moeprune's
own suite against ``moeprune.load`` (tests/test_vllm_plugin_novice.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NOVICE_BUFFER = "novice_outputs"  # the [R, H] tensor of a novice experts module, as stored
QWEN_NAMES = ("gate_proj", "up_proj", "down_proj")  # an expert's gate, up, down projections
MIXTRAL_NAMES = ("w1", "w3", "w2")
_LAYER = re.compile(r"layers\.(\d+)\.(?:mlp|block_sparse_moe)$")


class SwiGLU(nn.Module):
    """One expert, ``down(silu(gate(x)) * up(x))``, with the checkpoint's own parameter names."""

    def __init__(self, hidden: int, inner: int, names: tuple[str, str, str] = QWEN_NAMES) -> None:
        super().__init__()
        self.names = names
        gate, up, down = names
        self.add_module(gate, nn.Linear(hidden, inner, bias=False))
        self.add_module(up, nn.Linear(hidden, inner, bias=False))
        self.add_module(down, nn.Linear(inner, hidden, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class NoviceExperts(nn.Module):
    """``experts`` of a novice layer: the kept experts, renumbered 0..M-1 as stored, and the
    novices' constant rows (``novice_outputs``, in ascending router id)."""

    def __init__(
        self, hidden: int, inner: int, routed: int, novice_ids: list[int], names: tuple[str, str, str]
    ) -> None:
        super().__init__()
        novices = sorted(novice_ids)
        kept = [i for i in range(routed) if i not in set(novices)]
        for j in range(len(kept)):
            self.add_module(str(j), SwiGLU(hidden, inner, names))
        self.novice_outputs = nn.Parameter(torch.empty(len(novices), hidden), requires_grad=False)
        # router id -> stored index: kept experts 0..M-1, novice j -> M + j (its novice_outputs row)
        lookup = [0] * routed
        for local, i in enumerate([*kept, *novices]):
            lookup[i] = local
        self.register_buffer("lookup", torch.tensor(lookup, dtype=torch.long), persistent=False)
        self.kept = len(kept)

    def mix(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``sum_k weights[:, k] * expert_{ids[:, k]}(x)`` in float32; a novice's output is its
        constant row. One matmul per selected kept expert, over the tokens that chose it."""
        local = self.lookup[ids]  # [T, k]
        novice = local >= self.kept
        constants = self.novice_outputs.float()[(local - self.kept).clamp(min=0)]
        out = (constants * (weights.float() * novice).unsqueeze(-1)).sum(dim=1)
        for e in torch.unique(local[~novice]).tolist():
            token, slot = torch.nonzero(local == e, as_tuple=True)
            y = getattr(self, str(e))(x[token]).float() * weights[token, slot].float().unsqueeze(-1)
            out.index_add_(0, token, y)
        return out


def softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router ids and weights as transformers' Qwen3-MoE and Mixtral routers compute them: softmax
    over all E in float32, top-k, optionally renormalised over the k (Mixtral always is)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


class _Gate(nn.Module):
    def __init__(self, hidden: int, experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden))


class SoftmaxNoviceMoE(nn.Module):
    """A softmax-routed MoE layer (Qwen3-MoE, Mixtral) whose replaced experts answer a constant
    (MoNE): ``gate.weight`` keeps all E rows, ``experts`` is :class:`NoviceExperts`.

    Family modules mix this class in before vLLM's own block class, so that the model's
    ``isinstance`` checks still find its MoE layers; its ``__init__`` therefore calls only
    ``nn.Module.__init__`` (the stock block's would build the fused kernel at full size)."""

    def __init__(
        self,
        *,
        hidden: int,
        inner: int,
        routed: int,
        top_k: int,
        renormalize: bool,
        novice_ids: list[int],
        names: tuple[str, str, str],
    ) -> None:
        nn.Module.__init__(self)
        self.hidden_size = hidden
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = _Gate(hidden, routed)
        self.experts = NoviceExperts(hidden, inner, routed, novice_ids, names)
        # what vLLM's MoE models read off their layers (expert-parallel load balancing, off here)
        self.n_routed_experts = self.n_logical_experts = routed
        self.n_physical_experts = self.n_local_physical_experts = routed
        self.n_redundant_experts = 0

    def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids, weights = softmax_topk(F.linear(x, self.gate.weight), self.top_k, self.renormalize)
        return self.experts.mix(x, ids, weights).to(x.dtype).reshape(shape)


def layer_of(prefix: str) -> int:
    """The decoder layer of an MoE block from its module prefix (``model.layers.3.mlp``)."""
    match = _LAYER.search(prefix)
    if match is None:
        raise ValueError(f"cannot tell the decoder layer of MoE module {prefix!r}")
    return int(match.group(1))


@contextmanager
def replaced(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` for the duration of the block (a vLLM class while a model is built,
    a config's expert count while one layer is)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def load_with_novices(
    model: nn.Module,
    novice_type: type | tuple[type, ...],
    weights: Iterable[tuple[str, torch.Tensor]],
    load_rest: Callable[[Iterable[tuple[str, torch.Tensor]]], set[str]],
) -> set[str]:
    """Novice layers (modules of ``novice_type``) take their tensors by name; the rest go to the
    stock loader (``load_rest``). A missing or mis-sized novice tensor is one ValueError line."""
    own: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, novice_type):
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

    loaded |= load_rest(rest())
    missing = sorted(set(own) - loaded)
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} novice-layer tensors, e.g. {missing[0]}")
    return loaded


def single_gpu(what: str) -> None:
    """Novice layers hold whole experts: refuse tensor parallelism (one line)."""
    from vllm.distributed import get_tensor_model_parallel_world_size

    if get_tensor_model_parallel_world_size() != 1:
        raise ValueError(f"novice layers of the moeprune vLLM plugin ({what}) run without tensor parallelism")
