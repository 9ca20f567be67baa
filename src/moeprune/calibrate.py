"""One streaming calibration pass: every statistic of the profile, accumulated on the fly.

:class:`Accumulator` turns :class:`~moeprune.arch.BlockEvent` s into the sums of
``docs/profile-format.md`` (float64; nothing per token unless PreMoe's exact per-token entries are
asked for, so a profile's size does not grow with the calibration tokens). It knows
nothing about how the events are produced: :func:`calibrate` drives it with a whole-model forward
under :func:`~moeprune.arch.patch_moe`, and any other driver (a layer-by-layer offloaded pass) can
feed it too, by calling :meth:`Accumulator.set_batch` before the events of each batch, in any
layer order.

Distributed runs (torchrun): every rank gets a strided share of the records, the sums are
all-reduced, MoNE's mean/M2 are combined exactly (Chan), and the per-token / per-sample rows are
placed at their record-order positions, so the result equals the one-process result.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .arch import BlockEvent, MoEBlock
from .arch.routing import scores
from .errors import UserError
from .score import PREMOE_BINS, PREMOE_HIST, premoe_bins_of, premoe_edges, premoe_token_entries

__all__ = [
    "SUM_NAMES",
    "Accumulator",
    "DistInfo",
    "calibrate",
    "chan_merge",
    "lsq_novices",
    "dist_info",
    "init_distributed",
    "self_generate",
]

# [L, E] float64 sums
SUM_NAMES = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1", "gate_sq")
# the sums over (token, expert) pairs, accumulated together
PAIR_SUMS = ("count", "gate", "gate_sq", "reap_sum", "easyep")


def lsq_novices(num: torch.Tensor, gate_sq: torch.Tensor) -> torch.Tensor:
    """n_i = Σ g² e / Σ g² ([..., E, H] over [..., E]; 0 where Σ g² = 0): the constant minimising
    Σ_t ‖g_{i,t} e_{i,t} − g_{i,t} n_i‖² over the tokens routed to i (docs/methods.md)."""
    den = gate_sq.unsqueeze(-1)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(den.dtype).tiny), torch.zeros_like(num))


def chan_merge(
    n_a: torch.Tensor,
    mean_a: torch.Tensor,
    m2_a: torch.Tensor,
    n_b: torch.Tensor,
    mean_b: torch.Tensor,
    m2_b: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel update of (count, mean, M2); counts broadcast over the last axis."""
    n = n_a + n_b
    safe = n.clamp(min=1).unsqueeze(-1)
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b.unsqueeze(-1) / safe)
    m2 = m2_a + m2_b + delta.square() * (n_a * n_b).unsqueeze(-1) / safe
    return n, mean, m2


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def dist_info() -> DistInfo:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return DistInfo(torch.distributed.get_rank(), torch.distributed.get_world_size())
    return DistInfo()


def wants_distributed() -> bool:
    """True when launched by torchrun (or anything that sets WORLD_SIZE/RANK) or already initialised."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: str) -> DistInfo:
    """Initialise the default process group if needed (gloo on CPU, nccl on CUDA)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        torch.distributed.init_process_group(backend=backend)
    return dist_info()


