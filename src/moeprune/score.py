"""Expert importance scores, computed from a profile alone (see ``shared/methods.md``).

Every score maps a profile to a float64 tensor ``[L, E]`` (L MoE layers, E routed experts):
higher means more important, i.e. kept. The scores read only the profile's tensors and ``meta``
(``docs/profile-format.md``); any object with ``.tensors`` and ``.meta`` works, so the scores
do not depend on how the profile was loaded.

PreMoe's K_a: the profile stores, per token, the top-Ka entries sorted by descending logit, their
q (softmax over those Ka raw logits) and f(s). Restricting the softmax to the first K_a <= Ka of
them is exact without the raw logits: for a subset B of A, softmax_B(s)_j = q_j / sum_{b in B} q_b.
So K_a can be lowered at scoring time (``ka=``); raising it above the stored Ka needs a new profile.

Bounded profiles (the default) do not keep the per-token entries, whose size grows with the
calibration set. They keep, per layer and expert, a histogram over q of the entries (Σ f, Σ q·f and
the entry count per bin, bins fixed by :func:`premoe_edges`) and, per layer, Σ_t max_i q_{i,t}, so
r_l is exact. The score sums the bins wholly above the threshold; the one bin that contains it is
split by the entries' f-weighted mean q (exact when the bin holds one entry; otherwise the bin's
mass is taken as spread uniformly over the widest sub-interval with that mean). Such a profile
scores at its stored K_a only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from .errors import UserError


class ProfileLike(Protocol):
    """What the scores need from a profile: its tensors and its ``meta`` JSON object."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


ScoreFn = Callable[..., torch.Tensor]


# --- helpers -----------------------------------------------------------------------------------


def _shape(profile: ProfileLike) -> tuple[int, int]:
    """(L, E) of the profile, from ``count`` (or ``gate``) and checked against ``meta``."""
    for name in ("count", "gate"):
        t = profile.tensors.get(name)
        if t is not None:
            if t.dim() != 2:
                raise UserError(
                    f"profile tensor '{name}' has shape {list(t.shape)}, expected [layers, experts]",
                    "the profile is corrupted; re-run `moeprune profile`",
                )
            shape = (int(t.shape[0]), int(t.shape[1]))
            break
    else:
        raise UserError("the profile has no 'count' tensor", "re-run `moeprune profile`")
    layers = profile.meta.get("layers")
    num_experts = profile.meta.get("num_experts")
    if (layers is not None and len(layers) != shape[0]) or (
        num_experts is not None and int(num_experts) != shape[1]
    ):
        raise UserError(
            f"profile tensors are {list(shape)} but its meta says {len(layers or [])} MoE layers "
            f"x {num_experts} experts",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    return shape


def _get(profile: ProfileLike, name: str, method: str, shape: Sequence[int] | None = None) -> torch.Tensor:
    """A profile tensor as float64, with a one-line error when it is missing or misshapen."""
    t = profile.tensors.get(name)
    if t is None:
        raise UserError(
            f"the profile has no '{name}' tensor, which method '{method}' needs",
            "re-run `moeprune profile` with this version of moeprune",
        )
    if shape is not None and tuple(t.shape[: len(shape)]) != tuple(shape):
        raise UserError(
            f"profile tensor '{name}' has shape {list(t.shape)}, expected leading dims {list(shape)}",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    return t.to(torch.float64)


def _tokens(profile: ProfileLike) -> float:
    t = profile.tensors.get("tokens")
    if t is not None and t.numel() >= 1:
        return float(t.reshape(-1)[0])
    return float(profile.meta.get("tokens", 0) or 0)


def _safe_div(num: torch.Tensor, den: torch.Tensor | float) -> torch.Tensor:
    """num / den, and 0 where den == 0."""
    den_t = torch.as_tensor(den, dtype=torch.float64).expand_as(num)
    out = torch.zeros_like(num)
    nz = den_t != 0
    out[nz] = num[nz] / den_t[nz]
    return out


# --- the scores ----------------------------------------------------------------------------------


def score_random(profile: ProfileLike, *, seed: int = 0) -> torch.Tensor:
    """Uniform random in [0, 1), seeded by ``seed`` and the layer position (reproducible)."""
    n_layers, n_experts = _shape(profile)
    out = torch.empty(n_layers, n_experts, dtype=torch.float64)
    for layer in range(n_layers):
        gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + layer) % (2**63))
        out[layer] = torch.rand(n_experts, generator=gen, dtype=torch.float64)
    return out


