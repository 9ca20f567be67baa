"""The naive float64 profile reference shared by the profile tests: every statistic of
docs/profile-format.md from per-token tensors, one record at a time (no padding at all), using the
model's own modules, and the comparison of two sets of profile tensors.

How a block routes is the one thing that differs between architectures; a reader says it (which
module inputs / outputs to capture, and what routing they give: `Routing`). `standard_reader`
covers the architectures of tests/test_profile.py; tests/test_extended_routers.py (router columns
beyond the E experts) and tests/test_arch_zaya.py (a skip class) bring their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeprune.arch import find_moe_blocks, single_expert_forward


@dataclass
class Routing:
    """One MoE block's routing of one record's T tokens."""

    h: torch.Tensor  # [T, H] float64: the residual stream entering the block
    logits: torch.Tensor  # [T, >= E] router scores; PreMoe ranks the first E (routed) columns
    probs: torch.Tensor  # [T, >= E] routing probabilities over all columns; the profile keeps the first E
    index: torch.Tensor  # [T, k] chosen columns; one >= E (zero expert, skip) is no prunable expert
    weights: torch.Tensor  # [T, k]
    # (token, expert, weight) -> the expert's output e in float64: the block adds weight * e
    expert: Callable[[int, int, float], torch.Tensor]


# what a reader captures in a forward: name -> (module path, "in" (first argument) or "out" (first output))
Watch = Callable[[object], dict[str, tuple[str, str]]]
Read = Callable[[object, object, dict[str, torch.Tensor]], Routing]


@torch.no_grad()
def naive_profile(
    model, seqs: list[list[int]], ka: int, watch: Watch, read: Read
) -> tuple[dict[str, torch.Tensor], int]:
    """The profile tensors and the number of selections of no prunable expert (index >= E)."""
    blocks = find_moe_blocks(model)
    L, E = len(blocks), blocks[0].num_experts
    H = model.config.get_text_config().hidden_size
    cap: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for b in blocks:
        for name, (path, side) in watch(b).items():
            module = model.get_submodule(path)
            if side == "in":

                def grab_in(_m, args, _k=(name, b.index)):
                    cap[_k] = args[0].reshape(-1, args[0].shape[-1])

                handles.append(module.register_forward_pre_hook(grab_in))
            else:

                def grab_out(_m, _a, out, _k=(name, b.index)):
                    cap[_k] = out[0]

                handles.append(module.register_forward_hook(grab_out))
    f64 = torch.float64
    names = ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1", "gate_sq")
    out = {n: torch.zeros(L, E, dtype=f64) for n in names}
    lsq_num = torch.zeros(L, E, H, dtype=f64)  # Σ g² e: the least-squares novice's numerator
    per_expert: list[list[list[torch.Tensor]]] = [[[] for _ in range(E)] for _ in range(L)]
    rows: dict[str, list[list[torch.Tensor]]] = {n: [[] for _ in range(L)] for n in ("q", "f", "i")}
    sample_gate = torch.zeros(len(seqs), L, E, dtype=f64)
    skipped = 0
    try:
        for s_idx, seq in enumerate(seqs):
            model(input_ids=torch.tensor([seq]), use_cache=False)
            for b in blocks:
                li = b.index
                r = read(model, b, {k[0]: v for k, v in cap.items() if k[1] == li})
                h = r.h
                for t in range(h.shape[0]):
                    h_new, contrib = h[t].clone(), []
                    for j in range(r.index.shape[1]):
                        i = int(r.index[t, j])
                        if i >= E:  # a zero expert or the skip class: no prunable expert
                            skipped += 1
                            continue
                        g = float(r.weights[t, j])
                        e = r.expert(t, i, g)
                        h_new += g * e
                        contrib.append((i, g, e))
                    cos = float((h[t] @ h_new) / (h[t].norm() * h_new.norm()))
                    for i, g, e in contrib:
                        out["count"][li, i] += 1
                        out["gate"][li, i] += g
                        out["gate_sq"][li, i] += g * g
                        lsq_num[li, i] += g * g * e
                        out["reap_sum"][li, i] += g * e.norm()
                        out["easyep"][li, i] += g * e.norm() * max(0.0, 1.0 - cos)
                        per_expert[li][i].append(e)
                        sample_gate[s_idx, li, i] += g
                    s = r.logits[t, :E].double()
                    out["prob"][li] += r.probs[t, :E].double()
                    am = int(s.argmax())
                    out["premoe_v1"][li, am] += s[am]
                    vals, ids = torch.topk(s, ka)
                    rows["q"][li].append(torch.softmax(vals, -1))
                    rows["f"][li].append(torch.maximum(vals, torch.sigmoid(vals)))
                    rows["i"][li].append(ids)
    finally:
        for hd in handles:
            hd.remove()
    mean, m2 = torch.zeros(L, E, H, dtype=f64), torch.zeros(L, E, H, dtype=f64)
    for li in range(L):
        for i in range(E):
            if per_expert[li][i]:
                stack = torch.stack(per_expert[li][i])
                mean[li, i], m2[li, i] = stack.mean(0), (stack - stack.mean(0)).square().sum(0)
    out["mone_mean"], out["mone_m2"] = mean, m2
    gsq = out["gate_sq"].unsqueeze(-1)
    out["novice_lsq"] = torch.where(gsq > 0, lsq_num / gsq.clamp(min=1e-300), torch.zeros_like(lsq_num))
    q, f, idx = (torch.stack([torch.stack(r) for r in rows[n]]) for n in ("q", "f", "i"))
    out["premoe_q"], out["premoe_f"], out["premoe_idx"] = q, f, idx
    out["sample_gate"] = sample_gate
    out["tokens"] = torch.tensor([float(sum(len(s) for s in seqs))], dtype=f64)
    out["sample_tokens"] = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    out.update(naive_premoe_bounded(q, f, idx, [len(s) for s in seqs], E))
    return out, skipped


def standard_watch(b) -> dict[str, tuple[str, str]]:
    # no single norm before the block (hyper-connections): the block input is the residual
    return {"x": (b.path, "in"), "h": (b.prenorm_path or b.path, "in")}


def standard_read(model, b, cap: dict[str, torch.Tensor]) -> Routing:
    """The router called on the block input; Llama-4 gates the experts' input, Muse-Spark runs its
    experts in a projected space."""
    x, E = cap["x"], b.num_experts
    routed = b.router(model)(x)  # (logits, weights, index), or DBRX's logits alone
    input_gate = b.spec.gate_site == "input"  # Llama-4 returns (scores, logits)
    logits = (routed if isinstance(routed, torch.Tensor) else routed[int(input_gate)]).reshape(-1, E)
    r = b.route(model, logits)
    experts = b.experts(model)
    proj = None
    if b.expert_out_proj_path is not None:  # Muse-Spark: experts in a projected space
        block = b.block(model)
        x = block.pre_expert_norm(block.pre_expert_proj(x))
        proj = model.get_submodule(b.expert_out_proj_path)

    def expert(t: int, i: int, g: float) -> torch.Tensor:
        if input_gate:  # e = E(g x) / g: g * e is what the expert adds (docs/methods.md)
            return single_expert_forward(experts, i, g * x[t : t + 1])[0].double() / g
        if proj is not None:  # each output as the block maps it to the residual stream
            return proj(single_expert_forward(experts, i, x[t : t + 1]))[0].double()
        return single_expert_forward(experts, i, x[t : t + 1])[0].double()

    return Routing(cap["h"].double(), logits, r.probs, r.top_k_index, r.top_k_weights, expert)


def naive_stats(model, seqs: list[list[int]], ka: int) -> dict[str, torch.Tensor]:
    """The reference for the architectures whose router has exactly E columns."""
    out, skipped = naive_profile(model, seqs, ka, standard_watch, standard_read)
    assert skipped == 0, skipped
    return out


def naive_premoe_bounded(q, f, idx, lengths: list[int], E: int) -> dict[str, torch.Tensor]:
    """The bounded PreMoe statistics entry by entry: histograms over q per (layer, expert), Σ max q
    per layer, and each record's PEU sum at the first MoE layer with its own r."""
    from moeprune.score import premoe_edges

    L, T, ka = q.shape
    edges = premoe_edges(ka)
    B = len(edges)
    hist = torch.zeros(3, L, E, B, dtype=torch.float64)
    for li in range(L):
        for t in range(T):
            for j in range(ka):
                qv, fv, i = float(q[li, t, j]), float(f[li, t, j]), int(idx[li, t, j])
                b = max(k for k in range(B) if float(edges[k]) <= qv)
                hist[0, li, i, b] += fv
                hist[1, li, i, b] += qv * fv
                hist[2, li, i, b] += 1
    sample = torch.zeros(len(lengths), E, dtype=torch.float64)
    start = 0
    for s_idx, n in enumerate(lengths):
        r = sum(float(q[0, t, 0]) for t in range(start, start + n)) / max(n, 1)
        for t in range(start, start + n):
            for j in range(ka):
                if float(q[0, t, j]) >= r:
                    sample[s_idx, int(idx[0, t, j])] += float(f[0, t, j])
        start += n
    return {
        "premoe_hist_f": hist[0],
        "premoe_hist_qf": hist[1],
        "premoe_hist_n": hist[2],
        "premoe_edges": edges,
        "premoe_qmax": q[:, :, 0].double().sum(1),
        "premoe_ka": torch.tensor([ka]),
        "sample_premoe": sample,
    }


PER_TOKEN = ("premoe_q", "premoe_f", "premoe_idx")


def bounded(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors without PreMoe's per-token entries (what a default profile holds)."""
    return {k: v for k, v in t.items() if k not in PER_TOKEN}


def assert_same(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for name in a:
        x, y = a[name], b[name]
        assert x.shape == y.shape, (name, x.shape, y.shape)
        if name in ("count", "tokens", "premoe_idx", "premoe_hist_n", "premoe_ka"):
            assert torch.equal(x.long(), y.long()), name
        else:
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=name)