def _moments_by_loop(
    rows: torch.Tensor,
    key: torch.Tensor,
    segments: torch.Tensor,
    g: torch.Tensor,
    tokens: torch.Tensor | None,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-expert statistics of the (token, expert) pairs ``rows`` [P, H] (any float dtype), grouped
    by expert: expert i's pairs are the ``segments[i]`` contiguous rows after those of experts < i
    (any rows past them belong to no expert). ``key`` [P] is each row's expert, or E for a row that
    must not count (padding, a zero slot); ``g`` [P] the gate weights (float32). Returns, all
    float32 and summed within this batch only (the caller adds them to its float64 totals once per
    batch):

    - ``norms`` [P]: ‖e‖ of each row,
    - ``mean``, ``m2``, ``lsq`` [E, H]: per expert the mean, the centred Σ (e − mean)² (two-pass)
      and Σ g² e over the rows that count,
    - ``routed`` [num_tokens, H]: Σ_k g e of each token (row p is token ``tokens[p]``); None when
      ``tokens`` is None (the block gave its own sum).

    Each expert's rows are a contiguous block that stays in cache, upcast there (never the whole
    [P, H] outputs), and reduced with two small matmuls: the fastest form on CPU once the rows no
    longer fit in cache."""
    P, H = rows.shape
    E = segments.numel()
    f32, dev = torch.float32, rows.device
    counts = key.bincount(minlength=E + 1)[:E].tolist()
    real = (key < E).to(f32)
    weights = torch.stack([real, g.square() * real])  # [2, P]: Σ e and Σ g² e in one matmul
    norms = torch.zeros(P, dtype=f32, device=dev)
    sums = torch.zeros(E, 2, H, dtype=f32, device=dev)
    m2 = torch.zeros(E, H, dtype=f32, device=dev)
    routed = torch.zeros(num_tokens, H, dtype=f32, device=dev) if tokens is not None else None
    # Hundreds of small in-cache ops: intra-op threads only add barriers (and stall badly when
    # the cores are shared), so the loop runs on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = 0
        for i, n in enumerate(segments.tolist()):
            if n == 0:
                continue
            end = start + n
            view = rows[start:end]
            chunk = view.float() if view.dtype != f32 else view.clone()  # upcast here, in cache
            torch.linalg.vector_norm(chunk, dim=1, out=norms[start:end])
            if routed is not None:
                routed.index_add_(0, tokens[start:end], chunk * g[start:end, None])
            if counts[i]:
                torch.mm(weights[:, start:end], chunk, out=sums[i])
                chunk -= sums[i, 0] / counts[i]
                torch.mm(weights[:1, start:end], chunk.square_(), out=m2[i : i + 1])
            start = end
    finally:
        torch.set_num_threads(threads)
    n = torch.tensor(counts, dtype=f32, device=dev).clamp(min=1).unsqueeze(1)
    return norms, sums[:, 0] / n, m2, sums[:, 1], routed


def _moments_vectorized(
    rows: torch.Tensor,
    key: torch.Tensor,
    segments: torch.Tensor,
    g: torch.Tensor,
    tokens: torch.Tensor | None,
    num_tokens: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Same as :func:`_moments_by_loop` with a fixed number of large kernels (GPUs, small batches);
    the rows may come in any order (``segments`` unused)."""
    P, H = rows.shape
    E = segments.numel()
    x = rows.float()  # a copy only when the model computes in another dtype
    norms = torch.linalg.vector_norm(x, dim=1)
    routed = None
    if tokens is not None:
        routed = torch.zeros(num_tokens, H, dtype=x.dtype, device=x.device).index_add_(0, tokens, x * g.unsqueeze(1))
    counts = key.bincount(minlength=E + 1)[:E]
    total = torch.zeros(E + 1, H, dtype=x.dtype, device=x.device).index_add_(0, key, x)
    total[:E] /= counts.clamp(min=1).unsqueeze(1).to(x.dtype)
    total[E] = 0
    lsq = torch.zeros(E + 1, H, dtype=x.dtype, device=x.device).index_add_(0, key, x * g.square().unsqueeze(1))
    centred = torch.nn.functional.embedding(key, total)  # each row's expert mean (a fast gather)
    torch.sub(x, centred, out=centred)
    m2 = torch.zeros(E + 1, H, dtype=x.dtype, device=x.device).index_add_(0, key, centred.square_())
    return norms, total[:E], m2[:E], lsq[:E], routed


def easyep_factor(h: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """EASY-EP's token factor max(0, 1 − cos(h, h̃)), h̃ = h + ``routed``, per row, in float32
    without cancellation: for unit vectors 1 − cos = ‖ĥ − ĥ′‖² / 2, whose error shrinks with the
    difference (1 − cos itself would lose every digit below float32's epsilon). A zero vector has
    cos 0: factor 1. Two float32 copies, everything else in place."""
    f32, tiny = torch.float32, torch.finfo(torch.float32).tiny
    u = h.to(f32, copy=True)
    v = routed.to(f32, copy=True).add_(u)
    nu = torch.linalg.vector_norm(u, dim=-1, keepdim=True)
    nv = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    u.div_(nu.clamp_min(tiny)).sub_(v.div_(nv.clamp_min(tiny)))
    factor = torch.linalg.vector_norm(u, dim=-1).square_().mul_(0.5)
    return factor.masked_fill_(((nu == 0) | (nv == 0)).squeeze(-1), 1.0)


# Layers whose routing / PreMoe / per-pair statistics wait for one flush per batch hold at most this
# much (their per-token tensors and [E, H] float32 moments); past it they are flushed early.
PENDING_MAX_BYTES = 16 * 2**20


@dataclass
class _Pending:
    """One layer's event of the current batch, reduced to what its remaining statistics need."""

    li: int
    score_fn: str
    logits: torch.Tensor  # [t, columns] float32, real tokens
    idx: torch.Tensor | None  # [t, k] (per-sample gate sums only)
    g: torch.Tensor | None  # [t, k] float32 (per-sample gate sums only)
    zero_slots: bool
    row_key: torch.Tensor  # [P] each row's expert, E: no expert / padding
    g_rows: torch.Tensor  # [P] float32 gate weight of each row
    norms: torch.Tensor  # [P] float32 ‖e‖
    factor: torch.Tensor  # [P] float32 EASY-EP factor of each row's token
    mean: torch.Tensor  # [E, H] float32 moments of this batch
    m2: torch.Tensor
    lsq: torch.Tensor

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in vars(self).values() if isinstance(x, torch.Tensor))


