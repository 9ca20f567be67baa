"""Expert importance scores, computed from a profile alone (see ``shared/methods.md``).

Every score maps a profile to a float64 tensor ``[L, E]`` (L MoE layers, E routed experts):
higher means more important, i.e. kept. The scores read only the profile's tensors and ``meta``
(``docs/profile-format.md``); any object with ``.tensors`` and ``.meta`` works, so the scores
do not depend on how the profile was loaded.

PreMoe's K_a: the profile stores, per token, the top-Ka entries sorted by descending logit, their
q (softmax over those Ka raw logits) and f(s). Restricting the softmax to the first K_a <= Ka of
them is exact without the raw logits: for a subset B of A, softmax_B(s)_j = q_j / sum_{b in B} q_b.
So K_a can be lowered at scoring time (``ka=``); raising it above the stored Ka needs a new profile.
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
    out = torch.zeros(n_layers, n_experts, dtype=torch.float64)
    if n_tokens == 0:
        return out
    thr = premoe_threshold(q) if r is None else torch.full((n_layers,), float(r), dtype=torch.float64)
    use = q.double() >= thr.view(-1, 1, 1)
    contrib = torch.where(use, f.double(), torch.zeros((), dtype=torch.float64))
    out.scatter_add_(1, idx.long().reshape(n_layers, -1), contrib.reshape(n_layers, -1))
    return out / n_tokens


def score_premoe(profile: ProfileLike, *, r: float | None = None, ka: int | None = None) -> torch.Tensor:
    """PreMoe PEU: (1/T) Σ_t Σ_j 1[idx_{t,j} = i ∧ q_{t,j} ≥ r_l] f_{t,j}.

    ``r`` fixes the threshold for every layer (default: r_l, the mean top-1 q of the layer);
    ``ka`` lowers the candidate count below the stored Ka.
    """
    _, n_experts = _shape(profile)
    q, f, idx = premoe_entries(profile, ka)
    return premoe_scores(q, f, idx, n_experts, r)


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
    """The ``method`` score of every expert, float64 [L, E]; higher = keep.

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