def score_frequency(profile: ProfileLike) -> torch.Tensor:
    """N_i: tokens routed to expert i."""
    return _get(profile, "count", "frequency", _shape(profile))


def score_gate(profile: ProfileLike) -> torch.Tensor:
    """Σ_t g_{i,t} (soft activation / gating score)."""
    return _get(profile, "gate", "gate", _shape(profile))


def score_easyep(profile: ProfileLike) -> torch.Tensor:
    """Σ_t g_{i,t} ‖e_{i,t}‖ max(0, 1 − cos(h_t, h̃_t)) (EASY-EP)."""
    return _get(profile, "easyep", "easyep", _shape(profile))


def score_easyep_no_token(profile: ProfileLike) -> torch.Tensor:
    """Σ_t g_{i,t} ‖e_{i,t}‖ (EASY-EP without the token-contribution term)."""
    return _get(profile, "reap_sum", "easyep-no-token", _shape(profile))


def score_reap(profile: ProfileLike) -> torch.Tensor:
    """(1/N_i) Σ_{t: i∈K_t} g_{i,t} ‖e_{i,t}‖ (REAP), 0 when N_i = 0."""
    shape = _shape(profile)
    return _safe_div(_get(profile, "reap_sum", "reap", shape), _get(profile, "count", "reap", shape))