class Accumulator:
    """The streaming sums of one calibration pass over ``lengths`` (token count of every record,
    in record order; the record ids given to :meth:`set_batch` index this list)."""

    moments_by_loop: bool | None = None  # None: the per-expert loop for large CPU batches, else large kernels

    def __init__(
        self,
        blocks: Sequence[MoEBlock],
        hidden_size: int,
        lengths: Sequence[int],
        premoe_ka: int | None = None,
        per_sample: bool = False,
        device: str | torch.device = "cpu",
        premoe_exact: bool = False,
        premoe_bins: int = PREMOE_BINS,
    ) -> None:
        self.blocks = list(blocks)
        self.L = len(self.blocks)
        self.E = self.blocks[0].num_experts
        self.H = int(hidden_size)
        self.top_k = self.blocks[0].top_k
        self.ka = int(premoe_ka or self.top_k)
        if not 1 <= self.ka <= self.E:
            raise ValueError(f"premoe_ka must be in 1..{self.E}, got {self.ka}")
        self.device = torch.device(device)
        self.lengths = [int(n) for n in lengths]
        self.S = len(self.lengths)
        self.T = sum(self.lengths)
        self.per_sample = per_sample
        dev, f64 = self.device, torch.float64
        self.offsets = torch.tensor([0, *self.lengths], dtype=torch.long).cumsum(0)[:-1].to(dev)
        # one [len(SUM_NAMES), L, E] block, so that the per-pair sums of a layer are added at once
        self._sum_stack = torch.zeros(len(SUM_NAMES), self.L, self.E, dtype=f64, device=dev)
        self.sums = {name: self._sum_stack[j] for j, name in enumerate(SUM_NAMES)}
        self._pair_rows = torch.tensor([SUM_NAMES.index(n) for n in PAIR_SUMS], device=dev)
        self.layer_tokens = torch.zeros(self.L, dtype=f64, device=dev)
        self.mean = torch.zeros(self.L, self.E, self.H, dtype=f64, device=dev)
        self.m2 = torch.zeros(self.L, self.E, self.H, dtype=f64, device=dev)
        # the least-squares novice's numerator Σ g² e (its denominator is sums["gate_sq"] = Σ g²):
        # a plain sum, so batches and ranks just add
        self.lsq_num = torch.zeros(self.L, self.E, self.H, dtype=f64, device=dev)
        # PreMoe: per layer, histograms over q of (Σ f, Σ q f, entries) per expert and Σ_t max q;
        # per record, the exact PEU at the first MoE layer (each record is whole in one batch);
        # the per-token entries only when asked for (they grow with the data)
        self.edges = premoe_edges(self.ka, int(premoe_bins)).to(dev)
        self.hist = torch.zeros(self.L, 3, self.E * self.edges.numel(), dtype=f64, device=dev)
        self.qmax = torch.zeros(self.L, dtype=f64, device=dev)
        self.sample_premoe = torch.zeros(self.S, self.E, dtype=f64, device=dev)
        self.exact = premoe_exact
        if premoe_exact:
            self.premoe_q = torch.zeros(self.L, self.T, self.ka, dtype=torch.float32, device=dev)
            self.premoe_f = torch.zeros(self.L, self.T, self.ka, dtype=torch.float32, device=dev)
            self.premoe_idx = torch.zeros(self.L, self.T, self.ka, dtype=torch.int32, device=dev)
        # per layer: did a statistic become NaN/Inf (checked once per batch, without a sync per layer)
        self._bad = torch.zeros(self.L, dtype=torch.bool, device=dev)
        # [L, S, E] inside (one contiguous block per layer); [S, L, E] in the profile
        self.sample_gate = torch.zeros(self.L, self.S, self.E, dtype=f64, device=dev) if per_sample else None
        self._sel: torch.Tensor | None = None
        self._mask = torch.ones(0, dtype=torch.bool)
        self._pos: torch.Tensor | None = None
        self._rows: torch.Tensor | None = None
        self._local: torch.Tensor | None = None  # each real token's row in the batch
        self._rec_len: torch.Tensor | None = None  # each batch row's record length
        self._reduced = False
        self._pending: list[_Pending] = []  # layers of the current batch waiting for _flush
        self._pending_bytes = 0

    def _use_loop(self, rows: torch.Tensor) -> bool:
        if self.moments_by_loop is not None:
            return self.moments_by_loop
        # the loop pays off on CPU once the rows no longer fit in cache (> 8 MB of float32)
        return self.device.type == "cpu" and rows.numel() > (1 << 21)

    # --- feeding ----------------------------------------------------------------------------

    def set_batch(
        self, record_ids: Sequence[int], attention_mask: torch.Tensor | None, seq_len: int | None = None
    ) -> None:
        """Declare the batch the next events belong to: which records its rows are and which of its
        flattened tokens are real (``attention_mask`` [B, S]; left or right padding)."""
        self.check_finite()
        rec = torch.as_tensor(list(record_ids), dtype=torch.long, device=self.device)
        if attention_mask is None:
            if seq_len is None:
                raise ValueError("give attention_mask or seq_len")
            mask = torch.ones(len(rec), seq_len, dtype=torch.bool, device=self.device)
        else:
            mask = attention_mask.to(self.device).bool()
        within = mask.long().cumsum(1) - 1  # position of each real token inside its record
        flat_mask = mask.reshape(-1)
        pos = (self.offsets[rec].unsqueeze(1) + within).reshape(-1)
        rows = rec.unsqueeze(1).expand_as(mask).reshape(-1)
        local = torch.arange(len(rec), device=self.device).unsqueeze(1).expand_as(mask).reshape(-1)
        self._mask = flat_mask
        if bool(flat_mask.all()):
            self._sel = None
            self._pos, self._rows, self._local = pos, rows, local
        else:
            sel = flat_mask.nonzero().squeeze(1)
            self._sel, self._pos, self._rows, self._local = sel, pos[sel], rows[sel], local[sel]
        n = [self.lengths[int(r)] for r in rec.tolist()]
        if mask.sum(1).tolist() != n:
            raise ValueError("attention mask does not match the declared record lengths")
        self._rec_len = torch.tensor(n, dtype=torch.float64, device=self.device)

    def observe(self, event: BlockEvent) -> None:
        """Add one block's event (for the batch declared by :meth:`set_batch`).

        Only what must read the [P, H] expert outputs runs here (the per-expert moments, the
        norms and EASY-EP's token factor); the routing, PreMoe and per-pair statistics of the
        layer wait, as small per-token tensors, for :meth:`_flush`, which computes those of every
        waiting layer of the batch in one set of kernels (a fixed cost per batch instead of per
        layer: on small models these kernels cost as much as the experts)."""
        if self._pos is None:
            raise RuntimeError("Accumulator.set_batch must be called before observe")
        if event.residual is None:
            raise RuntimeError(
                f"block {event.block.path}: the residual stream h_t is unknown (no pre-norm); "
                "EASY-EP's token factor cannot be computed"
            )
        li = event.block.index
        if any(p.li == li for p in self._pending):  # a layer seen twice in one batch: keep them apart
            self._flush()
        dev, E, H = self.device, self.E, self.H
        logits = event.logits.reshape(-1, event.logits.shape[-1]).to(dev)
        idx_all = event.top_k_index.to(dev)
        g_all = event.top_k_weights.to(dev).float()
        h = event.residual.to(dev)
        sel = self._sel
        # per-token tensors are cheap to select; the [T, k, H] outputs are never copied whole
        idx, g = (idx_all, g_all) if sel is None else (idx_all[sel], g_all[sel])
        if sel is not None:
            logits = logits[sel]
        t, k = idx.shape
        if t != self._pos.numel():
            raise ValueError(f"event has {t} real tokens, the declared batch {self._pos.numel()}")
        # Longcat's zero-expert and ZAYA's skip slots (index -1, weight 0: arch/extended.py) are no
        # selection of a prunable expert: counted nowhere. `key` is each (token, expert) pair's
        # expert, or E for such a slot or a padding pair (accumulated into a spare slot and dropped).
        zero_slots = event.block.spec.selects_extra
        key = idx_all.reshape(-1).long()
        if zero_slots:
            key = key.masked_fill(key < 0, E)
        if sel is not None:
            key = key.masked_fill(~self._mask.repeat_interleave(k), E)

        # Output-aware statistics. The outputs come grouped by expert (as the experts computed
        # them), stay in the model's dtype and are read once, expert by expert or in a few large
        # kernels (_moments_*), into float32 sums of this batch; only those [E, H] sums are added in
        # float64 (at the flush). The MoNE mean/M2 are two-pass and centred within the batch;
        # batches are combined in float64 with Chan's update.
        slots = event.slot_outputs
        rows, perm = slots.rows.to(dev), slots.perm
        if perm is None:  # outputs in pair order: group them by expert once
            perm = torch.argsort(key, stable=True)
            rows = rows.index_select(0, perm)
            row_expert = key[perm]
        else:
            perm = perm.to(dev)
            row_expert = slots.sorted_ids.to(dev).long()
        row_key = key[perm]  # E: padding / no expert
        segments = row_expert.masked_fill((row_expert < 0) | (row_expert >= E), E).bincount(minlength=E + 1)[:E]
        g_rows = g_all.reshape(-1)[perm]
        row_token = torch.div(perm, k, rounding_mode="floor")
        moments = _moments_by_loop if self._use_loop(rows) else _moments_vectorized
        own_sum = event.routed is not None
        norms, mean_b, m2_b, lsq_b, routed = moments(
            rows, row_key, segments, g_rows, None if own_sum else row_token, self._mask.numel()
        )
        if own_sum:
            routed = event.routed.to(dev).reshape(-1, H)
        # EASY-EP token factor: max(0, 1 - cos(h, h~)) with h~ = h + sum_k g e (routed experts)
        if sel is not None:
            h, routed = h[sel], routed[sel]
        factor = easyep_factor(h, routed)
        if sel is not None:
            factor = torch.zeros(self._mask.numel(), dtype=factor.dtype, device=dev).index_copy_(0, sel, factor)
        pending = _Pending(
            li=li,
            score_fn=event.block.spec.score_fn,
            logits=logits.float(),
            idx=idx if self.sample_gate is not None else None,
            g=g if self.sample_gate is not None else None,
            zero_slots=bool(zero_slots),
            row_key=row_key,
            g_rows=g_rows,
            norms=norms,
            factor=factor[row_token],
            mean=mean_b,
            m2=m2_b,
            lsq=lsq_b,
        )
        self._pending.append(pending)
        self._pending_bytes += pending.nbytes()
        if self._pending_bytes > PENDING_MAX_BYTES:
            self._flush()

    def _flush(self) -> None:
        """The routing, PreMoe and per-pair statistics, and the float64 update of the moments, of
        every waiting layer of the current batch, in one set of kernels over stacked tensors."""
        if not self._pending:
            return
        pending, self._pending, self._pending_bytes = self._pending, [], 0
        dev, E, f64 = self.device, self.E, torch.float64
        lis = torch.tensor([p.li for p in pending], dtype=torch.long, device=dev)
        n_l = len(pending)
        t = pending[0].logits.shape[0]
        self.layer_tokens.index_add_(0, lis, torch.full((n_l,), float(t), dtype=f64, device=dev))
        bad = torch.zeros(n_l, dtype=f64, device=dev)  # per waiting layer: the sum of its increments

        # routing statistics, per group of layers sharing a score function and router width
        groups: dict[tuple[str, int], list[int]] = {}
        for j, p in enumerate(pending):
            groups.setdefault((p.score_fn, p.logits.shape[-1]), []).append(j)
        for (fn, _), members in groups.items():
            where = torch.tensor(members, dtype=torch.long, device=dev)
            layers = lis[where]
            s = torch.stack([pending[j].logits for j in members])  # [n, t, columns]
            probs = scores(fn, s)
            # over all router columns, then the E prunable ones (Longcat zero / Inkling shared columns last)
            s, probs = s[..., :E], probs[..., :E]
            prob_b = probs.sum(1, dtype=f64)  # [n, E]
            self.sums["prob"].index_add_(0, layers, prob_b)
            q, f, ids = premoe_token_entries(s, self.ka)  # sorted descending: column 0 is the argmax
            self._premoe(layers, q, f, ids, s)
            bad.index_add_(0, where, prob_b.sum(1) + q.sum((1, 2), dtype=f64) + f.sum((1, 2), dtype=f64))

        if self.sample_gate is not None:
            assert self._rows is not None
            S = self.S
            cells, gates = [], []
            for p in pending:
                assert p.idx is not None and p.g is not None
                k = p.idx.shape[1]
                flat = p.idx.reshape(-1).long()
                g64 = p.g.double().reshape(-1)
                if p.zero_slots:  # their ids are parked on expert 0 with a weight of 0
                    real = flat >= 0
                    flat, g64 = flat.clamp(min=0), torch.where(real, g64, 0.0)
                cells.append((p.li * S + self._rows.repeat_interleave(k)) * E + flat)
                gates.append(g64)
            self.sample_gate.view(-1).index_add_(0, torch.cat(cells), torch.cat(gates))

        # the per-pair sums (count, gate, gate², g‖e‖, g‖e‖·factor) of all layers in one float64
        # index_add_, in the order the norms come in
        g64 = torch.cat([p.g_rows for p in pending]).double()
        gn = g64 * torch.cat([p.norms for p in pending]).double()  # g ||e|| per pair
        factor = torch.cat([p.factor for p in pending]).double()
        vals = torch.stack([torch.ones_like(g64), g64, g64.square(), gn, gn * factor])
        cell = torch.cat([p.row_key + j * (E + 1) for j, p in enumerate(pending)])
        pair = torch.zeros(len(PAIR_SUMS), n_l * (E + 1), dtype=f64, device=dev).index_add_(1, cell, vals)
        pair = pair.view(len(PAIR_SUMS), n_l, E + 1)
        bad += pair.sum((0, 2))  # every value of vals is in there (padding pairs in the spare column)
        pair = pair[:, :, :E]
        self._sum_stack[self._pair_rows.unsqueeze(1), lis.unsqueeze(0)] += pair
        mean_b = torch.stack([p.mean for p in pending])
        m2_b = torch.stack([p.m2 for p in pending])
        lsq_b = torch.stack([p.lsq for p in pending])
        self.lsq_num.index_add_(0, lis, lsq_b.double())
        nb = pair[0]
        n_a = self.sums["count"][lis] - nb
        _, mean, m2 = chan_merge(n_a, self.mean[lis], self.m2[lis], nb, mean_b.double(), m2_b.double())
        self.mean[lis], self.m2[lis] = mean, m2
        for x in (mean_b, m2_b, lsq_b):
            bad += x.sum((1, 2), dtype=f64)
        # a statistic becomes NaN/Inf only through a non-finite increment: one float64 sum of each
        # (finite float32 values cannot overflow it), no device sync here
        self._bad[lis] |= ~torch.isfinite(bad)

    def _premoe(self, layers: torch.Tensor, q: torch.Tensor, f: torch.Tensor, ids: torch.Tensor, s: torch.Tensor) -> None:
        """PreMoe's statistics of the real tokens of ``layers`` [n]: entries q, f, ids [n, t, Ka]
        of the logits ``s`` [n, t, E]."""
        f64 = torch.float64
        n, t, ka = q.shape
        E, B = self.E, self.edges.numel()
        q64, f64v = q.double(), f.double()
        self.qmax.index_add_(0, layers, q64[..., 0].sum(1))
        v1 = torch.gather(s, -1, ids[..., :1])[..., 0].double()  # [n, t]: the top logit
        self.sums["premoe_v1"].view(-1).index_add_(0, (ids[..., 0] + (layers * E).unsqueeze(1)).reshape(-1), v1.reshape(-1))
        # hist [L, 3, E·B]: the three histograms of layer l at l·3·E·B + j·E·B + cell
        cell = ids * B + premoe_bins_of(q, self.edges, self.ka) + (layers * (3 * E * B)).view(n, 1, 1)
        cell = cell.reshape(-1)
        where = torch.cat([cell, cell + E * B, cell + 2 * E * B])
        vals = torch.cat([f64v.reshape(-1), (q64 * f64v).reshape(-1), torch.ones(n * t * ka, dtype=f64, device=q.device)])
        self.hist.view(-1).index_add_(0, where, vals)
        first = (layers == 0).nonzero().flatten().tolist()
        if first:
            # each record's PEU at the first MoE layer with its own r (the library's record keys):
            # every record lies whole in this batch, so its r is known here
            assert self._local is not None and self._rec_len is not None and self._rows is not None
            j = first[0]
            r_sum = torch.zeros(self._rec_len.numel(), dtype=f64, device=q.device)
            r_sum.index_add_(0, self._local, q64[j, :, 0])
            r = (r_sum / self._rec_len.clamp(min=1))[self._local]
            contrib = torch.where(q64[j] >= r.unsqueeze(1), f64v[j], torch.zeros((), dtype=f64, device=q.device))
            where0 = self._rows.unsqueeze(1) * self.E + ids[j]
            self.sample_premoe.view(-1).index_add_(0, where0.reshape(-1), contrib.reshape(-1))
        if self.exact:
            pos = self._pos
            assert pos is not None
            self.premoe_q[layers.unsqueeze(1), pos.unsqueeze(0)] = q
            self.premoe_f[layers.unsqueeze(1), pos.unsqueeze(0)] = f
            self.premoe_idx[layers.unsqueeze(1), pos.unsqueeze(0)] = ids.int()

    def _layer_stats(self, li: int) -> list[tuple[str, torch.Tensor]]:
        """(name, [E, ...] tensor) of every accumulated statistic of layer ``li``."""
        B = self.edges.numel()
        out = [(name, self.sums[name][li]) for name in SUM_NAMES]
        out += [("mone_mean", self.mean[li]), ("mone_m2", self.m2[li]), ("novice_lsq", self.lsq_num[li])]
        out += [(name, self.hist[li, j].view(self.E, B)) for j, name in enumerate(("premoe_hist_f", "premoe_hist_qf"))]
        if li == 0:
            out.append(("sample_premoe", self.sample_premoe.t()))
        return out

    def check_finite(self) -> None:
        """Stop with one line naming the layer, statistic and expert when a statistic became NaN
        or infinite (NaN/Inf router logits, expert outputs or hidden states: the model is broken)."""
        self._flush()
        if not bool(self._bad.any()):
            return
        li = int(self._bad.nonzero()[0])
        block = self.blocks[li]
        for name, t in self._layer_stats(li):
            rows = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(-1).nonzero()
            if rows.numel():
                where = "a sample" if name == "sample_premoe" else f"expert {int(rows[0])}"
                raise UserError(
                    f"MoE layer {block.layer} ({block.path}): the statistic '{name}' of {where} became "
                    "NaN or infinite during calibration (non-finite router logits, expert outputs or "
                    "hidden states)",
                    "check the model's weights for NaN/Inf; if it is half precision, try --dtype float32",
                )
        raise UserError(
            f"MoE layer {block.layer} ({block.path}): a calibration statistic became NaN or infinite",
            "check the model's weights for NaN/Inf; if it is half precision, try --dtype float32",
        )

    # --- finishing ----------------------------------------------------------------------------

    def reduce(self) -> None:
        """Combine the ranks' partial results (no-op on one process). Call once, on every rank."""
        info = dist_info()
        self.check_finite()
        if self._reduced or not info.active:
            self._reduced = True
            return
        dist = torch.distributed
        local_n = self.sums["count"].clone()
        for name in SUM_NAMES:
            dist.all_reduce(self.sums[name])
        n_r = self.sums["count"]  # global counts now
        # exact combination of per-rank (n, mean, M2): global mean, then M2 + n (m_r - mean)^2
        weighted = self.mean * local_n.unsqueeze(-1)
        dist.all_reduce(weighted)
        mean = weighted / n_r.clamp(min=1).unsqueeze(-1)
        m2 = self.m2 + local_n.unsqueeze(-1) * (self.mean - mean).square()
        dist.all_reduce(m2)
        self.mean, self.m2 = mean, m2
        dist.all_reduce(self.lsq_num)
        dist.all_reduce(self.layer_tokens)
        dist.all_reduce(self.hist)
        dist.all_reduce(self.qmax)
        # per-token / per-sample rows: every position is written by exactly one rank, zeros elsewhere
        dist.all_reduce(self.sample_premoe)
        if self.exact:
            for t in (self.premoe_q, self.premoe_f, self.premoe_idx):
                dist.all_reduce(t)
        if self.sample_gate is not None:
            dist.all_reduce(self.sample_gate)
        self._reduced = True

    def tensors(self) -> dict[str, torch.Tensor]:
        """The profile tensors (CPU, dtypes of docs/profile-format.md). Call after :meth:`reduce`."""
        self.check_finite()
        seen = self.layer_tokens.tolist()
        if any(int(n) != self.T for n in seen):
            raise RuntimeError(f"MoE layers saw {seen} tokens, expected {self.T} each")
        out = {"tokens": torch.tensor([float(self.T)], dtype=torch.float64)}
        for name in SUM_NAMES:
            out[name] = self.sums[name].cpu()
        B = self.edges.numel()
        hist = self.hist.view(self.L, 3, self.E, B).cpu()
        for j, name in enumerate(PREMOE_HIST):
            out[name] = hist[:, j].contiguous()
        out["premoe_edges"] = self.edges.cpu()
        out["premoe_qmax"] = self.qmax.cpu()
        out["premoe_ka"] = torch.tensor([self.ka], dtype=torch.int64)
        out["sample_premoe"] = self.sample_premoe.cpu()
        if self.exact:
            out["premoe_q"] = self.premoe_q.cpu()
            out["premoe_f"] = self.premoe_f.cpu()
            out["premoe_idx"] = self.premoe_idx.cpu()
        out["sample_tokens"] = torch.tensor(self.lengths, dtype=torch.int64)
        empty = (self.sums["count"] == 0).unsqueeze(-1)
        out["mone_mean"] = self.mean.masked_fill(empty, 0.0).float().cpu()
        out["mone_m2"] = self.m2.masked_fill(empty, 0.0).float().cpu()
        out["novice_lsq"] = lsq_novices(self.lsq_num, self.sums["gate_sq"]).float().cpu()
        if self.sample_gate is not None:
            out["sample_gate"] = self.sample_gate.transpose(0, 1).float().contiguous().cpu()
        return out


