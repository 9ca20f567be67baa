"""The smallest pruned model that keeps a target share of the full model's quality on a dev set.

`moeprune search` (and ``prune --data ... --target``): one profile, then for every method x mode
(``remove``: experts dropped; ``novice``: MoNE constants, the router unchanged) x scope
(``layer``: K per layer; ``global``: K x L in all, per-layer-normalised) it looks for the smallest
K whose dev-set quality is >= target x the full model's, by bisection on K with the plans applied
in memory (routing masks or novice constants, as :mod:`moeprune.compare`: the numbers equal those
of the checkpoint `moeprune prune` writes).

Quality of a variant on a dev task: its main metric over the full model's (accuracy, acc), or the
full model's perplexity over its own (lower is better); with several dev tasks, the worst task.

Size: bytes of the checkpoint (every parameter not a routed expert, the kept experts, and the
novice vectors) and active parameters per token (the parameters that are not routed experts plus
the routed experts a token runs: top-k in remove mode; in novice mode the expected number of
routed picks that land on a kept expert, from the calibration counts, since a novice costs no
matmul). The objective is the first of (bytes, active) or (active, bytes).

Selection (``select``): a variant passes when its dev quality is >= target. With ``"bound"`` that quality is taken at the lower end of a one-sided 95% Wilson score interval of each
accuracy task (``n`` records), so a variant that passes on a lucky small dev set does not: the
smallest variant whose point score passes is the one most likely to have passed by chance. 12 of
12 records right bounds the accuracy at 0.816, so a dev set of n all-correct records can certify a
target t only when n >= 2.706 t / (1 - t): 25 records for 0.9, 52 for 0.95, 268 for 0.99.
Perplexity tasks are taken at their value (a mean over many tokens, not a proportion of records).
``"mean"``: the dev quality itself (the rule before the bound). ``"auto"`` (the default): the
bound when the dev set can certify the target at all (a variant exactly as good as the full model
would pass at its bound), else the mean, with a line saying so: a handful of demonstrations
still gets a pick, and enough of them get the stricter rule.

Cost: bisection assumes quality grows with K for one configuration (true on average, not
exactly: a K between two that pass may fail). Early stop: a configuration is evaluated only at the
sizes that would beat the best found so far, starting with the largest of them; if that fails the
configuration is dropped. Plans with the same kept sets in the same mode are evaluated once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .errors import UserError

MODES = ("novice", "remove")
SCOPES = ("layer", "global")
# the methods searched by default: the output-aware scores of the quality benchmark
# (docs/benchmarks.md); gate, frequency and random never led there
DEFAULT_METHODS = ("mone", "easyep", "reap", "premoe")
OBJECTIVES = ("bytes", "active")
# how a variant passes the target: the lower confidence bound of its dev score, or the score itself
# ("auto": the bound when the dev set is large enough for a variant as good as the full model to
# pass at it, else the mean, said in the log)
SELECTIONS = ("auto", "bound", "mean")
CONFIDENCE = 0.95  # the bound's one-sided level
_Z = 1.6448536269514722  # its standard normal quantile, statistics.NormalDist().inv_cdf(0.95)


@dataclass
class Point:
    """One evaluated variant (or the full model: method 'full')."""

    method: str
    mode: str
    scope: str
    experts: int  # K: per layer (layer scope) or the mean per layer (global scope: K x L in all)
    kept_total: int
    bytes: int
    active_params: int
    quality: float  # worst dev task's metric relative to the full model
    passed: bool
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    kept_counts: list[int] = field(default_factory=list)
    bound: float | None = None  # the quality at the lower confidence bound (select="bound"), else None

    def label(self) -> str:
        if self.method == "full":
            return "full model"
        return f"{self.method} {self.mode} {self.scope} {self.experts}"


@dataclass
class SearchResult:
    target: float
    objective: str
    num_experts: int
    num_layers: int
    full: Point
    points: list[Point]
    best: Point | None
    plan: Any = None  # the chosen Plan
    configs: list[dict[str, Any]] = field(
        default_factory=list
    )  # per configuration: its smallest K, or why none
    test: dict[str, Any] | None = None  # {"full": {task: metrics}, "pruned": {...}, "quality": q}
    select: str = "bound"  # the selection rule (SELECTIONS)

    def frontier(self) -> list[Point]:
        """The Pareto frontier of size (bytes) against dev quality: no point is both smaller and better."""
        pts = sorted([self.full, *self.points], key=lambda p: (p.bytes, -p.quality))
        out: list[Point] = []
        best = -math.inf
        for p in pts:
            if p.quality > best:
                out.append(p)
                best = p.quality
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "select": self.select,
            "confidence": CONFIDENCE if self.select == "bound" else None,
            "objective": self.objective,
            "num_experts": self.num_experts,
            "num_layers": self.num_layers,
            "full": asdict(self.full),
            "best": asdict(self.best) if self.best else None,
            "configs": self.configs,
            "frontier": [p.label() for p in self.frontier()],
            "points": [asdict(p) for p in self.points],
            "test": self.test,
            "plan": self.plan.to_json() if self.plan is not None else None,
        }


# --- quality ----------------------------------------------------------------------------------


def wilson_lower(p: float, n: int, z: float = _Z) -> float:
    """The lower end of the Wilson score interval of a proportion ``p`` observed on ``n`` records
    (one-sided level: ``z`` its normal quantile). Unlike p - z x stderr it is below p even at p = 1."""
    if n <= 0:
        return 0.0
    p = min(max(p, 0.0), 1.0)
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z * z / n))


def relative_quality(
    full: dict[str, dict[str, Any]],
    got: dict[str, dict[str, Any]],
    kinds: dict[str, str],
    bound: bool = False,
) -> float:
    """The worst task's main metric relative to the full model's (1.0 = as good as full); with
    ``bound``, each accuracy of ``got`` taken at its lower confidence bound (:func:`wilson_lower`
    on the task's record count ``n``, which its metrics must then hold)."""
    from .compare import main_metric

    worst = math.inf
    for task, kind in kinds.items():
        metric, higher = main_metric(kind)
        a, b = full[task].get(metric), got[task].get(metric)
        if a is None or b is None or not math.isfinite(float(b)):
            return 0.0
        a, b = float(a), float(b)
        if bound and higher:  # accuracy: a proportion of n records
            n = got[task].get("n")
            if n is None:
                raise ValueError(f"task '{task}' has no record count 'n': its bound cannot be taken")
            b = wilson_lower(b, int(n))
        # higher is better: the share of the full model's score; lower (perplexity): its inverse
        rel = (b / a if a > 0 else float(b >= a)) if higher else (a / b if b > 0 else 0.0)
        worst = min(worst, rel)
    return worst if math.isfinite(worst) else 0.0


def auto_select(full: dict[str, dict[str, Any]], kinds: dict[str, str], target: float) -> str:
    """``"bound"`` when a variant scoring exactly as the full model on every dev task would pass
    ``target`` at its lower confidence bound (every accuracy task carries its record count), else
    ``"mean"``: the bound rule with too few records could pass nothing at all."""
    if any(full[t].get("n") is None for t, kind in kinds.items() if main_metric_higher(kind)):
        return "mean"
    return "bound" if relative_quality(full, full, kinds, bound=True) >= target - 1e-12 else "mean"


def main_metric_higher(kind: str) -> bool:
    from .compare import main_metric

    return main_metric(kind)[1]


# --- sizes ------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """What sizes a variant: from the config (:func:`moeprune.summary.summarize`) and the profile."""

    other_params: int  # every parameter that is not a routed expert
    params_per_expert: int
    hidden: int
    bytes_per_param: float
    top_k: int
    counts: torch.Tensor  # [L, E] calibration routing counts (novice active params)

    def of(self, plan: Any, mode: str) -> tuple[int, int]:
        """(bytes, active params per token) of ``plan`` in ``mode``."""
        mask = plan.kept_mask()
        kept = int(mask.sum())
        replaced = int(mask.numel()) - kept
        params = self.other_params + kept * self.params_per_expert
        if mode == "novice":
            params += replaced * self.hidden  # one vector per novice
            total = self.counts.sum(dim=1).clamp(min=1)
            share = (self.counts * mask).sum(dim=1) / total  # picks landing on a real expert
            routed = float((share * self.top_k).sum())
        else:
            routed = float(plan.top_k * mask.shape[0])
        active = self.other_params + round(routed * self.params_per_expert)
        return int(params * self.bytes_per_param), int(active)


def sizes_of(config: Any, profile: Any) -> Sizes:
    from .summary import summarize

    s = summarize(config)
    return Sizes(
        other_params=int(s.other_params),
        params_per_expert=int(s.params_per_expert),
        hidden=int(profile.meta.get("hidden_size") or profile.tensors["mone_mean"].shape[-1]),
        bytes_per_param=float(s.bytes_per_param),
        top_k=int(s.top_k),
        counts=profile.tensors["count"].to(torch.float64),
    )


# --- the search -------------------------------------------------------------------------------


def check_search_args(
    target: float,
    methods: Sequence[str],
    modes: Sequence[str],
    scopes: Sequence[str],
    objective: str,
    select: str = "auto",
) -> None:
    from .score import check_method

    if select not in SELECTIONS:
        raise UserError(f"unknown --select '{select}'", f"use {' or '.join(SELECTIONS)}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) <= 1.0:
        raise UserError(f"--target {target!r} is outside (0, 1]", "pass a share of the full model, e.g. 0.99")
    if not methods:
        raise UserError("no method to search", "pass --method at least once, or leave it out")
    for m in methods:
        check_method(m)
    for m in modes:
        if m not in MODES:
            raise UserError(f"unknown mode '{m}'", f"use {' or '.join(MODES)}")
    for s in scopes:
        if s not in SCOPES:
            raise UserError(f"unknown scope '{s}'", f"use {' or '.join(SCOPES)}")
    if objective not in OBJECTIVES:
        raise UserError(f"unknown objective '{objective}'", f"use {' or '.join(OBJECTIVES)}")
    for what, values in (("method", methods), ("mode", modes), ("scope", scopes)):
        if len(set(values)) != len(values) or not values:
            raise UserError(f"a {what} is given twice, or none", f"pass each --{what} once")


def make_variant(
    scores: torch.Tensor, meta: dict[str, Any], method: str, mode: str, scope: str, k: int
) -> Any | None:
    """The plan of one variant, or None when the routing cannot honour K (remove mode)."""
    from .plan import plan_from_profile

    try:
        return plan_from_profile(
            scores,
            meta,
            keep=int(k),
            method=method,
            scope=scope,
            router="unchanged" if mode == "novice" else "routed",
            settings={"mode": mode},
        )
    except UserError:
        return None


def search_plans(
    evaluate_variant: Callable[[Any, str], dict[str, dict[str, Any]]],
    full_metrics: dict[str, dict[str, Any]],
    kinds: dict[str, str],
    profile: Any,
    sizes: Sizes,
    *,
    target: float,
    methods: Sequence[str] = DEFAULT_METHODS,
    modes: Sequence[str] = MODES,
    scopes: Sequence[str] = SCOPES,
    objective: str = "bytes",
    select: str = "auto",
    log: Callable[[str], None] | None = None,
) -> SearchResult:
    """The search itself, on any evaluator: ``evaluate_variant(plan, mode)`` -> {task: metrics} of
    the model with ``plan`` applied in ``mode`` (with ``select="bound"`` each accuracy task's
    metrics hold its record count ``n``; see the module doc)."""
    from .score import score

    check_search_args(target, methods, modes, scopes, objective, select)
    if select == "auto":
        select = auto_select(full_metrics, kinds, target)
        if log is not None:
            log(
                "  selection: the 95% lower bound of each dev score"
                if select == "bound"
                else "  selection: the dev score itself (too few dev records to certify the target at its "
                "95% lower bound; give more with --dev, or --select bound to insist)"
            )
    meta = profile.meta
    n_layers, n_experts = (int(x) for x in profile.tensors["count"].shape)
    full_bytes = int(
        (sizes.other_params + n_layers * n_experts * sizes.params_per_expert) * sizes.bytes_per_param
    )
    full_active = sizes.other_params + sizes.top_k * n_layers * sizes.params_per_expert
    full = Point(
        "full", "-", "-", n_experts, n_layers * n_experts, full_bytes, full_active, 1.0, True, full_metrics
    )

    def key(p: Point) -> tuple[int, int]:
        return (p.bytes, p.active_params) if objective == "bytes" else (p.active_params, p.bytes)

    points: list[Point] = []
    seen: dict[tuple[Any, ...], Point] = {}  # (mode, kept sets) -> its point
    best: Point | None = None
    best_plan: Any = None
    configs: list[dict[str, Any]] = []

    def visit(plan: Any, method: str, mode: str, scope: str, k: int) -> Point:
        b, a = sizes.of(plan, mode)
        sig = (mode, tuple(tuple(plan.kept[layer]) for layer in plan.layers))
        metrics = seen[sig].tasks if sig in seen else evaluate_variant(plan, mode)
        q = relative_quality(full_metrics, metrics, kinds)
        lb = relative_quality(full_metrics, metrics, kinds, bound=True) if select == "bound" else None
        p = Point(
            method,
            mode,
            scope,
            k,
            int(plan.kept_mask().sum()),
            b,
            a,
            q,
            (q if lb is None else lb) >= target - 1e-12,
            metrics,
            plan.kept_counts(),
            lb,
        )
        if sig not in seen:
            seen[sig] = p
            points.append(p)
            if log is not None:
                shown = f"quality {q:.3f}" + ("" if lb is None else f", bound {lb:.3f}")
                log(f"  {p.label():<28} {shown} {'pass' if p.passed else 'fail'}")
        return p

    for method in methods:
        scores = score(profile, method)
        for mode in modes:
            for scope in scopes:
                # the feasible K (below E: K = E is the full model itself) with their plans
                plans = [(k, make_variant(scores, meta, method, mode, scope, k)) for k in range(1, n_experts)]
                feasible = [(k, p) for k, p in plans if p is not None]
                if best is not None:  # early stop: only sizes that would beat the best so far
                    feasible = [(k, p) for k, p in feasible if key(_size_point(sizes, p, mode)) < key(best)]
                name = {"method": method, "mode": mode, "scope": scope}
                if not feasible:
                    configs.append({**name, "experts": None, "why": "no smaller size than the best so far"})
                    continue
                hi = len(feasible) - 1
                top = visit(feasible[hi][1], method, mode, scope, feasible[hi][0])
                if not top.passed:
                    configs.append({**name, "experts": None, "why": f"fails at K={feasible[hi][0]}"})
                    continue
                found, found_plan = top, feasible[hi][1]
                lo = 0
                while lo < hi:  # the smallest passing index in [lo, hi] (hi passes)
                    mid = (lo + hi) // 2
                    p = visit(feasible[mid][1], method, mode, scope, feasible[mid][0])
                    if p.passed:
                        hi, found, found_plan = mid, p, feasible[mid][1]
                    else:
                        lo = mid + 1
                configs.append({**name, "experts": found.experts, "quality": found.quality})
                if best is None or key(found) < key(best):
                    best, best_plan = found, found_plan
    return SearchResult(
        target, objective, n_experts, n_layers, full, points, best, best_plan, configs, select=select
    )


def _size_point(sizes: Sizes, plan: Any, mode: str) -> Point:
    b, a = sizes.of(plan, mode)
    return Point("", mode, "", 0, 0, b, a, 0.0, False)


# --- reporting --------------------------------------------------------------------------------


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"


def frontier_table(result: SearchResult) -> str:
    """Markdown: the Pareto frontier (size vs dev quality), the chosen variant marked."""
    quality = "dev quality" + (f" ({CONFIDENCE:.0%} lower bound)" if result.select == "bound" else "")
    lines = [
        f"| variant | experts kept | bytes | active params | {quality} | >= target |",
        "|---|---|---|---|---|---|",
    ]
    total = result.num_experts * result.num_layers
    rows = result.frontier()
    if result.best is not None and result.best not in rows:  # smallest, but a larger one scored higher
        rows = sorted([*rows, result.best], key=lambda p: p.bytes)
    for p in rows:
        mark = " **(chosen)**" if result.best is not None and p is result.best else ""
        lines.append(
            f"| {p.label()}{mark} | {p.kept_total}/{total} | {human(p.bytes)}B | {human(p.active_params)} | "
            f"{p.quality:.3f}{'' if p.bound is None else f' ({p.bound:.3f})'} | {'yes' if p.passed else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def write_plot(path: Any, result: SearchResult) -> None:
    """Every evaluated variant as size (bytes) against dev quality, the frontier as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[Point]] = {}
    for p in result.points:
        groups.setdefault(f"{p.method} {p.mode} {p.scope}", []).append(p)
    cmap = plt.get_cmap("tab20")
    for i, (name, pts) in enumerate(sorted(groups.items())):
        ax.scatter([p.bytes for p in pts], [p.quality for p in pts], s=18, color=cmap(i % 20), label=name)
    ax.scatter([result.full.bytes], [result.full.quality], s=30, marker="s", color="black", label="full model")
    front = result.frontier()
    ax.step(
        [p.bytes for p in front],
        [p.quality for p in front],
        where="post",
        color="black",
        linewidth=1,
        label="frontier",
    )
    ax.axhline(result.target, color="red", linestyle=":", linewidth=1, label=f"target {result.target:g}")
    if result.best is not None:
        ax.scatter(
            [result.best.bytes],
            [result.best.quality],
            s=120,
            facecolors="none",
            edgecolors="red",
            label="chosen",
        )
    ax.set_xlabel("checkpoint bytes")
    ax.set_ylabel("dev quality (relative to the full model)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
