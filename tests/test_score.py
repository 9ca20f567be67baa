"""Scores against naive float64 per-token references (shared/methods.md).

The test draws per-token calibration data (router logits, top-k choices, gates, expert outputs,
residual stream), builds the profile tensors from it the way docs/profile-format.md defines them,
and compares each score with its formula evaluated directly on the per-token data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from moeprune.errors import UserError
from moeprune.score import SCORES, TIE_BREAK, break_ties, combined_score, normalize_per_layer, score

L, E, K, H, KA = 3, 8, 2, 5, 4


@dataclass
class FakeProfile:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenData:
    logits: torch.Tensor  # [L, T, E]
    chosen: list[list[list[int]]]  # [L][T] -> expert ids
    gates: torch.Tensor  # [L, T, E], 0 where not chosen
    outputs: torch.Tensor  # [L, T, E, H] (only chosen entries matter)
    h: torch.Tensor  # [L, T, H]


def draw(n_tokens: int = 40, seed: int = 0, dead_expert: bool = True) -> TokenData:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(L, n_tokens, E, generator=gen, dtype=torch.float64) * 1.5
    if dead_expert:
        logits[:, :, E - 1] -= 50.0  # never chosen: exercises N_i = 0
        logits[0, :, E - 2] -= 50.0
        logits[0, 0, E - 2] += 100.0  # chosen exactly once in layer 0: exercises N_i = 1
    chosen: list[list[list[int]]] = []
    gates = torch.zeros(L, n_tokens, E, dtype=torch.float64)
    for layer in range(L):
        rows = []
        for t in range(n_tokens):
            p = torch.softmax(logits[layer, t], dim=0)
            ids = torch.topk(p, K).indices.tolist()
            g = p[ids] / p[ids].sum() * 1.3  # renormalised and scaled, as routers do
            for i, gi in zip(ids, g.tolist(), strict=True):
                gates[layer, t, i] = gi
            rows.append(ids)
        chosen.append(rows)
    outputs = torch.randn(L, n_tokens, E, H, generator=gen, dtype=torch.float64)
    h = torch.randn(L, n_tokens, H, generator=gen, dtype=torch.float64)
    return TokenData(logits, chosen, gates, outputs, h)


def f_of(s: float) -> float:
    return max(s, 1.0 / (1.0 + torch.exp(torch.tensor(-s, dtype=torch.float64)).item()))


def build_profile(d: TokenData, fingerprint: str = "abc") -> FakeProfile:
    """Profile tensors from per-token data, by simple loops (docs/profile-format.md)."""
    n_tokens = d.logits.shape[1]
    t = {
        name: torch.zeros(L, E, dtype=torch.float64)
        for name in ("count", "gate", "prob", "reap_sum", "easyep", "premoe_v1")
    }
    q_all = torch.zeros(L, n_tokens, KA, dtype=torch.float32)
    f_all = torch.zeros(L, n_tokens, KA, dtype=torch.float32)
    idx_all = torch.zeros(L, n_tokens, KA, dtype=torch.int32)
    mean = torch.zeros(L, E, H, dtype=torch.float64)
    m2 = torch.zeros(L, E, H, dtype=torch.float64)
    for layer in range(L):
        for tok in range(n_tokens):
            s = d.logits[layer, tok]
            ids = d.chosen[layer][tok]
            mixed = d.h[layer, tok].clone()
            for i in ids:
                mixed += d.gates[layer, tok, i] * d.outputs[layer, tok, i]
            cos = torch.nn.functional.cosine_similarity(d.h[layer, tok], mixed, dim=0).item()
            for i in ids:
                g = d.gates[layer, tok, i].item()
                norm = d.outputs[layer, tok, i].norm().item()
                t["count"][layer, i] += 1
                t["gate"][layer, i] += g
                t["reap_sum"][layer, i] += g * norm
                t["easyep"][layer, i] += g * norm * max(0.0, 1.0 - cos)
                mean[layer, i] += d.outputs[layer, tok, i]
            t["prob"][layer] += torch.softmax(s, dim=0)
            j = int(s.argmax())
            t["premoe_v1"][layer, j] += s[j]
            top = torch.topk(s, KA)  # sorted descending
            q_all[layer, tok] = torch.softmax(top.values, dim=0).float()
            f_all[layer, tok] = torch.tensor([f_of(v) for v in top.values.tolist()])
            idx_all[layer, tok] = top.indices.int()
        for i in range(E):
            n = t["count"][layer, i].item()
            if n:
                mean[layer, i] /= n
        for tok in range(n_tokens):
            for i in d.chosen[layer][tok]:
                m2[layer, i] += (d.outputs[layer, tok, i] - mean[layer, i]) ** 2
    t["tokens"] = torch.tensor([float(n_tokens)], dtype=torch.float64)
    t["premoe_q"], t["premoe_f"], t["premoe_idx"] = q_all, f_all, idx_all
    t["mone_mean"], t["mone_m2"] = mean.float(), m2.float()
    meta = {
        "format": "moeprune-profile/1",
        "model_fingerprint": fingerprint,
        "layers": [1, 2, 3],
        "num_experts": E,
        "top_k": K,
        "hidden_size": H,
        "tokens": n_tokens,
    }
    return FakeProfile(t, meta)


# --- naive references, straight from the per-token data -----------------------------------------


def ref_token_sum(d: TokenData, term) -> torch.Tensor:
    out = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        for tok in range(d.logits.shape[1]):
            for i in d.chosen[layer][tok]:
                out[layer, i] += term(layer, tok, i)
    return out


def ref_count(d: TokenData) -> torch.Tensor:
    return ref_token_sum(d, lambda layer, tok, i: 1.0)


def ref_gate(d: TokenData) -> torch.Tensor:
    return ref_token_sum(d, lambda layer, tok, i: d.gates[layer, tok, i].item())


def ref_reap_sum(d: TokenData) -> torch.Tensor:
    return ref_token_sum(
        d, lambda layer, tok, i: d.gates[layer, tok, i].item() * d.outputs[layer, tok, i].norm().item()
    )


def ref_easyep(d: TokenData) -> torch.Tensor:
    def term(layer: int, tok: int, i: int) -> float:
        h = d.h[layer, tok]
        h_tilde = h + sum(d.gates[layer, tok, j] * d.outputs[layer, tok, j] for j in d.chosen[layer][tok])
        cos = (h @ h_tilde / (h.norm() * h_tilde.norm())).item()
        return d.gates[layer, tok, i].item() * d.outputs[layer, tok, i].norm().item() * max(0.0, 1 - cos)

    return ref_token_sum(d, term)


def ref_reap(d: TokenData) -> torch.Tensor:
    n = ref_count(d)
    s = ref_reap_sum(d)
    return torch.where(n > 0, s / n.clamp(min=1), torch.zeros_like(s))


def ref_premoe(d: TokenData, ka: int = KA, r: float | None = None) -> torch.Tensor:
    """PreMoe PEU from raw logits: A_t = top-K_a by logit, q = softmax over A_t only."""
    n_tokens = d.logits.shape[1]
    out = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        qs, cands = [], []
        for tok in range(n_tokens):
            s = d.logits[layer, tok]
            a = torch.topk(s, ka).indices.tolist()
            q = {i: v for i, v in zip(a, torch.softmax(s[a], dim=0).tolist(), strict=True)}
            qs.append(q)
            cands.append(a)
        r_l = sum(max(q.values()) for q in qs) / n_tokens if r is None else r
        for tok in range(n_tokens):
            for i in cands[tok]:
                if qs[tok][i] >= r_l:
                    out[layer, i] += f_of(d.logits[layer, tok, i].item())
    return out / n_tokens


def ref_premoe_v1(d: TokenData) -> torch.Tensor:
    n_tokens = d.logits.shape[1]
    out = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        for tok in range(n_tokens):
            s = d.logits[layer, tok]
            i = int(s.argmax())
            out[layer, i] += s[i].item()
    return out / n_tokens


def ref_mone_var(d: TokenData) -> torch.Tensor:
    out = torch.zeros(L, E, dtype=torch.float64)
    for layer in range(L):
        for i in range(E):
            xs = [d.outputs[layer, tok, i] for tok in range(d.logits.shape[1]) if i in d.chosen[layer][tok]]
            if len(xs) > 1:
                out[layer, i] = torch.stack(xs).std(dim=0, correction=1).norm()
    return out


def ref_mone(d: TokenData) -> torch.Tensor:
    n = ref_count(d)
    freq = torch.where(n > 0, ref_gate(d) / n.clamp(min=1), torch.zeros_like(n))
    return freq * ref_mone_var(d)


def ref_mone_code(d: TokenData) -> torch.Tensor:
    return ref_gate(d) / d.logits.shape[1] * ref_mone_var(d)


REFERENCES = {
    "frequency": ref_count,
    "gate": ref_gate,
    "easyep": ref_easyep,
    "easyep-no-token": ref_reap_sum,
    "reap": ref_reap,
    "premoe": ref_premoe,
    "premoe-v1": ref_premoe_v1,
    "mone": ref_mone,
    "mone-code": ref_mone_code,
}


@pytest.fixture(scope="module")
def data() -> TokenData:
    return draw()


@pytest.fixture(scope="module")
def profile(data: TokenData) -> FakeProfile:
    return build_profile(data)


def test_every_method_has_a_reference() -> None:
    assert set(SCORES) == set(REFERENCES) | {"random"}


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_score_matches_per_token_reference(method: str, data: TokenData, profile: FakeProfile) -> None:
    got = score(profile, method)
    assert got.dtype == torch.float64 and got.shape == (L, E)
    if method in TIE_BREAK:  # the method's own score, before its ties are broken (tested below)
        got = SCORES[method](profile).to(torch.float64)
    want = REFERENCES[method](data)
    # float32 profile tensors (premoe, mone) limit the precision
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_zero_count_experts_score_zero(profile: FakeProfile) -> None:
    for method in ("reap", "mone", "mone-code"):
        s = score(profile, method)
        assert (s[:, E - 1] == 0).all(), method
    # one token only: no variance
    assert score(profile, "mone")[0, E - 2] == 0


def test_premoe_lower_ka_and_fixed_r(data: TokenData, profile: FakeProfile) -> None:
    peu = SCORES["premoe"]  # before ties are broken
    for ka in (1, 2, 3):
        torch.testing.assert_close(peu(profile, ka=ka), ref_premoe(data, ka=ka), rtol=2e-5, atol=1e-6)
        # score() orders only PEU's exact ties (by EASY-EP), never its strict ranking
        want = ref_premoe(data, ka=ka)
        got = score(profile, "premoe", ka=ka)
        strict = want.unsqueeze(2) > want.unsqueeze(1) + 1e-9
        assert (got.unsqueeze(2) > got.unsqueeze(1))[strict].all()
    torch.testing.assert_close(peu(profile, r=0.3), ref_premoe(data, r=0.3), rtol=2e-5, atol=1e-6)
    # r = 0 keeps every candidate
    assert score(profile, "premoe", r=0.0).sum() > score(profile, "premoe").sum()
    with pytest.raises(UserError, match="K_a=5"):
        score(profile, "premoe", ka=KA + 1)


def test_random_is_seeded_per_layer(profile: FakeProfile) -> None:
    a, b = score(profile, "random", seed=1), score(profile, "random", seed=1)
    assert torch.equal(a, b) and a.dtype == torch.float64
    assert not torch.equal(a, score(profile, "random", seed=2))
    assert not torch.equal(a[0], a[1])
    assert ((a >= 0) & (a < 1)).all()


def test_bad_method_and_options(profile: FakeProfile) -> None:
    with pytest.raises(UserError) as err:
        score(profile, "nope")
    assert "easyep" in str(err.value) and "mone-code" in str(err.value)
    with pytest.raises(UserError, match="takes no option"):
        score(profile, "gate", seed=3)
    assert torch.equal(score(profile, "gate", seed=None), score(profile, "gate"))


def test_missing_and_misshapen_tensors(profile: FakeProfile) -> None:
    partial = FakeProfile({k: v for k, v in profile.tensors.items() if k != "easyep"}, dict(profile.meta))
    with pytest.raises(UserError, match="no 'easyep' tensor"):
        score(partial, "easyep")
    wrong = FakeProfile(dict(profile.tensors), {**profile.meta, "num_experts": E + 1})
    with pytest.raises(UserError, match="corrupted"):
        score(wrong, "gate")


def test_combined_score_normalises_and_averages() -> None:
    d1, d2 = draw(seed=1, dead_expert=False), draw(n_tokens=25, seed=2)
    p1, p2 = build_profile(d1), build_profile(d2)
    got = combined_score([p1, p2], "easyep")
    a, b = ref_easyep(d1), ref_easyep(d2)
    want = (a / a.sum(dim=1, keepdim=True) + b / b.sum(dim=1, keepdim=True)) / 2
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(L, dtype=torch.float64))
    with pytest.raises(UserError, match="different models"):
        combined_score([p1, build_profile(d2, fingerprint="other")], "easyep")


def test_normalize_guards_zero_layers() -> None:
    s = torch.tensor([[0.0, 0.0], [1.0, 3.0], [-1.0, 3.0]], dtype=torch.float64)
    n = normalize_per_layer(s)
    assert torch.equal(n[0], torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(n[1], torch.tensor([0.25, 0.75], dtype=torch.float64))
    assert n[2, 1] > n[2, 0]  # order kept even with negative scores


def test_premoe_scores_stay_on_the_entries_device() -> None:
    """A query's PreMoe entries come from the model's device (CUDA when serving): the scores are
    made there, not on the CPU (an H200 run of `generate --library` died on the mixed devices).
    The meta device stands in for a GPU: mixing it with the CPU fails the same way."""
    from moeprune.score import premoe_scores, premoe_token_entries

    logits = torch.randn(1, 7, 8, generator=torch.Generator().manual_seed(0))
    q, f, idx = premoe_token_entries(logits.reshape(7, 8), 2)
    ref = premoe_scores(q[None], f[None], idx[None], 8)
    for r in (None, 0.3):
        meta = premoe_scores(q[None].to("meta"), f[None].to("meta"), idx[None].to("meta"), 8, r=r)
        assert meta.device.type == "meta" and meta.shape == ref.shape


# --- ties: PreMoe's sparse PEU is completed by EASY-EP's score ------------------------------------


def test_break_ties_keeps_strict_order_and_orders_ties() -> None:
    primary = torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    secondary = torch.tensor([[1.0, 5.0, 0.0, 3.0, 2.0, 9.0, 4.0, 100.0]], dtype=torch.float64)
    out = break_ties(primary, secondary)
    order = sorted(range(8), key=lambda i: (-float(out[0, i]), i))
    # strict PEU order first (3 > 2 > 1 > 0), ties by the secondary score (descending)
    assert order == [2, 7, 5, 4, 1, 6, 3, 0]
    # a layer without ties is left exactly as it is
    distinct = torch.tensor([[0.5, 0.1, 0.3]], dtype=torch.float64)
    assert torch.equal(break_ties(distinct, torch.tensor([[9.0, 8.0, 7.0]])), distinct)


def _sparse_premoe(data: TokenData) -> FakeProfile:
    """A profile whose PEU is non-zero for experts 5 and 6 only: every token's top candidate is
    one of them with q = 1 (r_l = 1), the other candidates have q = 0."""
    prof = build_profile(data)
    q, idx = prof.tensors["premoe_q"].clone(), prof.tensors["premoe_idx"].clone()
    q[..., 0], q[..., 1:] = 1.0, 0.0
    n_tokens = q.shape[1]
    idx[..., 0] = torch.tensor([5 + t % 2 for t in range(n_tokens)], dtype=idx.dtype)
    idx[..., 1:] = torch.tensor([0, 1, 2], dtype=idx.dtype)  # zero q: never counted
    prof.tensors.update(premoe_q=q, premoe_idx=idx)
    return prof


def test_premoe_plan_completes_sparse_layers_by_easyep(data: TokenData) -> None:
    from moeprune.plan import plan_from_profile, sparse_warning
    from moeprune.score import nonzero_per_layer

    prof = _sparse_premoe(data)
    raw = SCORES["premoe"](prof)
    assert ((raw != 0).sum(dim=1) == 2).all()  # the collapse: 2 non-zero of 8 in every layer
    peu = score(prof, "premoe")
    easyep = score(prof, "easyep")
    keep = 4
    plan = plan_from_profile(
        peu, prof.meta, keep=keep, method="premoe", nonzero=nonzero_per_layer(prof, "premoe")
    )
    for row, layer in enumerate(plan.layers):
        rest = sorted(set(range(E)) - {5, 6}, key=lambda i, r=row: (-float(easyep[r, i]), i))
        want = sorted({5, 6, *rest[:2]})
        assert plan.kept[layer] == want
        # lowest id among the tied zeros would have kept 0 and 1 with 5 and 6
        assert want != [0, 1, 5, 6]
        # PEU's strict ranking is kept: the non-zero experts stay first, in PEU order
        top = sorted(range(E), key=lambda i, r=row: -float(peu[r, i]))[:2]
        assert sorted(top) == [5, 6]
        assert (float(peu[row, 5]) > float(peu[row, 6])) == (float(raw[row, 5]) > float(raw[row, 6]))
    assert plan.settings["sparse_layers"] == {str(layer): 2 for layer in plan.layers}
    warning = sparse_warning(plan)
    assert warning is not None and "2 of 4" in warning and "easyep" in warning
    # enough non-zero scores: no warning
    plain = plan_from_profile(peu, prof.meta, keep=2, method="premoe", nonzero=nonzero_per_layer(prof, "premoe"))
    assert "sparse_layers" not in plain.settings and sparse_warning(plain) is None


@pytest.mark.parametrize("ka", [1, 2, 3, 8, 13])
@pytest.mark.parametrize("bins", [1, 2, 7, 64, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_premoe_bins_of_equals_searchsorted(ka, bins, dtype):
    """The estimated-and-corrected bins are exactly searchsorted's, on random softmax values and on
    every edge, its neighbours either side, 0, 1, out-of-range values and NaN."""
    from moeprune.score import premoe_bins, premoe_bins_of, premoe_edges

    edges = premoe_edges(ka, bins)
    g = torch.Generator().manual_seed(ka * 1000 + bins)
    q = torch.softmax(torch.randn(200, ka, generator=g, dtype=torch.float64) * 4, -1).reshape(-1)
    up, down = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    special = torch.tensor([0.0, 1.0, 1.0 / ka, 0.5, 1 + 1e-12, -1e-12, 3.0, -2.0, float("nan")], dtype=torch.float64)
    q = torch.cat([q, edges, edges.nextafter(up), edges.nextafter(down), special]).to(dtype)
    if dtype == torch.float32:  # the float32 neighbours of every edge too
        e32 = edges.float()
        q = torch.cat([q, e32, e32.nextafter(up.float()), e32.nextafter(down.float())])
    want = premoe_bins(q, edges)
    assert torch.equal(premoe_bins_of(q, edges, ka), want)
    assert torch.equal(premoe_bins_of(q.view(-1, 1, 1), edges, ka), want.view(-1, 1, 1))