# --- progress -----------------------------------------------------------------------------------


class _Progress:
    """A rich progress bar on stderr counting tokens (rank 0 only), or nothing."""

    def __init__(self, enabled: bool, label: str, total: int, unit: str = "tok") -> None:
        self.bar: Any = None
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Rate(ProgressColumn):
            def render(self, task) -> Text:
                speed = task.finished_speed or task.speed
                return Text(f"{speed:,.0f} {unit}/s" if speed else f"? {unit}/s")

        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} " + unit),
            Rate(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def advance(self, n: int) -> None:
        if self.bar is not None:
            self.bar.advance(self.task, n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# --- the whole-model driver --------------------------------------------------------------------


def _forward_kwargs(model: torch.nn.Module) -> dict[str, Any]:
    import inspect

    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # the LM head on one position only: calibration needs no logits
    return kwargs


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_profilable(config: Any, blocks: Sequence[MoEBlock]) -> None:
    """Refuse, before any work, MoE layers a profile cannot describe (Inkling2-Loop's looped layers)."""
    from .arch.variants import profile_problem

    why = profile_problem(config, [b.layer for b in blocks])
    if why is not None:
        raise UserError(f"cannot profile this model: {why}", "see docs/architectures.md")


@torch.no_grad()
def calibrate(
    model: torch.nn.Module,
    seqs: Sequence[Sequence[int]],
    *,
    blocks: Sequence[MoEBlock] | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    premoe_ka: int | None = None,
    per_sample: bool = False,
    progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
    premoe_exact: bool = False,
) -> dict[str, torch.Tensor]:
    """Run the model over every sequence (one record each, right-padded batches) and return the
    profile tensors (``premoe_exact``: with PreMoe's per-token entries, which grow with the data).
    Under torch.distributed, each rank takes records rank, rank+world, ... and all ranks return the
    combined tensors."""
    from .arch import find_moe_blocks, patch_moe
    from .data import batches
    from .load import aux_loss_off

    blocks = list(blocks) if blocks is not None else find_moe_blocks(model)
    check_profilable(model.config, blocks)
    device = _model_device(model)
    hidden = int(model.config.get_text_config().hidden_size)
    acc = Accumulator(
        blocks, hidden, [len(s) for s in seqs], premoe_ka, per_sample, device, premoe_exact=premoe_exact
    )
    info = dist_info()
    mine = list(range(info.rank, len(seqs), info.world))
    kwargs = _forward_kwargs(model)
    bar = _Progress(progress and info.rank == 0, "calibrating", sum(len(seqs[i]) for i in mine))
    try:
        with aux_loss_off(model), patch_moe(model, blocks, observer=acc.observe, observer_keeps_rows=False) as session:
            for batch in batches(seqs, batch_size, pad_id, order=mine):
                ids = batch.input_ids.to(device)
                mask = batch.attention_mask.to(device)
                session.token_mask = mask.reshape(-1).bool()
                acc.set_batch(batch.indices, mask)
                model(input_ids=ids, attention_mask=mask, **kwargs)
                bar.advance(batch.tokens)
                if on_batch is not None:
                    on_batch(batch.tokens)
    finally:
        bar.close()
    acc.reduce()
    return acc.tensors()


# --- self-generated demonstrations ----------------------------------------------------------------


def eos_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids: list[int] = []
    for src in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
    ):
        for v in src if isinstance(src, (list, tuple)) else [src]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


@torch.no_grad()
def self_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    progress: bool = False,
) -> list[list[int]]:
    """The model's own greedy answer to every prompt (left-padded batches, stopping at EOS; the EOS
    itself is not returned). Distributed: each rank generates its share, all ranks get all."""
    from transformers import GenerationConfig

    from .data import batches
    from .load import aux_loss_off

    info = dist_info()
    mine = list(range(info.rank, len(prompts), info.world))
    eos = eos_token_ids(model, tokenizer)
    device = _model_device(model)
    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos or None,
    )
    out: dict[int, list[int]] = {}
    bar = _Progress(progress and info.rank == 0, "generating", len(mine), unit="prompts")
    try:
        for batch in batches(prompts, batch_size, pad_id, order=mine, left=True):
            ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            with aux_loss_off(model):
                gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
            new = gen[:, ids.shape[1] :].tolist()
            for row, i in enumerate(batch.indices):
                toks = new[row]
                for j, tok in enumerate(toks):
                    if tok in eos:
                        toks = toks[:j]
                        break
                out[i] = toks
            bar.advance(len(batch.indices))
    finally:
        bar.close()
    if info.active:
        gathered: list[Any] = [None] * info.world
        torch.distributed.all_gather_object(gathered, out)
        for part in gathered:
            out.update(part)
    return [out[i] for i in range(len(prompts))]


