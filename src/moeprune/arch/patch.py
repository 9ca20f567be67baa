"""Seeing and steering what MoE blocks do, without changing the model's code.

:func:`patch_moe` swaps, on the *instances* only (the classes stay untouched, and everything is
restored on exit), the forward of each block's router and experts module:

- the router still computes its own logits; the selection and gate weights are then recomputed by
  :func:`moeprune.arch.routing.route` when a block is masked (removed experts can never be chosen:
  the pruning reference semantics) or when ``reroute`` asks for it;
- the experts module computes each selected expert's unweighted output once
  (:func:`.experts.selected_expert_outputs`), optionally replaces some experts by constant vectors
  (MoNE novices), hands everything to an observer, and returns the gate-weighted sum exactly as the
  model's own implementations do.

Calibration, masked evaluation and the architecture tests are all built on this. Evaluation, which
needs no per-slot outputs, can keep the experts module's own forward (``stock_experts``: the
fastest implementation the device has, as the pruned checkpoint would run it): only the router is
steered, under a mask the experts module sees only the kept experts (:mod:`.compact`: moved in
front of its tensors in place for the session), and novices are added as gate-weighted constants
to the output of the real experts with the novices' gate weights zeroed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import UserError
from . import llama4
from .blocks import MoEBlock
from .compact import KeptExperts, compactable
from .experts import SlotOutputs, expert_slot_outputs
from .routing import KeptView, kept_view, kept_view_problem, route_kept


@dataclass
class BlockEvent:
    """What one MoE block saw and did for one forward, over its T flattened tokens."""

    block: MoEBlock
    hidden: torch.Tensor  # [T, H] input of the experts (after the pre-MoE norm; Muse-Spark: projected)
    logits: torch.Tensor  # [T, E] router logits
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k] gate weights the model really applies (incl. scaling)
    slot_outputs: SlotOutputs  # unweighted outputs e_{i,t} of every pair, in the residual stream's space
    residual: torch.Tensor  # [T, H] residual stream h_t entering the block (the block input for post-norm layers)
    token_mask: torch.Tensor | None  # [T] bool, True for real (non-padding) tokens, if set
    # [T, H] Σ_k g e as the block adds it to the residual stream (its own sum, in its dtype), when
    # the experts' output is exactly that; None: observers sum the slots themselves
    routed: torch.Tensor | None = None

    @property
    def expert_outputs(self) -> torch.Tensor:
        """[T, k, H] unweighted outputs in pair order (a copy when grouped by expert)."""
        return self.slot_outputs.slots()


@dataclass
class BlockControl:
    """How to steer one block (all optional)."""

    allowed: torch.Tensor | None = None  # bool [E]: experts that may be selected (mask mode)
    top_k: int | None = None  # lower the number of active experts
    novices: dict[int, torch.Tensor] | None = None  # expert id -> constant output [H] (MoNE)


def kept_controls(
    blocks: list[MoEBlock], kept: dict[int, list[int]], top_k: int | None = None
) -> dict[int, BlockControl]:
    """Controls that let each block select only its ``kept`` experts (decoder layer -> expert ids):
    the pruning reference (removed experts' logits at -inf before selection)."""
    controls = {}
    for b in blocks:
        allowed = torch.zeros(b.num_experts, dtype=torch.bool)
        allowed[list(kept[b.layer])] = True
        controls[b.index] = BlockControl(allowed=allowed, top_k=top_k)
    return controls


@dataclass
class _BlockState:
    logits: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    index: torch.Tensor | None = None  # the router's chosen columns (Longcat: >= E = zero expert)


@dataclass
class PatchSession:
    """Handle returned by :func:`patch_moe`; set ``token_mask`` before each forward if padding exists."""

    blocks: list[MoEBlock]
    controls: dict[int, BlockControl] = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    reuse_rows: bool = False  # every experts call writes its per-slot rows into one buffer
    _rows: dict[tuple[torch.dtype, torch.device, int], torch.Tensor] = field(default_factory=dict)

    def rows_buffer(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        """[n, H] memory for one experts call's per-slot rows, shared by all calls of the session
        (None unless ``reuse_rows``). A new [T·k, H] tensor per layer is a fresh allocation the
        size of the layer's activations times k: above glibc's mmap threshold (32 MiB) each one is
        mapped and page-faulted anew, which costs more than writing the rows
        (docs/benchmarks.md, "One buffer for the per-slot rows")."""
        if not self.reuse_rows:
            return None
        key = (like.dtype, like.device, like.shape[-1])
        buf = self._rows.get(key)
        if buf is None or buf.shape[0] < n:
            buf = self._rows[key] = like.new_empty((n, like.shape[-1]))
        return buf[:n]


def _versions(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t._version for t in tensors)


@dataclass
class _KeptCache:
    """The kept view of the last mask a router was steered by, and what it was built from. It is
    built again when the mask, the router weight or the selection bias is another tensor or was
    changed in place (``_version``), the weight moved to another device, or top-k changed."""

    allowed: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    top_k: int | None = None
    device: torch.device | None = None
    versions: tuple = ()
    view: tuple[KeptView, torch.Tensor] | None = None

    def valid_for(self, allowed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, top_k: int | None) -> bool:
        return (
            self.allowed is allowed
            and self.weight is weight
            and self.bias is bias
            and self.top_k == top_k
            and self.device == weight.device
            and self.versions == _versions(allowed, weight, bias)
        )

    def store(
        self,
        allowed: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        top_k: int | None,
        view: tuple[KeptView, torch.Tensor] | None,
    ) -> None:
        self.allowed, self.weight, self.bias, self.top_k, self.view = allowed, weight, bias, top_k, view
        self.device, self.versions = weight.device, _versions(allowed, weight, bias)


def _router_forward(
    model: nn.Module,
    block: MoEBlock,
    original: Callable,
    state: _BlockState,
    session: PatchSession,
    reroute: bool,
    logits_only: bool = False,
) -> Callable:
    """``logits_only``: when steered, compute only the logits (``block.logits_only``) and skip the
    router's own routing, which the steered routing replaces (the stock-experts evaluation: nothing
    else reads the router's output). A mask that its kept experts alone route exactly
    (:func:`.routing.kept_view_problem`) is routed as the pruned checkpoint's router would route it:
    logits of the kept rows only, no -inf mask, ids mapped back (the logits returned are then the
    kept columns', [T, K], as the pruned router's)."""
    router = block.router(model)
    plain = block.adapter is None and not block.spec.extra_role and not block.spec.selects_extra
    prefix = block.router_path + "."
    weight_name = block.router_weight_path.removeprefix(prefix) if block.router_weight_path.startswith(prefix) else None
    cache = _KeptCache()
    route_block = block.bound_route(model)

    def kept_rows(control: BlockControl) -> tuple[KeptView, torch.Tensor] | None:
        """The pruned router a mask leaves: its kept view and the kept rows of the router's weight
        (None: the view would not route exactly as the mask, so the mask is applied to all E)."""
        allowed = control.allowed
        if allowed is None or weight_name is None:
            return None
        weight = getattr(router, weight_name) if "." not in weight_name else router.get_parameter(weight_name)
        bias = route_block.selection_bias()
        if cache.valid_for(allowed, weight, bias, control.top_k):
            return cache.view
        view = None
        if kept_view_problem(block.spec, allowed, control.top_k) is None:
            v = kept_view(allowed, bias, weight.device)
            view = (v, weight.detach()[v.kept])
        cache.store(allowed, weight, bias, control.top_k, view)
        return view

    def forward(hidden_states: torch.Tensor, *args, **kwargs):
        control = session.controls.get(block.index)
        steer = control is not None and (control.allowed is not None or control.top_k is not None)
        if logits_only and plain and steer and block.logits_only is not None and not args and not kwargs:
            kept = kept_rows(control)
            if kept is not None:  # route as the pruned checkpoint's router would, ids mapped back
                view, rows = kept
                logits = block.logits_only(router, hidden_states, rows)  # [T, K]: the kept columns
                r = route_kept(block.spec, logits, view, control.top_k)
            else:
                logits = block.logits_only(router, hidden_states, None)
                r = route_block(logits, allowed=control.allowed, top_k=control.top_k)
            state.logits, state.index = logits, None
            weights = r.top_k_weights
            if block.spec.scaling_site == "block" and block.spec.scaling != 1.0:
                weights = weights / block.spec.scaling  # the block multiplies it back
            # weights in the logits' dtype and int64 ids, as these routers return them
            return logits, weights.to(logits.dtype), r.top_k_index
        out = original(hidden_states, *args, **kwargs)
        logits = block.router_logits(router, hidden_states, out)
        state.logits = logits
        state.index = out[2] if block.spec.extra_role == "zero" else None
        if not (steer or reroute):
            if block.spec.extra_role == "skip":  # ZAYA hands skip slots on as expert 0 (weight 0)
                state.index = route_block(logits).top_k_index
            return out
        r = route_block(logits, allowed=control.allowed if control else None, top_k=control.top_k if control else None)
        if block.spec.selects_extra:
            state.index = r.top_k_index
        if block.adapter is not None and block.adapter.output is not None:
            return block.adapter.output(out, r, logits)
        weights = r.top_k_weights
        if block.spec.scaling_site == "block" and block.spec.scaling != 1.0:
            weights = weights / block.spec.scaling  # the block multiplies it back
        return (logits, weights.to(out[1].dtype), r.top_k_index.to(out[2].dtype), *out[3:])

    return forward


def _route_method_forward(
    model: nn.Module,
    block: MoEBlock,
    original: Callable,
    state: _BlockState,
    session: PatchSession,
    reroute: bool,
    logits_only: bool = False,
) -> Callable:
    """For routers that return logits only (DBRX): the block's ``logits -> (weights, index)``."""
    route_block = block.bound_route(model)

    def forward(router_logits: torch.Tensor, *args, **kwargs):
        state.logits = router_logits
        control = session.controls.get(block.index)
        steer = control is not None and (control.allowed is not None or control.top_k is not None)
        if not (steer or reroute):
            return original(router_logits, *args, **kwargs)
        r = route_block(router_logits, allowed=control.allowed if control else None, top_k=control.top_k if control else None)
        return r.top_k_weights.to(router_logits.dtype), r.top_k_index

    return forward


def _experts_forward(
    block: MoEBlock,
    module: nn.Module,
    state: _BlockState,
    session: PatchSession,
    observer: Callable[[BlockEvent], None] | None,
    out_proj: nn.Module | None = None,
) -> Callable:
    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        shape = hidden_states.shape  # [T, H]; DBRX passes [B, S, H] and gets that shape back
        hidden_states = hidden_states.reshape(-1, shape[-1])
        control = session.controls.get(block.index)
        novices = control.novices if control is not None else None
        if block.spec.selects_extra and state.index is not None:
            # Longcat hands its zero-expert slots to the experts as real ids with weight 0 (the
            # block adds the identity itself), ZAYA its skip slots: no expert selection, so -1
            identity = state.index.reshape(top_k_index.shape) >= block.num_experts
            top_k_index = top_k_index.masked_fill(identity, -1)
        out = session.rows_buffer(top_k_index.numel(), hidden_states)
        outputs = expert_slot_outputs(module, hidden_states, top_k_index, novices, top_k_weights, out=out)
        summed = outputs.weighted_sum(top_k_weights)
        if observer is not None:
            applied = top_k_weights
            scaled = block.spec.scaling_site == "block" and block.spec.scaling != 1.0
            if scaled:
                applied = top_k_weights * block.spec.scaling
            observer(
                BlockEvent(
                    block=block,
                    hidden=hidden_states,
                    logits=state.logits,
                    top_k_index=top_k_index,
                    top_k_weights=applied,
                    # experts in a projected space (Muse-Spark): each output as the block maps the
                    # weighted sum to the residual stream (a linear map: the same sum)
                    slot_outputs=outputs if out_proj is None else outputs.map_rows(out_proj),
                    residual=state.residual if block.prenorm_path is not None else hidden_states,
                    token_mask=session.token_mask,
                    routed=summed if out_proj is None and not scaled else None,
                )
            )
        return summed.to(hidden_states.dtype).reshape(shape)

    return forward


def _input_gated_forwards(
    model: nn.Module,
    block: MoEBlock,
    router: nn.Module,
    experts: nn.Module,
    state: _BlockState,
    session: PatchSession,
    observer: Callable[[BlockEvent], None] | None,
    reroute: bool,
) -> tuple[Callable, Callable]:
    """Router and experts forwards of a block whose gate scales the experts' input (Llama-4)."""
    gate = llama4.InputGatedState()

    def control() -> BlockControl | None:
        return session.controls.get(block.index)

    def steer() -> bool:
        c = control()
        return reroute or (c is not None and (c.allowed is not None or c.top_k is not None))

    route_block = block.bound_route(model)

    def route(logits: torch.Tensor):
        c = control()
        return route_block(logits, allowed=c.allowed if c else None, top_k=c.top_k if c else None)

    def novices() -> dict[int, torch.Tensor] | None:
        c = control()
        return c.novices if c is not None else None

    def observe(hidden, index, weights, outputs) -> None:
        if observer is not None:
            observer(
                BlockEvent(
                    block=block,
                    hidden=hidden,
                    logits=state.logits,
                    top_k_index=index,
                    top_k_weights=weights,
                    slot_outputs=SlotOutputs.in_pair_order(outputs),
                    residual=state.residual if block.prenorm_path is not None else hidden,
                    token_mask=session.token_mask,
                )
            )

    return (
        llama4.router_forward(block, route, router.forward, state, gate, steer),
        llama4.experts_forward(experts, gate, novices, observe),
    )


def _stock_experts_forward(
    block: MoEBlock, original: Callable, session: PatchSession, kept: _KeptSlot | None = None
) -> Callable:
    """The experts module's own forward; a block with novices gets, for each slot routed to a
    novice, gate weight x its constant instead of the expert's output (weight 0 in the module's
    own forward, so that the expert adds nothing). ``kept``: under a mask, the module sees only the
    experts the mask keeps (:mod:`.compact`), the router's ids mapped to theirs."""

    # the novices' table [E, H] and mask [E], built once per novices dict and device (not per forward)
    built: list[tuple[dict, torch.device, torch.Tensor, torch.Tensor]] = []

    def tables(novices: dict[int, torch.Tensor], device: torch.device, width: int) -> tuple[torch.Tensor, ...]:
        if built and built[0][0] is novices and built[0][1] == device:
            return built[0][2], built[0][3]
        ids = sorted(novices)
        table = torch.zeros(block.num_experts, width, dtype=torch.float32, device=device)
        table[ids] = torch.stack([novices[i].to(table) for i in ids])
        is_novice = torch.zeros(block.num_experts, dtype=torch.bool, device=device)
        is_novice[ids] = True
        built[:] = [(novices, device, table, is_novice)]
        return table, is_novice

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        control = session.controls.get(block.index)
        front = kept.sync(control) if kept is not None else None
        if front is not None:
            return original(hidden_states, front.lookup[top_k_index], top_k_weights)
        if control is None or not control.novices:
            return original(hidden_states, top_k_index, top_k_weights)
        table, is_novice = tables(control.novices, hidden_states.device, hidden_states.shape[-1])
        slot = is_novice[top_k_index]  # [T, k]
        out = original(hidden_states, top_k_index, top_k_weights.masked_fill(slot, 0))
        weights = top_k_weights.float().masked_fill(~slot, 0)
        constant = (weights.unsqueeze(-1) * table[top_k_index]).sum(dim=1)
        return out + constant.to(out.dtype).reshape(out.shape)

    return forward


class _KeptSlot:
    """Which experts a block's experts module shows its own forward: under a mask that its steered
    router routes within the kept experts alone (:func:`.routing.kept_view_problem`), only those
    (:class:`.compact.KeptExperts`), moved in front at the first forward and again whenever the mask
    is replaced or changed in place; else all of them."""

    def __init__(self, block: MoEBlock, module: nn.Module) -> None:
        self.block, self.module = block, module
        self.front: KeptExperts | None = None
        self._key: tuple | None = None
        self._allowed: torch.Tensor | None = None

    def sync(self, control: BlockControl | None) -> KeptExperts | None:
        allowed = None if control is None else control.allowed
        key = (
            None if allowed is None else allowed._version,
            None if control is None else control.top_k,
            bool(control is not None and control.novices),
        )
        if self._key is not None and allowed is self._allowed and key == self._key:
            return self.front
        self.restore()
        front = None
        if self._shows_kept_alone(control):
            assert control is not None and allowed is not None
            front = KeptExperts(self.module, allowed.to(torch.bool).nonzero().flatten().cpu())
        # held before it is applied: an interrupt that ends apply() (once the swaps are done) is
        # followed by the session's restore(), which then undoes them
        self.front, self._key, self._allowed = front, key, allowed
        if front is not None:
            front.apply()
        return front

    def _shows_kept_alone(self, control: BlockControl | None) -> bool:
        if control is None or control.allowed is None or control.novices or not compactable(self.module):
            return False
        if self.block.num_experts != self.module.num_experts:
            return False
        return kept_view_problem(self.block.spec, control.allowed, control.top_k) is None

    def restore(self) -> None:
        if self.front is not None:
            self.front.restore()
        self.front, self._key, self._allowed = None, None, None


@contextmanager
def patch_moe(
    model: nn.Module,
    blocks: list[MoEBlock],
    observer: Callable[[BlockEvent], None] | None = None,
    controls: dict[int, BlockControl] | None = None,
    reroute: bool = False,
    stock_experts: bool = False,
    observer_keeps_rows: bool = True,
) -> Iterator[PatchSession]:
    """Patch every block's router and experts (instances only) for the duration of the context.
    ``stock_experts`` (without ``observer``): the experts keep their own forward (module docstring);
    an experts module that routes novices itself (a novice checkpoint's) keeps the per-slot one.
    ``observer_keeps_rows=False`` promises that the observer is done with an event's
    ``slot_outputs.rows`` when it returns: every experts call then writes its rows into the same
    buffer (:meth:`PatchSession.rows_buffer`), as it does without an observer."""
    if stock_experts and observer is not None:
        raise ValueError("stock_experts gives no per-slot outputs to observe")
    session = PatchSession(
        blocks=blocks, controls=dict(controls or {}), reuse_rows=observer is None or not observer_keeps_rows
    )
    for block in blocks:
        control = session.controls.get(block.index)
        if block.expert_out_proj_path is not None and control is not None and control.novices:
            raise UserError(
                f"block {block.path}: its experts run in a projected space (their outputs are mapped "
                "to the residual stream by the block), so no residual-stream novice can replace one",
                "evaluate removal without novices",
            )
    restore: list[tuple[nn.Module, str, bool, object]] = []
    handles = []
    kept_slots: list[_KeptSlot] = []
    # an experts module that serves several blocks (a looped layer) keeps all its experts: each
    # block's mask would move them its own way
    serves = Counter(id(block.experts(model)) for block in blocks)
    try:
        for block in blocks:
            state = _BlockState()
            router = block.router(model)
            experts = block.experts(model)
            if block.route_method is None:
                route_patch = (router, "forward", _router_forward)
            else:  # the router returns logits only: steer the block's method that routes them
                route_patch = (block.block(model), block.route_method, _route_method_forward)
            owner, attr, make = route_patch
            if block.spec.gate_site == "input":  # Llama-4: the gate scales the experts' input
                route_fwd, experts_fwd = _input_gated_forwards(
                    model, block, router, experts, state, session, observer, reroute
                )
            else:
                # the stock forward indexes E experts only: routers with extra columns (Longcat's
                # zero experts) keep the per-slot forward
                stock = stock_experts and getattr(experts, "novice_route", None) is None and not block.router_extra
                route_fwd = make(model, block, getattr(owner, attr), state, session, reroute, stock and not reroute)
                if stock:
                    kept = None if reroute or serves[id(experts)] > 1 else _KeptSlot(block, experts)
                    if kept is not None:
                        kept_slots.append(kept)
                    experts_fwd = _stock_experts_forward(block, experts.forward, session, kept)
                else:
                    out_proj = None if block.expert_out_proj_path is None else model.get_submodule(block.expert_out_proj_path)
                    experts_fwd = _experts_forward(block, experts, state, session, observer, out_proj)
            for mod, name, new in ((owner, attr, route_fwd), (experts, "forward", experts_fwd)):
                restore.append((mod, name, name in mod.__dict__, mod.__dict__.get(name)))
                setattr(mod, name, new)
            if block.prenorm_path is not None:
                norm = model.get_submodule(block.prenorm_path)

                def grab(_mod, args, _state=state):
                    x = args[0]
                    _state.residual = x.reshape(-1, x.shape[-1])

                handles.append(norm.register_forward_pre_hook(grab))
        yield session
    finally:
        for slot in reversed(kept_slots):
            slot.restore()
        for handle in handles:
            handle.remove()
        for mod, name, had, old in reversed(restore):
            if had:
                setattr(mod, name, old)
            else:
                delattr(mod, name)
