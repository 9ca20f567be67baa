"""A fused experts module that sees only the experts a mask keeps, without a copy of its weights.

A masked evaluation (``compare``'s rows) runs the experts module's own forward under a router that
selects only the kept experts. The module still spans all E experts, and transformers' kernels pay
for every one of them on each call (``grouped_mm`` walks all E groups, empty or not; ``eager``
one-hot encodes over E): a masked row was 2-7% slower than the pruned checkpoint, most at one token
(docs/benchmarks.md, "compare rows: the experts the mask keeps, in front").

:class:`KeptExperts` moves the kept experts to the front of each of the module's expert tensors, in
place (one expert swapped at a time: no second copy of the weights), shows the module views of
those first K rows with ``num_experts = K``, and maps the router's ids to 0..K-1 (kept ids in
ascending order, as the pruned checkpoint numbers them). The module then computes exactly what the
pruned checkpoint's computes. :meth:`KeptExperts.restore` puts everything back, bit for bit.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from . import variants
from .experts import plain_fused_experts


def compactable(module: nn.Module) -> bool:
    """Whether the kept experts of ``module`` can be shown to its own forward as views: a
    ``@use_experts_implementation`` module whose per-expert tensors are its own parameters with the
    expert axis first, nothing quantized, no per-expert submodules, no novices."""
    if not plain_fused_experts(module) or variants.expert_axis_children(module):
        return False
    n = module.num_experts
    if n < 1:
        return False
    if hasattr(module, "_hf_hook"):  # accelerate's offload puts its own tensors in at each forward
        return False
    params = dict(module.named_parameters(recurse=False))
    if not params or any(name.endswith(("_scale_inv", "_activation_scale")) for name in params):
        return False
    if any(p.device.type == "meta" for p in params.values()):
        return False
    if any(p.dim() < 1 or p.shape[0] != n for p in params.values()):
        return False
    return not any(b.dim() >= 1 and b.shape[0] == n for b in module.buffers(recurse=False))


class KeptExperts:
    """The kept experts ``kept`` (ascending ids) of a :func:`compactable` module, in front of its
    tensors while applied."""

    def __init__(self, module: nn.Module, kept: torch.Tensor) -> None:
        self.module = module
        self.num_experts = int(module.num_experts)
        self.kept = [int(i) for i in kept.tolist()]
        if self.kept != sorted(set(self.kept)) or not self.kept or not 0 <= self.kept[0] <= self.kept[-1] < self.num_experts:
            raise ValueError(f"kept must be ascending expert ids below {self.num_experts}")
        device = next(module.parameters()).device
        # router id -> position among the kept (the module never sees another id under the mask)
        lookup = torch.full((self.num_experts,), len(self.kept), dtype=torch.long)
        lookup[self.kept] = torch.arange(len(self.kept))
        self.lookup = lookup.to(device)
        self._swaps: list[tuple[int, int]] = []
        self._params: dict[str, nn.Parameter] = {}

    def apply(self) -> None:
        if self._params:
            raise RuntimeError("KeptExperts applied twice")
        at = list(range(self.num_experts))  # at[p]: the expert stored at position p
        where = list(range(self.num_experts))  # where[e]: the position of expert e
        swaps = []
        for pos, expert in enumerate(self.kept):
            src = where[expert]
            if src != pos:
                swaps.append((pos, src))
                at[pos], at[src] = at[src], at[pos]
                where[at[pos]], where[at[src]] = pos, src
        params = dict(self.module.named_parameters(recurse=False))
        k = len(self.kept)
        with _interrupts_deferred(), torch.no_grad():
            for p in params.values():
                _swap_rows(p.data, swaps)
            self._swaps = swaps
            for name, p in params.items():
                self._params[name] = p
                self.module._parameters[name] = nn.Parameter(p.data[:k], requires_grad=p.requires_grad)
            self.module.num_experts = k

    def restore(self) -> None:
        if not self._params:
            return
        with _interrupts_deferred(), torch.no_grad():
            for name, p in self._params.items():
                self.module._parameters[name] = p
            self.module.num_experts = self.num_experts
            for p in self._params.values():
                _swap_rows(p.data, self._swaps[::-1])
            self._params, self._swaps = {}, []


@contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Ctrl-C waits until the experts are whole again (a swap cut between its copies would leave
    an expert's rows in the scratch), then reaches the handler it would have reached (Python's
    default raises KeyboardInterrupt). Only the main thread receives signals; elsewhere, or under a
    handler not set from Python, nothing is deferred."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        if callable(previous):
            previous(signal.SIGINT, None)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt


def _swap_rows(t: torch.Tensor, swaps: list[tuple[int, int]]) -> None:
    """Swap rows of ``t`` along its first axis, pair by pair, through one row of scratch."""
    if not swaps:
        return
    scratch = torch.empty_like(t[0])
    for a, b in swaps:
        scratch.copy_(t[a])
        t[a].copy_(t[b])
        t[b].copy_(scratch)