# Per-sample gate sums ([S, L, E], for few-shot stability in `moeprune report`) are stored by
# default while they stay this small (float64 while accumulating): a few hundred demonstrations
# of a 58-layer, 256-expert model, tens of thousands of a small one.
PER_SAMPLE_MAX_BYTES = 64 * 2**20


def per_sample_bytes(samples: int, layers: int, experts: int) -> int:
    """Memory of the per-sample gate sums while accumulating (float64; half of it on disk)."""
    return samples * layers * experts * 8


def wants_per_sample(per_sample: bool | None, samples: int, layers: int, experts: int) -> tuple[bool, str | None]:
    """Whether to store per-sample gate sums: ``per_sample`` when given, else while they stay
    within :data:`PER_SAMPLE_MAX_BYTES`; and a note when the default left them out."""
    if per_sample is not None:
        return per_sample, None
    size = per_sample_bytes(samples, layers, experts)
    if size <= PER_SAMPLE_MAX_BYTES:
        return True, None
    return False, (
        f"per-sample gate sums left out: {samples} samples x {layers} layers x {experts} experts would take "
        f"{size / 2**20:.0f} MiB (default limit {PER_SAMPLE_MAX_BYTES / 2**20:.0f} MiB); `moeprune report` "
        "shows no few-shot stability without them (pass --per-sample to store them anyway)"
    )