def premoe_entries(
    profile: ProfileLike, ka: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PreMoe's per-token candidates (q, f, idx), each [L, T, K_a], q renormalised to K_a if lowered."""
    n_layers, n_experts = _shape(profile)
    q = _get(profile, "premoe_q", "premoe")
    f = _get(profile, "premoe_f", "premoe")
    idx_raw = profile.tensors.get("premoe_idx")
    if idx_raw is None:
        raise UserError(
            "the profile has no 'premoe_idx' tensor, which method 'premoe' needs",
            "re-run `moeprune profile` with this version of moeprune",
        )
    if q.dim() != 3 or q.shape[0] != n_layers or f.shape != q.shape or idx_raw.shape != q.shape:
        raise UserError(
            f"PreMoe tensors have shapes {list(q.shape)}, {list(f.shape)}, {list(idx_raw.shape)}; "
            f"expected [{n_layers}, tokens, Ka] each",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    idx = idx_raw.to(torch.long)
    stored = int(q.shape[2])
    if ka is not None:
        ka = int(ka)
        if ka < 1 or ka > stored:
            raise UserError(
                f"PreMoe K_a={ka} is not available: this profile stores the top {stored} logits per token",
                f"use a K_a from 1 to {stored}, or re-profile with a larger premoe_ka",
            )
        if ka < stored:
            q = q[:, :, :ka]
            # softmax over a subset of the candidates = their q renormalised (exact; see module doc)
            q = _safe_div(q, q.sum(dim=-1, keepdim=True).expand_as(q))
            f = f[:, :, :ka]
            idx = idx[:, :, :ka]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_experts):
        raise UserError(
            "the profile's 'premoe_idx' holds expert ids outside the expert range",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    return q, f, idx


def premoe_threshold(q: torch.Tensor) -> torch.Tensor:
    """r_l = mean over tokens of max_i q_{i,t} (entries are sorted descending: q[:, :, 0]), [L]."""
    if q.shape[1] == 0:
        return torch.zeros(q.shape[0], dtype=torch.float64)
    return q[:, :, 0].mean(dim=1)


def premoe_token_entries(logits: torch.Tensor, ka: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PreMoe's per-token candidates from router logits [T, E]: the top-``ka`` logits (descending),
    q = their softmax over the candidates only, f = max(s, sigmoid(s)); (q, f, idx) each [T, ka].
    Calibration stores exactly these; a retrieval query computes them the same way."""
    s = logits.float()
    vals, ids = torch.topk(s, ka, dim=-1)
    return torch.softmax(vals, -1), torch.maximum(vals, torch.sigmoid(vals)), ids


def premoe_scores(
    q: torch.Tensor, f: torch.Tensor, idx: torch.Tensor, n_experts: int, r: float | None = None
) -> torch.Tensor:
    """(1/T) Σ_t Σ_j 1[idx_{t,j} = i ∧ q_{t,j} ≥ r_l] f_{t,j} from entries [L, T, Ka] -> [L, E]."""
    n_layers, n_tokens = int(q.shape[0]), int(q.shape[1])
    # on the entries' device: a query's entries come from the model's device (a GPU in serving)
    out = torch.zeros(n_layers, n_experts, dtype=torch.float64, device=idx.device)
    if n_tokens == 0:
        return out
    thr = premoe_threshold(q) if r is None else torch.full((n_layers,), float(r), dtype=torch.float64, device=q.device)
    use = q.double() >= thr.view(-1, 1, 1)
    contrib = torch.where(use, f.double(), torch.zeros((), dtype=torch.float64))
    out.scatter_add_(1, idx.long().reshape(n_layers, -1), contrib.reshape(n_layers, -1))
    return out / n_tokens


PREMOE_BINS = 1024  # histogram bins over q of a bounded profile
PREMOE_HIST = ("premoe_hist_f", "premoe_hist_qf", "premoe_hist_n")  # [L, E, B] float64 each


def _premoe_low_bins(bins: int) -> int:
    """How many of the q histogram's bins cover [0, 1/Ka) (:func:`premoe_edges`)."""
    return bins // 8


def premoe_edges(ka: int, bins: int = PREMOE_BINS) -> torch.Tensor:
    """Lower bin edges [bins] (float64, ascending) of the q histogram: bin b holds
    edges[b] <= q < edges[b + 1]; the last bin holds q == 1 exactly (saturated softmax; Ka = 1).
    An eighth of the bins cover [0, 1/Ka), where entries count only under a fixed r < 1/Ka
    (r_l = mean of max q >= 1/Ka always); the rest cover [1/Ka, 1)."""
    f64 = torch.float64
    if ka <= 1:
        return torch.linspace(0.0, 1.0, bins, dtype=f64)
    low = _premoe_low_bins(bins)
    return torch.cat(
        [torch.linspace(0.0, 1.0 / ka, low + 1, dtype=f64)[:-1], torch.linspace(1.0 / ka, 1.0, bins - low, dtype=f64)]
    )


def premoe_bins(q: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each q (any shape), long."""
    b = torch.searchsorted(edges, q.to(edges.dtype).contiguous(), right=True) - 1
    return b.clamp_(0, edges.numel() - 1)


def premoe_bins_of(q: torch.Tensor, edges: torch.Tensor, ka: int) -> torch.Tensor:
    """:func:`premoe_bins` of ``q`` (any shape and float dtype, compared as float64) for the edges
    ``premoe_edges(ka, edges.numel())``, the same result 2-3x faster on CPU (calibration bins
    every entry of every layer): the edges are two uniform grids, so the bin is estimated in q's
    dtype with one multiply-add (off by at most one bin near an edge), then set exactly by one
    comparison with the stored edges on each side. NaN falls in the last bin, as with
    ``searchsorted``."""
    n = edges.numel()
    if ka <= 1:
        est = q * float(n - 1)
    else:
        low, inv = _premoe_low_bins(n), 1.0 / ka
        slope = (n - low - 1) / (1.0 - inv)
        est = torch.where(q < inv, q * float(ka * low), q * slope + (low - inv * slope))
    b = est.nan_to_num_(nan=float(n - 1)).clamp_(0, n - 1).long()
    below = q < edges[b]
    b += (q >= edges[(b + 1).clamp_(max=n - 1)]).long()  # (b + 1 clamped: the last bin has no upper edge)
    b -= below.long()
    return b.clamp_(0, n - 1)


def premoe_hist_scores(
    hist_f: torch.Tensor,
    hist_qf: torch.Tensor,
    hist_n: torch.Tensor,
    edges: torch.Tensor,
    qmax: torch.Tensor,
    tokens: float,
    r: float | None = None,
) -> torch.Tensor:
    """PreMoe PEU [L, E] from a bounded profile's histograms [L, E, B] and Σ_t max q [L]."""
    n_layers, n_experts, _ = hist_f.shape
    out = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    if tokens <= 0:
        return out
    lo = edges.double()
    hi = torch.cat([lo[1:], lo[-1:]])  # the last bin is [1, 1]
    thr = qmax.double() / tokens if r is None else torch.full((n_layers,), float(r), dtype=torch.float64)
    for li in range(n_layers):
        t = float(thr[li])
        full = lo >= t
        out[li] = hist_f[li][:, full].sum(-1)
        inside = ((lo < t) & (hi > t)).nonzero().flatten()
        if inside.numel() == 0:
            continue
        b = int(inside[0])
        mass, qf, n = hist_f[li, :, b], hist_qf[li, :, b], hist_n[li, :, b]
        width = float(hi[b] - lo[b])
        x0 = (t - float(lo[b])) / width  # the threshold's position in the bin, in (0, 1)
        qmean = _safe_div(qf, mass)  # the entries' f-weighted mean q
        mean = qmean.sub(float(lo[b])).div(width).clamp(0.0, 1.0)
        # the widest uniform interval [a, c] inside the bin with this mean: it touches the nearer edge
        a = (2 * mean - 1).clamp(min=0.0)
        c = (2 * mean).clamp(max=1.0)
        span = c - a
        frac = _safe_div((c - x0).clamp(min=0.0), span).clamp(max=1.0)
        point = (n <= 1) | (span <= 0)  # one entry (or all at one q): its position decides exactly
        frac = torch.where(point, (qmean >= t).double(), frac)
        out[li] += mass * frac
    return out / tokens


def has_premoe_entries(profile: ProfileLike) -> bool:
    """Whether the profile keeps PreMoe's per-token entries (``--premoe-exact``, or older profiles)."""
    return "premoe_q" in profile.tensors


def stored_ka(profile: ProfileLike) -> int:
    """The K_a the profile's PreMoe statistics were taken with."""
    if has_premoe_entries(profile):
        return int(profile.tensors["premoe_q"].shape[-1])
    t = profile.tensors.get("premoe_ka")
    if t is None:
        raise UserError(
            "the profile has neither PreMoe entries nor histograms, which method 'premoe' needs",
            "re-run `moeprune profile` with this version of moeprune",
        )
    return int(t.reshape(-1)[0])


def score_premoe(profile: ProfileLike, *, r: float | None = None, ka: int | None = None) -> torch.Tensor:
    """PreMoe PEU: (1/T) Σ_t Σ_j 1[idx_{t,j} = i ∧ q_{t,j} ≥ r_l] f_{t,j}.

    ``r`` fixes the threshold for every layer (default: r_l, the mean top-1 q of the layer);
    ``ka`` lowers the candidate count below the stored Ka (needs the per-token entries).
    """
    n_layers, n_experts = _shape(profile)
    if has_premoe_entries(profile):
        q, f, idx = premoe_entries(profile, ka)
        return premoe_scores(q, f, idx, n_experts, r)
    stored = stored_ka(profile)
    if ka is not None and int(ka) != stored:
        raise UserError(
            f"PreMoe K_a={ka} is not available: this profile keeps PreMoe's statistics for K_a={stored} "
            "only (a bounded profile, without per-token entries)",
            f"re-profile with --premoe-ka {ka}, or with --premoe-exact to lower K_a at scoring time",
        )
    hist = [_get(profile, name, "premoe", (n_layers, n_experts)) for name in PREMOE_HIST]
    edges = _get(profile, "premoe_edges", "premoe")
    qmax = _get(profile, "premoe_qmax", "premoe", (n_layers,))
    if edges.dim() != 1 or any(h.dim() != 3 or h.shape[2] != edges.numel() for h in hist):
        raise UserError(
            "the profile's PreMoe histograms do not match its bin edges",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    return premoe_hist_scores(*hist, edges, qmax, _tokens(profile), r)


def score_premoe_v1(profile: ProfileLike) -> torch.Tensor:
    """(1/T) Σ_t 1[i = argmax s_t] s_{i,t} (PreMoe v1 / TCESS as released)."""
    shape = _shape(profile)
    return _safe_div(_get(profile, "premoe_v1", "premoe-v1", shape), _tokens(profile))


def mone_variation(profile: ProfileLike, method: str = "mone") -> torch.Tensor:
    """φ_var = ‖ sqrt(M2 / (N − 1)) ‖₂ over the hidden dimension, 0 where N <= 1, [L, E]."""
    shape = _shape(profile)
    count = _get(profile, "count", method, shape)
    m2 = _get(profile, "mone_m2", method, shape)
    if m2.dim() != 3:
        raise UserError(
            f"profile tensor 'mone_m2' has shape {list(m2.shape)}, expected [layers, experts, hidden]",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    dof = (count - 1).clamp(min=0).unsqueeze(-1).expand_as(m2)
    var = _safe_div(m2.clamp(min=0), dof)
    return var.sqrt().norm(dim=-1)


def score_mone(profile: ProfileLike) -> torch.Tensor:
    """MoNE: φ_freq · φ_var with φ_freq = (1/N_i) Σ_t g_{i,t} (the paper)."""
    shape = _shape(profile)
    freq = _safe_div(_get(profile, "gate", "mone", shape), _get(profile, "count", "mone", shape))
    return freq * mone_variation(profile, "mone")


def score_mone_code(profile: ProfileLike) -> torch.Tensor:
    """MoNE as released: φ_freq = (1/T) Σ_t g_{i,t}."""
    shape = _shape(profile)
    freq = _safe_div(_get(profile, "gate", "mone-code", shape), _tokens(profile))
    return freq * mone_variation(profile, "mone-code")


# --- ties ----------------------------------------------------------------------------------------


def break_ties(primary: torch.Tensor, secondary: torch.Tensor) -> torch.Tensor:
    """``primary`` [L, E] with its exact ties ordered by ``secondary`` [L, E]; its strict order kept.

    Each layer adds to ``primary`` a quarter of its smallest gap between distinct values, times
    ``secondary`` rescaled to [0, 1]: no expert can pass one with a strictly higher primary score
    (it gains less than the gap), while tied experts are ordered by the secondary score. Without
    it a plan picks among ties by lowest expert id, an arbitrary choice."""
    primary = primary.to(torch.float64)
    secondary = secondary.to(torch.float64)
    out = primary.clone()
    for row in range(primary.shape[0]):
        p = primary[row]
        values = torch.unique(p)  # sorted ascending
        if values.numel() == p.numel():
            continue  # no tie in this layer
        # every score equal: any step works, one of the scores' own size
        gap = float((values[1:] - values[:-1]).min()) if values.numel() > 1 else float(p.abs().max()) or 1.0
        s = secondary[row] - secondary[row].min()
        top = float(s.max())
        frac = s / top if top > 0 else torch.zeros_like(s)
        out[row] = p + 0.25 * gap * frac
    return out


# PreMoe's PEU gives a non-zero score to only a few experts per layer on small models (a token
# counts only for candidates with q >= r_l, usually its top one or two): the rest of a kept set
# would be chosen among exact zeros by lowest id (a PreMoe plan answered 0.00 where EASY-EP kept
# 1.00). Such ties are broken by EASY-EP's score from the same profile, which ranks every expert a
# token reached. PEU's own ranking stays where it is strict.
TIE_BREAK: dict[str, str] = {"premoe": "easyep", "premoe-v1": "easyep"}


def nonzero_per_layer(
    profiles: ProfileLike | Sequence[ProfileLike], method: str, **options: Any
) -> list[int]:
    """How many experts of each layer the method scores above zero before its ties are broken
    (in any of several profiles: what their mixed-domain score sees)."""
    group = list(profiles) if isinstance(profiles, Sequence) else [profiles]
    opts = {k: v for k, v in options.items() if v is not None}
    nz = torch.stack([SCORES[method](p, **opts) != 0 for p in group]).any(dim=0)
    return [int(n) for n in nz.sum(dim=1).tolist()]


# The method a command uses when none is named (library build, one-shot prune, recipes): MoNE's
# score measured best on the project's quality benchmark, for removal and novices alike
# (docs/methods.md, "Which method by default").
DEFAULT_METHOD = "mone"

SCORES: dict[str, ScoreFn] = {
    "random": score_random,
    "frequency": score_frequency,
    "gate": score_gate,
    "easyep": score_easyep,
    "easyep-no-token": score_easyep_no_token,
    "reap": score_reap,
    "premoe": score_premoe,
    "premoe-v1": score_premoe_v1,
    "mone": score_mone,
    "mone-code": score_mone_code,
}

# The keyword options each method accepts.
OPTIONS: dict[str, tuple[str, ...]] = {"random": ("seed",), "premoe": ("r", "ka")}


def check_method(method: str) -> None:
    if method not in SCORES:
        raise UserError(f"unknown method '{method}'", f"use one of: {', '.join(SCORES)}")


def score(profile: ProfileLike, method: str, **options: Any) -> torch.Tensor:
    """The ``method`` score of every expert, float64 [L, E]; higher = keep. For the methods of
    :data:`TIE_BREAK`, exact ties are ordered by the named secondary score (:func:`break_ties`).

    Options left at ``None`` are ignored; an option the method does not take is an error.
    """
    check_method(method)
    opts = {k: v for k, v in options.items() if v is not None}
    allowed = OPTIONS.get(method, ())
    extra = sorted(set(opts) - set(allowed))
    if extra:
        raise UserError(
            f"method '{method}' takes no option {', '.join(repr(e) for e in extra)}",
            f"it takes {', '.join(allowed) if allowed else 'no options'}",
        )
    out = SCORES[method](profile, **opts).to(torch.float64)
    if method in TIE_BREAK and bool(torch.isfinite(out).all()):
        out = break_ties(out, SCORES[TIE_BREAK[method]](profile))
    if not bool(torch.isfinite(out).all()):
        raise UserError(
            f"the '{method}' scores contain NaN or infinite values",
            "the profile is corrupted; re-run `moeprune profile`",
        )
    return out


def normalize_per_layer(scores: torch.Tensor) -> torch.Tensor:
    """Each layer's scores divided by its sum (of absolute values, so order is kept even for
    negative scores; identical to the sum for non-negative ones). An all-zero layer stays zero."""
    scores = scores.to(torch.float64)
    total = scores.abs().sum(dim=-1, keepdim=True)
    return _safe_div(scores, total.expand_as(scores))


def combined_score(profiles: Sequence[ProfileLike], method: str, **options: Any) -> torch.Tensor:
    """Mixed-domain score (EASY-EP): per-layer-normalised scores averaged over the profiles."""
    if not profiles:
        raise UserError("no profile given", "pass at least one profile")
    check_method(method)
    prints = [p.meta.get("model_fingerprint") for p in profiles]
    if len(set(prints)) > 1:
        raise UserError(
            "the profiles come from different models (model fingerprints "
            + ", ".join(str(x)[:12] for x in prints)
            + ")",
            "combine only profiles of the same model",
        )
    from .identity import KEY, check_router

    for p in profiles[1:]:
        check_router(
            profiles[0].meta.get(KEY),
            p.meta.get(KEY),
            "one of the profiles",
            "combine only profiles of the same model",
        )
    shapes = {_shape(p) for p in profiles}
    if len(shapes) > 1:
        raise UserError(
            f"the profiles have different shapes {sorted(shapes)}", "combine only profiles of the same model"
        )
    parts = [normalize_per_layer(score(p, method, **options)) for p in profiles]
    return torch.stack(parts).mean(dim=0)
